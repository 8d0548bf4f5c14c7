//! The host's lease as a file, shared by the agent (which renews it) and each fabric-vmm
//! (which stops its guest when it runs out, even if the agent is gone).
//!
//! The expiry is on CLOCK_BOOTTIME, which every process of the machine shares and which keeps
//! counting through suspend, together with the boot id, so a lease never survives a reboot.
//! The file is replaced atomically, so a reader sees a whole lease or the previous one.
//!
//! [`BootInstant`] is the agent's lease clock: CLOCK_BOOTTIME too, so that the lease the agent
//! holds in memory, the one it checks a heartbeat answer against and the one in the file all
//! count the time a host spends suspended (CLOCK_MONOTONIC, and so `std::time::Instant` and
//! tokio's timers, stop during suspend). Tests can move it forward with a test-only offset
//! ([`TEST_OFFSET_ENV`]) to show the agent what a suspend looks like; the file keeps real
//! CLOCK_BOOTTIME, so fabric-vmm is unaffected by the offset.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The lease file's contents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseFile {
    pub boot_id: String,
    /// Expiry on CLOCK_BOOTTIME, nanoseconds.
    pub expires_boottime_ns: u64,
}

/// CLOCK_BOOTTIME now, nanoseconds.
pub fn boottime_ns() -> u64 {
    // Linux has had CLOCK_BOOTTIME since 2.6.39; a lease read against a clock of 0 would look
    // valid for ever, so a failure here stops the caller rather than being read as 0.
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .expect("clock_gettime(CLOCK_BOOTTIME)");
    now.tv_sec() as u64 * 1_000_000_000 + now.tv_nsec() as u64
}

/// TEST ONLY, never set in production: the name of a file holding a whole number of
/// milliseconds that [`BootInstant::now`] adds to CLOCK_BOOTTIME, so that a test can make the
/// agent's lease clock jump forward while CLOCK_MONOTONIC does not, as a suspend does, without
/// touching the machine's clocks. The offset only ever grows (a smaller value is ignored), and
/// an unreadable file keeps the last value.
pub const TEST_OFFSET_ENV: &str = "FABRIC_TEST_BOOTTIME_OFFSET_FILE";

static TEST_OFFSET_FILE: OnceLock<Option<PathBuf>> = OnceLock::new();
static TEST_OFFSET_NS: AtomicU64 = AtomicU64::new(0);

/// The test-only file named by [`TEST_OFFSET_ENV`], if the process was given one.
pub fn test_offset_file() -> Option<&'static Path> {
    TEST_OFFSET_FILE
        .get_or_init(|| std::env::var_os(TEST_OFFSET_ENV).map(PathBuf::from))
        .as_deref()
}

fn test_offset_ns() -> u64 {
    let Some(path) = test_offset_file() else {
        return 0;
    };
    let read = std::fs::read_to_string(path)
        .ok()
        .and_then(|text| text.trim().parse::<u64>().ok())
        .map(|ms| ms.saturating_mul(1_000_000));
    if let Some(ns) = read {
        TEST_OFFSET_NS.fetch_max(ns, Ordering::SeqCst);
    }
    TEST_OFFSET_NS.load(Ordering::SeqCst)
}

/// A point on the agent's lease clock: CLOCK_BOOTTIME (plus the test-only offset, see
/// [`TEST_OFFSET_ENV`]), nanoseconds. It keeps counting while the host is suspended, unlike
/// `std::time::Instant`; a timer (which runs on CLOCK_MONOTONIC) that waits for one must
/// compare against [`BootInstant::now`] again when it wakes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BootInstant(u64);

impl BootInstant {
    pub fn now() -> BootInstant {
        BootInstant(boottime_ns().saturating_add(test_offset_ns()))
    }

    pub fn from_nanos(ns: u64) -> BootInstant {
        BootInstant(ns)
    }

    pub fn as_nanos(self) -> u64 {
        self.0
    }

    /// Time from `earlier` to `self`; zero when `earlier` is later.
    pub fn saturating_duration_since(self, earlier: BootInstant) -> Duration {
        Duration::from_nanos(self.0.saturating_sub(earlier.0))
    }

    /// Time from now until `self`; zero once it has passed.
    pub fn remaining(self) -> Duration {
        self.saturating_duration_since(BootInstant::now())
    }

    pub fn saturating_add(self, d: Duration) -> BootInstant {
        BootInstant(
            self.0
                .saturating_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)),
        )
    }
}

/// This boot's id (`/proc/sys/kernel/random/boot_id`).
pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

impl LeaseFile {
    /// A lease ending `left` from now.
    pub fn expiring_in(left: Duration) -> LeaseFile {
        LeaseFile {
            boot_id: boot_id(),
            expires_boottime_ns: boottime_ns().saturating_add(left.as_nanos() as u64),
        }
    }

    /// A lease ending at `expiry` on the agent's lease clock. The file holds real
    /// CLOCK_BOOTTIME: the time left is carried over, so the agent and fabric-vmm agree on it.
    pub fn expiring_at(expiry: BootInstant) -> LeaseFile {
        LeaseFile::expiring_in(expiry.remaining())
    }

    /// The expiry on the agent's lease clock, if the lease is still valid.
    pub fn expiry(&self) -> Option<BootInstant> {
        let left = self.remaining();
        (!left.is_zero()).then(|| BootInstant::now().saturating_add(left))
    }

    /// The expiry on the real CLOCK_BOOTTIME of this boot ([`boottime_ns`]), nanoseconds; 0
    /// when the lease is from another boot (expired).
    pub fn expiry_boottime_ns(&self) -> u64 {
        if self.boot_id != boot_id() {
            return 0;
        }
        self.expires_boottime_ns
    }

    /// Time left; zero when expired or from another boot.
    pub fn remaining(&self) -> Duration {
        if self.boot_id != boot_id() {
            return Duration::ZERO;
        }
        Duration::from_nanos(self.expires_boottime_ns.saturating_sub(boottime_ns()))
    }

    pub fn read(path: &Path) -> Result<LeaseFile, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Replaces the file atomically (temporary file, fsync, rename).
    pub fn write(&self, path: &Path) -> Result<(), String> {
        crate::fs::write_atomic(path, &serde_json::to_vec(self).unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_count_down_and_die_with_the_boot() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lease.json");
        let lease = LeaseFile::expiring_in(Duration::from_secs(60));
        lease.write(&path).unwrap();
        let back = LeaseFile::read(&path).unwrap();
        assert_eq!(back, lease);
        let left = back.remaining();
        assert!(left > Duration::from_secs(59) && left <= Duration::from_secs(60));
        let other_boot = LeaseFile {
            boot_id: "not-this-boot".into(),
            ..lease
        };
        assert_eq!(other_boot.remaining(), Duration::ZERO);
        assert_eq!(
            LeaseFile::expiring_in(Duration::ZERO).remaining(),
            Duration::ZERO
        );
        std::fs::write(&path, "{").unwrap();
        assert!(LeaseFile::read(&path).is_err());
    }

    #[test]
    fn the_lease_clock_counts_boot_time_and_the_file_carries_the_time_left() {
        let now = BootInstant::now();
        // Without the test-only offset, the lease clock is CLOCK_BOOTTIME itself.
        assert!(now.as_nanos() <= boottime_ns());
        let expiry = now.saturating_add(Duration::from_secs(30));
        assert_eq!(
            expiry.saturating_duration_since(now),
            Duration::from_secs(30)
        );
        assert_eq!(now.saturating_duration_since(expiry), Duration::ZERO);
        let file = LeaseFile::expiring_at(expiry);
        let back = file.expiry().expect("valid");
        let drift = back
            .saturating_duration_since(expiry)
            .max(expiry.saturating_duration_since(back));
        assert!(drift < Duration::from_millis(100), "{drift:?}");
        assert_eq!(LeaseFile::expiring_at(now).expiry(), None);
    }
}
