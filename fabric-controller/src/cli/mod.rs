//! `fabricctl`, the operators' command line: a thin client of the controller's Compute and
//! Images services. This module owns the command tree, the connection to the controller, the
//! resolution of names to ids, and how failures are reported (the gRPC code name and the
//! controller's message, on one line). [`spec`] turns spec files and flags into a `VmSpec`,
//! [`render`] turns replies into tables and JSON, [`image`] uploads image files.

pub mod access;
pub mod image;
pub mod pki;
pub mod render;
pub mod spec;

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use fabric_proto::v1::compute_client::ComputeClient;
use fabric_proto::v1::images_client::ImagesClient;
use fabric_proto::v1::{
    CordonHostRequest, DeleteVmRequest, DrainHostRequest, Event, GetHostRequest, GetVmRequest,
    Host, HostState, ListHostsRequest, ListImagesRequest, ListVmsRequest, RemoveHostRequest,
    StartVmRequest, StopVmRequest, UncordonHostRequest, Vm, VmPhase, WatchEventsRequest,
};
use hyper_util::rt::TokioIo;
use serde_json::json;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

use crate::validate::{is_host_id, is_vm_id};

/// Where fabricctl looks for the controller when neither `--controller` nor
/// `FABRIC_CONTROLLER` says.
pub const DEFAULT_CONTROLLER: &str = "https://127.0.0.1:7070";
/// The environment variable that names the controller.
pub const CONTROLLER_ENV: &str = "FABRIC_CONTROLLER";
/// Largest reply accepted: a page of 5,000 VMs with long specs stays well under it.
const MAX_REPLY: usize = 64 << 20;
/// How long `events` without `--follow` waits for one more event before it stops.
const EVENTS_QUIET: Duration = Duration::from_millis(300);

#[derive(Debug, Parser)]
#[command(
    name = "fabricctl",
    version,
    about = "Operate a Fabric cluster: VMs, hosts, events and images",
    long_about = "Operate a Fabric cluster: VMs, hosts, events and images.\n\n\
        fabricctl talks to the fabric-controller's Compute and Images services. VMs and hosts \
        are named by id or by name: `vm-` or `host-` and 16 hex digits is an id (no name has \
        that form), anything else a name. Errors exit non-zero with one line: \
        `fabricctl: CODE: message`, CODE being the gRPC status (NOT_FOUND, ALREADY_EXISTS, \
        INVALID_ARGUMENT, ...)."
)]
pub struct Cli {
    /// The controller: unix:/PATH, http://HOST:PORT or HOST:PORT [env: FABRIC_CONTROLLER]
    /// [default: http://127.0.0.1:7070].
    #[arg(long, global = true, value_name = "ADDR")]
    pub controller: Option<String>,
    /// The directory of fabricctl's certificate for a TCP controller (mutual TLS): ca.pem,
    /// IDENTITY.pem and IDENTITY-key.pem [env: FABRIC_TLS_DIR]. Not needed on the Unix socket.
    #[arg(long, global = true, value_name = "DIR")]
    pub tls_dir: Option<PathBuf>,
    /// Which certificate of --tls-dir to present.
    #[arg(long, global = true, value_name = "NAME", default_value = "admin")]
    pub identity: String,
    /// Output: human tables, or JSON for scripts (one document; one object per line for
    /// `events --follow`).
    #[arg(short, long, global = true, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    #[command(subcommand)]
    pub command: Command,
}

/// The output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create, inspect, start, stop and delete VMs.
    #[command(subcommand)]
    Vm(VmCommand),
    /// Inspect hosts; cordon, uncordon and drain them.
    #[command(subcommand)]
    Host(HostCommand),
    /// Show the cluster's event feed (VM and host changes).
    Events(EventsArgs),
    /// Show memory per host and per VM: budgets, targets, demand, balloons, pressure.
    #[command(long_about = TOP_HELP)]
    Top(TopArgs),
    /// Push and list images (kernels, initramfs, disk images).
    #[command(subcommand)]
    Image(ImageCommand),
    /// The cluster's certificate authority and certificates (files only; no controller).
    #[command(subcommand)]
    Pki(pki::PkiCommand),
    /// Users: a certificate and a role in one step.
    #[command(subcommand)]
    User(access::UserCommand),
    /// Role bindings: admin, operator or viewer, cluster-wide or per project.
    #[command(subcommand)]
    Role(access::RoleCommand),
    /// Projects: quotas.
    #[command(subcommand)]
    Project(access::ProjectCommand),
    /// The audit log: mutating calls and refused calls.
    Audit(access::AuditArgs),
}

#[derive(Debug, Subcommand)]
pub enum VmCommand {
    /// Create a VM from a spec file or from flags.
    #[command(long_about = spec::SPEC_HELP)]
    Create(Box<spec::CreateArgs>),
    /// Show one VM in detail.
    Get {
        /// VM id (vm- and 16 hex digits) or name.
        vm: String,
    },
    /// List VMs.
    List {
        /// Only VMs assigned to this host (id or name).
        #[arg(long)]
        host: Option<String>,
        /// Only VMs in this phase: pending, scheduled, starting, running, stopping, stopped,
        /// failed or lost.
        #[arg(long, value_parser = parse_vm_phase)]
        phase: Option<VmPhase>,
        /// Only the VM with this name.
        #[arg(long)]
        name: Option<String>,
    },
    /// Delete a VM: it is stopped on its host, then forgotten.
    Delete {
        /// VM id (vm- and 16 hex digits) or name.
        vm: String,
    },
    /// Set a VM's desired state to running.
    Start {
        /// VM id (vm- and 16 hex digits) or name.
        vm: String,
    },
    /// Set a VM's desired state to stopped (graceful shutdown, then forced).
    Stop {
        /// VM id (vm- and 16 hex digits) or name.
        vm: String,
    },
}

/// `fabricctl host token ...`
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Make a one-time join token for host NAME and print it (once: the controller keeps
    /// only its hash). The agent of NAME presents it on its first start (join_token_file)
    /// and gets the certificate of host/NAME.
    Create {
        /// The host the token is for.
        #[arg(long)]
        name: String,
        /// How long the token may be used: 90s, 15m, 1h, 7d (at most 7 days).
        #[arg(long, default_value = "1h", value_parser = pki::parse_duration)]
        ttl: std::time::Duration,
    },
    /// List the join tokens not yet expired (never their secrets).
    List,
}

#[derive(Debug, Subcommand)]
pub enum HostCommand {
    /// List hosts. CPUS and MEMORY(MiB) are allocated/allocatable; VMS counts running VMs.
    List {
        /// Only hosts in this zone.
        #[arg(long)]
        zone: Option<String>,
        /// Only hosts in this state: ready, suspect, dead, cordoned or draining.
        #[arg(long, value_parser = parse_host_state)]
        state: Option<HostState>,
    },
    /// Show one host in detail.
    Get {
        /// Host id (host- and 16 hex digits) or name.
        host: String,
    },
    /// Place no new VM on a host; its VMs keep running.
    Cordon {
        /// Host id (host- and 16 hex digits) or name.
        host: String,
        /// Why, for other operators (e.g. "RMA ticket 1234").
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Make a cordoned or draining host schedulable again.
    Uncordon {
        /// Host id (host- and 16 hex digits) or name.
        host: String,
    },
    /// Forget a host retired for good: it must be DEAD (its agent stopped for longer than
    /// the lease and the fencing margin) and hold no VM.
    Remove {
        /// Host id (host- and 16 hex digits) or name.
        host: String,
    },
    /// Refuse the identity host/NAME from now on (a stolen or retired certificate): its
    /// agent's calls are refused, its lease ends, it fences itself, and once it is DEAD its
    /// VMs run elsewhere. It cannot register again until `host reinstate NAME`.
    Revoke {
        /// The host's name (its certificate's host/NAME).
        name: String,
        /// Why, for other operators and the event log.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Accept the identity host/NAME again.
    Reinstate {
        /// The host's name.
        name: String,
    },
    /// One-time tokens with which new hosts join (get their certificate).
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Cordon a host and move its VMs to other hosts.
    Drain {
        /// Host id (host- and 16 hex digits) or name.
        host: String,
        /// Why, for other operators (e.g. "kernel upgrade").
        #[arg(long, default_value = "")]
        reason: String,
    },
}

#[derive(Debug, Args)]
pub struct EventsArgs {
    /// Keep streaming new events until interrupted.
    #[arg(short, long)]
    pub follow: bool,
    /// Start after this sequence number (0: only events from now on). Default: every event
    /// the controller retains.
    #[arg(long, value_name = "N")]
    pub since: Option<u64>,
    /// Only events about this VM (id or name).
    #[arg(long)]
    pub vm: Option<String>,
    /// Only events about this host and its VMs (id or name).
    #[arg(long)]
    pub host: Option<String>,
}

/// `fabricctl top --help`.
const TOP_HELP: &str = "Show memory per host and per VM, as each host's memory balancer last \
reported it (every heartbeat).

Hosts: BUDGET is the memory the host's VMs may use in all; ASSIGNED what the balancer gives \
them (the sum of their targets); WANTED what they would take without sharing (demand plus \
buffer, within minimum and maximum); DEMAND the memory in use in the guests; SHORT whether \
WANTED exceeds BUDGET (then memory above the minimums is shared by weight, and a host short \
for longer than the controller's --memory-relief-window has a VM moved to the host with the \
most room); PRESSURED the VMs under memory pressure. All in MiB; - where the host reports no \
balance.

VMs (those placed on a host): MIN-MAX from the spec, TARGET the memory the balancer gives the \
guest, DEMAND its memory in use, BALLOON what the balloon holds back now, PRESSURE whether it \
is under memory pressure, REASON why its balloon is where it is.";

#[derive(Debug, Args)]
pub struct TopArgs {
    /// Only this host and its VMs (id or name).
    #[arg(long)]
    pub host: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Upload image files under a name, in 1 MiB chunks.
    #[command(long_about = image::PUSH_HELP)]
    Push {
        /// Files, or directories laid out like images/out of images/build.sh.
        #[arg(required = true, value_name = "DIR_OR_FILE")]
        paths: Vec<PathBuf>,
        /// Name of the image: 1..=63 lowercase letters, digits, '.', '_' and '-'.
        #[arg(long)]
        name: String,
        /// Role of a file (required for files; directories name their roles).
        #[arg(long, value_enum)]
        role: Option<image::Role>,
        /// Project a new image belongs to (default: yours when you operate in one project
        /// only; cluster-wide for a cluster-wide operator). An existing image keeps its own.
        #[arg(long)]
        project: Option<String>,
    },
    /// List images and their files.
    List {
        /// Only the image with this name.
        #[arg(long)]
        name: Option<String>,
    },
    /// Forget an image; files no image and no VM refers to any more are removed.
    Delete {
        /// Name of the image.
        name: String,
    },
}

/// A failed RPC, shown as the gRPC code name and the controller's message on one line
/// (`ALREADY_EXISTS: a VM named "web" already exists`).
#[derive(Debug, thiserror::Error)]
#[error("{}: {}", code_name(.0.code()), .0.message().replace('\n', " "))]
pub struct RpcError(pub Status);

/// The canonical gRPC name of a status code.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// An error as fabricctl's one line: its causes joined by `: `, without the repetitions of
/// transport errors that carry their cause's text in their own (`tcp connect error: tcp
/// connect error: Connection refused`).
pub fn error_line(error: &anyhow::Error) -> String {
    let causes: Vec<String> = error
        .chain()
        .map(|cause| cause.to_string().replace('\n', " "))
        .collect();
    let mut kept: Vec<&str> = Vec::new();
    for (i, cause) in causes.iter().enumerate() {
        let repeated_later = causes[i + 1..]
            .iter()
            .any(|later| later.contains(cause.as_str()));
        let said_before = kept
            .last()
            .is_some_and(|last| last.ends_with(cause.as_str()));
        if !repeated_later && !said_before {
            kept.push(cause);
        }
    }
    kept.join(": ")
}

/// Unwraps a unary reply, or turns its status into an [`RpcError`].
fn reply<T>(result: Result<tonic::Response<T>, Status>) -> anyhow::Result<T> {
    result
        .map(tonic::Response::into_inner)
        .map_err(|s| RpcError(s).into())
}

fn parse_vm_phase(name: &str) -> Result<VmPhase, String> {
    VmPhase::from_str_name(&format!("VM_PHASE_{}", name.to_ascii_uppercase()))
        .filter(|p| *p != VmPhase::Unspecified)
        .ok_or_else(|| {
            "one of pending, scheduled, starting, running, stopping, stopped, failed, lost"
                .to_string()
        })
}

fn parse_host_state(name: &str) -> Result<HostState, String> {
    HostState::from_str_name(&format!("HOST_STATE_{}", name.to_ascii_uppercase()))
        .filter(|s| *s != HostState::Unspecified)
        .ok_or_else(|| "one of ready, suspect, dead, cordoned, draining".to_string())
}

/// The environment variable of `--tls-dir`.
pub const TLS_DIR_ENV: &str = "FABRIC_TLS_DIR";

/// Opens a channel to the controller at `address`: `unix:/PATH` (also `unix:///PATH`), or
/// `https://HOST:PORT` (or a bare `HOST:PORT`) with mutual TLS, presenting `tls`'s
/// certificate. A TCP address without `tls` is refused: the controller serves no plain TCP.
pub async fn connect(
    address: &str,
    tls: Option<&fabric_proto::tls::TlsFiles>,
) -> anyhow::Result<Channel> {
    let timeout = Duration::from_secs(10);
    let channel = if let Some(path) = address.strip_prefix("unix:") {
        let path = PathBuf::from(path.strip_prefix("//").unwrap_or(path));
        // The URI is required by the API but unused: the connector dials the socket.
        let endpoint = Endpoint::from_static("http://fabric-controller.invalid");
        tokio::time::timeout(
            timeout,
            endpoint.connect_with_connector(tower::service_fn(move |_| {
                let path = path.clone();
                async move {
                    let stream = tokio::net::UnixStream::connect(path).await?;
                    Ok::<_, std::io::Error>(TokioIo::new(stream))
                }
            })),
        )
        .await
        .map_err(|_| anyhow::anyhow!("timed out after {timeout:?}"))
        .and_then(|r| r.map_err(anyhow::Error::from))
    } else {
        let rest = address
            .strip_prefix("https://")
            .or_else(|| address.strip_prefix("http://"))
            .unwrap_or(address);
        let Some(files) = tls else {
            anyhow::bail!(
                "{address}: a TCP controller needs a client certificate: give --tls-dir (or {TLS_DIR_ENV})"
            );
        };
        let config = files.client_config().map_err(anyhow::Error::msg)?;
        match Endpoint::from_shared(format!("https://{rest}")) {
            Ok(endpoint) => match endpoint.tls_config(config) {
                Ok(endpoint) => endpoint
                    .connect_timeout(timeout)
                    .connect()
                    .await
                    .map_err(anyhow::Error::from),
                Err(e) => Err(anyhow::Error::from(e)),
            },
            Err(e) => Err(anyhow::Error::from(e)),
        }
    };
    channel.with_context(|| format!("cannot reach the controller at {address}"))
}

/// The two services fabricctl talks to, over one connection.
pub struct Clients {
    pub compute: ComputeClient<Channel>,
    pub images: ImagesClient<Channel>,
}

impl Clients {
    pub fn new(channel: Channel) -> Clients {
        Clients {
            compute: ComputeClient::new(channel.clone()).max_decoding_message_size(MAX_REPLY),
            images: ImagesClient::new(channel).max_decoding_message_size(MAX_REPLY),
        }
    }

    /// The VM with this id or name: an argument of the form of a VM id (`vm-` and 16 hex
    /// digits, a form no name may have) is an id, anything else a name.
    pub async fn find_vm(&mut self, id_or_name: &str) -> anyhow::Result<Vm> {
        if is_vm_id(id_or_name) {
            return reply(
                self.compute
                    .get_vm(GetVmRequest {
                        id: id_or_name.to_string(),
                    })
                    .await,
            );
        }
        self.vm_named(id_or_name).await?.ok_or_else(|| {
            RpcError(Status::not_found(format!("no VM named {id_or_name:?}"))).into()
        })
    }

    async fn vm_named(&mut self, name: &str) -> anyhow::Result<Option<Vm>> {
        let page = reply(
            self.compute
                .list_vms(ListVmsRequest {
                    name: name.to_string(),
                    ..Default::default()
                })
                .await,
        )?;
        Ok(page.vms.into_iter().next())
    }

    /// The id of the VM with this id or name; ids are taken as they are, so that filters also
    /// work for deleted VMs.
    async fn vm_id(&mut self, id_or_name: &str) -> anyhow::Result<String> {
        if is_vm_id(id_or_name) {
            return Ok(id_or_name.to_string());
        }
        Ok(self.find_vm(id_or_name).await?.id)
    }

    /// Every VM that matches the filter, following the pages.
    pub async fn list_vms(&mut self, filter: ListVmsRequest) -> anyhow::Result<Vec<Vm>> {
        let mut vms = Vec::new();
        let mut request = filter;
        loop {
            let page = reply(self.compute.list_vms(request.clone()).await)?;
            vms.extend(page.vms);
            if page.next_page_token.is_empty() {
                return Ok(vms);
            }
            request.page_token = page.next_page_token;
        }
    }

    /// Every host that matches the filter, following the pages.
    pub async fn list_hosts(&mut self, filter: ListHostsRequest) -> anyhow::Result<Vec<Host>> {
        let mut hosts = Vec::new();
        let mut request = filter;
        loop {
            let page = reply(self.compute.list_hosts(request.clone()).await)?;
            hosts.extend(page.hosts);
            if page.next_page_token.is_empty() {
                return Ok(hosts);
            }
            request.page_token = page.next_page_token;
        }
    }

    /// The host with this id or name: an argument of the form of a host id (`host-` and 16
    /// hex digits, a form no name may have) is an id, anything else a name.
    pub async fn find_host(&mut self, id_or_name: &str) -> anyhow::Result<Host> {
        if is_host_id(id_or_name) {
            return reply(
                self.compute
                    .get_host(GetHostRequest {
                        id: id_or_name.to_string(),
                    })
                    .await,
            );
        }
        let mut named: Vec<Host> = self
            .list_hosts(ListHostsRequest::default())
            .await?
            .into_iter()
            .filter(|h| h.name == id_or_name)
            .collect();
        match named.len() {
            0 => Err(RpcError(Status::not_found(format!("no host named {id_or_name:?}"))).into()),
            1 => Ok(named.remove(0)),
            // Names are unique since RegisterHost refuses a taken one; hosts registered before
            // that may still share one.
            _ => {
                let ids: Vec<&str> = named.iter().map(|h| h.id.as_str()).collect();
                Err(RpcError(Status::failed_precondition(format!(
                    "{} hosts are named {id_or_name:?} ({}): give an id",
                    ids.len(),
                    ids.join(", ")
                )))
                .into())
            }
        }
    }

    /// The id of the host with this id or name; ids are taken as they are.
    async fn host_id(&mut self, id_or_name: &str) -> anyhow::Result<String> {
        if is_host_id(id_or_name) {
            return Ok(id_or_name.to_string());
        }
        Ok(self.find_host(id_or_name).await?.id)
    }
}

/// Writes to stdout; a closed pipe (`fabricctl vm list | head -1`) ends the output quietly.
fn print(text: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e).context("stdout"),
        _ => Ok(()),
    }
}

fn print_json(value: &serde_json::Value) -> anyhow::Result<()> {
    print(&format!("{}\n", serde_json::to_string_pretty(value)?))
}

/// The address fabricctl uses: the flag, else the environment, else the default.
pub fn controller_address(flag: Option<&str>) -> String {
    match flag {
        Some(address) => address.to_string(),
        None => std::env::var(CONTROLLER_ENV)
            .ok()
            .filter(|a| !a.is_empty())
            .unwrap_or_else(|| DEFAULT_CONTROLLER.to_string()),
    }
}

/// Runs one command.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let output = cli.output;
    // Spec files and image paths are checked before connecting, so that a typo is reported
    // as such even when the controller is down.
    let create = match &cli.command {
        Command::Vm(VmCommand::Create(args)) => Some(args.request()?),
        _ => None,
    };
    let push = match &cli.command {
        Command::Image(ImageCommand::Push { paths, role, .. }) => Some(image::plan(paths, *role)?),
        _ => None,
    };
    let command = match cli.command {
        Command::Pki(command) => return pki::run(command),
        command => command,
    };
    let tls_dir = cli.tls_dir.clone().or_else(|| {
        std::env::var_os(TLS_DIR_ENV)
            .filter(|d| !d.is_empty())
            .map(PathBuf::from)
    });
    if let Command::User(access::UserCommand::Create(args)) = &command {
        access::issue_user(args, tls_dir.as_ref())?;
    }
    let tls = tls_dir.map(|dir| fabric_proto::tls::TlsFiles::in_dir(&dir, &cli.identity));
    let channel = connect(&controller_address(cli.controller.as_deref()), tls.as_ref()).await?;
    let mut clients = Clients::new(channel);
    match command {
        Command::Pki(_) => unreachable!("answered above"),
        Command::Vm(command) => vm(&mut clients, command, create, output).await,
        Command::Host(command) => host(&mut clients, command, output).await,
        Command::Events(args) => events(&mut clients, args, output).await,
        Command::Top(args) => top(&mut clients, args, output).await,
        Command::User(command) => access::user(&mut clients, command, output).await,
        Command::Role(command) => access::role(&mut clients, command, output).await,
        Command::Project(command) => access::project(&mut clients, command, output).await,
        Command::Audit(args) => access::audit(&mut clients, args, output).await,
        Command::Image(ImageCommand::Push { name, project, .. }) => {
            let files = push.unwrap_or_default();
            let project = project.unwrap_or_default();
            let (image, pushed) = image::push(&mut clients.images, &name, &project, &files).await?;
            match output {
                Output::Json => print_json(&json!({
                    "image": render::image_json(&image),
                    "pushed": pushed.iter().map(render::pushed_json).collect::<Vec<_>>(),
                })),
                Output::Table => print(&render::pushed_table(&name, &pushed).to_string()),
            }
        }
        Command::Image(ImageCommand::Delete { name }) => {
            let deleted = reply(
                clients
                    .images
                    .delete_image(fabric_proto::v1::DeleteImageRequest { name: name.clone() })
                    .await,
            )?;
            match output {
                Output::Json => print_json(&json!({
                    "deleted": name,
                    "removed_sha256": deleted.removed_sha256,
                    "freed_bytes": deleted.freed_bytes,
                })),
                Output::Table => print(&format!(
                    "image {name} deleted; {} files removed ({} bytes freed)\n",
                    deleted.removed_sha256.len(),
                    deleted.freed_bytes
                )),
            }
        }
        Command::Image(ImageCommand::List { name }) => {
            let images = reply(
                clients
                    .images
                    .list_images(ListImagesRequest {
                        name: name.unwrap_or_default(),
                    })
                    .await,
            )?
            .images;
            match output {
                Output::Json => print_json(&images.iter().map(render::image_json).collect()),
                Output::Table => print(&render::images_table(&images).to_string()),
            }
        }
    }
}

/// Prints VMs as a table or a JSON document (`one` selects an object over an array).
fn print_vms(vms: &[Vm], one: bool, output: Output) -> anyhow::Result<()> {
    match output {
        Output::Json if one => print_json(&vms.first().map(render::vm_json).unwrap_or_default()),
        Output::Json => print_json(&vms.iter().map(render::vm_json).collect()),
        Output::Table => print(&render::vms_table(vms).to_string()),
    }
}

fn print_hosts(hosts: &[Host], one: bool, output: Output) -> anyhow::Result<()> {
    match output {
        Output::Json if one => {
            print_json(&hosts.first().map(render::host_json).unwrap_or_default())
        }
        Output::Json => print_json(&hosts.iter().map(render::host_json).collect()),
        Output::Table => print(&render::hosts_table(hosts).to_string()),
    }
}

async fn vm(
    clients: &mut Clients,
    command: VmCommand,
    create: Option<fabric_proto::v1::CreateVmRequest>,
    output: Output,
) -> anyhow::Result<()> {
    match command {
        VmCommand::Create(_) => {
            let request = create.context("no create request")?;
            let vm = reply(clients.compute.create_vm(request).await)?;
            print_vms(&[vm], true, output)
        }
        VmCommand::Get { vm } => {
            let vm = clients.find_vm(&vm).await?;
            match output {
                Output::Json => print_json(&render::vm_json(&vm)),
                Output::Table => print(&render::vm_details(&vm)),
            }
        }
        VmCommand::List { host, phase, name } => {
            let host_id = match host {
                Some(host) => clients.host_id(&host).await?,
                None => String::new(),
            };
            let vms = clients
                .list_vms(ListVmsRequest {
                    host_id,
                    name: name.unwrap_or_default(),
                    phase: phase.map_or(0, |p| p as i32),
                    ..Default::default()
                })
                .await?;
            print_vms(&vms, false, output)
        }
        VmCommand::Delete { vm } => {
            let vm = clients.find_vm(&vm).await?;
            reply(
                clients
                    .compute
                    .delete_vm(DeleteVmRequest { id: vm.id.clone() })
                    .await,
            )?;
            let name = vm.spec.map(|s| s.name).unwrap_or_default();
            match output {
                Output::Json => print_json(&json!({"id": vm.id, "name": name, "deleted": true})),
                Output::Table => print(&format!("vm {} ({name}) deleted\n", vm.id)),
            }
        }
        VmCommand::Start { vm } => {
            let id = clients.find_vm(&vm).await?.id;
            let vm = reply(clients.compute.start_vm(StartVmRequest { id }).await)?;
            print_vms(&[vm], true, output)
        }
        VmCommand::Stop { vm } => {
            let id = clients.find_vm(&vm).await?.id;
            let vm = reply(clients.compute.stop_vm(StopVmRequest { id }).await)?;
            print_vms(&[vm], true, output)
        }
    }
}

async fn host(clients: &mut Clients, command: HostCommand, output: Output) -> anyhow::Result<()> {
    let host = match command {
        HostCommand::List { zone, state } => {
            let hosts = clients
                .list_hosts(ListHostsRequest {
                    zone: zone.unwrap_or_default(),
                    state: state.map_or(0, |s| s as i32),
                    ..Default::default()
                })
                .await?;
            return print_hosts(&hosts, false, output);
        }
        HostCommand::Get { host } => {
            let host = clients.find_host(&host).await?;
            return match output {
                Output::Json => print_json(&render::host_json(&host)),
                Output::Table => print(&render::host_details(&host)),
            };
        }
        HostCommand::Cordon { host, reason } => {
            let id = clients.host_id(&host).await?;
            reply(
                clients
                    .compute
                    .cordon_host(CordonHostRequest { id, reason })
                    .await,
            )?
        }
        HostCommand::Uncordon { host } => {
            let id = clients.host_id(&host).await?;
            reply(
                clients
                    .compute
                    .uncordon_host(UncordonHostRequest { id })
                    .await,
            )?
        }
        HostCommand::Revoke { name, reason } => {
            let response = reply(
                clients
                    .compute
                    .revoke_host(fabric_proto::v1::RevokeHostRequest {
                        name: name.clone(),
                        reason,
                    })
                    .await,
            )?;
            return match output {
                Output::Json => {
                    print_json(&json!({ "revoked": name, "newly_revoked": response.newly_revoked }))
                }
                Output::Table if response.newly_revoked => print(&format!("host/{name} revoked\n")),
                Output::Table => print(&format!("host/{name} was revoked already\n")),
            };
        }
        HostCommand::Token {
            command: TokenCommand::Create { name, ttl },
        } => {
            let response = reply(
                clients
                    .compute
                    .create_join_token(fabric_proto::v1::CreateJoinTokenRequest {
                        host_name: name.clone(),
                        ttl_seconds: ttl.as_secs(),
                    })
                    .await,
            )?;
            let info = response.info.unwrap_or_default();
            return match output {
                Output::Json => print_json(&json!({
                    "token": response.token,
                    "id": info.id,
                    "host_name": info.host_name,
                    "expires_at": info.expires_at.map(|t| t.to_string()),
                })),
                // The token alone on stdout, for `TOKEN=$(fabricctl host token create ...)`.
                Output::Table => {
                    eprintln!(
                        "join token {} for host {name}, valid until {}; shown only now",
                        info.id,
                        info.expires_at.map(|t| t.to_string()).unwrap_or_default()
                    );
                    print(&format!("{}\n", response.token))
                }
            };
        }
        HostCommand::Token {
            command: TokenCommand::List,
        } => {
            let tokens = reply(
                clients
                    .compute
                    .list_join_tokens(fabric_proto::v1::ListJoinTokensRequest {})
                    .await,
            )?
            .tokens;
            let time = |t: &Option<prost_types::Timestamp>| {
                t.map(|t| t.to_string()).unwrap_or_else(|| "-".into())
            };
            return match output {
                Output::Json => print_json(
                    &tokens
                        .iter()
                        .map(|t| {
                            json!({
                                "id": t.id,
                                "host_name": t.host_name,
                                "expires_at": time(&t.expires_at),
                                "used_at": t.used_at.map(|u| u.to_string()),
                                "created_by": t.created_by,
                            })
                        })
                        .collect(),
                ),
                Output::Table => {
                    let mut text = format!(
                        "{:<16}  {:<24}  {:<20}  {:<20}  {}\n",
                        "ID", "HOST", "EXPIRES", "USED", "CREATED BY"
                    );
                    for t in &tokens {
                        text.push_str(&format!(
                            "{:<16}  {:<24}  {:<20}  {:<20}  {}\n",
                            t.id,
                            t.host_name,
                            time(&t.expires_at),
                            time(&t.used_at),
                            t.created_by
                        ));
                    }
                    print(&text)
                }
            };
        }
        HostCommand::Reinstate { name } => {
            let response = reply(
                clients
                    .compute
                    .reinstate_host(fabric_proto::v1::ReinstateHostRequest { name: name.clone() })
                    .await,
            )?;
            return match output {
                Output::Json => {
                    print_json(&json!({ "reinstated": name, "was_revoked": response.was_revoked }))
                }
                Output::Table if response.was_revoked => {
                    print(&format!("host/{name} reinstated\n"))
                }
                Output::Table => print(&format!("host/{name} was not revoked\n")),
            };
        }
        HostCommand::Remove { host } => {
            let id = clients.host_id(&host).await?;
            reply(
                clients
                    .compute
                    .remove_host(RemoveHostRequest { id: id.clone() })
                    .await,
            )?;
            return match output {
                Output::Json => print_json(&json!({ "removed": id })),
                Output::Table => print(&format!("host {id} removed\n")),
            };
        }
        HostCommand::Drain { host, reason } => {
            let id = clients.host_id(&host).await?;
            reply(
                clients
                    .compute
                    .drain_host(DrainHostRequest { id, reason })
                    .await,
            )?
        }
    };
    print_hosts(&[host], true, output)
}

async fn top(clients: &mut Clients, args: TopArgs, output: Output) -> anyhow::Result<()> {
    let hosts = match &args.host {
        Some(host) => vec![clients.find_host(host).await?],
        None => clients.list_hosts(ListHostsRequest::default()).await?,
    };
    let host_id = match (&args.host, hosts.first()) {
        (Some(_), Some(host)) => host.id.clone(),
        _ => String::new(),
    };
    let vms = clients
        .list_vms(ListVmsRequest {
            host_id,
            ..Default::default()
        })
        .await?;
    let top = render::Top::new(&hosts, &vms);
    match output {
        Output::Json => print_json(&top.json()),
        Output::Table => print(&top.to_string()),
    }
}

async fn events(clients: &mut Clients, args: EventsArgs, output: Output) -> anyhow::Result<()> {
    let vm_id = match &args.vm {
        Some(vm) => clients.vm_id(vm).await?,
        None => String::new(),
    };
    let host_id = match &args.host {
        Some(host) => clients.host_id(host).await?,
        None => String::new(),
    };
    // Sequence numbers are positive and 0 asks for new events only, so 1 is the earliest
    // point the API can name: everything retained.
    let since_sequence = args.since.unwrap_or(1);
    let mut stream = reply(
        clients
            .compute
            .watch_events(WatchEventsRequest {
                since_sequence,
                vm_id,
                host_id,
            })
            .await,
    )?;
    if args.follow {
        if output == Output::Table {
            print(&render::event_stream_row(None))?;
        }
        while let Some(event) = stream.message().await.map_err(RpcError)? {
            match output {
                Output::Json => print(&format!("{}\n", render::event_json(&event)))?,
                Output::Table => print(&render::event_stream_row(Some(&event)))?,
            }
        }
        return Ok(());
    }
    let mut seen: Vec<Event> = Vec::new();
    // The stream never ends by itself: what the controller retains arrives at once, so a
    // quiet spell means the backlog is over.
    while let Ok(next) = tokio::time::timeout(EVENTS_QUIET, stream.message()).await {
        match next.map_err(RpcError)? {
            Some(event) => seen.push(event),
            None => break,
        }
    }
    match output {
        Output::Json => print_json(&seen.iter().map(render::event_json).collect()),
        Output::Table => print(&render::events_table(&seen).to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_one_line_without_repetitions() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "No such file (os error 2)");
        let error = anyhow::Error::new(io)
            .context("transport error")
            .context("cannot reach the controller at unix:/x");
        assert_eq!(
            error_line(&error),
            "cannot reach the controller at unix:/x: transport error: No such file (os error 2)"
        );
        let error = anyhow::anyhow!("tcp connect error: refused")
            .context("tcp connect error")
            .context("cannot reach");
        assert_eq!(
            error_line(&error),
            "cannot reach: tcp connect error: refused"
        );
        let error = anyhow::Error::new(RpcError(Status::already_exists(
            "a VM named \"web\"\nexists",
        )));
        assert_eq!(
            error_line(&error),
            "ALREADY_EXISTS: a VM named \"web\" exists"
        );
    }
}
