//! The seam between the agent's control logic and what actually runs a VM: the
//! [`Hypervisor`] trait, implemented by the KVM backend ([`super::kvm`], real fabric-vmm
//! processes) and the simulated one ([`super::sim`], records for scale tests), and the
//! [`Balloon`] handle through which the memory balancer sizes a running VM's balloon.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fabric_proto::v1::{MemoryStats, VmSpec};
use futures::future::BoxFuture;

use super::record::VmRecord;

/// How a VM instance ended.
#[derive(Debug, Clone)]
pub struct Exit {
    /// A clean end the guest asked for (power-off, exit status 0), as opposed to a crash, a
    /// signal or an error exit. Restart policy ON_FAILURE restarts only unclean exits.
    pub clean: bool,
    /// For operators: "exited with status 1", "killed by signal 9 (SIGKILL)".
    pub description: String,
}

/// What a periodic look at a running instance found.
#[derive(Debug, Clone, Default)]
pub struct Probe {
    /// The guest's vCPUs run (or are paused); false while the VMM is still setting up.
    pub running: bool,
    /// Guest memory statistics, when the VMM has a balloon and the guest reported.
    pub memory: Option<MemoryStats>,
    /// Detail for ObservedVm.message.
    pub message: Option<String>,
}

/// Reports progress while a VM is being prepared ("pulling kernel").
pub type Progress<'a> = &'a (dyn Fn(&str) + Send + Sync);

/// What a backend needs to start a VM.
pub struct StartRequest<'a> {
    pub spec: &'a VmSpec,
    /// The VM's own directory (exists).
    pub dir: PathBuf,
    /// Its record; the backend fills what it allocates (address, taps, pid).
    pub record: &'a mut VmRecord,
    pub progress: Progress<'a>,
    /// Asked immediately before the VM is started, after everything it needs is ready (which
    /// may have taken long: image pulls, disk copies): an error (why not) abandons the start.
    /// The supervisor answers whether the start is still wanted and allowed now (the VM still
    /// assigned and wanted running, the fence not raised since the start was decided).
    pub proceed: Proceed<'a>,
}

/// See [`StartRequest::proceed`].
pub type Proceed<'a> = &'a (dyn Fn() -> Result<(), String> + Send + Sync);

/// A running VM.
pub trait Instance: Send {
    /// Host pid of the VMM process; 0 when there is none (simulated).
    fn pid(&self) -> u32;
    fn started_at(&self) -> SystemTime;
    /// The VMM's control socket (the Vmm service), if it has one.
    fn socket_path(&self) -> Option<PathBuf>;
    /// Resolves when the instance has ended. Cancel-safe: may be polled again after being
    /// dropped unfinished.
    fn exited(&mut self) -> BoxFuture<'_, Exit>;
    /// Shuts the guest down, gracefully for up to `timeout`, then by force; resolves when
    /// the instance has ended.
    fn stop(&mut self, timeout: Duration) -> BoxFuture<'_, Exit>;
    /// Ends the instance at once (SIGKILL), without asking the guest: the fence's stop, when
    /// the VM may already be starting elsewhere. Resolves when it has ended.
    fn kill(&mut self) -> BoxFuture<'_, Exit>;
    /// Looks at the instance (state, memory statistics).
    fn probe(&mut self) -> BoxFuture<'_, Probe>;
    /// The handle that sizes the instance's balloon; None when it has none. The memory
    /// balancer holds it apart from the instance (which its supervisor owns), so it must stay
    /// usable, or fail cleanly, after the instance has ended.
    fn balloon(&self) -> Option<Arc<dyn Balloon>>;
}

/// Sets the balloon target of one running instance: the KVM backend through its VMM's
/// control socket (`SetBalloonTarget`), the simulated one in its model of the guest.
pub trait Balloon: Send + Sync + std::fmt::Debug {
    /// Asks for a balloon of `balloon_target_mib` MiB: guest memory the guest gives back to
    /// the host. Resolves once the request is delivered (the guest follows at its own pace);
    /// errors say what failed.
    fn set_target(&self, balloon_target_mib: u64) -> BoxFuture<'_, Result<(), String>>;
}

/// A way of running VMs on this host.
pub trait Hypervisor: Send + Sync {
    /// "kvm" or "sim", as recorded in VM records.
    fn name(&self) -> &'static str;
    /// Prepares everything the VM needs (images, disks, network, cgroup) and starts it.
    /// Preparation is idempotent: a restart reuses what the first start made.
    fn start<'a>(
        &'a self,
        request: StartRequest<'a>,
    ) -> BoxFuture<'a, Result<Box<dyn Instance>, String>>;
    /// Takes over an instance a previous agent process started, if it still runs, and
    /// updates the record to it (the pid of a VMM started but not recorded). Any other
    /// process of the VM is killed: one VMM per VM.
    fn adopt(&self, record: &mut VmRecord, dir: &std::path::Path) -> Option<Box<dyn Instance>>;
    /// Ends every process the VM may have on this host (its cgroup's), known or not: for a
    /// VM whose record cannot be read, whose VMM therefore cannot be adopted.
    fn kill_all(&self, vm_id: &str) -> BoxFuture<'_, Result<(), String>>;
    /// Releases what `start` made for the VM outside its directory (taps, cgroups). The
    /// instance has ended.
    fn cleanup<'a>(&'a self, record: &'a VmRecord) -> BoxFuture<'a, Result<(), String>>;
}
