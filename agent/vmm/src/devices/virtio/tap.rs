//! A tap device opened by name: the host end of a virtio-net device.
//!
//! fabric-vmm never creates a tap. Whoever runs it creates one (`ip tuntap add dev NAME mode
//! tap`, in the network namespace fabric-vmm will run in) and passes its name. Opening is
//! `TUNSETIFF` on `/dev/net/tun` with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, non-blocking. A name
//! that is not an existing tap is refused: `TUNSETIFF` would otherwise quietly create a new tap
//! that nobody configured and that vanishes with the VMM.
//!
//! Every frame is prefixed, both ways, by the 12-byte virtio-net header (`virtio_net_hdr_v1`,
//! `TUNSETVNETHDRSZ`), the same layout the guest uses, and offloads are off (`TUNSETOFFLOAD 0`),
//! so the kernel hands over only complete, checksummed frames of at most the tap's MTU.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use super::net::{FrameIo, TxFrame, VNET_HDR_LEN};

/// The most iovecs one `writev` takes (Linux's `UIO_MAXIOV`).
const IOV_MAX: usize = 1024;

/// Errors opening a tap. The OS error is part of the message, not a `source`, so that the
/// one-line report of fabric-vmm does not print it twice.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("--net tap={name}: cannot open tap {name}: {reason}")]
    Open { name: String, reason: String },
    #[error("--net tap={name}: not a valid interface name ({why})")]
    BadName { name: String, why: &'static str },
}

/// An open tap device.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

/// The kernel's rules for interface names (`dev_valid_name`).
pub fn check_tap_name(name: &str) -> Result<(), TapError> {
    let bad = |why| {
        Err(TapError::BadName {
            name: name.to_string(),
            why,
        })
    };
    if name.is_empty() {
        return bad("empty");
    }
    if name.len() >= libc::IFNAMSIZ {
        return bad("longer than 15 bytes");
    }
    if name == "." || name == ".." {
        return bad("reserved");
    }
    if name
        .bytes()
        .any(|b| b == b'/' || b == b':' || b == 0 || b.is_ascii_whitespace())
    {
        return bad("contains '/', ':', NUL or whitespace");
    }
    Ok(())
}

// The TUN ioctls' numbers encode an int whatever they really take, hence the `_bad` forms with
// libc's request numbers. TUNSETIFF reads an ifreq and writes the final name back into it.
nix::ioctl_readwrite_bad!(tun_set_iff, libc::TUNSETIFF, libc::ifreq);
nix::ioctl_read_bad!(tun_get_iff, libc::TUNGETIFF, libc::ifreq);
nix::ioctl_write_ptr_bad!(tun_set_vnet_hdr_sz, libc::TUNSETVNETHDRSZ, libc::c_int);
// TUNSETOFFLOAD takes the flag word by value as an unsigned long: the non-`_bad` form passes
// that type (its computed number, _IOW('T', 208, int), is libc::TUNSETOFFLOAD; a test checks).
nix::ioctl_write_int!(tun_set_offload, b'T', 208);

/// An ioctl's errno as the io::Error text the messages have always carried
/// ("Device or resource busy (os error 16)").
fn os_error(errno: nix::errno::Errno) -> std::io::Error {
    std::io::Error::from(errno)
}

impl Tap {
    /// Opens the existing tap `name` for a virtio-net device.
    pub fn open(name: &str) -> Result<Tap, TapError> {
        check_tap_name(name)?;
        let fail = |reason: String| TapError::Open {
            name: name.to_string(),
            reason,
        };
        if nix::net::if_::if_nametoindex(name).is_err() {
            return Err(fail(format!(
                "no such network interface in this network namespace (create it first: ip tuntap add dev {name} mode tap)"
            )));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(|e| fail(format!("/dev/net/tun: {e}")))?;

        // SAFETY: `ifreq` is plain old data for which all-zero bytes are a valid value.
        let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in request.ifr_name.iter_mut().zip(name.bytes()) {
            *dst = src as libc::c_char;
        }
        request.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as _;
        // SAFETY: `file` is an open /dev/net/tun descriptor and `request` an initialised ifreq
        // that lives across the call; the kernel reads and writes only that struct.
        unsafe { tun_set_iff(file.as_raw_fd(), &mut request) }.map_err(|errno| {
            let e = os_error(errno);
            fail(match e.raw_os_error() {
                Some(libc::EBUSY) => format!("{e} (another process has it open)"),
                Some(libc::EINVAL) => format!("{e} (is it a tap, not a tun or another kind?)"),
                _ => e.to_string(),
            })
        })?;
        // A tap nobody holds exists only if it is persistent; without IFF_PERSIST, TUNSETIFF
        // just made a new one (the named interface went away after the check above).
        // SAFETY: as for TUNSETIFF; TUNGETIFF only writes the struct.
        unsafe { tun_get_iff(file.as_raw_fd(), &mut request) }
            .map_err(|errno| fail(format!("TUNGETIFF: {}", os_error(errno))))?;
        // SAFETY: TUNGETIFF filled `ifru_flags`, the member TUNSETIFF also used.
        let flags = i32::from(unsafe { request.ifr_ifru.ifru_flags });
        if flags & libc::IFF_PERSIST == 0 {
            return Err(fail("no such tap (it went away while opening)".into()));
        }
        let header_len = VNET_HDR_LEN as libc::c_int;
        // SAFETY: `file` is the attached tap; TUNSETVNETHDRSZ reads one c_int, which lives
        // across the call.
        unsafe { tun_set_vnet_hdr_sz(file.as_raw_fd(), &header_len) }.map_err(|errno| {
            fail(format!(
                "TUNSETVNETHDRSZ {VNET_HDR_LEN}: {}",
                os_error(errno)
            ))
        })?;
        // No offloads: the argument is the flag word itself, not a pointer.
        // SAFETY: TUNSETOFFLOAD reads only its integer argument, no memory of ours.
        unsafe { tun_set_offload(file.as_raw_fd(), 0) }
            .map_err(|errno| fail(format!("TUNSETOFFLOAD: {}", os_error(errno))))?;
        Ok(Tap {
            file,
            name: name.to_string(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl FrameIo for Tap {
    /// One `writev`: the tap takes a frame per write, and the frame's bytes go from guest
    /// memory to the kernel without a copy in the VMM.
    fn send(&mut self, frame: &TxFrame<'_>) -> std::io::Result<()> {
        let iovecs = frame.iovecs();
        let want = frame.len_with_header();
        loop {
            let written = if iovecs.len() <= IOV_MAX {
                // Raw writev, not nix's: that one takes `IoSlice`s, i.e. `&[u8]` over guest
                // memory the guest may change at any time, and a conversion pass per frame;
                // the iovecs built from the descriptor chain go to the kernel as they are.
                // SAFETY: every iovec is the device's header or a checked range of guest
                // memory, mapped for as long as the VM runs; writev only reads them.
                let n = unsafe {
                    libc::writev(self.file.as_raw_fd(), iovecs.as_ptr(), iovecs.len() as _)
                };
                if n < 0 {
                    Err(std::io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            } else {
                // A frame in more pieces than one writev takes: a guest's oddity, copied.
                (&self.file).write(&frame.to_vec()?)
            };
            match written {
                Ok(n) if n == want => return Ok(()),
                Ok(n) => {
                    return Err(std::io::Error::other(format!(
                        "short write to the tap: {n} of {want} bytes"
                    )))
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    fn recv(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        (&self.file).read(buf)
    }

    fn raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_offload_ioctl_has_the_kernels_number() {
        assert_eq!(
            nix::request_code_write!(b'T', 208, std::mem::size_of::<libc::c_int>()),
            libc::TUNSETOFFLOAD
        );
    }

    #[test]
    fn bad_names_are_refused_before_any_syscall() {
        for (name, why) in [
            ("", "empty"),
            ("a-very-long-tap-name", "longer than 15 bytes"),
            ("..", "reserved"),
            ("tap/0", "contains"),
            ("tap 0", "contains"),
        ] {
            let err = Tap::open(name).expect_err(name).to_string();
            assert!(err.contains(why), "{name:?}: {err}");
            assert!(err.starts_with(&format!("--net tap={name}: ")), "{err}");
        }
    }

    #[test]
    fn a_missing_tap_is_an_error_not_a_new_tap() {
        let name = format!("fbm{}", std::process::id());
        let err = Tap::open(&name).expect_err("missing tap").to_string();
        assert!(
            err.starts_with(&format!(
                "--net tap={name}: cannot open tap {name}: no such network interface"
            )),
            "{err}"
        );
        assert!(
            nix::net::if_::if_nametoindex(name.as_str()).is_err(),
            "opening must not have created {name}"
        );
    }

    #[test]
    fn an_interface_that_is_not_a_tap_is_refused() {
        // Loopback exists in every network namespace and is not a tap.
        match Tap::open("lo") {
            Ok(_) => panic!("lo opened as a tap"),
            Err(err) => {
                let err = err.to_string();
                assert!(
                    err.starts_with("--net tap=lo: cannot open tap lo: "),
                    "{err}"
                );
            }
        }
    }
}
