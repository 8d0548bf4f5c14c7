/* memload: a virtio-balloon driver with a memory workload, the guest side of bench/memory
 * (bench/src/bin/memory-bench.rs); and clock, a check of the clock and of sleeping in ring 3
 * that memload relies on.
 *
 * Memory. RAM from POOL_START up is the guest's page pool; below it sit the test guest itself,
 * its page tables and queues (what a Linux guest's kernel keeps for itself, which it does not
 * count in its total). The workload holds pages from the bottom of the pool up, the balloon
 * from the top down, and what lies between is free:
 *
 *     POOL_START                                                       pool end (RAM end)
 *     | workload ... | free, held by the host | free, not | ... balloon |
 *                    ^ workload              ^ dirty_top              ^ pool - balloon
 *
 * Free pages the workload gave back stay in host memory ("dirty") until free page reporting
 * hands them to the host; pages the balloon gave back, and pages never touched, hold none.
 *
 * The driver, as Linux's virtio_balloon does it (without deflate-on-oom: only the host's
 * target moves the balloon, so the bench sees how fast the host gives memory back):
 *  - follows num_pages: inflates with free pages only (never the workload's; when there are
 *    none it tries again later and `actual` stays short of the target), deflates on request,
 *    256 PFNs a request, and writes `actual` after each; it negotiates MUST_TELL_HOST (it
 *    never touches a page before its deflate request is answered);
 *  - statistics: posts them before DRIVER_OK and answers each request of the device with
 *    fresh numbers, Linux's way of counting: total = the pool outside the balloon, free and
 *    available = pages neither the workload nor the balloon holds, major faults = pages the
 *    workload had to wait for, minor faults = pages it touched, no caches, no swap;
 *  - free page reporting when the device offers it: free 2 MiB blocks (Linux's pageblock
 *    order) that hold host memory are reported 2 s after memory was freed (Linux's
 *    PAGE_REPORTING_DELAY), up to 32 blocks a request.
 *
 * The workload. Its demand follows phases given on the command line, on the host's clock
 * (kvmclock), so that several VMs follow one timeline:
 *     memload.start=UNIX_MS         when phase 0 ends counting (default: at boot)
 *     memload.phases=MIB:S,MIB:S,.. demand and length of each phase; the last one holds
 *     memload.oom_ms=N              no page for this long is an OOM kill (default 10000)
 *     memload.report_delay_ms=N     free page reporting delay (default 2000)
 *     memload.reporting=0           do not use free page reporting even if offered
 * It takes free pages and writes a mark into each. When it needs a page and none is free it
 * waits: that is pressure, counted (every page it then gets is a major fault) and printed when
 * it starts and ends. If no page comes for memload.oom_ms (a real kernel's OOM killer giving
 * up), that is a guest OOM kill: the workload drops all its memory and stays down until the
 * next phase. Pages it frees are checked for their marks (a page of the workload that the host
 * discarded would read back as zeros), and so, a few per turn, are the pages it holds.
 *
 * Console: every line is "testguest: memload: t=UNIX_MS EVENT key=value ...":
 *     ready pool_mib=.. reporting=0|1 tsc_khz=..
 *     phase index=I demand_mib=D
 *     grown have_mib=.. took_ms=..              (the workload has its demand)
 *     wait-start need_mib=.. have_mib=..
 *     wait-end waited_ms=.. have_mib=.. reason=satisfied|demand-fell
 *     oom-kill waited_ms=.. need_mib=.. have_mib=..
 *     balloon target_mib=.. actual_mib=..      (a new target, and when it is reached)
 *     report mib=..                            (free page reporting)
 *     status demand_mib= have_mib= balloon_mib= free_mib= dirty_mib= waits= oom_kills=
 *            majflt= max_wait_ms= corrupt= reported_mib= stats=       (every second)
 * The guest runs until the host presses Ctrl-Alt-Del (fabric-vmm's Shutdown), then prints its
 * last status and its verdict: FAIL if a page lost its contents or the device misbehaved. */
#include "scenario.h"
#include "virtio.h"

#define VIRTIO_BALLOON_F_MUST_TELL_HOST (1ull << 0)
#define VIRTIO_BALLOON_F_STATS_VQ (1ull << 1)
#define VIRTIO_BALLOON_F_REPORTING (1ull << 5)
#define CFG_NUM_PAGES 0
#define CFG_ACTUAL 4

#define VIRTIO_BALLOON_S_SWAP_IN 0
#define VIRTIO_BALLOON_S_SWAP_OUT 1
#define VIRTIO_BALLOON_S_MAJFLT 2
#define VIRTIO_BALLOON_S_MINFLT 3
#define VIRTIO_BALLOON_S_MEMFREE 4
#define VIRTIO_BALLOON_S_MEMTOT 5
#define VIRTIO_BALLOON_S_AVAIL 6
#define VIRTIO_BALLOON_S_CACHES 7

#define POOL_START ((uint64_t)16 << 20)
#define PAGES_PER_MIB 256u
#define BLOCK_PAGES 512u /* 2 MiB: Linux reports free memory in pageblocks */
#define PFNS_PER_REQUEST 256u
#define REPORT_BLOCKS_PER_REQUEST 32u /* Linux's PAGE_REPORTING_CAPACITY */
/* Work per turn of the loop, so that the device and the clock are looked at often. */
#define TOUCH_PAGES_PER_TURN 4096u
#define CHECK_PAGES_PER_TURN 64u
#define MAX_PHASES 64
#define IDLE_US 10000
#define STATUS_MS 1000
#define KEYBOARD_POLL_MS 100
#define PAGE_MARK 0x6d656d6c6f616400ull

#define I8042_DATA 0x60
#define I8042_STATUS 0x64
#define I8042_OUTPUT_FULL 0x01
#define SCANCODE_EXTENDED 0xe0
#define SCANCODE_DELETE 0x71

struct stat_entry {
    uint16_t tag;
    uint64_t val;
} __attribute__((packed));

#define NSTATS 8
static struct stat_entry stats[NSTATS] ALIGNED(64);
static uint32_t pfns[PFNS_PER_REQUEST] ALIGNED(64);

struct phase {
    uint32_t pages;
    uint64_t ms;
};

static struct memload {
    struct virtio_dev *dev;
    struct virtq inflate, deflate, statsq, reportq;
    int reporting;
    uint32_t pool;      /* pages in the pool */
    uint32_t workload;  /* pages the workload holds: [0, workload) */
    uint32_t balloon;   /* pages in the balloon: [pool - balloon, pool) */
    uint32_t dirty_top; /* free pages in [workload, dirty_top) hold host memory */
    uint32_t target;    /* num_pages, as last read */
    uint32_t announced_target;
    uint32_t check_next; /* next workload page the sweep checks */

    struct phase phases[MAX_PHASES];
    unsigned nphases, phase;
    uint64_t start_ms, oom_ms, report_delay_ms;
    int killed; /* OOM-killed: the workload is down until the next phase */

    int growing, waiting;
    uint64_t grow_start_ms, wait_start_ms, last_progress_ms;
    uint64_t report_due_ms; /* 0: nothing to report */

    uint64_t majflt, minflt, waits, oom_kills, max_wait_ms, corrupt, reported_pages, stats_posted;
    const char *error;
} m;

static uint64_t page_addr(uint32_t page) { return POOL_START + (uint64_t)page * PAGE_SIZE; }
static uint32_t mib_of(uint64_t pages) { return (uint32_t)(pages / PAGES_PER_MIB); }
static uint32_t free_pages(void) { return m.pool - m.workload - m.balloon; }

static void event(uint64_t now, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void event(uint64_t now, const char *fmt, ...)
{
    char line[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof(line), fmt, ap);
    va_end(ap);
    printf("testguest: memload: t=%lu %s\n", now, line);
}

/* --- the command line ---------------------------------------------------------------------- */

/* "MIB:S,MIB:S,...": false if it does not parse. */
static int parse_phases(const char *p)
{
    m.nphases = 0;
    while (p && *p && *p != ' ') {
        if (m.nphases == MAX_PHASES || *p < '0' || *p > '9')
            return 0;
        uint64_t mib = parse_u64(&p);
        if (*p++ != ':' || *p < '0' || *p > '9')
            return 0;
        uint64_t secs = parse_u64(&p);
        uint64_t ms = secs * 1000;
        if (*p == '.') { /* tenths of a second */
            p++;
            if (*p >= '0' && *p <= '9')
                ms += (uint64_t)(*p++ - '0') * 100;
        }
        m.phases[m.nphases++] = (struct phase){(uint32_t)(mib * PAGES_PER_MIB), ms};
        if (*p == ',')
            p++;
        else if (*p && *p != ' ')
            return 0;
    }
    return m.nphases > 0;
}

/* The phase in effect at `now`; the last one holds. */
static unsigned phase_at(uint64_t now)
{
    uint64_t elapsed = now > m.start_ms ? now - m.start_ms : 0, end = 0;
    for (unsigned i = 0; i + 1 < m.nphases; i++) {
        end += m.phases[i].ms;
        if (elapsed < end)
            return i;
    }
    return m.nphases - 1;
}

/* --- the device ---------------------------------------------------------------------------- */

static void fill_stats(void)
{
    uint64_t free = (uint64_t)free_pages() * PAGE_SIZE;
    struct stat_entry values[NSTATS] = {
        {VIRTIO_BALLOON_S_SWAP_IN, 0},
        {VIRTIO_BALLOON_S_SWAP_OUT, 0},
        {VIRTIO_BALLOON_S_MAJFLT, m.majflt},
        {VIRTIO_BALLOON_S_MINFLT, m.minflt},
        {VIRTIO_BALLOON_S_MEMFREE, free},
        {VIRTIO_BALLOON_S_MEMTOT, (uint64_t)(m.pool - m.balloon) * PAGE_SIZE},
        {VIRTIO_BALLOON_S_AVAIL, free},
        {VIRTIO_BALLOON_S_CACHES, 0},
    };
    memcpy(stats, values, sizeof(stats));
}

static void post_stats(void)
{
    fill_stats();
    m.statsq.desc[0] = (struct virtq_desc){.addr = (uint64_t)stats, .len = sizeof(stats), .flags = 0};
    virtq_publish(m.dev, &m.statsq, 0);
    m.stats_posted++;
}

/* The device returned the statistics buffer: it wants fresh numbers. Returns 1 if it did. */
static int serve_stats_request(void)
{
    struct virtq *q = &m.statsq;
    if (q->used->idx == q->used_seen)
        return 0;
    barrier();
    q->used_seen++;
    virtio_write(m.dev, VIRTIO_MMIO_INTERRUPT_ACK, virtio_read(m.dev, VIRTIO_MMIO_INTERRUPT_STATUS));
    post_stats();
    return 1;
}

/* Sends pages [first, first + count) on `q` (count <= PFNS_PER_REQUEST). */
static int send_pfns(struct virtq *q, uint32_t first, uint32_t count)
{
    for (uint32_t i = 0; i < count; i++)
        pfns[i] = (uint32_t)(page_addr(first + i) / PAGE_SIZE);
    struct virtq_buf chain[] = {{pfns, count * 4, 0}};
    uint32_t len;
    enum virtq_wait w = virtq_transfer(m.dev, q, chain, 1, &len);
    if (w != VIRTQ_USED) {
        m.error = q == &m.inflate ? "inflate request not served" : "deflate request not served";
        return 0;
    }
    return 1;
}

/* One step toward num_pages: deflates first (memory for the workload), inflates only with
 * free pages. Returns 1 if the balloon moved. */
static int follow_target(uint64_t now, int deflate_only)
{
    uint32_t target = virtio_config32(m.dev, CFG_NUM_PAGES);
    if (target > m.pool)
        target = m.pool;
    if (target != m.target) {
        m.target = target;
        if (target != m.announced_target) {
            m.announced_target = target;
            event(now, "balloon target_mib=%u actual_mib=%u", mib_of(target), mib_of(m.balloon));
        }
    }
    uint32_t n = 0;
    if (target < m.balloon) {
        n = m.balloon - target < PFNS_PER_REQUEST ? m.balloon - target : PFNS_PER_REQUEST;
        if (!send_pfns(&m.deflate, m.pool - m.balloon, n))
            return 0;
        m.balloon -= n;
    } else if (target > m.balloon && !deflate_only) {
        n = target - m.balloon;
        n = n < PFNS_PER_REQUEST ? n : PFNS_PER_REQUEST;
        n = n < free_pages() ? n : free_pages();
        if (!n)
            return 0;
        if (!send_pfns(&m.inflate, m.pool - m.balloon - n, n))
            return 0;
        m.balloon += n;
        if (m.dirty_top > m.pool - m.balloon)
            m.dirty_top = m.pool - m.balloon;
    }
    if (!n)
        return 0;
    virtio_write(m.dev, VIRTIO_MMIO_CONFIG + CFG_ACTUAL, m.balloon);
    if (m.balloon == target)
        event(now, "balloon target_mib=%u actual_mib=%u", mib_of(target), mib_of(m.balloon));
    return 1;
}

/* Reports the free 2 MiB blocks that hold host memory, once the delay since the first free
 * has passed. */
static void report_free_pages(uint64_t now)
{
    if (!m.reporting || !m.report_due_ms || now < m.report_due_ms)
        return;
    m.report_due_ms = 0;
    uint32_t first = (m.workload + BLOCK_PAGES - 1) / BLOCK_PAGES * BLOCK_PAGES;
    uint32_t end = m.dirty_top / BLOCK_PAGES * BLOCK_PAGES;
    if (end <= first)
        return;
    static struct virtq_buf chain[REPORT_BLOCKS_PER_REQUEST];
    uint32_t per_request = m.reportq.size < REPORT_BLOCKS_PER_REQUEST ? m.reportq.size : REPORT_BLOCKS_PER_REQUEST;
    for (uint32_t block = first; block < end;) {
        unsigned n = 0;
        for (; n < per_request && block < end; n++, block += BLOCK_PAGES)
            chain[n] = (struct virtq_buf){(void *)page_addr(block), BLOCK_PAGES * PAGE_SIZE, VIRTQ_DESC_F_WRITE};
        uint32_t len;
        if (virtq_transfer(m.dev, &m.reportq, chain, n, &len) != VIRTQ_USED) {
            m.error = "free page report not served";
            return;
        }
    }
    /* What lies above the last whole block stays unreported, as in Linux. */
    m.dirty_top = first;
    m.reported_pages += end - first;
    event(now, "report mib=%u", mib_of(end - first));
}

/* --- the workload -------------------------------------------------------------------------- */

static void check_page(uint32_t page)
{
    if (*(volatile uint64_t *)page_addr(page) != (PAGE_MARK ^ page))
        m.corrupt++;
}

/* Frees the workload's pages down to `keep`, checking each. */
static void release(uint64_t now, uint32_t keep)
{
    for (uint32_t page = keep; page < m.workload; page++)
        check_page(page);
    m.workload = keep;
    if (m.check_next >= keep)
        m.check_next = 0;
    if (!m.report_due_ms)
        m.report_due_ms = now + m.report_delay_ms;
}

static void end_wait(uint64_t now, const char *reason)
{
    uint64_t waited = now - m.wait_start_ms;
    m.waiting = 0;
    if (waited > m.max_wait_ms)
        m.max_wait_ms = waited;
    event(now, "wait-end waited_ms=%lu have_mib=%u reason=%s", waited, mib_of(m.workload), reason);
}

/* Moves the workload toward its demand. Returns 1 if it did work. */
static int run_workload(uint64_t now)
{
    unsigned phase = phase_at(now);
    if (phase != m.phase) {
        m.phase = phase;
        m.killed = 0;
        event(now, "phase index=%u demand_mib=%u", phase, mib_of(m.phases[phase].pages));
    }
    uint32_t want = m.killed ? 0 : m.phases[phase].pages;
    if (want > m.pool)
        want = m.pool;
    if (want < m.workload) {
        m.growing = 0;
        if (m.waiting)
            end_wait(now, "demand-fell");
        release(now, want);
        return 1;
    }
    if (want == m.workload) {
        if (m.waiting)
            end_wait(now, "satisfied");
        m.growing = 0;
        return 0;
    }
    uint32_t n = want - m.workload;
    if (!m.growing) {
        m.growing = 1;
        m.grow_start_ms = now;
    }
    n = n < TOUCH_PAGES_PER_TURN ? n : TOUCH_PAGES_PER_TURN;
    n = n < free_pages() ? n : free_pages();
    if (n == 0) {
        if (!m.waiting) {
            m.waiting = 1;
            m.waits++;
            m.wait_start_ms = m.last_progress_ms = now;
            event(now, "wait-start need_mib=%u have_mib=%u", mib_of(want), mib_of(m.workload));
        } else if (now - m.last_progress_ms >= m.oom_ms) {
            m.oom_kills++;
            if (now - m.wait_start_ms > m.max_wait_ms)
                m.max_wait_ms = now - m.wait_start_ms;
            event(now, "oom-kill waited_ms=%lu need_mib=%u have_mib=%u", now - m.wait_start_ms, mib_of(want),
                  mib_of(m.workload));
            m.waiting = 0;
            m.killed = 1;
            release(now, 0);
            return 1;
        }
        return 0;
    }
    for (uint32_t i = 0; i < n; i++) {
        uint32_t page = m.workload + i;
        *(volatile uint64_t *)page_addr(page) = PAGE_MARK ^ page;
    }
    m.workload += n;
    if (m.dirty_top < m.workload)
        m.dirty_top = m.workload;
    m.minflt += n;
    if (m.waiting) {
        m.majflt += n;
        m.last_progress_ms = now;
    }
    if (m.workload == want) {
        if (m.waiting)
            end_wait(now, "satisfied");
        event(now, "grown have_mib=%u took_ms=%lu", mib_of(m.workload), now - m.grow_start_ms);
    }
    return 1;
}

/* A few of the workload's pages per turn: they must still hold their marks. */
static void sweep(void)
{
    for (unsigned i = 0; i < CHECK_PAGES_PER_TURN && m.workload; i++) {
        if (m.check_next >= m.workload)
            m.check_next = 0;
        check_page(m.check_next++);
    }
}

static void status(uint64_t now)
{
    event(now,
          "status demand_mib=%u have_mib=%u balloon_mib=%u free_mib=%u dirty_mib=%u waits=%lu oom_kills=%lu "
          "majflt=%lu max_wait_ms=%lu corrupt=%lu reported_mib=%lu stats=%lu",
          m.killed ? 0 : mib_of(m.phases[m.phase].pages), mib_of(m.workload), mib_of(m.balloon),
          mib_of(free_pages()), mib_of(m.dirty_top - m.workload), m.waits, m.oom_kills, m.majflt, m.max_wait_ms,
          m.corrupt, (uint64_t)mib_of(m.reported_pages), m.stats_posted);
}

/* Ctrl-Alt-Del from the host (fabric-vmm's Shutdown) ends the scenario. */
static int shutdown_requested(void)
{
    static int extended;
    while (inb(I8042_STATUS) & I8042_OUTPUT_FULL) {
        uint8_t code = inb(I8042_DATA);
        if (extended && code == SCANCODE_DELETE)
            return 1;
        extended = code == SCANCODE_EXTENDED;
    }
    return 0;
}

static const char *clock_and_traps(void)
{
    const char *err = clock_init();
    if (err)
        return err;
    trap_init();
    return NULL;
}

int scenario_memload(struct result *r)
{
    const char *err = clock_and_traps();
    if (err)
        return fail(r, "clock: %s", err);
    m.dev = virtio_find(VIRTIO_ID_BALLOON, 0);
    if (!m.dev)
        return fail(r, "no virtio-balloon device (id %u) among the %u virtio-mmio devices on the command line",
                    VIRTIO_ID_BALLOON, virtio_device_count);
    uint64_t pool_end = boot_info.ram_end & ~((uint64_t)BLOCK_PAGES * PAGE_SIZE - 1);
    if (pool_end < POOL_START + ((uint64_t)32 << 20))
        return fail(r, "RAM ends at %lu MiB; the pool starts at %lu MiB and needs 32 MiB", boot_info.ram_end >> 20,
                    POOL_START >> 20);
    m.pool = (uint32_t)((pool_end - POOL_START) / PAGE_SIZE);
    if (!parse_phases(cmdline_value("memload.phases")))
        return fail(r, "memload.phases=MIB:SECONDS,... is missing or does not parse");
    m.oom_ms = cmdline_u64("memload.oom_ms", 10000);
    m.report_delay_ms = cmdline_u64("memload.report_delay_ms", 2000);

    /* Ring 3 from here: the loops run natively where ring 0 is emulated. */
    enter_user_mode();
    m.start_ms = cmdline_u64("memload.start", clock_unix_ms());
    /* memload.reporting=0: a guest without free page reporting (Linux without
     * CONFIG_PAGE_REPORTING), whose freed memory stays with the host. */
    /* MUST_TELL_HOST: this driver never touches a page before the device has acknowledged its
     * deflate request, which lets the device hold pages back to keep its huge pages whole. */
    uint64_t wanted = VIRTIO_BALLOON_F_STATS_VQ | VIRTIO_BALLOON_F_MUST_TELL_HOST;
    if (cmdline_u64("memload.reporting", 1))
        wanted |= VIRTIO_BALLOON_F_REPORTING;
    err = virtio_start(m.dev, wanted);
    if (!err && !(m.dev->features & VIRTIO_BALLOON_F_STATS_VQ))
        err = "device does not offer VIRTIO_BALLOON_F_STATS_VQ";
    m.reporting = !!(m.dev->features & VIRTIO_BALLOON_F_REPORTING);
    if (!err)
        err = virtq_setup(m.dev, &m.inflate, 0, 0);
    if (!err)
        err = virtq_setup(m.dev, &m.deflate, 1, 1);
    if (!err)
        err = virtq_setup(m.dev, &m.statsq, 2, 2);
    if (!err && m.reporting)
        err = virtq_setup_size(m.dev, &m.reportq, 3, 3, REPORT_BLOCKS_PER_REQUEST);
    if (err)
        return fail(r, "init: %s", err);
    post_stats(); /* as Linux: before DRIVER_OK */
    virtio_driver_ok(m.dev);

    uint64_t now = clock_unix_ms();
    event(now, "ready pool_mib=%u reporting=%d tsc_khz=%lu start=%lu phases=%u", mib_of(m.pool), m.reporting,
          clock_tsc_khz(), m.start_ms, m.nphases);
    m.phase = (unsigned)-1;
    uint64_t next_status = now, next_keyboard = now;
    uint64_t idle_ticks = clock_tsc_khz() * IDLE_US / 1000;
    for (;;) {
        now = clock_unix_ms();
        int busy = serve_stats_request();
        /* Deflating comes first: the memory it frees is what a waiting workload needs. */
        busy |= follow_target(now, 1);
        busy |= run_workload(now);
        if (!m.waiting)
            busy |= follow_target(now, 0);
        sweep();
        report_free_pages(now);
        if (m.error)
            break;
        if (now >= next_status) {
            status(now);
            next_status = now + STATUS_MS;
        }
        if (now >= next_keyboard) {
            if (shutdown_requested())
                break;
            next_keyboard = now + KEYBOARD_POLL_MS;
        }
        if (!busy)
            idle_until(rdtsc() + idle_ticks);
    }
    status(clock_unix_ms());
    if (m.error)
        return fail(r, "%s", m.error);
    if (m.corrupt)
        return fail(r, "%lu checks found a workload page without its mark (its memory was lost)", m.corrupt);
    return pass(r, "waits=%lu oom_kills=%lu majflt=%lu max_wait_ms=%lu reported_mib=%lu", m.waits, m.oom_kills,
                m.majflt, m.max_wait_ms, (uint64_t)mib_of(m.reported_pages));
}

/* --- clock --------------------------------------------------------------------------------- */

/* kvmclock runs and agrees with the TSC, and idle_until sleeps in ring 3 for as long as asked:
 * fabric.mib=N (default 10) sleeps of 100 ms. The host compares the CPU time the guest used
 * with the wall time. */
int scenario_clock(struct result *r)
{
    const char *err = clock_and_traps();
    if (err)
        return fail(r, "%s", err);
    enter_user_mode();
    uint64_t sleeps = bench_mib ? bench_mib : 10;
    uint64_t khz = clock_tsc_khz();
    uint64_t unix0 = clock_unix_ms(), ns0 = clock_ns(), tsc0 = rdtsc();
    note("tsc_khz=%lu unix_ms=%lu", khz, unix0);
    for (uint64_t i = 0; i < sleeps; i++)
        idle_until(rdtsc() + khz * 100);
    uint64_t ns = clock_ns() - ns0, ticks = rdtsc() - tsc0;
    uint64_t want_ns = sleeps * 100000000ull, tsc_ns = ticks * 1000000 / khz;
    note("slept %lu x 100 ms: kvmclock %lu us, TSC %lu us", sleeps, ns / 1000, tsc_ns / 1000);
    if (ns < want_ns || ns > want_ns + want_ns / 2)
        return fail(r, "%lu sleeps of 100 ms took %lu us by kvmclock", sleeps, ns / 1000);
    uint64_t diff = ns > tsc_ns ? ns - tsc_ns : tsc_ns - ns;
    if (diff > ns / 100)
        return fail(r, "kvmclock (%lu us) and the TSC at %lu kHz (%lu us) disagree", ns / 1000, khz, tsc_ns / 1000);
    return pass(r, "kvmclock at unix %lu ms, TSC %lu kHz; %lu sleeps of 100 ms in ring 3 took %lu us", unix0, khz,
                sleeps, ns / 1000);
}
