/* The virtio-mmio transport and split virtqueues, polled (interrupts stay off). */
#include "virtio.h"

struct virtio_dev virtio_devices[MAX_VIRTIO_DEVICES];
unsigned virtio_device_count;

/* Queue memory: per slot, one page each for the descriptor table, the avail ring and the used
 * ring (far above the alignment the spec asks for: 16, 2 and 4 bytes). */
#define QUEUE_SLOTS 8
static struct {
    struct virtq_desc desc[VIRTQ_MAX_SIZE] ALIGNED(PAGE_SIZE);
    uint8_t avail[PAGE_SIZE] ALIGNED(PAGE_SIZE);
    uint8_t used[PAGE_SIZE] ALIGNED(PAGE_SIZE);
} queue_mem[QUEUE_SLOTS];

/* About 10 s at a 3 GHz TSC, more at slower ones: healthy devices answer in well under 1 s. */
#define DEFAULT_TSC_LIMIT 30000000000ull

int virtio_add_from_cmdline(const char *spec)
{
    if (virtio_device_count == MAX_VIRTIO_DEVICES)
        return 0;
    const char *p = spec;
    uint64_t size = parse_u64(&p);
    if (*p == 'K' || *p == 'k')
        size <<= 10, p++;
    else if (*p == 'M' || *p == 'm')
        size <<= 20, p++;
    if (*p++ != '@')
        return 0;
    uint64_t base = parse_u64(&p);
    if (*p++ != ':' || !size || !base)
        return 0;
    uint64_t irq = parse_u64(&p);
    struct virtio_dev *d = &virtio_devices[virtio_device_count++];
    *d = (struct virtio_dev){.base = base, .size = size, .irq = (uint32_t)irq};
    return 1;
}

void virtio_probe_all(void)
{
    for (unsigned i = 0; i < virtio_device_count; i++) {
        struct virtio_dev *d = &virtio_devices[i];
        uint32_t magic = virtio_read(d, VIRTIO_MMIO_MAGIC);
        uint32_t version = virtio_read(d, VIRTIO_MMIO_VERSION);
        uint32_t id = virtio_read(d, VIRTIO_MMIO_DEVICE_ID);
        if (magic == VIRTIO_MMIO_MAGIC_VALUE && version == 2)
            d->device_id = id;
        printf("testguest: virtio-mmio %lu@0x%lx irq %u: magic 0x%x version %u device %u%s\n",
               d->size, d->base, d->irq, magic, version, id,
               d->device_id ? "" : " (ignored: not a version 2 virtio-mmio device)");
    }
}

struct virtio_dev *virtio_find(uint32_t device_id, unsigned n)
{
    for (unsigned i = 0; i < virtio_device_count; i++)
        if (virtio_devices[i].device_id == device_id && n-- == 0)
            return &virtio_devices[i];
    return NULL;
}

void virtio_reset(struct virtio_dev *d)
{
    virtio_write(d, VIRTIO_MMIO_STATUS, 0);
    /* The reset is complete when status reads back 0 (section 4.2.3.1). */
    uint64_t end = rdtsc() + DEFAULT_TSC_LIMIT;
    while (virtio_status(d) != 0 && rdtsc() < end)
        ;
}

static void set_status(struct virtio_dev *d, uint32_t bits)
{
    virtio_write(d, VIRTIO_MMIO_STATUS, virtio_status(d) | bits);
}

const char *virtio_start(struct virtio_dev *d, uint64_t wanted)
{
    static char reason[128];
    if (virtio_read(d, VIRTIO_MMIO_MAGIC) != VIRTIO_MMIO_MAGIC_VALUE)
        return "bad magic value";
    if (virtio_read(d, VIRTIO_MMIO_VERSION) != 2)
        return "not a virtio-mmio version 2 device";
    virtio_reset(d);
    if (virtio_status(d) != 0)
        return "status does not read 0 after reset";
    set_status(d, VIRTIO_STATUS_ACKNOWLEDGE);
    set_status(d, VIRTIO_STATUS_DRIVER);

    virtio_write(d, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
    uint64_t offered = virtio_read(d, VIRTIO_MMIO_DEVICE_FEATURES);
    virtio_write(d, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
    offered |= (uint64_t)virtio_read(d, VIRTIO_MMIO_DEVICE_FEATURES) << 32;
    d->offered = offered;
    if (!(offered & VIRTIO_F_VERSION_1)) {
        set_status(d, VIRTIO_STATUS_FAILED);
        snprintf(reason, sizeof(reason), "device does not offer VIRTIO_F_VERSION_1 (features 0x%lx)", offered);
        return reason;
    }
    d->features = offered & (wanted | VIRTIO_F_VERSION_1);
    virtio_write(d, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
    virtio_write(d, VIRTIO_MMIO_DRIVER_FEATURES, (uint32_t)d->features);
    virtio_write(d, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    virtio_write(d, VIRTIO_MMIO_DRIVER_FEATURES, (uint32_t)(d->features >> 32));
    set_status(d, VIRTIO_STATUS_FEATURES_OK);
    if (!(virtio_status(d) & VIRTIO_STATUS_FEATURES_OK)) {
        set_status(d, VIRTIO_STATUS_FAILED);
        snprintf(reason, sizeof(reason), "FEATURES_OK did not stick (features 0x%lx)", d->features);
        return reason;
    }
    return NULL;
}

const char *virtq_setup(struct virtio_dev *d, struct virtq *q, unsigned index, unsigned slot)
{
    return virtq_setup_size(d, q, index, slot, VIRTQ_SIZE);
}

const char *virtq_setup_size(struct virtio_dev *d, struct virtq *q, unsigned index, unsigned slot, unsigned size)
{
    static char reason[128];
    if (slot >= QUEUE_SLOTS)
        return "no free queue memory";
    if (size > VIRTQ_MAX_SIZE)
        size = VIRTQ_MAX_SIZE;
    virtio_write(d, VIRTIO_MMIO_QUEUE_SEL, index);
    if (virtio_read(d, VIRTIO_MMIO_QUEUE_READY) != 0) {
        snprintf(reason, sizeof(reason), "queue %u is already ready", index);
        return reason;
    }
    uint32_t max = virtio_read(d, VIRTIO_MMIO_QUEUE_NUM_MAX);
    if (max == 0) {
        snprintf(reason, sizeof(reason), "queue %u does not exist (QueueNumMax 0)", index);
        return reason;
    }
    memset(&queue_mem[slot], 0, sizeof(queue_mem[slot]));
    *q = (struct virtq){
        .index = (uint16_t)index,
        .size = (uint16_t)(max < size ? max : size),
        .desc = queue_mem[slot].desc,
        .avail = (volatile struct virtq_avail *)queue_mem[slot].avail,
        .used = (volatile struct virtq_used *)queue_mem[slot].used,
    };
    virtio_write(d, VIRTIO_MMIO_QUEUE_NUM, q->size);
    uint64_t desc = (uint64_t)q->desc, avail = (uint64_t)q->avail, used = (uint64_t)q->used;
    virtio_write(d, VIRTIO_MMIO_QUEUE_DESC_LOW, (uint32_t)desc);
    virtio_write(d, VIRTIO_MMIO_QUEUE_DESC_HIGH, (uint32_t)(desc >> 32));
    virtio_write(d, VIRTIO_MMIO_QUEUE_DRIVER_LOW, (uint32_t)avail);
    virtio_write(d, VIRTIO_MMIO_QUEUE_DRIVER_HIGH, (uint32_t)(avail >> 32));
    virtio_write(d, VIRTIO_MMIO_QUEUE_DEVICE_LOW, (uint32_t)used);
    virtio_write(d, VIRTIO_MMIO_QUEUE_DEVICE_HIGH, (uint32_t)(used >> 32));
    virtio_write(d, VIRTIO_MMIO_QUEUE_READY, 1);
    if (virtio_read(d, VIRTIO_MMIO_QUEUE_READY) != 1) {
        snprintf(reason, sizeof(reason), "queue %u: QueueReady does not read back 1", index);
        return reason;
    }
    return NULL;
}

void virtio_driver_ok(struct virtio_dev *d)
{
    set_status(d, VIRTIO_STATUS_DRIVER_OK);
}

uint32_t virtio_config32(struct virtio_dev *d, uint32_t offset)
{
    uint32_t gen, v;
    do {
        gen = virtio_read(d, VIRTIO_MMIO_CONFIG_GENERATION);
        v = virtio_read(d, VIRTIO_MMIO_CONFIG + offset);
    } while (gen != virtio_read(d, VIRTIO_MMIO_CONFIG_GENERATION));
    return v;
}

uint64_t virtio_config64(struct virtio_dev *d, uint32_t offset)
{
    uint32_t gen, lo, hi;
    do {
        gen = virtio_read(d, VIRTIO_MMIO_CONFIG_GENERATION);
        lo = virtio_read(d, VIRTIO_MMIO_CONFIG + offset);
        hi = virtio_read(d, VIRTIO_MMIO_CONFIG + offset + 4);
    } while (gen != virtio_read(d, VIRTIO_MMIO_CONFIG_GENERATION));
    return (uint64_t)hi << 32 | lo;
}

void virtq_publish(struct virtio_dev *d, struct virtq *q, uint16_t head)
{
    q->avail->ring[q->avail_idx % q->size] = head;
    barrier(); /* the ring entry before the index that makes it visible */
    q->avail->idx = ++q->avail_idx;
    barrier();
    virtio_write(d, VIRTIO_MMIO_QUEUE_NOTIFY, q->index);
}

void virtq_add_avail(struct virtq *q, uint16_t head)
{
    q->avail->ring[q->avail_idx % q->size] = head;
    q->avail_idx++;
}

void virtq_kick(struct virtio_dev *d, struct virtq *q)
{
    barrier(); /* ring entries before the index that makes them visible */
    q->avail->idx = q->avail_idx;
    /* The index store must be visible before the flag is read, or the device could go to sleep
     * between our read of NO_NOTIFY and its last look at the index: a full fence. */
    __asm__ volatile("mfence" ::: "memory");
    if (!(q->used->flags & VIRTQ_USED_F_NO_NOTIFY))
        virtio_write(d, VIRTIO_MMIO_QUEUE_NOTIFY, q->index);
}

int virtq_poll_used(struct virtq *q, uint32_t *id, uint32_t *len)
{
    if (q->used->idx == q->used_seen)
        return 0;
    barrier(); /* the index before the entry it covers */
    volatile struct virtq_used_elem *e = &q->used->ring[q->used_seen % q->size];
    *id = e->id;
    *len = e->len;
    q->used_seen++;
    return 1;
}

const char *virtq_wait_name(enum virtq_wait w)
{
    switch (w) {
    case VIRTQ_USED:
        return "used entry";
    case VIRTQ_NEEDS_RESET:
        return "device set NEEDS_RESET";
    case VIRTQ_TIMEOUT:
        return "no used entry (timed out)";
    case VIRTQ_WRONG_ID:
        return "used entry for a chain never submitted";
    }
    return "?";
}

enum virtq_wait virtq_wait(struct virtio_dev *d, struct virtq *q, uint64_t tsc_limit, uint32_t *id, uint32_t *len)
{
    uint64_t end = rdtsc() + (tsc_limit ? tsc_limit : DEFAULT_TSC_LIMIT);
    for (unsigned spins = 0;; spins++) {
        if (q->used->idx != q->used_seen) {
            barrier(); /* the index before the entry it covers */
            volatile struct virtq_used_elem *e = &q->used->ring[q->used_seen % q->size];
            *id = e->id;
            *len = e->len;
            q->used_seen++;
            /* Acknowledge the interrupt as a driver would, though it is never delivered. */
            virtio_write(d, VIRTIO_MMIO_INTERRUPT_ACK, virtio_read(d, VIRTIO_MMIO_INTERRUPT_STATUS));
            return VIRTQ_USED;
        }
        /* Registers are read less often than memory: every read is a VM exit. */
        if (spins % 64 == 0) {
            if (virtio_status(d) & (VIRTIO_STATUS_NEEDS_RESET | VIRTIO_STATUS_FAILED))
                return VIRTQ_NEEDS_RESET;
            if (rdtsc() > end)
                return VIRTQ_TIMEOUT;
        }
    }
}

enum virtq_wait virtq_transfer(struct virtio_dev *d, struct virtq *q, const struct virtq_buf *bufs, unsigned n, uint32_t *len)
{
    for (unsigned i = 0; i < n; i++) {
        q->desc[i].addr = (uint64_t)bufs[i].addr;
        q->desc[i].len = bufs[i].len;
        q->desc[i].flags = bufs[i].flags | (i + 1 < n ? VIRTQ_DESC_F_NEXT : 0);
        q->desc[i].next = (uint16_t)(i + 1 < n ? i + 1 : 0);
    }
    virtq_publish(d, q, 0);
    uint32_t id;
    enum virtq_wait r = virtq_wait(d, q, 0, &id, len);
    /* Only chain 0 is ever in flight, so any other id is the device's mistake. */
    return r == VIRTQ_USED && id != 0 ? VIRTQ_WRONG_ID : r;
}
