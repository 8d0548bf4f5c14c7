//! Loading the kernel image into guest memory.
//!
//! Two formats are accepted: an ELF `vmlinux`, loaded segment by segment, and a `bzImage`.
//! For a bzImage whose payload is gzip (the common case, and what `images/` builds), the VMM
//! decompresses the payload on the host (it is the kernel's own ELF `vmlinux`) and loads that:
//! the guest then never runs the decompressor, which under instruction emulation costs tens of
//! seconds. Any other payload is loaded as-is and entered through the bzImage's 64-bit entry,
//! so the guest decompresses itself.

use std::io::{Cursor, Read};
use std::path::{Path, PathBuf};

use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::{BzImage, Elf, KernelLoader};
use vm_memory::{ByteValued, GuestAddress, GuestMemoryMmap};

use super::HIMEM_START;

/// Offset of the setup header in a bzImage.
const SETUP_HEADER_OFFSET: usize = 0x1f1;
/// "HdrS", little endian, at 0x202.
const HDRS_MAGIC: u32 = 0x5372_6448;
/// The 64-bit entry point is this far into the protected-mode code of a bzImage.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;

/// The kind of kernel image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    /// A compressed kernel with the x86 boot protocol header.
    BzImage,
    /// An uncompressed ELF `vmlinux`.
    Elf,
}

/// Tells a bzImage from an x86-64 ELF by their first bytes (at least 0x210 for a bzImage).
pub fn detect_kernel_format(head: &[u8]) -> Option<KernelFormat> {
    if head.len() >= 20 && head[..4] == *b"\x7fELF" {
        let is_64 = head[4] == 2;
        let machine = u16::from_le_bytes([head[18], head[19]]);
        return (is_64 && machine == 62).then_some(KernelFormat::Elf);
    }
    if head.len() >= 0x206 {
        let magic = u32::from_le_bytes([head[0x202], head[0x203], head[0x204], head[0x205]]);
        if magic == HDRS_MAGIC {
            return Some(KernelFormat::BzImage);
        }
    }
    None
}

/// Errors from loading a kernel.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("kernel {path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("kernel {path}: not a bzImage (no HdrS magic)")]
    NotBzImage { path: PathBuf },
    #[error(
        "kernel {path}: boot protocol {version:#x} is too old (64-bit boot needs 2.06 or later)"
    )]
    OldProtocol { path: PathBuf, version: u16 },
    #[error("kernel {path}: bzImage payload at {offset:#x}+{length:#x} lies outside the file")]
    BadPayload {
        path: PathBuf,
        offset: usize,
        length: usize,
    },
    #[error("kernel {path}: gzip payload does not decompress: {source}")]
    Decompress {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("kernel {path}: cannot load into guest memory: {source}")]
    Load {
        path: PathBuf,
        #[source]
        source: linux_loader::loader::Error,
    },
}

/// Where the loaded kernel is and how to enter it.
#[derive(Debug, Clone)]
pub struct LoadedKernel {
    /// 64-bit entry point (guest physical).
    pub entry: GuestAddress,
    /// First byte after the kernel image in guest memory.
    pub end: u64,
    /// The bzImage's own setup header, when there is one: it goes into the zero page.
    pub setup_header: Option<setup_header>,
    /// True if the guest runs the kernel's decompressor itself.
    pub guest_decompresses: bool,
}

/// Loads the kernel at `path` into `mem`.
pub fn load_kernel(
    mem: &GuestMemoryMmap,
    path: &Path,
    format: KernelFormat,
) -> Result<LoadedKernel, KernelError> {
    let image = std::fs::read(path).map_err(|source| KernelError::Read {
        path: path.to_owned(),
        source,
    })?;
    match format {
        KernelFormat::Elf => load_elf(mem, path, &image, None),
        KernelFormat::BzImage => load_bzimage(mem, path, &image),
    }
}

fn load_elf(
    mem: &GuestMemoryMmap,
    path: &Path,
    elf: &[u8],
    setup_header: Option<setup_header>,
) -> Result<LoadedKernel, KernelError> {
    let loaded = Elf::load(
        mem,
        None,
        &mut Cursor::new(elf),
        Some(GuestAddress(HIMEM_START)),
    )
    .map_err(|source| KernelError::Load {
        path: path.to_owned(),
        source,
    })?;
    Ok(LoadedKernel {
        entry: loaded.kernel_load,
        end: loaded.kernel_end,
        setup_header,
        guest_decompresses: false,
    })
}

/// Reads the setup header of a bzImage.
pub fn parse_setup_header(path: &Path, image: &[u8]) -> Result<setup_header, KernelError> {
    let mut header = setup_header::default();
    let size = std::mem::size_of::<setup_header>();
    let bytes = image
        .get(SETUP_HEADER_OFFSET..SETUP_HEADER_OFFSET + size)
        .ok_or_else(|| KernelError::NotBzImage {
            path: path.to_owned(),
        })?;
    header.as_mut_slice().copy_from_slice(bytes);
    if { header.header } != HDRS_MAGIC {
        return Err(KernelError::NotBzImage {
            path: path.to_owned(),
        });
    }
    Ok(header)
}

fn load_bzimage(
    mem: &GuestMemoryMmap,
    path: &Path,
    image: &[u8],
) -> Result<LoadedKernel, KernelError> {
    let header = parse_setup_header(path, image)?;
    let version = header.version;
    if version < 0x0206 {
        return Err(KernelError::OldProtocol {
            path: path.to_owned(),
            version,
        });
    }
    let setup_sects = match header.setup_sects {
        0 => 4,
        n => n as usize,
    };
    let protected_start = (setup_sects + 1) * 512;
    if version >= 0x0208 {
        let offset = protected_start + header.payload_offset as usize;
        let length = header.payload_length as usize;
        let payload = image
            .get(offset..offset.saturating_add(length))
            .ok_or_else(|| KernelError::BadPayload {
                path: path.to_owned(),
                offset,
                length,
            })?;
        if payload.starts_with(&[0x1f, 0x8b]) {
            let mut elf = Vec::with_capacity(length * 4);
            flate2::read::GzDecoder::new(payload)
                .read_to_end(&mut elf)
                .map_err(|source| KernelError::Decompress {
                    path: path.to_owned(),
                    source,
                })?;
            if detect_kernel_format(&elf) == Some(KernelFormat::Elf) {
                return load_elf(mem, path, &elf, Some(header));
            }
        }
    }
    // Not a payload we can unpack: let the guest's decompressor do it.
    let loaded = BzImage::load(
        mem,
        None,
        &mut Cursor::new(image),
        Some(GuestAddress(HIMEM_START)),
    )
    .map_err(|source| KernelError::Load {
        path: path.to_owned(),
        source,
    })?;
    Ok(LoadedKernel {
        entry: GuestAddress(loaded.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET),
        end: loaded.kernel_end,
        setup_header: loaded.setup_header.or(Some(header)),
        guest_decompresses: true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_formats() {
        let mut elf = vec![0u8; 64];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[4] = 2;
        elf[18] = 62;
        assert_eq!(detect_kernel_format(&elf), Some(KernelFormat::Elf));
        elf[18] = 3; // i386
        assert_eq!(detect_kernel_format(&elf), None);

        let mut bz = vec![0u8; 0x400];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        assert_eq!(detect_kernel_format(&bz), Some(KernelFormat::BzImage));
        assert_eq!(detect_kernel_format(b"#!/bin/sh\n"), None);
        assert_eq!(detect_kernel_format(&[]), None);
    }

    #[test]
    fn truncated_bzimage_is_an_error_not_a_panic() {
        let mem = crate::memory::create_guest_memory(64).expect("mem");
        let mut bz = vec![0u8; 0x300];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        bz[0x206] = 0x0f; // version 2.15
        bz[0x207] = 0x02;
        bz[0x1f1] = 4;
        // payload_offset far past the end of the file
        bz[0x248..0x24c].copy_from_slice(&0x10_0000u32.to_le_bytes());
        bz[0x24c..0x250].copy_from_slice(&0x1000u32.to_le_bytes());
        let err = load_bzimage(&mem, Path::new("bz"), &bz).expect_err("bad payload");
        assert!(err.to_string().contains("outside the file"), "{err}");
    }
}
