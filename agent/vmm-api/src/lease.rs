//! The host's lease as a file, shared by the agent (which renews it) and each fabric-vmm
//! (which stops its guest when it runs out, even if the agent is gone).
//!
//! The expiry is on CLOCK_BOOTTIME, which every process of the machine shares and which keeps
//! counting through suspend, together with the boot id, so a lease never survives a reboot.
//! The file is replaced atomically, so a reader sees a whole lease or the previous one.

use std::path::Path;
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
}
