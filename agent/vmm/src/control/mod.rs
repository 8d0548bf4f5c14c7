//! The control endpoint: the `fabric.v1.Vmm` gRPC service on a Unix socket, for the agent.
//!
//! It runs on its own thread with a small tokio runtime, apart from the synchronous VMM core;
//! it talks to the VM through the [`ControlSender`] (requests answered by the event loop) and
//! reads [`VmInfo`] directly. Balloon requests go through the [`BalloonHandle`]: the target
//! and the statistics are numbers it shares with the device, and asking the guest for fresh
//! statistics wakes the event loop, which owns the device's queues.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use fabric_proto::v1::vmm_server::{Vmm, VmmServer};
use fabric_proto::v1::{
    GetMemoryStatsRequest, GetMemoryStatsResponse, GetStateRequest, GetStateResponse, MemoryStats,
    PauseRequest, PauseResponse, ResumeRequest, ResumeResponse, SetBalloonTargetRequest,
    SetBalloonTargetResponse, ShutdownPath, ShutdownRequest, ShutdownResponse, VmmState,
};
use tonic::{Request, Response, Status};

use super::devices::virtio::balloon::{pages_to_mib, BalloonHandle, BalloonStatus};
use super::runner::{Command, ControlSender, VmInfo, VmState};

/// How long a forced stop may take before the endpoint gives up waiting.
const FORCE_STOP_WAIT: Duration = Duration::from_secs(5);
/// How long GetMemoryStats waits for the guest to answer a request for fresh statistics
/// before it returns the previous ones (their `updated_at` says how old they are).
const STATS_WAIT: Duration = Duration::from_secs(1);

struct VmmService {
    vm_id: String,
    info: Arc<VmInfo>,
    control: ControlSender,
    started_at: SystemTime,
    in_flight_shutdowns: Arc<AtomicUsize>,
    balloon: Option<BalloonHandle>,
}

fn to_proto_state(state: VmState) -> VmmState {
    match state {
        VmState::Created => VmmState::Created,
        VmState::Running => VmmState::Running,
        VmState::Paused => VmmState::Paused,
        VmState::ShuttingDown => VmmState::ShuttingDown,
        VmState::Stopped => VmmState::Stopped,
    }
}

fn no_balloon() -> Status {
    Status::failed_precondition(
        "this VM has no balloon device (fabric-vmm was started without --balloon)",
    )
}

fn to_proto_memory_stats(status: &BalloonStatus) -> MemoryStats {
    let stats = &status.stats;
    MemoryStats {
        swap_in_bytes: stats.swap_in,
        swap_out_bytes: stats.swap_out,
        major_faults: stats.major_faults,
        minor_faults: stats.minor_faults,
        free_bytes: stats.free,
        total_bytes: stats.total,
        available_bytes: stats.available,
        disk_caches_bytes: stats.disk_caches,
        hugetlb_allocations: stats.hugetlb_allocations,
        hugetlb_failures: stats.hugetlb_failures,
        balloon_actual_mib: pages_to_mib(status.actual_pages),
        balloon_target_mib: pages_to_mib(status.target_pages),
        updated_at: status.stats_updated_at.map(Into::into),
    }
}

fn proto_duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

impl VmmService {
    /// Sends a command to the event loop without blocking the runtime.
    async fn call(&self, command: Command) -> Result<(), Status> {
        let control = self.control.clone();
        tokio::task::spawn_blocking(move || control.call(command))
            .await
            .map_err(|e| Status::internal(format!("control task failed: {e}")))?
            .map_err(Status::failed_precondition)
    }

    async fn wait_stopped(&self, within: Duration) -> bool {
        let mut watch = self.info.watch();
        tokio::time::timeout(within, watch.wait_for(|s| *s == VmState::Stopped))
            .await
            .is_ok_and(|r| r.is_ok())
    }
}

#[tonic::async_trait]
impl Vmm for VmmService {
    async fn get_state(
        &self,
        _: Request<GetStateRequest>,
    ) -> Result<Response<GetStateResponse>, Status> {
        let state = self.info.state();
        Ok(Response::new(GetStateResponse {
            vm_id: self.vm_id.clone(),
            state: to_proto_state(state) as i32,
            vcpus: self.info.vcpus,
            memory_mib: self.info.memory_mib,
            pid: std::process::id(),
            started_at: Some(self.started_at.into()),
            uptime: (state != VmState::Created)
                .then(|| proto_duration(self.info.started.elapsed())),
            boot_time: self
                .info
                .boot_time
                .millis()
                .map(|ms| proto_duration(Duration::from_millis(ms))),
        }))
    }

    async fn shutdown(
        &self,
        request: Request<ShutdownRequest>,
    ) -> Result<Response<ShutdownResponse>, Status> {
        let timeout = match request.into_inner().timeout {
            None => Duration::ZERO,
            Some(d) if d.seconds < 0 || d.nanos < 0 => {
                return Err(Status::invalid_argument(format!(
                    "timeout: must not be negative (got {}s {}ns)",
                    d.seconds, d.nanos
                )))
            }
            Some(d) => Duration::new(d.seconds as u64, d.nanos as u32),
        };
        let begun = Instant::now();
        if self.info.state() == VmState::Stopped {
            return Ok(Response::new(ShutdownResponse {
                path: ShutdownPath::AlreadyStopped as i32,
                elapsed: Some(proto_duration(Duration::ZERO)),
            }));
        }
        self.in_flight_shutdowns.fetch_add(1, Ordering::SeqCst);
        let _done = DecrementOnDrop(self.in_flight_shutdowns.clone());

        let mut path = ShutdownPath::Forced;
        if !timeout.is_zero() {
            // A guest whose keyboard buffer is full cannot take the keys; fall through to force.
            if let Err(status) = self.call(Command::CtrlAltDel).await {
                tracing::warn!(error = %status.message(), "Ctrl-Alt-Del not delivered");
            }
            if self.wait_stopped(timeout).await {
                path = ShutdownPath::Graceful;
            }
        }
        if path == ShutdownPath::Forced {
            // The loop may already be gone if the guest stopped at the last moment.
            let _ = self.call(Command::ForceStop).await;
            if !self.wait_stopped(FORCE_STOP_WAIT).await {
                return Err(Status::internal(
                    "the VM did not stop after a forced shutdown",
                ));
            }
        }
        Ok(Response::new(ShutdownResponse {
            path: path as i32,
            elapsed: Some(proto_duration(begun.elapsed())),
        }))
    }

    async fn pause(&self, _: Request<PauseRequest>) -> Result<Response<PauseResponse>, Status> {
        match self.info.state() {
            VmState::Paused => {}
            VmState::Running => self.call(Command::Pause).await?,
            other => {
                return Err(Status::failed_precondition(format!(
                    "cannot pause a VM that is {other:?}"
                )))
            }
        }
        Ok(Response::new(PauseResponse {}))
    }

    async fn resume(&self, _: Request<ResumeRequest>) -> Result<Response<ResumeResponse>, Status> {
        match self.info.state() {
            VmState::Running => {}
            VmState::Paused => self.call(Command::Resume).await?,
            other => {
                return Err(Status::failed_precondition(format!(
                    "cannot resume a VM that is {other:?}"
                )))
            }
        }
        Ok(Response::new(ResumeResponse {}))
    }

    async fn set_balloon_target(
        &self,
        request: Request<SetBalloonTargetRequest>,
    ) -> Result<Response<SetBalloonTargetResponse>, Status> {
        let balloon = self.balloon.as_ref().ok_or_else(no_balloon)?;
        let target = balloon.set_target_mib(request.into_inner().balloon_target_mib);
        Ok(Response::new(SetBalloonTargetResponse {
            balloon_target_mib: target,
            balloon_actual_mib: pages_to_mib(balloon.status().actual_pages),
        }))
    }

    async fn get_memory_stats(
        &self,
        _: Request<GetMemoryStatsRequest>,
    ) -> Result<Response<GetMemoryStatsResponse>, Status> {
        let balloon = self.balloon.as_ref().ok_or_else(no_balloon)?;
        // Without a period, each call asks the guest for fresh numbers and waits briefly for
        // them; with one, the latest periodic numbers are returned at once.
        if balloon.stats_on_request() {
            let mut updates = balloon.stats_updates();
            updates.borrow_and_update();
            if balloon.request_stats() {
                let _ = tokio::time::timeout(STATS_WAIT, updates.changed()).await;
            }
        }
        Ok(Response::new(GetMemoryStatsResponse {
            stats: Some(to_proto_memory_stats(&balloon.status())),
        }))
    }
}

struct DecrementOnDrop(Arc<AtomicUsize>);

impl Drop for DecrementOnDrop {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Errors from starting the control endpoint.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("control socket {path}: {source}")]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("control endpoint runtime: {0}")]
    Runtime(#[source] std::io::Error),
}

/// The running endpoint.
pub struct ControlServer {
    path: PathBuf,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    in_flight_shutdowns: Arc<AtomicUsize>,
}

impl ControlServer {
    /// Binds `path` (replacing a stale socket) and serves on a thread of its own. `balloon` is
    /// the VM's balloon, if it has one.
    pub fn start(
        path: &Path,
        vm_id: String,
        info: Arc<VmInfo>,
        control: ControlSender,
        balloon: Option<BalloonHandle>,
    ) -> Result<ControlServer, ControlError> {
        let bind_err = |source| ControlError::Bind {
            path: path.to_owned(),
            source,
        };
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            use std::os::unix::fs::FileTypeExt;
            if !meta.file_type().is_socket() {
                return Err(bind_err(std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    "exists and is not a socket",
                )));
            }
            std::fs::remove_file(path).map_err(bind_err)?;
        }
        let listener = std::os::unix::net::UnixListener::bind(path).map_err(bind_err)?;
        // Its owner only (the agent, as the same user): whoever connects may stop the guest.
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .map_err(bind_err)?;
        listener.set_nonblocking(true).map_err(bind_err)?;

        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(ControlError::Runtime)?;
        let in_flight_shutdowns = Arc::new(AtomicUsize::new(0));
        let service = VmmService {
            vm_id,
            info,
            control,
            started_at: SystemTime::now(),
            in_flight_shutdowns: in_flight_shutdowns.clone(),
            balloon,
        };
        let (shutdown_tx, shutdown_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("control".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let listener = match tokio::net::UnixListener::from_std(listener) {
                        Ok(l) => l,
                        Err(err) => {
                            tracing::error!(error = %err, "control socket");
                            return;
                        }
                    };
                    let standard =
                        fabric_proto::standard_services(&[fabric_proto::VMM_SERVICE]).await;
                    let incoming = fabric_proto::unix::incoming(listener);
                    let result = fabric_proto::server()
                        .add_service(standard.health)
                        .add_service(standard.reflection)
                        .add_service(standard.reflection_v1alpha)
                        .add_service(VmmServer::new(service))
                        .serve_with_incoming_shutdown(incoming, async {
                            let _ = shutdown_rx.await;
                        })
                        .await;
                    if let Err(err) = result {
                        tracing::error!(error = %err, "control endpoint stopped");
                    }
                });
            })
            .map_err(ControlError::Runtime)?;
        Ok(ControlServer {
            path: path.to_owned(),
            shutdown: Some(shutdown_tx),
            thread: Some(thread),
            in_flight_shutdowns,
        })
    }

    /// Lets in-flight Shutdown calls answer, then stops serving and removes the socket.
    pub fn stop(mut self, grace: Duration) {
        let deadline = Instant::now() + grace;
        while self.in_flight_shutdowns.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(thread) = self.thread.take() {
            while !thread.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        let _ = std::fs::remove_file(&self.path);
    }
}
