/* virtio-blk (device id 2): requests are a chain of header (device-readable), data, and one
 * status byte (device-writable) (virtio 1.1 section 5.2.6). */
#include "scenario.h"
#include "virtio.h"

#define VIRTIO_BLK_F_RO (1ull << 5)
#define VIRTIO_BLK_F_FLUSH (1ull << 9)

#define VIRTIO_BLK_T_IN 0
#define VIRTIO_BLK_T_OUT 1
#define VIRTIO_BLK_T_FLUSH 4
#define VIRTIO_BLK_T_GET_ID 8

#define VIRTIO_BLK_S_OK 0
#define VIRTIO_BLK_S_IOERR 1
#define VIRTIO_BLK_S_UNSUPP 2
/* Written into the status byte before each request, to see whether the device wrote it. */
#define STATUS_UNTOUCHED 0xff

#define SECTOR_SIZE 512
#define ID_BYTES 20
#define PATTERN_SECTOR 8
#define PATTERN_BYTES 4096

struct blk_req_header {
    uint32_t type;
    uint32_t reserved;
    uint64_t sector;
};

struct blk {
    struct virtio_dev *dev;
    struct virtq q;
    uint64_t capacity; /* in 512-byte sectors */
};

static struct blk_req_header header ALIGNED(16);
static uint8_t data[PATTERN_BYTES] ALIGNED(PAGE_SIZE);
static volatile uint8_t status;

static const char *status_name(uint8_t s)
{
    switch (s) {
    case VIRTIO_BLK_S_OK:
        return "OK";
    case VIRTIO_BLK_S_IOERR:
        return "IOERR";
    case VIRTIO_BLK_S_UNSUPP:
        return "UNSUPP";
    case STATUS_UNTOUCHED:
        return "not written";
    }
    return "unknown";
}

/* Resets and (re)initialises the first virtio-blk device with queue 0. */
static const char *blk_open(struct blk *b)
{
    b->dev = virtio_find(VIRTIO_ID_BLOCK, 0);
    if (!b->dev)
        return "no virtio-blk device (id 2) among the virtio-mmio devices on the command line";
    const char *err = virtio_start(b->dev, VIRTIO_BLK_F_RO | VIRTIO_BLK_F_FLUSH);
    if (!err)
        err = virtq_setup(b->dev, &b->q, 0, 0);
    if (err)
        return err;
    b->capacity = virtio_config64(b->dev, 0);
    virtio_driver_ok(b->dev);
    return NULL;
}

/* Sends one request and waits for it. `len` 0 means no data descriptor. On success returns
 * NULL with *st the status byte; otherwise the reason the request did not complete. */
static const char *blk_request(struct blk *b, uint32_t type, uint64_t sector, uint32_t len, uint8_t *st)
{
    static char reason[160];
    header = (struct blk_req_header){.type = type, .sector = sector};
    status = STATUS_UNTOUCHED;
    uint16_t data_flags = type == VIRTIO_BLK_T_OUT ? 0 : VIRTQ_DESC_F_WRITE;
    struct virtq_buf chain[3] = {{&header, sizeof(header), 0}};
    unsigned n = 1;
    if (len)
        chain[n++] = (struct virtq_buf){data, len, data_flags};
    chain[n++] = (struct virtq_buf){&status, 1, VIRTQ_DESC_F_WRITE};
    uint32_t used_len = 0;
    enum virtq_wait w = virtq_transfer(b->dev, &b->q, chain, n, &used_len);
    if (w != VIRTQ_USED) {
        snprintf(reason, sizeof(reason), "request type %u sector %lu: %s", type, sector, virtq_wait_name(w));
        return reason;
    }
    *st = status;
    /* The used length counts the bytes the device wrote: data (for reads) and the status. */
    uint32_t want = (data_flags && len ? len : 0) + 1;
    if (status == VIRTIO_BLK_S_OK && type == VIRTIO_BLK_T_IN && used_len != want) {
        snprintf(reason, sizeof(reason), "read of %u bytes at sector %lu: used length %u, want %u", len,
                 sector, used_len, want);
        return reason;
    }
    return NULL;
}

/* Like blk_request, but anything other than status OK is a failure. */
static const char *blk_ok(struct blk *b, const char *what, uint32_t type, uint64_t sector, uint32_t len)
{
    static char reason[200];
    uint8_t st;
    const char *err = blk_request(b, type, sector, len, &st);
    if (err)
        return err;
    if (st != VIRTIO_BLK_S_OK) {
        snprintf(reason, sizeof(reason), "%s: status %u (%s)", what, st, status_name(st));
        return reason;
    }
    return NULL;
}

int scenario_blk_write(struct result *r)
{
    struct blk b;
    const char *err = blk_open(&b);
    if (err)
        return fail(r, "init: %s", err);
    if (b.dev->features & VIRTIO_BLK_F_RO)
        return fail(r, "the disk is read-only (VIRTIO_BLK_F_RO offered)");
    if (!(b.dev->features & VIRTIO_BLK_F_FLUSH))
        return fail(r, "device does not offer VIRTIO_BLK_F_FLUSH (features 0x%lx)", b.dev->offered);
    uint64_t need = PATTERN_SECTOR + PATTERN_BYTES / SECTOR_SIZE;
    if (b.capacity < need)
        return fail(r, "capacity %lu sectors, need at least %lu", b.capacity, need);

    for (unsigned i = 0; i < PATTERN_BYTES; i++)
        data[i] = (uint8_t)(i * 7 + 3);
    if ((err = blk_ok(&b, "write", VIRTIO_BLK_T_OUT, PATTERN_SECTOR, PATTERN_BYTES)))
        return fail(r, "%s", err);
    if ((err = blk_ok(&b, "flush", VIRTIO_BLK_T_FLUSH, 0, 0)))
        return fail(r, "%s", err);
    memset(data, 0, sizeof(data));
    if ((err = blk_ok(&b, "read back", VIRTIO_BLK_T_IN, PATTERN_SECTOR, PATTERN_BYTES)))
        return fail(r, "%s", err);
    for (unsigned i = 0; i < PATTERN_BYTES; i++)
        if (data[i] != (uint8_t)(i * 7 + 3))
            return fail(r, "read back: byte %u is 0x%02x, wrote 0x%02x", i, data[i], (uint8_t)(i * 7 + 3));
    return pass(r, "capacity %lu sectors; wrote, flushed and read back %u bytes at sector %u", b.capacity,
                PATTERN_BYTES, PATTERN_SECTOR);
}

int scenario_blk_ro(struct result *r)
{
    struct blk b;
    const char *err = blk_open(&b);
    if (err)
        return fail(r, "init: %s", err);
    if (!(b.dev->offered & VIRTIO_BLK_F_RO))
        return fail(r, "device does not offer VIRTIO_BLK_F_RO (features 0x%lx)", b.dev->offered);
    memset(data, 0xa5, SECTOR_SIZE);
    uint8_t st;
    if ((err = blk_request(&b, VIRTIO_BLK_T_OUT, 0, SECTOR_SIZE, &st)))
        return fail(r, "write: %s", err);
    if (st != VIRTIO_BLK_S_IOERR)
        return fail(r, "write to a read-only disk: status %u (%s), want %u (IOERR)", st, status_name(st),
                    VIRTIO_BLK_S_IOERR);
    if ((err = blk_ok(&b, "read after the refused write", VIRTIO_BLK_T_IN, 0, SECTOR_SIZE)))
        return fail(r, "%s", err);
    return pass(r, "write refused with IOERR; reads still work (capacity %lu sectors)", b.capacity);
}

/* --- config-flood ------------------------------------------------------------------------ */

/* A driver that writes the block device's read-only configuration space in a loop
 * (fabric.mib=N times, default 100000): every write is refused, and the VMM must neither log
 * each one nor stop serving the device. */
int scenario_config_flood(struct result *r)
{
    struct blk b;
    const char *err = blk_open(&b);
    if (err)
        return fail(r, "init: %s", err);
    uint64_t writes = bench_mib ? bench_mib : 100000;
    for (uint64_t i = 0; i < writes; i++)
        virtio_write(b.dev, VIRTIO_MMIO_CONFIG, (uint32_t)i);
    uint64_t capacity = virtio_config64(b.dev, 0);
    if (capacity != b.capacity)
        return fail(r, "capacity changed from %lu to %lu sectors", b.capacity, capacity);
    if ((err = blk_ok(&b, "read after the flood", VIRTIO_BLK_T_IN, 0, SECTOR_SIZE)))
        return fail(r, "%s", err);
    return pass(r, "%lu config writes refused; capacity unchanged, reads still work", writes);
}

int scenario_blk_id(struct result *r)
{
    struct blk b;
    const char *err = blk_open(&b);
    if (err)
        return fail(r, "init: %s", err);
    memset(data, 0, ID_BYTES + 1);
    if ((err = blk_ok(&b, "GET_ID", VIRTIO_BLK_T_GET_ID, 0, ID_BYTES)))
        return fail(r, "%s", err);
    /* The id is up to 20 bytes, NUL-terminated only when shorter. */
    char id[ID_BYTES + 1];
    unsigned n = 0;
    for (; n < ID_BYTES && data[n]; n++) {
        if (data[n] < 0x20 || data[n] > 0x7e)
            return fail(r, "GET_ID: byte %u is 0x%02x, not printable ASCII", n, data[n]);
        id[n] = (char)data[n];
    }
    id[n] = '\0';
    if (!n)
        return fail(r, "GET_ID returned an empty id");
    return pass(r, "id \"%s\" (%u bytes)", id, n);
}

/* --- hostile-blk ------------------------------------------------------------------------- */

/* A malformed request. `build` writes the raw descriptors and returns the head to publish. */
struct hostile_case {
    const char *name;
    uint16_t (*build)(struct blk *b);
    /* True when the status byte is device-readable: the device must not write it. */
    int status_readable;
};

#define FAR_OUTSIDE_RAM (1ull << 30) /* this far above the end of RAM and 4 GiB */

/* The usual three descriptors for a read of one sector, to be spoiled by the caller. */
static void good_read_chain(struct blk *b, uint64_t sector)
{
    volatile struct virtq_desc *d = b->q.desc;
    header = (struct blk_req_header){.type = VIRTIO_BLK_T_IN, .sector = sector};
    d[0] = (struct virtq_desc){(uint64_t)&header, sizeof(header), VIRTQ_DESC_F_NEXT, 1};
    d[1] = (struct virtq_desc){(uint64_t)data, SECTOR_SIZE, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 2};
    d[2] = (struct virtq_desc){(uint64_t)&status, 1, VIRTQ_DESC_F_WRITE, 0};
}

static uint16_t build_addr_outside_ram(struct blk *b)
{
    uint64_t top = boot_info.ram_end > (4ull << 30) ? boot_info.ram_end : (4ull << 30);
    good_read_chain(b, 0);
    b->q.desc[1].addr = top + FAR_OUTSIDE_RAM;
    return 0;
}

static uint16_t build_addr_len_overflow(struct blk *b)
{
    good_read_chain(b, 0);
    b->q.desc[1].addr = 0xfffffffffffffe00ull; /* + 1024 wraps past 2^64 */
    b->q.desc[1].len = 2 * SECTOR_SIZE;
    return 0;
}

static uint16_t build_len_not_512(struct blk *b)
{
    good_read_chain(b, 0);
    b->q.desc[1].len = 100;
    return 0;
}

static uint16_t build_sector_past_end(struct blk *b)
{
    good_read_chain(b, b->capacity);
    return 0;
}

static uint16_t build_sector_overflow(struct blk *b)
{
    good_read_chain(b, 0xffffffffffffffffull); /* * 512 overflows */
    return 0;
}

/* Loops whose descriptors all have the right direction, so only loop detection stops them. */
static uint16_t build_desc_loop_readable(struct blk *b)
{
    good_read_chain(b, 0);
    header.type = VIRTIO_BLK_T_OUT;
    b->q.desc[1].flags = VIRTQ_DESC_F_NEXT;
    b->q.desc[1].next = 0; /* header -> data -> header -> ..., no status */
    return 0;
}

static uint16_t build_desc_loop_writable(struct blk *b)
{
    good_read_chain(b, 0);
    b->q.desc[2].flags = VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT;
    b->q.desc[2].next = 1; /* header -> data -> status -> data -> status -> ... */
    return 0;
}

static uint16_t build_next_out_of_range(struct blk *b)
{
    good_read_chain(b, 0);
    b->q.desc[1].next = 0x7fff;
    return 0;
}

static uint16_t build_head_out_of_range(struct blk *b)
{
    good_read_chain(b, 0);
    return (uint16_t)(b->q.size + 3);
}

static uint16_t build_status_readable(struct blk *b)
{
    good_read_chain(b, 0);
    b->q.desc[2].flags = 0;
    return 0;
}

static const struct hostile_case hostile_cases[] = {
    {"addr-outside-ram", build_addr_outside_ram, 0},
    {"addr-len-overflow", build_addr_len_overflow, 0},
    {"len-not-512", build_len_not_512, 0},
    {"sector-past-end", build_sector_past_end, 0},
    {"sector-overflow", build_sector_overflow, 0},
    {"desc-loop-readable", build_desc_loop_readable, 0},
    {"desc-loop-writable", build_desc_loop_writable, 0},
    {"next-out-of-range", build_next_out_of_range, 0},
    {"head-out-of-range", build_head_out_of_range, 0},
    {"status-readable", build_status_readable, 1},
};

/* How long a malformed request may go unanswered before we call it dropped (~1 s at 3 GHz). */
#define HOSTILE_TSC_LIMIT 3000000000ull

/* Runs one case on a freshly initialised device; prints what happened. Returns false when the
 * device claimed to have served a request it cannot have served correctly. */
static int run_hostile_case(struct blk *b, const struct hostile_case *c, const char **err)
{
    if ((*err = blk_open(b)))
        return 0;
    status = STATUS_UNTOUCHED;
    memset(data, 0xaa, SECTOR_SIZE);
    virtq_publish(b->dev, &b->q, c->build(b));
    uint32_t id = 0, len = 0;
    enum virtq_wait w = virtq_wait(b->dev, &b->q, HOSTILE_TSC_LIMIT, &id, &len);
    uint8_t st = status;
    int ok = 1;
    const char *verdict = "refused";
    if (w == VIRTQ_USED && c->status_readable && st != STATUS_UNTOUCHED)
        ok = 0, verdict = "BAD: device wrote a device-readable descriptor";
    else if (w == VIRTQ_USED && st == VIRTIO_BLK_S_OK)
        ok = 0, verdict = "BAD: device reported success";
    else if (w == VIRTQ_TIMEOUT)
        verdict = "dropped";
    if (w == VIRTQ_USED)
        note("%s: %s: used id %u len %u, status %u (%s)", c->name, verdict, id, len, st, status_name(st));
    else
        note("%s: %s: %s; status %u (%s)", c->name, verdict, virtq_wait_name(w), st, status_name(st));
    return ok;
}

/* Transport misuse a driver could commit: each must leave the device usable after a reset. */
static void transport_misuse(struct blk *b)
{
    struct virtio_dev *d = b->dev;
    virtio_write(d, VIRTIO_MMIO_QUEUE_NOTIFY, 9);      /* a queue that does not exist */
    virtio_write(d, VIRTIO_MMIO_QUEUE_NOTIFY, 0xffff);
    virtio_write(d, VIRTIO_MMIO_MAGIC, 0);             /* read-only registers */
    virtio_write(d, VIRTIO_MMIO_DEVICE_ID, 0);
    virtio_write(d, VIRTIO_MMIO_QUEUE_SEL, 99);
    uint32_t max99 = virtio_read(d, VIRTIO_MMIO_QUEUE_NUM_MAX);
    virtio_write(d, VIRTIO_MMIO_QUEUE_NUM, 0xffff);
    virtio_write(d, VIRTIO_MMIO_QUEUE_READY, 1);
    virtio_write(d, VIRTIO_MMIO_QUEUE_SEL, 0);
    virtio_write(d, VIRTIO_MMIO_QUEUE_NUM, 3);         /* not a power of two, after DRIVER_OK */
    virtio_write(d, VIRTIO_MMIO_QUEUE_DESC_LOW, 0xdead0000);
    uint32_t beyond = virtio_read(d, VIRTIO_MMIO_CONFIG + 0xf00); /* past any blk config */
    uint32_t magic = virtio_read(d, VIRTIO_MMIO_MAGIC);
    note("transport-misuse: QueueNumMax of queue 99 = %u, config+0xf00 = 0x%x, magic after write = 0x%x, "
         "status 0x%x",
         max99, beyond, magic, virtio_status(d));
}

int scenario_hostile_blk(struct result *r)
{
    struct blk b;
    const char *err;
    unsigned bad = 0;
    const char *first_bad = NULL;
    for (unsigned i = 0; i < ARRAY_SIZE(hostile_cases); i++) {
        if (!run_hostile_case(&b, &hostile_cases[i], &err)) {
            if (err)
                return fail(r, "re-initialising the device before %s: %s", hostile_cases[i].name, err);
            bad++;
            first_bad = first_bad ? first_bad : hostile_cases[i].name;
        }
    }
    if ((err = blk_open(&b)))
        return fail(r, "re-initialising the device before transport-misuse: %s", err);
    transport_misuse(&b);

    /* The VMM must still be serving: reset, initialise again, read. */
    if ((err = blk_open(&b)))
        return fail(r, "device did not come back after reset: %s", err);
    if ((err = blk_ok(&b, "good read after the hostile requests", VIRTIO_BLK_T_IN, 0, SECTOR_SIZE)))
        return fail(r, "%s", err);
    if (bad)
        return fail(r, "%u sub-case(s) accepted a malformed request (first: %s)", bad, first_bad);
    return pass(r, "%u malformed requests refused or dropped, transport misuse survived, good read ok",
                (unsigned)ARRAY_SIZE(hostile_cases));
}
