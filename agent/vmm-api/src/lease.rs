//! The host's lease as a file, shared by the agent (which renews it) and each fabric-vmm
//! (which stops its guest when it runs out, even if the agent is gone).
//!
//! The expiry is on CLOCK_BOOTTIME, which every process of the machine shares and which keeps
//! counting through suspend, together with the boot id, so a lease never survives a reboot.
//! The file has a fixed size ([`LEASE_FILE_BYTES`]) and each renewal overwrites it in place, so
//! renewing needs no free space: a full disk does not stop the host's VMs. A checksum in the
//! file tells a whole lease from a read that met a write half done; readers keep the lease
//! they had when it does not match.
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

    fn check(&self) -> u64 {
        fnv1a64(format!("{}/{}", self.boot_id, self.expires_boottime_ns).as_bytes())
    }

    /// The file's contents: JSON with its checksum, padded with spaces to
    /// [`LEASE_FILE_BYTES`].
    pub fn encode(&self) -> Vec<u8> {
        let stored = Stored {
            boot_id: self.boot_id.clone(),
            expires_boottime_ns: self.expires_boottime_ns,
            check: Some(self.check()),
        };
        let mut bytes = serde_json::to_vec(&stored).unwrap_or_default();
        if bytes.len() < LEASE_FILE_BYTES {
            bytes.resize(LEASE_FILE_BYTES - 1, b' ');
            bytes.push(b'\n');
        }
        bytes
    }

    /// Parses the file's contents. A file of [`LEASE_FILE_BYTES`] must carry a matching
    /// checksum (else it was read in the middle of a write); a file of another size was
    /// written whole by an older agent (temporary file and rename).
    pub fn decode(bytes: &[u8]) -> Result<LeaseFile, String> {
        let stored: Stored = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        let lease = LeaseFile {
            boot_id: stored.boot_id,
            expires_boottime_ns: stored.expires_boottime_ns,
        };
        match stored.check {
            Some(check) if check == lease.check() => Ok(lease),
            None if bytes.len() != LEASE_FILE_BYTES => Ok(lease),
            _ => Err("checksum mismatch (read during a write)".to_string()),
        }
    }

    pub fn read(path: &Path) -> Result<LeaseFile, String> {
        let bytes =
            std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        LeaseFile::decode(&bytes).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Writes the lease: in place over a lease file of [`LEASE_FILE_BYTES`] (which needs no
    /// free space), else (first write, or a file an older agent wrote) as a new file,
    /// atomically. Durable on return.
    pub fn write(&self, path: &Path) -> Result<(), String> {
        use std::os::unix::fs::FileExt;
        let bytes = self.encode();
        let in_place = std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .ok()
            .filter(|f| {
                f.metadata()
                    .is_ok_and(|m| m.len() == LEASE_FILE_BYTES as u64)
            });
        match in_place {
            Some(file) if bytes.len() == LEASE_FILE_BYTES => file
                .write_all_at(&bytes, 0)
                .and_then(|()| file.sync_data())
                .map_err(|e| format!("cannot write {}: {e}", path.display())),
            _ => crate::fs::write_atomic(path, &bytes),
        }
    }
}

/// The size of every lease file this version writes.
pub const LEASE_FILE_BYTES: usize = 256;

/// The lease file's JSON.
#[derive(Serialize, Deserialize)]
struct Stored {
    boot_id: String,
    expires_boottime_ns: u64,
    /// FNV-1a of `"{boot_id}/{expires_boottime_ns}"`; absent in files of older agents.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    check: Option<u64>,
}

/// FNV-1a, 64 bits: enough to tell a torn read, not a defence against anyone.
fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
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
    fn renewals_overwrite_the_file_in_place_and_a_torn_read_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lease.json");
        let first = LeaseFile::expiring_in(Duration::from_secs(10));
        first.write(&path).unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            LEASE_FILE_BYTES as u64
        );
        let inode = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&path).unwrap());
        let second = LeaseFile::expiring_in(Duration::from_secs(20));
        second.write(&path).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(
            std::os::unix::fs::MetadataExt::ino(&meta),
            inode,
            "not in place"
        );
        assert_eq!(LeaseFile::read(&path).unwrap(), second);

        // Half of one write over the other: the checksum no longer matches.
        let (a, b) = (first.encode(), second.encode());
        let digits = a.iter().zip(&b).position(|(x, y)| x != y).unwrap();
        let mut torn = b.clone();
        torn[..digits + 1].copy_from_slice(&b[..digits + 1]);
        torn[digits + 1..].copy_from_slice(&a[digits + 1..]);
        if torn != a && torn != b {
            assert!(
                LeaseFile::decode(&torn).is_err(),
                "{}",
                String::from_utf8_lossy(&torn)
            );
        }
        let mut forged = b.clone();
        let at = forged.iter().position(|&c| c == b'"').unwrap();
        forged[at + 1] = b'X';
        assert!(LeaseFile::decode(&forged).is_err());

        // A file an older agent wrote (no checksum, its own size) still reads.
        let old = format!(
            "{{\"boot_id\":\"{}\",\"expires_boottime_ns\":{}}}",
            second.boot_id, second.expires_boottime_ns
        );
        std::fs::write(&path, &old).unwrap();
        assert_eq!(LeaseFile::read(&path).unwrap(), second);
        // ...and is replaced by one of the fixed size at the next write.
        first.write(&path).unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            LEASE_FILE_BYTES as u64
        );
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
