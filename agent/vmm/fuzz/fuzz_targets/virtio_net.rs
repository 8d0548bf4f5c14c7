//! Fuzzes virtio-net's request parsing on both queues: the input is a sequence of rounds (see
//! `fabric_agent_fuzz::Round`), each filling the RX (0) or TX (1) queue's descriptor table,
//! available ring and data area (frames to send) of a running device before a notification;
//! a round's `host` field makes the backend receive a frame of that length first, so RX
//! chains are parsed too.
//!
//! Checked: no panic; after every round (`Harness::run`) the used index of each queue advances
//! by at most the entries made available and the TX queue returns every chain whose head is in
//! the table or the device sets DEVICE_NEEDS_RESET; every frame handed to the backend is
//! between `MIN_FRAME_LEN` and `MAX_FRAME_LEN` bytes with its virtio-net header zeroed.
#![no_main]

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use fabric_vmm::devices::virtio::net::{
    FrameIo, Net, TxFrame, MAX_FRAME_LEN, MIN_FRAME_LEN, VNET_HDR_LEN,
};
use fabric_agent_fuzz::{Harness, Input, Round, MAX_ROUNDS};
use libfuzzer_sys::fuzz_target;
use vmm_sys_util::eventfd::EventFd;

/// The device's backend: frames to receive are queued by the target; frames sent are
/// checked and dropped.
struct Backend {
    inbox: Arc<Mutex<VecDeque<Vec<u8>>>>,
    /// Stands for the tap's fd (never read: the harness serves the device's fds every turn).
    readable: EventFd,
}

impl FrameIo for Backend {
    fn send(&mut self, frame: &TxFrame<'_>) -> std::io::Result<()> {
        let iovec_bytes: usize = frame.iovecs().iter().map(|v| v.iov_len).sum();
        assert_eq!(iovec_bytes, frame.len_with_header(), "iovecs and length disagree");
        let frame = frame.to_vec()?;
        assert!(
            (MIN_FRAME_LEN..=MAX_FRAME_LEN).contains(&frame.len()),
            "a frame of {} bytes reached the backend",
            frame.len()
        );
        assert!(
            frame[..VNET_HDR_LEN].iter().all(|&b| b == 0),
            "the guest's virtio-net header reached the backend"
        );
        Ok(())
    }

    fn recv(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let frame = self.inbox.lock().expect("inbox").pop_front();
        let Some(frame) = frame else {
            return Err(std::io::ErrorKind::WouldBlock.into());
        };
        let n = frame.len().min(buf.len());
        buf[..n].copy_from_slice(&frame[..n]);
        Ok(n)
    }

    fn raw_fd(&self) -> RawFd {
        self.readable.as_raw_fd()
    }
}

fuzz_target!(|data: &[u8]| {
    let inbox = Arc::new(Mutex::new(VecDeque::new()));
    let backend = Backend {
        inbox: inbox.clone(),
        readable: EventFd::new(0).expect("eventfd"),
    };
    let net = Net::new(Box::new(backend), [0x02, 0, 0, 0, 0, 1]).expect("net device");
    // RX waits for frames; TX must return every chain at once.
    let mut harness = Harness::new(Box::new(net), &[false, true]);
    let mut input = Input::new(data);
    for _ in 0..MAX_ROUNDS {
        let Some(round) = Round::decode(&mut input) else {
            break;
        };
        if round.host > 0 {
            let frame = (0..round.host).map(|i| i as u8).collect();
            inbox.lock().expect("inbox").push_back(frame);
        }
        harness.run(&round);
    }
});
