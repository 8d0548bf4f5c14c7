/* virtio-balloon (device id 5): inflate and deflate queues of le32 page frame numbers, a
 * statistics queue of (le16 tag, le64 value) entries (virtio 1.1 section 5.5).
 *
 * The `balloon` scenario is driven by the host (agent/vmm/tests/balloon.rs): it touches
 * TOUCH_BYTES of RAM so the host commits it, posts statistics with known values, then polls
 * num_pages in the config space. It inflates (and deflates) to follow the target, writes
 * `actual`, and answers each statistics request with fresh numbers. When the host sets the
 * target back to 0 after an inflation, it deflates, checks that the pages it gave away read
 * back as zeros (the host discarded them) and finishes. */
#include "scenario.h"
#include "virtio.h"

#define VIRTIO_BALLOON_F_STATS_VQ (1ull << 1)
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

/* The known values the host checks (agent/vmm/tests/balloon.rs). MINFLT grows by one with each
 * refresh, so the host sees that a request brought fresh numbers. */
#define STAT_SWAP_IN (11ull * 4096)
#define STAT_SWAP_OUT (22ull * 4096)
#define STAT_MAJFLT 33ull
#define STAT_MINFLT_BASE 4400ull
#define STAT_CACHES (5ull << 20)

/* The memory given to the balloon: 128 MiB from 64 MiB up (clear of the image at 2 MiB), so
 * the VM needs at least 192 MiB. */
#define TOUCH_START ((uint64_t)64 << 20)
#define TOUCH_BYTES ((uint64_t)128 << 20)
#define TOUCH_PAGES ((uint32_t)(TOUCH_BYTES / PAGE_SIZE))
#define PFNS_PER_REQUEST 256
/* How long the host gets to drive the scenario: 24 default waits, 4 minutes at 3 GHz. */
#define HOST_WAITS 24
#define DEFAULT_TSC_WAIT 30000000000ull
/* Between two looks at the config space (each a VM exit): about 1 ms. */
#define POLL_DELAY_TSC 3000000ull

struct stat_entry {
    uint16_t tag;
    uint64_t val;
} __attribute__((packed));

#define NSTATS 8
static struct stat_entry stats[NSTATS] ALIGNED(64);
static uint32_t pfns[PFNS_PER_REQUEST] ALIGNED(64);

struct balloon {
    struct virtio_dev *dev;
    struct virtq inflate, deflate, statsq;
    uint32_t size; /* pages in the balloon */
    unsigned refreshes;
};

static uint64_t page_addr(uint32_t page) { return TOUCH_START + (uint64_t)page * PAGE_SIZE; }
static uint64_t page_mark(uint32_t page) { return 0xba1100000000ull | page; }

static void fill_stats(struct balloon *b)
{
    uint64_t total = boot_info.ram_bytes;
    uint64_t used = (uint64_t)(TOUCH_PAGES - b->size) * PAGE_SIZE;
    uint64_t free = total > used ? total - used : 0;
    struct stat_entry values[NSTATS] = {
        {VIRTIO_BALLOON_S_SWAP_IN, STAT_SWAP_IN},
        {VIRTIO_BALLOON_S_SWAP_OUT, STAT_SWAP_OUT},
        {VIRTIO_BALLOON_S_MAJFLT, STAT_MAJFLT},
        {VIRTIO_BALLOON_S_MINFLT, STAT_MINFLT_BASE + b->refreshes},
        {VIRTIO_BALLOON_S_MEMFREE, free},
        {VIRTIO_BALLOON_S_MEMTOT, total},
        {VIRTIO_BALLOON_S_AVAIL, free},
        {VIRTIO_BALLOON_S_CACHES, STAT_CACHES},
    };
    memcpy(stats, values, sizeof(stats));
}

/* Puts the statistics buffer (descriptor 0 of the statistics queue) on the queue. */
static void post_stats(struct balloon *b)
{
    fill_stats(b);
    b->statsq.desc[0] = (struct virtq_desc){.addr = (uint64_t)stats, .len = sizeof(stats), .flags = 0};
    virtq_publish(b->dev, &b->statsq, 0);
}

/* The device returned the statistics buffer: it wants fresh numbers. */
static void serve_stats_request(struct balloon *b)
{
    struct virtq *q = &b->statsq;
    if (q->used->idx == q->used_seen)
        return;
    barrier();
    q->used_seen++;
    virtio_write(b->dev, VIRTIO_MMIO_INTERRUPT_ACK, virtio_read(b->dev, VIRTIO_MMIO_INTERRUPT_STATUS));
    b->refreshes++;
    post_stats(b);
}

/* Sends pages [first, first + count) on `q`, PFNS_PER_REQUEST at a time. */
static const char *send_pages(struct balloon *b, struct virtq *q, uint32_t first, uint32_t count)
{
    static char reason[128];
    while (count) {
        uint32_t n = count < PFNS_PER_REQUEST ? count : PFNS_PER_REQUEST;
        for (uint32_t i = 0; i < n; i++)
            pfns[i] = (uint32_t)(page_addr(first + i) / PAGE_SIZE);
        struct virtq_buf chain[] = {{pfns, n * 4, 0}};
        uint32_t len;
        enum virtq_wait w = virtq_transfer(b->dev, q, chain, 1, &len);
        if (w != VIRTQ_USED) {
            snprintf(reason, sizeof(reason), "%s of %u PFNs: %s", q == &b->inflate ? "inflate" : "deflate", n,
                     virtq_wait_name(w));
            return reason;
        }
        /* A request may come back while statistics wait: keep answering them. */
        serve_stats_request(b);
        first += n;
        count -= n;
    }
    return NULL;
}

static void delay(uint64_t tsc)
{
    uint64_t end = rdtsc() + tsc;
    while (rdtsc() < end)
        ;
}

int scenario_balloon(struct result *r)
{
    static struct balloon b;
    b.dev = virtio_find(VIRTIO_ID_BALLOON, 0);
    if (!b.dev)
        return fail(r, "no virtio-balloon device (id %u) among the %u virtio-mmio devices on the command line",
                    VIRTIO_ID_BALLOON, virtio_device_count);
    if (boot_info.ram_end < TOUCH_START + TOUCH_BYTES)
        return fail(r, "RAM ends at %lu MiB; the scenario gives away %lu..%lu MiB (run with --memory 256)",
                    boot_info.ram_end >> 20, TOUCH_START >> 20, (TOUCH_START + TOUCH_BYTES) >> 20);
    const char *err = virtio_start(b.dev, VIRTIO_BALLOON_F_STATS_VQ);
    if (!err && !(b.dev->features & VIRTIO_BALLOON_F_STATS_VQ))
        err = "device does not offer VIRTIO_BALLOON_F_STATS_VQ";
    if (!err)
        err = virtq_setup(b.dev, &b.inflate, 0, 0);
    if (!err)
        err = virtq_setup(b.dev, &b.deflate, 1, 1);
    if (!err)
        err = virtq_setup(b.dev, &b.statsq, 2, 2);
    if (err)
        return fail(r, "init: %s", err);
    /* As Linux does: the first statistics go out before DRIVER_OK. */
    post_stats(&b);
    virtio_driver_ok(b.dev);
    if (virtio_config32(b.dev, CFG_ACTUAL) != 0)
        return fail(r, "actual is %u before the driver wrote it", virtio_config32(b.dev, CFG_ACTUAL));

    for (uint32_t page = 0; page < TOUCH_PAGES; page++)
        *(volatile uint64_t *)page_addr(page) = page_mark(page);
    note("touched %lu MiB at 0x%lx; waiting for the host's target", TOUCH_BYTES >> 20, TOUCH_START);

    uint32_t peak = 0, waits = 0;
    uint64_t deadline = rdtsc() + DEFAULT_TSC_WAIT;
    for (;;) {
        serve_stats_request(&b);
        uint32_t target = virtio_config32(b.dev, CFG_NUM_PAGES);
        uint32_t want = target < TOUCH_PAGES ? target : TOUCH_PAGES;
        if (want != b.size) {
            if (want > b.size)
                err = send_pages(&b, &b.inflate, b.size, want - b.size);
            else
                err = send_pages(&b, &b.deflate, want, b.size - want);
            if (err)
                return fail(r, "%s", err);
            note("%s to %u pages (%u MiB), host target %u pages", want > b.size ? "inflated" : "deflated", want,
                 want >> 8, target);
            b.size = want;
            peak = want > peak ? want : peak;
            virtio_write(b.dev, VIRTIO_MMIO_CONFIG + CFG_ACTUAL, b.size);
            if (b.size == 0)
                break;
        }
        if (rdtsc() > deadline) {
            if (++waits == HOST_WAITS)
                return fail(r, "timed out waiting for the host: num_pages %u, balloon %u pages, peak %u", target,
                            b.size, peak);
            deadline = rdtsc() + DEFAULT_TSC_WAIT;
        }
        delay(POLL_DELAY_TSC);
    }

    /* Pages that were in the balloon were discarded by the host: they read as zeros now.
     * The others keep their marks. */
    uint32_t zero = 0, kept = 0;
    for (uint32_t page = 0; page < TOUCH_PAGES; page++) {
        uint64_t v = *(volatile uint64_t *)page_addr(page);
        if (page < peak)
            zero += v == 0;
        else
            kept += v == page_mark(page);
    }
    if (zero != peak)
        return fail(r, "only %u of the %u pages given to the balloon read back as zeros", zero, peak);
    if (kept != TOUCH_PAGES - peak)
        return fail(r, "%u of the %u pages never given to the balloon lost their contents",
                    TOUCH_PAGES - peak - kept, TOUCH_PAGES - peak);
    return pass(r, "inflated %u pages (%u MiB) and deflated them; all %u read back as zeros; statistics refreshed %u times",
                peak, peak >> 8, zero, b.refreshes);
}
