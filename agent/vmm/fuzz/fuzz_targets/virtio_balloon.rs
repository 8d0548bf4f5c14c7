//! Fuzzes virtio-balloon's request parsing on all four queues (inflate 0, deflate 1,
//! statistics 2, free page reporting 3; every feature offered): the input is a sequence of
//! rounds (see `fabric_agent_fuzz::Round`), each filling one queue's descriptor table,
//! available ring and data area (PFN arrays, statistics entries) of a running device before a
//! notification; bit 0 of a round's `host` field first asks for fresh statistics, so the
//! device returns the statistics buffer it holds. Inflated and reported pages are really
//! discarded (madvise) from the fuzz VM's memory.
//!
//! Checked: no panic; after every round (`Harness::run`) the used index of each queue advances
//! by at most the entries made available, and the inflate, deflate and reporting queues return
//! every chain whose head is in the table or the device sets DEVICE_NEEDS_RESET.
#![no_main]

use fabric_vmm::devices::virtio::balloon::{Balloon, BalloonConfig};
use fabric_vmm::devices::virtio::fuzzing::MEM_SIZE;
use fabric_agent_fuzz::{Harness, Input, Round, MAX_ROUNDS};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let config = BalloonConfig {
        deflate_on_oom: true,
        free_page_reporting: true,
        stats_period_s: 0,
    };
    let balloon = Balloon::new(config, MEM_SIZE >> 20).expect("balloon device");
    let handle = balloon.handle();
    // The statistics queue keeps its buffer until asked; the others answer at once.
    let mut harness = Harness::new(Box::new(balloon), &[true, true, false, true]);
    let mut input = Input::new(data);
    for _ in 0..MAX_ROUNDS {
        let Some(round) = Round::decode(&mut input) else {
            break;
        };
        if round.host & 1 != 0 {
            handle.request_stats();
        }
        harness.run(&round);
    }
});
