//! A bare network namespace for a test, made and removed with iproute2 (`ip netns`), with the
//! taps made in it: the test's devices, processes and packets stay in there, and the namespace
//! and its taps are removed when the value is dropped, pass or fail.
//!
//! Test code drives `ip` here, an independent view of the kernel's state, so that the crates
//! under test (which make their own devices over netlink) need no helper program.

use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A unique suffix per namespace or tap in this process: pid and a counter.
fn unique() -> String {
    format!(
        "{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::SeqCst)
    )
}

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// A network namespace made by the test, with the taps made in it; deleted on drop.
pub struct NetNs {
    pub name: String,
    taps: Vec<String>,
}

impl NetNs {
    /// A new namespace named `PREFIX-PID-N`.
    pub fn new(prefix: &str) -> NetNs {
        let name = format!("{prefix}-{}", unique());
        let out = run(Command::new("ip").args(["netns", "add", &name]));
        assert!(
            out.status.success(),
            "ip netns add {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        NetNs {
            name,
            taps: Vec::new(),
        }
    }

    /// `program` run inside the namespace (`ip netns exec` keeps the PID: it execs).
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// Runs a command in the namespace and panics if it fails.
    pub fn must(&self, args: &[&str]) {
        let out = run(self.command(args[0]).args(&args[1..]));
        assert!(
            out.status.success(),
            "in {}: {}: {}",
            self.name,
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A new tap in the namespace, up, with `address` (CIDR) if given, and IPv6 off so the
    /// host sends nothing on it by itself.
    pub fn add_tap(&mut self, address: Option<&str>) -> String {
        let tap = format!("fbt{}", unique());
        assert!(tap.len() < 16, "{tap}: too long for an interface name");
        self.must(&["ip", "tuntap", "add", "dev", &tap, "mode", "tap"]);
        self.taps.push(tap.clone());
        // Absent when the host kernel has no IPv6: nothing to turn off then.
        let _ = run(self.command("sh").args([
            "-c",
            &format!("echo 1 > /proc/sys/net/ipv6/conf/{tap}/disable_ipv6"),
        ]));
        if let Some(address) = address {
            self.must(&["ip", "addr", "add", address, "dev", &tap]);
        }
        self.must(&["ip", "link", "set", &tap, "up"]);
        tap
    }

    /// Runs `f` on a thread that has joined the namespace (`setns` changes only the calling
    /// thread), so sockets it makes live in the namespace.
    pub fn run_inside<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = Path::new("/run/netns").join(&self.name);
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let ns =
                        File::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                    // SAFETY: `ns` is an open namespace file; setns only changes this thread.
                    let ret = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
                    assert_eq!(
                        ret,
                        0,
                        "setns {}: {}",
                        path.display(),
                        std::io::Error::last_os_error()
                    );
                    f()
                })
                .join()
                .expect("namespace thread")
        })
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        for tap in &self.taps {
            let _ = run(self.command("ip").args(["link", "del", tap]));
        }
        let out = run(Command::new("ip").args(["netns", "del", &self.name]));
        if !out.status.success() {
            eprintln!(
                "warning: ip netns del {}: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}
