//! Checks of operator input, each failure naming the field (`spec.memory.startup_mib: ...`),
//! and the defaults the controller fills in at CreateVm.

use fabric_proto::v1::{disk_spec, MemorySpec, VmSpec};
use sha2::{Digest, Sha256};

/// Largest VM accepted.
pub const MAX_VCPUS: u32 = 254;
pub const MAX_MEMORY_MIB: u64 = 4 << 20;
const MAX_NICS: usize = 10;
const MAX_DISKS: usize = 16;
const MAX_CMDLINE: usize = 2048;
const MAX_LABELS: usize = 64;

/// Prefix of every VM id.
pub const VM_ID_PREFIX: &str = "vm-";
/// Prefix of every host id.
pub const HOST_ID_PREFIX: &str = "host-";
/// Lowercase hex digits after the prefix of an id (`controller::new_id` mints 8 random bytes).
pub const ID_HEX_DIGITS: usize = 16;

/// Whether `text` has the form of an id: `prefix` then [`ID_HEX_DIGITS`] lowercase hex digits.
///
/// This is the whole id/name rule: no VM name and no host name may have the form of an id of
/// its kind ([`check_vm_name`], [`check_host_name`]), so an argument that has the form is an
/// id and anything else is a name, with no lookup needed to tell them apart.
pub fn has_id_form(prefix: &str, text: &str) -> bool {
    text.strip_prefix(prefix).is_some_and(|hex| {
        hex.len() == ID_HEX_DIGITS && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    })
}

/// Whether `text` is a VM id rather than a VM name (see [`has_id_form`]).
pub fn is_vm_id(text: &str) -> bool {
    has_id_form(VM_ID_PREFIX, text)
}

/// Whether `text` is a host id rather than a host name (see [`has_id_form`]).
pub fn is_host_id(text: &str) -> bool {
    has_id_form(HOST_ID_PREFIX, text)
}

/// A VM name: 1..=63 lowercase letters, digits and '-', starting with a letter, and not of the
/// form of a VM id (`vm-` and 16 hex digits).
pub fn check_vm_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.as_bytes()[0].is_ascii_lowercase()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !ok {
        return Err(format!(
            "spec.name {name:?}: 1..=63 lowercase letters, digits and '-', starting with a letter"
        ));
    }
    if is_vm_id(name) {
        return Err(format!(
            "spec.name {name:?}: has the form of a VM id ({VM_ID_PREFIX} and {ID_HEX_DIGITS} hex \
             digits), which names may not have: choose another name"
        ));
    }
    Ok(())
}

/// A host name: 1..=253 characters, and not of the form of a host id (`host-` and 16 hex
/// digits).
pub fn check_host_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 253 {
        return Err("name: required, at most 253 characters".into());
    }
    if is_host_id(name) {
        return Err(format!(
            "name {name:?}: has the form of a host id ({HOST_ID_PREFIX} and {ID_HEX_DIGITS} hex \
             digits), which names may not have: choose another name"
        ));
    }
    Ok(())
}

/// An image name: 1..=63 lowercase letters, digits, '.', '_' and '-'.
pub fn check_image_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
        });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "image name {name:?}: 1..=63 lowercase letters, digits, '.', '_' and '-'"
        ))
    }
}

/// A sha256 as fabric.v1 writes it.
pub fn check_sha256(field: &str, digest: &str) -> Result<(), String> {
    if digest.len() == 64
        && digest
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    {
        Ok(())
    } else {
        Err(format!(
            "{field} {digest:?}: a sha256 is 64 lowercase hex characters"
        ))
    }
}

/// What a host adds to every VM, counted here so that a spec the controller accepts can boot
/// (tests/tests/limits.rs checks these against fabric-agent's and fabric-vmm's own values):
/// the longest kernel command line fabric-vmm passes (x86 COMMAND_LINE_SIZE less its NUL)...
pub const HOST_MAX_CMDLINE: usize = 2047;
/// ...the virtio devices it can wire (one IOAPIC pin each)...
pub const HOST_MAX_DEVICES: usize = 19;
/// ...the devices the agent gives every VM (entropy, balloon)...
pub const HOST_AGENT_DEVICES: usize = 2;
/// ...what the agent puts before the spec's command line (console, reboot and PCI settings,
/// and a space)...
pub const HOST_CMDLINE_BASE: usize = 40;
/// ...` root=/dev/vda rw` with a root filesystem...
pub const HOST_CMDLINE_ROOT: usize = 17;
/// ...` ip=ADDR::GATEWAY:NETMASK::eth0:off` with NICs (dotted quads at their longest)...
pub const HOST_CMDLINE_IP: usize = 63;
/// ...and what fabric-vmm announces per device (` virtio_mmio.device=4K@0xADDR:GSI`).
pub const HOST_CMDLINE_PER_DEVICE: usize = 40;

/// The devices and kernel command line the spec's VM gets on a host, with what the host
/// adds: an error naming the field when they exceed what a host can give.
fn check_host_fit(spec: &VmSpec) -> Result<(), String> {
    let rootfs = spec
        .image
        .as_ref()
        .is_some_and(|i| !i.rootfs_sha256.is_empty() || !i.name.is_empty());
    let devices = usize::from(rootfs) + spec.disks.len() + spec.nics.len() + HOST_AGENT_DEVICES;
    if devices > HOST_MAX_DEVICES {
        return Err(format!(
            "spec: {} disks and {} NICs{}: a host wires at most {} virtio devices, {} of them its own",
            spec.disks.len(),
            spec.nics.len(),
            if rootfs { " and the image's root disk" } else { "" },
            HOST_MAX_DEVICES,
            HOST_AGENT_DEVICES
        ));
    }
    let added = HOST_CMDLINE_BASE
        + if rootfs { HOST_CMDLINE_ROOT } else { 0 }
        + if spec.nics.is_empty() {
            0
        } else {
            HOST_CMDLINE_IP
        }
        + devices * HOST_CMDLINE_PER_DEVICE;
    let room = HOST_MAX_CMDLINE.saturating_sub(added);
    if spec.kernel_cmdline.len() > room {
        return Err(format!(
            "spec.kernel_cmdline: {} bytes; with what the host adds for this VM ({added} bytes) \
             at most {room} fit",
            spec.kernel_cmdline.len()
        ));
    }
    Ok(())
}

/// The longest reason an operator may give (cordon, drain): it is kept with the host and
/// in events.
pub const MAX_REASON_BYTES: usize = 256;

/// A reason given with a cordon or drain: at most [`MAX_REASON_BYTES`], no control characters.
pub fn check_reason(reason: &str) -> Result<(), String> {
    if reason.len() > MAX_REASON_BYTES || reason.chars().any(char::is_control) {
        return Err(format!(
            "reason: at most {MAX_REASON_BYTES} bytes, no control characters (got {} bytes)",
            reason.len()
        ));
    }
    Ok(())
}

/// The longest encoded spec CreateVm accepts. Every field has its own limit, which bounds the
/// spec well below this; the check keeps it so whatever fields are added.
pub const MAX_SPEC_BYTES: usize = 16 * 1024;

/// A short name inside a spec (a network, a zone, an availability set): at most 63 of
/// `[A-Za-z0-9._-]`, and not empty when `required`.
fn check_token(field: &str, value: &str, required: bool) -> Result<(), String> {
    let ok = (!required || !value.is_empty())
        && value.len() <= 63
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        return Ok(());
    }
    let shown: String = value.chars().take(64).collect();
    Err(format!(
        "{field} {shown:?}{}: {}..=63 of [A-Za-z0-9._-]",
        if value.len() > 64 { "..." } else { "" },
        usize::from(required)
    ))
}

pub fn check_label(field: &str, key: &str, value: &str) -> Result<(), String> {
    let ok_key = !key.is_empty()
        && key.len() <= 63
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'/'));
    let ok_value = value.len() <= 63
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok_key && ok_value {
        Ok(())
    } else {
        Err(format!(
            "{field} {key:?}={value:?}: keys are 1..=63 of [A-Za-z0-9._/-], values 0..=63 of [A-Za-z0-9._-]"
        ))
    }
}

/// The memory sizes with zeros resolved: (startup, minimum, maximum).
pub fn memory_sizes(memory: &MemorySpec) -> (u64, u64, u64) {
    let startup = memory.startup_mib;
    let minimum = if memory.minimum_mib == 0 {
        startup
    } else {
        memory.minimum_mib
    };
    let maximum = if memory.maximum_mib == 0 {
        startup
    } else {
        memory.maximum_mib
    };
    (startup, minimum, maximum)
}

/// Checks a spec as CreateVm receives it (before image names are resolved).
pub fn check_spec(spec: &VmSpec) -> Result<(), String> {
    let encoded = prost::Message::encoded_len(spec);
    if encoded > MAX_SPEC_BYTES {
        return Err(format!(
            "spec: {encoded} bytes encoded, at most {MAX_SPEC_BYTES}"
        ));
    }
    check_vm_name(&spec.name)?;
    if spec.vcpus == 0 || spec.vcpus > MAX_VCPUS {
        return Err(format!(
            "spec.vcpus {}: must be 1..={MAX_VCPUS}",
            spec.vcpus
        ));
    }
    let memory = spec
        .memory
        .ok_or_else(|| "spec.memory: required (startup_mib at least)".to_string())?;
    if memory.startup_mib == 0 {
        return Err("spec.memory.startup_mib: required (> 0)".to_string());
    }
    let (startup, minimum, maximum) = memory_sizes(&memory);
    if maximum > MAX_MEMORY_MIB {
        return Err(format!(
            "spec.memory.maximum_mib {maximum}: at most {MAX_MEMORY_MIB}"
        ));
    }
    if !(minimum <= startup && startup <= maximum) {
        return Err(format!(
            "spec.memory: need minimum_mib ({minimum}) <= startup_mib ({startup}) <= maximum_mib ({maximum})"
        ));
    }
    if memory.buffer_percent > 2000 {
        return Err(format!(
            "spec.memory.buffer_percent {}: must be 0..=2000",
            memory.buffer_percent
        ));
    }
    if memory.weight > 10000 {
        return Err(format!(
            "spec.memory.weight {}: must be 0..=10000",
            memory.weight
        ));
    }
    let image = spec
        .image
        .as_ref()
        .ok_or_else(|| "spec.image: required (a name or a kernel digest)".to_string())?;
    if image.name.is_empty() && image.kernel_sha256.is_empty() {
        return Err("spec.image: give an image name or kernel_sha256".to_string());
    }
    if !image.name.is_empty() {
        check_image_name(&image.name).map_err(|e| format!("spec.image.name: {e}"))?;
    }
    for (field, digest) in [
        ("spec.image.kernel_sha256", &image.kernel_sha256),
        ("spec.image.initramfs_sha256", &image.initramfs_sha256),
        ("spec.image.rootfs_sha256", &image.rootfs_sha256),
    ] {
        if !digest.is_empty() {
            check_sha256(field, digest)?;
        }
    }
    if spec.kernel_cmdline.len() > MAX_CMDLINE || spec.kernel_cmdline.contains(['\0', '\n']) {
        return Err(format!(
            "spec.kernel_cmdline: at most {MAX_CMDLINE} bytes, no NUL or newline"
        ));
    }
    if spec.nics.len() > MAX_NICS {
        return Err(format!("spec.nics: at most {MAX_NICS}"));
    }
    for (i, nic) in spec.nics.iter().enumerate() {
        check_token(&format!("spec.nics[{i}].network"), &nic.network, true)?;
        if !nic.mac.is_empty() {
            check_mac(&nic.mac).map_err(|e| format!("spec.nics[{i}].mac: {e}"))?;
        }
    }
    if spec.disks.len() > MAX_DISKS {
        return Err(format!("spec.disks: at most {MAX_DISKS}"));
    }
    for (i, disk) in spec.disks.iter().enumerate() {
        match &disk.source {
            Some(disk_spec::Source::ImageSha256(d)) => {
                check_sha256(&format!("spec.disks[{i}].image_sha256"), d)?
            }
            Some(disk_spec::Source::SizeMib(size)) => {
                if *size == 0 || *size > 64 << 20 {
                    return Err(format!(
                        "spec.disks[{i}].size_mib {size}: must be 1..=67108864"
                    ));
                }
            }
            None => return Err(format!("spec.disks[{i}]: give image_sha256 or size_mib")),
        }
    }
    if let Some(placement) = &spec.placement {
        if placement.labels.len() + placement.anti_affinity_labels.len() > MAX_LABELS {
            return Err(format!("spec.placement: at most {MAX_LABELS} labels"));
        }
        for (k, v) in &placement.labels {
            check_label("spec.placement.labels", k, v)?;
        }
        for (k, v) in &placement.anti_affinity_labels {
            check_label("spec.placement.anti_affinity_labels", k, v)?;
        }
        check_token(
            "spec.placement.availability_set",
            &placement.availability_set,
            false,
        )?;
        check_token("spec.placement.zone", &placement.zone, false)?;
    }
    check_host_fit(spec)?;
    if !(0..=3).contains(&spec.restart_policy) {
        return Err(format!(
            "spec.restart_policy {}: unknown",
            spec.restart_policy
        ));
    }
    Ok(())
}

fn check_mac(mac: &str) -> Result<(), String> {
    let octets: Vec<&str> = mac.split(':').collect();
    let valid = octets.len() == 6
        && octets
            .iter()
            .all(|o| o.len() == 2 && u8::from_str_radix(o, 16).is_ok());
    if !valid {
        return Err(format!("{mac:?}: six hex octets like 52:54:00:12:34:56"));
    }
    if u8::from_str_radix(octets[0], 16).unwrap_or(1) & 1 == 1 {
        return Err(format!("{mac:?}: a multicast address"));
    }
    Ok(())
}

/// Fills the defaults the spec leaves open: MACs (stable, locally administered, from the VM
/// id) and the memory sizes written out.
pub fn fill_defaults(spec: &mut VmSpec, vm_id: &str) {
    for (i, nic) in spec.nics.iter_mut().enumerate() {
        if nic.mac.is_empty() {
            let d = Sha256::digest(format!("{vm_id}/nic{i}").as_bytes());
            nic.mac = format!("52:54:{:02x}:{:02x}:{:02x}:{:02x}", d[0], d[1], d[2], d[3]);
        }
    }
    if let Some(memory) = spec.memory.as_mut() {
        let (_, minimum, maximum) = memory_sizes(memory);
        memory.minimum_mib = minimum;
        memory.maximum_mib = maximum;
        if memory.weight == 0 {
            memory.weight = 5000;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fabric_proto::v1::{BootImage, DiskSpec, NicSpec, Placement};

    fn good() -> VmSpec {
        VmSpec {
            name: "web-1".into(),
            vcpus: 2,
            memory: Some(MemorySpec {
                startup_mib: 512,
                ..Default::default()
            }),
            image: Some(BootImage {
                name: "alpine".into(),
                ..Default::default()
            }),
            nics: vec![NicSpec {
                network: "default".into(),
                mac: String::new(),
            }],
            ..Default::default()
        }
    }

    #[test]
    fn ids_have_a_form_no_name_can_take() {
        let vm_id = crate::controller::new_id("vm");
        let host_id = crate::controller::new_id("host");
        assert!(is_vm_id(&vm_id), "{vm_id}");
        assert!(is_host_id(&host_id), "{host_id}");
        assert!(check_vm_name(&vm_id).is_err());
        assert!(check_host_name(&host_id).is_err());

        // (text, a VM id, a host id)
        let cases = [
            ("vm-0123456789abcdef", true, false),
            ("host-0123456789abcdef", false, true),
            ("vm-web", false, false),
            ("host-b", false, false),
            ("vm-0123456789abcde", false, false),   // 15 digits
            ("vm-0123456789abcdef0", false, false), // 17
            ("vm-0123456789ABCDEF", false, false),  // ids are lowercase
            ("vm-0123456789abcdeg", false, false),
            ("web-0123456789abcdef", false, false),
            ("0123456789abcdef", false, false),
        ];
        for (text, vm, host) in cases {
            assert_eq!(is_vm_id(text), vm, "{text}: VM id");
            assert_eq!(is_host_id(text), host, "{text}: host id");
        }
        for name in [
            "vm-web",
            "vm-1",
            "host-b",
            "vm-0123456789abcde",
            "host-0123456789abcdef",
        ] {
            check_vm_name(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        for name in ["host-b", "Host-B.example", "vm-0123456789abcdef", "h"] {
            check_host_name(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        assert!(check_host_name("").is_err());
        check_reason("RMA ticket 1234").unwrap();
        assert!(check_reason(&"r".repeat(257)).unwrap_err().contains("256"));
        assert!(check_reason("a\nb").is_err());
        assert!(check_host_name(&"h".repeat(254)).is_err());
    }

    #[test]
    fn each_bad_field_is_named() {
        check_spec(&good()).unwrap();
        type Change = Box<dyn Fn(&mut VmSpec)>;
        let cases: Vec<(Change, &str)> = vec![
            (Box::new(|s| s.name = "Web".into()), "spec.name"),
            (Box::new(|s| s.name = String::new()), "spec.name"),
            (Box::new(|s| s.vcpus = 0), "spec.vcpus"),
            (Box::new(|s| s.memory = None), "spec.memory"),
            (
                Box::new(|s| s.memory.as_mut().unwrap().startup_mib = 0),
                "spec.memory.startup_mib",
            ),
            (
                Box::new(|s| s.memory.as_mut().unwrap().minimum_mib = 1024),
                "spec.memory",
            ),
            (
                Box::new(|s| s.memory.as_mut().unwrap().buffer_percent = 5000),
                "buffer_percent",
            ),
            (Box::new(|s| s.image = None), "spec.image"),
            (
                Box::new(|s| s.image.as_mut().unwrap().name = "A B".into()),
                "spec.image.name",
            ),
            (
                Box::new(|s| s.image.as_mut().unwrap().kernel_sha256 = "abc".into()),
                "spec.image.kernel_sha256",
            ),
            (
                Box::new(|s| s.nics[0].network = String::new()),
                "spec.nics[0].network",
            ),
            (
                Box::new(|s| s.nics[0].network = "n".repeat(3 << 20)),
                "spec: 3145",
            ),
            (
                Box::new(|s| s.nics[0].network = "n".repeat(64)),
                "spec.nics[0].network",
            ),
            (
                Box::new(|s| s.nics[0].network = "a/b".into()),
                "spec.nics[0].network",
            ),
            (
                Box::new(|s| {
                    s.placement = Some(Placement {
                        zone: "z".repeat(1000),
                        ..Default::default()
                    })
                }),
                "spec.placement.zone",
            ),
            (
                Box::new(|s| {
                    s.placement = Some(Placement {
                        availability_set: "a set".into(),
                        ..Default::default()
                    })
                }),
                "spec.placement.availability_set",
            ),
            (
                Box::new(|s| s.nics[0].mac = "01:00:00:00:00:00".into()),
                "spec.nics[0].mac",
            ),
            (
                Box::new(|s| s.disks = vec![DiskSpec::default()]),
                "spec.disks[0]",
            ),
            (
                Box::new(|s| {
                    s.placement = Some(Placement {
                        labels: [("a b".to_string(), "c".to_string())].into(),
                        ..Default::default()
                    })
                }),
                "spec.placement.labels",
            ),
            (Box::new(|s| s.restart_policy = 9), "spec.restart_policy"),
            (
                Box::new(|s| s.kernel_cmdline = "a\nb".into()),
                "spec.kernel_cmdline",
            ),
            (
                // Under MAX_CMDLINE, but not with what the host adds.
                Box::new(|s| s.kernel_cmdline = "x".repeat(MAX_CMDLINE - 10)),
                "with what the host adds",
            ),
            (
                Box::new(|s| {
                    s.disks = vec![
                        DiskSpec {
                            source: Some(disk_spec::Source::SizeMib(1)),
                            read_only: false,
                        };
                        MAX_DISKS
                    ];
                    s.nics = vec![s.nics[0].clone(); 3];
                }),
                "virtio devices",
            ),
        ];
        for (change, field) in cases {
            let mut spec = good();
            change(&mut spec);
            let err = check_spec(&spec).unwrap_err();
            assert!(err.contains(field), "{field}: {err}");
        }
    }

    #[test]
    fn defaults_are_filled_stably() {
        let mut a = good();
        fill_defaults(&mut a, "vm-1");
        let mut b = good();
        fill_defaults(&mut b, "vm-1");
        assert_eq!(a.nics[0].mac, b.nics[0].mac);
        check_mac(&a.nics[0].mac).unwrap();
        let m = a.memory.unwrap();
        assert_eq!((m.minimum_mib, m.maximum_mib, m.weight), (512, 512, 5000));
    }
}
