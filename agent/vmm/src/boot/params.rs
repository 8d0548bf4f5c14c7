//! The Linux zero page (`struct boot_params`): e820 map, command line and initramfs.

use std::path::{Path, PathBuf};

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::kernel::LoadedKernel;
use super::{CMDLINE_ADDR, EBDA_START, HIMEM_START, ZERO_PAGE_ADDR};
use crate::config::MAX_CMDLINE_LEN;
use crate::memory::{MMIO_GAP_END, MMIO_GAP_START};

const E820_RAM: u32 = 1;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
/// `type_of_loader`: "undefined" boot loader.
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x100_0000;
/// The initramfs must lie below this (`initrd_addr_max` of old kernels).
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x7fff_ffff;
const PAGE_SIZE: u64 = 4096;

/// Errors from writing the boot parameters.
#[derive(Debug, thiserror::Error)]
pub enum ParamsError {
    #[error("initrd {path}: cannot read: {source}")]
    InitrdRead {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("initrd {path}: {size} bytes does not fit in guest memory between the kernel (ends at {kernel_end:#x}) and {limit:#x}")]
    InitrdTooLarge {
        path: PathBuf,
        size: u64,
        kernel_end: u64,
        limit: u64,
    },
    #[error("writing {what} into guest memory at {addr:#x}: {source}")]
    GuestWrite {
        what: &'static str,
        addr: u64,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    #[error(
        "kernel command line is {len} bytes: too long for the boot protocol (at most {max} bytes)"
    )]
    CmdlineTooLong { len: usize, max: usize },
}

/// An initramfs placed in guest memory.
#[derive(Debug, Clone, Copy)]
pub struct InitrdPlacement {
    pub addr: u64,
    pub size: u64,
}

/// Loads the initramfs as high as it can go in low RAM (below the MMIO gap and the protocol's
/// limit), above the kernel, as boot loaders do.
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel: &LoadedKernel,
) -> Result<InitrdPlacement, ParamsError> {
    let read_err = |source| ParamsError::InitrdRead {
        path: path.to_owned(),
        source,
    };
    let size = std::fs::metadata(path).map_err(read_err)?.len();
    let addr_max = kernel
        .setup_header
        .map(|h| h.initrd_addr_max as u64)
        .filter(|&m| m != 0)
        .unwrap_or(DEFAULT_INITRD_ADDR_MAX);
    let ram_end = mem.last_addr().0 + 1;
    let limit = ram_end.min(MMIO_GAP_START).min(addr_max + 1);
    let too_large = || ParamsError::InitrdTooLarge {
        path: path.to_owned(),
        size,
        kernel_end: kernel.end,
        limit,
    };
    let addr = limit.checked_sub(size).ok_or_else(too_large)? & !(PAGE_SIZE - 1);
    if addr < kernel.end.max(HIMEM_START) {
        return Err(too_large());
    }
    let contents = std::fs::read(path).map_err(read_err)?;
    if contents.len() as u64 != size {
        return Err(read_err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "file changed size while loading",
        )));
    }
    mem.write_slice(&contents, GuestAddress(addr))
        .map_err(|source| ParamsError::GuestWrite {
            what: "initrd",
            addr,
            source,
        })?;
    Ok(InitrdPlacement { addr, size })
}

/// The e820 map for `mem`: low RAM up to the EBDA, then high RAM around the MMIO gap.
pub fn e820_map(mem: &GuestMemoryMmap) -> Vec<boot_e820_entry> {
    let mut map = vec![boot_e820_entry {
        addr: 0,
        size: EBDA_START,
        r#type: E820_RAM,
    }];
    let ram_end = mem.last_addr().0 + 1;
    let low_end = ram_end.min(MMIO_GAP_START);
    map.push(boot_e820_entry {
        addr: HIMEM_START,
        size: low_end - HIMEM_START,
        r#type: E820_RAM,
    });
    if ram_end > MMIO_GAP_END {
        map.push(boot_e820_entry {
            addr: MMIO_GAP_END,
            size: ram_end - MMIO_GAP_END,
            r#type: E820_RAM,
        });
    }
    map
}

/// Writes the command line and the zero page.
pub fn write_boot_params(
    mem: &GuestMemoryMmap,
    kernel: &LoadedKernel,
    cmdline: &str,
    initrd: Option<InitrdPlacement>,
) -> Result<(), ParamsError> {
    if cmdline.len() >= MAX_CMDLINE_LEN {
        return Err(ParamsError::CmdlineTooLong {
            len: cmdline.len(),
            max: MAX_CMDLINE_LEN - 1,
        });
    }
    let mut cmdline_bytes = cmdline.as_bytes().to_vec();
    cmdline_bytes.push(0);
    mem.write_slice(&cmdline_bytes, GuestAddress(CMDLINE_ADDR))
        .map_err(|source| ParamsError::GuestWrite {
            what: "command line",
            addr: CMDLINE_ADDR,
            source,
        })?;

    let mut params = boot_params::default();
    if let Some(header) = kernel.setup_header {
        params.hdr = header;
    } else {
        params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
        params.hdr.header = KERNEL_HDR_MAGIC;
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = cmdline.len() as u32;
    if let Some(initrd) = initrd {
        params.hdr.ramdisk_image = initrd.addr as u32;
        params.hdr.ramdisk_size = initrd.size as u32;
    }
    let map = e820_map(mem);
    for (slot, entry) in params.e820_table.iter_mut().zip(&map) {
        *slot = *entry;
    }
    params.e820_entries = map.len() as u8;
    mem.write_obj(params, GuestAddress(ZERO_PAGE_ADDR))
        .map_err(|source| ParamsError::GuestWrite {
            what: "zero page",
            addr: ZERO_PAGE_ADDR,
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::create_guest_memory;

    #[test]
    fn e820_leaves_legacy_hole_and_mmio_gap() {
        let mem = create_guest_memory(256).expect("mem");
        let map = e820_map(&mem);
        assert_eq!(map.len(), 2);
        assert_eq!({ map[0].size }, EBDA_START);
        assert_eq!({ map[1].addr }, HIMEM_START);
        assert_eq!({ map[1].addr } + { map[1].size }, 256 << 20);
    }

    #[test]
    fn initrd_goes_high_and_too_large_is_refused() {
        let mem = create_guest_memory(64).expect("mem");
        let kernel = LoadedKernel {
            entry: GuestAddress(0x100_0000),
            end: 0x200_0000,
            setup_header: None,
            guest_decompresses: false,
        };
        let dir = tempfile::tempdir().expect("tmp");
        let small = dir.path().join("small");
        std::fs::write(&small, vec![7u8; 10_000]).expect("write");
        let placed = load_initrd(&mem, &small, &kernel).expect("fits");
        assert_eq!(placed.addr % PAGE_SIZE, 0);
        assert!(placed.addr + placed.size <= 64 << 20);
        let mut back = [0u8; 4];
        mem.read_slice(&mut back, GuestAddress(placed.addr))
            .expect("read");
        assert_eq!(back, [7; 4]);

        let big = dir.path().join("big");
        std::fs::write(&big, vec![0u8; 40 << 20]).expect("write");
        let err = load_initrd(&mem, &big, &kernel).expect_err("too big");
        assert!(err.to_string().contains("does not fit"), "{err}");
    }

    #[test]
    fn too_long_cmdline_is_refused() {
        let mem = create_guest_memory(64).expect("mem");
        let kernel = LoadedKernel {
            entry: GuestAddress(0x100_0000),
            end: 0x200_0000,
            setup_header: None,
            guest_decompresses: false,
        };
        let err = write_boot_params(&mem, &kernel, &"a".repeat(4096), None).expect_err("long");
        assert!(matches!(err, ParamsError::CmdlineTooLong { len: 4096, .. }));
    }
}
