//! The Agent service: what this host runs, for operators on the host, and the VMs' serial
//! consoles.

use std::io::SeekFrom;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use fabric_proto::v1::agent_server::Agent;
use fabric_proto::v1::stream_console_request::Start;
use fabric_proto::v1::{
    ConsoleChunk, GetLocalVmRequest, ListLocalVmsRequest, ListLocalVmsResponse, LocalVm,
    StreamConsoleRequest,
};
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::vm::VmView;
use super::Host;

/// Largest console chunk sent in one message.
const CHUNK: usize = 64 * 1024;
/// How often a followed console is checked for new output.
const FOLLOW_POLL: Duration = Duration::from_millis(200);

pub struct AgentService {
    host: Arc<Host>,
}

impl AgentService {
    pub fn new(host: Arc<Host>) -> AgentService {
        AgentService { host }
    }
}

fn local_vm(view: VmView) -> LocalVm {
    let (spec, desired_state, generation) = match &view.assignment {
        Some(a) => (a.spec.clone(), a.desired_state, a.generation),
        None => (None, 0, 0),
    };
    LocalVm {
        vm_id: view.observed.vm_id.clone(),
        spec,
        desired_state,
        generation,
        observed: Some(view.observed),
        vmm_socket_path: view
            .socket
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
    }
}

type ConsoleStream = Pin<Box<dyn Stream<Item = Result<ConsoleChunk, Status>> + Send>>;

#[tonic::async_trait]
impl Agent for AgentService {
    async fn list_local_vms(
        &self,
        _request: Request<ListLocalVmsRequest>,
    ) -> Result<Response<ListLocalVmsResponse>, Status> {
        let vms = self.host.views().into_iter().map(local_vm).collect();
        Ok(Response::new(ListLocalVmsResponse { vms }))
    }

    async fn get_local_vm(
        &self,
        request: Request<GetLocalVmRequest>,
    ) -> Result<Response<LocalVm>, Status> {
        let vm_id = request.into_inner().vm_id;
        let view = self
            .host
            .view(&vm_id)
            .ok_or_else(|| Status::not_found(format!("no VM {vm_id:?} on this host")))?;
        Ok(Response::new(local_vm(view)))
    }

    type StreamConsoleStream = ConsoleStream;

    async fn stream_console(
        &self,
        request: Request<StreamConsoleRequest>,
    ) -> Result<Response<ConsoleStream>, Status> {
        let request = request.into_inner();
        let view = self
            .host
            .view(&request.vm_id)
            .ok_or_else(|| Status::not_found(format!("no VM {:?} on this host", request.vm_id)))?;
        let path = view.console.ok_or_else(|| {
            Status::failed_precondition(format!(
                "VM {:?} has no console (simulated VM)",
                request.vm_id
            ))
        })?;
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        tokio::spawn(follow_console(path, request.start, request.follow, tx));
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

/// Sends the console file from the requested start, then (with `follow`) whatever is
/// appended, until the client goes away. A file that shrank belongs to a new VMM instance:
/// its output is sent from its beginning.
async fn follow_console(
    path: PathBuf,
    start: Option<Start>,
    follow: bool,
    tx: tokio::sync::mpsc::Sender<Result<ConsoleChunk, Status>>,
) {
    let mut offset: u64 = 0;
    let mut first = true;
    let mut buf = vec![0u8; CHUNK];
    loop {
        let len = match tokio::fs::metadata(&path).await {
            Ok(meta) => meta.len(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => {
                let _ = tx
                    .send(Err(Status::internal(format!("console: {e}"))))
                    .await;
                return;
            }
        };
        if first {
            offset = match start {
                Some(Start::Offset(o)) => o.min(len),
                Some(Start::TailBytes(n)) => len.saturating_sub(n),
                None => 0,
            };
            first = false;
        }
        if len < offset {
            offset = 0;
        }
        if len > offset {
            let mut file = match tokio::fs::File::open(&path).await {
                Ok(f) => f,
                Err(e) => {
                    let _ = tx
                        .send(Err(Status::internal(format!("console: {e}"))))
                        .await;
                    return;
                }
            };
            if file.seek(SeekFrom::Start(offset)).await.is_err() {
                return;
            }
            while offset < len {
                let want = ((len - offset) as usize).min(CHUNK);
                let n = match file.read(&mut buf[..want]).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let chunk = ConsoleChunk {
                    offset,
                    data: buf[..n].to_vec(),
                };
                if tx.send(Ok(chunk)).await.is_err() {
                    return;
                }
                offset += n as u64;
            }
        }
        if !follow {
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(FOLLOW_POLL) => {}
            _ = tx.closed() => return,
        }
    }
}

/// Who may call the agent: the controller, local-root and the users named in `admins` call
/// the Agent service (another user, or a host's certificate, is refused: one host never
/// drives another); anyone authenticated may ask its health.
pub fn agent_policy(
    path: &str,
    caller: &fabric_proto::tls::Identity,
    admins: &[String],
) -> Result<(), String> {
    use fabric_proto::tls::Identity;
    let service = path.trim_start_matches('/').split('/').next().unwrap_or("");
    let serves = || {
        if service == fabric_proto::AGENT_SERVICE || service.starts_with("grpc.reflection.") {
            Ok(())
        } else {
            Err("the agent serves the Agent service".to_string())
        }
    };
    match caller {
        Identity::Anonymous => Err("every call needs a client certificate".into()),
        _ if service == fabric_proto::HEALTH_SERVICE => Ok(()),
        Identity::LocalRoot | Identity::Controller => serves(),
        Identity::User(name) if admins.iter().any(|a| a == name) => serves(),
        Identity::User(_) => {
            Err("only the controller and the admins named in the agent's `admins` call it".into())
        }
        Identity::Host(_) => Err("a host does not call another host's agent".into()),
    }
}

#[cfg(test)]
mod policy_tests {
    use super::agent_policy;
    use fabric_proto::tls::Identity;

    #[test]
    fn only_the_controller_root_and_named_admins_call_the_agent() {
        let admins = vec!["alice".to_string()];
        let list = "/fabric.v1.Agent/ListLocalVms";
        for ok in [
            Identity::Controller,
            Identity::LocalRoot,
            Identity::User("alice".into()),
        ] {
            assert_eq!(agent_policy(list, &ok, &admins), Ok(()), "{ok}");
        }
        for refused in [Identity::User("bob".into()), Identity::Host("h2".into())] {
            assert!(agent_policy(list, &refused, &admins).is_err(), "{refused}");
        }
        assert!(agent_policy(list, &Identity::User("alice".into()), &[]).is_err());
        assert!(
            agent_policy("/fabric.v1.Compute/ListVms", &Identity::Controller, &admins).is_err()
        );
        assert_eq!(
            agent_policy(
                "/grpc.health.v1.Health/Check",
                &Identity::Host("h2".into()),
                &[]
            ),
            Ok(())
        );
    }
}
