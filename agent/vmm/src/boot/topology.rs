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
}
