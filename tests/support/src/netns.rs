//! Network namespaces that a test or a benchmark makes for itself, and what it puts in them:
//! taps, and raw `AF_PACKET` sockets that read and write frames on one interface.
//!
//! A [`NetNs`] is deleted when it drops (its taps first), also when the test fails or the
//! benchmark gives up; its operations return errors rather than panic, so that a benchmark,
//! whose release build aborts on panic, still gets to drop it.

use std::ffi::{CString, OsStr};
use std::fmt;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

fn run(cmd: &mut Command) -> Result<Output> {
    cmd.output().with_context(|| format!("cannot run {cmd:?}"))
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn mac_text(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A network namespace made by this process; deleted, with the taps made in it, on drop.
pub struct NetNs {
    name: String,
    taps: Vec<String>,
}

impl NetNs {
    /// Makes the namespace `name` (`ip netns add`).
    pub fn new(name: &str) -> Result<NetNs> {
        let out = run(Command::new("ip").args(["netns", "add", name]))?;
        ensure!(
            out.status.success(),
            "ip netns add {name}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(NetNs {
            name: name.to_string(),
            taps: Vec::new(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/<name>`, what `setns(2)` and `nsenter --net=` take.
    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// `program` run inside the namespace (`ip netns exec` execs it: the pid is the program's).
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// Runs `args` inside the namespace; its stdout, or an error with its stderr.
    pub fn run(&self, args: &[&str]) -> Result<String> {
        let out = run(self.command(args[0]).args(&args[1..]))?;
        ensure!(
            out.status.success(),
            "in {}: {}: {}",
            self.name,
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// A new tap `tap` in the namespace, up, with `address` (CIDR) if given, and IPv6 off so
    /// that the host sends nothing on it by itself. It is deleted before the namespace.
    pub fn add_tap(&mut self, tap: &str, address: Option<&str>) -> Result<()> {
        ensure!(tap.len() < 16, "{tap}: too long for an interface name");
        self.run(&["ip", "tuntap", "add", "dev", tap, "mode", "tap"])?;
        self.taps.push(tap.to_string());
        // Absent when the host kernel has no IPv6: nothing to turn off then.
        let _ = self.run(&[
            "sh",
            "-c",
            &format!("echo 1 > /proc/sys/net/ipv6/conf/{tap}/disable_ipv6"),
        ]);
        if let Some(address) = address {
            self.run(&["ip", "addr", "add", address, "dev", tap])?;
        }
        self.run(&["ip", "link", "set", tap, "up"])?;
        Ok(())
    }

    /// `ip link show dev NAME` in the namespace, or None if there is no such link.
    pub fn link(&self, name: &str) -> Option<String> {
        let out = run(Command::new("ip").args(["-n", &self.name, "link", "show", "dev", name]));
        out.ok()
            .filter(|out| out.status.success())
            .map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Names of every link in the namespace.
    pub fn links(&self) -> Vec<String> {
        let Ok(out) = run(Command::new("ip").args(["-n", &self.name, "-o", "link", "show"])) else {
            return Vec::new();
        };
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split(':').nth(1))
            .map(|n| n.trim().split('@').next().unwrap_or_default().to_string())
            .collect()
    }

    /// Moves the calling thread into the namespace (`setns` changes only the calling thread).
    pub fn enter(&self) -> Result<()> {
        let path = self.path();
        let ns = File::open(&path).with_context(|| path.display().to_string())?;
        // SAFETY: `ns` is an open namespace file; setns only changes this thread.
        let ret = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
        ensure!(
            ret == 0,
            "setns {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
        Ok(())
    }

    /// Runs `f` on a thread that has joined the namespace, so that sockets it makes live in
    /// the namespace.
    pub fn run_inside<T: Send>(&self, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    self.enter()?;
                    f()
                })
                .join()
                .unwrap_or_else(|_| bail!("the thread in {} panicked", self.name))
        })
    }
}

impl fmt::Display for NetNs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        for tap in &self.taps {
            let _ = run(self.command("ip").args(["link", "del", tap]));
        }
        match run(Command::new("ip").args(["netns", "del", &self.name])) {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!(
                "warning: ip netns del {}: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            Err(err) => eprintln!("warning: ip netns del {}: {err:#}", self.name),
        }
    }
}

/// An `AF_PACKET` socket bound to one interface and one EtherType: it receives what comes in
/// on the interface (from the VMM, for a tap) and sends frames out of it (to the VMM).
pub struct PacketSocket {
    fd: OwnedFd,
}

impl PacketSocket {
    /// Binds to `ifname`, which must be in the calling thread's namespace (see
    /// [`NetNs::run_inside`]).
    pub fn bind(ifname: &str, ethertype: u16) -> Result<PacketSocket> {
        let name = CString::new(ifname).context("interface name")?;
        // SAFETY: plain socket(2); the result is checked before use.
        let raw = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                i32::from(ethertype.to_be()),
            )
        };
        ensure!(
            raw >= 0,
            "AF_PACKET socket: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: `raw` is a socket we just opened and own from here on.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: `name` is NUL-terminated and outlives the call.
        let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
        ensure!(index != 0, "no interface {ifname} in the namespace");
        // SAFETY: all-zero bytes are a valid `sockaddr_ll`.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = ethertype.to_be();
        addr.sll_ifindex = index as i32;
        // SAFETY: `addr` is a live `sockaddr_ll` and the length given is its size.
        let ret = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        ensure!(
            ret == 0,
            "bind to {ifname}: {}",
            std::io::Error::last_os_error()
        );
        Ok(PacketSocket { fd })
    }

    /// The next frame, or None after `timeout`.
    pub fn recv(&self, timeout: Duration) -> Option<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            let mut poll = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one live pollfd, count 1.
            let ready = unsafe { libc::poll(&mut poll, 1, left.as_millis().min(1000) as i32) };
            if ready <= 0 {
                continue;
            }
            let mut buf = vec![0u8; 2048];
            // SAFETY: `buf` is a live, writable buffer of `buf.len()` bytes.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n > 0 {
                buf.truncate(n as usize);
                return Some(buf);
            }
        }
    }

    /// Sends one frame out of the interface.
    pub fn send(&self, frame: &[u8]) -> std::io::Result<()> {
        // SAFETY: `frame` is a live buffer of `frame.len()` bytes; the socket is bound, so the
        // kernel sends out of the bound interface.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        if n == frame.len() as isize {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }
}
