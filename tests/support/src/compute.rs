//! What tests and benchmarks ask a controller's Compute API again and again (hosts by name,
//! a VM's status, where a set of VMs runs), and waiting until the answer is the one wanted.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use fabric_proto::v1::compute_client::ComputeClient;
use fabric_proto::v1::{
    CreateVmRequest, DesiredState, GetVmRequest, Host, HostState, ListHostsRequest, VmPhase,
    VmSpec, VmStatus,
};
use tonic::transport::Channel;
use tonic::Status;

/// Every host the controller knows.
pub async fn list_hosts(client: &ComputeClient<Channel>) -> Result<Vec<Host>, Status> {
    let mut client = client.clone();
    Ok(client
        .list_hosts(ListHostsRequest::default())
        .await?
        .into_inner()
        .hosts)
}

/// The id of the host named `name`; panics if the controller does not know it.
pub async fn host_id(client: &ComputeClient<Channel>, name: &str) -> String {
    list_hosts(client)
        .await
        .expect("ListHosts")
        .into_iter()
        .find(|h| h.name == name)
        .unwrap_or_else(|| panic!("the controller knows no host {name}"))
        .id
}

/// Creates a VM of `spec` to run (the default desired state); its id.
pub async fn create_vm(client: &ComputeClient<Channel>, spec: VmSpec) -> Result<String, Status> {
    let mut client = client.clone();
    let request = CreateVmRequest {
        spec: Some(spec),
        desired_state: DesiredState::Unspecified as i32,
    };
    Ok(client.create_vm(request).await?.into_inner().id)
}

/// VM `id`'s status; None while GetVm fails or the VM has none.
pub async fn vm_status(client: &ComputeClient<Channel>, id: &str) -> Option<VmStatus> {
    let mut client = client.clone();
    client
        .get_vm(GetVmRequest { id: id.to_string() })
        .await
        .ok()?
        .into_inner()
        .status
}

/// Where each VM of `ids` runs (VM id to host id) once every one is RUNNING; None before.
pub async fn running_placement(
    client: &ComputeClient<Channel>,
    ids: &[String],
) -> Option<HashMap<String, String>> {
    let mut placement = HashMap::new();
    for id in ids {
        let status = vm_status(client, id).await?;
        if status.phase() != VmPhase::Running {
            return None;
        }
        placement.insert(id.clone(), status.host_id);
    }
    Some(placement)
}

/// Waits until VM `id` is RUNNING on a host that `on` accepts (given its id); that host's id.
/// Panics with `what` after `timeout`.
pub async fn wait_running(
    client: &ComputeClient<Channel>,
    id: &str,
    timeout: Duration,
    what: &str,
    on: impl Fn(&str) -> bool,
) -> String {
    let on = &on;
    eventually(timeout, what, || async move {
        let status = vm_status(client, id).await?;
        (status.phase() == VmPhase::Running && !status.host_id.is_empty() && on(&status.host_id))
            .then_some(status.host_id)
    })
    .await
}

/// Waits until exactly `count` hosts are registered and every one is READY; their ids by name.
pub async fn ready_hosts(
    client: &ComputeClient<Channel>,
    count: usize,
    timeout: Duration,
) -> HashMap<String, String> {
    ready_hosts_where(client, count, timeout, |_| true).await
}

/// [`ready_hosts`], every host also passing `also` (e.g. its memory balancer reports).
pub async fn ready_hosts_where(
    client: &ComputeClient<Channel>,
    count: usize,
    timeout: Duration,
    also: impl Fn(&Host) -> bool,
) -> HashMap<String, String> {
    let also = &also;
    let what = format!("{count} hosts ready");
    eventually(timeout, &what, || async move {
        let hosts = list_hosts(client).await.ok()?;
        let ready = hosts.len() == count
            && hosts
                .iter()
                .all(|h| h.state() == HostState::Ready && also(h));
        ready.then(|| hosts.into_iter().map(|h| (h.name, h.id)).collect())
    })
    .await
}

/// Polls `check` every 50 ms until it returns Some, or panics with `what` after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
