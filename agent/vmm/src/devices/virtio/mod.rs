//! Virtio devices on the virtio-mmio transport: the [`VirtioDevice`] trait every device
//! implements, the interrupt handle devices raise, where device windows and interrupt lines go,
//! and the devices themselves.
//!
//! Split of responsibilities: [`mmio::MmioTransport`] owns the register interface the driver
//! programs (feature negotiation, queue set-up, status handshake) and refuses every misuse of
//! it; at `DRIVER_OK` it hands checked [`Queue`]s to the device's [`VirtioDevice::activate`].
//! The device owns request handling: [`queue`] walks descriptor chains with every guest value
//! checked, [`blk`], [`net`] (over a [`tap`]), [`rng`] and [`balloon`] serve them.
//!
//! Nothing here runs on a vCPU exit path except register accesses: queue notifications arrive
//! on eventfds that KVM signals (ioeventfd) and that the VMM's event loop serves, and interrupts
//! leave through an irqfd.

pub mod balloon;
pub mod blk;
pub mod mmio;
pub mod net;
pub mod queue;
pub mod rng;
pub mod tap;

#[cfg(any(test, feature = "fuzzing"))]
mod test_driver;

/// The unit tests' virtio driver, for the fuzz targets in `agent/vmm/fuzz` (feature `fuzzing`
/// only; not an API).
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing {
    pub use super::test_driver::{
        QueueLayout, TestDriver, DATA_AREA, MEM_SIZE, R, RING_AREA, RING_STRIDE, W,
    };
}

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use virtio_bindings::virtio_mmio::{VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::boot::mptable::IOAPIC_PINS;
use crate::memory::MMIO_DEVICES_START;

/// Size of one device's MMIO window; the kernel command line announces it as `4K`.
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;
/// The first interrupt line given to virtio devices: 0-4 are the timer, keyboard, cascade,
/// COM2 and COM1 of a PC.
pub const FIRST_VIRTIO_GSI: u32 = 5;
/// How many virtio devices fit on the IOAPIC, one pin each.
pub const MAX_VIRTIO_DEVICES: usize = (IOAPIC_PINS as u32 - FIRST_VIRTIO_GSI) as usize;

/// Where one virtio-mmio device sits: its register window and its interrupt line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioSlot {
    pub base: u64,
    pub gsi: u32,
}

impl MmioSlot {
    /// The slot of the `index`-th device, or `None` when the IOAPIC has no pin left for it.
    pub fn for_index(index: usize) -> Option<MmioSlot> {
        if index >= MAX_VIRTIO_DEVICES {
            return None;
        }
        Some(MmioSlot {
            base: MMIO_DEVICES_START + index as u64 * MMIO_WINDOW_SIZE,
            gsi: FIRST_VIRTIO_GSI + index as u32,
        })
    }

    /// How the guest kernel learns about the device (`CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES`).
    pub fn cmdline_arg(&self) -> String {
        format!("virtio_mmio.device=4K@{:#x}:{}", self.base, self.gsi)
    }
}

/// The interrupt line of one device: the InterruptStatus bits the driver reads and acknowledges
/// through the transport, and the irqfd through which KVM injects the interrupt.
#[derive(Clone)]
pub struct Interrupt {
    status: Arc<AtomicU32>,
    irqfd: Arc<EventFd>,
}

impl Interrupt {
    pub fn new() -> std::io::Result<Interrupt> {
        Ok(Interrupt {
            status: Arc::new(AtomicU32::new(0)),
            irqfd: Arc::new(EventFd::new(libc::EFD_NONBLOCK)?),
        })
    }

    /// The eventfd to register with KVM as the device's irqfd.
    pub fn irqfd(&self) -> &EventFd {
        &self.irqfd
    }

    /// The device has put buffers in a used ring.
    pub fn signal_used_queue(&self) {
        self.signal(VIRTIO_MMIO_INT_VRING);
    }

    /// The device's configuration (or its status, e.g. NEEDS_RESET) changed.
    pub fn signal_config_change(&self) {
        self.signal(VIRTIO_MMIO_INT_CONFIG);
    }

    fn signal(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::SeqCst);
        if let Err(err) = self.irqfd.write(1) {
            tracing::error!(error = %err, "cannot raise a virtio interrupt");
        }
    }

    /// The InterruptStatus register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// InterruptACK: the driver has seen `bits`.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    fn clear(&self) {
        self.status.store(0, Ordering::SeqCst);
    }
}

/// Why a device stopped serving its queues: the driver broke the queue itself (not just one
/// request), so only a device reset can bring it back (`DEVICE_NEEDS_RESET`).
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("queue {queue}: {source}")]
    Queue {
        queue: usize,
        #[source]
        source: virtio_queue::Error,
    },
    #[error("queue {0} does not exist or is not active")]
    NoSuchQueue(usize),
}

/// Why a device cannot start with what the driver set up.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("{0} queues given, the device needs {1}")]
    QueueCount(usize, usize),
    #[error("queue {0} is not ready")]
    QueueNotReady(usize),
}

/// The one queue of a single-queue device, checked to be ready.
pub fn single_ready_queue(mut queues: Vec<Queue>) -> Result<Queue, ActivateError> {
    if queues.len() != 1 {
        return Err(ActivateError::QueueCount(queues.len(), 1));
    }
    let queue = queues.remove(0);
    if !queue.ready() {
        return Err(ActivateError::QueueNotReady(0));
    }
    Ok(queue)
}

/// A virtio device behind a transport. The transport checks every register access before it
/// reaches the device: config-space accesses are within `config_len()`, features acked are a
/// subset of `features()`, queues handed to `activate` are valid in guest memory.
pub trait VirtioDevice: Send {
    /// The virtio device id (`VIRTIO_ID_*`).
    fn device_type(&self) -> u32;
    /// A short name for logs: `virtio-blk`, `virtio-rng`.
    fn name(&self) -> &'static str;
    /// The device feature bits offered (the transport adds `VIRTIO_F_VERSION_1`).
    fn features(&self) -> u64;
    /// The maximum size of each of the device's queues; its length is the queue count.
    fn queue_max_sizes(&self) -> &[u16];
    /// Length in bytes of the device-specific configuration space.
    fn config_len(&self) -> u64;
    /// Reads `data.len()` bytes of configuration space at `offset` (within `config_len`).
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// A counter the device bumps whenever it changes its configuration space on its own (the
    /// transport adds it to ConfigGeneration, virtio 1.x section 2.5.1); 0 for devices whose
    /// configuration never changes.
    fn config_generation(&self) -> u32 {
        0
    }
    /// Writes configuration space; devices with a read-only configuration ignore it.
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        tracing::warn!(
            device = self.name(),
            offset,
            len = data.len(),
            "driver wrote the read-only configuration space; ignored"
        );
    }
    /// The driver set DRIVER_OK: start serving `queues` (one per `queue_max_sizes` entry; those
    /// the driver did not enable are not ready), with the features it acknowledged.
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: Interrupt,
        acked_features: u64,
    ) -> Result<(), ActivateError>;
    /// The driver notified queue `index`. Returns true when work is left that was deferred to
    /// keep one busy queue from starving the event loop (the caller notifies again).
    fn queue_notified(&mut self, index: usize) -> Result<bool, DeviceError>;
    /// Back to the state before activation; drops the queues.
    fn reset(&mut self);
    /// File descriptors of the device's own (e.g. a tap's) to watch; none by default.
    fn event_fds(&self) -> Vec<RawFd> {
        Vec::new()
    }
    /// One of `event_fds` is readable (the event loop watches them edge-triggered: consume
    /// what is there, or remember that work is left). Called only while the device runs; an
    /// error means a queue is broken, as for `queue_notified`.
    fn handle_fd_event(&mut self, _fd: RawFd) -> Result<(), DeviceError> {
        Ok(())
    }
    /// Requests taken from the queues that the device has not returned used yet, because
    /// host-side work for them is still running (virtio-blk's I/O threads); 0 for devices
    /// that answer every request before `queue_notified` returns.
    fn requests_in_flight(&self) -> usize {
        0
    }
}

/// Copies configuration bytes `config[offset..]` into `data`; bytes past the end read as zero.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if let Some(src) = config.get(start..) {
        let n = src.len().min(data.len());
        data[..n].copy_from_slice(&src[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_4k_apart_from_the_devices_start_and_stop_at_the_last_pin() {
        let first = MmioSlot::for_index(0).expect("slot 0");
        assert_eq!(first.base, 0xd000_0000);
        assert_eq!(first.gsi, 5);
        assert_eq!(first.cmdline_arg(), "virtio_mmio.device=4K@0xd0000000:5");
        let last = MmioSlot::for_index(MAX_VIRTIO_DEVICES - 1).expect("last slot");
        assert_eq!(last.gsi, 23);
        assert_eq!(last.base, 0xd000_0000 + 18 * 0x1000);
        assert!(MmioSlot::for_index(MAX_VIRTIO_DEVICES).is_none());
    }

    #[test]
    fn interrupt_status_bits_are_set_and_acknowledged() {
        let irq = Interrupt::new().expect("eventfd");
        irq.signal_used_queue();
        irq.signal_config_change();
        assert_eq!(irq.status(), 3);
        assert_eq!(irq.irqfd().read().expect("irqfd fired"), 2);
        irq.ack(1);
        assert_eq!(irq.status(), 2);
    }
}
