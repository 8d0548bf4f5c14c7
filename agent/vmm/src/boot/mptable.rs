//! The Intel MultiProcessor table: how a guest without ACPI finds its CPUs, IOAPIC and IRQ routing.
//!
//! Layout (MP spec 1.4): a 16-byte floating pointer (`_MP_`), then the configuration table
//! (`PCMP`) with one processor entry per vCPU (its APIC id from [`Topology`], the one CPUID
//! reports), one ISA bus, the IOAPIC, an interrupt-source
//! entry per IOAPIC pin, and the two local interrupt entries (LINT0 = ExtINT, LINT1 = NMI).
//! Both live in the BIOS area at [`MPTABLE_ADDR`](super::MPTABLE_ADDR), which Linux scans and
//! which the e820 map leaves out of RAM.

use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmap};

use super::topology::Topology;

/// Local APIC base address.
pub const APIC_DEFAULT_PHYS_BASE: u32 = 0xfee0_0000;
/// IOAPIC base address.
pub const IO_APIC_DEFAULT_PHYS_BASE: u32 = 0xfec0_0000;
/// Pins of the in-kernel IOAPIC.
pub const IOAPIC_PINS: u8 = 24;

const MP_PROCESSOR: u8 = 0;
const MP_BUS: u8 = 1;
const MP_IOAPIC: u8 = 2;
const MP_INTSRC: u8 = 3;
const MP_LINTSRC: u8 = 4;
const MP_IRQ_SRC_INT: u8 = 0;
const MP_IRQ_SRC_NMI: u8 = 1;
const MP_IRQ_SRC_EXTINT: u8 = 3;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const MPC_APIC_USABLE: u8 = 1;
const CPU_STEPPING: u32 = 0x600;
const CPU_FEATURE_APIC: u32 = 0x200;
const CPU_FEATURE_FPU: u32 = 0x001;

#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct MpFloatingPointer {
    signature: [u8; 4],
    physptr: u32,
    length: u8,
    specification: u8,
    checksum: u8,
    feature: [u8; 5],
}

#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct MpConfigHeader {
    signature: [u8; 4],
    length: u16,
    spec: u8,
    checksum: u8,
    oem: [u8; 8],
    productid: [u8; 12],
    oemptr: u32,
    oemsize: u16,
    oemcount: u16,
    lapic: u32,
    reserved: u32,
}

#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct MpProcessor {
    type_: u8,
    apicid: u8,
    apicver: u8,
    cpuflag: u8,
    cpufeature: u32,
    featureflag: u32,
    reserved: [u32; 2],
}

#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct MpBus {
    type_: u8,
    busid: u8,
    bustype: [u8; 6],
}

#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct MpIoApic {
    type_: u8,
    apicid: u8,
    apicver: u8,
    flags: u8,
    apicaddr: u32,
}

#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct MpIntSrc {
    type_: u8,
    irqtype: u8,
    irqflag: u16,
    srcbus: u8,
    srcbusirq: u8,
    dstapic: u8,
    dstirq: u8,
}

// SAFETY: each struct is repr(C, packed) made only of integers and byte arrays: every bit pattern
// is a valid value and there is no padding.
unsafe impl ByteValued for MpFloatingPointer {}
// SAFETY: as above.
unsafe impl ByteValued for MpConfigHeader {}
// SAFETY: as above.
unsafe impl ByteValued for MpProcessor {}
// SAFETY: as above.
unsafe impl ByteValued for MpBus {}
// SAFETY: as above.
unsafe impl ByteValued for MpIoApic {}
// SAFETY: as above.
unsafe impl ByteValued for MpIntSrc {}

/// Errors from writing the MP table.
#[derive(Debug, thiserror::Error)]
pub enum MpTableError {
    #[error("MP table: {0} vCPUs do not fit (xAPIC ids are 8 bits)")]
    TooManyCpus(u32),
    #[error("MP table: writing to guest memory at {addr:#x}: {source}")]
    Write {
        addr: u64,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |acc, b| acc.wrapping_add(*b))
}

/// Builds the MP table for the vCPUs of `topology`, as bytes to place at `base`.
pub(super) fn build(topology: Topology, base: u64) -> Result<Vec<u8>, MpTableError> {
    let cpus = topology.cpus();
    if cpus > 254 {
        return Err(MpTableError::TooManyCpus(cpus));
    }
    // Above every vCPU's APIC id (they are 0..cpus).
    let ioapic_id = cpus as u8 + 1;
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for cpu in 0..cpus {
        let entry = MpProcessor {
            type_: MP_PROCESSOR,
            apicid: topology.apic_id(cpu) as u8,
            apicver: APIC_VERSION,
            cpuflag: CPU_ENABLED | if cpu == 0 { CPU_BOOTPROCESSOR } else { 0 },
            cpufeature: CPU_STEPPING,
            featureflag: CPU_FEATURE_APIC | CPU_FEATURE_FPU,
            reserved: [0; 2],
        };
        entries.extend_from_slice(entry.as_slice());
        count += 1;
    }
    let bus = MpBus {
        type_: MP_BUS,
        busid: 0,
        bustype: *b"ISA   ",
    };
    entries.extend_from_slice(bus.as_slice());
    let ioapic = MpIoApic {
        type_: MP_IOAPIC,
        apicid: ioapic_id,
        apicver: IOAPIC_VERSION,
        flags: MPC_APIC_USABLE,
        apicaddr: IO_APIC_DEFAULT_PHYS_BASE,
    };
    entries.extend_from_slice(ioapic.as_slice());
    count += 2;
    for pin in 0..IOAPIC_PINS {
        let intsrc = MpIntSrc {
            type_: MP_INTSRC,
            irqtype: MP_IRQ_SRC_INT,
            irqflag: 0,
            srcbus: 0,
            srcbusirq: pin,
            dstapic: ioapic_id,
            dstirq: pin,
        };
        entries.extend_from_slice(intsrc.as_slice());
        count += 1;
    }
    for (irqtype, dstapic, lint) in [(MP_IRQ_SRC_EXTINT, 0u8, 0u8), (MP_IRQ_SRC_NMI, 0xff, 1)] {
        let lintsrc = MpIntSrc {
            type_: MP_LINTSRC,
            irqtype,
            irqflag: 0,
            srcbus: 0,
            srcbusirq: 0,
            dstapic,
            dstirq: lint,
        };
        entries.extend_from_slice(lintsrc.as_slice());
        count += 1;
    }

    let fp_size = std::mem::size_of::<MpFloatingPointer>();
    let header_size = std::mem::size_of::<MpConfigHeader>();
    let mut header = MpConfigHeader {
        signature: *b"PCMP",
        length: (header_size + entries.len()) as u16,
        spec: 4,
        checksum: 0,
        oem: *b"FABRIC  ",
        productid: *b"FABRIC-VMM  ",
        oemptr: 0,
        oemsize: 0,
        oemcount: count,
        lapic: APIC_DEFAULT_PHYS_BASE,
        reserved: 0,
    };
    header.checksum =
        0u8.wrapping_sub(checksum(header.as_slice()).wrapping_add(checksum(&entries)));

    let mut fp = MpFloatingPointer {
        signature: *b"_MP_",
        physptr: (base + fp_size as u64) as u32,
        length: 1,
        specification: 4,
        checksum: 0,
        feature: [0; 5],
    };
    fp.checksum = 0u8.wrapping_sub(checksum(fp.as_slice()));

    let mut table = Vec::with_capacity(fp_size + header_size + entries.len());
    table.extend_from_slice(fp.as_slice());
    table.extend_from_slice(header.as_slice());
    table.extend_from_slice(&entries);
    Ok(table)
}

/// Writes the MP table for the vCPUs of `topology` at `base`.
pub fn write_mptable(
    mem: &GuestMemoryMmap,
    base: u64,
    topology: Topology,
) -> Result<(), MpTableError> {
    let table = build(topology, base)?;
    mem.write_slice(&table, GuestAddress(base))
        .map_err(|source| MpTableError::Write { addr: base, source })
}

/// The processor entries of a table from [`build`], in order: (APIC id, CPU flags). Walks the
/// entries by type: processor entries are 20 bytes, the others 8.
#[cfg(test)]
pub(super) fn processor_entries(table: &[u8]) -> Vec<(u8, u8)> {
    let header = &table[std::mem::size_of::<MpFloatingPointer>()..];
    let length = u16::from_le_bytes([header[4], header[5]]) as usize;
    let mut offset = std::mem::size_of::<MpConfigHeader>();
    let mut processors = Vec::new();
    while offset < length {
        if header[offset] == MP_PROCESSOR {
            processors.push((header[offset + 1], header[offset + 3]));
            offset += std::mem::size_of::<MpProcessor>();
        } else {
            offset += 8;
        }
    }
    assert_eq!(offset, length, "entries end where the header says");
    processors
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_and_counts_are_right() {
        for cpus in [1u32, 2, 4, 64, 254] {
            let table = build(Topology::single_package(cpus), 0xf0000).expect("build");
            assert_eq!(&table[..4], b"_MP_");
            assert_eq!(checksum(&table[..16]), 0, "floating pointer checksum");
            let header = &table[16..];
            assert_eq!(&header[..4], b"PCMP");
            let length = u16::from_le_bytes([header[4], header[5]]) as usize;
            assert_eq!(length, table.len() - 16);
            assert_eq!(checksum(&header[..length]), 0, "config table checksum");
            assert_eq!(processor_entries(&table).len() as u32, cpus);
        }
    }

    #[test]
    fn processors_are_numbered_by_the_topology() {
        for cpus in [1u32, 2, 3, 4, 8] {
            let topology = Topology::single_package(cpus);
            let table = build(topology, 0xf0000).expect("build");
            let want: Vec<(u8, u8)> = (0..cpus)
                .map(|cpu| {
                    let boot = if cpu == 0 { CPU_BOOTPROCESSOR } else { 0 };
                    (topology.apic_id(cpu) as u8, CPU_ENABLED | boot)
                })
                .collect();
            assert_eq!(processor_entries(&table), want, "{cpus} vCPUs");
        }
    }

    #[test]
    fn too_many_cpus_is_an_error() {
        assert!(build(Topology::single_package(254), 0xf0000).is_ok());
        assert!(build(Topology::single_package(255), 0xf0000).is_err());
    }
}
