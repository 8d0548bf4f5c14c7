//! Watching processes the agent did not necessarily start: pidfds (which stay bound to one
//! process even if its pid is reused), process start times from /proc, and exit statuses.

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::Signal;
use nix::unistd::{sysconf, SysconfVar};

use tokio::io::unix::AsyncFd;

/// Start time of process `pid` in clock ticks since boot (`/proc/PID/stat` field 22).
pub fn start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may contain anything; fields after it
    // are space-separated. Field 22 is the 20th after the closing parenthesis.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// The wall-clock time process `pid` started, from its start ticks and the boot time.
pub fn start_time(pid: u32) -> Option<SystemTime> {
    let ticks = start_ticks(pid)?;
    let hz = sysconf(SysconfVar::CLK_TCK).ok()??;
    let hz = u64::try_from(hz).ok().filter(|&hz| hz > 0)?;
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let btime: u64 = stat
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()?;
    Some(UNIX_EPOCH + Duration::from_secs(btime) + Duration::from_millis(ticks * 1000 / hz))
}

/// The NUL-separated command line of `pid`, as one string with spaces.
pub fn cmdline(pid: u32) -> Option<String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        raw.split(|&b| b == 0)
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .collect::<Vec<_>>()
            .join(" "),
    )
}

/// A pidfd, readable once the process has exited.
pub struct PidFd {
    fd: AsyncFd<OwnedFd>,
    pid: u32,
}

impl PidFd {
    /// Opens a pidfd for `pid`.
    pub fn open(pid: u32) -> std::io::Result<PidFd> {
        let raw_pid = libc::pid_t::try_from(pid)
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
        // nix has no pidfd_open.
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, raw_pid, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: the syscall returned a new file descriptor that nothing else owns.
        let owned = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        // SAFETY: `owned` is an open pidfd, owned by the AsyncFd from here on; an OwnedFd
        // always returns the same descriptor.
        let fd = unsafe { AsyncFd::register_with_interest(owned, tokio::io::Interest::READABLE) }
            .map_err(std::io::Error::from)?;
        Ok(PidFd { fd, pid })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Resolves once the process has exited (cancel-safe).
    pub async fn wait(&self) {
        loop {
            match self.fd.readable().await {
                // A pidfd stays readable once the process exited; do not clear readiness.
                Ok(_guard) => return,
                Err(err) => {
                    tracing::warn!(pid = self.pid, error = %err, "polling a pidfd failed");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }

    /// True when the process has exited.
    pub fn has_exited(&self) -> bool {
        let mut fds = [PollFd::new(self.fd.get_ref().as_fd(), PollFlags::POLLIN)];
        poll(&mut fds, PollTimeout::ZERO).is_ok_and(|ready| ready > 0)
    }

    /// Sends `signal` to the process (no effect once it has been reaped).
    pub fn signal(&self, signal: Signal) -> std::io::Result<()> {
        // nix has no pidfd_send_signal.
        // SAFETY: pidfd_send_signal with a valid pidfd, a signal number, no siginfo, no flags.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.fd.get_ref().as_raw_fd(),
                signal as libc::c_int,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Reaps the exited process if it is a child of this one, returning a description and
    /// whether it exited with status 0. `None`: not our child (its status is unknown here).
    pub fn reap(&self) -> Option<(bool, String)> {
        // Not nix's waitid: its WaitStatus has no room for a signal outside nix's `Signal`
        // (SIGRTMIN+n), so it would reap such a child and then return EINVAL, losing the status.
        // SAFETY: zeroed siginfo_t is a valid value for waitid to fill.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waitid with P_PIDFD on a valid pidfd and a valid siginfo_t out pointer.
        let rc = unsafe {
            libc::waitid(
                libc::P_PIDFD,
                self.fd.get_ref().as_raw_fd() as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOHANG,
            )
        };
        if rc < 0 {
            return None;
        }
        // SAFETY: waitid filled `info` for a child state change (si_pid is 0 if none).
        let (pid, status, code) = unsafe { (info.si_pid(), info.si_status(), info.si_code) };
        if pid == 0 {
            return None;
        }
        Some(match code {
            libc::CLD_EXITED => (status == 0, format!("exited with status {status}")),
            libc::CLD_KILLED | libc::CLD_DUMPED => (
                false,
                format!("killed by signal {status} ({})", signal_name(status)),
            ),
            _ => (false, format!("ended (code {code}, status {status})")),
        })
    }
}

fn signal_name(signal: i32) -> &'static str {
    Signal::try_from(signal).map_or("signal", Signal::as_str)
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    #[allow(clippy::zombie_processes)] // the pidfd reaps it
    async fn a_pidfd_sees_its_child_exit_and_reaps_it() {
        let child = std::process::Command::new("sh")
            .args(["-c", "exit 3"])
            .spawn()
            .unwrap();
        let pidfd = PidFd::open(child.id()).unwrap();
        tokio::time::timeout(Duration::from_secs(10), pidfd.wait())
            .await
            .unwrap();
        assert!(pidfd.has_exited());
        let (clean, text) = pidfd.reap().expect("our child");
        assert!(!clean);
        assert_eq!(text, "exited with status 3");
    }

    #[tokio::test]
    #[allow(clippy::zombie_processes)] // the pidfd reaps it
    async fn killed_children_say_so() {
        let child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pidfd = PidFd::open(child.id()).unwrap();
        assert!(start_ticks(child.id()).is_some());
        assert!(start_time(child.id()).unwrap() <= fabric_proto::clock::now());
        // Right after fork the child may not have exec'd yet.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !cmdline(child.id()).unwrap_or_default().contains("sleep 30") {
            assert!(
                std::time::Instant::now() < deadline,
                "{:?}",
                cmdline(child.id())
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(!pidfd.has_exited());
        pidfd.signal(Signal::SIGKILL).unwrap();
        pidfd.wait().await;
        assert_eq!(
            pidfd.reap().unwrap(),
            (false, "killed by signal 9 (SIGKILL)".to_string())
        );
    }
}
