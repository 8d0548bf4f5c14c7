/* virtio-net (device id 1): queue 0 receives, queue 1 transmits, and every frame carries the
 * 12-byte virtio_net_hdr_v1 in front of it (virtio 1.1 section 5.1.6). No offloads are asked
 * for, so the header is all zero out and must come back zero (but num_buffers = 1) in. */
#include "scenario.h"
#include "virtio.h"

#define VIRTIO_NET_F_MAC (1ull << 5)
#define VIRTIO_NET_F_STATUS (1ull << 16)
#define VIRTIO_NET_S_LINK_UP 1

#define NET_HDR_LEN 12
#define ETH_HLEN 14
#define ETH_FRAME_MAX 1514
/* IEEE 802 "local experimental" EtherType: nothing else on the tap uses it. */
#define ETHERTYPE_TEST 0x88b5
/* The host answers once it has seen our frame; this bounds a host that never does (about
 * 30 s at 3 GHz). */
#define RX_WAIT_TSC 90000000000ull
/* Frames of other kinds skipped while waiting for the answer before giving up. */
#define MAX_OTHER_FRAMES 32

/* What agent/vmm/tests/net.rs looks for on the tap, and the start of what it answers with. */
static const char guest_payload[] = "fabric-testguest net: guest to host";
static const char host_prefix[] = "fabric-testguest net: host to guest";

static uint8_t tx_buf[NET_HDR_LEN + ETH_HLEN + 64] ALIGNED(64);
static uint8_t rx_buf[NET_HDR_LEN + ETH_FRAME_MAX] ALIGNED(64);

static void post_rx_buffer(struct virtio_dev *d, struct virtq *q)
{
    memset(rx_buf, 0xee, sizeof(rx_buf)); /* so a header the device did not write shows */
    q->desc[0].addr = (uint64_t)rx_buf;
    q->desc[0].len = sizeof(rx_buf);
    q->desc[0].flags = VIRTQ_DESC_F_WRITE;
    q->desc[0].next = 0;
    virtq_publish(d, q, 0);
}

static uint16_t le16(const uint8_t *p) { return (uint16_t)(p[0] | p[1] << 8); }

int scenario_net(struct result *r)
{
    struct virtio_dev *d = virtio_find(VIRTIO_ID_NET, 0);
    if (!d)
        return fail(r, "no virtio-net device (id %u) among the %u virtio-mmio devices on the command line",
                    VIRTIO_ID_NET, virtio_device_count);
    struct virtq rxq, txq;
    const char *err = virtio_start(d, VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS);
    if (!err && !(d->features & VIRTIO_NET_F_MAC))
        err = "device does not offer VIRTIO_NET_F_MAC";
    if (!err)
        err = virtq_setup(d, &rxq, 0, 0);
    if (!err)
        err = virtq_setup(d, &txq, 1, 1);
    if (err)
        return fail(r, "init: %s", err);
    uint8_t mac[6];
    for (unsigned i = 0; i < 6; i++)
        mac[i] = mmio_read8(d->base + VIRTIO_MMIO_CONFIG + i);
    uint16_t link = (uint16_t)(virtio_config32(d, 4) >> 16);
    virtio_driver_ok(d);
    note("mac %02x:%02x:%02x:%02x:%02x:%02x link %s", mac[0], mac[1], mac[2], mac[3], mac[4], mac[5],
         link & VIRTIO_NET_S_LINK_UP ? "up" : "down");
    if (!(link & VIRTIO_NET_S_LINK_UP))
        return fail(r, "link is down (status 0x%x)", link);

    /* A buffer for the answer before the frame that asks for it. */
    post_rx_buffer(d, &rxq);

    /* Out: a broadcast from our MAC with the known payload. */
    memset(tx_buf, 0, sizeof(tx_buf));
    uint8_t *eth = tx_buf + NET_HDR_LEN;
    memset(eth, 0xff, 6);
    memcpy(eth + 6, mac, 6);
    eth[12] = ETHERTYPE_TEST >> 8;
    eth[13] = ETHERTYPE_TEST & 0xff;
    memcpy(eth + ETH_HLEN, guest_payload, sizeof(guest_payload) - 1);
    uint32_t tx_len = NET_HDR_LEN + ETH_HLEN + sizeof(guest_payload) - 1;
    struct virtq_buf out[] = {{tx_buf, tx_len, 0}};
    uint32_t len = 0;
    enum virtq_wait w = virtq_transfer(d, &txq, out, 1, &len);
    if (w != VIRTQ_USED)
        return fail(r, "transmit: %s", virtq_wait_name(w));
    note("sent %u bytes: \"%s\"", tx_len - NET_HDR_LEN, guest_payload);

    /* In: frames until the answer (to our MAC, our EtherType). */
    for (unsigned others = 0; others <= MAX_OTHER_FRAMES; others++) {
        uint32_t id;
        w = virtq_wait(d, &rxq, RX_WAIT_TSC, &id, &len);
        if (w != VIRTQ_USED)
            return fail(r, "receive: %s (after %u other frames)", virtq_wait_name(w), others);
        if (id != 0)
            return fail(r, "receive: used entry for descriptor %u, only 0 was posted", id);
        if (len < NET_HDR_LEN + ETH_HLEN || len > sizeof(rx_buf))
            return fail(r, "receive: used length %u", len);
        const uint8_t *in = rx_buf + NET_HDR_LEN;
        uint16_t type = (uint16_t)(in[12] << 8 | in[13]);
        if (type != ETHERTYPE_TEST || memcmp(in, mac, 6)) {
            note("skipped a frame of %u bytes, type 0x%04x", len - NET_HDR_LEN, type);
            post_rx_buffer(d, &rxq);
            continue;
        }
        if (rx_buf[0] || rx_buf[1] || le16(rx_buf + 10) != 1)
            return fail(r, "receive: header flags 0x%x gso_type %u num_buffers %u (want 0, 0, 1)", rx_buf[0],
                        rx_buf[1], le16(rx_buf + 10));
        /* The payload as text, non-printable bytes as '.'. */
        char text[80];
        uint32_t n = len - NET_HDR_LEN - ETH_HLEN;
        n = n < sizeof(text) - 1 ? n : sizeof(text) - 1;
        for (uint32_t i = 0; i < n; i++) {
            uint8_t c = in[ETH_HLEN + i];
            text[i] = c >= 0x20 && c < 0x7f ? (char)c : '.';
        }
        text[n] = '\0';
        if (strncmp(text, host_prefix, sizeof(host_prefix) - 1))
            return fail(r, "receive: payload \"%s\" does not start with \"%s\"", text, host_prefix);
        return pass(r, "out %u bytes, in %u bytes from %02x:%02x:%02x:%02x:%02x:%02x: \"%s\"", tx_len - NET_HDR_LEN,
                    len - NET_HDR_LEN, in[6], in[7], in[8], in[9], in[10], in[11], text);
    }
    return fail(r, "receive: no answer among %u other frames", MAX_OTHER_FRAMES);
}
