//! What the agent keeps on disk about each VM, so that a restarted agent knows everything it
//! knew before: `<data_dir>/vms/<vm_id>/vm.json`, written atomically (temporary file, fsync,
//! rename) whenever it changes.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use fabric_proto::v1::Assignment;
use prost::Message;
use serde::{Deserialize, Serialize};

/// File name of the record in a VM's directory.
pub const RECORD_FILE: &str = "vm.json";

/// One VM's persistent record.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct VmRecord {
    pub vm_id: String,
    /// The assignment last received, protobuf-encoded as hex (the controller's own encoding,
    /// so nothing is lost between versions).
    #[serde(default)]
    assignment_pb: String,
    /// The VM's address on the VM subnet, once allocated.
    #[serde(default)]
    pub ip: Option<Ipv4Addr>,
    /// Taps the agent created for this VM (and so may reuse and must delete).
    #[serde(default)]
    pub taps: Vec<String>,
    /// The running VMM process, if any: pid and its start time in clock ticks since boot
    /// (`/proc/PID/stat` field 22), which tells it apart from a later process with the same pid.
    #[serde(default)]
    pub pid: Option<u32>,
    #[serde(default)]
    pub pid_start_ticks: Option<u64>,
    /// Set (and saved) right before a VMM process is started, cleared once its pid is saved:
    /// while set, a VMM may run whose pid is not recorded (the agent died in between). A
    /// restarted agent then finds it in the VM's cgroup ([`crate::kvm`]'s adoption).
    #[serde(default)]
    pub spawning: bool,
    /// When the current VMM process started, ms since the Unix epoch.
    #[serde(default)]
    pub started_at_ms: Option<u64>,
    #[serde(default)]
    pub restart_count: u32,
    #[serde(default)]
    pub last_error: String,
    /// The backend that runs the VM ("kvm" or "sim").
    #[serde(default)]
    pub backend: String,
}

impl VmRecord {
    pub fn new(vm_id: &str, backend: &str) -> VmRecord {
        VmRecord {
            vm_id: vm_id.to_string(),
            backend: backend.to_string(),
            ..VmRecord::default()
        }
    }

    pub fn assignment(&self) -> Option<Assignment> {
        if self.assignment_pb.is_empty() {
            return None;
        }
        let bytes = hex::decode(&self.assignment_pb).ok()?;
        Assignment::decode(bytes.as_slice()).ok()
    }

    pub fn set_assignment(&mut self, assignment: &Assignment) {
        self.assignment_pb = hex::encode(assignment.encode_to_vec());
    }

    pub fn path(dir: &Path) -> PathBuf {
        dir.join(RECORD_FILE)
    }

    /// Reads the record in `dir`.
    pub fn load(dir: &Path) -> Result<VmRecord, String> {
        let path = Self::path(dir);
        let text = std::fs::read_to_string(&path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Writes the record into `dir` atomically.
    pub fn save(&self, dir: &Path) -> Result<(), String> {
        write_atomic(
            &Self::path(dir),
            &serde_json::to_vec_pretty(self).unwrap_or_default(),
        )
    }
}

pub use fabric_vmm_api::fs::write_atomic;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_with_their_assignment() {
        let dir = tempfile::tempdir().unwrap();
        let mut rec = VmRecord::new("vm-1", "kvm");
        assert!(rec.assignment().is_none());
        rec.set_assignment(&Assignment {
            vm_id: "vm-1".into(),
            generation: 7,
            ..Default::default()
        });
        rec.ip = Some(Ipv4Addr::new(10, 0, 0, 2));
        rec.pid = Some(42);
        rec.save(dir.path()).unwrap();
        let back = VmRecord::load(dir.path()).unwrap();
        assert_eq!(back, rec);
        assert_eq!(back.assignment().unwrap().generation, 7);
        std::fs::write(VmRecord::path(dir.path()), "{not json").unwrap();
        assert!(VmRecord::load(dir.path()).unwrap_err().contains("vm.json"));
    }
}
