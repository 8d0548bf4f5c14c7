//! The sampler: every ~20 ms, every live copy of every VM on every host.
//!
//! A copy is **live** at a sample when
//! - on a KVM host: its fabric-vmm process exists, is not stopped, traced or a zombie (state
//!   T, t, Z, X), and the host's lease file (`<data_dir>/lease.json`) is still valid — each
//!   fabric-vmm enforces that lease itself and does not run its guest past it;
//! - on a simulated host: the agent reports it RUNNING or STARTING with a start time (its own
//!   view, `ListLocalVms` on its Unix socket, asked every ~20 ms with a short timeout), the
//!   host's lease file was valid both just before and just after it answered (a simulated VM
//!   has no VMM to enforce the lease: an agent resumed after its lease ran out reports its VMs
//!   running for the few milliseconds until its fence kills them), and is valid now. An agent that does not answer (stopped, or dead) counts
//!   as still running what it last reported until its lease file says the lease ran out;
//!   from then on its last report is forgotten.
//!
//! The controller's own view (ListVms) is sampled every ~200 ms and its changes written to
//! the history, for the record.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fabric_proto::v1::agent_client::AgentClient;
use fabric_proto::v1::compute_client::ComputeClient;
use fabric_proto::v1::{ListLocalVmsRequest, ListVmsRequest, ObservedPhase};
use fabric_vmm_api::lease::LeaseFile;

use super::checker::{double_runs, DoubleRun, LiveCopy, Sample};
use super::cluster::{arg_after, HostKind};
use super::History;
use crate::cluster::unix_channel;
use crate::process;

/// What the sampler needs to know of a host.
#[derive(Debug, Clone)]
pub struct HostInfo {
    pub name: String,
    pub kind: HostKind,
    pub data_dir: PathBuf,
    pub socket: PathBuf,
}

/// A simulated host's agent as last heard.
#[derive(Debug, Default, Clone)]
struct AgentView {
    /// VM id → the phase it reported (RUNNING or STARTING with a start time).
    live: BTreeMap<String, ObservedPhase>,
    /// Whether its last ask was answered.
    answered: bool,
}

/// What the sampler found.
#[derive(Debug, Default, Clone)]
pub struct SamplerState {
    pub samples: u64,
    pub controller_samples: u64,
    /// The first double runs (at most 1000 kept; `double_run_samples` counts them all).
    pub double_runs: Vec<DoubleRun>,
    pub double_run_samples: u64,
    pub last: Sample,
}

/// The running sampler.
pub struct Sampler {
    stop: Arc<AtomicBool>,
    pub state: Arc<Mutex<SamplerState>>,
    thread: Option<std::thread::JoinHandle<()>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// Whether the host's lease file holds a valid lease. A read that meets a renewal half
/// written (the file is overwritten in place; its checksum tells) is read again, so that a
/// torn read never hides a live copy.
fn lease_valid(data_dir: &std::path::Path) -> bool {
    let path = data_dir.join("lease.json");
    for _ in 0..3 {
        match LeaseFile::read(&path) {
            Ok(lease) => return !lease.remaining().is_zero(),
            Err(err) if err.contains("checksum") => {
                std::thread::sleep(std::time::Duration::from_millis(1))
            }
            Err(_) => return false,
        }
    }
    // Still being written: an agent is renewing it.
    true
}

/// Asks a simulated agent what it runs; None if it does not answer within 300 ms.
async fn ask_agent(
    client: &mut AgentClient<tonic::transport::Channel>,
) -> Option<BTreeMap<String, ObservedPhase>> {
    let vms = tokio::time::timeout(
        Duration::from_millis(300),
        client.list_local_vms(ListLocalVmsRequest {}),
    )
    .await
    .ok()?
    .ok()?
    .into_inner()
    .vms;
    Some(
        vms.into_iter()
            .filter_map(|v| {
                let o = v.observed?;
                let phase = o.phase();
                (matches!(phase, ObservedPhase::Running | ObservedPhase::Starting)
                    && o.started_at.is_some())
                .then_some((v.vm_id, phase))
            })
            .collect(),
    )
}

impl Sampler {
    /// Starts sampling `hosts` (the fabric-vmm processes are those whose command line names
    /// `cluster_dir`) and the controller on `controller_socket`; times from `history`'s start.
    pub fn start(
        hosts: Vec<HostInfo>,
        cluster_dir: PathBuf,
        controller_socket: PathBuf,
        history: Arc<History>,
    ) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let state = Arc::new(Mutex::new(SamplerState::default()));
        let views: Vec<Arc<Mutex<AgentView>>> = hosts
            .iter()
            .map(|_| Arc::new(Mutex::new(AgentView::default())))
            .collect();
        let mut tasks = Vec::new();
        for (host, view) in hosts.iter().zip(&views) {
            if host.kind != HostKind::Sim {
                continue;
            }
            let (socket, view, stop) = (host.socket.clone(), view.clone(), stop.clone());
            let data_dir = host.data_dir.clone();
            tasks.push(tokio::spawn(async move {
                let mut client = AgentClient::new(unix_channel(&socket).await);
                while !stop.load(Ordering::SeqCst) {
                    // What a simulated agent runs counts only under a valid lease, before and
                    // after it answered: a simulated VM has no VMM of its own to stop it when
                    // the lease runs out (a KVM host's fabric-vmm does), so an agent resumed
                    // after its lease ran out, which kills its VMs within milliseconds, would
                    // otherwise count as running them then — and a lease renewed a moment
                    // later must not revive that answer.
                    let valid_before = lease_valid(&data_dir);
                    let answer = ask_agent(&mut client).await;
                    let valid_after = lease_valid(&data_dir);
                    {
                        let mut v = view.lock().unwrap_or_else(|e| e.into_inner());
                        match answer {
                            Some(live) => {
                                v.live = if valid_before && valid_after {
                                    live
                                } else {
                                    BTreeMap::new()
                                };
                                v.answered = true;
                            }
                            None => v.answered = false,
                        }
                    }
                    if !view.lock().map(|v| v.answered).unwrap_or(false) {
                        // A new connection next time: the agent may have been restarted.
                        client = AgentClient::new(unix_channel(&socket).await);
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }));
        }
        {
            let (stop, state, history) = (stop.clone(), state.clone(), history.clone());
            tasks.push(tokio::spawn(async move {
                let mut seen: BTreeMap<String, (i32, String)> = BTreeMap::new();
                while !stop.load(Ordering::SeqCst) {
                    let mut c = ComputeClient::new(unix_channel(&controller_socket).await);
                    let answer = tokio::time::timeout(
                        Duration::from_secs(1),
                        c.list_vms(ListVmsRequest::default()),
                    )
                    .await;
                    if let Ok(Ok(r)) = answer {
                        state
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .controller_samples += 1;
                        let now: BTreeMap<String, (i32, String)> = r
                            .into_inner()
                            .vms
                            .into_iter()
                            .map(|v| {
                                let s = v.status.unwrap_or_default();
                                (v.id, (s.phase, s.host_id))
                            })
                            .collect();
                        for (id, (phase, host)) in &now {
                            if seen.get(id) != Some(&(*phase, host.clone())) {
                                let phase =
                                    fabric_proto::v1::VmPhase::try_from(*phase).unwrap_or_default();
                                history.line(&format!("controller: {id} {phase:?} on {host:?}"));
                            }
                        }
                        for id in seen.keys() {
                            if !now.contains_key(id) {
                                history.line(&format!("controller: {id} gone"));
                            }
                        }
                        seen = now;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }));
        }
        let thread = {
            let (stop, state) = (stop.clone(), state.clone());
            std::thread::spawn(move || {
                let marker = cluster_dir.display().to_string();
                let period = Duration::from_millis(20);
                let mut next = Instant::now();
                while !stop.load(Ordering::SeqCst) {
                    let sample = take_sample(&hosts, &views, &marker, history.ms());
                    let doubles = double_runs(&sample);
                    {
                        let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
                        s.samples += 1;
                        if !doubles.is_empty() {
                            s.double_run_samples += 1;
                            for d in &doubles {
                                history.line(&format!("DOUBLE RUN: {d}"));
                            }
                            let room = 1000usize.saturating_sub(s.double_runs.len());
                            s.double_runs.extend(doubles.into_iter().take(room));
                        }
                        s.last = sample;
                    }
                    next += period;
                    let now = Instant::now();
                    if next > now {
                        std::thread::sleep(next - now);
                    } else {
                        next = now;
                    }
                }
            })
        };
        Sampler {
            stop,
            state,
            thread: Some(thread),
            tasks,
        }
    }

    /// The latest sample.
    pub fn last(&self) -> Sample {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .last
            .clone()
    }

    /// Stops sampling; what it found.
    pub async fn stop(mut self) -> SamplerState {
        self.stop.store(true, Ordering::SeqCst);
        for task in self.tasks.drain(..) {
            let _ = task.await;
        }
        if let Some(thread) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
        self.state.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for task in &self.tasks {
            task.abort();
        }
    }
}

fn take_sample(
    hosts: &[HostInfo],
    views: &[Arc<Mutex<AgentView>>],
    marker: &str,
    at_ms: u64,
) -> Sample {
    let valid: Vec<bool> = hosts.iter().map(|h| lease_valid(&h.data_dir)).collect();
    let mut copies: BTreeMap<String, Vec<LiveCopy>> = BTreeMap::new();
    if hosts.iter().any(|h| h.kind == HostKind::Kvm) {
        for (pid, args) in process::naming(marker) {
            if !process::is_fabric_vmm(&args) {
                continue;
            }
            let lease = arg_after(&args, "--lease-file");
            let Some(i) = hosts
                .iter()
                .position(|h| lease.starts_with(&format!("{}/", h.data_dir.display())))
            else {
                continue;
            };
            let Some(stat) = process::stat(pid) else {
                continue;
            };
            if matches!(stat.state, 'T' | 't' | 'Z' | 'X' | 'x') || !valid[i] {
                continue;
            }
            copies
                .entry(arg_after(&args, "--vm-id"))
                .or_default()
                .push(LiveCopy {
                    host: hosts[i].name.clone(),
                    pid,
                    seen: format!("fabric-vmm in state {}", stat.state),
                });
        }
    }
    for (i, host) in hosts.iter().enumerate() {
        if host.kind != HostKind::Sim {
            continue;
        }
        let mut view = views[i].lock().unwrap_or_else(|e| e.into_inner());
        if !valid[i] {
            // Its lease ran out: whatever it ran has stopped (a silent agent's last report
            // is forgotten, so a later renewal does not bring it back).
            view.live.clear();
            continue;
        }
        for (vm, phase) in &view.live {
            copies.entry(vm.clone()).or_default().push(LiveCopy {
                host: host.name.clone(),
                pid: 0,
                seen: if view.answered {
                    format!("agent reports {phase:?}")
                } else {
                    format!("silent agent, last reported {phase:?}")
                },
            });
        }
    }
    Sample { at_ms, copies }
}
