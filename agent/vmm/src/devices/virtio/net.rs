//! virtio-net (virtio 1.x, section 5.1) over a frame backend ([`FrameIo`]): a tap in the VMM
//! ([`super::tap::Tap`]), a socket pair in unit tests. Queue 0 receives (RX), queue 1 transmits
//! (TX).
//!
//! Offered: `VIRTIO_NET_F_MAC` (the MAC in the configuration space) and `VIRTIO_NET_F_STATUS`
//! (the link is always up). No checksum or segmentation offloads: every frame either way is a
//! complete Ethernet frame, and the 12-byte virtio-net header in front of it carries nothing.
//! The device zeroes it in both directions (and sets `num_buffers` to 1 on RX), so no guest
//! value reaches the tap's offload handling and no host value reaches the guest's.
//!
//! TX: on a notification, each chain is checked, then its frame goes to the backend as a
//! [`TxFrame`]: the device's own zeroed header followed by the frame's bytes where the guest put
//! them, which the tap writes with one `writev` (no copy in the VMM). A chain with a device-writable
//! buffer, a buffer outside guest memory, or a length below header + Ethernet header or above
//! [`MAX_FRAME_LEN`] is refused: returned used, nothing sent, counted. The device goes on.
//!
//! RX: the event loop watches the backend's fd (edge-triggered). Frames are read until the
//! backend has none left or the guest has no buffer: the frame then waits in the device (one
//! at most) until the guest adds buffers and notifies queue 0, so the loop never blocks or
//! spins. A frame longer than the chain it would go into is dropped and counted, and the chain
//! stays available for the next frame. A malformed chain is returned used with length 0 and
//! the frame waits for the next chain. At most [`CHAINS_PER_TURN`] steps per turn; the rest is
//! resumed through the device's own eventfd so the other devices get their turn.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::{VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::queue::{
    check_in_memory, needs_interrupt, pieces, serve_queue, write_to_guest, Chain, ChainError,
    CHAINS_PER_TURN,
};
use super::{read_config_bytes, ActivateError, DeviceError, Interrupt, VirtioDevice};

/// The receive queue.
pub const RX_QUEUE: usize = 0;
/// The transmit queue.
pub const TX_QUEUE: usize = 1;
/// Entries in each queue.
pub const QUEUE_SIZE: u16 = 256;
/// `virtio_net_hdr_v1`: flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers.
pub const VNET_HDR_LEN: usize = 12;
/// Destination and source MAC and EtherType.
pub const ETH_HLEN: usize = 14;
/// The longest frame accepted either way, virtio-net header included: room for a 64 KiB
/// packet, the bound Firecracker uses. Without offloads real frames are at most MTU + 26 bytes.
pub const MAX_FRAME_LEN: usize = 65562;
/// The shortest: a header and an Ethernet header.
pub const MIN_FRAME_LEN: usize = VNET_HDR_LEN + ETH_HLEN;
/// MAC (6 bytes) and status (le16).
const CONFIG_LEN: usize = 8;
/// After this many warnings about refused chains, further ones go to debug level.
const REFUSAL_WARNINGS: u32 = 32;

/// Where the device's frames go and come from. Each call moves one whole frame with its
/// 12-byte virtio-net header in front; neither call may block.
pub trait FrameIo: Send {
    /// Sends one frame.
    fn send(&mut self, frame: &TxFrame<'_>) -> std::io::Result<()>;
    /// Receives one frame into `buf`, returning its length (a frame longer than `buf` is cut
    /// to `buf.len()`); `WouldBlock` when none is waiting.
    fn recv(&mut self, buf: &mut [u8]) -> std::io::Result<usize>;
    /// The fd that becomes readable when a frame is waiting.
    fn raw_fd(&self) -> RawFd;
}

/// The header the device sends in front of every frame: no offloads asked for.
static TX_HEADER: [u8; VNET_HDR_LEN] = [0; VNET_HDR_LEN];

/// A frame on its way out: [`TX_HEADER`], then the frame's bytes in guest memory (checked to
/// lie in guest RAM). Valid for the [`FrameIo::send`] call it is given to.
pub struct TxFrame<'a> {
    mem: &'a GuestMemoryMmap,
    /// The frame after the header, as guest ranges.
    body: &'a [(GuestAddress, usize)],
    /// The header and the body as host addresses, for one gathering write.
    iovecs: &'a [libc::iovec],
    len: usize,
}

impl TxFrame<'_> {
    /// Bytes, header included.
    pub fn len_with_header(&self) -> usize {
        self.len
    }

    /// Header and body as host (`iovec`) ranges, for `writev`/`sendmsg`. The guest may change
    /// the body's bytes while they are read; what it then sends is its own business.
    pub fn iovecs(&self) -> &[libc::iovec] {
        self.iovecs
    }

    /// The whole frame copied out, for backends that want bytes.
    pub fn to_vec(&self) -> std::io::Result<Vec<u8>> {
        let mut out = vec![0u8; self.len];
        let mut done = VNET_HDR_LEN;
        for &(addr, len) in self.body {
            self.mem
                .read_slice(&mut out[done..done + len], addr)
                .map_err(std::io::Error::other)?;
            done += len;
        }
        Ok(out)
    }
}

/// What the device did, for logs and tests. Shared with whoever created the device.
#[derive(Debug, Default)]
pub struct NetCounters {
    pub tx_frames: AtomicU64,
    pub tx_bytes: AtomicU64,
    /// TX chains refused (malformed, wrong direction, outside memory, too short or too long).
    pub tx_refused: AtomicU64,
    /// Frames the backend would not take.
    pub tx_errors: AtomicU64,
    pub rx_frames: AtomicU64,
    pub rx_bytes: AtomicU64,
    /// Frames dropped: longer than the guest's chain, or not a frame (too short or too long).
    pub rx_dropped: AtomicU64,
    /// RX chains refused (malformed, wrong direction, outside memory).
    pub rx_refused: AtomicU64,
}

/// A copy of [`NetCounters`] at one moment.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NetStats {
    pub tx_frames: u64,
    pub tx_bytes: u64,
    pub tx_refused: u64,
    pub tx_errors: u64,
    pub rx_frames: u64,
    pub rx_bytes: u64,
    pub rx_dropped: u64,
    pub rx_refused: u64,
}

impl NetCounters {
    pub fn snapshot(&self) -> NetStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        NetStats {
            tx_frames: get(&self.tx_frames),
            tx_bytes: get(&self.tx_bytes),
            tx_refused: get(&self.tx_refused),
            tx_errors: get(&self.tx_errors),
            rx_frames: get(&self.rx_frames),
            rx_bytes: get(&self.rx_bytes),
            rx_dropped: get(&self.rx_dropped),
            rx_refused: get(&self.rx_refused),
        }
    }
}

fn bump(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::Relaxed);
}

/// A locally administered unicast MAC derived from the tap's name (FNV-1a), so a VM keeps its
/// MAC across restarts on the same tap.
pub fn derived_mac(tap: &str) -> [u8; 6] {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in tap.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    let h = hash.to_be_bytes();
    [0x02, h[0], h[1], h[2], h[3], h[4]]
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let part = parts.next()?;
        if part.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

struct Active {
    mem: GuestMemoryMmap,
    rx: Queue,
    tx: Queue,
    interrupt: Interrupt,
}

/// Warnings about a misbehaving guest, bounded so it cannot flood the VMM's log.
struct RefusalLog {
    left: u32,
}

impl RefusalLog {
    fn refused(&mut self, queue: &'static str, reason: &dyn std::fmt::Display) {
        if self.left > 0 {
            self.left -= 1;
            tracing::warn!(queue, %reason, "virtio-net: chain refused");
        } else {
            tracing::debug!(queue, %reason, "virtio-net: chain refused");
        }
    }
}

/// A virtio network device.
pub struct Net {
    io: Box<dyn FrameIo>,
    mac: [u8; 6],
    config: [u8; CONFIG_LEN],
    /// Signalled to resume RX on the next turn of the event loop.
    rx_retry: EventFd,
    active: Option<Active>,
    /// Frame buffers; one byte longer than [`MAX_FRAME_LEN`] to tell a cut frame.
    rx_frame: Vec<u8>,
    /// Length of the frame in `rx_frame` that waits for a guest buffer.
    rx_pending: Option<usize>,
    counters: Arc<NetCounters>,
    log: RefusalLog,
}

impl Net {
    pub fn new(io: Box<dyn FrameIo>, mac: [u8; 6]) -> std::io::Result<Net> {
        let mut config = [0u8; CONFIG_LEN];
        config[..6].copy_from_slice(&mac);
        config[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        Ok(Net {
            io,
            mac,
            config,
            rx_retry: EventFd::new(libc::EFD_NONBLOCK)?,
            active: None,
            rx_frame: vec![0; MAX_FRAME_LEN + 1],
            rx_pending: None,
            counters: Arc::new(NetCounters::default()),
            log: RefusalLog {
                left: REFUSAL_WARNINGS,
            },
        })
    }

    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// The device's counters, live.
    pub fn counters(&self) -> Arc<NetCounters> {
        self.counters.clone()
    }

    /// Sends what the guest made available on the TX queue.
    fn transmit(&mut self) -> Result<bool, DeviceError> {
        let Some(active) = self.active.as_mut() else {
            return Err(DeviceError::NoSuchQueue(TX_QUEUE));
        };
        let mem = &active.mem;
        let (io, counters, log) = (&mut self.io, &self.counters, &mut self.log);
        let (mut body, mut iovecs) = (Vec::new(), Vec::new());
        let served = serve_queue(&mut active.tx, mem, |chain| {
            match tx_frame(mem, chain, &mut body, &mut iovecs) {
                Ok(frame) => match io.send(&frame) {
                    Ok(()) => {
                        bump(&counters.tx_frames, 1);
                        let len = frame.len_with_header() - VNET_HDR_LEN;
                        bump(&counters.tx_bytes, len as u64);
                    }
                    Err(error) => {
                        bump(&counters.tx_errors, 1);
                        tracing::debug!(%error, "virtio-net: the backend did not take a frame");
                    }
                },
                Err(reason) => {
                    bump(&counters.tx_refused, 1);
                    log.refused("tx", &reason);
                }
            }
            // The device writes nothing into TX buffers.
            0
        })
        .map_err(|source| DeviceError::Queue {
            queue: TX_QUEUE,
            source,
        })?;
        if served.interrupt {
            active.interrupt.signal_used_queue();
        }
        Ok(served.more)
    }

    /// Moves frames from the backend into the guest's RX buffers until one of them runs out.
    fn receive(&mut self) -> Result<(), DeviceError> {
        let Some(active) = self.active.as_mut() else {
            return Ok(());
        };
        let queue_err = |source| DeviceError::Queue {
            queue: RX_QUEUE,
            source,
        };
        let mem = &active.mem;
        let mut returned = 0usize;
        let mut steps = 0usize;
        let result = loop {
            if steps >= CHAINS_PER_TURN {
                if let Err(error) = self.rx_retry.write(1) {
                    tracing::error!(%error, "virtio-net: cannot re-signal RX");
                }
                break Ok(());
            }
            steps += 1;
            let len = match self.rx_pending {
                Some(len) => len,
                None => match self.io.recv(&mut self.rx_frame) {
                    Ok(len) if (MIN_FRAME_LEN..=MAX_FRAME_LEN).contains(&len) => {
                        // No offloads: the guest gets a header that says nothing.
                        self.rx_frame[..VNET_HDR_LEN].fill(0);
                        self.rx_frame[VNET_HDR_LEN - 2..VNET_HDR_LEN]
                            .copy_from_slice(&1u16.to_le_bytes());
                        self.rx_pending = Some(len);
                        len
                    }
                    Ok(len) => {
                        bump(&self.counters.rx_dropped, 1);
                        tracing::debug!(
                            len,
                            "virtio-net: backend gave a runt or oversized frame; dropped"
                        );
                        continue;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break Ok(()),
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(error) => {
                        tracing::warn!(%error, "virtio-net: reading the backend failed");
                        break Ok(());
                    }
                },
            };
            let chain = match active.rx.iter(mem) {
                Ok(mut chains) => chains.next(),
                Err(source) => break Err(queue_err(source)),
            };
            let Some(chain) = chain else {
                // No buffer: the frame waits. Notifications are on, so the guest's next
                // refill notifies queue 0; look once more in case it refilled just now.
                match active.rx.enable_notification(mem) {
                    Ok(true) => continue,
                    Ok(false) => break Ok(()),
                    Err(source) => break Err(queue_err(source)),
                }
            };
            let head = chain.head_index();
            if head >= active.rx.size() {
                tracing::warn!(
                    head,
                    "RX available ring names a descriptor past the table; skipped"
                );
                continue;
            }
            let used_len = match check_rx_chain(mem, Chain::parse(chain)) {
                Err(reason) => {
                    bump(&self.counters.rx_refused, 1);
                    self.log.refused("rx", &reason);
                    0
                }
                Ok(chain) if chain.writable_len() < len as u64 => {
                    // Too small for this frame: the frame goes, the chain stays for the next.
                    active.rx.go_to_previous_position();
                    self.rx_pending = None;
                    bump(&self.counters.rx_dropped, 1);
                    tracing::debug!(
                        len,
                        room = chain.writable_len(),
                        "virtio-net: frame longer than the guest's RX buffer; dropped"
                    );
                    continue;
                }
                Ok(chain) => match write_to_guest(mem, &chain.writable, 0, &self.rx_frame[..len]) {
                    Ok(()) => {
                        self.rx_pending = None;
                        bump(&self.counters.rx_frames, 1);
                        bump(&self.counters.rx_bytes, (len - VNET_HDR_LEN) as u64);
                        len as u32
                    }
                    Err(reason) => {
                        bump(&self.counters.rx_refused, 1);
                        self.log.refused("rx", &reason);
                        0
                    }
                },
            };
            if let Err(source) = active.rx.add_used(mem, head, used_len) {
                break Err(queue_err(source));
            }
            returned += 1;
        };
        if returned > 0 && needs_interrupt(&mut active.rx, mem).map_err(queue_err)? {
            active.interrupt.signal_used_queue();
        }
        result
    }
}

/// Checks a TX chain and describes its frame, behind the device's own header: `body` and
/// `iovecs` are the caller's scratch space, reused from frame to frame.
fn tx_frame<'a>(
    mem: &'a GuestMemoryMmap,
    chain: Result<Chain, ChainError>,
    body: &'a mut Vec<(GuestAddress, usize)>,
    iovecs: &'a mut Vec<libc::iovec>,
) -> Result<TxFrame<'a>, String> {
    let chain = chain.map_err(|e| e.to_string())?;
    if !chain.writable.is_empty() {
        return Err("TX chain with a device-writable buffer".into());
    }
    let len = chain.readable_len();
    if len < MIN_FRAME_LEN as u64 || len > MAX_FRAME_LEN as u64 {
        return Err(format!(
            "TX frame of {len} bytes with its header (want {MIN_FRAME_LEN}..={MAX_FRAME_LEN})"
        ));
    }
    let len = len as usize;
    check_in_memory(mem, &chain.readable).map_err(|e| e.to_string())?;
    *body = pieces(
        &chain.readable,
        VNET_HDR_LEN as u64,
        (len - VNET_HDR_LEN) as u64,
    );
    iovecs.clear();
    iovecs.push(libc::iovec {
        iov_base: TX_HEADER.as_ptr().cast_mut().cast(),
        iov_len: VNET_HDR_LEN,
    });
    for &(addr, piece_len) in body.iter() {
        for slice in mem.get_slices(addr, piece_len) {
            let slice = slice.map_err(|e| e.to_string())?;
            iovecs.push(libc::iovec {
                iov_base: slice.ptr_guard().as_ptr().cast_mut().cast(),
                iov_len: slice.len(),
            });
        }
    }
    Ok(TxFrame {
        mem,
        body,
        iovecs,
        len,
    })
}

/// An RX chain must be device-writable only, and inside guest memory.
fn check_rx_chain(
    mem: &GuestMemoryMmap,
    chain: Result<Chain, ChainError>,
) -> Result<Chain, String> {
    let chain = chain.map_err(|e| e.to_string())?;
    if !chain.readable.is_empty() {
        return Err("RX chain with a device-readable buffer".into());
    }
    check_in_memory(mem, &chain.writable).map_err(|e| e.to_string())?;
    Ok(chain)
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn name(&self) -> &'static str {
        "virtio-net"
    }

    fn features(&self) -> u64 {
        (1 << VIRTIO_NET_F_MAC) | (1 << VIRTIO_NET_F_STATUS)
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn config_len(&self) -> u64 {
        CONFIG_LEN as u64
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: Interrupt,
        _acked_features: u64,
    ) -> Result<(), ActivateError> {
        let Ok([rx, tx]) = <[Queue; 2]>::try_from(queues) else {
            return Err(ActivateError::QueueCount(self.queue_max_sizes().len(), 2));
        };
        for (index, queue) in [(RX_QUEUE, &rx), (TX_QUEUE, &tx)] {
            if !queue.ready() {
                return Err(ActivateError::QueueNotReady(index));
            }
        }
        self.active = Some(Active {
            mem,
            rx,
            tx,
            interrupt,
        });
        // Frames that reached the tap while the device was down flow once the guest has
        // buffers: look at once.
        if let Err(error) = self.rx_retry.write(1) {
            tracing::error!(%error, "virtio-net: cannot signal RX");
        }
        Ok(())
    }

    fn queue_notified(&mut self, index: usize) -> Result<bool, DeviceError> {
        match index {
            RX_QUEUE if self.active.is_some() => self.receive().map(|()| false),
            TX_QUEUE if self.active.is_some() => self.transmit(),
            _ => Err(DeviceError::NoSuchQueue(index)),
        }
    }

    fn reset(&mut self) {
        self.active = None;
        if self.rx_pending.take().is_some() {
            bump(&self.counters.rx_dropped, 1);
        }
        let _ = self.rx_retry.read();
    }

    fn event_fds(&self) -> Vec<RawFd> {
        vec![self.io.raw_fd(), self.rx_retry.as_raw_fd()]
    }

    fn handle_fd_event(&mut self, fd: RawFd) -> Result<(), DeviceError> {
        if fd == self.rx_retry.as_raw_fd() {
            let _ = self.rx_retry.read();
        }
        self.receive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_driver::{TestDriver, DATA_AREA, R, W};
    use crate::devices::EventSubscriber;
    use std::os::unix::net::UnixDatagram;
    use virtio_bindings::virtio_config::VIRTIO_CONFIG_S_NEEDS_RESET;
    use vm_memory::{Bytes, GuestAddress};

    /// The test backend: one end of a datagram socket pair, which keeps frame boundaries
    /// like a tap does.
    impl FrameIo for UnixDatagram {
        /// One `sendmsg` of the frame's iovecs, as the tap's one `writev` (raw for the same
        /// reason: the iovecs go to the kernel as they are).
        fn send(&mut self, frame: &TxFrame<'_>) -> std::io::Result<()> {
            let iovecs = frame.iovecs();
            // SAFETY: an all-zero msghdr is valid (no name, no control data).
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_iov = iovecs.as_ptr().cast_mut();
            msg.msg_iovlen = iovecs.len();
            // SAFETY: the iovecs point into guest memory and the header, valid for this call;
            // sendmsg only reads them.
            let sent = unsafe { libc::sendmsg(self.as_raw_fd(), &msg, 0) };
            if sent < 0 {
                return Err(std::io::Error::last_os_error());
            }
            assert_eq!(sent as usize, frame.len_with_header(), "short send");
            assert_eq!(frame.to_vec()?.len(), frame.len_with_header());
            Ok(())
        }
        fn recv(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            UnixDatagram::recv(self, buf)
        }
        fn raw_fd(&self) -> RawFd {
            self.as_raw_fd()
        }
    }

    /// One buffer of a chain: address, length, R or W.
    type Desc = (u64, u32, u16);

    const MAC: [u8; 6] = [0x02, 0x11, 0x22, 0x33, 0x44, 0x55];
    const TX_BUF: u64 = DATA_AREA;
    const RX_BUF: u64 = DATA_AREA + 0x20000;

    struct Fixture {
        d: TestDriver,
        /// The host's end: what the device sends arrives here, what is sent here reaches it.
        host: UnixDatagram,
        counters: Arc<NetCounters>,
        backend_fd: RawFd,
        tx_done: u16,
        rx_done: u16,
    }

    fn fixture() -> Fixture {
        let (device_end, host) = UnixDatagram::pair().expect("socketpair");
        device_end.set_nonblocking(true).expect("nonblocking");
        host.set_nonblocking(true).expect("nonblocking");
        let backend_fd = device_end.as_raw_fd();
        let net = Net::new(Box::new(device_end), MAC).expect("net");
        let counters = net.counters();
        Fixture {
            d: TestDriver::running(Box::new(net)),
            host,
            counters,
            backend_fd,
            tx_done: 0,
            rx_done: 0,
        }
    }

    /// A frame with its virtio-net header: to `dst`, from MAC, EtherType 0x88b5, `payload`.
    fn frame(header: [u8; VNET_HDR_LEN], payload: &[u8]) -> Vec<u8> {
        let mut f = header.to_vec();
        f.extend_from_slice(&[0xff; 6]);
        f.extend_from_slice(&MAC);
        f.extend_from_slice(&[0x88, 0xb5]);
        f.extend_from_slice(payload);
        f
    }

    impl Fixture {
        fn stats(&self) -> NetStats {
            self.counters.snapshot()
        }

        /// What the host end received, if anything.
        fn host_recv(&self) -> Option<Vec<u8>> {
            let mut buf = vec![0u8; MAX_FRAME_LEN + 100];
            match self.host.recv(&mut buf) {
                Ok(n) => Some(buf[..n].to_vec()),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => None,
                Err(e) => panic!("host recv: {e}"),
            }
        }

        /// Submits a TX chain; asserts it came back used with length 0.
        fn transmit(&mut self, buffers: &[(u64, u32, u16)]) {
            let head = self.d.add_chain(TX_QUEUE, buffers);
            self.d.notify(TX_QUEUE);
            assert_eq!(
                self.d.used_idx(TX_QUEUE),
                self.tx_done + 1,
                "TX chain returned"
            );
            assert_eq!(self.d.used(TX_QUEUE, self.tx_done), (u32::from(head), 0));
            self.tx_done += 1;
        }

        /// A good frame out: the device still transmits.
        fn assert_transmits(&mut self) {
            let f = frame([0; VNET_HDR_LEN], b"still serving");
            self.d
                .mem
                .write_slice(&f, GuestAddress(TX_BUF))
                .expect("frame");
            self.transmit(&[(TX_BUF, f.len() as u32, R)]);
            assert_eq!(self.host_recv().as_deref(), Some(&f[..]));
        }

        /// The backend fd became readable: what the event loop would do.
        fn backend_readable(&mut self) {
            self.d.transport.handle_event(self.backend_fd);
        }

        /// Posts an RX chain without notifying; returns its head.
        fn post_rx(&mut self, buffers: &[(u64, u32, u16)]) -> u16 {
            self.d.add_chain(RX_QUEUE, buffers)
        }

        /// The next RX used entry, which must exist.
        fn rx_used(&mut self) -> (u32, u32) {
            assert!(
                self.d.used_idx(RX_QUEUE) > self.rx_done,
                "no RX chain returned"
            );
            let used = self.d.used(RX_QUEUE, self.rx_done);
            self.rx_done += 1;
            used
        }

        /// A good frame in: the device still receives.
        fn assert_receives(&mut self) {
            let f = frame([0; VNET_HDR_LEN], b"inbound still works");
            self.post_rx(&[(RX_BUF, 2048, W)]);
            self.host.send(&f).expect("host send");
            self.d.notify(RX_QUEUE);
            let (_, len) = self.rx_used();
            assert_eq!(len as usize, f.len());
            let mut got = vec![0u8; f.len()];
            self.d
                .mem
                .read_slice(&mut got, GuestAddress(RX_BUF))
                .expect("read");
            assert_eq!(got[VNET_HDR_LEN..], f[VNET_HDR_LEN..]);
        }
    }

    #[test]
    fn config_space_has_the_mac_and_link_up_and_macs_parse() {
        let mut f = fixture();
        let mac: Vec<u8> = (0..6).flat_map(|i| f.d.read_config(i, 1)).collect();
        assert_eq!(mac, MAC);
        assert_eq!(f.d.read_config(6, 2), [1, 0]);
        assert_eq!(parse_mac("02:11:22:33:44:55"), Some(MAC));
        assert_eq!(format_mac(&MAC), "02:11:22:33:44:55");
        for bad in [
            "02:11:22:33:44",
            "02:11:22:33:44:55:66",
            "0211:22:33:44:55",
            "zz:11:22:33:44:55",
        ] {
            assert_eq!(parse_mac(bad), None, "{bad}");
        }
        let derived = derived_mac("tap0");
        assert_eq!(derived[0], 0x02, "locally administered unicast");
        assert_eq!(derived, derived_mac("tap0"));
        assert_ne!(derived, derived_mac("tap1"));
    }

    #[test]
    fn a_frame_crosses_both_ways_with_a_clean_header() {
        let mut f = fixture();
        // TX: header and frame in two buffers, the guest's header flags ignored.
        let mut out = frame([0; VNET_HDR_LEN], b"guest to host");
        out[0] = 1; // NEEDS_CSUM, not negotiated
        out[1] = 4; // GSO_TCPV6, not negotiated
        f.d.mem
            .write_slice(&out[..VNET_HDR_LEN], GuestAddress(TX_BUF))
            .expect("hdr");
        f.d.mem
            .write_slice(&out[VNET_HDR_LEN..], GuestAddress(TX_BUF + 0x1000))
            .expect("frame");
        f.transmit(&[
            (TX_BUF, VNET_HDR_LEN as u32, R),
            (TX_BUF + 0x1000, (out.len() - VNET_HDR_LEN) as u32, R),
        ]);
        let sent = f.host_recv().expect("a frame reached the backend");
        assert_eq!(sent[..VNET_HDR_LEN], [0; VNET_HDR_LEN]);
        assert_eq!(sent[VNET_HDR_LEN..], out[VNET_HDR_LEN..]);
        assert_eq!(f.d.take_interrupt() & 1, 1);

        // RX: a frame from the host with a header the guest must not see.
        let mut inbound = frame([0; VNET_HDR_LEN], b"host to guest");
        inbound[0] = 2; // DATA_VALID, not negotiated
        let head = f.post_rx(&[(RX_BUF, 20, W), (RX_BUF + 0x1000, 1600, W)]);
        f.d.notify(RX_QUEUE);
        assert_eq!(f.d.used_idx(RX_QUEUE), 0, "nothing to receive yet");
        f.host.send(&inbound).expect("host send");
        f.backend_readable();
        assert_eq!(f.rx_used(), (u32::from(head), inbound.len() as u32));
        let mut got = vec![0u8; inbound.len()];
        f.d.mem
            .read_slice(&mut got[..20], GuestAddress(RX_BUF))
            .expect("read");
        f.d.mem
            .read_slice(&mut got[20..], GuestAddress(RX_BUF + 0x1000))
            .expect("read");
        let mut want_header = [0u8; VNET_HDR_LEN];
        want_header[10] = 1; // num_buffers
        assert_eq!(got[..VNET_HDR_LEN], want_header);
        assert_eq!(got[VNET_HDR_LEN..], inbound[VNET_HDR_LEN..]);
        assert_eq!(f.d.take_interrupt() & 1, 1);
        let stats = f.stats();
        assert_eq!((stats.tx_frames, stats.rx_frames), (1, 1));
        assert_eq!(stats.rx_bytes, (inbound.len() - VNET_HDR_LEN) as u64);
    }

    #[test]
    fn tx_frames_arrive_whole_however_the_guest_splits_them() {
        let mut f = fixture();
        let mut out = frame([0xaa; VNET_HDR_LEN], &[0x5a; 1000]);
        out[VNET_HDR_LEN + ETH_HLEN..]
            .iter_mut()
            .enumerate()
            .for_each(|(i, b)| *b = i as u8);
        let layouts: [&[u32]; 3] = [
            &[out.len() as u32],   // header and frame in one buffer
            &[5, 30, 1, 900, 90],  // cut inside the header and inside the Ethernet header
            &[12, 14, 0, 1000, 0], // empty buffers in between
        ];
        for (n, layout) in layouts.iter().enumerate() {
            let mut at = 0usize;
            let mut chain = Vec::new();
            for (i, &len) in layout.iter().enumerate() {
                let addr = TX_BUF + 0x1000 * i as u64;
                let len = len as usize;
                f.d.mem
                    .write_slice(&out[at..at + len], GuestAddress(addr))
                    .expect("write");
                chain.push((addr, len as u32, R));
                at += len;
            }
            assert_eq!(at, out.len(), "layout {n} covers the frame");
            f.transmit(&chain);
            let sent = f.host_recv().expect("a frame reached the backend");
            assert_eq!(sent.len(), out.len(), "layout {n}");
            assert_eq!(sent[..VNET_HDR_LEN], [0; VNET_HDR_LEN], "layout {n}");
            assert_eq!(sent[VNET_HDR_LEN..], out[VNET_HDR_LEN..], "layout {n}");
        }
        assert_eq!(f.stats().tx_bytes, 3 * (out.len() - VNET_HDR_LEN) as u64);
    }

    #[test]
    fn frames_wait_for_guest_buffers_and_flow_on_the_rx_notify() {
        let mut f = fixture();
        let frames: Vec<Vec<u8>> = (0..3u8)
            .map(|i| frame([0; VNET_HDR_LEN], &[i; 60]))
            .collect();
        for fr in &frames {
            f.host.send(fr).expect("host send");
        }
        // No buffers: nothing happens, nothing is lost, nothing blocks.
        f.backend_readable();
        assert_eq!(f.d.used_idx(RX_QUEUE), 0);
        assert_eq!(f.stats().rx_dropped, 0);
        // Two buffers: two frames; the third waits.
        f.post_rx(&[(RX_BUF, 2048, W)]);
        f.post_rx(&[(RX_BUF + 0x1000, 2048, W)]);
        f.d.notify(RX_QUEUE);
        assert_eq!(f.d.used_idx(RX_QUEUE), 2);
        for (i, buf) in [(0u8, RX_BUF), (1, RX_BUF + 0x1000)] {
            let mut payload = [0u8; 60];
            f.d.mem
                .read_slice(
                    &mut payload,
                    GuestAddress(buf + (VNET_HDR_LEN + ETH_HLEN) as u64),
                )
                .expect("read");
            assert_eq!(payload, [i; 60], "frames arrive in order");
        }
        f.rx_done = 2;
        f.post_rx(&[(RX_BUF, 2048, W)]);
        f.d.notify(RX_QUEUE);
        assert_eq!(f.rx_used().1 as usize, frames[2].len());
        assert_eq!(f.stats().rx_frames, 3);
    }

    #[test]
    fn malformed_tx_chains_are_refused_and_the_device_keeps_sending() {
        let mut f = fixture();
        let end = f.d.mem_size();
        let good = frame([0; VNET_HDR_LEN], b"x");
        f.d.mem
            .write_slice(&good, GuestAddress(TX_BUF))
            .expect("frame");
        let len = good.len() as u32;
        let cases: Vec<(&str, Vec<Desc>)> = vec![
            ("outside memory", vec![(end - 8, len, R)]),
            ("far outside", vec![(1 << 40, len, R)]),
            ("address wraps", vec![(u64::MAX - 8, len, R)]),
            ("MMIO gap", vec![(0xd000_0000, len, R)]),
            ("device-writable buffer", vec![(TX_BUF, len, W)]),
            (
                "writable after readable",
                vec![(TX_BUF, len, R), (TX_BUF + 0x1000, 64, W)],
            ),
            ("shorter than a header", vec![(TX_BUF, 8, R)]),
            (
                "header without a frame",
                vec![(TX_BUF, VNET_HDR_LEN as u32, R)],
            ),
            (
                "oversize",
                vec![(TX_BUF, 0x8000, R), (TX_BUF + 0x8000, 0x8100, R)],
            ),
            (
                "huge lengths",
                vec![(TX_BUF, u32::MAX, R), (TX_BUF, u32::MAX, R)],
            ),
        ];
        for (n, (what, buffers)) in cases.iter().enumerate() {
            f.transmit(buffers);
            assert_eq!(f.host_recv(), None, "{what}: nothing may be sent");
            assert_eq!(f.stats().tx_refused, n as u64 + 1, "{what}");
        }
        f.assert_transmits();
        assert_eq!(f.stats().tx_frames, 1);
    }

    #[test]
    fn tx_loops_and_dangling_links_are_returned_without_sending() {
        let mut f = fixture();
        // 0 -> 1 -> 0 -> ...
        f.d.write_desc(TX_QUEUE, 0, TX_BUF, 64, R | 1, 1);
        f.d.write_desc(TX_QUEUE, 1, TX_BUF + 64, 64, R | 1, 0);
        f.d.push_avail(TX_QUEUE, 0);
        f.d.notify(TX_QUEUE);
        assert_eq!(f.d.used(TX_QUEUE, 0), (0, 0));
        // A link past the table.
        f.d.write_desc(TX_QUEUE, 2, TX_BUF, 64, R | 1, 999);
        f.d.push_avail(TX_QUEUE, 2);
        f.d.notify(TX_QUEUE);
        assert_eq!(f.d.used(TX_QUEUE, 1), (2, 0));
        // A head past the table: skipped.
        f.d.push_avail(TX_QUEUE, 300);
        f.d.notify(TX_QUEUE);
        assert_eq!(f.d.used_idx(TX_QUEUE), 2);
        assert_eq!(f.host_recv(), None);
        assert_eq!(f.stats().tx_refused, 2);
        // The driver's own bookkeeping starts again at descriptor 0 of a fresh chain.
        let good = frame([0; VNET_HDR_LEN], b"after the loop");
        f.d.mem
            .write_slice(&good, GuestAddress(TX_BUF))
            .expect("frame");
        f.d.write_desc(TX_QUEUE, 3, TX_BUF, good.len() as u32, R, 0);
        f.d.push_avail(TX_QUEUE, 3);
        f.d.notify(TX_QUEUE);
        assert_eq!(f.d.used(TX_QUEUE, 2), (3, 0));
        assert_eq!(f.host_recv().as_deref(), Some(&good[..]));
    }

    #[test]
    fn malformed_rx_chains_are_returned_empty_and_the_frame_waits_for_a_good_one() {
        let mut f = fixture();
        let end = f.d.mem_size();
        let inbound = frame([0; VNET_HDR_LEN], b"patient frame");
        f.host.send(&inbound).expect("host send");
        let cases: Vec<(&str, Vec<Desc>)> = vec![
            ("device-readable", vec![(RX_BUF, 2048, R)]),
            (
                "readable after writable",
                vec![(RX_BUF, 1024, W), (RX_BUF + 1024, 1024, R)],
            ),
            ("outside memory", vec![(end - 100, 2048, W)]),
            ("address wraps", vec![(u64::MAX - 100, 2048, W)]),
            ("MMIO gap", vec![(0xd000_0000, 2048, W)]),
        ];
        for (n, (what, buffers)) in cases.iter().enumerate() {
            let head = f.post_rx(buffers);
            f.d.notify(RX_QUEUE);
            assert_eq!(f.rx_used(), (u32::from(head), 0), "{what}");
            assert_eq!(f.stats().rx_refused, n as u64 + 1, "{what}");
        }
        assert_eq!(f.stats().rx_frames, 0);
        // The frame was not lost to the bad chains.
        let head = f.post_rx(&[(RX_BUF, 2048, W)]);
        f.d.notify(RX_QUEUE);
        assert_eq!(f.rx_used(), (u32::from(head), inbound.len() as u32));
        f.assert_receives();
    }

    #[test]
    fn rx_loops_are_returned_empty() {
        let mut f = fixture();
        f.host.send(&frame([0; VNET_HDR_LEN], b"x")).expect("send");
        f.d.write_desc(RX_QUEUE, 0, RX_BUF, 16, W | 1, 1);
        f.d.write_desc(RX_QUEUE, 1, RX_BUF + 16, 16, W | 1, 0);
        f.d.push_avail(RX_QUEUE, 0);
        f.d.notify(RX_QUEUE);
        assert_eq!(f.d.used(RX_QUEUE, 0), (0, 0));
        f.d.write_desc(RX_QUEUE, 2, RX_BUF, 2048, W, 0);
        f.d.push_avail(RX_QUEUE, 2);
        f.d.notify(RX_QUEUE);
        assert_eq!(f.d.used(RX_QUEUE, 1).0, 2);
        assert_eq!(f.stats().rx_frames, 1);
    }

    #[test]
    fn frames_too_big_for_the_buffer_are_dropped_and_the_buffer_kept() {
        let mut f = fixture();
        let big = frame([0; VNET_HDR_LEN], &[7; 1500]);
        let small = frame([0; VNET_HDR_LEN], &[8; 40]);
        f.host.send(&big).expect("send");
        f.host.send(&small).expect("send");
        let head = f.post_rx(&[(RX_BUF, 256, W)]);
        f.d.notify(RX_QUEUE);
        // The big frame is dropped; the small one lands in the same chain.
        assert_eq!(f.rx_used(), (u32::from(head), small.len() as u32));
        assert_eq!(f.d.used_idx(RX_QUEUE), 1);
        let stats = f.stats();
        assert_eq!((stats.rx_dropped, stats.rx_frames), (1, 1));
        // Frames the backend cuts (longer than MAX_FRAME_LEN) and runts are dropped too.
        f.host
            .send(&vec![0u8; MAX_FRAME_LEN + 10])
            .expect("send oversize");
        f.host.send(&[0u8; 10]).expect("send runt");
        f.backend_readable();
        assert_eq!(f.stats().rx_dropped, 3);
        f.assert_receives();
    }

    #[test]
    fn an_avail_index_far_ahead_breaks_only_until_reset() {
        let mut f = fixture();
        f.host.send(&frame([0; VNET_HDR_LEN], b"x")).expect("send");
        f.d.set_avail_idx(RX_QUEUE, 1000);
        f.d.notify(RX_QUEUE);
        assert_ne!(f.d.status() & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
        assert_eq!(f.d.take_interrupt() & 2, 2);
        // A broken device ignores its tap until it is reset.
        f.backend_readable();
        assert_eq!(f.d.used_idx(RX_QUEUE), 0);
        f.d.write_reg(0x70, 0);
        f.d.init();
        f.d.setup_queue(0, QUEUE_SIZE);
        f.d.setup_queue(1, QUEUE_SIZE);
        f.d.driver_ok();
        f.tx_done = 0;
        f.rx_done = 0;
        f.assert_transmits();
        // The frame that waited for a buffer went with the reset.
        assert_eq!(f.stats().rx_dropped, 1);
        f.assert_receives();
    }

    /// A backend with frames queued in memory, more than a socket pair would hold.
    struct QueuedFrames {
        frames: std::collections::VecDeque<Vec<u8>>,
        fd: EventFd,
    }

    impl FrameIo for QueuedFrames {
        fn send(&mut self, _frame: &TxFrame<'_>) -> std::io::Result<()> {
            Ok(())
        }
        fn recv(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let frame = self
                .frames
                .pop_front()
                .ok_or(std::io::ErrorKind::WouldBlock)?;
            buf[..frame.len()].copy_from_slice(&frame);
            Ok(frame.len())
        }
        fn raw_fd(&self) -> RawFd {
            self.fd.as_raw_fd()
        }
    }

    #[test]
    fn a_flood_is_served_in_bounded_turns() {
        // More frames than one turn serves, and a full ring of buffers.
        let extra = 40u16;
        let count = QUEUE_SIZE + extra;
        let backend = QueuedFrames {
            frames: (0..count)
                .map(|i| frame([0; VNET_HDR_LEN], &i.to_le_bytes()))
                .collect(),
            fd: EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
        };
        let net = Net::new(Box::new(backend), MAC).expect("net");
        let counters = net.counters();
        let mut d = TestDriver::running(Box::new(net));
        for i in 0..u64::from(QUEUE_SIZE) {
            d.add_chain(RX_QUEUE, &[(RX_BUF + i * 128, 128, W)]);
        }
        d.notify(RX_QUEUE);
        assert_eq!(
            usize::from(d.used_idx(RX_QUEUE)),
            CHAINS_PER_TURN.min(usize::from(QUEUE_SIZE)),
            "one turn, bounded"
        );
        // More buffers, no notification: the rest is resumed through the device's own
        // eventfd, which the event loop serves on its next turn.
        for i in 0..u64::from(extra) {
            d.add_chain(RX_QUEUE, &[(RX_BUF + i * 128, 128, W)]);
        }
        let retry = *d.transport.event_fds().last().expect("retry fd");
        d.transport.handle_event(retry);
        assert_eq!(d.used_idx(RX_QUEUE), count);
        assert_eq!(counters.snapshot().rx_frames, u64::from(count));
        // The last frame is the last one queued.
        let (_, len) = d.used(RX_QUEUE, count - 1);
        let mut tail = [0u8; 2];
        d.mem
            .read_slice(
                &mut tail,
                GuestAddress(RX_BUF + u64::from(extra - 1) * 128 + u64::from(len) - 2),
            )
            .expect("read");
        assert_eq!(u16::from_le_bytes(tail), count - 1);
    }

    #[test]
    fn notifications_before_activation_or_of_unknown_queues_are_refused() {
        let (device_end, _host) = UnixDatagram::pair().expect("socketpair");
        let mut net = Net::new(Box::new(device_end), MAC).expect("net");
        assert!(matches!(
            net.queue_notified(0),
            Err(DeviceError::NoSuchQueue(0))
        ));
        assert!(matches!(
            net.queue_notified(2),
            Err(DeviceError::NoSuchQueue(2))
        ));
        assert!(net.handle_fd_event(net.io.raw_fd()).is_ok());
    }
}
