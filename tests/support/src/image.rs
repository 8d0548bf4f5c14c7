//! The guest image built by `images/build.sh` into `images/out/`: its
//! manifest, and parsers for what it holds (bzImage setup header, embedded
//! kernel configuration, gzip'd cpio "newc" initramfs).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use serde::Deserialize;
use sha2::{Digest, Sha256};

/// The file names of the image, as keys of [`Manifest::files`].
pub const VMLINUZ: &str = "vmlinuz";
/// The uncompressed ELF kernel.
pub const VMLINUX: &str = "vmlinux";
/// The gzip'd cpio initramfs.
pub const INITRAMFS: &str = "initramfs.cpio.gz";
/// The ext4 root file system (same tree as the initramfs).
pub const ROOTFS: &str = "rootfs.ext4";
/// The freestanding device-test guest (`images/testguest`).
pub const TESTGUEST: &str = "testguest.elf";

/// The repository's root directory.
pub fn repo_dir() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

/// `images/out/`, where `images/build.sh` puts the image.
pub fn image_dir() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../images/out"))
}

/// The kernel config fragment the image must satisfy.
pub fn fragment_path() -> PathBuf {
    repo_dir().join("images/kernel/fabric.config")
}

/// How a guest proves it booted on a given kind of host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum GuestMode {
    /// The host has no vmx/svm (software nested virtualization): guest user
    /// space cannot run, the guest kernel waits for a root disk that does not
    /// exist and stays up.
    #[serde(rename = "kernel-only")]
    KernelOnly,
    /// The host has vmx/svm: the initramfs runs and prints the ready line.
    #[serde(rename = "userspace")]
    Userspace,
}

impl GuestMode {
    /// The mode for this host, decided as `images/build.sh` does
    /// (`grep -qwE 'vmx|svm' /proc/cpuinfo`).
    pub fn of_this_host() -> Result<Self> {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").context("reading /proc/cpuinfo")?;
        let hw_virt = cpuinfo
            .lines()
            .filter(|l| l.starts_with("flags"))
            .flat_map(|l| l.split_whitespace())
            .any(|f| f == "vmx" || f == "svm");
        Ok(if hw_virt {
            Self::Userspace
        } else {
            Self::KernelOnly
        })
    }

    /// The spelling used in the manifest.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::KernelOnly => "kernel-only",
            Self::Userspace => "userspace",
        }
    }
}

/// Digest and size of one output file.
#[derive(Debug, Clone, Deserialize)]
pub struct FileInfo {
    /// Lower-case hex SHA-256.
    pub sha256: String,
    /// Size in bytes.
    pub size: u64,
}

/// Command line and ready marker for one guest mode.
#[derive(Debug, Clone, Deserialize)]
pub struct BootMode {
    /// Kernel command line, without the per-VM `ip=` parameter.
    pub cmdline: String,
    /// Serial console text (a line, or its prefix) that means "booted".
    pub ready_marker: String,
}

/// The I/O port write that tells the VMM the guest finished booting.
#[derive(Debug, Clone, Copy, Deserialize)]
pub struct BootComplete {
    /// I/O port (1008 = 0x3f0).
    pub port: u16,
    /// Byte value written (123).
    pub value: u8,
}

/// `images/out/manifest.json`.
#[derive(Debug, Clone, Deserialize)]
pub struct Manifest {
    /// Format version (1).
    pub version: u32,
    /// `uname -r` of the built kernel.
    pub kernel_release: String,
    /// Output files by name ([`VMLINUZ`], [`VMLINUX`], [`INITRAMFS`], [`ROOTFS`]).
    pub files: BTreeMap<String, FileInfo>,
    /// The mode for the kind of host the image was built on.
    pub guest_mode: GuestMode,
    /// Command line to use on this kind of host (append `ip=` per VM).
    pub cmdline: String,
    /// Whether to pass the initramfs on this kind of host.
    pub use_initramfs: bool,
    /// Ready marker on this kind of host.
    pub ready_marker: String,
    /// What hosts with vmx/svm use.
    pub userspace: BootMode,
    /// What hosts without vmx/svm use.
    pub kernel_only: BootMode,
    /// The boot-complete port write.
    pub boot_complete: BootComplete,
}

impl Manifest {
    /// Reads `manifest.json` from `dir`.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("manifest.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }

    /// The boot mode selected by [`Manifest::guest_mode`].
    pub fn mode(&self) -> &BootMode {
        match self.guest_mode {
            GuestMode::KernelOnly => &self.kernel_only,
            GuestMode::Userspace => &self.userspace,
        }
    }

    /// The entry for `name`, or an error naming it.
    pub fn file(&self, name: &str) -> Result<&FileInfo> {
        self.files
            .get(name)
            .with_context(|| format!("manifest.json has no files.{name}"))
    }
}

/// The built image: its directory and manifest.
#[derive(Debug, Clone)]
pub struct Image {
    /// `images/out/`.
    pub dir: PathBuf,
    /// Its `manifest.json`.
    pub manifest: Manifest,
}

impl Image {
    /// Loads the image from [`image_dir`], with an error telling to run
    /// `images/build.sh` if it is not there.
    pub fn load() -> Result<Self> {
        Self::load_from(&image_dir())
    }

    /// Loads the image from `dir`.
    pub fn load_from(dir: &Path) -> Result<Self> {
        let dir = dir.to_path_buf();
        if !dir.join("manifest.json").is_file() {
            bail!(
                "no guest image in {}: build it first with `bash images/build.sh` \
                 (as root; the first run builds a kernel and takes minutes)",
                dir.display()
            );
        }
        let manifest = Manifest::load(&dir)?;
        Ok(Self { dir, manifest })
    }

    /// The image for a test: panics, saying how to build it, when it is not there.
    pub fn built() -> Self {
        Self::load().unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// Path of one output file.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The compressed kernel (bzImage).
    pub fn kernel(&self) -> PathBuf {
        self.path(VMLINUZ)
    }

    /// The ELF kernel.
    pub fn vmlinux(&self) -> PathBuf {
        self.path(VMLINUX)
    }

    pub fn initramfs(&self) -> PathBuf {
        self.path(INITRAMFS)
    }

    /// The command line for this kind of host (without a per-VM `ip=`).
    pub fn cmdline(&self) -> String {
        self.manifest.cmdline.clone()
    }

    /// What the guest prints on its console once booted, on this kind of host.
    pub fn ready_marker(&self) -> String {
        self.manifest.ready_marker.clone()
    }

    /// Whether a guest boots with the initramfs on this kind of host.
    pub fn use_initramfs(&self) -> bool {
        self.manifest.use_initramfs
    }

    /// True when guest user space can run on this host (hardware virtualization).
    pub fn userspace(&self) -> bool {
        self.manifest.guest_mode == GuestMode::Userspace
    }

    /// Whether guest user space runs here, for a test's closing note on what it checked.
    pub fn userspace_note(&self) -> &'static str {
        if self.userspace() {
            "guest user space runs here too"
        } else {
            "guest user space cannot run here"
        }
    }

    /// The contents of one output file.
    pub fn read(&self, name: &str) -> Result<Vec<u8>> {
        let path = self.path(name);
        std::fs::read(&path).with_context(|| format!("reading {}", path.display()))
    }
}

/// SHA-256 of a file, as lower-case hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// Decompresses one gzip member; bytes after it are ignored.
pub fn gunzip(data: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(data)
        .read_to_end(&mut out)
        .context("gzip decompression failed")?;
    Ok(out)
}

fn le_u16(data: &[u8], off: usize) -> Result<u16> {
    let b = data
        .get(off..off + 2)
        .with_context(|| format!("truncated at {off:#x}"))?;
    Ok(u16::from_le_bytes([b[0], b[1]]))
}

fn le_u32(data: &[u8], off: usize) -> Result<u32> {
    let b = data
        .get(off..off + 4)
        .with_context(|| format!("truncated at {off:#x}"))?;
    Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// The fields of a bzImage's setup header (Documentation/x86/boot.rst) the
/// tests use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BzImageHeader {
    /// Number of 512-byte setup sectors after the boot sector.
    pub setup_sects: u32,
    /// Boot protocol version, e.g. 0x020f for 2.15.
    pub protocol: u16,
    /// Offset of the protected-mode kernel in the file: (setup_sects+1)*512.
    pub pm_offset: usize,
    /// Compressed payload: offset relative to `pm_offset`.
    pub payload_offset: u32,
    /// Compressed payload length.
    pub payload_length: u32,
    /// Offset of the kernel version string in the file (0 if none).
    pub kernel_version_offset: usize,
}

impl BzImageHeader {
    /// Parses and checks the header: 0xAA55 at 0x1fe, "HdrS" at 0x202, boot
    /// protocol at least 2.12, payload inside the file.
    pub fn parse(image: &[u8]) -> Result<Self> {
        ensure!(
            image.len() >= 0x270,
            "too short for a bzImage ({} bytes)",
            image.len()
        );
        ensure!(
            le_u16(image, 0x1fe)? == 0xAA55,
            "no 0xAA55 boot signature at 0x1fe"
        );
        ensure!(
            &image[0x202..0x206] == b"HdrS",
            "no \"HdrS\" magic at 0x202"
        );
        let protocol = le_u16(image, 0x206)?;
        ensure!(
            protocol >= 0x020c,
            "boot protocol {}.{} is older than 2.12",
            protocol >> 8,
            protocol & 0xff
        );
        let setup_sects = match image[0x1f1] {
            0 => 4,
            n => u32::from(n),
        };
        let pm_offset = (setup_sects as usize + 1) * 512;
        let payload_offset = le_u32(image, 0x248)?;
        let payload_length = le_u32(image, 0x24c)?;
        let end = pm_offset + payload_offset as usize + payload_length as usize;
        ensure!(
            payload_length > 0 && end <= image.len(),
            "payload {payload_offset:#x}+{payload_length:#x} (after {pm_offset:#x}) \
             is outside the {}-byte file",
            image.len()
        );
        let kv = le_u16(image, 0x20e)?;
        let kernel_version_offset = if kv == 0 { 0 } else { usize::from(kv) + 0x200 };
        Ok(Self {
            setup_sects,
            protocol,
            pm_offset,
            payload_offset,
            payload_length,
            kernel_version_offset,
        })
    }

    /// The compressed kernel inside `image`.
    pub fn payload<'a>(&self, image: &'a [u8]) -> &'a [u8] {
        let start = self.pm_offset + self.payload_offset as usize;
        &image[start..start + self.payload_length as usize]
    }

    /// The kernel version string (e.g. "6.1.192-fabric (fabric@fabric) #1 SMP ...").
    pub fn kernel_version<'a>(&self, image: &'a [u8]) -> Option<&'a str> {
        let s = image.get(self.kernel_version_offset..)?;
        if self.kernel_version_offset == 0 {
            return None;
        }
        let end = s.iter().position(|&b| b == 0)?;
        std::str::from_utf8(&s[..end]).ok()
    }
}

/// The decompressed kernel (vmlinux.bin) of a gzip-compressed bzImage.
pub fn bzimage_kernel(image: &[u8]) -> Result<Vec<u8>> {
    let header = BzImageHeader::parse(image)?;
    let payload = header.payload(image);
    ensure!(
        payload.starts_with(&[0x1f, 0x8b, 0x08]),
        "the bzImage payload is not gzip (starts with {:02x?}); is CONFIG_KERNEL_GZIP=y?",
        &payload[..payload.len().min(4)]
    );
    gunzip(payload).context("decompressing the bzImage payload")
}

fn find(haystack: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    haystack
        .get(from..)?
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|p| p + from)
}

/// The kernel configuration embedded by `CONFIG_IKCONFIG` (gzip'd text
/// between the `IKCFG_ST` and `IKCFG_ED` markers) in a kernel binary.
pub fn embedded_config(kernel: &[u8]) -> Result<String> {
    const START: &[u8] = b"IKCFG_ST";
    const END: &[u8] = b"IKCFG_ED";
    let start = find(kernel, START, 0)
        .context("no IKCFG_ST marker: the kernel was built without CONFIG_IKCONFIG")?
        + START.len();
    let end = find(kernel, END, start).context("no IKCFG_ED marker after IKCFG_ST")?;
    let text = gunzip(&kernel[start..end]).context("decompressing the embedded config")?;
    String::from_utf8(text).context("the embedded config is not UTF-8")
}

/// A parsed kernel `.config`: symbol (with `CONFIG_`) to value; symbols that
/// are "not set" are absent.
#[derive(Debug, Clone, Default)]
pub struct KernelConfig(pub BTreeMap<String, String>);

impl KernelConfig {
    /// Parses `.config` text.
    pub fn parse(text: &str) -> Self {
        Self(
            text.lines()
                .filter_map(|l| l.split_once('='))
                .filter(|(k, _)| k.starts_with("CONFIG_"))
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
        )
    }

    /// The value of `symbol` (`CONFIG_X`), if set.
    pub fn get(&self, symbol: &str) -> Option<&str> {
        self.0.get(symbol).map(String::as_str)
    }
}

/// One requirement of a config fragment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigRequirement {
    /// `CONFIG_X`.
    pub symbol: String,
    /// The required value, or `None` for "is not set".
    pub value: Option<String>,
    /// The fragment's line.
    pub line: String,
}

/// The `CONFIG_X=v` and `# CONFIG_X is not set` lines of a fragment.
pub fn parse_fragment(text: &str) -> Vec<ConfigRequirement> {
    text.lines()
        .filter_map(|line| {
            let line = line.trim_end();
            if let Some((k, v)) = line.split_once('=') {
                if k.starts_with("CONFIG_") {
                    return Some(ConfigRequirement {
                        symbol: k.to_owned(),
                        value: Some(v.to_owned()),
                        line: line.to_owned(),
                    });
                }
            }
            let sym = line.strip_prefix("# ")?.strip_suffix(" is not set")?;
            sym.starts_with("CONFIG_").then(|| ConfigRequirement {
                symbol: sym.to_owned(),
                value: None,
                line: line.to_owned(),
            })
        })
        .collect()
}

/// The fragment lines that do not hold in `config`, each with what the
/// config has instead.
pub fn unmet_requirements(fragment: &[ConfigRequirement], config: &KernelConfig) -> Vec<String> {
    fragment
        .iter()
        .filter_map(|req| {
            let have = config.get(&req.symbol);
            (have != req.value.as_deref()).then(|| {
                format!(
                    "{}   (kernel has: {})",
                    req.line,
                    have.map_or_else(|| "not set".to_owned(), |v| format!("{}={v}", req.symbol))
                )
            })
        })
        .collect()
}

/// One member of a cpio "newc" archive.
#[derive(Debug, Clone)]
pub struct CpioEntry {
    /// Path as stored (without a leading "./" or "/").
    pub name: String,
    /// st_mode (file type and permissions).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// File contents, or the target of a symbolic link.
    pub data: Vec<u8>,
}

impl CpioEntry {
    const S_IFMT: u32 = 0o170_000;

    /// Is this a regular file?
    pub fn is_file(&self) -> bool {
        self.mode & Self::S_IFMT == 0o100_000
    }

    /// Is this a directory?
    pub fn is_dir(&self) -> bool {
        self.mode & Self::S_IFMT == 0o040_000
    }

    /// Is this a symbolic link?
    pub fn is_symlink(&self) -> bool {
        self.mode & Self::S_IFMT == 0o120_000
    }

    /// Is any execute bit set?
    pub fn is_executable(&self) -> bool {
        self.mode & 0o111 != 0
    }
}

/// Parses a (decompressed) cpio "newc" archive, or several concatenated ones
/// as the kernel accepts them (zero padding between archives is skipped).
pub fn parse_cpio_newc(data: &[u8]) -> Result<Vec<CpioEntry>> {
    fn align4(n: usize) -> usize {
        (n + 3) & !3
    }
    fn field(header: &[u8], i: usize) -> Result<u32> {
        let text = std::str::from_utf8(&header[6 + i * 8..14 + i * 8])
            .context("non-ASCII cpio header field")?;
        u32::from_str_radix(text, 16).with_context(|| format!("bad cpio header field {text:?}"))
    }

    let mut entries = Vec::new();
    let mut pos = 0;
    while pos < data.len() {
        if data[pos] == 0 {
            pos += 1;
            continue;
        }
        let header = data
            .get(pos..pos + 110)
            .with_context(|| format!("truncated cpio header at {pos}"))?;
        ensure!(
            &header[..6] == b"070701" || &header[..6] == b"070702",
            "no cpio newc magic at offset {pos} (found {:?})",
            String::from_utf8_lossy(&header[..6])
        );
        let mode = field(header, 1)?;
        let uid = field(header, 2)?;
        let gid = field(header, 3)?;
        let filesize = field(header, 6)? as usize;
        let namesize = field(header, 11)? as usize;
        ensure!(namesize >= 1, "empty cpio name at offset {pos}");
        let name_bytes = data
            .get(pos + 110..pos + 110 + namesize - 1)
            .with_context(|| format!("truncated cpio name at {pos}"))?;
        let name = String::from_utf8(name_bytes.to_vec()).context("non-UTF-8 cpio name")?;
        let data_start = align4(pos + 110 + namesize);
        let file = data
            .get(data_start..data_start + filesize)
            .with_context(|| format!("truncated data of {name:?}"))?;
        pos = align4(data_start + filesize);
        if name == "TRAILER!!!" {
            continue;
        }
        let name = name
            .trim_start_matches("./")
            .trim_start_matches('/')
            .to_owned();
        entries.push(CpioEntry {
            name,
            mode,
            uid,
            gid,
            data: file.to_vec(),
        });
    }
    Ok(entries)
}

/// Reads a gzip'd cpio newc initramfs.
pub fn read_initramfs(path: &Path) -> Result<Vec<CpioEntry>> {
    let compressed = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let archive =
        gunzip(&compressed).with_context(|| format!("decompressing {}", path.display()))?;
    parse_cpio_newc(&archive).with_context(|| format!("parsing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn newc(name: &str, mode: u32, data: &[u8]) -> Vec<u8> {
        let mut out = format!(
            "070701{:08x}{mode:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            1,
            0,
            0,
            1,
            0,
            data.len(),
            0,
            0,
            0,
            0,
            name.len() + 1,
            0
        )
        .into_bytes();
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        while out.len() % 4 != 0 {
            out.push(0);
        }
        out.extend_from_slice(data);
        while out.len() % 4 != 0 {
            out.push(0);
        }
        out
    }

    #[test]
    fn cpio_roundtrip() {
        let mut archive = newc("init", 0o100_755, b"#!/bin/sh\n");
        archive.extend(newc("bin", 0o040_755, b""));
        archive.extend(newc("TRAILER!!!", 0, b""));
        archive.extend([0; 8]);
        archive.extend(newc("./etc/x", 0o120_777, b"/y"));
        let entries = parse_cpio_newc(&archive).expect("parse");
        assert_eq!(entries.len(), 3);
        assert!(entries[0].is_file() && entries[0].is_executable());
        assert_eq!(entries[0].data, b"#!/bin/sh\n");
        assert!(entries[1].is_dir());
        assert_eq!(entries[2].name, "etc/x");
        assert!(entries[2].is_symlink());
    }

    #[test]
    fn fragment_requirements() {
        let frag = parse_fragment("# c\nCONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=\"x\"\n");
        let config = KernelConfig::parse("CONFIG_A=y\nCONFIG_B=y\n# CONFIG_D is not set\n");
        assert_eq!(frag.len(), 3);
        let unmet = unmet_requirements(&frag, &config);
        assert_eq!(unmet.len(), 2, "{unmet:?}");
        assert!(unmet[0].starts_with("# CONFIG_B is not set"));
        assert!(unmet[1].contains("not set"));
    }
}
