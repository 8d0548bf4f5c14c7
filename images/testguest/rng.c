/* virtio-rng (device id 4): one queue of device-writable buffers the device fills. */
#include "scenario.h"
#include "virtio.h"

#define RNG_BYTES 64

int scenario_rng(struct result *r)
{
    static uint8_t buf[RNG_BYTES] ALIGNED(64);
    struct virtio_dev *d = virtio_find(VIRTIO_ID_RNG, 0);
    if (!d)
        return fail(r, "no virtio-rng device (id %u) among the %u virtio-mmio devices on the command line",
                    VIRTIO_ID_RNG, virtio_device_count);
    struct virtq q;
    const char *err = virtio_start(d, 0);
    if (!err)
        err = virtq_setup(d, &q, 0, 0);
    if (err)
        return fail(r, "init: %s", err);
    virtio_driver_ok(d);

    struct virtq_buf chain[] = {{buf, RNG_BYTES, VIRTQ_DESC_F_WRITE}};
    uint32_t len = 0;
    enum virtq_wait w = virtq_transfer(d, &q, chain, 1, &len);
    if (w != VIRTQ_USED)
        return fail(r, "request for %u bytes: %s", RNG_BYTES, virtq_wait_name(w));
    if (len != RNG_BYTES)
        return fail(r, "used length %u, want %u", len, RNG_BYTES);
    unsigned nonzero = 0;
    for (unsigned i = 0; i < RNG_BYTES; i++)
        nonzero += buf[i] != 0;
    if (!nonzero)
        return fail(r, "%u bytes, all zero", RNG_BYTES);
    return pass(r, "%u bytes (%u non-zero), first 8: %02x%02x%02x%02x%02x%02x%02x%02x", len, nonzero,
                buf[0], buf[1], buf[2], buf[3], buf[4], buf[5], buf[6], buf[7]);
}
