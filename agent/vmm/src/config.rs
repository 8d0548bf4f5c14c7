//! The configuration of one VM, as given on fabric-vmm's command line, and its checks.
//!
//! Every check that can be made before touching KVM is made here, so that a bad configuration
//! ends with one clear line and a non-zero exit, never a panic halfway through building a VM.
//!
//! It also decides where the virtio devices go ([`VmConfig::virtio_devices`]: disks in the order
//! given, so the first is `/dev/vda`, then the NICs in the order given, so the first is `eth0`,
//! then the rng, then the balloon), and so the kernel command line the guest
//! gets ([`VmConfig::kernel_cmdline`]: the user's plus one `virtio_mmio.device=` per device),
//! whose length is checked whole.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::boot::kernel::{detect_kernel_format, KernelFormat};
use crate::devices::virtio::balloon::{BalloonConfig, BalloonOptionError};
use crate::devices::virtio::blk::{open_disk, CacheMode};
use crate::devices::virtio::net::{derived_mac, format_mac, parse_mac};
use crate::devices::virtio::tap::{check_tap_name, Tap};
use crate::devices::virtio::{MmioSlot, MAX_VIRTIO_DEVICES};
use crate::memory::{host_memory_mib, MIN_MEMORY_MIB};

/// The longest kernel command line the x86 boot protocol carries (COMMAND_LINE_SIZE), NUL included.
pub const MAX_CMDLINE_LEN: usize = 2048;
/// xAPIC ids are 8 bits and 0xff is broadcast: the MP table cannot describe more vCPUs.
pub const MAX_VCPUS_XAPIC: u32 = 254;

/// Where the serial console goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsoleOutput {
    /// The VMM's own standard output (and input from its standard input).
    Stdout,
    /// Appended to a file.
    File(PathBuf),
    /// Discarded.
    Off,
}

impl std::str::FromStr for ConsoleOutput {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "stdout" | "-" => ConsoleOutput::Stdout,
            "off" | "none" => ConsoleOutput::Off,
            path => ConsoleOutput::File(PathBuf::from(path)),
        })
    }
}

/// A checked VM configuration.
#[derive(Debug, Clone)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub kernel_format: KernelFormat,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub console: ConsoleOutput,
    pub control_socket: Option<PathBuf>,
    /// virtio-blk disks, in the order the guest names them (vda, vdb, ...).
    pub disks: Vec<DiskConfig>,
    /// virtio-net devices over taps, in the order the guest names them (eth0, eth1, ...).
    pub nets: Vec<NetConfig>,
    /// A virtio-rng device.
    pub rng: bool,
    /// A virtio-balloon device.
    pub balloon: Option<BalloonConfig>,
}

/// One `--disk`: a raw image file, opened read-only if `read_only`, with direct I/O or
/// through the host page cache as `cache` says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    pub path: PathBuf,
    pub read_only: bool,
    pub cache: CacheMode,
}

/// One `--net`: a tap opened by name, and the guest's MAC (given, or derived from the name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    pub tap: String,
    pub mac: [u8; 6],
}

/// A virtio device of the VM, in placement order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VirtioDeviceConfig {
    Disk(DiskConfig),
    Net(NetConfig),
    Rng,
    Balloon(BalloonConfig),
}

impl VmConfig {
    /// The virtio devices with their MMIO windows and interrupt lines: disks first, in the
    /// order given, then the NICs, then the rng, then the balloon. The builder places them
    /// exactly so.
    pub fn virtio_devices(&self) -> Vec<(VirtioDeviceConfig, MmioSlot)> {
        let devices = self
            .disks
            .iter()
            .cloned()
            .map(VirtioDeviceConfig::Disk)
            .chain(self.nets.iter().cloned().map(VirtioDeviceConfig::Net))
            .chain(self.rng.then_some(VirtioDeviceConfig::Rng))
            .chain(self.balloon.map(VirtioDeviceConfig::Balloon));
        // `validate` made sure every device has a slot.
        devices
            .enumerate()
            .filter_map(|(index, device)| Some((device, MmioSlot::for_index(index)?)))
            .collect()
    }

    /// The command line the guest kernel gets: the user's, then the device announcements.
    pub fn kernel_cmdline(&self) -> String {
        kernel_cmdline(
            &self.cmdline,
            self.virtio_devices().iter().map(|(_, slot)| *slot),
        )
    }
}

fn kernel_cmdline(user: &str, slots: impl Iterator<Item = MmioSlot>) -> String {
    let mut cmdline = user.to_string();
    for slot in slots {
        if !cmdline.is_empty() {
            cmdline.push(' ');
        }
        cmdline.push_str(&slot.cmdline_arg());
    }
    cmdline
}

/// What was asked for, before checking.
#[derive(Debug, Clone)]
pub struct VmRequest {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub console: ConsoleOutput,
    pub control_socket: Option<PathBuf>,
    /// `--disk PATH[,ro][,cache=...]` values as given.
    pub disks: Vec<String>,
    /// `--net tap=NAME[,mac=MAC]` values as given.
    pub nets: Vec<String>,
    pub rng: bool,
    /// `--balloon [OPTIONS]` as given (empty: the defaults); `None` without `--balloon`.
    pub balloon: Option<String>,
}

/// Parses one `--disk` value: `PATH[,ro|rw][,cache=none|writeback]`, options in any order. A
/// comma inside the path stays part of it: only trailing parts without a `/` are options.
pub fn parse_disk(spec: &str) -> Result<DiskConfig, ConfigError> {
    let bad = |option: &str| ConfigError::DiskOption {
        spec: spec.to_string(),
        option: option.to_string(),
    };
    let twice = |option: &str| ConfigError::DiskOptionTwice {
        spec: spec.to_string(),
        option: option.to_string(),
    };
    let mut path = spec;
    let (mut read_only, mut cache) = (None, None);
    while let Some((rest, option)) = path.rsplit_once(',') {
        if option.contains('/') {
            break;
        }
        match (option, option.strip_prefix("cache=")) {
            ("ro" | "rw", _) if read_only.is_some() => return Err(twice(option)),
            ("ro" | "rw", _) => read_only = Some(option == "ro"),
            (_, Some(_)) if cache.is_some() => return Err(twice(option)),
            (_, Some(mode)) => cache = Some(CacheMode::parse(mode).ok_or_else(|| bad(option))?),
            _ => return Err(bad(option)),
        }
        path = rest;
    }
    if path.is_empty() {
        return Err(bad("(no path)"));
    }
    Ok(DiskConfig {
        path: PathBuf::from(path),
        read_only: read_only.unwrap_or(false),
        cache: cache.unwrap_or_default(),
    })
}

/// Parses one `--net` value: `tap=NAME` or `tap=NAME,mac=MAC`. Without a MAC the guest gets
/// a locally administered one derived from the tap's name.
pub fn parse_net(spec: &str) -> Result<NetConfig, ConfigError> {
    let bad = |reason: String| ConfigError::NetOption {
        spec: spec.to_string(),
        reason,
    };
    let (mut tap, mut mac) = (None, None);
    for part in spec.split(',') {
        match part.split_once('=') {
            Some(("tap", name)) if tap.is_none() => tap = Some(name),
            Some(("mac", text)) if mac.is_none() => {
                let parsed = parse_mac(text)
                    .ok_or_else(|| bad(format!("mac {text:?} is not six hex bytes")))?;
                if parsed[0] & 1 != 0 || parsed == [0; 6] {
                    return Err(bad(format!("mac {text} is not a unicast address")));
                }
                mac = Some(parsed);
            }
            _ => return Err(bad(format!("unknown or repeated option {part:?}"))),
        }
    }
    let tap = tap.ok_or_else(|| bad("no tap=NAME".to_string()))?;
    check_tap_name(tap)?;
    Ok(NetConfig {
        tap: tap.to_string(),
        mac: mac.unwrap_or_else(|| derived_mac(tap)),
    })
}

/// A configuration that cannot be run. Each message names the value that is wrong.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("kernel {path}: cannot read: {source}")]
    KernelUnreadable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "kernel {path}: not a kernel (neither a bzImage with the HdrS magic nor an x86-64 ELF)"
    )]
    NotAKernel { path: PathBuf },
    #[error("initrd {path}: cannot read: {source}")]
    InitrdUnreadable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("initrd {path}: {size} bytes does not fit in {memory_mib} MiB of guest memory")]
    InitrdTooLarge {
        path: PathBuf,
        size: u64,
        memory_mib: u64,
    },
    #[error("memory {0} MiB: must be at least {MIN_MEMORY_MIB} MiB")]
    MemoryTooSmall(u64),
    #[error("memory {requested} MiB: more than the host has ({host} MiB)")]
    MemoryTooLarge { requested: u64, host: u64 },
    #[error("vcpus 0: a VM needs at least one vCPU")]
    NoVcpus,
    #[error("vcpus {requested}: above the maximum of {max} ({why})")]
    TooManyVcpus {
        requested: u32,
        max: u32,
        why: &'static str,
    },
    #[error(
        "kernel command line is {len} bytes: too long for the boot protocol (at most {} bytes)",
        MAX_CMDLINE_LEN - 1
    )]
    CmdlineTooLong { len: usize },
    #[error("kernel command line contains a NUL byte")]
    CmdlineNul,
    #[error(
        "--disk {spec}: unknown option {option:?} (expected PATH[,ro][,cache=none|writeback])"
    )]
    DiskOption { spec: String, option: String },
    #[error("--disk {spec}: option {option:?} repeats one given already")]
    DiskOptionTwice { spec: String, option: String },
    #[error(transparent)]
    Disk(#[from] crate::devices::virtio::blk::BlockError),
    #[error(transparent)]
    Balloon(#[from] BalloonOptionError),
    #[error("--net {spec}: {reason} (expected tap=NAME[,mac=MAC])")]
    NetOption { spec: String, reason: String },
    #[error("--net tap={tap}: the tap is given twice (and could be opened only once)")]
    TapTwice { tap: String },
    #[error("--net tap={tap}: mac {mac} is also the mac of another --net")]
    MacTwice { tap: String, mac: String },
    #[error(transparent)]
    Tap(#[from] crate::devices::virtio::tap::TapError),
    #[error(
        "{count} virtio devices: at most {MAX_VIRTIO_DEVICES} fit on the interrupt controller"
    )]
    TooManyDevices { count: usize },
}

impl VmRequest {
    /// Checks everything that can be checked without KVM. `kvm_max_vcpus` is KVM's own limit.
    pub fn validate(self, kvm_max_vcpus: u32) -> Result<VmConfig, ConfigError> {
        if self.memory_mib < MIN_MEMORY_MIB {
            return Err(ConfigError::MemoryTooSmall(self.memory_mib));
        }
        if let Some(host) = host_memory_mib() {
            if self.memory_mib > host {
                return Err(ConfigError::MemoryTooLarge {
                    requested: self.memory_mib,
                    host,
                });
            }
        }
        if self.vcpus == 0 {
            return Err(ConfigError::NoVcpus);
        }
        if self.vcpus > kvm_max_vcpus {
            return Err(ConfigError::TooManyVcpus {
                requested: self.vcpus,
                max: kvm_max_vcpus,
                why: "KVM's maximum on this host",
            });
        }
        if self.vcpus > MAX_VCPUS_XAPIC {
            return Err(ConfigError::TooManyVcpus {
                requested: self.vcpus,
                max: MAX_VCPUS_XAPIC,
                why: "xAPIC ids in the MP table",
            });
        }
        let disks = self
            .disks
            .iter()
            .map(|spec| parse_disk(spec))
            .collect::<Result<Vec<_>, _>>()?;
        let nets = self
            .nets
            .iter()
            .map(|spec| parse_net(spec))
            .collect::<Result<Vec<_>, _>>()?;
        for (index, net) in nets.iter().enumerate() {
            if let Some(earlier) = nets[..index].iter().find(|n| n.tap == net.tap) {
                return Err(ConfigError::TapTwice {
                    tap: earlier.tap.clone(),
                });
            }
            if nets[..index].iter().any(|n| n.mac == net.mac) {
                return Err(ConfigError::MacTwice {
                    tap: net.tap.clone(),
                    mac: format_mac(&net.mac),
                });
            }
        }
        let balloon = self
            .balloon
            .as_deref()
            .map(BalloonConfig::parse)
            .transpose()?;
        let device_count =
            disks.len() + nets.len() + usize::from(self.rng) + usize::from(balloon.is_some());
        if device_count > MAX_VIRTIO_DEVICES {
            return Err(ConfigError::TooManyDevices {
                count: device_count,
            });
        }
        // What the guest gets is the user's line plus the device announcements: count both.
        let full_len = kernel_cmdline(
            &self.cmdline,
            (0..device_count).filter_map(MmioSlot::for_index),
        )
        .len();
        if full_len >= MAX_CMDLINE_LEN {
            return Err(ConfigError::CmdlineTooLong { len: full_len });
        }
        if self.cmdline.contains('\0') {
            return Err(ConfigError::CmdlineNul);
        }
        let kernel_format = read_kernel_format(&self.kernel)?;
        for disk in &disks {
            // Opened as the device will open it, so a read-only image needs only read access.
            open_disk(&disk.path, disk.read_only)?;
        }
        for net in &nets {
            // Proves the tap exists, is a tap and is free; the builder opens it again.
            Tap::open(&net.tap)?;
        }
        if let Some(initrd) = &self.initrd {
            let size = std::fs::metadata(initrd)
                .and_then(|m| {
                    // Opening proves it is readable, not just present.
                    File::open(initrd)?;
                    Ok(m.len())
                })
                .map_err(|source| ConfigError::InitrdUnreadable {
                    path: initrd.clone(),
                    source,
                })?;
            // The kernel itself and the boot structures need room too; the exact placement is
            // checked again when the initrd is loaded, this catches the obvious case early.
            if size >= self.memory_mib << 20 {
                return Err(ConfigError::InitrdTooLarge {
                    path: initrd.clone(),
                    size,
                    memory_mib: self.memory_mib,
                });
            }
        }
        Ok(VmConfig {
            kernel: self.kernel,
            kernel_format,
            initrd: self.initrd,
            cmdline: self.cmdline,
            vcpus: self.vcpus,
            memory_mib: self.memory_mib,
            console: self.console,
            control_socket: self.control_socket,
            disks,
            nets,
            rng: self.rng,
            balloon,
        })
    }
}

fn read_kernel_format(path: &Path) -> Result<KernelFormat, ConfigError> {
    let unreadable = |source| ConfigError::KernelUnreadable {
        path: path.to_owned(),
        source,
    };
    let mut file = File::open(path).map_err(unreadable)?;
    if file.metadata().map_err(unreadable)?.is_dir() {
        return Err(unreadable(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "is a directory",
        )));
    }
    let mut head = Vec::with_capacity(1024);
    file.by_ref()
        .take(1024)
        .read_to_end(&mut head)
        .map_err(unreadable)?;
    detect_kernel_format(&head).ok_or_else(|| ConfigError::NotAKernel {
        path: path.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(kernel: &Path) -> VmRequest {
        VmRequest {
            kernel: kernel.to_owned(),
            initrd: None,
            cmdline: "console=ttyS0".into(),
            vcpus: 1,
            memory_mib: 128,
            console: ConsoleOutput::Off,
            control_socket: None,
            disks: Vec::new(),
            nets: Vec::new(),
            rng: false,
            balloon: None,
        }
    }

    fn fake_elf(dir: &Path) -> PathBuf {
        let path = dir.join("vmlinux");
        let mut head = vec![0u8; 64];
        head[..4].copy_from_slice(b"\x7fELF");
        head[4] = 2; // 64-bit
        head[18] = 62; // EM_X86_64
        std::fs::write(&path, head).expect("write");
        path
    }

    #[test]
    fn each_bad_value_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let kernel = fake_elf(dir.path());
        let cases: Vec<(VmRequest, &str)> = vec![
            (
                VmRequest {
                    memory_mib: 0,
                    ..request(&kernel)
                },
                "memory 0 MiB",
            ),
            (
                VmRequest {
                    memory_mib: 1 << 40,
                    ..request(&kernel)
                },
                "more than the host has",
            ),
            (
                VmRequest {
                    vcpus: 0,
                    ..request(&kernel)
                },
                "vcpus 0",
            ),
            (
                VmRequest {
                    vcpus: 100_000,
                    ..request(&kernel)
                },
                "vcpus 100000: above the maximum of 64",
            ),
            (
                VmRequest {
                    cmdline: "x".repeat(3000),
                    ..request(&kernel)
                },
                "too long for the boot protocol",
            ),
            (
                VmRequest {
                    kernel: dir.path().join("missing"),
                    ..request(&kernel)
                },
                "cannot read",
            ),
            (
                VmRequest {
                    initrd: Some(dir.path().join("missing.cpio")),
                    ..request(&kernel)
                },
                "initrd",
            ),
        ];
        for (req, want) in cases {
            let err = req.validate(64).expect_err(want).to_string();
            assert!(err.contains(want), "{err:?} should contain {want:?}");
        }
    }

    #[test]
    fn a_text_file_is_not_a_kernel() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notes.txt");
        std::fs::write(&path, "hello").expect("write");
        let err = request(&path).validate(64).expect_err("not a kernel");
        assert!(matches!(err, ConfigError::NotAKernel { .. }), "{err}");
    }

    #[test]
    fn disk_specs_parse_and_bad_options_are_named() {
        assert_eq!(
            parse_disk("/x/a.img,ro").expect("ro"),
            DiskConfig {
                path: "/x/a.img".into(),
                read_only: true,
                cache: CacheMode::None,
            }
        );
        let rw = parse_disk("/x/a.img").expect("rw");
        assert!(!rw.read_only);
        assert_eq!(rw.cache, CacheMode::None, "direct I/O by default");
        assert_eq!(
            parse_disk("/x/a,b/c.img").expect("comma").path,
            Path::new("/x/a,b/c.img")
        );
        for spec in ["/x/a.img,cache=writeback,ro", "/x/a.img,ro,cache=writeback"] {
            assert_eq!(
                parse_disk(spec).expect(spec),
                DiskConfig {
                    path: "/x/a.img".into(),
                    read_only: true,
                    cache: CacheMode::Writeback,
                }
            );
        }
        assert_eq!(
            parse_disk("/x/a.img,cache=none").expect("none").cache,
            CacheMode::None
        );
        let err = parse_disk("/x/a.img,readonly").expect_err("bad option");
        assert_eq!(
            err.to_string(),
            "--disk /x/a.img,readonly: unknown option \"readonly\" \
             (expected PATH[,ro][,cache=none|writeback])"
        );
        let err = parse_disk("/x/a.img,cache=unsafe").expect_err("bad mode");
        assert!(
            err.to_string().contains("unknown option \"cache=unsafe\""),
            "{err}"
        );
        let err = parse_disk("/x/a.img,ro,rw").expect_err("ro and rw");
        assert_eq!(
            err.to_string(),
            "--disk /x/a.img,ro,rw: option \"ro\" repeats one given already"
        );
        assert!(parse_disk("/x/a.img,cache=none,cache=writeback").is_err());
        assert!(parse_disk(",ro").is_err());
        assert!(parse_disk("cache=none").is_ok(), "a file named cache=none");
    }

    #[test]
    fn disks_that_cannot_be_opened_are_config_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let kernel = fake_elf(dir.path());
        let missing = dir.path().join("missing.img");
        let err = VmRequest {
            disks: vec![format!("{},ro", missing.display())],
            ..request(&kernel)
        }
        .validate(64)
        .expect_err("missing disk");
        assert_eq!(
            err.to_string(),
            format!(
                "--disk {}: cannot open: No such file or directory (os error 2)",
                missing.display()
            )
        );
        let err = VmRequest {
            disks: vec![dir.path().display().to_string()],
            ..request(&kernel)
        }
        .validate(64)
        .expect_err("a directory");
        assert!(err.to_string().starts_with("--disk "), "{err}");
    }

    #[test]
    fn devices_are_placed_in_order_and_announced_on_the_cmdline() {
        let dir = tempfile::tempdir().expect("tempdir");
        let kernel = fake_elf(dir.path());
        let (a, b) = (dir.path().join("a.img"), dir.path().join("b.img"));
        std::fs::write(&a, [0u8; 1024]).expect("a");
        std::fs::write(&b, [0u8; 512]).expect("b");
        let cfg = VmRequest {
            disks: vec![format!("{},ro", a.display()), b.display().to_string()],
            rng: true,
            ..request(&kernel)
        }
        .validate(64)
        .expect("valid");
        let devices = cfg.virtio_devices();
        assert_eq!(devices.len(), 3);
        assert!(matches!(&devices[0].0, VirtioDeviceConfig::Disk(d) if d.read_only && d.path == a));
        assert!(matches!(&devices[1].0, VirtioDeviceConfig::Disk(d) if !d.read_only));
        assert_eq!(devices[2].0, VirtioDeviceConfig::Rng);
        assert_eq!(
            cfg.kernel_cmdline(),
            "console=ttyS0 virtio_mmio.device=4K@0xd0000000:5 \
             virtio_mmio.device=4K@0xd0001000:6 virtio_mmio.device=4K@0xd0002000:7"
        );
        // No devices, no change.
        let plain = request(&kernel).validate(64).expect("valid");
        assert_eq!(plain.kernel_cmdline(), "console=ttyS0");
    }

    #[test]
    fn the_cmdline_length_check_counts_the_announcements() {
        let dir = tempfile::tempdir().expect("tempdir");
        let kernel = fake_elf(dir.path());
        let disk = dir.path().join("d.img");
        std::fs::write(&disk, [0u8; 512]).expect("disk");
        // Fits alone, not with one announcement (35 bytes with its space).
        let cmdline = "x".repeat(MAX_CMDLINE_LEN - 20);
        assert!(VmRequest {
            cmdline: cmdline.clone(),
            ..request(&kernel)
        }
        .validate(64)
        .is_ok());
        let err = VmRequest {
            cmdline,
            disks: vec![disk.display().to_string()],
            ..request(&kernel)
        }
        .validate(64)
        .expect_err("too long with the device");
        assert!(
            matches!(err, ConfigError::CmdlineTooLong { len } if len > MAX_CMDLINE_LEN),
            "{err}"
        );

        let err = VmRequest {
            disks: vec![disk.display().to_string(); 19],
            rng: true,
            ..request(&kernel)
        }
        .validate(64)
        .expect_err("too many devices");
        assert!(err.to_string().contains("20 virtio devices"), "{err}");
    }

    #[test]
    fn a_good_request_passes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let kernel = fake_elf(dir.path());
        let cfg = request(&kernel).validate(64).expect("valid");
        assert_eq!(cfg.kernel_format, KernelFormat::Elf);
    }

    #[test]
    fn net_specs_parse_and_bad_ones_are_named() {
        let net = parse_net("tap=fabtap0,mac=02:00:00:00:00:2a").expect("with mac");
        assert_eq!(net.tap, "fabtap0");
        assert_eq!(net.mac, [2, 0, 0, 0, 0, 0x2a]);
        let derived = parse_net("tap=fabtap0").expect("no mac").mac;
        assert_eq!(derived, derived_mac("fabtap0"));
        for (spec, want) in [
            ("fabtap0", "unknown or repeated option \"fabtap0\""),
            ("tap=a,tap=b", "unknown or repeated option \"tap=b\""),
            ("mac=02:00:00:00:00:01", "no tap=NAME"),
            (
                "tap=a,mac=02:00:00:00:00",
                "mac \"02:00:00:00:00\" is not six hex bytes",
            ),
            (
                "tap=a,mac=01:00:5e:00:00:01",
                "mac 01:00:5e:00:00:01 is not a unicast address",
            ),
            ("tap=a,speed=10", "unknown or repeated option \"speed=10\""),
        ] {
            let err = parse_net(spec).expect_err(spec).to_string();
            assert_eq!(
                err,
                format!("--net {spec}: {want} (expected tap=NAME[,mac=MAC])"),
                "{spec}"
            );
        }
        let err = parse_net("tap=name-longer-than-15").expect_err("long name");
        assert!(err.to_string().contains("longer than 15 bytes"), "{err}");
    }

    #[test]
    fn taps_that_cannot_be_opened_or_repeat_are_config_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let kernel = fake_elf(dir.path());
        let missing = format!("fbx{}", std::process::id());
        let err = VmRequest {
            nets: vec![format!("tap={missing}")],
            ..request(&kernel)
        }
        .validate(64)
        .expect_err("missing tap")
        .to_string();
        assert!(
            err.starts_with(&format!(
                "--net tap={missing}: cannot open tap {missing}: no such network interface"
            )),
            "{err}"
        );
        let err = VmRequest {
            nets: vec![format!("tap={missing}"), format!("tap={missing}")],
            ..request(&kernel)
        }
        .validate(64)
        .expect_err("tap twice");
        assert!(matches!(err, ConfigError::TapTwice { .. }), "{err}");
        let err = VmRequest {
            nets: vec![
                "tap=a,mac=02:00:00:00:00:01".into(),
                "tap=b,mac=02:00:00:00:00:01".into(),
            ],
            ..request(&kernel)
        }
        .validate(64)
        .expect_err("mac twice");
        assert!(matches!(err, ConfigError::MacTwice { .. }), "{err}");
    }

    #[test]
    fn nics_go_between_the_disks_and_the_rng() {
        let dir = tempfile::tempdir().expect("tempdir");
        let kernel = fake_elf(dir.path());
        let disk = dir.path().join("d.img");
        std::fs::write(&disk, [0u8; 512]).expect("disk");
        let mut cfg = VmRequest {
            disks: vec![disk.display().to_string()],
            rng: true,
            ..request(&kernel)
        }
        .validate(64)
        .expect("valid");
        // Validation would open the tap; placement does not need one.
        cfg.nets.push(parse_net("tap=t0").expect("net"));
        let devices = cfg.virtio_devices();
        assert!(matches!(&devices[0].0, VirtioDeviceConfig::Disk(_)));
        assert!(matches!(&devices[1].0, VirtioDeviceConfig::Net(n) if n.tap == "t0"));
        assert_eq!(devices[2].0, VirtioDeviceConfig::Rng);
        assert!(cfg
            .kernel_cmdline()
            .ends_with("virtio_mmio.device=4K@0xd0002000:7"));
    }
    #[test]
    fn the_balloon_comes_last_and_bad_options_are_config_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let kernel = fake_elf(dir.path());
        let cfg = VmRequest {
            rng: true,
            balloon: Some("deflate-on-oom=on,stats-period=2".into()),
            ..request(&kernel)
        }
        .validate(64)
        .expect("valid");
        let devices = cfg.virtio_devices();
        assert_eq!(devices.len(), 2);
        assert_eq!(devices[0].0, VirtioDeviceConfig::Rng);
        assert_eq!(
            devices[1].0,
            VirtioDeviceConfig::Balloon(BalloonConfig {
                deflate_on_oom: true,
                free_page_reporting: false,
                stats_period_s: 2
            })
        );
        let plain = VmRequest {
            balloon: Some(String::new()),
            ..request(&kernel)
        }
        .validate(64)
        .expect("plain --balloon");
        assert_eq!(plain.balloon, Some(BalloonConfig::default()));
        let err = VmRequest {
            balloon: Some("free-page-reporting=yes".into()),
            ..request(&kernel)
        }
        .validate(64)
        .expect_err("bad option");
        assert_eq!(
            err.to_string(),
            "--balloon free-page-reporting=yes: free-page-reporting=yes: expected on or off"
        );
    }
}
