//! The virtio-mmio transport, version 2 (the modern register layout of virtio 1.x, section
//! 4.2.2), as a [`BusDevice`] on the MMIO bus and an [`EventSubscriber`] of the event loop.
//!
//! It owns what the driver programs through registers: feature negotiation, queue set-up and
//! the status handshake (ACKNOWLEDGE, DRIVER, FEATURES_OK, DRIVER_OK; 0 resets). Every misuse
//! is refused without touching the device: registers accessed with a width other than 32 bits,
//! queue registers written outside FEATURES_OK..DRIVER_OK or while the queue is ready, a queue
//! size above the maximum or not a power of two, ring addresses misaligned or outside guest
//! memory, features the device did not offer, accesses past the configuration space. A broken
//! queue found while serving it (see [`DeviceError`]) sets DEVICE_NEEDS_RESET.
//!
//! Queue notifications do not need this object on the vCPU path: each queue has an eventfd that
//! the builder registers with KVM as an ioeventfd on QueueNotify, and the event loop calls
//! [`EventSubscriber::handle_event`]. A notification KVM did not catch (an odd width or value)
//! lands in [`BusDevice::write`], which only signals the same eventfd.

use std::os::fd::{AsRawFd, RawFd};

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::{Interrupt, VirtioDevice};
use crate::devices::bus::BusDevice;
use crate::devices::EventSubscriber;

/// "virt", little-endian.
pub const MMIO_MAGIC: u32 = 0x7472_6976;
/// The modern (non-legacy) register layout.
pub const MMIO_VERSION: u32 = 2;
/// "FBRC": any value works, Linux does not match on it.
pub const MMIO_VENDOR_ID: u32 = 0x4352_4246;
/// Offset of QueueNotify, where the ioeventfds are registered.
pub const QUEUE_NOTIFY_OFFSET: u64 = 0x50;
/// Offset of the device configuration space.
pub const CONFIG_SPACE_OFFSET: u64 = 0x100;

const REG_MAGIC: u64 = 0x000;
const REG_VERSION: u64 = 0x004;
const REG_DEVICE_ID: u64 = 0x008;
const REG_VENDOR_ID: u64 = 0x00c;
const REG_DEVICE_FEATURES: u64 = 0x010;
const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
const REG_DRIVER_FEATURES: u64 = 0x020;
const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
const REG_QUEUE_SEL: u64 = 0x030;
const REG_QUEUE_NUM_MAX: u64 = 0x034;
const REG_QUEUE_NUM: u64 = 0x038;
const REG_QUEUE_READY: u64 = 0x044;
const REG_INTERRUPT_STATUS: u64 = 0x060;
const REG_INTERRUPT_ACK: u64 = 0x064;
const REG_STATUS: u64 = 0x070;
const REG_QUEUE_DESC_LOW: u64 = 0x080;
const REG_QUEUE_DESC_HIGH: u64 = 0x084;
const REG_QUEUE_DRIVER_LOW: u64 = 0x090;
const REG_QUEUE_DRIVER_HIGH: u64 = 0x094;
const REG_QUEUE_DEVICE_LOW: u64 = 0x0a0;
const REG_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
const REG_SHM_SEL: u64 = 0x0ac;
const REG_SHM_LEN_LOW: u64 = 0x0b0;
const REG_SHM_LEN_HIGH: u64 = 0x0b4;
const REG_SHM_BASE_LOW: u64 = 0x0b8;
const REG_SHM_BASE_HIGH: u64 = 0x0bc;
const REG_CONFIG_GENERATION: u64 = 0x0fc;

/// After this many warnings about driver misuse, further ones go to debug level, so a hostile
/// guest cannot flood the VMM's log.
const MISUSE_WARNINGS: u32 = 32;

/// What the driver programmed for one queue. Kept apart from [`Queue`] so the registers read
/// back what was written and the queue is only built from checked values at DRIVER_OK.
#[derive(Debug, Clone, Copy)]
struct QueueConfig {
    max_size: u16,
    size: u16,
    ready: bool,
    desc: u64,
    driver: u64,
    device: u64,
}

impl QueueConfig {
    fn new(max_size: u16) -> QueueConfig {
        QueueConfig {
            max_size,
            size: max_size,
            ready: false,
            desc: 0,
            driver: 0,
            device: 0,
        }
    }

    /// Why this set-up cannot be used, if it cannot: ring alignment (virtio 1.x, 2.7) and every
    /// ring entirely inside guest RAM.
    fn check(&self, mem: &GuestMemoryMmap) -> Result<(), &'static str> {
        let size = u64::from(self.size);
        let rings = [
            (
                self.desc,
                16,
                16 * size,
                "descriptor table not 16-byte aligned",
                "descriptor table outside guest memory",
            ),
            (
                self.driver,
                2,
                6 + 2 * size,
                "available ring not 2-byte aligned",
                "available ring outside guest memory",
            ),
            (
                self.device,
                4,
                6 + 8 * size,
                "used ring not 4-byte aligned",
                "used ring outside guest memory",
            ),
        ];
        for (addr, align, len, misaligned, outside) in rings {
            if addr % align != 0 {
                return Err(misaligned);
            }
            let inside = addr.checked_add(len).is_some()
                && GuestMemoryBackend::check_range(mem, GuestAddress(addr), len as usize);
            if !inside {
                return Err(outside);
            }
        }
        Ok(())
    }

    fn to_queue(self, event_idx: bool) -> Result<Queue, virtio_queue::Error> {
        let mut queue = Queue::new(self.max_size)?;
        if self.ready {
            queue.try_set_size(self.size)?;
            queue.try_set_desc_table_address(GuestAddress(self.desc))?;
            queue.try_set_avail_ring_address(GuestAddress(self.driver))?;
            queue.try_set_used_ring_address(GuestAddress(self.device))?;
            queue.set_event_idx(event_idx);
            queue.set_ready(true);
        }
        Ok(queue)
    }
}

/// Errors creating a transport.
#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    #[error("{device}: queue {index} maximum size {size} is not a power of two in 1..=32768")]
    BadQueueMax {
        device: &'static str,
        index: usize,
        size: u16,
    },
    #[error("eventfd: {0}")]
    EventFd(#[source] std::io::Error),
}

/// One virtio device behind its virtio-mmio register window.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    interrupt: Interrupt,
    queue_events: Vec<EventFd>,
    queues: Vec<QueueConfig>,
    queue_select: u32,
    device_features_select: u32,
    driver_features_select: u32,
    acked_features: u64,
    status: u32,
    config_generation: u32,
    active: bool,
    misuse_warnings_left: u32,
    refusals: u64,
}

impl MmioTransport {
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
    ) -> Result<MmioTransport, MmioError> {
        let mut queues = Vec::new();
        let mut queue_events = Vec::new();
        for (index, &size) in device.queue_max_sizes().iter().enumerate() {
            if Queue::new(size).is_err() {
                return Err(MmioError::BadQueueMax {
                    device: device.name(),
                    index,
                    size,
                });
            }
            queues.push(QueueConfig::new(size));
            queue_events.push(EventFd::new(libc::EFD_NONBLOCK).map_err(MmioError::EventFd)?);
        }
        Ok(MmioTransport {
            device,
            mem,
            interrupt: Interrupt::new().map_err(MmioError::EventFd)?,
            queue_events,
            queues,
            queue_select: 0,
            device_features_select: 0,
            driver_features_select: 0,
            acked_features: 0,
            status: 0,
            config_generation: 0,
            active: false,
            misuse_warnings_left: MISUSE_WARNINGS,
            refusals: 0,
        })
    }

    /// One eventfd per queue, to register with KVM as ioeventfds on QueueNotify with the
    /// queue's index as the data match.
    pub fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    /// The device's interrupt; its irqfd goes to KVM.
    pub fn interrupt(&self) -> &Interrupt {
        &self.interrupt
    }

    /// The device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    pub fn device_name(&self) -> &'static str {
        self.device.name()
    }

    /// Requests the running device will still return used (see
    /// [`VirtioDevice::requests_in_flight`]); 0 while it is not running.
    pub fn requests_in_flight(&self) -> usize {
        if self.active && self.status & VIRTIO_CONFIG_S_NEEDS_RESET == 0 {
            self.device.requests_in_flight()
        } else {
            0
        }
    }

    /// How many driver accesses were refused so far.
    pub fn refusals(&self) -> u64 {
        self.refusals
    }

    /// Features offered to the driver: the device's own plus those of the transport.
    fn offered_features(&self) -> u64 {
        self.device.features() | (1 << VIRTIO_F_VERSION_1)
    }

    fn refuse(&mut self, offset: u64, value: u64, reason: &'static str) {
        let device = self.device.name();
        self.refusals += 1;
        if self.misuse_warnings_left > 0 {
            self.misuse_warnings_left -= 1;
            tracing::warn!(
                device,
                offset = format_args!("{offset:#x}"),
                value = format_args!("{value:#x}"),
                reason,
                "virtio-mmio: driver misuse refused"
            );
        } else {
            tracing::debug!(
                device,
                offset,
                value,
                reason,
                "virtio-mmio: driver misuse refused"
            );
        }
    }

    fn selected_queue(&self) -> Option<usize> {
        let index = self.queue_select as usize;
        (index < self.queues.len()).then_some(index)
    }

    fn read_register(&mut self, offset: u64) -> u32 {
        match offset {
            REG_MAGIC => MMIO_MAGIC,
            REG_VERSION => MMIO_VERSION,
            REG_DEVICE_ID => self.device.device_type(),
            REG_VENDOR_ID => MMIO_VENDOR_ID,
            REG_DEVICE_FEATURES => match self.device_features_select {
                0 => self.offered_features() as u32,
                1 => (self.offered_features() >> 32) as u32,
                _ => 0,
            },
            REG_QUEUE_NUM_MAX => self
                .selected_queue()
                .map_or(0, |q| u32::from(self.queues[q].max_size)),
            REG_QUEUE_READY => self
                .selected_queue()
                .map_or(0, |q| u32::from(self.queues[q].ready)),
            REG_INTERRUPT_STATUS => self.interrupt.status(),
            REG_STATUS => self.status,
            // No shared memory regions: a length of all ones says "none".
            REG_SHM_LEN_LOW | REG_SHM_LEN_HIGH => u32::MAX,
            REG_SHM_BASE_LOW | REG_SHM_BASE_HIGH => u32::MAX,
            REG_CONFIG_GENERATION => self
                .config_generation
                .wrapping_add(self.device.config_generation()),
            _ => {
                self.refuse(offset, 0, "read of a write-only or reserved register");
                0
            }
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_select = value,
            REG_DRIVER_FEATURES => self.write_driver_features(value),
            REG_DRIVER_FEATURES_SEL => self.driver_features_select = value,
            REG_QUEUE_SEL => self.queue_select = value,
            REG_QUEUE_NUM
            | REG_QUEUE_READY
            | REG_QUEUE_DESC_LOW
            | REG_QUEUE_DESC_HIGH
            | REG_QUEUE_DRIVER_LOW
            | REG_QUEUE_DRIVER_HIGH
            | REG_QUEUE_DEVICE_LOW
            | REG_QUEUE_DEVICE_HIGH => self.write_queue_register(offset, value),
            QUEUE_NOTIFY_OFFSET => {
                // KVM's ioeventfd normally takes these; only signal, never serve, on a vCPU.
                match self.queue_events.get(value as usize) {
                    Some(event) => {
                        if let Err(err) = event.write(1) {
                            tracing::error!(error = %err, "cannot signal a queue eventfd");
                        }
                    }
                    None => self.refuse(
                        offset,
                        value.into(),
                        "notify of a queue that does not exist",
                    ),
                }
            }
            REG_INTERRUPT_ACK => self.interrupt.ack(value),
            REG_STATUS => self.write_status(value),
            REG_SHM_SEL => {}
            _ => self.refuse(
                offset,
                value.into(),
                "write to a read-only or reserved register",
            ),
        }
    }

    fn write_driver_features(&mut self, value: u32) {
        let negotiating = self.status & VIRTIO_CONFIG_S_DRIVER != 0
            && self.status & (VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_FAILED) == 0;
        if !negotiating {
            self.refuse(
                REG_DRIVER_FEATURES,
                value.into(),
                "driver features written outside DRIVER..FEATURES_OK",
            );
            return;
        }
        match self.driver_features_select {
            0 => self.acked_features = (self.acked_features & !0xffff_ffff) | u64::from(value),
            1 => {
                self.acked_features = (self.acked_features & 0xffff_ffff) | (u64::from(value) << 32)
            }
            _ if value == 0 => {}
            _ => self.refuse(
                REG_DRIVER_FEATURES,
                value.into(),
                "features above bit 63 acknowledged",
            ),
        }
    }

    fn write_queue_register(&mut self, offset: u64, value: u32) {
        // Disabling a queue of a device that is not running is always fine: Linux does it for
        // each queue after resetting the device when a driver goes away.
        let not_running = self.status & VIRTIO_CONFIG_S_DRIVER_OK == 0;
        if offset == REG_QUEUE_READY && value == 0 && not_running {
            if let Some(index) = self.selected_queue() {
                self.queues[index].ready = false;
            }
            return;
        }
        let setting_up = self.status & VIRTIO_CONFIG_S_FEATURES_OK != 0
            && self.status & (VIRTIO_CONFIG_S_DRIVER_OK | VIRTIO_CONFIG_S_FAILED) == 0;
        if !setting_up {
            self.refuse(
                offset,
                value.into(),
                "queue register written outside FEATURES_OK..DRIVER_OK",
            );
            return;
        }
        let Some(index) = self.selected_queue() else {
            self.refuse(
                offset,
                value.into(),
                "queue register of a queue that does not exist",
            );
            return;
        };
        let queue = self.queues[index];
        if offset == REG_QUEUE_READY {
            match value {
                0 => self.queues[index].ready = false,
                1 => match queue.check(&self.mem) {
                    Ok(()) => self.queues[index].ready = true,
                    Err(reason) => self.refuse(offset, value.into(), reason),
                },
                _ => self.refuse(offset, value.into(), "QueueReady is 0 or 1"),
            }
            return;
        }
        if queue.ready {
            self.refuse(
                offset,
                value.into(),
                "configuration of a ready queue written (set QueueReady to 0 first)",
            );
            return;
        }
        let low = |old: u64| (old & !0xffff_ffff) | u64::from(value);
        let high = |old: u64| (old & 0xffff_ffff) | (u64::from(value) << 32);
        let q = &mut self.queues[index];
        match offset {
            REG_QUEUE_NUM => {
                let valid = value != 0 && value <= u32::from(q.max_size) && value.is_power_of_two();
                if valid {
                    q.size = value as u16;
                } else {
                    self.refuse(
                        offset,
                        value.into(),
                        "queue size 0, above QueueNumMax or not a power of two",
                    );
                }
            }
            REG_QUEUE_DESC_LOW => q.desc = low(q.desc),
            REG_QUEUE_DESC_HIGH => q.desc = high(q.desc),
            REG_QUEUE_DRIVER_LOW => q.driver = low(q.driver),
            REG_QUEUE_DRIVER_HIGH => q.driver = high(q.driver),
            REG_QUEUE_DEVICE_LOW => q.device = low(q.device),
            REG_QUEUE_DEVICE_HIGH => q.device = high(q.device),
            _ => {}
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        if value & old != old {
            self.refuse(
                REG_STATUS,
                value.into(),
                "status bits cleared without a reset",
            );
            return;
        }
        let new = value & !old;
        let mut status = old;
        if new & VIRTIO_CONFIG_S_FAILED != 0 {
            status |= VIRTIO_CONFIG_S_FAILED;
        }
        if new & VIRTIO_CONFIG_S_ACKNOWLEDGE != 0 {
            status |= VIRTIO_CONFIG_S_ACKNOWLEDGE;
        }
        if new & VIRTIO_CONFIG_S_DRIVER != 0 {
            if status & VIRTIO_CONFIG_S_ACKNOWLEDGE != 0 {
                status |= VIRTIO_CONFIG_S_DRIVER;
            } else {
                self.refuse(REG_STATUS, value.into(), "DRIVER before ACKNOWLEDGE");
            }
        }
        if new & VIRTIO_CONFIG_S_FEATURES_OK != 0 {
            let unoffered = self.acked_features & !self.offered_features();
            if status & VIRTIO_CONFIG_S_DRIVER == 0 {
                self.refuse(REG_STATUS, value.into(), "FEATURES_OK before DRIVER");
            } else if unoffered != 0 {
                self.refuse(
                    REG_STATUS,
                    unoffered,
                    "driver acknowledged features not offered",
                );
            } else if self.acked_features & (1 << VIRTIO_F_VERSION_1) == 0 {
                self.refuse(
                    REG_STATUS,
                    self.acked_features,
                    "VIRTIO_F_VERSION_1 not acknowledged (legacy drivers are not supported)",
                );
            } else {
                status |= VIRTIO_CONFIG_S_FEATURES_OK;
            }
        }
        if new & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            if status & VIRTIO_CONFIG_S_FEATURES_OK == 0 || status & VIRTIO_CONFIG_S_FAILED != 0 {
                self.refuse(
                    REG_STATUS,
                    value.into(),
                    "DRIVER_OK without FEATURES_OK (or after FAILED)",
                );
            } else {
                status |= VIRTIO_CONFIG_S_DRIVER_OK;
                self.status = status;
                self.activate();
                return;
            }
        }
        if new & VIRTIO_CONFIG_S_NEEDS_RESET != 0 {
            self.refuse(
                REG_STATUS,
                value.into(),
                "the driver cannot set NEEDS_RESET",
            );
        }
        self.status = status;
    }

    fn activate(&mut self) {
        let event_idx = self.acked_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let queues: Result<Vec<Queue>, _> = self
            .queues
            .iter()
            .map(|config| config.to_queue(event_idx))
            .collect();
        let result = match queues {
            Ok(queues) => self
                .device
                .activate(
                    self.mem.clone(),
                    queues,
                    self.interrupt.clone(),
                    self.acked_features,
                )
                .map_err(|e| e.to_string()),
            Err(err) => Err(err.to_string()),
        };
        match result {
            Ok(()) => {
                self.active = true;
                tracing::debug!(
                    device = self.device.name(),
                    features = format_args!("{:#x}", self.acked_features),
                    "virtio device activated"
                );
            }
            Err(error) => {
                tracing::warn!(device = self.device.name(), %error, "virtio device cannot start");
                self.set_needs_reset();
            }
        }
    }

    fn set_needs_reset(&mut self) {
        self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
        self.config_generation = self.config_generation.wrapping_add(1);
        self.interrupt.signal_config_change();
    }

    fn reset(&mut self) {
        if self.active {
            self.device.reset();
        }
        self.active = false;
        for queue in &mut self.queues {
            *queue = QueueConfig::new(queue.max_size);
        }
        for event in &self.queue_events {
            // Drop notifications of the old incarnation; an empty eventfd reads EAGAIN.
            let _ = event.read();
        }
        self.queue_select = 0;
        self.device_features_select = 0;
        self.driver_features_select = 0;
        self.acked_features = 0;
        self.status = 0;
        self.interrupt.clear();
    }

    /// Serves a notification of queue `index` (from the event loop).
    fn notify_queue(&mut self, index: usize) {
        if !self.active || self.status & VIRTIO_CONFIG_S_NEEDS_RESET != 0 {
            tracing::debug!(
                device = self.device.name(),
                queue = index,
                status = self.status,
                "notification while the device is not running; ignored"
            );
            return;
        }
        if !self.queues[index].ready {
            self.refuse(
                QUEUE_NOTIFY_OFFSET,
                index as u64,
                "notify of a queue that is not ready",
            );
            return;
        }
        match self.device.queue_notified(index) {
            Ok(false) => {}
            Ok(true) => {
                if let Err(err) = self.queue_events[index].write(1) {
                    tracing::error!(error = %err, "cannot re-signal a queue eventfd");
                }
            }
            Err(error) => {
                tracing::warn!(
                    device = self.device.name(),
                    %error,
                    "virtio queue broken by the driver: device needs a reset"
                );
                self.set_needs_reset();
            }
        }
    }
}

fn register_access_ok(offset: u64, len: usize) -> bool {
    len == 4 && offset.is_multiple_of(4)
}

/// Config-space accesses are as wide as the field (1, 2 or 4 bytes; 8 for 64-bit fields on
/// drivers that read them whole), naturally aligned.
fn config_access_ok(offset: u64, len: usize) -> bool {
    matches!(len, 1 | 2 | 4 | 8) && offset.is_multiple_of(len as u64)
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset >= CONFIG_SPACE_OFFSET {
            let config_offset = offset - CONFIG_SPACE_OFFSET;
            let end = config_offset.checked_add(data.len() as u64);
            if !config_access_ok(config_offset, data.len()) {
                self.refuse(
                    offset,
                    data.len() as u64,
                    "config space access of a bad width",
                );
            } else if end.is_none_or(|end| end > self.device.config_len()) {
                self.refuse(offset, data.len() as u64, "read past the config space");
            } else {
                self.device.read_config(config_offset, data);
            }
            return;
        }
        if !register_access_ok(offset, data.len()) {
            self.refuse(
                offset,
                data.len() as u64,
                "register read not 32 bits wide and aligned",
            );
            return;
        }
        let value = self.read_register(offset);
        data.copy_from_slice(&value.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            let config_offset = offset - CONFIG_SPACE_OFFSET;
            let end = config_offset.checked_add(data.len() as u64);
            if !config_access_ok(config_offset, data.len()) {
                self.refuse(
                    offset,
                    data.len() as u64,
                    "config space access of a bad width",
                );
            } else if end.is_none_or(|end| end > self.device.config_len()) {
                self.refuse(offset, data.len() as u64, "write past the config space");
            } else {
                self.device.write_config(config_offset, data);
            }
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            self.refuse(offset, data.len() as u64, "register write not 32 bits wide");
            return;
        };
        if !register_access_ok(offset, data.len()) {
            self.refuse(offset, data.len() as u64, "register write not aligned");
            return;
        }
        self.write_register(offset, u32::from_le_bytes(bytes));
    }
}

impl EventSubscriber for MmioTransport {
    fn event_fds(&self) -> Vec<RawFd> {
        let mut fds: Vec<RawFd> = self.queue_events.iter().map(|e| e.as_raw_fd()).collect();
        fds.extend(self.device.event_fds());
        fds
    }

    fn handle_event(&mut self, fd: RawFd) {
        if let Some(index) = self.queue_events.iter().position(|e| e.as_raw_fd() == fd) {
            // Reading resets the counter: several notifications before we ran are one.
            let _ = self.queue_events[index].read();
            self.notify_queue(index);
        } else if self.active && self.status & VIRTIO_CONFIG_S_NEEDS_RESET == 0 {
            // The device's own fds (a tap): served only while it runs; its queues are gone
            // or broken otherwise.
            if let Err(error) = self.device.handle_fd_event(fd) {
                tracing::warn!(
                    device = self.device.name(),
                    %error,
                    "virtio queue broken by the driver: device needs a reset"
                );
                self.set_needs_reset();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::bus::lock;
    use crate::devices::virtio::test_driver::{TestDriver, RING_AREA};
    use crate::devices::virtio::{ActivateError, DeviceError};
    use std::sync::{Arc, Mutex};

    /// What the transport handed the probe device.
    #[derive(Default)]
    struct Seen {
        activations: usize,
        notified: Vec<usize>,
        queues: Vec<Queue>,
    }

    /// A device that records what the transport hands it.
    struct Probe {
        seen: Arc<Mutex<Seen>>,
        config: [u8; 8],
    }

    fn probe() -> (Box<Probe>, Arc<Mutex<Seen>>) {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let device = Probe {
            seen: seen.clone(),
            config: [1, 2, 3, 4, 5, 6, 7, 8],
        };
        (Box::new(device), seen)
    }

    impl VirtioDevice for Probe {
        fn device_type(&self) -> u32 {
            42
        }
        fn name(&self) -> &'static str {
            "probe"
        }
        fn features(&self) -> u64 {
            1 << 3
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 8]
        }
        fn config_len(&self) -> u64 {
            8
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            super::super::read_config_bytes(&self.config, offset, data);
        }
        fn activate(
            &mut self,
            _mem: GuestMemoryMmap,
            queues: Vec<Queue>,
            _interrupt: Interrupt,
            _acked: u64,
        ) -> Result<(), ActivateError> {
            let mut seen = lock(&self.seen);
            seen.activations += 1;
            seen.queues = queues;
            Ok(())
        }
        fn queue_notified(&mut self, index: usize) -> Result<bool, DeviceError> {
            lock(&self.seen).notified.push(index);
            Ok(false)
        }
        fn reset(&mut self) {
            lock(&self.seen).queues.clear();
        }
    }

    #[test]
    fn identity_registers_and_bad_widths() {
        let (device, seen) = probe();
        let mut d = TestDriver::new(device);
        assert_eq!(d.read_reg(REG_MAGIC), MMIO_MAGIC);
        assert_eq!(d.read_reg(REG_VERSION), 2);
        assert_eq!(d.read_reg(REG_DEVICE_ID), 42);
        // A 2-byte read of a register is refused: zeros, not half a register.
        let mut half = [0xffu8; 2];
        d.transport.read(REG_MAGIC, &mut half);
        assert_eq!(half, [0, 0]);
        // A 1-byte write of Status is ignored.
        d.transport
            .write(REG_STATUS, &[VIRTIO_CONFIG_S_ACKNOWLEDGE as u8]);
        assert_eq!(d.read_reg(REG_STATUS), 0);
        // An unaligned 4-byte access is refused.
        let mut four = [0xffu8; 4];
        d.transport.read(REG_MAGIC + 2, &mut four);
        assert_eq!(four, [0; 4]);
        // Write-only registers read as 0.
        assert_eq!(d.read_reg(REG_QUEUE_NUM), 0);
        // The device still works after all that.
        d.init();
        d.setup_queue(0, 16);
        d.driver_ok();
        assert_eq!(lock(&seen).activations, 1);
    }

    #[test]
    fn features_not_offered_fail_the_features_ok_handshake() {
        let (device, seen) = probe();
        let mut d = TestDriver::new(device);
        d.write_reg(REG_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
        d.write_reg(
            REG_STATUS,
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER,
        );
        d.write_reg(REG_DEVICE_FEATURES_SEL, 0);
        assert_eq!(d.read_reg(REG_DEVICE_FEATURES), 1 << 3);
        d.write_reg(REG_DEVICE_FEATURES_SEL, 1);
        assert_eq!(d.read_reg(REG_DEVICE_FEATURES), 1); // VERSION_1
        d.write_reg(REG_DEVICE_FEATURES_SEL, 7);
        assert_eq!(d.read_reg(REG_DEVICE_FEATURES), 0);

        // Bit 5 was not offered.
        d.write_reg(REG_DRIVER_FEATURES_SEL, 0);
        d.write_reg(REG_DRIVER_FEATURES, (1 << 3) | (1 << 5));
        d.write_reg(REG_DRIVER_FEATURES_SEL, 1);
        d.write_reg(REG_DRIVER_FEATURES, 1);
        let want = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER;
        d.write_reg(REG_STATUS, want | VIRTIO_CONFIG_S_FEATURES_OK);
        assert_eq!(d.read_reg(REG_STATUS), want, "FEATURES_OK must not stick");
        // DRIVER_OK without FEATURES_OK is refused too.
        d.write_reg(REG_STATUS, want | VIRTIO_CONFIG_S_DRIVER_OK);
        assert_eq!(d.read_reg(REG_STATUS), want);
        assert_eq!(lock(&seen).activations, 0);

        // Without VERSION_1 (a legacy driver) it fails as well.
        d.write_reg(REG_DRIVER_FEATURES_SEL, 0);
        d.write_reg(REG_DRIVER_FEATURES, 1 << 3);
        d.write_reg(REG_DRIVER_FEATURES_SEL, 1);
        d.write_reg(REG_DRIVER_FEATURES, 0);
        d.write_reg(REG_STATUS, want | VIRTIO_CONFIG_S_FEATURES_OK);
        assert_eq!(d.read_reg(REG_STATUS), want);

        // Acknowledging a subset of what was offered works.
        d.write_reg(REG_DRIVER_FEATURES, 1);
        d.write_reg(REG_STATUS, want | VIRTIO_CONFIG_S_FEATURES_OK);
        assert_eq!(d.read_reg(REG_STATUS), want | VIRTIO_CONFIG_S_FEATURES_OK);
        // Features are frozen once FEATURES_OK is set.
        d.write_reg(REG_DRIVER_FEATURES, 0);
        d.setup_queue(0, 16);
        d.driver_ok();
        assert_eq!(lock(&seen).activations, 1);
        assert!(lock(&seen).queues[0].ready());
        assert!(!lock(&seen).queues[1].ready());
    }

    #[test]
    fn bad_queue_sizes_and_addresses_are_refused() {
        let (device, seen) = probe();
        let mut d = TestDriver::new(device);
        // Queue registers before FEATURES_OK are refused.
        d.write_reg(REG_QUEUE_SEL, 0);
        d.write_reg(REG_QUEUE_NUM, 4);
        d.init();
        d.write_reg(REG_QUEUE_SEL, 0);
        assert_eq!(d.read_reg(REG_QUEUE_NUM_MAX), 16);
        for bad in [0, 3, 12, 32, 0x1_0000] {
            d.write_reg(REG_QUEUE_NUM, bad);
        }
        // A queue that does not exist has no maximum and takes no set-up.
        d.write_reg(REG_QUEUE_SEL, 9);
        assert_eq!(d.read_reg(REG_QUEUE_NUM_MAX), 0);
        d.write_reg(REG_QUEUE_READY, 1);
        assert_eq!(d.read_reg(REG_QUEUE_READY), 0);

        d.write_reg(REG_QUEUE_SEL, 0);
        let set_rings = |d: &mut TestDriver, desc: u64, avail: u64, used: u64| {
            d.write_reg(REG_QUEUE_DESC_LOW, desc as u32);
            d.write_reg(REG_QUEUE_DESC_HIGH, (desc >> 32) as u32);
            d.write_reg(REG_QUEUE_DRIVER_LOW, avail as u32);
            d.write_reg(REG_QUEUE_DRIVER_HIGH, (avail >> 32) as u32);
            d.write_reg(REG_QUEUE_DEVICE_LOW, used as u32);
            d.write_reg(REG_QUEUE_DEVICE_HIGH, (used >> 32) as u32);
        };
        let mem_end = d.mem_size();
        let cases = [
            (RING_AREA + 8, RING_AREA + 0x1000, RING_AREA + 0x2000), // desc misaligned
            (RING_AREA, RING_AREA + 0x1001, RING_AREA + 0x2000),     // avail misaligned
            (RING_AREA, RING_AREA + 0x1000, RING_AREA + 0x2002),     // used misaligned
            (mem_end - 0x80, RING_AREA + 0x1000, RING_AREA + 0x2000), // desc runs off the end
            (RING_AREA, 1 << 40, RING_AREA + 0x2000),                // avail outside memory
            (RING_AREA, RING_AREA + 0x1000, u64::MAX - 3),           // used wraps
        ];
        for (desc, avail, used) in cases {
            set_rings(&mut d, desc, avail, used);
            d.write_reg(REG_QUEUE_READY, 1);
            assert_eq!(
                d.read_reg(REG_QUEUE_READY),
                0,
                "{desc:#x} {avail:#x} {used:#x}"
            );
        }
        // A good set-up is accepted, with the size the refused writes did not change.
        set_rings(&mut d, RING_AREA, RING_AREA + 0x1000, RING_AREA + 0x2000);
        d.write_reg(REG_QUEUE_READY, 1);
        assert_eq!(d.read_reg(REG_QUEUE_READY), 1);
        // A ready queue's configuration is frozen.
        d.write_reg(REG_QUEUE_NUM, 8);
        d.write_reg(REG_QUEUE_DESC_LOW, 0);
        d.driver_ok();
        {
            let seen = lock(&seen);
            assert_eq!(seen.queues[0].size(), 16);
            assert_eq!(seen.queues[0].desc_table(), RING_AREA);
        }
        // After DRIVER_OK, queue registers are frozen too.
        d.write_reg(REG_QUEUE_SEL, 1);
        d.write_reg(REG_QUEUE_READY, 1);
        assert_eq!(d.read_reg(REG_QUEUE_READY), 0);
    }

    #[test]
    fn notifications_reach_only_ready_queues_of_a_running_device() {
        let (device, seen) = probe();
        let mut d = TestDriver::new(device);
        // Before DRIVER_OK a notification is dropped.
        d.notify(0);
        d.init();
        d.setup_queue(0, 16);
        d.notify(0);
        assert!(lock(&seen).notified.is_empty());
        d.driver_ok();
        // Queue 1 was never made ready; queue 7 does not exist.
        d.notify(1);
        d.write_reg(QUEUE_NOTIFY_OFFSET, 7);
        d.notify(0);
        assert_eq!(lock(&seen).notified, vec![0]);
        // A notification KVM did not catch goes through the MMIO write: it only signals.
        d.write_reg(QUEUE_NOTIFY_OFFSET, 0);
        assert!(lock(&seen).notified.len() == 1);
        d.run_event_loop_once();
        assert_eq!(lock(&seen).notified, vec![0, 0]);
    }

    #[test]
    fn config_space_reads_stay_inside_it() {
        let (device, _seen) = probe();
        let mut d = TestDriver::new(device);
        let mut four = [0u8; 4];
        d.transport.read(CONFIG_SPACE_OFFSET + 4, &mut four);
        assert_eq!(four, [5, 6, 7, 8]);
        let mut byte = [0u8; 1];
        d.transport.read(CONFIG_SPACE_OFFSET + 1, &mut byte);
        assert_eq!(byte, [2]);
        // Past the end, straddling the end, misaligned, odd widths: zeros.
        for (offset, len) in [(8, 4), (6, 4), (0x1000 - 0x100 - 4, 4), (2, 4), (0, 3)] {
            let mut data = vec![0xffu8; len];
            d.transport.read(CONFIG_SPACE_OFFSET + offset, &mut data);
            assert!(data.iter().all(|&b| b == 0), "{offset} {len}: {data:?}");
        }
        d.transport
            .write(CONFIG_SPACE_OFFSET + 0x800, &[1, 2, 3, 4]);
        d.transport.read(CONFIG_SPACE_OFFSET, &mut four);
        assert_eq!(four, [1, 2, 3, 4]);
    }

    /// What Linux's virtio_mmio and virtio core do from probe to driver removal.
    #[test]
    fn the_linux_driver_sequence_is_never_refused() {
        let (device, seen) = probe();
        let mut d = TestDriver::new(device);
        assert_eq!(d.read_reg(REG_MAGIC), MMIO_MAGIC);
        assert_eq!(d.read_reg(REG_VERSION), 2);
        assert_eq!(d.read_reg(REG_DEVICE_ID), 42);
        assert_eq!(d.read_reg(REG_VENDOR_ID), MMIO_VENDOR_ID);
        d.write_reg(REG_STATUS, 0);
        d.init();
        for queue in 0..2 {
            d.write_reg(REG_QUEUE_SEL, queue);
            assert_eq!(d.read_reg(REG_QUEUE_READY), 0);
            assert_ne!(d.read_reg(REG_QUEUE_NUM_MAX), 0);
        }
        d.setup_queue(0, 16);
        d.setup_queue(1, 8);
        d.driver_ok();
        assert_eq!(d.read_reg(REG_CONFIG_GENERATION), 0);
        d.notify(1);
        d.take_interrupt();
        // Removal: reset, then each queue disabled.
        d.write_reg(REG_STATUS, 0);
        for queue in 0..2 {
            d.write_reg(REG_QUEUE_SEL, queue);
            d.write_reg(REG_QUEUE_READY, 0);
            assert_eq!(d.read_reg(REG_QUEUE_READY), 0);
        }
        assert_eq!(d.transport.refusals(), 0);
        assert_eq!(lock(&seen).notified, vec![1]);
        // Whereas a misuse counts.
        d.write_reg(REG_MAGIC, 1);
        assert_eq!(d.transport.refusals(), 1);
    }

    #[test]
    fn status_cannot_skip_steps_or_clear_bits_and_zero_resets() {
        let (device, seen) = probe();
        let mut d = TestDriver::new(device);
        d.write_reg(REG_STATUS, VIRTIO_CONFIG_S_DRIVER);
        assert_eq!(d.read_reg(REG_STATUS), 0, "DRIVER before ACKNOWLEDGE");
        d.init();
        d.setup_queue(0, 16);
        d.driver_ok();
        let running = d.read_reg(REG_STATUS);
        d.write_reg(REG_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
        assert_eq!(d.read_reg(REG_STATUS), running, "bits cannot be cleared");
        d.write_reg(REG_STATUS, running | VIRTIO_CONFIG_S_NEEDS_RESET);
        assert_eq!(
            d.read_reg(REG_STATUS),
            running,
            "NEEDS_RESET is the device's"
        );

        d.write_reg(REG_STATUS, 0);
        assert_eq!(d.read_reg(REG_STATUS), 0);
        d.write_reg(REG_QUEUE_SEL, 0);
        assert_eq!(d.read_reg(REG_QUEUE_READY), 0);
        assert!(lock(&seen).queues.is_empty(), "reset reached the device");
        // And it comes up again.
        d.init();
        d.setup_queue(0, 16);
        d.driver_ok();
        assert_eq!(lock(&seen).activations, 2);
        d.notify(0);
        assert_eq!(lock(&seen).notified, vec![0]);
    }
}
