/* The test guest: reads the scenario name and the virtio-mmio devices from the kernel command
 * line, runs the scenario, prints its verdict on COM1 and resets the machine. The command line
 * and the memory map come from the zero page (fabric-vmm) or, after a PVH entry (QEMU), from
 * struct hvm_start_info.
 *
 * Console protocol (what agent/vmm/tests/testguest.rs looks for):
 *   testguest: start NAME
 *   testguest: NAME: ...            (sub-results, zero or more)
 *   testguest: NAME: PASS ...   or  testguest: NAME: FAIL reason
 */
#include "scenario.h"
#include "virtio.h"

/* struct boot_params offsets (Linux Documentation/arch/x86/zero-page.rst). */
#define ZP_EXT_CMD_LINE_PTR 0x0c8
#define ZP_E820_ENTRIES 0x1e8
#define ZP_CMD_LINE_PTR 0x228
#define ZP_E820_TABLE 0x2d0
#define E820_ENTRY_SIZE 20
#define E820_MAX_ENTRIES 128
#define E820_RAM 1

/* struct hvm_start_info (xen/include/public/arch-x86/hvm/start_info.h). */
#define HVM_START_MAGIC 0x336ec578
#define SI_MAGIC 0
#define SI_VERSION 4
#define SI_CMDLINE_PADDR 24
#define SI_MEMMAP_PADDR 40
#define SI_MEMMAP_ENTRIES 48
#define SI_MEMMAP_ENTRY_SIZE 24 /* addr, size (le64), type, reserved (le32) */

struct boot_info boot_info;
uint64_t bench_mib;
static const char *scenario_name = "hello";
static char name_buf[64];
static const char *command_line = "";

static int hello(struct result *r)
{
    return pass(r, "e820 entries=%u ram=%lu KiB (%lu MiB) virtio devices=%u", boot_info.e820_entries,
                boot_info.ram_bytes >> 10, boot_info.ram_bytes >> 20, virtio_device_count);
}

static const struct {
    const char *name;
    scenario_fn run;
} scenarios[] = {
    {"hello", hello},
    {"rng", scenario_rng},
    {"blk-write", scenario_blk_write},
    {"blk-ro", scenario_blk_ro},
    {"blk-id", scenario_blk_id},
    {"hostile-blk", scenario_hostile_blk},
    {"config-flood", scenario_config_flood},
    {"net", scenario_net},
    {"balloon", scenario_balloon},
    {"clock", scenario_clock},
    {"memload", scenario_memload},
    {"blk-bench-write", scenario_blk_bench_write},
    {"blk-bench-read", scenario_blk_bench_read},
    {"net-bench-tx", scenario_net_bench_tx},
    {"net-bench-rx", scenario_net_bench_rx},
};

static int result_printf(struct result *r, const char *fmt, va_list ap)
{
    vsnprintf(r->msg, sizeof(r->msg), fmt, ap);
    return 0;
}

int pass(struct result *r, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    result_printf(r, fmt, ap);
    va_end(ap);
    return 1;
}

int fail(struct result *r, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    result_printf(r, fmt, ap);
    va_end(ap);
    return 0;
}

void note(const char *fmt, ...)
{
    char line[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof(line), fmt, ap);
    va_end(ap);
    printf("testguest: %s: %s\n", scenario_name, line);
}

static uint32_t zp32(const uint8_t *zp, unsigned off) { return *(const uint32_t *)(zp + off); }
static uint64_t zp64(const uint8_t *zp, unsigned off) { return *(const uint64_t *)(zp + off); }

/* Adds `n` memory map entries of `entry_size` bytes each: addr (le64), size (le64), type (le32). */
static void read_memmap(const uint8_t *table, unsigned n, unsigned entry_size)
{
    boot_info.e820_entries = n;
    for (unsigned i = 0; i < n && i < E820_MAX_ENTRIES; i++) {
        const uint8_t *e = table + i * entry_size;
        uint64_t addr = zp64(e, 0), size = zp64(e, 8);
        if (zp32(e, 16) != E820_RAM)
            continue;
        boot_info.ram_bytes += size;
        if (addr + size > boot_info.ram_end)
            boot_info.ram_end = addr + size;
    }
}

const char *cmdline_value(const char *key)
{
    size_t key_len = strlen(key);
    for (const char *p = command_line; *p;) {
        while (*p == ' ')
            p++;
        const char *word = p;
        while (*p && *p != ' ')
            p++;
        if ((size_t)(p - word) > key_len && word[key_len] == '=' && !strncmp(word, key, key_len))
            return word + key_len + 1;
    }
    return NULL;
}

uint64_t cmdline_u64(const char *key, uint64_t fallback)
{
    const char *v = cmdline_value(key);
    return v && *v >= '0' && *v <= '9' ? parse_u64(&v) : fallback;
}

/* Picks out fabric.test=NAME and every virtio_mmio.device=SPEC. */
static void read_cmdline(const char *p)
{
    command_line = p;
    static const char test_key[] = "fabric.test=", dev_key[] = "virtio_mmio.device=", mib_key[] = "fabric.mib=";
    while (*p) {
        while (*p == ' ')
            p++;
        const char *word = p;
        while (*p && *p != ' ')
            p++;
        size_t len = (size_t)(p - word);
        if (len > sizeof(test_key) - 1 && !strncmp(word, test_key, sizeof(test_key) - 1)) {
            size_t n = len - (sizeof(test_key) - 1);
            n = n < sizeof(name_buf) - 1 ? n : sizeof(name_buf) - 1;
            memcpy(name_buf, word + sizeof(test_key) - 1, n);
            name_buf[n] = '\0';
            scenario_name = name_buf;
        } else if (len > sizeof(mib_key) - 1 && !strncmp(word, mib_key, sizeof(mib_key) - 1)) {
            const char *v = word + sizeof(mib_key) - 1;
            bench_mib = parse_u64(&v);
        } else if (len > sizeof(dev_key) - 1 && !strncmp(word, dev_key, sizeof(dev_key) - 1)) {
            if (!virtio_add_from_cmdline(word + sizeof(dev_key) - 1))
                printf("testguest: ignoring an unparsable or surplus virtio_mmio.device= entry\n");
        }
    }
}

/* Entered with the zero page (fabric-vmm, 64-bit entry) or with hvm_start_info (PVH entry). */
void guest_main(const uint8_t *zero_page, const uint8_t *start_info)
{
    paging_init();
    if (start_info) {
        if (zp32(start_info, SI_MAGIC) != HVM_START_MAGIC)
            printf("testguest: PVH start_info at %p has magic 0x%x, not 0x%x\n", start_info,
                   zp32(start_info, SI_MAGIC), HVM_START_MAGIC);
        const char *cmdline = (const char *)zp64(start_info, SI_CMDLINE_PADDR);
        /* Printed because the VMM may add to it (QEMU microvm appends virtio_mmio.device=). */
        printf("testguest: PVH boot, command line \"%s\"\n", cmdline ? cmdline : "");
        if (cmdline)
            read_cmdline(cmdline);
        if (zp32(start_info, SI_VERSION) >= 1)
            read_memmap((const uint8_t *)zp64(start_info, SI_MEMMAP_PADDR), zp32(start_info, SI_MEMMAP_ENTRIES),
                        SI_MEMMAP_ENTRY_SIZE);
    } else {
        uint64_t cmdline = zp32(zero_page, ZP_CMD_LINE_PTR) | (uint64_t)zp32(zero_page, ZP_EXT_CMD_LINE_PTR) << 32;
        if (cmdline)
            read_cmdline((const char *)cmdline);
        read_memmap(zero_page + ZP_E820_TABLE, zero_page[ZP_E820_ENTRIES], E820_ENTRY_SIZE);
    }

    printf("testguest: start %s\n", scenario_name);
    virtio_probe_all();
    struct result r = {{0}};
    int ok = -1;
    for (unsigned i = 0; i < ARRAY_SIZE(scenarios); i++)
        if (!strncmp(scenarios[i].name, scenario_name, sizeof(name_buf)))
            ok = scenarios[i].run(&r);
    if (ok < 0) {
        char known[256];
        size_t n = 0;
        for (unsigned i = 0; i < ARRAY_SIZE(scenarios); i++)
            n += snprintf(known + n, n < sizeof(known) ? sizeof(known) - n : 0, " %s", scenarios[i].name);
        fail(&r, "unknown scenario (known:%s)", known);
        ok = 0;
    }
    printf("testguest: %s: %s %s\n", scenario_name, ok ? "PASS" : "FAIL", r.msg);
    machine_exit();
}
