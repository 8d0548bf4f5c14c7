//! The COM1 16550 UART (vm-superio), its interrupt, and where its output goes.

use std::io::Write;
use std::sync::{Arc, Mutex};

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::bus::BusDevice;

/// COM1's port base and size.
pub const COM1_BASE: u64 = 0x3f8;
pub const COM1_LEN: u64 = 8;
/// COM1's IRQ line.
pub const COM1_IRQ: u32 = 4;

/// An interrupt line backed by an eventfd registered with KVM as an irqfd.
pub struct EventFdTrigger(pub EventFd);

impl Trigger for EventFdTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// Where console output goes. A shared buffer sink lets tests and the control endpoint read it.
pub enum ConsoleSink {
    Stdout(std::io::Stdout),
    /// A file, rotated at its limit ([`crate::logging::RotatingFile`]).
    File(crate::logging::RotatingFile),
    Buffer(Arc<Mutex<Vec<u8>>>),
    Off,
}

impl Write for ConsoleSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            ConsoleSink::Stdout(out) => out.write(buf),
            ConsoleSink::File(file) => file.write(buf),
            ConsoleSink::Buffer(shared) => {
                super::bus::lock(shared).extend_from_slice(buf);
                Ok(buf.len())
            }
            ConsoleSink::Off => Ok(buf.len()),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            ConsoleSink::Stdout(out) => out.flush(),
            ConsoleSink::File(file) => file.flush(),
            _ => Ok(()),
        }
    }
}

/// COM1 as a bus device.
pub struct SerialDevice {
    uart: Serial<EventFdTrigger, NoEvents, ConsoleSink>,
}

impl SerialDevice {
    pub fn new(interrupt: EventFd, sink: ConsoleSink) -> SerialDevice {
        SerialDevice {
            uart: Serial::new(EventFdTrigger(interrupt), sink),
        }
    }

    /// Queues host input (keystrokes) for the guest; returns how many bytes were taken.
    pub fn enqueue_input(&mut self, input: &[u8]) -> usize {
        let room = self.uart.fifo_capacity();
        let take = input.len().min(room);
        if take == 0 {
            return 0;
        }
        self.uart.enqueue_raw_bytes(&input[..take]).unwrap_or(0)
    }

    pub fn flush(&mut self) {
        let _ = self.uart.writer_mut().flush();
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() != 1 || offset >= COM1_LEN {
            data.fill(0xff);
            return;
        }
        data[0] = self.uart.read(offset as u8);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() != 1 || offset >= COM1_LEN {
            return;
        }
        if let Err(err) = self.uart.write(offset as u8, data[0]) {
            tracing::warn!(error = ?err, "serial write failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_written_to_thr_reach_the_sink() {
        let out = Arc::new(Mutex::new(Vec::new()));
        let irq = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let mut dev = SerialDevice::new(irq, ConsoleSink::Buffer(out.clone()));
        for b in b"hello\n" {
            dev.write(0, &[*b]);
        }
        assert_eq!(&*out.lock().expect("lock"), b"hello\n");
        // A wide access is refused without touching the UART.
        let mut wide = [0u8; 2];
        dev.read(0, &mut wide);
        assert_eq!(wide, [0xff, 0xff]);
    }

    #[test]
    fn input_is_readable_from_rbr() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let mut dev = SerialDevice::new(irq, ConsoleSink::Off);
        // Enable the "received data available" interrupt like a driver does.
        dev.write(1, &[0x01]);
        assert_eq!(dev.enqueue_input(b"x"), 1);
        let mut lsr = [0u8];
        dev.read(5, &mut lsr);
        assert_eq!(lsr[0] & 1, 1, "data ready");
        let mut rbr = [0u8];
        dev.read(0, &mut rbr);
        assert_eq!(rbr[0], b'x');
    }
}
