/* Scenarios: each drives one device the way a driver would and says PASS or FAIL. */
#ifndef TESTGUEST_SCENARIO_H
#define TESTGUEST_SCENARIO_H

#include "lib.h"

/* What the zero page told us about RAM. */
struct boot_info {
    unsigned e820_entries;
    uint64_t ram_bytes; /* sum of the usable (type 1) e820 ranges */
    uint64_t ram_end;   /* first byte above the highest usable range */
};
extern struct boot_info boot_info;
/* fabric.mib=N on the command line: how much a throughput scenario moves (0: its default). */
extern uint64_t bench_mib;

/* The value of KEY=VALUE on the command line (up to the next space), or NULL. */
const char *cmdline_value(const char *key);
/* The same as a number (C notation), or `fallback` when absent or not a number. */
uint64_t cmdline_u64(const char *key, uint64_t fallback);

/* The verdict of a scenario: its message follows "PASS " or "FAIL ". */
struct result {
    char msg[256];
};

/* Return values for scenarios: `return pass(r, "...")` / `return fail(r, "...")`. */
int pass(struct result *r, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
int fail(struct result *r, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* A line "testguest: NAME: ..." for intermediate results (one per sub-case). */
void note(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

typedef int (*scenario_fn)(struct result *r);

int scenario_rng(struct result *r);
int scenario_blk_write(struct result *r);
int scenario_blk_ro(struct result *r);
int scenario_blk_id(struct result *r);
int scenario_hostile_blk(struct result *r);
int scenario_config_flood(struct result *r);
int scenario_net(struct result *r);
int scenario_balloon(struct result *r);
/* kvmclock and sleeping in ring 3 (memload.c). */
int scenario_clock(struct result *r);
/* A balloon driver with a memory workload, the guest side of bench/memory (memload.c). */
int scenario_memload(struct result *r);
/* Throughput (bench.c): console lines `testguest: bench start` and `testguest: bench end bytes=N`
 * bracket the timed part. */
int scenario_blk_bench_write(struct result *r);
int scenario_blk_bench_read(struct result *r);
int scenario_net_bench_tx(struct result *r);
int scenario_net_bench_rx(struct result *r);

#endif
