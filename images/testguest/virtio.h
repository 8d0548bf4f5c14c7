/* A minimal polling virtio-mmio driver (modern layout, version 2; virtio 1.1 section 4.2.2)
 * with split virtqueues. One request is in flight at a time, which keeps the ring logic simple
 * and lets hostile scenarios write raw descriptors themselves. */
#ifndef TESTGUEST_VIRTIO_H
#define TESTGUEST_VIRTIO_H

#include "lib.h"

/* Register offsets (table 4.1). */
#define VIRTIO_MMIO_MAGIC 0x000
#define VIRTIO_MMIO_VERSION 0x004
#define VIRTIO_MMIO_DEVICE_ID 0x008
#define VIRTIO_MMIO_VENDOR_ID 0x00c
#define VIRTIO_MMIO_DEVICE_FEATURES 0x010
#define VIRTIO_MMIO_DEVICE_FEATURES_SEL 0x014
#define VIRTIO_MMIO_DRIVER_FEATURES 0x020
#define VIRTIO_MMIO_DRIVER_FEATURES_SEL 0x024
#define VIRTIO_MMIO_QUEUE_SEL 0x030
#define VIRTIO_MMIO_QUEUE_NUM_MAX 0x034
#define VIRTIO_MMIO_QUEUE_NUM 0x038
#define VIRTIO_MMIO_QUEUE_READY 0x044
#define VIRTIO_MMIO_QUEUE_NOTIFY 0x050
#define VIRTIO_MMIO_INTERRUPT_STATUS 0x060
#define VIRTIO_MMIO_INTERRUPT_ACK 0x064
#define VIRTIO_MMIO_STATUS 0x070
#define VIRTIO_MMIO_QUEUE_DESC_LOW 0x080
#define VIRTIO_MMIO_QUEUE_DESC_HIGH 0x084
#define VIRTIO_MMIO_QUEUE_DRIVER_LOW 0x090
#define VIRTIO_MMIO_QUEUE_DRIVER_HIGH 0x094
#define VIRTIO_MMIO_QUEUE_DEVICE_LOW 0x0a0
#define VIRTIO_MMIO_QUEUE_DEVICE_HIGH 0x0a4
#define VIRTIO_MMIO_CONFIG_GENERATION 0x0fc
#define VIRTIO_MMIO_CONFIG 0x100

#define VIRTIO_MMIO_MAGIC_VALUE 0x74726976 /* "virt" */

/* Device status bits (section 2.1). */
#define VIRTIO_STATUS_ACKNOWLEDGE 0x01
#define VIRTIO_STATUS_DRIVER 0x02
#define VIRTIO_STATUS_DRIVER_OK 0x04
#define VIRTIO_STATUS_FEATURES_OK 0x08
#define VIRTIO_STATUS_NEEDS_RESET 0x40
#define VIRTIO_STATUS_FAILED 0x80

#define VIRTIO_F_VERSION_1 (1ull << 32)

#define VIRTIO_ID_NET 1
#define VIRTIO_ID_BLOCK 2
#define VIRTIO_ID_RNG 4
#define VIRTIO_ID_BALLOON 5

/* Split virtqueue layout (section 2.6). */
#define VIRTQ_DESC_F_NEXT 1
#define VIRTQ_DESC_F_WRITE 2

struct virtq_desc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t next;
};

struct virtq_avail {
    uint16_t flags;
    uint16_t idx;
    uint16_t ring[];
};

struct virtq_used_elem {
    uint32_t id;
    uint32_t len;
};

struct virtq_used {
    uint16_t flags;
    uint16_t idx;
    struct virtq_used_elem ring[];
};

/* Queue size the driver asks for (at most QueueNumMax). */
#define VIRTQ_SIZE 16
/* The largest queue virtq_setup_size can set up: one page of descriptors. */
#define VIRTQ_MAX_SIZE 256

/* Ring flags: the driver asks for no interrupts (avail), the device for no notifications (used). */
#define VIRTQ_AVAIL_F_NO_INTERRUPT 1
#define VIRTQ_USED_F_NO_NOTIFY 1

struct virtq {
    uint16_t index;     /* queue number on the device */
    uint16_t size;      /* QueueNum */
    uint16_t avail_idx; /* next free avail ring slot (free-running) */
    uint16_t used_seen; /* used ring entries consumed (free-running) */
    volatile struct virtq_desc *desc;
    volatile struct virtq_avail *avail;
    volatile struct virtq_used *used;
};

/* A device announced on the command line (virtio_mmio.device=SIZE@BASE:IRQ). */
struct virtio_dev {
    uint64_t base, size;
    uint32_t irq;
    uint32_t device_id; /* 0 when nothing answers at base */
    uint64_t offered;   /* device features */
    uint64_t features;  /* negotiated */
};

#define MAX_VIRTIO_DEVICES 8
extern struct virtio_dev virtio_devices[MAX_VIRTIO_DEVICES];
extern unsigned virtio_device_count;

/* Adds a device from the text after "virtio_mmio.device="; false if it does not parse. */
int virtio_add_from_cmdline(const char *spec);
/* Reads magic, version and device id of every announced device and prints one line each. */
void virtio_probe_all(void);
/* The n-th (from 0) announced device with this id, or NULL. */
struct virtio_dev *virtio_find(uint32_t device_id, unsigned n);

static inline uint32_t virtio_read(struct virtio_dev *d, uint32_t reg) { return mmio_read32(d->base + reg); }
static inline void virtio_write(struct virtio_dev *d, uint32_t reg, uint32_t v) { mmio_write32(d->base + reg, v); }
static inline uint32_t virtio_status(struct virtio_dev *d) { return virtio_read(d, VIRTIO_MMIO_STATUS); }

/* Device initialisation (section 3.1.1), in steps so that scenarios can stop in between.
 * Each returns NULL on success or a reason. virtio_start offers VIRTIO_F_VERSION_1 plus the
 * subset of `wanted` the device offers, and checks FEATURES_OK stuck. */
const char *virtio_start(struct virtio_dev *d, uint64_t wanted);
/* Sets up queue `index` in one of the driver's static queue areas (`slot` < 8). */
const char *virtq_setup(struct virtio_dev *d, struct virtq *q, unsigned index, unsigned slot);
/* The same with up to `size` entries (a power of two <= VIRTQ_MAX_SIZE; less if QueueNumMax is). */
const char *virtq_setup_size(struct virtio_dev *d, struct virtq *q, unsigned index, unsigned slot, unsigned size);
void virtio_driver_ok(struct virtio_dev *d);
void virtio_reset(struct virtio_dev *d);

/* Reads device config space with the generation check of section 4.2.2.2. */
uint32_t virtio_config32(struct virtio_dev *d, uint32_t offset);
uint64_t virtio_config64(struct virtio_dev *d, uint32_t offset);

/* Puts the chain starting at descriptor `head` in the avail ring and notifies the device. */
void virtq_publish(struct virtio_dev *d, struct virtq *q, uint16_t head);

/* Batched use, for several chains in flight (the throughput scenarios): virtq_add_avail puts a
 * chain in the avail ring without notifying, virtq_kick makes the entries added so far visible
 * and notifies unless the device said VIRTQ_USED_F_NO_NOTIFY, virtq_poll_used takes one used
 * entry if there is one (no register access). */
void virtq_add_avail(struct virtq *q, uint16_t head);
void virtq_kick(struct virtio_dev *d, struct virtq *q);
int virtq_poll_used(struct virtq *q, uint32_t *id, uint32_t *len);

/* Outcome of waiting for a used entry. */
enum virtq_wait {
    VIRTQ_USED,        /* an entry came back: *id and *len are set */
    VIRTQ_NEEDS_RESET, /* the device set DEVICE_NEEDS_RESET (or FAILED) instead */
    VIRTQ_TIMEOUT,     /* nothing within the time limit */
    VIRTQ_WRONG_ID,    /* an entry came back for a chain that was not submitted */
};
const char *virtq_wait_name(enum virtq_wait w);
/* tsc_limit 0 means the default, long enough for any healthy device. */
enum virtq_wait virtq_wait(struct virtio_dev *d, struct virtq *q, uint64_t tsc_limit, uint32_t *id, uint32_t *len);

/* Builds a chain in descriptors 0..n-1 from (addr, len, flags) triples, publishes it and waits
 * for it to come back; *len is the used length. */
struct virtq_buf {
    const volatile void *addr;
    uint32_t len;
    uint16_t flags; /* VIRTQ_DESC_F_WRITE for device-writable buffers */
};
enum virtq_wait virtq_transfer(struct virtio_dev *d, struct virtq *q, const struct virtq_buf *bufs, unsigned n, uint32_t *len);

#endif
