//! A virtio driver for unit tests: programs a transport through its registers the way Linux's
//! virtio_mmio does, lays descriptors and rings into guest memory by hand (so tests can also
//! lay them out wrong), notifies, and reads the used ring back.
//!
//! Fuzz targets (feature `fuzzing`) use it too: set-up goes through its `expect`s, which only
//! fixed, valid values reach; the fuzz input goes only into guest memory and registers.

use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK,
};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::mmio::{MmioTransport, CONFIG_SPACE_OFFSET};
use super::VirtioDevice;
use crate::devices::bus::BusDevice;
use crate::devices::EventSubscriber;

/// Guest memory of the test VM.
pub const MEM_SIZE: u64 = 4 << 20;
/// Where the rings of queue `n` start: `RING_AREA + n * RING_STRIDE`.
pub const RING_AREA: u64 = 0x10000;
pub const RING_STRIDE: u64 = 0x10000;
/// Where tests put their data buffers.
pub const DATA_AREA: u64 = 0x100000;

/// How long [`TestDriver::settle`] waits for a device's background work.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(20);

/// A device-readable buffer.
pub const R: u16 = 0;
/// A device-writable buffer.
pub const W: u16 = VRING_DESC_F_WRITE as u16;

#[derive(Debug, Clone, Copy)]
struct Rings {
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    next_desc: u16,
    avail_idx: u16,
}

/// Where a queue's rings are in guest memory, for fuzzers that write them raw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueLayout {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
}

pub struct TestDriver {
    pub mem: GuestMemoryMmap,
    pub transport: MmioTransport,
    rings: Vec<Option<Rings>>,
}

impl TestDriver {
    pub fn new(device: Box<dyn VirtioDevice>) -> TestDriver {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)])
            .expect("test guest memory");
        let queues = device.queue_max_sizes().len();
        let transport = MmioTransport::new(device, mem.clone()).expect("transport");
        TestDriver {
            mem,
            transport,
            rings: vec![None; queues],
        }
    }

    /// A driver that went through the whole handshake and set up every queue at its maximum.
    pub fn running(device: Box<dyn VirtioDevice>) -> TestDriver {
        TestDriver::running_without(device, 0)
    }

    /// [`TestDriver::running`], but refusing the feature bits in `refused`.
    pub fn running_without(device: Box<dyn VirtioDevice>, refused: u64) -> TestDriver {
        let sizes = device.queue_max_sizes().to_vec();
        let mut driver = TestDriver::new(device);
        driver.init_without(refused);
        for (index, size) in sizes.into_iter().enumerate() {
            driver.setup_queue(index as u32, size);
        }
        driver.driver_ok();
        driver
    }

    /// Resets the device (status 0) and goes through the whole handshake again with every
    /// queue at its maximum size and fresh rings, as a driver does after DEVICE_NEEDS_RESET.
    pub fn restart(&mut self) {
        self.write_reg(0x70, 0);
        assert_eq!(self.read_reg(0x70), 0, "reset refused");
        self.init();
        for index in 0..self.rings.len() as u32 {
            self.write_reg(0x30, index);
            let max = self.read_reg(0x34);
            let size = u16::try_from(max).expect("QueueNumMax fits a queue size");
            self.setup_queue(index, size);
        }
        self.driver_ok();
    }

    pub fn mem_size(&self) -> u64 {
        MEM_SIZE
    }

    pub fn read_reg(&mut self, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        self.transport.read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    pub fn write_reg(&mut self, offset: u64, value: u32) {
        self.transport.write(offset, &value.to_le_bytes());
    }

    pub fn read_config(&mut self, offset: u64, len: usize) -> Vec<u8> {
        let mut data = vec![0u8; len];
        self.transport.read(CONFIG_SPACE_OFFSET + offset, &mut data);
        data
    }

    /// ACKNOWLEDGE, DRIVER, acknowledge every offered feature, FEATURES_OK.
    pub fn init(&mut self) {
        self.init_without(0);
    }

    /// [`TestDriver::init`], but refusing the feature bits in `refused`.
    pub fn init_without(&mut self, refused: u64) {
        self.write_reg(0x70, VIRTIO_CONFIG_S_ACKNOWLEDGE);
        self.write_reg(0x70, VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER);
        for select in 0..2 {
            self.write_reg(0x14, select);
            let offered = self.read_reg(0x10) & !((refused >> (32 * select)) as u32);
            self.write_reg(0x24, select);
            self.write_reg(0x20, offered);
        }
        let status =
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK;
        self.write_reg(0x70, status);
        assert_eq!(self.read_reg(0x70), status, "FEATURES_OK refused");
    }

    /// Sets up queue `index` with `size` entries in its slot of the ring area.
    pub fn setup_queue(&mut self, index: u32, size: u16) {
        let base = RING_AREA + u64::from(index) * RING_STRIDE;
        let rings = Rings {
            size,
            desc: base,
            avail: base + 0x4000,
            used: base + 0x8000,
            next_desc: 0,
            avail_idx: 0,
        };
        // Fresh rings: zeroed indices and flags.
        self.mem
            .write_slice(&vec![0u8; RING_STRIDE as usize], GuestAddress(base))
            .expect("clear rings");
        self.write_reg(0x30, index);
        self.write_reg(0x38, u32::from(size));
        for (reg, addr) in [(0x80, rings.desc), (0x90, rings.avail), (0xa0, rings.used)] {
            self.write_reg(reg, addr as u32);
            self.write_reg(reg + 4, (addr >> 32) as u32);
        }
        self.write_reg(0x44, 1);
        assert_eq!(self.read_reg(0x44), 1, "queue {index} refused");
        self.rings[index as usize] = Some(rings);
    }

    pub fn driver_ok(&mut self) {
        let status = self.read_reg(0x70) | VIRTIO_CONFIG_S_DRIVER_OK;
        self.write_reg(0x70, status);
    }

    pub fn status(&mut self) -> u32 {
        self.read_reg(0x70)
    }

    fn rings(&self, queue: usize) -> Rings {
        self.rings[queue].expect("queue set up")
    }

    /// Where queue `queue`'s rings are.
    pub fn layout(&self, queue: usize) -> QueueLayout {
        let rings = self.rings(queue);
        QueueLayout {
            size: rings.size,
            desc: rings.desc,
            avail: rings.avail,
            used: rings.used,
        }
    }

    /// The available index the driver last published on `queue`.
    pub fn avail_idx(&self, queue: usize) -> u16 {
        self.rings(queue).avail_idx
    }

    /// Writes descriptor `index` of `queue` as given, flags and all.
    pub fn write_desc(
        &mut self,
        queue: usize,
        index: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        let rings = self.rings(queue);
        let at = GuestAddress(rings.desc + 16 * u64::from(index));
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        self.mem.write_slice(&raw, at).expect("descriptor");
    }

    /// Puts `head` in the available ring and publishes it.
    pub fn push_avail(&mut self, queue: usize, head: u16) {
        let rings = self.rings(queue);
        let slot = u64::from(rings.avail_idx % rings.size);
        self.mem
            .write_obj(head.to_le(), GuestAddress(rings.avail + 4 + 2 * slot))
            .expect("avail ring");
        self.set_avail_idx(queue, rings.avail_idx.wrapping_add(1));
    }

    /// Writes the available index directly (hostile drivers lie about it).
    pub fn set_avail_idx(&mut self, queue: usize, idx: u16) {
        let rings = self.rings[queue].as_mut().expect("queue set up");
        rings.avail_idx = idx;
        let avail = rings.avail;
        self.mem
            .write_obj(idx.to_le(), GuestAddress(avail + 2))
            .expect("avail idx");
    }

    /// Lays out a well-formed chain of `(addr, len, R|W)` buffers and makes it available.
    /// Returns its head.
    pub fn add_chain(&mut self, queue: usize, buffers: &[(u64, u32, u16)]) -> u16 {
        let rings = self.rings(queue);
        let head = rings.next_desc;
        let mut index = head;
        for (i, &(addr, len, flags)) in buffers.iter().enumerate() {
            let next = (index + 1) % rings.size;
            let flags = if i + 1 < buffers.len() {
                flags | VRING_DESC_F_NEXT as u16
            } else {
                flags
            };
            self.write_desc(queue, index, addr, len, flags, next);
            index = next;
        }
        self.rings[queue].as_mut().expect("queue").next_desc = index;
        self.push_avail(queue, head);
        head
    }

    /// Notifies `queue` the way KVM's ioeventfd does, then lets the event loop run until the
    /// device has returned every request it took ([`TestDriver::settle`]).
    pub fn notify(&mut self, queue: usize) {
        self.kick(queue);
        self.settle();
    }

    /// Notifies `queue` and lets the event loop serve the notification once, without waiting
    /// for requests the device runs in the background.
    pub fn kick(&mut self, queue: usize) {
        let fd = self.transport.queue_events()[queue].as_raw_fd();
        self.transport.queue_events()[queue]
            .write(1)
            .expect("notify");
        self.transport.handle_event(fd);
    }

    /// Serves the device's own eventfds, as the event loop would, until the device has no
    /// request in flight (virtio-blk's I/O threads finish them in the background).
    pub fn settle(&mut self) {
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        while self.transport.requests_in_flight() > 0 {
            let queue_fds: Vec<RawFd> = self
                .transport
                .queue_events()
                .iter()
                .map(|e| e.as_raw_fd())
                .collect();
            for fd in self.transport.event_fds() {
                if !queue_fds.contains(&fd) {
                    self.transport.handle_event(fd);
                }
            }
            if self.transport.requests_in_flight() == 0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{} requests still in flight after {SETTLE_TIMEOUT:?}",
                self.transport.requests_in_flight()
            );
            std::thread::sleep(Duration::from_micros(50));
        }
    }

    /// Serves whatever queue eventfds are signalled, as one turn of the event loop would, then
    /// settles the requests that started.
    pub fn run_event_loop_once(&mut self) {
        for fd in self.transport.event_fds() {
            let signalled = self
                .transport
                .queue_events()
                .iter()
                .find(|e| e.as_raw_fd() == fd)
                .is_some_and(|e| {
                    // Peek by reading and writing back what was there.
                    match e.read() {
                        Ok(n) => {
                            let _ = e.write(n);
                            true
                        }
                        Err(_) => false,
                    }
                });
            if signalled {
                self.transport.handle_event(fd);
            }
        }
        self.settle();
    }

    /// The used index the device published.
    pub fn used_idx(&self, queue: usize) -> u16 {
        let rings = self.rings(queue);
        u16::from_le(
            self.mem
                .read_obj(GuestAddress(rings.used + 2))
                .expect("used idx"),
        )
    }

    /// Used ring entry `n` (counting from 0 since set-up): (descriptor id, length written).
    pub fn used(&self, queue: usize, n: u16) -> (u32, u32) {
        let rings = self.rings(queue);
        let at = rings.used + 4 + 8 * u64::from(n % rings.size);
        let id: u32 = self.mem.read_obj(GuestAddress(at)).expect("used id");
        let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).expect("used len");
        (u32::from_le(id), u32::from_le(len))
    }

    /// Takes the interrupt: returns InterruptStatus and acknowledges it.
    pub fn take_interrupt(&mut self) -> u32 {
        let status = self.read_reg(0x60);
        self.write_reg(0x64, status);
        status
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::rng::Rng;
    use virtio_bindings::virtio_config::VIRTIO_CONFIG_S_NEEDS_RESET;

    #[test]
    fn a_restarted_device_serves_fresh_rings() {
        let mut d = TestDriver::running(Box::new(Rng::new()));
        // A lying available index breaks the queue.
        d.set_avail_idx(0, 1000);
        d.notify(0);
        assert_ne!(d.status() & VIRTIO_CONFIG_S_NEEDS_RESET, 0);

        d.restart();
        assert_eq!(d.status() & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
        assert_eq!(d.avail_idx(0), 0);
        let layout = d.layout(0);
        assert_eq!((layout.size, layout.desc), (256, RING_AREA));
        d.add_chain(0, &[(DATA_AREA, 16, W)]);
        d.notify(0);
        assert_eq!(d.used_idx(0), 1);
        assert_eq!(d.used(0, 0), (0, 16));
    }
}
