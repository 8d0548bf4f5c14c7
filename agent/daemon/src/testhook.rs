//! TEST ONLY, never set in production: kill points. `FABRIC_TEST_KILL_AT` names points of a VM
//! start (comma-separated) at which the agent kills itself with SIGKILL, so that tests and the
//! nemesis (`bench/nemesis`) can check what a restarted agent finds there:
//!
//! - `during-pull`: an image download has started (its first chunk is written);
//! - `during-copy`: a disk copy has started (its partial file exists);
//! - `after-spawn`: a `fabric-vmm` process has been started, its pid not yet recorded.
//!
//! The agent logs a warning at start-up when the variable is set.

use std::sync::OnceLock;

/// The environment variable.
pub const KILL_AT_ENV: &str = "FABRIC_TEST_KILL_AT";

/// Every point the agent knows; others in the variable are refused at start-up.
pub const KILL_POINTS: [&str; 3] = ["during-pull", "during-copy", "after-spawn"];

static KILL_AT: OnceLock<Vec<String>> = OnceLock::new();

/// The kill points set for this process.
pub fn kill_points() -> &'static [String] {
    KILL_AT.get_or_init(|| {
        std::env::var(KILL_AT_ENV)
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(str::to_string)
            .collect()
    })
}

/// Kills this process (SIGKILL: no destructor, no flush) when `point` is one of the kill
/// points set.
pub fn kill_point(point: &str) {
    if kill_points().iter().any(|p| p == point) {
        tracing::error!(point, "{KILL_AT_ENV}: killing the agent (TEST ONLY)");
        let _ = nix::sys::signal::kill(nix::unistd::getpid(), nix::sys::signal::Signal::SIGKILL);
        // SIGKILL is not delivered to ourselves synchronously in every case; never go on.
        std::process::abort();
    }
}
