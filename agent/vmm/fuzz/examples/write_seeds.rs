//! Writes the seed inputs of every fuzz target into `seeds/<target>/`: valid requests (and a
//! few typical refusals) in each target's own encoding, from which libFuzzer starts mutating.
//!
//! `cargo run --example write_seeds` from `agent/vmm/fuzz`; the files are committed. Inputs that
//! once crashed a target (`regression-*`) are kept there too, by hand; this leaves them alone.

use std::path::Path;

use fabric_vmm::devices::virtio::fuzzing::{DATA_AREA, RING_AREA, RING_STRIDE};
use fabric_agent_fuzz::{encode_rounds, MmioOp, Round, R, W};

const D: u64 = DATA_AREA;

/// A virtio-blk request header: type, reserved, sector.
fn blk_header(request_type: u32, sector: u64) -> Vec<u8> {
    let mut h = request_type.to_le_bytes().to_vec();
    h.extend_from_slice(&[0; 4]);
    h.extend_from_slice(&sector.to_le_bytes());
    h
}

fn rng_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let one = Round::chains(0, &[&[(D, 16, W)]]);
    let two = Round::chains(
        0,
        &[
            &[(D, 8, W), (D + 0x100, 4096, W)],
            &[(D + 0x2000, 65536, W)],
        ],
    );
    let readable = Round::chains(0, &[&[(D, 16, R)]]);
    let mut lying = one.clone();
    lying.avail_advance = 1000;
    vec![
        (
            "one-request",
            encode_rounds(&[], std::slice::from_ref(&one)),
        ),
        ("two-chains", encode_rounds(&[], &[two])),
        (
            "readable-then-good",
            encode_rounds(&[], &[readable, one.clone()]),
        ),
        ("lying-avail-index", encode_rounds(&[], &[lying, one])),
    ]
}

fn blk_seeds() -> Vec<(&'static str, Vec<u8>)> {
    // Headers at D, D+0x10, D+0x20, D+0x30; status bytes at D+0x800..; data at D+0x1000...
    let mut headers = blk_header(0, 1); // IN
    headers.extend(blk_header(1, 2)); // OUT
    headers.extend(blk_header(4, 0)); // FLUSH
    headers.extend(blk_header(8, 0)); // GET_ID
    let requests = Round::chains(
        0,
        &[
            &[(D, 16, R), (D + 0x1000, 512, W), (D + 0x800, 1, W)],
            &[(D + 0x10, 16, R), (D + 0x2000, 512, R), (D + 0x801, 1, W)],
            &[(D + 0x20, 16, R), (D + 0x802, 1, W)],
            &[(D + 0x30, 16, R), (D + 0x3000, 20, W), (D + 0x803, 1, W)],
        ],
    )
    .with_data(0, headers);
    let mut odd_headers = blk_header(0, 30);
    odd_headers.extend(blk_header(0xff, 0));
    let odd = Round::chains(
        0,
        &[
            // Two sectors read into two buffers, the status byte in the last.
            &[(D, 16, R), (D + 0x1000, 512, W), (D + 0x4000, 513, W)],
            // An unknown request type.
            &[(D + 0x10, 16, R), (D + 0x801, 1, W)],
        ],
    )
    .with_data(0, odd_headers);
    let mut event_idx = Round::chains(0, &[&[(D, 16, R), (D + 0x1000, 512, W), (D + 0x800, 1, W)]])
        .with_data(0, blk_header(0, 3));
    event_idx.used_event = 0;
    event_idx.avail_flags = 1;
    let rw = [0u8];
    let ro = [1u8];
    vec![
        (
            "read-write-flush-getid",
            encode_rounds(&rw, std::slice::from_ref(&requests)),
        ),
        ("read-only-disk", encode_rounds(&ro, &[requests])),
        ("split-buffers-unknown-type", encode_rounds(&rw, &[odd])),
        (
            "event-idx",
            encode_rounds(&rw, &[event_idx.clone(), event_idx]),
        ),
    ]
}

fn net_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mut frame = vec![0u8; 12];
    frame.extend_from_slice(&[0xff; 6]);
    frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 1]);
    frame.extend_from_slice(&[0x88, 0xb5]);
    frame.resize(60, 0x5a);
    let tx = Round::chains(1, &[&[(D, 12, R), (D + 12, 48, R)]]).with_data(0, frame.clone());
    let tx_one = Round::chains(1, &[&[(D, 60, R)]]).with_data(0, frame);
    let rx = Round::chains(0, &[&[(D + 0x10000, 1526, W)]]).with_host(74);
    let rx_split = Round::chains(
        0,
        &[
            &[(D + 0x10000, 12, W), (D + 0x10100, 1514, W)],
            &[(D + 0x20000, 4096, W)],
        ],
    )
    .with_host(2000);
    vec![
        ("tx-header-and-frame", encode_rounds(&[], &[tx])),
        (
            "rx-one-frame",
            encode_rounds(&[], std::slice::from_ref(&rx)),
        ),
        (
            "rx-frame-too-long-then-fits",
            encode_rounds(&[], &[rx_split]),
        ),
        ("tx-and-rx", encode_rounds(&[], &[tx_one, rx])),
    ]
}

fn balloon_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let first = ((D + 0x10000) >> 12) as u32;
    let pfns: Vec<u8> = (first..first + 3).flat_map(u32::to_le_bytes).collect();
    let inflate = Round::chains(0, &[&[(D, 12, R)]]).with_data(0, pfns.clone());
    let deflate = Round::chains(1, &[&[(D, 12, R)]]).with_data(0, pfns);
    let mut stats = Vec::new();
    for (tag, value) in [(4u16, 1u64 << 20), (5, 4 << 20)] {
        stats.extend_from_slice(&tag.to_le_bytes());
        stats.extend_from_slice(&value.to_le_bytes());
    }
    let post_stats = Round::chains(2, &[&[(D + 0x100, 20, R)]]).with_data(0x100, stats);
    let again = post_stats.clone().with_host(1);
    let report = Round::chains(3, &[&[(D + 0x20000, 8192, W)]]);
    vec![
        (
            "inflate",
            encode_rounds(&[], std::slice::from_ref(&inflate)),
        ),
        ("inflate-deflate", encode_rounds(&[], &[inflate, deflate])),
        (
            "stats-asked-twice",
            encode_rounds(&[], &[post_stats, again]),
        ),
        ("free-page-report", encode_rounds(&[], &[report])),
    ]
}

/// The register sequence of Linux's virtio_mmio probe, for a device with `queues` queues,
/// acknowledging `features_low` and VIRTIO_F_VERSION_1; then a notification of queue 0 and a
/// reset.
fn linux_handshake(queues: u32, features_low: u32) -> Vec<MmioOp> {
    let mut ops = vec![
        MmioOp::r32(0x000),
        MmioOp::r32(0x004),
        MmioOp::r32(0x008),
        MmioOp::w32(0x070, 0),
        MmioOp::w32(0x070, 1),
        MmioOp::w32(0x070, 3),
        MmioOp::w32(0x014, 1),
        MmioOp::r32(0x010),
        MmioOp::w32(0x014, 0),
        MmioOp::r32(0x010),
        MmioOp::w32(0x024, 1),
        MmioOp::w32(0x020, 1),
        MmioOp::w32(0x024, 0),
        MmioOp::w32(0x020, features_low),
        MmioOp::w32(0x070, 0xb),
        MmioOp::r32(0x070),
    ];
    for q in 0..queues {
        let base = RING_AREA + u64::from(q) * RING_STRIDE;
        ops.extend([
            MmioOp::w32(0x030, q),
            MmioOp::r32(0x044),
            MmioOp::r32(0x034),
            MmioOp::w32(0x038, 256),
            MmioOp::w32(0x080, base as u32),
            MmioOp::w32(0x084, 0),
            MmioOp::w32(0x090, (base + 0x4000) as u32),
            MmioOp::w32(0x094, 0),
            MmioOp::w32(0x0a0, (base + 0x8000) as u32),
            MmioOp::w32(0x0a4, 0),
            MmioOp::w32(0x044, 1),
        ]);
    }
    ops.extend([
        MmioOp::w32(0x070, 0xf),
        MmioOp::Read {
            offset: 0x100,
            width: 1,
        },
        MmioOp::r32(0x100),
        MmioOp::r32(0x0fc),
        MmioOp::w32(0x050, 0),
        MmioOp::RunEventLoop,
        MmioOp::r32(0x060),
        MmioOp::w32(0x064, 1),
        MmioOp::w32(0x070, 0),
    ]);
    ops
}

fn mmio_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let encode = |device: u8, ops: &[MmioOp]| {
        let mut out = vec![device];
        for op in ops {
            op.encode(&mut out);
        }
        out
    };
    let misuse = [
        // Queue set-up before FEATURES_OK, registers of odd widths, a queue size that is not
        // a power of two, a misaligned ring, DRIVER_OK without FEATURES_OK.
        MmioOp::w32(0x070, 1),
        MmioOp::w32(0x070, 3),
        MmioOp::w32(0x038, 128),
        MmioOp::Write {
            offset: 0x070,
            width: 2,
            value: 0xb,
        },
        MmioOp::Read {
            offset: 0x030,
            width: 8,
        },
        MmioOp::w32(0x070, 0xb),
        MmioOp::w32(0x038, 100),
        MmioOp::w32(0x080, RING_AREA as u32 + 8),
        MmioOp::w32(0x044, 1),
        MmioOp::w32(0x070, 0x7),
        MmioOp::Write {
            offset: 0x108,
            width: 8,
            value: u64::MAX,
        },
    ];
    vec![
        ("rng-linux-handshake", encode(0, &linux_handshake(1, 0))),
        (
            "blk-linux-handshake",
            encode(1, &linux_handshake(1, 1 << 9)),
        ),
        (
            "net-linux-handshake",
            encode(2, &linux_handshake(2, 0x1_0020)),
        ),
        (
            "balloon-linux-handshake",
            encode(3, &linux_handshake(4, 0x26)),
        ),
        ("blk-misuse", encode(1, &misuse)),
    ]
}

fn main() -> std::io::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds");
    let targets = [
        ("virtio_rng", rng_seeds()),
        ("virtio_blk", blk_seeds()),
        ("virtio_net", net_seeds()),
        ("virtio_balloon", balloon_seeds()),
        ("virtio_mmio", mmio_seeds()),
    ];
    for (target, seeds) in targets {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir)?;
        for (name, bytes) in seeds {
            std::fs::write(dir.join(name), bytes)?;
        }
        println!("{}", dir.display());
    }
    Ok(())
}
