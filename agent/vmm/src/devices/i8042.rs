//! A minimal i8042 PS/2 controller: enough for the guest's reset (`reboot=k` writes 0xFE to the
//! command port) to end the VM, and for the host to send Ctrl-Alt-Del as keystrokes — the
//! graceful shutdown request a guest's init understands.

use std::collections::VecDeque;

use vmm_sys_util::eventfd::EventFd;

use super::bus::BusDevice;

/// Port base (data port 0x60; the status/command port is at offset 4, 0x64).
pub const I8042_BASE: u64 = 0x60;
pub const I8042_LEN: u64 = 5;
/// The keyboard's IRQ line.
pub const I8042_KBD_IRQ: u32 = 1;

const OFFSET_DATA: u64 = 0;
const OFFSET_STATUS: u64 = 4;

const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_KBD_TEST: u8 = 0xab;
const CMD_READ_OUTPUT_PORT: u8 = 0xd0;
const CMD_WRITE_OUTPUT_PORT: u8 = 0xd1;
const CMD_RESET_CPU: u8 = 0xfe;

const STATUS_OUTPUT_FULL: u8 = 0x01;
const STATUS_COMMAND_DATA: u8 = 0x08;
const STATUS_KBD_UNLOCKED: u8 = 0x10;

const CTR_KBD_INTERRUPT: u8 = 0x01;
const CTR_POST_OK: u8 = 0x04;

const SELF_TEST_OK: u8 = 0x55;
const KBD_ACK: u8 = 0xfa;
const BUFFER_SIZE: usize = 16;

/// Scan code set 2 for Ctrl, Alt, Delete (extended) presses.
const CTRL_ALT_DEL: [u8; 4] = [0x14, 0x11, 0xe0, 0x71];

/// Errors the host side can get when injecting keys.
#[derive(Debug, thiserror::Error)]
pub enum I8042Error {
    #[error("i8042 buffer full: the guest is not reading its keyboard")]
    BufferFull,
}

pub struct I8042Device {
    reset: EventFd,
    kbd_interrupt: EventFd,
    status: u8,
    control: u8,
    output_port: u8,
    pending_command: Option<u8>,
    buffer: VecDeque<u8>,
}

impl I8042Device {
    /// `reset` is signalled when the guest resets the CPU; `kbd_interrupt` raises IRQ 1.
    pub fn new(reset: EventFd, kbd_interrupt: EventFd) -> I8042Device {
        I8042Device {
            reset,
            kbd_interrupt,
            status: STATUS_KBD_UNLOCKED,
            control: CTR_POST_OK | CTR_KBD_INTERRUPT,
            output_port: 0,
            pending_command: None,
            buffer: VecDeque::with_capacity(BUFFER_SIZE),
        }
    }

    /// Presses Ctrl-Alt-Del.
    pub fn send_ctrl_alt_del(&mut self) -> Result<(), I8042Error> {
        if BUFFER_SIZE - self.buffer.len() < CTRL_ALT_DEL.len() {
            return Err(I8042Error::BufferFull);
        }
        for byte in CTRL_ALT_DEL {
            self.push(byte);
        }
        self.raise_interrupt();
        Ok(())
    }

    fn push(&mut self, byte: u8) {
        if self.buffer.len() < BUFFER_SIZE {
            self.buffer.push_back(byte);
        }
        self.status |= STATUS_OUTPUT_FULL;
    }

    fn reply(&mut self, byte: u8) {
        self.buffer.clear();
        self.push(byte);
    }

    fn raise_interrupt(&self) {
        if self.control & CTR_KBD_INTERRUPT != 0 {
            if let Err(err) = self.kbd_interrupt.write(1) {
                tracing::warn!(error = %err, "i8042: cannot raise keyboard interrupt");
            }
        }
    }
}

impl BusDevice for I8042Device {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() != 1 {
            data.fill(0xff);
            return;
        }
        data[0] = match offset {
            OFFSET_STATUS => self.status,
            OFFSET_DATA => {
                let byte = self.buffer.pop_front().unwrap_or(0);
                if self.buffer.is_empty() {
                    self.status &= !STATUS_OUTPUT_FULL;
                } else {
                    // More bytes waiting: tell the driver to come back.
                    self.raise_interrupt();
                }
                byte
            }
            _ => 0xff,
        };
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() != 1 {
            return;
        }
        let value = data[0];
        match offset {
            OFFSET_STATUS => match value {
                CMD_RESET_CPU => {
                    if let Err(err) = self.reset.write(1) {
                        tracing::error!(error = %err, "i8042: cannot signal reset");
                    }
                }
                CMD_READ_CTR => self.reply(self.control),
                CMD_READ_OUTPUT_PORT => self.reply(self.output_port),
                CMD_SELF_TEST => self.reply(SELF_TEST_OK),
                CMD_KBD_TEST => self.reply(0),
                CMD_WRITE_CTR | CMD_WRITE_OUTPUT_PORT => {
                    self.buffer.clear();
                    self.status &= !STATUS_OUTPUT_FULL;
                    self.status |= STATUS_COMMAND_DATA;
                    self.pending_command = Some(value);
                }
                _ => {}
            },
            OFFSET_DATA => match self.pending_command.take() {
                Some(CMD_WRITE_CTR) => {
                    self.control = value;
                    self.status &= !STATUS_COMMAND_DATA;
                }
                Some(_) => {
                    self.output_port = value;
                    self.status &= !STATUS_COMMAND_DATA;
                }
                None => {
                    // A command for the keyboard itself: a simple keyboard acknowledges all.
                    self.reply(KBD_ACK);
                    self.raise_interrupt();
                }
            },
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device() -> (I8042Device, EventFd, EventFd) {
        let reset = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let irq = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let dev = I8042Device::new(
            reset.try_clone().expect("clone"),
            irq.try_clone().expect("clone"),
        );
        (dev, reset, irq)
    }

    fn read(dev: &mut I8042Device, offset: u64) -> u8 {
        let mut b = [0u8];
        dev.read(offset, &mut b);
        b[0]
    }

    #[test]
    fn reset_command_signals_reset() {
        let (mut dev, reset, _) = device();
        assert!(reset.read().is_err(), "nothing signalled yet");
        dev.write(OFFSET_STATUS, &[CMD_RESET_CPU]);
        assert_eq!(reset.read().expect("reset signalled"), 1);
    }

    #[test]
    fn control_register_round_trips() {
        let (mut dev, _, _) = device();
        dev.write(OFFSET_STATUS, &[CMD_WRITE_CTR]);
        assert_ne!(read(&mut dev, OFFSET_STATUS) & STATUS_COMMAND_DATA, 0);
        dev.write(OFFSET_DATA, &[0x47]);
        dev.write(OFFSET_STATUS, &[CMD_READ_CTR]);
        assert_ne!(read(&mut dev, OFFSET_STATUS) & STATUS_OUTPUT_FULL, 0);
        assert_eq!(read(&mut dev, OFFSET_DATA), 0x47);
        assert_eq!(read(&mut dev, OFFSET_STATUS) & STATUS_OUTPUT_FULL, 0);
    }

    #[test]
    fn ctrl_alt_del_arrives_as_scancodes_with_interrupts() {
        let (mut dev, _, irq) = device();
        dev.send_ctrl_alt_del().expect("room");
        assert!(irq.read().expect("irq") >= 1);
        let bytes: Vec<u8> = (0..4).map(|_| read(&mut dev, OFFSET_DATA)).collect();
        assert_eq!(bytes, CTRL_ALT_DEL);
        assert_eq!(read(&mut dev, OFFSET_STATUS) & STATUS_OUTPUT_FULL, 0);
        // A guest that never reads its keyboard fills the buffer: an error, not a panic.
        for _ in 0..4 {
            dev.send_ctrl_alt_del().expect("room");
        }
        assert!(dev.send_ctrl_alt_del().is_err());
    }

    #[test]
    fn odd_accesses_are_harmless() {
        let (mut dev, reset, _) = device();
        let mut wide = [0u8; 2];
        dev.read(OFFSET_DATA, &mut wide);
        assert_eq!(wide, [0xff, 0xff]);
        dev.write(OFFSET_STATUS, &[CMD_RESET_CPU, 0]);
        assert!(reset.read().is_err(), "a wide write is not a reset");
        dev.write(2, &[CMD_RESET_CPU]);
        assert!(reset.read().is_err());
        assert_eq!(read(&mut dev, OFFSET_DATA), 0, "empty buffer reads 0");
        dev.write(OFFSET_DATA, &[0xf2]);
        assert_eq!(read(&mut dev, OFFSET_DATA), KBD_ACK);
    }
}
