//! The boot-complete port: the guest's init writes [`BOOT_COMPLETE_VALUE`] to
//! [`BOOT_TIMER_PORT`] when it is up, and the VMM records how long that took since its own start.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use super::bus::BusDevice;

/// I/O port the guest writes to (the same one Firecracker uses).
pub const BOOT_TIMER_PORT: u64 = 0x3f0;
/// The value that means "booted".
pub const BOOT_COMPLETE_VALUE: u8 = 123;

/// Milliseconds from VMM start to the guest's boot-complete write; 0 until it happens.
#[derive(Debug, Default, Clone)]
pub struct BootTime(Arc<AtomicU64>);

impl BootTime {
    pub fn millis(&self) -> Option<u64> {
        match self.0.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(ms),
        }
    }
}

pub struct BootTimer {
    start: Instant,
    recorded: BootTime,
}

impl BootTimer {
    pub fn new(start: Instant, recorded: BootTime) -> BootTimer {
        BootTimer { start, recorded }
    }
}

impl BusDevice for BootTimer {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == 0 && data == [BOOT_COMPLETE_VALUE] {
            let ms = (self.start.elapsed().as_millis() as u64).max(1);
            if self
                .recorded
                .0
                .compare_exchange(0, ms, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
            {
                tracing::info!(boot_ms = ms, "guest boot complete");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_the_first_boot_complete_only() {
        let recorded = BootTime::default();
        let mut timer = BootTimer::new(Instant::now(), recorded.clone());
        timer.write(0, &[1]);
        assert_eq!(recorded.millis(), None);
        timer.write(0, &[BOOT_COMPLETE_VALUE]);
        let first = recorded.millis().expect("recorded");
        std::thread::sleep(std::time::Duration::from_millis(5));
        timer.write(0, &[BOOT_COMPLETE_VALUE]);
        assert_eq!(recorded.millis(), Some(first));
    }
}
