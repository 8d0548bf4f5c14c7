/* Throughput scenarios, the guest side of bench/devices (bench/src/bin/devices-bench.rs).
 *
 * Each runs in user mode (enter_user_mode: on hosts where KVM is software-nested, kernel-mode
 * guest code is emulated instruction by instruction, user-mode code runs natively) and keeps
 * its queue full the way a poll-mode driver does: many chains in flight, the used
 * ring polled in memory (no register read per request), freed chains resubmitted in batches
 * with one notification per batch, and none at all while the device says VIRTQ_USED_F_NO_NOTIFY.
 * Interrupts are turned off at the source (VIRTQ_AVAIL_F_NO_INTERRUPT): nothing takes them.
 *
 * The timed part lies between two console lines, which the host timestamps:
 *   testguest: bench start
 *   testguest: bench end bytes=N
 * The guest cannot convert TSC ticks into seconds reliably (no calibration source is common to
 * both VMMs), so the ticks are only reported in the verdict, for comparison within one host.
 *
 *   blk-bench-write  sequential writes over the whole disk (or fabric.mib=N MiB), then a flush
 *   blk-bench-read   sequential reads over the whole disk (or fabric.mib=N MiB)
 *   net-bench-tx     fabric.mib=N MiB (default 256) of 1514-byte frames out
 *   net-bench-rx     counts the host's frames (EtherType 0x88b5) until fabric.mib=N MiB came in;
 *                    says `testguest: bench ready` once its buffers are posted, and starts the
 *                    clock at the first frame */
#include "scenario.h"
#include "virtio.h"

#define VIRTIO_BLK_F_RO (1ull << 5)
#define VIRTIO_BLK_F_FLUSH (1ull << 9)
#define VIRTIO_BLK_T_IN 0
#define VIRTIO_BLK_T_OUT 1
#define VIRTIO_BLK_T_FLUSH 4
#define VIRTIO_BLK_S_OK 0
#define SECTOR_SIZE 512

#define VIRTIO_NET_F_MAC (1ull << 5)
#define VIRTIO_NET_F_STATUS (1ull << 16)
#define NET_HDR_LEN 12
#define ETH_HLEN 14
#define ETH_FRAME_LEN 1514
#define ETHERTYPE_BENCH 0x88b5

/* Requests of 128 KiB, 32 in flight (3 descriptors each, 96 of a 256-entry queue): 4 MiB of
 * buffers, which is what Linux keeps in flight for a sequential dd with direct I/O and a
 * queue depth of 32. */
#define BLK_REQ_BYTES (128u << 10)
#define BLK_INFLIGHT 32
#define NET_DEFAULT_MIB 256
/* No used entry for this long means the device stopped: about 10 s at 3 GHz. */
#define STALL_TSC 30000000000ull
/* How long net-bench-rx waits for the host's first frame: about 60 s at 3 GHz. */
#define FIRST_FRAME_TSC 180000000000ull

struct blk_req_header {
    uint32_t type;
    uint32_t reserved;
    uint64_t sector;
};

static struct blk_req_header headers[BLK_INFLIGHT] ALIGNED(64);
static volatile uint8_t statuses[BLK_INFLIGHT] ALIGNED(64);
static uint32_t lengths[BLK_INFLIGHT];
/* The data buffers live in RAM above the image, not in .bss: clearing megabytes of .bss in
 * kernel mode would take seconds where that is emulated. */
#define BENCH_AREA ((uint64_t)16 << 20)
#define BENCH_AREA_BYTES ((uint64_t)BLK_INFLIGHT * BLK_REQ_BYTES)
#define blk_buffer(slot) ((uint8_t *)(BENCH_AREA + (uint64_t)(slot) * BLK_REQ_BYTES))

#define NET_BUF_LEN (NET_HDR_LEN + ETH_FRAME_LEN)
static uint8_t tx_frame[NET_BUF_LEN] ALIGNED(64);
#define RX_BUF_STRIDE ((NET_BUF_LEN + 63) & ~63)
#define rx_buffer(i) ((uint8_t *)(BENCH_AREA + (uint64_t)(i) * RX_BUF_STRIDE))

/* Checks that the bench area is RAM, then leaves kernel mode for good. */
static const char *bench_enter(void)
{
    if (boot_info.ram_end < BENCH_AREA + BENCH_AREA_BYTES)
        return "needs at least 20 MiB of RAM (buffers at 16 MiB)";
    enter_user_mode();
    return NULL;
}

static void bench_start(uint64_t *t0)
{
    printf("testguest: bench start\n");
    *t0 = rdtsc();
}

/* A device that stopped answering: say whether it asked for a reset. */
static int stalled(struct result *r, struct virtio_dev *d, const char *what, uint64_t done)
{
    uint32_t status = virtio_status(d);
    return fail(r, "%s: no used entry for %llu TSC ticks after %lu bytes (device status 0x%x%s)", what,
                STALL_TSC, done, status, status & VIRTIO_STATUS_NEEDS_RESET ? ", NEEDS_RESET" : "");
}

/* --- virtio-blk --------------------------------------------------------------------------- */

struct blk_bench {
    struct virtio_dev *dev;
    struct virtq q;
    uint64_t capacity; /* sectors */
};

static const char *blk_bench_open(struct blk_bench *b)
{
    b->dev = virtio_find(VIRTIO_ID_BLOCK, 0);
    if (!b->dev)
        return "no virtio-blk device among the virtio-mmio devices on the command line";
    const char *err = virtio_start(b->dev, VIRTIO_BLK_F_RO | VIRTIO_BLK_F_FLUSH);
    if (!err)
        err = virtq_setup_size(b->dev, &b->q, 0, 0, VIRTQ_MAX_SIZE);
    if (err)
        return err;
    if (b->q.size < 3)
        return "queue too small for one request";
    b->q.avail->flags = VIRTQ_AVAIL_F_NO_INTERRUPT;
    b->capacity = virtio_config64(b->dev, 0);
    virtio_driver_ok(b->dev);
    return NULL;
}

/* Request `slot` uses descriptors 3*slot (header), +1 (data), +2 (status). */
static void blk_submit(struct blk_bench *b, unsigned slot, uint32_t type, uint64_t sector, uint32_t len)
{
    volatile struct virtq_desc *d = &b->q.desc[3 * slot];
    headers[slot] = (struct blk_req_header){.type = type, .sector = sector};
    statuses[slot] = 0xff;
    lengths[slot] = len;
    uint16_t first = (uint16_t)(3 * slot);
    d[0] = (struct virtq_desc){(uint64_t)&headers[slot], sizeof(headers[slot]), VIRTQ_DESC_F_NEXT, first + 1};
    if (len) {
        uint16_t dir = type == VIRTIO_BLK_T_IN ? VIRTQ_DESC_F_WRITE : 0;
        d[1] = (struct virtq_desc){(uint64_t)blk_buffer(slot), len, dir | VIRTQ_DESC_F_NEXT, first + 2};
        d[2] = (struct virtq_desc){(uint64_t)&statuses[slot], 1, VIRTQ_DESC_F_WRITE, 0};
    } else {
        d[0].next = first + 2;
        d[2] = (struct virtq_desc){(uint64_t)&statuses[slot], 1, VIRTQ_DESC_F_WRITE, 0};
    }
    virtq_add_avail(&b->q, first);
}

static int blk_bench(struct result *r, uint32_t type)
{
    struct blk_bench b;
    const char *err = bench_enter();
    if (err)
        return fail(r, "%s", err);
    err = blk_bench_open(&b);
    if (err)
        return fail(r, "init: %s", err);
    int writing = type == VIRTIO_BLK_T_OUT;
    if (writing && (b.dev->features & VIRTIO_BLK_F_RO))
        return fail(r, "the disk is read-only");
    if (writing && !(b.dev->features & VIRTIO_BLK_F_FLUSH))
        return fail(r, "no VIRTIO_BLK_F_FLUSH: the written data could not be flushed");
    uint64_t sectors = b.capacity;
    if (bench_mib && bench_mib << 11 < sectors)
        sectors = bench_mib << 11;
    if (!sectors)
        return fail(r, "empty disk");
    unsigned inflight = b.q.size / 3 < BLK_INFLIGHT ? b.q.size / 3 : BLK_INFLIGHT;
    const uint64_t per_req = BLK_REQ_BYTES / SECTOR_SIZE;
    if (writing) /* something other than zeros, once, outside the timed part */
        for (unsigned s = 0; s < inflight; s++)
            for (unsigned i = 0; i < BLK_REQ_BYTES; i += 8)
                *(uint64_t *)(blk_buffer(s) + i) = (uint64_t)s << 56 | i;

    uint64_t t0, next = 0, bytes = 0, requests = 0;
    unsigned outstanding = 0;
    bench_start(&t0);
    for (unsigned s = 0; s < inflight && next < sectors; s++) {
        uint64_t n = sectors - next < per_req ? sectors - next : per_req;
        blk_submit(&b, s, type, next, (uint32_t)(n * SECTOR_SIZE));
        next += n;
        outstanding++;
    }
    virtq_kick(b.dev, &b.q);
    uint64_t last = rdtsc();
    for (unsigned spins = 0; outstanding;) {
        uint32_t id, len;
        int got = 0;
        while (virtq_poll_used(&b.q, &id, &len)) {
            unsigned slot = id / 3;
            if (id % 3 || slot >= inflight)
                return fail(r, "used entry for descriptor %u, which heads no request", id);
            if (statuses[slot] != VIRTIO_BLK_S_OK)
                return fail(r, "request at sector %lu: status %u", headers[slot].sector, statuses[slot]);
            bytes += lengths[slot];
            requests++;
            outstanding--;
            got = 1;
            if (next < sectors) {
                uint64_t n = sectors - next < per_req ? sectors - next : per_req;
                blk_submit(&b, slot, type, next, (uint32_t)(n * SECTOR_SIZE));
                next += n;
                outstanding++;
            }
        }
        if (got) {
            virtq_kick(b.dev, &b.q);
            last = rdtsc();
        } else if (++spins % 1024 == 0 && rdtsc() - last > STALL_TSC) {
            return stalled(r, b.dev, writing ? "write" : "read", bytes);
        }
    }
    if (writing) {
        /* What was written is on the disk, not in a cache of the VMM's host, when the clock stops. */
        blk_submit(&b, 0, VIRTIO_BLK_T_FLUSH, 0, 0);
        virtq_kick(b.dev, &b.q);
        uint32_t id, len;
        last = rdtsc();
        while (!virtq_poll_used(&b.q, &id, &len))
            if (rdtsc() - last > STALL_TSC)
                return stalled(r, b.dev, "flush", bytes);
        if (statuses[0] != VIRTIO_BLK_S_OK)
            return fail(r, "flush: status %u", statuses[0]);
    }
    uint64_t ticks = rdtsc() - t0;
    printf("testguest: bench end bytes=%lu\n", bytes);
    return pass(r, "%s %lu bytes in %lu requests of up to %u KiB, %u in flight%s, %lu TSC ticks",
                writing ? "wrote" : "read", bytes, requests, BLK_REQ_BYTES >> 10, inflight,
                writing ? ", flushed" : "", ticks);
}

int scenario_blk_bench_write(struct result *r) { return blk_bench(r, VIRTIO_BLK_T_OUT); }
int scenario_blk_bench_read(struct result *r) { return blk_bench(r, VIRTIO_BLK_T_IN); }

/* --- virtio-net --------------------------------------------------------------------------- */

struct net_bench {
    struct virtio_dev *dev;
    struct virtq rxq, txq;
    uint8_t mac[6];
};

static const char *net_bench_open(struct net_bench *n)
{
    n->dev = virtio_find(VIRTIO_ID_NET, 0);
    if (!n->dev)
        return "no virtio-net device among the virtio-mmio devices on the command line";
    const char *err = virtio_start(n->dev, VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS);
    if (!err)
        err = virtq_setup_size(n->dev, &n->rxq, 0, 0, VIRTQ_MAX_SIZE);
    if (!err)
        err = virtq_setup_size(n->dev, &n->txq, 1, 1, VIRTQ_MAX_SIZE);
    if (err)
        return err;
    for (unsigned i = 0; i < 6; i++)
        n->mac[i] = mmio_read8(n->dev->base + VIRTIO_MMIO_CONFIG + i);
    n->rxq.avail->flags = VIRTQ_AVAIL_F_NO_INTERRUPT;
    n->txq.avail->flags = VIRTQ_AVAIL_F_NO_INTERRUPT;
    virtio_driver_ok(n->dev);
    return NULL;
}

static uint64_t net_bench_bytes(void) { return (bench_mib ? bench_mib : NET_DEFAULT_MIB) << 20; }

int scenario_net_bench_tx(struct result *r)
{
    struct net_bench n;
    const char *err = bench_enter();
    if (!err)
        err = net_bench_open(&n);
    if (err)
        return fail(r, "init: %s", err);
    /* One frame, sent again and again: to a MAC nobody has (the tap drops it at once), from ours. */
    memset(tx_frame, 0, NET_HDR_LEN);
    uint8_t *eth = tx_frame + NET_HDR_LEN;
    static const uint8_t nobody[6] = {0x02, 0xfb, 0xbe, 0x0c, 0x00, 0x01};
    memcpy(eth, nobody, 6);
    memcpy(eth + 6, n.mac, 6);
    eth[12] = ETHERTYPE_BENCH >> 8;
    eth[13] = ETHERTYPE_BENCH & 0xff;
    for (unsigned i = ETH_HLEN; i < ETH_FRAME_LEN; i++)
        eth[i] = (uint8_t)i;
    uint64_t frames = (net_bench_bytes() + ETH_FRAME_LEN - 1) / ETH_FRAME_LEN;
    for (unsigned i = 0; i < n.txq.size; i++)
        n.txq.desc[i] = (struct virtq_desc){(uint64_t)tx_frame, NET_BUF_LEN, 0, 0};

    uint64_t t0, queued = 0, sent = 0;
    bench_start(&t0);
    for (unsigned i = 0; i < n.txq.size && queued < frames; i++, queued++)
        virtq_add_avail(&n.txq, (uint16_t)i);
    virtq_kick(n.dev, &n.txq);
    uint64_t last = rdtsc();
    for (unsigned spins = 0; sent < frames;) {
        uint32_t id, len;
        int got = 0;
        while (virtq_poll_used(&n.txq, &id, &len)) {
            if (id >= n.txq.size)
                return fail(r, "used entry for descriptor %u of %u", id, n.txq.size);
            sent++;
            got = 1;
            if (queued < frames) {
                virtq_add_avail(&n.txq, (uint16_t)id);
                queued++;
            }
        }
        if (got) {
            virtq_kick(n.dev, &n.txq);
            last = rdtsc();
        } else if (++spins % 1024 == 0 && rdtsc() - last > STALL_TSC) {
            return stalled(r, n.dev, "transmit", sent * ETH_FRAME_LEN);
        }
    }
    uint64_t ticks = rdtsc() - t0;
    printf("testguest: bench end bytes=%lu\n", sent * ETH_FRAME_LEN);
    return pass(r, "sent %lu frames of %u bytes, %u in flight, %lu TSC ticks", sent, ETH_FRAME_LEN, n.txq.size,
                ticks);
}

int scenario_net_bench_rx(struct result *r)
{
    struct net_bench n;
    const char *err = bench_enter();
    if (!err)
        err = net_bench_open(&n);
    if (err)
        return fail(r, "init: %s", err);
    for (unsigned i = 0; i < n.rxq.size; i++) {
        n.rxq.desc[i] = (struct virtq_desc){(uint64_t)rx_buffer(i), NET_BUF_LEN, VIRTQ_DESC_F_WRITE, 0};
        virtq_add_avail(&n.rxq, (uint16_t)i);
    }
    virtq_kick(n.dev, &n.rxq);
    printf("testguest: bench ready mac=%02x:%02x:%02x:%02x:%02x:%02x\n", n.mac[0], n.mac[1], n.mac[2], n.mac[3],
           n.mac[4], n.mac[5]);

    uint64_t want = net_bench_bytes(), bytes = 0, frames = 0, others = 0, t0 = 0;
    int started = 0;
    uint64_t last = rdtsc();
    for (unsigned spins = 0; bytes < want;) {
        uint32_t id, len;
        int got = 0;
        while (virtq_poll_used(&n.rxq, &id, &len)) {
            if (id >= n.rxq.size)
                return fail(r, "used entry for descriptor %u of %u", id, n.rxq.size);
            const uint8_t *eth = rx_buffer(id) + NET_HDR_LEN;
            if (len >= NET_HDR_LEN + ETH_HLEN && len <= NET_BUF_LEN &&
                (eth[12] << 8 | eth[13]) == ETHERTYPE_BENCH) {
                if (!started) {
                    bench_start(&t0);
                    started = 1;
                }
                bytes += len - NET_HDR_LEN;
                frames++;
            } else {
                others++;
            }
            virtq_add_avail(&n.rxq, (uint16_t)id);
            got = 1;
        }
        if (got) {
            virtq_kick(n.dev, &n.rxq);
            last = rdtsc();
        } else if (++spins % 1024 == 0 && rdtsc() - last > (started ? STALL_TSC : FIRST_FRAME_TSC)) {
            return stalled(r, n.dev, started ? "receive" : "receive (no frame yet)", bytes);
        }
    }
    uint64_t ticks = rdtsc() - t0;
    printf("testguest: bench end bytes=%lu\n", bytes);
    return pass(r, "received %lu frames, %lu bytes (%lu other frames), %u buffers, %lu TSC ticks", frames, bytes,
                others, n.rxq.size, ticks);
}
