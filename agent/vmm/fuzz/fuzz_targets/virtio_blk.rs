//! Fuzzes virtio-blk's request parsing: after one byte choosing the disk (bit 0: read-only),
//! the input is a sequence of rounds (see `fabric_agent_fuzz::Round`), each filling the request
//! queue's descriptor table, available ring and data area (headers, sectors, status bytes) of a
//! running device before a notification. The disk is a 32-sector image whose sector n holds
//! byte n.
//!
//! Checked: no panic; after every round (`Harness::run`) the used index advances by at most
//! the entries made available and the device returns every chain whose head is in the table
//! or sets DEVICE_NEEDS_RESET; after the input, a read-only image is unchanged and a writable
//! one has kept its size (no write lands past the end of the disk). Reads, writes and flushes
//! run on the device's I/O threads with the image opened `cache=none` (direct I/O where its
//! filesystem has it, buffered for unaligned buffers); the test driver waits for them after
//! every notification, so the checks see every chain returned.
#![no_main]

use std::sync::OnceLock;

use fabric_vmm::devices::virtio::blk::{Block, CacheMode};
use fabric_agent_fuzz::{DiskImage, Harness, Input, Round, DISK_SECTORS, MAX_ROUNDS};
use libfuzzer_sys::fuzz_target;

/// Opened once per process; the writable image gets its pattern back before each input.
static IMAGES: OnceLock<(DiskImage, DiskImage)> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let (read_only_image, writable_image) =
        IMAGES.get_or_init(|| (DiskImage::new(), DiskImage::new()));
    let mut input = Input::new(data);
    let read_only = input.u8().unwrap_or_default() & 1 != 0;
    let image = if read_only {
        read_only_image
    } else {
        writable_image.restore();
        writable_image
    };
    let block =
        Block::open(&image.path(), read_only, CacheMode::None).expect("fuzz disk image opens");
    let mut harness = Harness::new(Box::new(block), &[true]);
    for _ in 0..MAX_ROUNDS {
        let Some(round) = Round::decode(&mut input) else {
            break;
        };
        harness.run(&round);
    }
    drop(harness);
    let contents = image.contents();
    assert_eq!(
        contents.len() as u64,
        DISK_SECTORS * 512,
        "the disk changed size"
    );
    if read_only {
        assert!(
            contents == DiskImage::pattern(),
            "a read-only disk was written"
        );
    }
});
