//! The vCPU topology the guest sees: one package (socket) whose cores are the vCPUs, one thread
//! per core, one die, one NUMA node.
//!
//! CPUID ([`super::cpuid`]) and the MP table ([`super::mptable`]) both take their numbers from
//! [`Topology`], so the APIC id a vCPU reports in CPUID is the one the MP table lists for it. KVM
//! gives vCPU `n` (created with id `n`) the local APIC id `n`, which fixes the numbering: with no
//! thread bits and the core number in the low bits, APIC id = core number = vCPU index.
//!
//! APIC id layout, as CPUID leaves 0xB/0x1F describe it: `[package | core (core_bits) | thread (0
//! bits)]`, with `core_bits = ceil(log2(cores))`, so every APIC id of the package shifts down to
//! package 0.

/// One package of `cores` single-threaded cores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Topology {
    cores: u32,
}

impl Topology {
    /// `vcpus` vCPUs as the cores of one package (at least one).
    pub fn single_package(vcpus: u32) -> Topology {
        Topology {
            cores: vcpus.max(1),
        }
    }

    /// vCPUs (logical processors) in all: cores times threads per core.
    pub fn cpus(self) -> u32 {
        self.cores * self.threads_per_core()
    }

    /// Cores in the package.
    pub fn cores_per_package(self) -> u32 {
        self.cores
    }

    /// Threads per core: no SMT siblings, whatever the host has.
    pub fn threads_per_core(self) -> u32 {
        1
    }

    /// APIC id bits that number the threads of a core (CPUID 0xB/0x1F SMT-level shift).
    pub fn thread_bits(self) -> u32 {
        bits_for(self.threads_per_core())
    }

    /// APIC id bits below the package number (CPUID 0xB/0x1F core-level shift): thread bits
    /// plus `ceil(log2(cores))`.
    pub fn package_shift(self) -> u32 {
        self.thread_bits() + bits_for(self.cores)
    }

    /// The (x2)APIC id of vCPU `cpu`: its core number, in package 0.
    pub fn apic_id(self, cpu: u32) -> u32 {
        let core = cpu / self.threads_per_core();
        let thread = cpu % self.threads_per_core();
        (core << self.thread_bits()) | thread
    }
}

/// Bits needed to number `count` things: `ceil(log2(count))`, 0 for one.
fn bits_for(count: u32) -> u32 {
    u32::BITS - count.max(1).saturating_sub(1).leading_zeros()
}

#[cfg(test)]
mod tests {
    use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

    use super::super::cpuid::{vcpu_cpuid, CpuProfile};
    use super::super::mptable;
    use super::*;

    #[test]
    fn shifts_and_apic_ids() {
        // (vCPUs, package shift)
        for (cpus, shift) in [
            (1, 0),
            (2, 1),
            (3, 2),
            (4, 2),
            (5, 3),
            (8, 3),
            (9, 4),
            (254, 8),
        ] {
            let topology = Topology::single_package(cpus);
            assert_eq!(topology.cpus(), cpus);
            assert_eq!(topology.cores_per_package(), cpus);
            assert_eq!(topology.thread_bits(), 0);
            assert_eq!(topology.package_shift(), shift, "{cpus} vCPUs");
            for cpu in 0..cpus {
                // KVM's local APIC id for vCPU `cpu` is `cpu`: the topology must agree.
                assert_eq!(topology.apic_id(cpu), cpu);
                assert_eq!(topology.apic_id(cpu) >> shift, 0, "package 0");
            }
        }
    }

    fn leaf(function: u32, index: u32, regs: [u32; 4]) -> kvm_cpuid_entry2 {
        let significant = matches!(function, 0x4 | 0x7 | 0xb | 0xd | 0x1f | 0x8000_001d);
        kvm_cpuid_entry2 {
            function,
            index,
            flags: if significant {
                KVM_CPUID_FLAG_SIGNIFCANT_INDEX
            } else {
                0
            },
            eax: regs[0],
            ebx: regs[1],
            ecx: regs[2],
            edx: regs[3],
            ..Default::default()
        }
    }

    /// The topology leaves of KVM_GET_SUPPORTED_CPUID on this project's AMD EPYC host (kvm-pvm,
    /// host kernel 6.x): leaf 0xB subleaf 0 only and zeroed, 0x8000_0008 and 0x8000_001D with the
    /// host's 2 threads per core, 0x8000_001E zeroed, TOPOEXT and CmpLegacy set.
    fn amd_host() -> Vec<kvm_cpuid_entry2> {
        vec![
            leaf(0x0, 0, [0x1c, 0x6874_7541, 0x444d_4163, 0x6974_6e65]),
            leaf(0x1, 0, [0x00a1_0f11, 0x0102_0800, 0x8120_2000, 0x078b_fbff]),
            leaf(0x4, 0, [0, 0, 0, 0]),
            leaf(0xb, 0, [0, 0, 0, 1]),
            leaf(
                0x8000_0000,
                0,
                [0x8000_0021, 0x6874_7541, 0x444d_4163, 0x6974_6e65],
            ),
            leaf(
                0x8000_0001,
                0,
                [0x00a1_0f11, 0x4000_0000, 0x0040_0393, 0x23d3_fbff],
            ),
            leaf(0x8000_0008, 0, [0x3030, 0x5002_0005, 0x7001, 0]),
            leaf(0x8000_001d, 0, [0x121, 0x01c0_003f, 0x3f, 0]),
            leaf(0x8000_001d, 1, [0x122, 0x01c0_003f, 0x3f, 0]),
            leaf(0x8000_001d, 2, [0x143, 0x01c0_003f, 0x7ff, 2]),
            leaf(0x8000_001d, 3, [0x4163, 0x03c0_003f, 0x7fff, 1]),
            leaf(0x8000_001d, 4, [0, 0, 0, 0]),
            leaf(0x8000_001e, 0, [0, 0, 0, 0]),
        ]
    }

    /// KVM on an Intel host with 2 threads per core and leaf 0x1F: caches from the host (L1/L2
    /// shared by 2 threads, L3 by 32, 16 cores), 0xB and 0x1F subleaf 0 only and zeroed.
    fn intel_host() -> Vec<kvm_cpuid_entry2> {
        vec![
            leaf(0x0, 0, [0x1f, 0x756e_6547, 0x6c65_746e, 0x4965_6e69]),
            leaf(0x1, 0, [0x0008_06f8, 0x0020_0800, 0xfffa_3223, 0x1f8b_fbff]),
            leaf(0x4, 0, [0x3c00_4121, 0x02c0_003f, 0x3f, 0]),
            leaf(0x4, 1, [0x3c00_4122, 0x01c0_003f, 0x3f, 0]),
            leaf(0x4, 2, [0x3c00_4143, 0x03c0_003f, 0x7ff, 0]),
            leaf(0x4, 3, [0x3c07_c163, 0x03c0_003f, 0xbfff, 4]),
            leaf(0x4, 4, [0, 0, 0, 0]),
            leaf(0xb, 0, [0, 0, 0, 0]),
            leaf(0x1f, 0, [0, 0, 0, 0]),
            leaf(0x8000_0000, 0, [0x8000_0008, 0, 0, 0]),
            leaf(0x8000_0001, 0, [0, 0, 0x121, 0x2c10_0800]),
            leaf(0x8000_0008, 0, [0x3030, 0, 0, 0]),
        ]
    }

    /// One vCPU's CPUID, answered the way KVM answers the guest.
    struct GuestCpuid<'a>(&'a [kvm_cpuid_entry2]);

    impl GuestCpuid<'_> {
        fn cpuid(&self, function: u32, index: u32) -> [u32; 4] {
            let significant = |e: &kvm_cpuid_entry2| e.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX != 0;
            let found = self
                .0
                .iter()
                .find(|e| e.function == function && (e.index == index || !significant(e)));
            if let Some(e) = found {
                return [e.eax, e.ebx, e.ecx, e.edx];
            }
            // KVM: an undefined subleaf of 0xB/0x1F passes ECX[7:0] through and gives the
            // x2APIC id, when subleaf 1 exists; anything else undefined reads as zeros.
            if function == 0xb || function == 0x1f {
                if let Some(one) = self
                    .0
                    .iter()
                    .find(|e| e.function == function && e.index == 1)
                {
                    return [0, 0, index & 0xff, one.edx];
                }
            }
            [0; 4]
        }
    }

    /// What a Linux 6.1 guest concludes from one vCPU's CPUID (`detect_extended_topology`,
    /// `init_intel_cacheinfo`, `early_init_amd_mc`, `amd_get_topology`, `cacheinfo_amd_init_llc_id`).
    #[derive(Debug)]
    struct Seen {
        x2apic_id: u32,
        leaf1_apic_id: u32,
        leaf1_logical: u32,
        htt: bool,
        package: u32,
        core: u32,
        threads_per_core: u32,
        cores_per_package: u32,
        llc_id: u32,
        /// Intel: leaf 0x4's cores per package.
        leaf4_cores: Option<u32>,
        /// AMD: (0x8000_0008 NC + 1, package from its ApicIdSize, 0x8000_001E (extended APIC
        /// id, core id, threads per core, nodes per package)).
        amd: Option<(u32, u32, [u32; 4])>,
    }

    fn count_order(n: u32) -> u32 {
        u32::BITS - n.max(1).saturating_sub(1).leading_zeros()
    }

    fn seen_by_guest(cpu: &GuestCpuid<'_>) -> Seen {
        let [max_leaf, vendor_ebx, ..] = cpu.cpuid(0, 0);
        let amd = vendor_ebx == 0x6874_7541; // "Auth"
        let valid = |leaf: u32| {
            let [_, ebx, ecx, _] = cpu.cpuid(leaf, 0);
            max_leaf >= leaf && ebx != 0 && (ecx >> 8) & 0xff == 1
        };
        let leaf = if valid(0x1f) {
            0x1f
        } else {
            assert!(valid(0xb), "no extended topology leaf: {:x?}", cpu.0);
            0xb
        };
        let [eax, ebx, _, x2apic_id] = cpu.cpuid(leaf, 0);
        let threads = ebx & 0xffff;
        let ht_shift = eax & 0x1f;
        let (mut core_siblings, mut pkg_shift) = (threads, ht_shift);
        for index in 1..8 {
            let [eax, ebx, ecx, _] = cpu.cpuid(leaf, index);
            let level = (ecx >> 8) & 0xff;
            if level == 2 {
                core_siblings = ebx & 0xffff;
            }
            if level == 0 {
                break;
            }
            pkg_shift = eax & 0x1f;
        }
        let core_select_mask = !(u32::MAX << pkg_shift) >> ht_shift;

        let cache_leaf = if amd { 0x8000_001d } else { 0x4 };
        let caches: Vec<u32> = (0..8)
            .map(|index| cpu.cpuid(cache_leaf, index)[0])
            .take_while(|eax| eax & 0x1f != 0)
            .collect();
        let llc = *caches.last().expect("a cache leaf");
        let llc_id = x2apic_id >> count_order(((llc >> 14) & 0xfff) + 1);

        let [_, leaf1_ebx, _, leaf1_edx] = cpu.cpuid(1, 0);
        let amd_leaves = amd.then(|| {
            let nc_ecx = cpu.cpuid(0x8000_0008, 0)[2];
            let nc = (nc_ecx & 0xff) + 1;
            let size = match (nc_ecx >> 12) & 0xf {
                0 => count_order(nc),
                size => size,
            };
            let [ext_id, ebx, ecx, _] = cpu.cpuid(0x8000_001e, 0);
            let ext = [
                ext_id,
                ebx & 0xff,
                ((ebx >> 8) & 0xff) + 1,
                ((ecx >> 8) & 7) + 1,
            ];
            (nc, x2apic_id >> size, ext)
        });
        Seen {
            x2apic_id,
            leaf1_apic_id: leaf1_ebx >> 24,
            leaf1_logical: (leaf1_ebx >> 16) & 0xff,
            htt: leaf1_edx & (1 << 28) != 0,
            package: x2apic_id >> pkg_shift,
            core: (x2apic_id >> ht_shift) & core_select_mask,
            threads_per_core: threads,
            cores_per_package: core_siblings / threads,
            llc_id,
            leaf4_cores: (!amd).then(|| (caches[0] >> 26) + 1),
            amd: amd_leaves,
        }
    }

    /// For N vCPUs every vCPU's CPUID says: 1 package, N cores, 1 thread per core, the L3 shared
    /// by all; its APIC id is the one the MP table lists for it; the core ids are 0..N.
    #[test]
    fn every_vcpu_sees_one_package_of_single_threaded_cores_as_the_mp_table_says() {
        for (host, supported) in [("AMD", amd_host()), ("Intel", intel_host())] {
            let supported = CpuId::from_entries(&supported).expect("cpuid");
            for cpus in [1u32, 2, 3, 4, 8] {
                let topology = Topology::single_package(cpus);
                let table = mptable::build(topology, 0xf_0000).expect("mp table");
                let processors = mptable::processor_entries(&table);
                assert_eq!(processors.len() as u32, cpus, "{host}, {cpus} vCPUs");
                let mut cores = Vec::new();
                for cpu in 0..cpus {
                    let cpuid = vcpu_cpuid(&supported, cpu, topology, CpuProfile::SoftwareNested)
                        .expect("vcpu cpuid");
                    let seen = seen_by_guest(&GuestCpuid(cpuid.as_slice()));
                    let what = format!("{host}, vCPU {cpu} of {cpus}: {seen:?}");
                    let (mp_apic_id, _) = processors[cpu as usize];
                    assert_eq!(seen.x2apic_id, cpu, "{what}");
                    assert_eq!(seen.leaf1_apic_id, cpu, "{what}");
                    assert_eq!(u32::from(mp_apic_id), cpu, "MP table: {what}");
                    assert_eq!(seen.package, 0, "{what}");
                    assert_eq!(seen.threads_per_core, 1, "{what}");
                    assert_eq!(seen.cores_per_package, cpus, "{what}");
                    assert_eq!(seen.leaf1_logical, cpus, "{what}");
                    assert_eq!(seen.htt, cpus > 1, "{what}");
                    assert_eq!(seen.llc_id, 0, "L3 shared by the package: {what}");
                    if let Some(leaf4_cores) = seen.leaf4_cores {
                        assert_eq!(leaf4_cores, cpus, "{what}");
                    }
                    if let Some((nc, package, ext)) = seen.amd {
                        assert_eq!((nc, package), (cpus, 0), "{what}");
                        assert_eq!(ext, [cpu, cpu, 1, 1], "0x8000_001E: {what}");
                    } else {
                        assert_eq!(host, "Intel");
                    }
                    cores.push(seen.core);
                }
                cores.sort();
                assert_eq!(cores, (0..cpus).collect::<Vec<_>>(), "{host}, {cpus} vCPUs");
            }
        }
    }
}
