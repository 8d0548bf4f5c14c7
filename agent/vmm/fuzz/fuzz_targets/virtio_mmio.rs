//! Fuzzes the virtio-mmio transport: after one byte choosing the device behind it (rng, a
//! read-only blk, net or balloon), the input is a sequence of register accesses (see
//! `fabric_agent_fuzz::MmioOp`: any offset in the 4 KiB window, width 1, 2, 4 or 8, any value)
//! and turns of the event loop, which serve whatever queues the accesses set up and notified.
//!
//! Checked: no panic; after every access the status register keeps the handshake's order
//! (DRIVER needs ACKNOWLEDGE, FEATURES_OK needs DRIVER, DRIVER_OK needs FEATURES_OK,
//! DEVICE_NEEDS_RESET needs DRIVER_OK) and InterruptStatus holds only its two defined bits;
//! after the input, a reset and the Linux handshake bring the device up (every step accepted,
//! no NEEDS_RESET) and it serves a valid request.
#![no_main]

use std::os::fd::{AsRawFd, RawFd};
use std::sync::OnceLock;

use fabric_vmm::devices::bus::BusDevice;
use fabric_vmm::devices::virtio::balloon::{Balloon, BalloonConfig};
use fabric_vmm::devices::virtio::blk::{Block, CacheMode};
use fabric_vmm::devices::virtio::fuzzing::{TestDriver, DATA_AREA, MEM_SIZE, R, W};
use fabric_vmm::devices::virtio::net::{FrameIo, Net, TxFrame, TX_QUEUE};
use fabric_vmm::devices::virtio::rng::Rng;
use fabric_vmm::devices::virtio::VirtioDevice;
use fabric_vmm::devices::EventSubscriber;
use fabric_agent_fuzz::{DiskImage, Input, MmioOp, MAX_OPS};
use libfuzzer_sys::fuzz_target;
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

static IMAGE: OnceLock<DiskImage> = OnceLock::new();

/// A backend that takes every frame and never has one.
struct Sink(EventFd);

impl FrameIo for Sink {
    fn send(&mut self, _frame: &TxFrame<'_>) -> std::io::Result<()> {
        Ok(())
    }
    fn recv(&mut self, _buf: &mut [u8]) -> std::io::Result<usize> {
        Err(std::io::ErrorKind::WouldBlock.into())
    }
    fn raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

fn device(choice: u8) -> Box<dyn VirtioDevice> {
    match choice % 4 {
        0 => Box::new(Rng::new()),
        1 => {
            let image = IMAGE.get_or_init(DiskImage::new);
            Box::new(
                Block::open(&image.path(), true, CacheMode::None).expect("fuzz disk image opens"),
            )
        }
        2 => {
            let sink = Sink(EventFd::new(0).expect("eventfd"));
            Box::new(Net::new(Box::new(sink), [0x02, 0, 0, 0, 0, 1]).expect("net device"))
        }
        _ => {
            let config = BalloonConfig {
                deflate_on_oom: true,
                free_page_reporting: true,
                stats_period_s: 0,
            };
            Box::new(Balloon::new(config, MEM_SIZE >> 20).expect("balloon device"))
        }
    }
}

fn check_registers(d: &mut TestDriver) {
    let status = d.read_reg(0x70);
    let needs = [
        (VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_ACKNOWLEDGE),
        (VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_DRIVER),
        (VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK),
        (VIRTIO_CONFIG_S_NEEDS_RESET, VIRTIO_CONFIG_S_DRIVER_OK),
    ];
    for (bit, needed) in needs {
        assert!(
            status & bit == 0 || status & needed != 0,
            "status {status:#x}: bit {bit:#x} without {needed:#x}"
        );
    }
    let interrupt = d.read_reg(0x60);
    assert_eq!(interrupt & !3, 0, "InterruptStatus {interrupt:#x}");
}

/// A valid request on a request queue of the device: it must come back used.
fn serve_one_request(d: &mut TestDriver, choice: u8) {
    let queue = match choice % 4 {
        0 => {
            d.add_chain(0, &[(DATA_AREA, 16, W)]);
            0
        }
        1 => {
            // Read sector 1 (type IN, sector 1).
            let mut header = [0u8; 16];
            header[8] = 1;
            d.mem
                .write_slice(&header, GuestAddress(DATA_AREA))
                .expect("header");
            let buffers = [
                (DATA_AREA, 16, R),
                (DATA_AREA + 0x1000, 512, W),
                (DATA_AREA + 0x800, 1, W),
            ];
            d.add_chain(0, &buffers);
            0
        }
        2 => {
            d.add_chain(TX_QUEUE, &[(DATA_AREA, 60, R)]);
            TX_QUEUE
        }
        _ => {
            // Inflate one page, the one after the PFN array.
            let pfn = ((DATA_AREA + 0x1000) >> 12) as u32;
            d.mem
                .write_obj(pfn.to_le(), GuestAddress(DATA_AREA))
                .expect("pfn");
            d.add_chain(0, &[(DATA_AREA, 4, R)]);
            0
        }
    };
    d.notify(queue);
    assert_eq!(
        d.used_idx(queue),
        1,
        "a valid request after a reset not served"
    );
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let choice = input.u8().unwrap_or_default();
    let mut d = TestDriver::new(device(choice));
    let queue_fds: Vec<RawFd> = d
        .transport
        .queue_events()
        .iter()
        .map(|e| e.as_raw_fd())
        .collect();
    for _ in 0..MAX_OPS {
        let Some(op) = MmioOp::decode(&mut input) else {
            break;
        };
        match op {
            MmioOp::Read { offset, width } => {
                let mut buf = [0u8; 8];
                d.transport
                    .read(offset.into(), &mut buf[..usize::from(width)]);
            }
            MmioOp::Write {
                offset,
                width,
                value,
            } => {
                d.transport
                    .write(offset.into(), &value.to_le_bytes()[..usize::from(width)]);
            }
            MmioOp::RunEventLoop => {
                d.run_event_loop_once();
                for fd in d.transport.event_fds() {
                    if !queue_fds.contains(&fd) {
                        d.transport.handle_event(fd);
                    }
                }
            }
        }
        check_registers(&mut d);
    }
    d.restart();
    let up = VIRTIO_CONFIG_S_ACKNOWLEDGE
        | VIRTIO_CONFIG_S_DRIVER
        | VIRTIO_CONFIG_S_FEATURES_OK
        | VIRTIO_CONFIG_S_DRIVER_OK;
    assert_eq!(d.status(), up, "the handshake after a reset failed");
    serve_one_request(&mut d, choice);
});
