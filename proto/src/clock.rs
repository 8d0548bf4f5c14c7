//! The wall clock as the Fabric daemons read it: [`now`].
//!
//! TEST ONLY, never set in production: [`TEST_OFFSET_ENV`] names a file holding a signed whole
//! number of milliseconds that [`now`] adds to the machine's wall clock, read at every call,
//! so that a test (the nemesis, `bench/nemesis`) can make a daemon's wall clock jump forward
//! or back without touching the machine's clock. An unreadable or malformed file counts as 0.
//! No lease or fencing decision reads the wall clock (they use CLOCK_BOOTTIME on the agent
//! and the monotonic clock on the controller); what does (generations seeded from it,
//! timestamps, statistics ages) must hold up when it jumps.

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

/// The environment variable naming the offset file.
pub const TEST_OFFSET_ENV: &str = "FABRIC_TEST_WALLCLOCK_OFFSET_FILE";

static OFFSET_FILE: OnceLock<Option<PathBuf>> = OnceLock::new();

/// The test-only offset file, if this process was given one.
pub fn test_offset_file() -> Option<&'static std::path::Path> {
    OFFSET_FILE
        .get_or_init(|| std::env::var_os(TEST_OFFSET_ENV).map(PathBuf::from))
        .as_deref()
}

fn offset_ms() -> i64 {
    test_offset_file()
        .and_then(|path| std::fs::read_to_string(path).ok())
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(0)
}

/// The wall clock, moved by the test-only offset when one is set.
pub fn now() -> SystemTime {
    let now = SystemTime::now();
    if test_offset_file().is_none() {
        return now;
    }
    let offset = offset_ms();
    let magnitude = Duration::from_millis(offset.unsigned_abs());
    let moved = if offset >= 0 {
        now.checked_add(magnitude)
    } else {
        now.checked_sub(magnitude)
    };
    moved.unwrap_or(now)
}
