//! Boot-time vCPU state: long mode (GDT, page tables, control registers), registers, FPU,
//! model-specific registers and the local APIC's LINT pins.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, Msrs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::{
    BOOT_STACK_POINTER, GDT_ADDR, IDT_ADDR, PDPT_ADDR, PD_ADDR, PML4_ADDR, ZERO_PAGE_ADDR,
};

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_IA32_MISC_ENABLE_FAST_STRING: u64 = 0x1;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
/// MTRRs enabled, default type write-back.
const MTRR_ENABLE_WRITEBACK: u64 = (1 << 11) | 6;

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// Errors from setting up a vCPU's boot state.
#[derive(Debug, thiserror::Error)]
pub enum CpuSetupError {
    #[error("writing {what} into guest memory: {source}")]
    GuestWrite {
        what: &'static str,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    #[error("KVM {what} on vCPU {cpu}: {source}")]
    Kvm {
        what: &'static str,
        cpu: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("KVM accepted only {set} of {wanted} boot MSRs on vCPU {cpu}")]
    MsrsRejected { cpu: u32, set: usize, wanted: usize },
}

/// A GDT entry from flags, base and limit (the usual packed x86 layout).
const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((flags as u64 & 0x0000_f0ff) << 40)
}

/// The KVM segment register that a GDT entry at `index` describes.
fn segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0x000f_0000)) as u32;
    let granularity = ((entry >> 55) & 1) as u8;
    let limit = if granularity == 1 {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    kvm_segment {
        base,
        limit,
        selector: (index as u16) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: granularity,
        avl: ((entry >> 52) & 1) as u8,
        unusable: if (entry >> 47) & 1 == 1 { 0 } else { 1 },
        padding: 0,
    }
}

/// The boot GDT: null, 64-bit code, data, TSS.
const BOOT_GDT: [u64; 4] = [
    gdt_entry(0, 0, 0),
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];

/// Writes the GDT, an empty IDT and identity page tables for the first 1 GiB (2 MiB pages).
pub fn write_boot_tables(mem: &GuestMemoryMmap) -> Result<(), CpuSetupError> {
    let write = |what, bytes: &[u8], addr| {
        mem.write_slice(bytes, GuestAddress(addr))
            .map_err(|source| CpuSetupError::GuestWrite { what, source })
    };
    let gdt: Vec<u8> = BOOT_GDT.iter().flat_map(|e| e.to_le_bytes()).collect();
    write("GDT", &gdt, GDT_ADDR)?;
    write("IDT", &0u64.to_le_bytes(), IDT_ADDR)?;
    // PML4[0] -> PDPT, PDPT[0] -> PD, PD[i] -> 2 MiB page i (present, writable, huge).
    write("PML4", &(PDPT_ADDR | 0x03).to_le_bytes(), PML4_ADDR)?;
    write("PDPT", &(PD_ADDR | 0x03).to_le_bytes(), PDPT_ADDR)?;
    let pd: Vec<u8> = (0..512u64)
        .flat_map(|i| ((i << 21) | 0x83).to_le_bytes())
        .collect();
    write("page directory", &pd, PD_ADDR)
}

fn kvm<T>(
    what: &'static str,
    cpu: u32,
    r: Result<T, kvm_ioctls::Error>,
) -> Result<T, CpuSetupError> {
    r.map_err(|source| CpuSetupError::Kvm { what, cpu, source })
}

/// Puts the boot vCPU in 64-bit mode at `entry` with the zero page in RSI.
pub fn setup_boot_vcpu(vcpu: &VcpuFd, cpu: u32, entry: u64) -> Result<(), CpuSetupError> {
    let mut sregs: kvm_sregs = kvm("KVM_GET_SREGS", cpu, vcpu.get_sregs())?;
    let code = segment_from_gdt(BOOT_GDT[1], 1);
    let data = segment_from_gdt(BOOT_GDT[2], 2);
    let tss = segment_from_gdt(BOOT_GDT[3], 3);
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (std::mem::size_of_val(&BOOT_GDT) - 1) as u16;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = (std::mem::size_of::<u64>() - 1) as u16;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.cr0 |= X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.efer |= EFER_LME | EFER_LMA;
    kvm("KVM_SET_SREGS", cpu, vcpu.set_sregs(&sregs))?;

    let regs = kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_ADDR,
        ..Default::default()
    };
    kvm("KVM_SET_REGS", cpu, vcpu.set_regs(&regs))
}

/// State every vCPU needs, boot vCPU or not: FPU, MSRs, LAPIC LINT pins.
pub fn setup_common(vcpu: &VcpuFd, cpu: u32) -> Result<(), CpuSetupError> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    kvm("KVM_SET_FPU", cpu, vcpu.set_fpu(&fpu))?;

    let entries = [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MSR_IA32_MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WRITEBACK),
    ]
    .map(|(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    });
    let msrs = Msrs::from_entries(&entries).map_err(|_| CpuSetupError::MsrsRejected {
        cpu,
        set: 0,
        wanted: entries.len(),
    })?;
    let set = kvm("KVM_SET_MSRS", cpu, vcpu.set_msrs(&msrs))?;
    if set != entries.len() {
        return Err(CpuSetupError::MsrsRejected {
            cpu,
            set,
            wanted: entries.len(),
        });
    }

    let mut lapic = kvm("KVM_GET_LAPIC", cpu, vcpu.get_lapic())?;
    set_lvt_delivery_mode(&mut lapic.regs, APIC_LVT0, APIC_MODE_EXTINT);
    set_lvt_delivery_mode(&mut lapic.regs, APIC_LVT1, APIC_MODE_NMI);
    kvm("KVM_SET_LAPIC", cpu, vcpu.set_lapic(&lapic))
}

fn set_lvt_delivery_mode(regs: &mut [std::os::raw::c_char], offset: usize, mode: u32) {
    let mut bytes = [0u8; 4];
    for (i, b) in bytes.iter_mut().enumerate() {
        *b = regs[offset + i] as u8;
    }
    let value = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
    for (i, b) in value.to_le_bytes().iter().enumerate() {
        regs[offset + i] = *b as std::os::raw::c_char;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_decode_to_flat_segments() {
        let code = segment_from_gdt(BOOT_GDT[1], 1);
        assert_eq!(code.selector, 8);
        assert_eq!(code.l, 1, "64-bit code segment");
        assert_eq!(code.limit, 0xffff_ffff);
        assert_eq!(code.present, 1);
        let data = segment_from_gdt(BOOT_GDT[2], 2);
        assert_eq!(data.db, 1);
        assert_eq!(data.type_, 3);
        assert_eq!(segment_from_gdt(BOOT_GDT[0], 0).unusable, 1);
    }

    #[test]
    fn lvt_mode_is_set_without_touching_other_bits() {
        let mut regs = [0 as std::os::raw::c_char; 1024];
        regs[APIC_LVT0] = 0x10u8 as std::os::raw::c_char;
        regs[APIC_LVT0 + 1] = 0x01;
        set_lvt_delivery_mode(&mut regs, APIC_LVT0, APIC_MODE_EXTINT);
        assert_eq!(regs[APIC_LVT0] as u8, 0x10);
        assert_eq!(regs[APIC_LVT0 + 1] as u8, 0x07);
    }

    #[test]
    fn page_tables_identity_map_first_gib() {
        let mem = crate::memory::create_guest_memory(64).expect("mem");
        write_boot_tables(&mem).expect("tables");
        let pde: u64 = mem.read_obj(GuestAddress(PD_ADDR + 8 * 5)).expect("read");
        assert_eq!(pde, (5 << 21) | 0x83);
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_ADDR)).expect("read");
        assert_eq!(pml4, PDPT_ADDR | 3);
    }
}
