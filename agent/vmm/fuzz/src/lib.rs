//! What the virtio fuzz targets share: the byte encoding of their inputs, a [`Harness`] that
//! writes a hostile driver's rings into a running device's guest memory and checks what must
//! hold after every notification, and a disk image for virtio-blk.
//!
//! A device target's input is a sequence of [`Round`]s. A round is what a driver may put into
//! one queue between two notifications: descriptors at any table index with any address,
//! length, flags and `next`, heads in the next available ring slots, the available ring's flags
//! and `used_event`, any move of the available index, and bytes in the data area the
//! descriptors usually point at. Everything the device reads from guest memory comes from the
//! fuzzer; the set-up around it (guest memory, the transport's handshake) is fixed and valid.
//!
//! The transport target's input is a sequence of [`MmioOp`]s: register reads and writes.

use std::collections::HashSet;
use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use fabric_vmm::devices::virtio::fuzzing::{
    TestDriver, DATA_AREA, MEM_SIZE, RING_AREA, RING_STRIDE,
};
use fabric_vmm::devices::virtio::VirtioDevice;
use fabric_vmm::devices::EventSubscriber;
use virtio_bindings::virtio_config::VIRTIO_CONFIG_S_NEEDS_RESET;
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{Bytes, GuestAddress};

/// Rounds (or transport operations) taken from one input at most, so one input runs briefly.
pub const MAX_ROUNDS: usize = 32;
pub const MAX_OPS: usize = 256;

/// A device-readable buffer.
pub const R: u16 = 0;
/// A device-writable buffer.
pub const W: u16 = VRING_DESC_F_WRITE as u16;

/// Little-endian values taken off the front of the fuzz input.
pub struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Input<'a> {
        Input(data)
    }

    pub fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    /// `n` bytes, or what is left if fewer.
    pub fn up_to(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.0.len());
        self.bytes(n).unwrap_or_default()
    }

    pub fn u8(&mut self) -> Option<u8> {
        self.bytes(1).map(|b| b[0])
    }

    pub fn u16(&mut self) -> Option<u16> {
        self.bytes(2).map(|b| u16::from_le_bytes([b[0], b[1]]))
    }

    pub fn u32(&mut self) -> Option<u32> {
        let b = self.bytes(4)?;
        Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub fn u64(&mut self) -> Option<u64> {
        let b = self.bytes(8)?;
        let mut raw = [0u8; 8];
        raw.copy_from_slice(b);
        Some(u64::from_le_bytes(raw))
    }
}

/// One descriptor as written into the table, at `index` modulo the queue size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawDesc {
    pub index: u8,
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

/// What a driver does to one queue before it notifies it.
///
/// Encoding: a 14-byte header — queue, descriptor count, head count, available flags (u8
/// each), available index advance, `used_event`, `host`, data offset, data length (le16
/// each) — then the descriptors (index u8, addr le64, len le32, flags le16, next le16), the
/// heads (le16 each) and the data. An input that ends early ends the round there.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Round {
    /// The queue, modulo the device's queue count.
    pub queue: u8,
    /// The available ring's flags (bit 0: VRING_AVAIL_F_NO_INTERRUPT).
    pub avail_flags: u8,
    /// How far the available index moves; any value (a driver may lie).
    pub avail_advance: u16,
    /// The `used_event` word after the available ring (VIRTIO_RING_F_EVENT_IDX).
    pub used_event: u16,
    /// For the target, what the host side does first. virtio-net: the length of a frame the
    /// backend receives (0: none); virtio-balloon: bit 0 asks for statistics.
    pub host: u16,
    /// Where `data` is written: `DATA_AREA + data_offset`.
    pub data_offset: u16,
    pub descs: Vec<RawDesc>,
    /// Written to the available ring slots from the current available index on.
    pub heads: Vec<u16>,
    pub data: Vec<u8>,
}

impl Round {
    pub fn decode(input: &mut Input) -> Option<Round> {
        let header = input.bytes(14)?;
        let mut h = Input::new(header);
        let le16 = |h: &mut Input| h.u16().unwrap_or_default();
        let queue = h.u8().unwrap_or_default();
        let desc_count = h.u8().unwrap_or_default();
        let head_count = h.u8().unwrap_or_default();
        let mut round = Round {
            queue,
            avail_flags: h.u8().unwrap_or_default(),
            avail_advance: le16(&mut h),
            used_event: le16(&mut h),
            host: le16(&mut h),
            data_offset: le16(&mut h),
            ..Round::default()
        };
        let data_len = le16(&mut h);
        for _ in 0..desc_count {
            let Some(raw) = input.bytes(17) else {
                return Some(round);
            };
            let mut d = Input::new(raw);
            round.descs.push(RawDesc {
                index: d.u8().unwrap_or_default(),
                addr: d.u64().unwrap_or_default(),
                len: d.u32().unwrap_or_default(),
                flags: d.u16().unwrap_or_default(),
                next: d.u16().unwrap_or_default(),
            });
        }
        for _ in 0..head_count {
            let Some(head) = input.u16() else {
                return Some(round);
            };
            round.heads.push(head);
        }
        round.data = input.up_to(usize::from(data_len)).to_vec();
        Some(round)
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        let count = |n: usize| u8::try_from(n).expect("at most 255 descriptors or heads");
        out.extend_from_slice(&[
            self.queue,
            count(self.descs.len()),
            count(self.heads.len()),
            self.avail_flags,
        ]);
        let data_len = u16::try_from(self.data.len()).expect("at most 64 KiB of data");
        for v in [
            self.avail_advance,
            self.used_event,
            self.host,
            self.data_offset,
            data_len,
        ] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        for d in &self.descs {
            out.push(d.index);
            out.extend_from_slice(&d.addr.to_le_bytes());
            out.extend_from_slice(&d.len.to_le_bytes());
            out.extend_from_slice(&d.flags.to_le_bytes());
            out.extend_from_slice(&d.next.to_le_bytes());
        }
        for h in &self.heads {
            out.extend_from_slice(&h.to_le_bytes());
        }
        out.extend_from_slice(&self.data);
    }

    /// A well-formed round: `chains` of `(addr, len, R|W)` buffers laid out from descriptor 0
    /// on, linked in order, each made available. For seeds.
    pub fn chains(queue: u8, chains: &[&[(u64, u32, u16)]]) -> Round {
        let mut round = Round {
            queue,
            ..Round::default()
        };
        let mut index = 0u8;
        for chain in chains {
            round.heads.push(u16::from(index));
            for (i, &(addr, len, flags)) in chain.iter().enumerate() {
                let last = i + 1 == chain.len();
                round.descs.push(RawDesc {
                    index,
                    addr,
                    len,
                    flags: if last {
                        flags
                    } else {
                        flags | VRING_DESC_F_NEXT as u16
                    },
                    next: u16::from(index) + 1,
                });
                index += 1;
            }
        }
        round.avail_advance = chains.len() as u16;
        round
    }

    /// The same round with `data` at `DATA_AREA + offset`.
    pub fn with_data(mut self, offset: u16, data: Vec<u8>) -> Round {
        self.data_offset = offset;
        self.data = data;
        self
    }

    pub fn with_host(mut self, host: u16) -> Round {
        self.host = host;
        self
    }
}

/// The bytes of a sequence of rounds after `prefix`: a seed input.
pub fn encode_rounds(prefix: &[u8], rounds: &[Round]) -> Vec<u8> {
    let mut out = prefix.to_vec();
    for round in rounds {
        round.encode(&mut out);
    }
    out
}

/// A running device behind its transport, driven round by round.
pub struct Harness {
    pub driver: TestDriver,
    /// Per queue: the device must return every chain made available as soon as it is
    /// notified (request queues; not an RX queue that waits for frames, nor a statistics
    /// queue whose buffer the device keeps).
    eager: Vec<bool>,
    queue_fds: HashSet<RawFd>,
}

impl Harness {
    /// `device` after a full handshake, every queue set up at its maximum size.
    pub fn new(device: Box<dyn VirtioDevice>, eager: &[bool]) -> Harness {
        assert_eq!(
            device.queue_max_sizes().len(),
            eager.len(),
            "one flag per queue"
        );
        let driver = TestDriver::running(device);
        let queue_fds = driver
            .transport
            .queue_events()
            .iter()
            .map(|e| e.as_raw_fd())
            .collect();
        let mut harness = Harness {
            driver,
            eager: eager.to_vec(),
            queue_fds,
        };
        harness.write_canaries();
        harness
    }

    fn restart(&mut self) {
        self.driver.restart();
        self.write_canaries();
    }

    /// The rest of each used ring's page after the ring: no device write goes there, so a
    /// change means the page was discarded (balloon) or written through a guest buffer.
    fn canary_range(&self, q: usize) -> (u64, usize) {
        let layout = self.driver.layout(q);
        let ring_end = layout.used + 6 + 8 * u64::from(layout.size);
        let page_end = (layout.used | 0xfff) + 1;
        (ring_end, page_end.saturating_sub(ring_end) as usize)
    }

    fn write_canaries(&mut self) {
        for q in 0..self.eager.len() {
            let (at, len) = self.canary_range(q);
            self.write_bytes(at, &vec![CANARY; len]);
        }
    }

    fn canary_ok(&self, q: usize) -> bool {
        let (at, len) = self.canary_range(q);
        let mut bytes = vec![0u8; len];
        self.driver
            .mem
            .read_slice(&mut bytes, GuestAddress(at))
            .expect("used ring page in guest memory");
        bytes.iter().all(|&b| b == CANARY)
    }

    /// Whether a device-writable buffer named by any descriptor of any queue (directly or in
    /// an indirect table) overlaps the rings or an indirect table.
    fn writable_buffers_reach_rings(&self) -> bool {
        let rings = (RING_AREA, self.eager.len() as u64 * RING_STRIDE);
        let mut writable = Vec::new();
        let mut tables = HashSet::new();
        for q in 0..self.eager.len() {
            let layout = self.driver.layout(q);
            let table = self.read_descs(layout.desc, 16 * u64::from(layout.size));
            for (addr, len, flags) in table {
                if flags & VRING_DESC_F_WRITE as u16 != 0 {
                    writable.push((addr, u64::from(len)));
                }
                if flags & VRING_DESC_F_INDIRECT as u16 != 0 {
                    tables.insert((addr, u64::from(len)));
                }
            }
        }
        for &(addr, len) in &tables {
            for (addr, len, flags) in self.read_descs(addr, len) {
                if flags & VRING_DESC_F_WRITE as u16 != 0 {
                    writable.push((addr, u64::from(len)));
                }
            }
        }
        writable.iter().any(|&buffer| {
            overlaps(buffer, rings) || tables.iter().any(|&table| overlaps(buffer, table))
        })
    }

    /// The descriptors (addr, len, flags) of a table at `addr`, as far as it is in memory.
    fn read_descs(&self, addr: u64, len: u64) -> Vec<(u64, u32, u16)> {
        let end = addr.saturating_add(len).min(MEM_SIZE);
        if addr >= end {
            return Vec::new();
        }
        let mut raw = vec![0u8; (end - addr) as usize / 16 * 16];
        self.driver
            .mem
            .read_slice(&mut raw, GuestAddress(addr))
            .expect("table inside guest memory");
        raw.chunks_exact(16)
            .map(|d| {
                let mut a = [0u8; 8];
                a.copy_from_slice(&d[0..8]);
                let len = u32::from_le_bytes([d[8], d[9], d[10], d[11]]);
                let flags = u16::from_le_bytes([d[12], d[13]]);
                (u64::from_le_bytes(a), len, flags)
            })
            .collect()
    }

    /// Writes `round` into guest memory, notifies its queue, lets the event loop serve what
    /// is signalled, and checks the invariants:
    /// - the used index of any queue advances by at most the entries made available, and by
    ///   at most the queue size;
    /// - the device either sets DEVICE_NEEDS_RESET, or (on an eager queue) returns every chain
    ///   whose head is inside the table: a lying available index must break the queue.
    ///
    /// The invariants are about the rings the driver wrote. A round in which the device may
    /// have written over them itself — a device-writable buffer over the rings or an indirect
    /// table, a balloon page discarded under them — has no such rings to check: the device
    /// is reset and set up anew, as it is after NEEDS_RESET, as a driver would.
    pub fn run(&mut self, round: &Round) {
        let queues = self.eager.len();
        let q = usize::from(round.queue) % queues;
        let used_before: Vec<u16> = (0..queues).map(|i| self.driver.used_idx(i)).collect();
        let published_before = self.driver.avail_idx(q);
        self.write(q, round);
        let rings_before: Vec<Vec<u8>> = (0..queues).map(|i| self.driver_rings(i)).collect();
        let may_overwrite_rings = self.writable_buffers_reach_rings();

        self.driver.notify(q);
        self.drain();

        let rings_overwritten = may_overwrite_rings
            || (0..queues).any(|i| self.driver_rings(i) != rings_before[i] || !self.canary_ok(i));
        if self.driver.status() & VIRTIO_CONFIG_S_NEEDS_RESET != 0 || rings_overwritten {
            self.restart();
            return;
        }
        for (i, &before) in used_before.iter().enumerate() {
            let advance = self.driver.used_idx(i).wrapping_sub(before);
            let available = self.driver.avail_idx(i).wrapping_sub(before);
            assert!(
                advance <= available,
                "queue {i}: used index moved by {advance}, {available} entries were available"
            );
        }
        if self.eager[q] {
            let layout = self.driver.layout(q);
            let new = self.driver.avail_idx(q).wrapping_sub(published_before);
            assert!(
                new <= layout.size,
                "queue {q}: available index moved by {new} > queue size {} and the device \
                 did not set NEEDS_RESET",
                layout.size
            );
            let mut servable = 0u16;
            for i in 0..new {
                let slot = published_before.wrapping_add(i) % layout.size;
                let head: u16 = self.read(layout.avail + 4 + 2 * u64::from(slot));
                if head < layout.size {
                    servable += 1;
                }
            }
            let served = self.driver.used_idx(q).wrapping_sub(used_before[q]);
            assert_eq!(
                served, servable,
                "queue {q}: {servable} chains made available, {served} returned, no NEEDS_RESET"
            );
        }
    }

    fn write(&mut self, q: usize, round: &Round) {
        let layout = self.driver.layout(q);
        let size = u64::from(layout.size);
        for d in &round.descs {
            let mut raw = [0u8; 16];
            raw[0..8].copy_from_slice(&d.addr.to_le_bytes());
            raw[8..12].copy_from_slice(&d.len.to_le_bytes());
            raw[12..14].copy_from_slice(&d.flags.to_le_bytes());
            raw[14..16].copy_from_slice(&d.next.to_le_bytes());
            let at = layout.desc + 16 * (u64::from(d.index) % size);
            self.write_bytes(at, &raw);
        }
        let published = self.driver.avail_idx(q);
        for (i, head) in round.heads.iter().enumerate() {
            let slot = u64::from(published.wrapping_add(i as u16)) % size;
            self.write_bytes(layout.avail + 4 + 2 * slot, &head.to_le_bytes());
        }
        let flags = u16::from(round.avail_flags);
        self.write_bytes(layout.avail, &flags.to_le_bytes());
        self.write_bytes(layout.avail + 4 + 2 * size, &round.used_event.to_le_bytes());
        self.write_bytes(DATA_AREA + u64::from(round.data_offset), &round.data);
        self.driver
            .set_avail_idx(q, published.wrapping_add(round.avail_advance));
    }

    /// Turns of the event loop: queue notifications the device deferred, and its own fds (a
    /// backend with frames, a statistics request), as the VMM's loop would serve them.
    fn drain(&mut self) {
        for _ in 0..3 {
            self.driver.run_event_loop_once();
            for fd in self.driver.transport.event_fds() {
                if !self.queue_fds.contains(&fd) {
                    self.driver.transport.handle_event(fd);
                }
            }
        }
    }

    /// The descriptor table and available ring of queue `q` as they are in guest memory.
    fn driver_rings(&self, q: usize) -> Vec<u8> {
        let layout = self.driver.layout(q);
        let size = u64::from(layout.size);
        let mut bytes = vec![0u8; (16 * size + 6 + 2 * size) as usize];
        let (desc, avail) = bytes.split_at_mut(16 * size as usize);
        self.driver
            .mem
            .read_slice(desc, GuestAddress(layout.desc))
            .expect("descriptor table in guest memory");
        self.driver
            .mem
            .read_slice(avail, GuestAddress(layout.avail))
            .expect("available ring in guest memory");
        bytes
    }

    fn write_bytes(&mut self, addr: u64, bytes: &[u8]) {
        // The rings and DATA_AREA + 128 KiB are well inside the test VM's memory.
        self.driver
            .mem
            .write_slice(bytes, GuestAddress(addr))
            .expect("driver writes inside guest memory");
    }

    fn read(&self, addr: u64) -> u16 {
        let v: u16 = self
            .driver
            .mem
            .read_obj(GuestAddress(addr))
            .expect("driver reads inside guest memory");
        u16::from_le(v)
    }
}

/// Fills the unused end of each used ring's page.
const CANARY: u8 = 0xa5;

/// Whether byte ranges `(start, len)` share a byte (no wrap: computed in u128).
fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    let (a0, a1) = (u128::from(a.0), u128::from(a.0) + u128::from(a.1));
    let (b0, b1) = (u128::from(b.0), u128::from(b.0) + u128::from(b.1));
    a0 < b1 && b0 < a1
}

/// Sectors of the fuzz disk images.
pub const DISK_SECTORS: u64 = 32;

/// A disk image for virtio-blk whose sector n is filled with byte n: an unlinked temporary
/// file, opened through `/proc/self/fd` so nothing is left behind.
pub struct DiskImage {
    file: File,
}

impl DiskImage {
    pub fn new() -> DiskImage {
        let dir = ["/dev/shm", "/tmp"]
            .into_iter()
            .find(|d| std::path::Path::new(d).is_dir())
            .unwrap_or("/tmp");
        let file = tempfile::tempfile_in(dir).expect("temporary disk image");
        let image = DiskImage { file };
        image.restore();
        image
    }

    /// The pattern every image starts with.
    pub fn pattern() -> Vec<u8> {
        (0..DISK_SECTORS)
            .flat_map(|sector| [sector as u8; 512])
            .collect()
    }

    /// Puts the pattern back (after a writable disk ran an input).
    pub fn restore(&self) {
        self.file.set_len(DISK_SECTORS * 512).expect("image size");
        self.file
            .write_all_at(&DiskImage::pattern(), 0)
            .expect("image pattern");
    }

    /// A path that opens the image.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.file.as_raw_fd()))
    }

    /// The image's current bytes.
    pub fn contents(&self) -> Vec<u8> {
        let len = self.file.metadata().expect("image metadata").len();
        let mut data = vec![0u8; len as usize];
        self.file.read_exact_at(&mut data, 0).expect("image read");
        data
    }
}

impl Default for DiskImage {
    fn default() -> Self {
        DiskImage::new()
    }
}

/// One access of the transport target.
///
/// Encoding: 11 bytes each — code (u8), offset (le16, within the 4 KiB window), value (le64).
/// A code of 0xf8 or more runs a turn of the event loop; otherwise bit 2 is a write, bits 0-1
/// the width (1, 2, 4 or 8 bytes), and a write stores the low `width` bytes of the value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MmioOp {
    Read { offset: u16, width: u8 },
    Write { offset: u16, width: u8, value: u64 },
    RunEventLoop,
}

impl MmioOp {
    pub fn decode(input: &mut Input) -> Option<MmioOp> {
        let raw = input.bytes(11)?;
        let mut r = Input::new(raw);
        let code = r.u8().unwrap_or_default();
        let offset = r.u16().unwrap_or_default() & 0xfff;
        let value = r.u64().unwrap_or_default();
        let width = 1u8 << (code & 3);
        Some(if code >= 0xf8 {
            MmioOp::RunEventLoop
        } else if code & 4 != 0 {
            MmioOp::Write {
                offset,
                width,
                value,
            }
        } else {
            MmioOp::Read { offset, width }
        })
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        let log2 = |w: u8| w.trailing_zeros() as u8 & 3;
        let (code, offset, value) = match *self {
            MmioOp::Read { offset, width } => (log2(width), offset, 0),
            MmioOp::Write {
                offset,
                width,
                value,
            } => (4 | log2(width), offset, value),
            MmioOp::RunEventLoop => (0xff, 0, 0),
        };
        out.push(code);
        out.extend_from_slice(&offset.to_le_bytes());
        out.extend_from_slice(&value.to_le_bytes());
    }

    /// A 32-bit register write, the way drivers access registers.
    pub fn w32(offset: u16, value: u32) -> MmioOp {
        MmioOp::Write {
            offset,
            width: 4,
            value: value.into(),
        }
    }

    pub fn r32(offset: u16) -> MmioOp {
        MmioOp::Read { offset, width: 4 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fabric_vmm::devices::virtio::blk::{Block, CacheMode};
    use fabric_vmm::devices::virtio::rng::Rng;

    #[test]
    fn a_valid_round_is_served_and_a_lying_one_resets_the_device() {
        let mut h = Harness::new(Box::new(Rng::new()), &[true]);
        h.run(&Round::chains(
            0,
            &[&[(DATA_AREA, 16, W)], &[(DATA_AREA, 8, W)]],
        ));
        assert_eq!(h.driver.used_idx(0), 2);
        assert_eq!(h.driver.used(0, 1), (1, 8));

        let mut lying = Round::chains(0, &[&[(DATA_AREA, 16, W)]]);
        lying.avail_advance = 300;
        h.run(&lying);
        // Restarted: fresh rings, nothing used yet, and it serves again.
        assert_eq!((h.driver.used_idx(0), h.driver.avail_idx(0)), (0, 0));
        h.run(&Round::chains(0, &[&[(DATA_AREA, 16, W)]]));
        assert_eq!(h.driver.used_idx(0), 1);
    }

    #[test]
    fn a_blk_read_round_reads_the_image() {
        let image = DiskImage::new();
        let block = Block::open(&image.path(), true, CacheMode::None).expect("open");
        let mut h = Harness::new(Box::new(block), &[true]);
        let mut header = vec![0u8; 16]; // IN
        header[8] = 5; // sector 5
        let read = Round::chains(
            0,
            &[&[
                (DATA_AREA, 16, R),
                (DATA_AREA + 0x1000, 512, W),
                (DATA_AREA + 0x800, 1, W),
            ]],
        )
        .with_data(0, header);
        h.run(&read);
        assert_eq!(h.driver.used(0, 0), (0, 513));
        let mut sector = [0u8; 513];
        h.driver
            .mem
            .read_slice(&mut sector[..512], GuestAddress(DATA_AREA + 0x1000))
            .expect("data");
        h.driver
            .mem
            .read_slice(&mut sector[512..], GuestAddress(DATA_AREA + 0x800))
            .expect("status");
        assert!(sector[..512].iter().all(|&b| b == 5));
        assert_eq!(sector[512], 0, "VIRTIO_BLK_S_OK");
    }

    #[test]
    fn rounds_and_ops_decode_as_encoded() {
        let round = Round::chains(1, &[&[(DATA_AREA, 16, R), (DATA_AREA + 16, 1, W)]])
            .with_data(4, vec![1, 2, 3])
            .with_host(60);
        let bytes = encode_rounds(&[], &[round.clone(), round.clone()]);
        let mut input = Input::new(&bytes);
        assert_eq!(Round::decode(&mut input), Some(round.clone()));
        assert_eq!(Round::decode(&mut input), Some(round));
        assert_eq!(Round::decode(&mut input), None);

        let ops = [
            MmioOp::w32(0x70, 1),
            MmioOp::Read {
                offset: 0x100,
                width: 2,
            },
            MmioOp::RunEventLoop,
        ];
        let mut bytes = Vec::new();
        for op in ops {
            op.encode(&mut bytes);
        }
        let mut input = Input::new(&bytes);
        for op in ops {
            assert_eq!(MmioOp::decode(&mut input), Some(op));
        }
    }
}
