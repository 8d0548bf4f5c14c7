//! Fuzzes virtio-rng's request parsing: the input is a sequence of rounds (see
//! `fabric_agent_fuzz::Round`), each filling the request queue's descriptor table, available
//! ring and data area of a running device before a notification.
//!
//! Checked after every round (`Harness::run`): no panic; the used index advances by at most
//! the entries made available; the device returns every chain whose head is in the table or
//! sets DEVICE_NEEDS_RESET.
#![no_main]

use fabric_vmm::devices::virtio::rng::Rng;
use fabric_agent_fuzz::{Harness, Input, Round, MAX_ROUNDS};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut harness = Harness::new(Box::new(Rng::new()), &[true]);
    let mut input = Input::new(data);
    for _ in 0..MAX_ROUNDS {
        let Some(round) = Round::decode(&mut input) else {
            break;
        };
        harness.run(&round);
    }
});
