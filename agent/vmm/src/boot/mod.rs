//! x86-64 direct boot: load the kernel, lay out the boot structures, set up the vCPUs.
//!
//! The guest starts the way Firecracker starts it: already in 64-bit long mode at the kernel's
//! 64-bit entry point, with identity-mapped page tables, a flat GDT and the Linux zero page in RSI.
//! No firmware and no real-mode code run, which matters on hosts where guest instructions are
//! emulated (see `shared/KVM-HOST.md`): every instruction not executed is time saved.
//!
//! Guest-physical layout of the low megabyte:
//!
//! | address   | what                                   |
//! |-----------|----------------------------------------|
//! | 0x500     | GDT                                    |
//! | 0x520     | IDT (empty)                            |
//! | 0x7000    | zero page (`boot_params`)              |
//! | 0x8ff0    | initial stack pointer                  |
//! | 0x9000    | PML4, then PDPT at 0xa000, PD at 0xb000|
//! | 0x20000   | kernel command line                    |
//! | 0x9fc00   | end of low RAM (EBDA starts here)      |
//! | 0xf0000   | MP table (BIOS area, reserved in e820) |
//! | 0x100000  | high RAM; the kernel loads at 16 MiB   |

pub mod cpu;
pub mod cpuid;
pub mod kernel;
pub mod mptable;
pub mod params;
pub mod topology;

/// GDT location.
pub const GDT_ADDR: u64 = 0x500;
/// IDT location.
pub const IDT_ADDR: u64 = 0x520;
/// Zero page (`struct boot_params`).
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Initial stack of the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Page-map level 4 table.
pub const PML4_ADDR: u64 = 0x9000;
/// Page directory pointer table.
pub const PDPT_ADDR: u64 = 0xa000;
/// Page directory (2 MiB pages).
pub const PD_ADDR: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Start of the extended BIOS data area: low RAM ends here.
pub const EBDA_START: u64 = 0x9fc00;
/// MP floating pointer and configuration table.
pub const MPTABLE_ADDR: u64 = 0xf0000;
/// First byte above the legacy hole: high RAM.
pub const HIMEM_START: u64 = 0x10_0000;
