//! CPUID for each vCPU: what KVM supports, with the topology filled in per vCPU and the
//! features hidden that a guest must not use here.
//!
//! On hosts without hardware virtualization (`/dev/kvm` from kvm-pvm, see `shared/KVM-HOST.md`)
//! much guest kernel code runs through KVM's instruction emulator, which stops the guest on
//! instructions it cannot emulate. The `SoftwareNested` profile hides those features
//! (CMPXCHG16B first of all) so the guest kernel never uses them, without kernel parameters.

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

/// Which CPU features a guest sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuProfile {
    /// Everything KVM supports (hosts with VMX/SVM).
    Host,
    /// Hides what KVM's instruction emulator cannot run (hosts without VMX/SVM).
    SoftwareNested,
}

impl CpuProfile {
    /// Chooses by looking at the host's CPU flags: no `vmx`/`svm` means KVM is emulated.
    pub fn detect() -> CpuProfile {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let hardware = cpuinfo
            .lines()
            .filter(|l| l.starts_with("flags"))
            .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
        if hardware {
            CpuProfile::Host
        } else {
            CpuProfile::SoftwareNested
        }
    }
}

// Leaf 1 ECX.
const ECX_CX16: u32 = 1 << 13;
const ECX_PCID: u32 = 1 << 17;
const ECX_MOVBE: u32 = 1 << 22;
const ECX_POPCNT: u32 = 1 << 23;
const ECX_XSAVE: u32 = 1 << 26;
const ECX_OSXSAVE: u32 = 1 << 27;
const ECX_AVX: u32 = 1 << 28;
const ECX_F16C: u32 = 1 << 29;
const ECX_RDRAND: u32 = 1 << 30;
const ECX_HYPERVISOR: u32 = 1 << 31;
const ECX_FMA: u32 = 1 << 12;
// Leaf 1 EDX.
const EDX_HTT: u32 = 1 << 28;
// Leaf 7 EBX.
const EBX7_FSGSBASE: u32 = 1 << 0;
const EBX7_BMI1: u32 = 1 << 3;
const EBX7_AVX2: u32 = 1 << 5;
const EBX7_BMI2: u32 = 1 << 8;
const EBX7_ERMS: u32 = 1 << 9;
const EBX7_INVPCID: u32 = 1 << 10;
const EBX7_RDSEED: u32 = 1 << 18;
const EBX7_SMAP: u32 = 1 << 20;
/// AVX-512 F, DQ, IFMA, PF, ER, CD, BW, VL: all need XSAVE state.
const EBX7_AVX512: u32 =
    (1 << 16) | (1 << 17) | (1 << 21) | (1 << 26) | (1 << 27) | (1 << 28) | (1 << 30) | (1 << 31);
// Leaf 7 ECX.
const ECX7_RDPID: u32 = 1 << 22;
// Leaf 7 EDX.
const EDX7_FSRM: u32 = 1 << 4;
// Leaf 0x8000_0001 ECX.
const ECX_EXT_ABM: u32 = 1 << 5;
/// KVM paravirtual features leaf.
const KVM_CPUID_FEATURES: u32 = 0x4000_0001;
/// kvmclock (both MSR sets) and its stable bit: the guest reads the TSC frequency from KVM
/// instead of calibrating against the PIT.
const KVM_FEATURES_CLOCK: u32 = (1 << 0) | (1 << 3) | (1 << 24);

/// Adjusts KVM's supported CPUID for vCPU `cpu` of `cpus`.
pub fn configure_cpuid(cpuid: &mut CpuId, cpu: u32, cpus: u32, profile: CpuProfile) {
    let apic_id = cpu;
    // Bits needed to number the cores of the package.
    let core_bits = 32 - (cpus.max(1) - 1).leading_zeros();
    for entry in cpuid.as_mut_slice().iter_mut() {
        configure_entry(entry, apic_id, cpus, core_bits, profile);
    }
}

fn configure_entry(
    entry: &mut kvm_cpuid_entry2,
    apic_id: u32,
    cpus: u32,
    core_bits: u32,
    profile: CpuProfile,
) {
    let nested = profile == CpuProfile::SoftwareNested;
    match entry.function {
        0x1 => {
            // EBX: APIC id [31:24], logical processors per package [23:16], CLFLUSH size [15:8].
            entry.ebx = (apic_id << 24) | ((cpus & 0xff) << 16) | (8 << 8);
            entry.ecx |= ECX_HYPERVISOR;
            entry.ecx &= !ECX_CX16;
            if cpus > 1 {
                entry.edx |= EDX_HTT;
            } else {
                entry.edx &= !EDX_HTT;
            }
            if nested {
                entry.ecx &= !(ECX_PCID
                    | ECX_MOVBE
                    | ECX_POPCNT
                    | ECX_XSAVE
                    | ECX_OSXSAVE
                    | ECX_AVX
                    | ECX_F16C
                    | ECX_FMA
                    | ECX_RDRAND);
            }
        }
        0x4 => {
            // Deterministic cache parameters: cores per package [31:26]; each cache is
            // shared by one core (one thread per core).
            entry.eax &= !(0xfc00_0000 | 0x03ff_c000);
            entry.eax |= (cpus.saturating_sub(1) & 0x3f) << 26;
        }
        0x7 if entry.index == 0 && nested => {
            entry.ebx &= !(EBX7_FSGSBASE
                | EBX7_BMI1
                | EBX7_AVX2
                | EBX7_BMI2
                | EBX7_ERMS
                | EBX7_INVPCID
                | EBX7_RDSEED
                | EBX7_SMAP
                | EBX7_AVX512);
            entry.ecx &= !ECX7_RDPID;
            entry.edx &= !EDX7_FSRM;
        }
        0xa => {
            // No architectural PMU: the guest skips perf counter setup.
            entry.eax = 0;
            entry.ebx = 0;
            entry.ecx = 0;
            entry.edx = 0;
        }
        0xb | 0x1f => {
            // Extended topology: level 0 = SMT (1 thread), level 1 = core (all vCPUs).
            entry.edx = apic_id;
            match entry.index {
                0 => {
                    entry.eax = 0;
                    entry.ebx = 1;
                    entry.ecx = (1 << 8) | entry.index;
                }
                1 => {
                    entry.eax = core_bits;
                    entry.ebx = cpus;
                    entry.ecx = (2 << 8) | entry.index;
                }
                _ => {
                    entry.eax = 0;
                    entry.ebx = 0;
                    entry.ecx = entry.index;
                }
            }
        }
        0xd if nested => {
            // XSAVE is hidden: no XSAVE state components either.
            entry.eax = 0;
            entry.ebx = 0;
            entry.ecx = 0;
            entry.edx = 0;
        }
        KVM_CPUID_FEATURES if nested => {
            // Under a software-nested KVM, paravirtual features that rely on hypercalls or
            // shared pages (PV IPIs, PV TLB flush, PV unhalt, async page faults, steal time,
            // PV EOI) hang the guest while it brings up its APs; kvmclock works and is what
            // boot speed needs.
            entry.eax &= KVM_FEATURES_CLOCK;
        }
        0x8000_0001 if nested => {
            entry.ecx &= !ECX_EXT_ABM;
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: u32::MAX,
            ebx: u32::MAX,
            ecx: u32::MAX,
            edx: u32::MAX,
            ..Default::default()
        }
    }

    #[test]
    fn leaf1_carries_apic_id_count_and_hides_cx16() {
        let mut e = entry(1, 0);
        configure_entry(&mut e, 3, 4, 2, CpuProfile::Host);
        assert_eq!(e.ebx >> 24, 3);
        assert_eq!((e.ebx >> 16) & 0xff, 4);
        assert_eq!(e.ecx & ECX_CX16, 0);
        assert_ne!(e.ecx & ECX_HYPERVISOR, 0);
        assert_ne!(e.ecx & ECX_POPCNT, 0, "host profile keeps popcnt");
        let mut n = entry(1, 0);
        configure_entry(&mut n, 0, 1, 0, CpuProfile::SoftwareNested);
        assert_eq!(n.ecx & (ECX_POPCNT | ECX_XSAVE | ECX_CX16), 0);
        assert_eq!(n.edx & EDX_HTT, 0);
    }

    #[test]
    fn nested_profile_hides_smap_and_friends() {
        let mut e = entry(7, 0);
        configure_entry(&mut e, 0, 2, 1, CpuProfile::SoftwareNested);
        assert_eq!(e.ebx & (EBX7_SMAP | EBX7_FSGSBASE | EBX7_ERMS), 0);
        assert_eq!(e.ecx & ECX7_RDPID, 0);
        let mut h = entry(7, 0);
        configure_entry(&mut h, 0, 2, 1, CpuProfile::Host);
        assert_ne!(h.ebx & EBX7_SMAP, 0);
    }

    #[test]
    fn nested_profile_keeps_only_kvmclock_of_the_pv_features() {
        let mut e = entry(KVM_CPUID_FEATURES, 0);
        configure_entry(&mut e, 0, 2, 1, CpuProfile::SoftwareNested);
        assert_eq!(e.eax, KVM_FEATURES_CLOCK);
        let mut h = entry(KVM_CPUID_FEATURES, 0);
        configure_entry(&mut h, 0, 2, 1, CpuProfile::Host);
        assert_eq!(h.eax, u32::MAX);
    }

    #[test]
    fn topology_levels() {
        let mut smt = entry(0xb, 0);
        configure_entry(&mut smt, 2, 4, 2, CpuProfile::Host);
        assert_eq!((smt.eax, smt.ebx, smt.ecx >> 8, smt.edx), (0, 1, 1, 2));
        let mut core = entry(0xb, 1);
        configure_entry(&mut core, 2, 4, 2, CpuProfile::Host);
        assert_eq!((core.eax, core.ebx, core.ecx >> 8, core.edx), (2, 4, 2, 2));
    }
}
