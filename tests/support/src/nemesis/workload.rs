//! The workload: creates, deletes, stops, starts, host cordons, uncordons and drains at
//! random moments, through the controller's Compute API, one call at a time. Every call's
//! request, result and times are recorded; an acknowledged call (Ok) is an acknowledged write.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fabric_proto::v1::compute_client::ComputeClient;
use fabric_proto::v1::{
    CordonHostRequest, CreateVmRequest, DeleteVmRequest, DrainHostRequest, ListHostsRequest,
    StartVmRequest, StopVmRequest, UncordonHostRequest, VmSpec,
};

use super::checker::{Op, OpKind};
use super::rng::Rng;
use super::History;
use crate::cluster::unix_channel;

/// The longest a call may take before it counts as not acknowledged.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Calls to the controller, recorded.
#[derive(Clone)]
pub struct Client {
    pub socket: PathBuf,
    pub history: Arc<History>,
    pub ops: Arc<Mutex<Vec<Op>>>,
}

impl Client {
    /// Makes one call (`target`: a VM id, or a host id for host calls; `name`: the new VM's
    /// or the host's name), records it and returns it.
    pub async fn call(&self, kind: OpKind, target: &str, name: &str, spec: Option<&VmSpec>) -> Op {
        let invoked_ms = self.history.ms();
        let mut c = ComputeClient::new(unix_channel(&self.socket).await);
        let id = target.to_string();
        let reason = "nemesis".to_string();
        let work = async {
            match kind {
                OpKind::Create => c
                    .create_vm(CreateVmRequest {
                        spec: spec.cloned(),
                        desired_state: 0,
                    })
                    .await
                    .map(|r| r.into_inner().id),
                OpKind::Delete => c
                    .delete_vm(DeleteVmRequest { id })
                    .await
                    .map(|_| target.into()),
                OpKind::Stop => c.stop_vm(StopVmRequest { id }).await.map(|_| target.into()),
                OpKind::Start => c
                    .start_vm(StartVmRequest { id })
                    .await
                    .map(|_| target.into()),
                OpKind::Cordon => c
                    .cordon_host(CordonHostRequest { id, reason })
                    .await
                    .map(|_| target.into()),
                OpKind::Uncordon => c
                    .uncordon_host(UncordonHostRequest { id })
                    .await
                    .map(|_| target.into()),
                OpKind::Drain => c
                    .drain_host(DrainHostRequest { id, reason })
                    .await
                    .map(|_| target.into()),
            }
        };
        let result = match tokio::time::timeout(CALL_TIMEOUT, work).await {
            Ok(Ok(id)) => Ok(id),
            Ok(Err(status)) => Err(format!("{:?}: {}", status.code(), status.message())),
            Err(_) => Err(format!("no answer within {CALL_TIMEOUT:?}")),
        };
        let op = Op {
            kind,
            vm: match (&result, kind) {
                (Ok(id), OpKind::Create) => id.clone(),
                (Err(_), OpKind::Create) => String::new(),
                (_, OpKind::Cordon | OpKind::Uncordon | OpKind::Drain) => String::new(),
                _ => target.to_string(),
            },
            name: if matches!(kind, OpKind::Cordon | OpKind::Uncordon | OpKind::Drain) {
                format!("{name} ({target})")
            } else {
                name.to_string()
            },
            invoked_ms,
            completed_ms: self.history.ms(),
            ok: result.is_ok(),
            error: result.err().unwrap_or_default(),
        };
        self.history.line(&format!("op {op}"));
        self.ops
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(op.clone());
        op
    }

    /// Host name → id, as the controller has them (empty while it does not answer).
    pub async fn host_ids(&self) -> HashMap<String, String> {
        let mut c = ComputeClient::new(unix_channel(&self.socket).await);
        match tokio::time::timeout(CALL_TIMEOUT, c.list_hosts(ListHostsRequest::default())).await {
            Ok(Ok(r)) => r
                .into_inner()
                .hosts
                .into_iter()
                .map(|h| (h.name, h.id))
                .collect(),
            _ => HashMap::new(),
        }
    }
}

/// Runs the workload until `stop` is set: keeps about `target_vms` VMs (`spec(name)` each),
/// which it stops, starts and deletes, and cordons, uncordons and drains `hosts` (names),
/// one host at a time. `vms` is the VMs created before (ids).
#[allow(clippy::too_many_arguments)]
pub async fn run(
    client: Client,
    mut rng: Rng,
    target_vms: usize,
    spec: impl Fn(&str) -> VmSpec,
    mut vms: Vec<String>,
    hosts: Vec<String>,
    gap_ms: (u64, u64),
    stop: Arc<AtomicBool>,
) {
    let mut created = vms.len();
    let mut cordoned: Option<(String, String)> = None;
    let mut ids: HashMap<String, String> = HashMap::new();
    while !stop.load(Ordering::SeqCst) {
        tokio::time::sleep(rng.millis(gap_ms.0, gap_ms.1)).await;
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let few = vms.len() < target_vms;
        let weights: [(OpKind, u64); 7] = [
            (OpKind::Create, if few { 40 } else { 3 }),
            (
                OpKind::Delete,
                if vms.len() > target_vms / 2 { 8 } else { 1 },
            ),
            (OpKind::Stop, 15),
            (OpKind::Start, 20),
            (OpKind::Cordon, if cordoned.is_none() { 4 } else { 0 }),
            (OpKind::Drain, if cordoned.is_none() { 4 } else { 0 }),
            (OpKind::Uncordon, if cordoned.is_some() { 10 } else { 0 }),
        ];
        let total: u64 = weights.iter().map(|(_, w)| w).sum();
        let mut pick = rng.below(total);
        let mut kind = OpKind::Start;
        for (k, w) in weights {
            if pick < w {
                kind = k;
                break;
            }
            pick -= w;
        }
        match kind {
            OpKind::Create => {
                let name = format!("nem-{created}");
                created += 1;
                let op = client
                    .call(OpKind::Create, "", &name, Some(&spec(&name)))
                    .await;
                if op.ok {
                    vms.push(op.vm);
                }
            }
            OpKind::Delete | OpKind::Stop | OpKind::Start => {
                if vms.is_empty() {
                    continue;
                }
                let i = rng.index(vms.len());
                let op = client.call(kind, &vms[i], "", None).await;
                if kind == OpKind::Delete && op.ok {
                    vms.remove(i);
                }
            }
            OpKind::Cordon | OpKind::Drain => {
                if hosts.is_empty() {
                    continue;
                }
                let name = hosts[rng.index(hosts.len())].clone();
                if !ids.contains_key(&name) {
                    ids = client.host_ids().await;
                }
                let Some(id) = ids.get(&name).cloned() else {
                    continue;
                };
                let op = client.call(kind, &id, &name, None).await;
                // Unacknowledged, it may have happened all the same: uncordon it later.
                let _ = op;
                cordoned = Some((name, id));
            }
            OpKind::Uncordon => {
                if let Some((name, id)) = cordoned.take() {
                    let op = client.call(kind, &id, &name, None).await;
                    if !op.ok {
                        cordoned = Some((name, id));
                    }
                }
            }
        }
    }
}
