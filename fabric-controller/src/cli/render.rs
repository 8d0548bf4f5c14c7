//! How fabricctl shows replies: aligned tables and detail views for people, JSON for scripts.
//! prost messages have no serde, so the JSON is written out field by field: enums as their
//! short lowercase names (`pending`, `vm_created`), times as RFC 3339 strings, sizes under
//! their proto field names (`startup_mib`, `size_bytes`). A VM's `spec` object uses the keys
//! of a spec file, so it can be fed back to `vm create -f`.

use std::fmt;
use std::time::{Duration, SystemTime};

use fabric_proto::v1::{
    disk_spec, DesiredState, Event, EventKind, Host, HostMemoryBalance, HostState, Image,
    ImageFile, ImageFileRole, ObservedPhase, ObservedVm, PushImageResponse, Resources,
    RestartPolicy, Vm, VmMemoryBalance, VmPhase, VmSpec,
};
use prost_types::Timestamp;
use serde_json::{json, Value};

/// Rows of text printed in aligned columns; the last column is not padded.
#[derive(Debug, Clone)]
pub struct Table {
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Table {
        Table {
            rows: vec![header.iter().map(|h| h.to_string()).collect()],
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }
}

/// Spaces between columns.
const GAP: usize = 3;

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let columns = self.rows.iter().map(Vec::len).max().unwrap_or(0);
        let mut widths = vec![0; columns];
        for row in &self.rows {
            for (i, cell) in row.iter().enumerate() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
        for row in &self.rows {
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate() {
                line.push_str(cell);
                if i + 1 < row.len() {
                    let pad = widths[i] - cell.chars().count() + GAP;
                    line.extend(std::iter::repeat_n(' ', pad));
                }
            }
            writeln!(f, "{}", line.trim_end())?;
        }
        Ok(())
    }
}

/// The short lowercase name of a proto enum value: `VM_PHASE_PENDING` → `pending`. Values
/// this build does not know are shown as their number.
fn short_name(proto_name: Option<&str>, prefix: &str, value: i32) -> String {
    match proto_name {
        Some(name) => name
            .strip_prefix(prefix)
            .unwrap_or(name)
            .to_ascii_lowercase(),
        None => value.to_string(),
    }
}

pub fn vm_phase(value: i32) -> String {
    short_name(
        VmPhase::try_from(value).ok().map(|v| v.as_str_name()),
        "VM_PHASE_",
        value,
    )
}

pub fn host_state(value: i32) -> String {
    short_name(
        HostState::try_from(value).ok().map(|v| v.as_str_name()),
        "HOST_STATE_",
        value,
    )
}

pub fn desired_state(value: i32) -> String {
    // Unspecified means running (types.proto).
    if value == DesiredState::Unspecified as i32 {
        return "running".to_string();
    }
    short_name(
        DesiredState::try_from(value).ok().map(|v| v.as_str_name()),
        "DESIRED_STATE_",
        value,
    )
}

pub fn restart_policy(value: i32) -> String {
    // Unspecified means always (types.proto); the spec file spells on_failure `on-failure`.
    if value == RestartPolicy::Unspecified as i32 {
        return "always".to_string();
    }
    short_name(
        RestartPolicy::try_from(value).ok().map(|v| v.as_str_name()),
        "RESTART_POLICY_",
        value,
    )
    .replace('_', "-")
}

pub fn event_kind(value: i32) -> String {
    short_name(
        EventKind::try_from(value).ok().map(|v| v.as_str_name()),
        "EVENT_KIND_",
        value,
    )
}

pub fn observed_phase(value: i32) -> String {
    short_name(
        ObservedPhase::try_from(value).ok().map(|v| v.as_str_name()),
        "OBSERVED_PHASE_",
        value,
    )
}

pub fn image_role(value: i32) -> String {
    short_name(
        ImageFileRole::try_from(value).ok().map(|v| v.as_str_name()),
        "IMAGE_FILE_ROLE_",
        value,
    )
}

/// An RFC 3339 time, or null when unset.
fn time_json(time: &Option<Timestamp>) -> Value {
    time.map_or(Value::Null, |t| Value::String(t.to_string()))
}

/// An RFC 3339 time to the second, for tables.
fn time_text(time: &Option<Timestamp>) -> String {
    match time {
        Some(t) => Timestamp {
            seconds: t.seconds,
            nanos: 0,
        }
        .to_string(),
        None => "-".to_string(),
    }
}

/// Time since `time`, as kubectl shows ages: `42s`, `5m`, `3h`, `12d`.
pub fn age(time: &Option<Timestamp>, now: SystemTime) -> String {
    let Some(then) = time.and_then(|t| SystemTime::try_from(t).ok()) else {
        return "-".to_string();
    };
    let elapsed = now.duration_since(then).unwrap_or(Duration::ZERO).as_secs();
    match elapsed {
        s if s < 120 => format!("{s}s"),
        s if s < 120 * 60 => format!("{}m", s / 60),
        s if s < 48 * 3600 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

/// A byte count in binary units: `512 B`, `2.2 MiB`.
pub fn bytes_text(size: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if size < 1024 {
        return format!("{size} B");
    }
    let mut value = size as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

fn or_dash(text: &str) -> String {
    if text.is_empty() {
        "-".to_string()
    } else {
        text.to_string()
    }
}

fn host_balance_json(b: &HostMemoryBalance) -> Value {
    json!({
        "budget_mib": b.budget_mib,
        "demand_mib": b.demand_mib,
        "wanted_mib": b.wanted_mib,
        "assigned_mib": b.assigned_mib,
        "minimum_mib": b.minimum_mib,
        "short": b.short,
        "pressured_vms": b.pressured_vms,
    })
}

fn vm_balance_json(b: &VmMemoryBalance) -> Value {
    json!({
        "target_mib": b.target_mib,
        "demand_mib": b.demand_mib,
        "reason": b.reason,
        "pressured": b.pressured,
    })
}

fn resources_json(resources: &Option<Resources>) -> Value {
    resources.map_or(
        Value::Null,
        |r| json!({"cpus": r.cpus, "memory_mib": r.memory_mib, "disk_mib": r.disk_mib}),
    )
}

/// A spec in the spec file's keys.
pub fn spec_json(spec: &VmSpec) -> Value {
    let memory = spec.memory.unwrap_or_default();
    let image = spec.image.clone().unwrap_or_default();
    let placement = spec.placement.clone().unwrap_or_default();
    let sorted = |map: &std::collections::HashMap<String, String>| {
        map.iter()
            .collect::<std::collections::BTreeMap<_, _>>()
            .into_iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect::<serde_json::Map<_, _>>()
    };
    json!({
        "name": spec.name,
        "project": spec.project,
        "vcpus": spec.vcpus,
        "memory": {
            "startup_mib": memory.startup_mib,
            "minimum_mib": memory.minimum_mib,
            "maximum_mib": memory.maximum_mib,
            "buffer_percent": memory.buffer_percent,
            "weight": memory.weight,
        },
        "image": {
            "name": image.name,
            "kernel_sha256": image.kernel_sha256,
            "initramfs_sha256": image.initramfs_sha256,
            "rootfs_sha256": image.rootfs_sha256,
        },
        "kernel_cmdline": spec.kernel_cmdline,
        "nics": spec.nics.iter().map(|n| json!({"network": n.network, "mac": n.mac})).collect::<Vec<_>>(),
        "disks": spec.disks.iter().map(|d| match &d.source {
            Some(disk_spec::Source::SizeMib(size)) => json!({"size_mib": size, "read_only": d.read_only}),
            Some(disk_spec::Source::ImageSha256(digest)) => json!({"image_sha256": digest, "read_only": d.read_only}),
            None => json!({"read_only": d.read_only}),
        }).collect::<Vec<_>>(),
        "placement": {
            "zone": placement.zone,
            "availability_set": placement.availability_set,
            "labels": sorted(&placement.labels),
            "anti_affinity_labels": sorted(&placement.anti_affinity_labels),
        },
        "restart_policy": restart_policy(spec.restart_policy),
    })
}

fn observed_json(observed: &ObservedVm) -> Value {
    let memory = observed.memory.as_ref().map_or(Value::Null, |m| {
        json!({
            "swap_in_bytes": m.swap_in_bytes,
            "swap_out_bytes": m.swap_out_bytes,
            "major_faults": m.major_faults,
            "minor_faults": m.minor_faults,
            "free_bytes": m.free_bytes,
            "total_bytes": m.total_bytes,
            "available_bytes": m.available_bytes,
            "disk_caches_bytes": m.disk_caches_bytes,
            "hugetlb_allocations": m.hugetlb_allocations,
            "hugetlb_failures": m.hugetlb_failures,
            "balloon_actual_mib": m.balloon_actual_mib,
            "balloon_target_mib": m.balloon_target_mib,
            "updated_at": time_json(&m.updated_at),
        })
    });
    json!({
        "phase": observed_phase(observed.phase),
        "pid": observed.pid,
        "started_at": time_json(&observed.started_at),
        "message": observed.message,
        "last_error": observed.last_error,
        "restart_count": observed.restart_count,
        "memory": memory,
        "generation": observed.generation,
        "memory_balance": observed.memory_balance.as_ref().map_or(Value::Null, vm_balance_json),
    })
}

pub fn vm_json(vm: &Vm) -> Value {
    let status = vm.status.clone().unwrap_or_default();
    json!({
        "id": vm.id,
        "spec": vm.spec.as_ref().map_or(Value::Null, spec_json),
        "status": {
            "desired_state": desired_state(status.desired_state),
            "phase": vm_phase(status.phase),
            "host_id": status.host_id,
            "reason": status.reason,
            "observed": status.observed.as_ref().map_or(Value::Null, observed_json),
            "phase_changed_at": time_json(&status.phase_changed_at),
        },
        "generation": vm.generation,
        "disk_mib": vm.disk_mib,
        "created_at": time_json(&vm.created_at),
        "updated_at": time_json(&vm.updated_at),
    })
}

pub fn host_json(host: &Host) -> Value {
    let usage = host.usage.map_or(Value::Null, |u| {
        let pressure = u.memory_pressure.map_or(Value::Null, |p| {
            json!({
                "some_avg10_percent": p.some_avg10_percent,
                "full_avg10_percent": p.full_avg10_percent,
            })
        });
        json!({
            "running_vms": u.running_vms,
            "vcpus": u.vcpus,
            "memory_used_mib": u.memory_used_mib,
            "memory_available_mib": u.memory_available_mib,
            "vm_memory_mib": u.vm_memory_mib,
            "disk_total_mib": u.disk_total_mib,
            "disk_available_mib": u.disk_available_mib,
            "memory_pressure": pressure,
            "memory_balance": u.memory_balance.as_ref().map_or(Value::Null, host_balance_json),
        })
    });
    let labels: std::collections::BTreeMap<_, _> = host.labels.iter().collect();
    json!({
        "id": host.id,
        "name": host.name,
        "zone": host.zone,
        "fault_domain": host.fault_domain,
        "update_domain": host.update_domain,
        "capacity": resources_json(&host.capacity),
        "allocatable": resources_json(&host.allocatable),
        "allocated": resources_json(&host.allocated),
        "usage": usage,
        "labels": labels,
        "state": host_state(host.state),
        "cordoned": host.cordoned,
        "cordon_reason": host.cordon_reason,
        "agent_address": host.agent_address,
        "last_heartbeat_at": time_json(&host.last_heartbeat_at),
        "lease_expires_at": time_json(&host.lease_expires_at),
        "registered_at": time_json(&host.registered_at),
    })
}

pub fn event_json(event: &Event) -> Value {
    let mut value = json!({
        "sequence": event.sequence,
        "time": time_json(&event.time),
        "kind": event_kind(event.kind),
        "vm_id": event.vm_id,
        "host_id": event.host_id,
        "reason": event.reason,
        "message": event.message,
    });
    // Only the kinds that carry them.
    if event.vm_phase != 0 {
        value["vm_phase"] = Value::String(vm_phase(event.vm_phase));
    }
    if event.host_state != 0 {
        value["host_state"] = Value::String(host_state(event.host_state));
    }
    value
}

pub fn image_file_json(file: &ImageFile) -> Value {
    json!({
        "role": image_role(file.role),
        "sha256": file.sha256,
        "size_bytes": file.size_bytes,
        "file_name": file.file_name,
        "pushed_at": time_json(&file.pushed_at),
    })
}

pub fn image_json(image: &Image) -> Value {
    json!({
        "name": image.name,
        // The owner project; empty: cluster-wide.
        "project": image.project,
        "files": image.files.iter().map(image_file_json).collect::<Vec<_>>(),
    })
}

pub fn pushed_json(pushed: &PushImageResponse) -> Value {
    let mut value = pushed
        .file
        .as_ref()
        .map_or_else(|| json!({}), image_file_json);
    value["already_stored"] = Value::Bool(pushed.already_stored);
    value
}

fn memory_text(spec: &VmSpec) -> String {
    let memory = spec.memory.unwrap_or_default();
    let (startup, minimum, maximum) = crate::validate::memory_sizes(&memory);
    if minimum == startup && maximum == startup {
        format!("{startup}MiB")
    } else {
        format!("{startup}MiB ({minimum}-{maximum})")
    }
}

pub fn vms_table(vms: &[Vm]) -> Table {
    let now = SystemTime::now();
    let mut table = Table::new(&[
        "ID", "NAME", "PROJECT", "PHASE", "HOST", "VCPUS", "MEMORY", "AGE", "REASON",
    ]);
    for vm in vms {
        let spec = vm.spec.clone().unwrap_or_default();
        let status = vm.status.clone().unwrap_or_default();
        table.row(vec![
            vm.id.clone(),
            spec.name.clone(),
            or_dash(&spec.project),
            vm_phase(status.phase),
            or_dash(&status.host_id),
            spec.vcpus.to_string(),
            memory_text(&spec),
            age(&vm.created_at, now),
            status.reason,
        ]);
    }
    table
}

/// `key=value` pairs in key order.
fn pairs(map: &std::collections::HashMap<String, String>) -> String {
    let mut pairs: Vec<String> = map.iter().map(|(k, v)| format!("{k}={v}")).collect();
    pairs.sort();
    or_dash(&pairs.join(", "))
}

/// Lines of `Key: value`, the values aligned.
fn details(lines: &[(&str, String)]) -> String {
    let width = lines.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 2;
    lines
        .iter()
        .map(|(key, value)| format!("{:width$}{value}\n", format!("{key}:")))
        .collect()
}

pub fn vm_details(vm: &Vm) -> String {
    let now = SystemTime::now();
    let spec = vm.spec.clone().unwrap_or_default();
    let status = vm.status.clone().unwrap_or_default();
    let memory = spec.memory.unwrap_or_default();
    let image = spec.image.clone().unwrap_or_default();
    let placement = spec.placement.clone().unwrap_or_default();
    let nics: Vec<String> = spec
        .nics
        .iter()
        .map(|n| format!("{} {}", n.network, n.mac))
        .collect();
    let disks: Vec<String> = spec
        .disks
        .iter()
        .map(|d| {
            let source = match &d.source {
                Some(disk_spec::Source::SizeMib(size)) => format!("{size} MiB empty"),
                Some(disk_spec::Source::ImageSha256(digest)) => format!("image {digest}"),
                None => "-".to_string(),
            };
            if d.read_only {
                format!("{source} (read-only)")
            } else {
                source
            }
        })
        .collect();
    let mut lines = vec![
        ("ID", vm.id.clone()),
        ("Name", spec.name.clone()),
        ("Project", or_dash(&spec.project)),
        (
            "Phase",
            format!(
                "{} (for {})",
                vm_phase(status.phase),
                age(&status.phase_changed_at, now)
            ),
        ),
        ("Desired state", desired_state(status.desired_state)),
        ("Host", or_dash(&status.host_id)),
        ("Reason", or_dash(&status.reason)),
        ("vCPUs", spec.vcpus.to_string()),
        (
            "Memory",
            format!(
                "startup {} MiB, minimum {} MiB, maximum {} MiB, buffer {}%, weight {}",
                memory.startup_mib,
                memory.minimum_mib,
                memory.maximum_mib,
                memory.buffer_percent,
                memory.weight
            ),
        ),
        ("Image", or_dash(&image.name)),
        ("Kernel", or_dash(&image.kernel_sha256)),
        ("Initramfs", or_dash(&image.initramfs_sha256)),
        ("Rootfs", or_dash(&image.rootfs_sha256)),
        ("Cmdline", or_dash(&spec.kernel_cmdline)),
        ("NICs", or_dash(&nics.join(", "))),
        ("Disks", or_dash(&disks.join(", "))),
        (
            "Host disk",
            format!("{} MiB reserved (disks in full, logs)", vm.disk_mib),
        ),
        ("Zone", or_dash(&placement.zone)),
        ("Availability set", or_dash(&placement.availability_set)),
        ("Labels", pairs(&placement.labels)),
        ("Anti-affinity", pairs(&placement.anti_affinity_labels)),
        ("Restart policy", restart_policy(spec.restart_policy)),
        ("Generation", vm.generation.to_string()),
        ("Created", time_text(&vm.created_at)),
        ("Updated", time_text(&vm.updated_at)),
    ];
    if let Some(observed) = &status.observed {
        lines.push((
            "Observed",
            format!(
                "{}, pid {}, {} restarts, generation {}",
                observed_phase(observed.phase),
                observed.pid,
                observed.restart_count,
                observed.generation
            ),
        ));
        if !observed.message.is_empty() {
            lines.push(("Observed message", observed.message.clone()));
        }
        if !observed.last_error.is_empty() {
            lines.push(("Last error", observed.last_error.clone()));
        }
        if let Some(m) = &observed.memory {
            lines.push((
                "Balloon",
                format!(
                    "{} MiB (target {} MiB)",
                    m.balloon_actual_mib, m.balloon_target_mib
                ),
            ));
        }
        if let Some(b) = &observed.memory_balance {
            lines.push((
                "Memory target",
                format!(
                    "{} MiB, demand {}, {}: {}",
                    b.target_mib,
                    b.demand_mib
                        .map_or("unknown".to_string(), |d| format!("{d} MiB")),
                    if b.pressured {
                        "pressured"
                    } else {
                        "no pressure"
                    },
                    or_dash(&b.reason)
                ),
            ));
        }
    }
    details(&lines)
}

fn fraction(allocated: &Option<Resources>, allocatable: &Option<Resources>) -> (String, String) {
    let a = allocated.unwrap_or_default();
    let b = allocatable.unwrap_or_default();
    (
        format!("{}/{}", a.cpus, b.cpus),
        format!("{}/{}", a.memory_mib, b.memory_mib),
    )
}

fn heartbeat_text(host: &Host, now: SystemTime) -> String {
    match host.last_heartbeat_at {
        Some(_) => format!("{} ago", age(&host.last_heartbeat_at, now)),
        None => "-".to_string(),
    }
}

pub fn hosts_table(hosts: &[Host]) -> Table {
    let now = SystemTime::now();
    let mut table = Table::new(&[
        "ID",
        "NAME",
        "ZONE",
        "FD",
        "UD",
        "STATE",
        "CPUS",
        "MEMORY(MiB)",
        "VMS",
        "HEARTBEAT",
    ]);
    for host in hosts {
        let (cpus, memory) = fraction(&host.allocated, &host.allocatable);
        table.row(vec![
            host.id.clone(),
            host.name.clone(),
            or_dash(&host.zone),
            host.fault_domain.to_string(),
            host.update_domain.to_string(),
            host_state(host.state),
            cpus,
            memory,
            host.usage.map_or(0, |u| u.running_vms).to_string(),
            heartbeat_text(host, now),
        ]);
    }
    table
}

pub fn host_details(host: &Host) -> String {
    let now = SystemTime::now();
    let (cpus, memory) = fraction(&host.allocated, &host.allocatable);
    let capacity = host.capacity.unwrap_or_default();
    let mut lines = vec![
        ("ID", host.id.clone()),
        ("Name", host.name.clone()),
        ("Zone", or_dash(&host.zone)),
        ("Fault domain", host.fault_domain.to_string()),
        ("Update domain", host.update_domain.to_string()),
        ("State", host_state(host.state)),
        (
            "Cordoned",
            match (host.cordoned, host.cordon_reason.is_empty()) {
                (false, _) => "no".to_string(),
                (true, true) => "yes".to_string(),
                (true, false) => format!("yes: {}", host.cordon_reason),
            },
        ),
        (
            "Capacity",
            format!("{} CPUs, {} MiB", capacity.cpus, capacity.memory_mib),
        ),
        ("CPUs", format!("{cpus} allocated/allocatable")),
        ("Memory", format!("{memory} MiB allocated/allocatable")),
        (
            "Disk",
            match (
                host.allocatable.unwrap_or_default().disk_mib,
                capacity.disk_mib,
            ) {
                (0, _) => "not counted (the agent does not say)".to_string(),
                (allocatable, total) => format!(
                    "{}/{allocatable} MiB allocated/allocatable, of {total} MiB",
                    host.allocated.unwrap_or_default().disk_mib
                ),
            },
        ),
        ("Labels", pairs(&host.labels)),
        ("Agent", or_dash(&host.agent_address)),
        ("Heartbeat", heartbeat_text(host, now)),
        ("Lease expires", time_text(&host.lease_expires_at)),
        ("Registered", time_text(&host.registered_at)),
    ];
    if let Some(usage) = host.usage {
        lines.push((
            "Usage",
            format!(
                "{} VMs running, {} vCPUs, {} MiB used, {} MiB available",
                usage.running_vms, usage.vcpus, usage.memory_used_mib, usage.memory_available_mib
            ),
        ));
        if usage.disk_total_mib > 0 {
            lines.push((
                "Disk usage",
                format!(
                    "{} MiB available of {} MiB (data directory)",
                    usage.disk_available_mib, usage.disk_total_mib
                ),
            ));
        }
        if let Some(b) = usage.memory_balance {
            lines.push((
                "Memory balance",
                format!(
                    "budget {} MiB, wanted {} MiB, assigned {} MiB, demand {} MiB, minimums {} MiB, {}, {} VMs pressured",
                    b.budget_mib,
                    b.wanted_mib,
                    b.assigned_mib,
                    b.demand_mib,
                    b.minimum_mib,
                    if b.short { "short" } else { "fits" },
                    b.pressured_vms
                ),
            ));
        }
        if let Some(p) = usage.memory_pressure {
            lines.push((
                "Memory pressure",
                format!(
                    "some {:.1}%, full {:.1}% (avg10)",
                    p.some_avg10_percent, p.full_avg10_percent
                ),
            ));
        }
    }
    details(&lines)
}

/// `fabricctl top`: each host's memory balance and each placed VM's, as the hosts' balancers
/// last reported them. Hosts by name, VMs by host name then name.
pub struct Top<'a> {
    hosts: Vec<&'a Host>,
    /// `(host name, VM)` of every VM placed on one of `hosts`.
    vms: Vec<(String, &'a Vm)>,
}

impl<'a> Top<'a> {
    pub fn new(hosts: &'a [Host], vms: &'a [Vm]) -> Top<'a> {
        let mut hosts: Vec<&Host> = hosts.iter().collect();
        hosts.sort_by(|a, b| a.name.cmp(&b.name).then_with(|| a.id.cmp(&b.id)));
        let names: std::collections::HashMap<&str, &str> = hosts
            .iter()
            .map(|h| (h.id.as_str(), h.name.as_str()))
            .collect();
        let mut vms: Vec<(String, &Vm)> = vms
            .iter()
            .filter_map(|vm| {
                let host_id = vm.status.as_ref()?.host_id.as_str();
                Some((names.get(host_id)?.to_string(), vm))
            })
            .collect();
        vms.sort_by(|a, b| {
            a.0.cmp(&b.0)
                .then_with(|| vm_spec_name(a.1).cmp(vm_spec_name(b.1)))
                .then_with(|| a.1.id.cmp(&b.1.id))
        });
        Top { hosts, vms }
    }

    pub fn hosts_table(&self) -> Table {
        let mut table = Table::new(&[
            "HOST",
            "STATE",
            "BUDGET(MiB)",
            "ASSIGNED",
            "WANTED",
            "DEMAND",
            "SHORT",
            "PRESSURED",
        ]);
        for host in &self.hosts {
            let balance = host.usage.and_then(|u| u.memory_balance);
            let figure = |f: fn(&HostMemoryBalance) -> u64| {
                balance
                    .as_ref()
                    .map_or("-".to_string(), |b| f(b).to_string())
            };
            table.row(vec![
                host.name.clone(),
                host_state(host.state),
                figure(|b| b.budget_mib),
                figure(|b| b.assigned_mib),
                figure(|b| b.wanted_mib),
                figure(|b| b.demand_mib),
                balance.map_or("-".to_string(), |b| yes_no(b.short)),
                figure(|b| u64::from(b.pressured_vms)),
            ]);
        }
        table
    }

    pub fn vms_table(&self) -> Table {
        let mut table = Table::new(&[
            "VM",
            "HOST",
            "MIN-MAX(MiB)",
            "TARGET",
            "DEMAND",
            "BALLOON",
            "PRESSURE",
            "REASON",
        ]);
        for (host, vm) in &self.vms {
            let (minimum, maximum) = vm_memory_range(vm);
            let observed = vm.status.as_ref().and_then(|s| s.observed.as_ref());
            let balance = observed.and_then(|o| o.memory_balance.as_ref());
            let balloon = observed.and_then(|o| o.memory.as_ref());
            table.row(vec![
                vm_spec_name(vm).to_string(),
                host.clone(),
                format!("{minimum}-{maximum}"),
                balance.map_or("-".to_string(), |b| b.target_mib.to_string()),
                balance
                    .and_then(|b| b.demand_mib)
                    .map_or("-".to_string(), |d| d.to_string()),
                balloon.map_or("-".to_string(), |m| m.balloon_actual_mib.to_string()),
                balance.map_or("-".to_string(), |b| yes_no(b.pressured)),
                balance.map_or("-".to_string(), |b| or_dash(&b.reason)),
            ]);
        }
        table
    }

    pub fn json(&self) -> Value {
        let hosts: Vec<Value> = self
            .hosts
            .iter()
            .map(|host| {
                let balance = host.usage.and_then(|u| u.memory_balance);
                json!({
                    "id": host.id,
                    "name": host.name,
                    "state": host_state(host.state),
                    "memory_balance": balance.as_ref().map_or(Value::Null, host_balance_json),
                })
            })
            .collect();
        let vms: Vec<Value> = self
            .vms
            .iter()
            .map(|(host, vm)| {
                let (minimum, maximum) = vm_memory_range(vm);
                let status = vm.status.clone().unwrap_or_default();
                let observed = status.observed.as_ref();
                let balloon = observed.and_then(|o| o.memory.as_ref());
                json!({
                    "id": vm.id,
                    "name": vm_spec_name(vm),
                    "host_id": status.host_id,
                    "host": host,
                    "minimum_mib": minimum,
                    "maximum_mib": maximum,
                    "memory_balance": observed
                        .and_then(|o| o.memory_balance.as_ref())
                        .map_or(Value::Null, vm_balance_json),
                    "balloon_actual_mib": balloon.map(|m| m.balloon_actual_mib),
                    "balloon_target_mib": balloon.map(|m| m.balloon_target_mib),
                })
            })
            .collect();
        json!({"hosts": hosts, "vms": vms})
    }
}

impl fmt::Display for Top<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}\n{}", self.hosts_table(), self.vms_table())
    }
}

fn vm_spec_name(vm: &Vm) -> &str {
    vm.spec.as_ref().map_or("", |s| s.name.as_str())
}

/// A VM's minimum and maximum memory with the spec's defaults applied, MiB.
fn vm_memory_range(vm: &Vm) -> (u64, u64) {
    let memory = vm.spec.as_ref().and_then(|s| s.memory).unwrap_or_default();
    let (_, minimum, maximum) = crate::validate::memory_sizes(&memory);
    (minimum, maximum)
}

fn yes_no(value: bool) -> String {
    if value { "yes" } else { "no" }.to_string()
}

const EVENT_HEADER: [&str; 6] = ["SEQ", "TIME", "KIND", "VM", "HOST", "MESSAGE"];

fn event_cells(event: &Event) -> Vec<String> {
    let message = if event.message.is_empty() {
        event.reason.clone()
    } else {
        event.message.clone()
    };
    vec![
        event.sequence.to_string(),
        time_text(&event.time),
        event_kind(event.kind).to_ascii_uppercase(),
        or_dash(&event.vm_id),
        or_dash(&event.host_id),
        message,
    ]
}

pub fn events_table(events: &[Event]) -> Table {
    let mut table = Table::new(&EVENT_HEADER);
    for event in events {
        table.row(event_cells(event));
    }
    table
}

/// One line of `events --follow`, or its header for `None`: fixed widths, since the rows to
/// come are unknown (sequences are 16 digits, ids 19 and 21 characters).
pub fn event_stream_row(event: Option<&Event>) -> String {
    const WIDTHS: [usize; 5] = [16, 20, 26, 19, 21];
    let cells = match event {
        Some(event) => event_cells(event),
        None => EVENT_HEADER.iter().map(|h| h.to_string()).collect(),
    };
    let mut line = String::new();
    for (i, cell) in cells.iter().enumerate() {
        line.push_str(cell);
        if let Some(width) = WIDTHS.get(i) {
            let pad = width.saturating_sub(cell.chars().count()) + GAP;
            line.extend(std::iter::repeat_n(' ', pad));
        }
    }
    format!("{}\n", line.trim_end())
}

pub fn images_table(images: &[Image]) -> Table {
    let mut table = Table::new(&["NAME", "ROLE", "FILE", "SIZE", "SHA256", "PUSHED"]);
    for image in images {
        for file in &image.files {
            table.row(vec![
                image.name.clone(),
                image_role(file.role),
                or_dash(&file.file_name),
                bytes_text(file.size_bytes),
                file.sha256.clone(),
                time_text(&file.pushed_at),
            ]);
        }
    }
    table
}

pub fn pushed_table(name: &str, pushed: &[PushImageResponse]) -> Table {
    let mut table = Table::new(&["NAME", "ROLE", "FILE", "SIZE", "SHA256", "STORED"]);
    for response in pushed {
        let file = response.file.clone().unwrap_or_default();
        table.row(vec![
            name.to_string(),
            image_role(file.role),
            or_dash(&file.file_name),
            bytes_text(file.size_bytes),
            file.sha256,
            if response.already_stored {
                "already stored".to_string()
            } else {
                "new".to_string()
            },
        ]);
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;
    use fabric_proto::v1::{MemorySpec, NicSpec, Placement, VmStatus};

    #[test]
    fn tables_align_and_leave_the_last_column_ragged() {
        let mut table = Table::new(&["ID", "NAME", "REASON"]);
        table.row(vec!["vm-1".into(), "a".into(), "x y".into()]);
        table.row(vec!["vm-22".into(), "bbbbbb".into(), "".into()]);
        assert_eq!(
            table.to_string(),
            "ID      NAME     REASON\nvm-1    a        x y\nvm-22   bbbbbb\n"
        );
    }

    #[test]
    fn enum_names_are_short_and_lowercase() {
        assert_eq!(vm_phase(VmPhase::Pending as i32), "pending");
        assert_eq!(vm_phase(99), "99");
        assert_eq!(host_state(HostState::Draining as i32), "draining");
        assert_eq!(event_kind(EventKind::VmCreated as i32), "vm_created");
        assert_eq!(
            restart_policy(RestartPolicy::OnFailure as i32),
            "on-failure"
        );
        assert_eq!(restart_policy(0), "always");
        assert_eq!(desired_state(0), "running");
        assert_eq!(desired_state(DesiredState::Stopped as i32), "stopped");
        assert_eq!(image_role(ImageFileRole::Initramfs as i32), "initramfs");
    }

    #[test]
    fn ages_and_sizes() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let ago = |s: u64| Some(Timestamp::from(now - Duration::from_secs(s)));
        assert_eq!(age(&ago(5), now), "5s");
        assert_eq!(age(&ago(600), now), "10m");
        assert_eq!(age(&ago(3 * 3600), now), "3h");
        assert_eq!(age(&ago(5 * 86400), now), "5d");
        assert_eq!(age(&None, now), "-");
        assert_eq!(bytes_text(512), "512 B");
        assert_eq!(bytes_text(2_262_016), "2.2 MiB");
        assert_eq!(bytes_text(64 << 20), "64.0 MiB");
    }

    #[test]
    fn a_vm_spec_in_json_reads_back_as_a_spec_file() {
        let vm = Vm {
            id: "vm-1".into(),
            spec: Some(VmSpec {
                name: "web".into(),
                vcpus: 2,
                memory: Some(MemorySpec {
                    startup_mib: 512,
                    minimum_mib: 256,
                    maximum_mib: 1024,
                    buffer_percent: 0,
                    weight: 5000,
                }),
                nics: vec![NicSpec {
                    network: "default".into(),
                    mac: "52:54:00:00:00:01".into(),
                }],
                disks: vec![fabric_proto::v1::DiskSpec {
                    source: Some(disk_spec::Source::SizeMib(10)),
                    read_only: true,
                }],
                placement: Some(Placement {
                    labels: [("app".to_string(), "web".to_string())].into(),
                    ..Default::default()
                }),
                restart_policy: RestartPolicy::OnFailure as i32,
                ..Default::default()
            }),
            status: Some(VmStatus {
                phase: VmPhase::Pending as i32,
                ..Default::default()
            }),
            created_at: Some(Timestamp {
                seconds: 0,
                nanos: 0,
            }),
            ..Default::default()
        };
        let json = vm_json(&vm);
        assert_eq!(json["status"]["phase"], "pending");
        assert_eq!(json["status"]["desired_state"], "running");
        assert_eq!(json["created_at"], "1970-01-01T00:00:00Z");
        let text = serde_json::to_string(&json["spec"]).unwrap();
        let back = crate::cli::spec::SpecFile::parse(&text, "-")
            .unwrap()
            .into_request()
            .unwrap()
            .spec
            .unwrap();
        let mut expected = vm.spec.clone().unwrap();
        expected.image = Some(Default::default());
        expected.placement.as_mut().unwrap().zone = String::new();
        assert_eq!(back, expected);
    }
}
