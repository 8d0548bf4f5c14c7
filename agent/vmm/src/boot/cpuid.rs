//! CPUID for each vCPU: what KVM supports, with the topology filled in per vCPU and the
//! features hidden that a guest must not use here.
//!
//! Topology: every leaf that describes it says what [`Topology`] says (one package, one core per
//! vCPU, one thread per core), whichever vendor's leaves the guest reads:
//! - 0x1: the vCPU's APIC id, the logical processor count, HTT when there is more than one;
//! - 0x4 (Intel caches): cores per package; L1 and L2 private to a core, L3 shared by all;
//! - 0xB and 0x1F: SMT level (1 thread, shift 0) and core level (all vCPUs, shift
//!   `ceil(log2(vCPUs))`), the x2APIC id in EDX. KVM reports only subleaf 0 of these, zeroed;
//!   without a core-level subleaf a Linux guest makes every vCPU a package of its own, so the
//!   core level is added;
//! - AMD: 0x8000_0001 CmpLegacy, 0x8000_0008 ECX (cores in the package, APIC id bits),
//!   0x8000_001D (cache sharing as for 0x4), 0x8000_001E (extended APIC id, core id, one thread
//!   per core, one node).
//!
//! On hosts without hardware virtualization (`/dev/kvm` from kvm-pvm, see `shared/KVM-HOST.md`)
//! much guest kernel code runs through KVM's instruction emulator, which stops the guest on
//! instructions it cannot emulate. The `SoftwareNested` profile hides those features
//! (CMPXCHG16B first of all) so the guest kernel never uses them, without kernel parameters.

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

use super::topology::Topology;

/// Errors from building a vCPU's CPUID.
#[derive(Debug, thiserror::Error)]
pub enum CpuidError {
    #[error("CPUID for vCPU {cpu}: {entries} entries do not fit in KVM_SET_CPUID2: {source}")]
    TooManyEntries {
        cpu: u32,
        entries: usize,
        #[source]
        source: vmm_sys_util::fam::Error,
    },
}

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
const ECX_EXT_CMP_LEGACY: u32 = 1 << 1;
const ECX_EXT_ABM: u32 = 1 << 5;
/// KVM paravirtual features leaf.
const KVM_CPUID_FEATURES: u32 = 0x4000_0001;
/// kvmclock (both MSR sets) and its stable bit: the guest reads the TSC frequency from KVM
/// instead of calibrating against the PIT.
const KVM_FEATURES_CLOCK: u32 = (1 << 0) | (1 << 3) | (1 << 24);

// Leaves 0xB/0x1F ECX[15:8]: the level type of a subleaf.
const LEVEL_INVALID: u32 = 0;
const LEVEL_SMT: u32 = 1;
const LEVEL_CORE: u32 = 2;
// Leaves 0x4 and 0x8000_001D EAX: cache type [4:0] (0: no more caches), level [7:5],
// logical processors sharing the cache - 1 [25:14]; 0x4 only: cores per package - 1 [31:26].
const CACHE_TYPE_MASK: u32 = 0x1f;
const CACHE_SHARING_SHIFT: u32 = 14;
const CACHE_SHARING_MASK: u32 = 0xfff;
const CACHE_CORES_SHIFT: u32 = 26;
const CACHE_CORES_MASK: u32 = 0x3f;
// Leaf 0x8000_0008 ECX: cores (threads) in the package - 1 [7:0], APIC id bits below the
// package number [15:12].
const AMD_NC_MASK: u32 = 0xff;
const AMD_APIC_ID_SIZE_SHIFT: u32 = 12;
const AMD_APIC_ID_SIZE_MASK: u32 = 0xf;

/// Where one vCPU sits in the topology, as its CPUID must say.
#[derive(Debug, Clone, Copy)]
struct Placement {
    topology: Topology,
    cpu: u32,
    /// The CPU's vendor describes topology in AMD's extended leaves too (AMD, Hygon).
    amd: bool,
}

/// KVM's supported CPUID adjusted for vCPU `cpu` of `topology`.
pub fn vcpu_cpuid(
    supported: &CpuId,
    cpu: u32,
    topology: Topology,
    profile: CpuProfile,
) -> Result<CpuId, CpuidError> {
    let mut entries = supported.as_slice().to_vec();
    add_topology_levels(&mut entries);
    let placement = Placement {
        topology,
        cpu,
        amd: has_amd_topology_leaves(&entries),
    };
    for entry in entries.iter_mut() {
        configure_entry(entry, placement, profile);
    }
    CpuId::from_entries(&entries).map_err(|source| CpuidError::TooManyEntries {
        cpu,
        entries: entries.len(),
        source,
    })
}

/// KVM reports leaves 0xB and 0x1F with subleaf 0 only. A guest walks the subleaves until it
/// finds an invalid level; with the core level (subleaf 1) missing it reads zeros there, finds
/// no core level and takes the whole APIC id for the package number: N packages. So both
/// levels are added to each extended topology leaf KVM reports (a leaf beyond the maximum basic
/// leaf is one the guest does not read).
fn add_topology_levels(entries: &mut Vec<kvm_cpuid_entry2>) {
    for function in [0xb, 0x1f] {
        if !entries.iter().any(|e| e.function == function) {
            continue;
        }
        for index in [0, 1] {
            if !entries
                .iter()
                .any(|e| e.function == function && e.index == index)
            {
                entries.push(kvm_cpuid_entry2 {
                    function,
                    index,
                    flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
                    ..Default::default()
                });
            }
        }
    }
}

/// Whether leaf 0 names a vendor whose guests read topology from AMD's extended leaves.
fn has_amd_topology_leaves(entries: &[kvm_cpuid_entry2]) -> bool {
    let Some(leaf0) = entries.iter().find(|e| e.function == 0) else {
        return false;
    };
    let mut vendor = [0u8; 12];
    vendor[..4].copy_from_slice(&leaf0.ebx.to_le_bytes());
    vendor[4..8].copy_from_slice(&leaf0.edx.to_le_bytes());
    vendor[8..].copy_from_slice(&leaf0.ecx.to_le_bytes());
    &vendor == b"AuthenticAMD" || &vendor == b"HygonGenuine"
}

fn configure_entry(entry: &mut kvm_cpuid_entry2, placement: Placement, profile: CpuProfile) {
    let nested = profile == CpuProfile::SoftwareNested;
    let topology = placement.topology;
    let apic_id = topology.apic_id(placement.cpu);
    let cpus = topology.cpus();
    match entry.function {
        0x1 => {
            // EBX: APIC id [31:24], logical processors per package [23:16], CLFLUSH size [15:8].
            entry.ebx = ((apic_id & 0xff) << 24) | (cpus.min(0xff) << 16) | (8 << 8);
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
        0x4 if entry.eax & CACHE_TYPE_MASK != 0 => {
            // Deterministic cache parameters (Intel), one subleaf per cache.
            set_cache_sharing(entry, topology);
            let cores = (topology.cores_per_package() - 1).min(CACHE_CORES_MASK);
            entry.eax &= !(CACHE_CORES_MASK << CACHE_CORES_SHIFT);
            entry.eax |= cores << CACHE_CORES_SHIFT;
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
            // Extended topology: level 0 = SMT, level 1 = core (all vCPUs), then none.
            let (shift, count, level) = match entry.index {
                0 => (
                    topology.thread_bits(),
                    topology.threads_per_core(),
                    LEVEL_SMT,
                ),
                1 => (topology.package_shift(), cpus, LEVEL_CORE),
                _ => (0, 0, LEVEL_INVALID),
            };
            entry.eax = shift;
            entry.ebx = count;
            entry.ecx = (level << 8) | (entry.index & 0xff);
            entry.edx = apic_id;
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
        0x8000_0001 => {
            if placement.amd {
                // CmpLegacy: the logical processors leaf 0x1 counts are cores, not threads.
                if cpus > 1 {
                    entry.ecx |= ECX_EXT_CMP_LEGACY;
                } else {
                    entry.ecx &= !ECX_EXT_CMP_LEGACY;
                }
            }
            if nested {
                entry.ecx &= !ECX_EXT_ABM;
            }
        }
        0x8000_0008 if placement.amd => {
            entry.ecx &= !(AMD_NC_MASK | (AMD_APIC_ID_SIZE_MASK << AMD_APIC_ID_SIZE_SHIFT));
            entry.ecx |= (cpus - 1).min(AMD_NC_MASK);
            entry.ecx |= topology.package_shift() << AMD_APIC_ID_SIZE_SHIFT;
        }
        0x8000_001d if entry.eax & CACHE_TYPE_MASK != 0 => {
            // Cache topology (AMD), one subleaf per cache, as leaf 0x4.
            set_cache_sharing(entry, topology);
        }
        0x8000_001e => {
            // Extended APIC id; compute unit (core) id [7:0] and threads per core - 1 [15:8];
            // node id [7:0] and nodes per package - 1 [10:8]: all in node 0.
            let core = placement.cpu / topology.threads_per_core();
            entry.eax = apic_id;
            entry.ebx = ((topology.threads_per_core() - 1) << 8) | (core & 0xff);
            entry.ecx = 0;
            entry.edx = 0;
        }
        _ => {}
    }
}

/// Cache leaves (0x4, 0x8000_001D) EAX[25:14]: the logical processors sharing the cache, less
/// one. L1 and L2 belong to one core, L3 (and any level beyond) to the whole package.
fn set_cache_sharing(entry: &mut kvm_cpuid_entry2, topology: Topology) {
    let level = (entry.eax >> 5) & 0x7;
    let sharing = if level <= 2 {
        topology.threads_per_core()
    } else {
        topology.cpus()
    };
    entry.eax &= !(CACHE_SHARING_MASK << CACHE_SHARING_SHIFT);
    entry.eax |= (sharing - 1).min(CACHE_SHARING_MASK) << CACHE_SHARING_SHIFT;
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

    /// vCPU `cpu` of `cpus`, on an Intel (`amd` false) or AMD host.
    fn place(cpu: u32, cpus: u32, amd: bool) -> Placement {
        Placement {
            topology: Topology::single_package(cpus),
            cpu,
            amd,
        }
    }

    #[test]
    fn leaf1_carries_apic_id_count_and_hides_cx16() {
        let mut e = entry(1, 0);
        configure_entry(&mut e, place(3, 4, false), CpuProfile::Host);
        assert_eq!(e.ebx >> 24, 3);
        assert_eq!((e.ebx >> 16) & 0xff, 4);
        assert_ne!(e.edx & EDX_HTT, 0);
        assert_eq!(e.ecx & ECX_CX16, 0);
        assert_ne!(e.ecx & ECX_HYPERVISOR, 0);
        assert_ne!(e.ecx & ECX_POPCNT, 0, "host profile keeps popcnt");
        let mut n = entry(1, 0);
        configure_entry(&mut n, place(0, 1, false), CpuProfile::SoftwareNested);
        assert_eq!(n.ecx & (ECX_POPCNT | ECX_XSAVE | ECX_CX16), 0);
        assert_eq!(n.edx & EDX_HTT, 0);
    }

    #[test]
    fn nested_profile_hides_smap_and_friends() {
        let mut e = entry(7, 0);
        configure_entry(&mut e, place(0, 2, false), CpuProfile::SoftwareNested);
        assert_eq!(e.ebx & (EBX7_SMAP | EBX7_FSGSBASE | EBX7_ERMS), 0);
        assert_eq!(e.ecx & ECX7_RDPID, 0);
        let mut h = entry(7, 0);
        configure_entry(&mut h, place(0, 2, false), CpuProfile::Host);
        assert_ne!(h.ebx & EBX7_SMAP, 0);
        let mut abm = entry(0x8000_0001, 0);
        configure_entry(&mut abm, place(0, 2, true), CpuProfile::SoftwareNested);
        assert_eq!(abm.ecx & ECX_EXT_ABM, 0);
    }

    #[test]
    fn nested_profile_keeps_only_kvmclock_of_the_pv_features() {
        let mut e = entry(KVM_CPUID_FEATURES, 0);
        configure_entry(&mut e, place(0, 2, false), CpuProfile::SoftwareNested);
        assert_eq!(e.eax, KVM_FEATURES_CLOCK);
        let mut h = entry(KVM_CPUID_FEATURES, 0);
        configure_entry(&mut h, place(0, 2, false), CpuProfile::Host);
        assert_eq!(h.eax, u32::MAX);
    }

    #[test]
    fn topology_levels() {
        // (vCPUs, vCPU, core-level shift)
        for (cpus, cpu, shift) in [(1, 0, 0), (3, 2, 2), (4, 2, 2), (8, 7, 3)] {
            let mut smt = entry(0xb, 0);
            configure_entry(&mut smt, place(cpu, cpus, false), CpuProfile::Host);
            assert_eq!((smt.eax, smt.ebx, smt.ecx, smt.edx), (0, 1, 0x100, cpu));
            let mut core = entry(0x1f, 1);
            configure_entry(&mut core, place(cpu, cpus, false), CpuProfile::Host);
            assert_eq!(
                (core.eax, core.ebx, core.ecx, core.edx),
                (shift, cpus, 0x201, cpu)
            );
            let mut end = entry(0xb, 2);
            configure_entry(&mut end, place(cpu, cpus, false), CpuProfile::Host);
            assert_eq!((end.eax, end.ebx, end.ecx, end.edx), (0, 0, 2, cpu));
        }
    }

    #[test]
    fn core_level_is_added_where_kvm_reports_subleaf_0_only() {
        let supported = CpuId::from_entries(&[
            kvm_cpuid_entry2 {
                function: 0xb,
                flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0x1f,
                flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
                ..Default::default()
            },
        ])
        .expect("cpuid");
        let cpuid = vcpu_cpuid(&supported, 1, Topology::single_package(4), CpuProfile::Host)
            .expect("vcpu cpuid");
        let mut levels: Vec<(u32, u32, u32)> = cpuid
            .as_slice()
            .iter()
            .map(|e| (e.function, e.index, e.ecx >> 8))
            .collect();
        levels.sort();
        assert_eq!(
            levels,
            [
                (0xb, 0, LEVEL_SMT),
                (0xb, 1, LEVEL_CORE),
                (0x1f, 0, LEVEL_SMT),
                (0x1f, 1, LEVEL_CORE)
            ]
        );
        assert!(cpuid
            .as_slice()
            .iter()
            .all(|e| e.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX != 0));
        // A host whose maximum basic leaf is below 0x1F: no 0x1F leaf appears.
        let only_b = CpuId::from_entries(&supported.as_slice()[..1]).expect("cpuid");
        let cpuid = vcpu_cpuid(&only_b, 0, Topology::single_package(2), CpuProfile::Host)
            .expect("vcpu cpuid");
        assert!(cpuid.as_slice().iter().all(|e| e.function == 0xb));
    }

    #[test]
    fn cache_sharing_private_l1_l2_and_package_wide_l3() {
        // Cache type 1 (data) or 3 (unified) at levels 1..3, with host sharing and cores.
        let cache = |function: u32, level: u32| kvm_cpuid_entry2 {
            function,
            eax: (7 << 26) | (1 << 14) | (level << 5) | if level == 1 { 1 } else { 3 },
            ..Default::default()
        };
        for cpus in [1u32, 3, 8] {
            for level in 1..=3 {
                let sharing = if level == 3 { cpus } else { 1 };
                let mut intel = cache(0x4, level);
                configure_entry(&mut intel, place(0, cpus, false), CpuProfile::Host);
                assert_eq!((intel.eax >> 14) & 0xfff, sharing - 1, "L{level} of {cpus}");
                assert_eq!(intel.eax >> 26, cpus - 1, "cores of {cpus}");
                assert_eq!(intel.eax & 0xff, cache(0x4, level).eax & 0xff);
                let mut amd = cache(0x8000_001d, level);
                configure_entry(&mut amd, place(0, cpus, true), CpuProfile::Host);
                assert_eq!((amd.eax >> 14) & 0xfff, sharing - 1, "L{level} of {cpus}");
                assert_eq!(amd.eax >> 26, 7, "0x8000_001D has no core count");
            }
        }
        // The terminating subleaf (cache type 0) stays as KVM gave it.
        let mut end = kvm_cpuid_entry2 {
            function: 0x4,
            index: 4,
            ..Default::default()
        };
        configure_entry(&mut end, place(0, 4, false), CpuProfile::Host);
        assert_eq!(end.eax, 0);
    }

    #[test]
    fn amd_leaves_count_cores_and_only_on_amd() {
        // This host's KVM (AMD EPYC): NC 1 and ApicIdSize 7 from the host's topology.
        let host = |function: u32, ecx: u32| kvm_cpuid_entry2 {
            function,
            eax: 0x3030,
            ecx,
            ..Default::default()
        };
        let mut amd = host(0x8000_0008, 0x7001);
        configure_entry(&mut amd, place(2, 3, true), CpuProfile::Host);
        assert_eq!((amd.eax, amd.ecx), (0x3030, 0x2002));
        let mut intel = host(0x8000_0008, 0);
        configure_entry(&mut intel, place(2, 3, false), CpuProfile::Host);
        assert_eq!(intel.ecx, 0, "reserved on Intel");

        let mut ext = entry(0x8000_001e, 0);
        configure_entry(&mut ext, place(5, 8, true), CpuProfile::Host);
        assert_eq!((ext.eax, ext.ebx, ext.ecx, ext.edx), (5, 5, 0, 0));

        let mut one = host(0x8000_0001, 0x0040_0393);
        configure_entry(&mut one, place(0, 1, true), CpuProfile::Host);
        assert_eq!(one.ecx & ECX_EXT_CMP_LEGACY, 0);
        let mut four = host(0x8000_0001, 0x0040_0391);
        configure_entry(&mut four, place(0, 4, true), CpuProfile::Host);
        assert_ne!(four.ecx & ECX_EXT_CMP_LEGACY, 0);
    }

    #[test]
    fn vendor_from_leaf_0() {
        let leaf0 = |vendor: &[u8; 12]| kvm_cpuid_entry2 {
            function: 0,
            ebx: u32::from_le_bytes(vendor[..4].try_into().expect("4 bytes")),
            edx: u32::from_le_bytes(vendor[4..8].try_into().expect("4 bytes")),
            ecx: u32::from_le_bytes(vendor[8..].try_into().expect("4 bytes")),
            ..Default::default()
        };
        assert!(has_amd_topology_leaves(&[leaf0(b"AuthenticAMD")]));
        assert!(has_amd_topology_leaves(&[leaf0(b"HygonGenuine")]));
        assert!(!has_amd_topology_leaves(&[leaf0(b"GenuineIntel")]));
        assert!(!has_amd_topology_leaves(&[]));
    }
}
