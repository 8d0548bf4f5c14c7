//! `fabricctl user`, `role`, `project quota` and `audit`: who may do what, how much each
//! project may take, and what was done. Users get certificates from the CA's files locally
//! (like `pki issue --user`) and roles through the controller (BindRole).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use fabric_proto::tls::Identity;
use fabric_proto::v1::{
    AuditEntry, BindRoleRequest, GetQuotaRequest, ListAuditRequest, ListRoleBindingsRequest,
    ProjectQuota, RoleBinding, SetQuotaRequest, UnbindRoleRequest,
};
use serde_json::json;

use super::{print, print_json, reply, Clients, Output};
use crate::authz::{parse_role, role_name};

#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// Issue a client certificate for user/NAME (with the CA key of --ca-dir, locally) into
    /// --out, and bind its role through the controller.
    Create(UserCreateArgs),
}

#[derive(Debug, Args)]
pub struct UserCreateArgs {
    /// The user's name (1..=63 of a-z, 0-9, -).
    pub name: String,
    /// admin, operator or viewer.
    #[arg(long)]
    pub role: String,
    /// Bind the role in this project only (default: cluster-wide).
    #[arg(long)]
    pub project: Option<String>,
    /// Where to write ca.pem, NAME.pem and NAME-key.pem.
    #[arg(long)]
    pub out: PathBuf,
    /// The CA's directory (ca.pem, ca-key.pem) [default: --tls-dir].
    #[arg(long)]
    pub ca_dir: Option<PathBuf>,
    /// How long the certificate is valid.
    #[arg(long, default_value = "365d", value_parser = super::pki::parse_duration)]
    pub ttl: Duration,
}

#[derive(Debug, Subcommand)]
pub enum RoleCommand {
    /// Bind a role to a user, cluster-wide or in one project (replaces the user's role in
    /// that scope).
    Bind(BindingArgs),
    /// Remove a binding.
    Unbind(BindingArgs),
    /// List bindings.
    List {
        /// Only this user's.
        #[arg(long)]
        user: Option<String>,
    },
}

#[derive(Debug, Args)]
pub struct BindingArgs {
    /// The user's name.
    pub user: String,
    /// admin, operator or viewer.
    #[arg(long)]
    pub role: String,
    /// The project (default: cluster-wide).
    #[arg(long)]
    pub project: Option<String>,
}

impl BindingArgs {
    fn binding(&self) -> anyhow::Result<RoleBinding> {
        Ok(RoleBinding {
            user: self.user.clone(),
            role: parse_role(&self.role).map_err(anyhow::Error::msg)? as i32,
            project: self.project.clone().unwrap_or_default(),
        })
    }
}

#[derive(Debug, Subcommand)]
pub enum ProjectCommand {
    /// A project's quota.
    #[command(subcommand)]
    Quota(QuotaCommand),
}

#[derive(Debug, Subcommand)]
pub enum QuotaCommand {
    /// Set a project's limits (0: unlimited; all 0 removes the quota).
    Set {
        project: String,
        #[arg(long, default_value_t = 0)]
        vcpus: u32,
        #[arg(long, default_value_t = 0)]
        memory_mib: u64,
        #[arg(long, default_value_t = 0)]
        vms: u32,
    },
    /// Show a project's limits and use.
    Get { project: String },
}

#[derive(Debug, Args)]
pub struct AuditArgs {
    /// Only entries of the last DURATION (e.g. 1h, 7d).
    #[arg(long, value_parser = super::pki::parse_duration)]
    pub since: Option<Duration>,
    /// Only entries of user/NAME (or a full identity: host/NAME, local-root).
    #[arg(long)]
    pub user: Option<String>,
    /// Only entries about this project.
    #[arg(long)]
    pub project: Option<String>,
    /// Keep printing new entries as they come.
    #[arg(long)]
    pub follow: bool,
}

/// Issues the certificate of `user create` (before connecting, so a bad CA dir is reported
/// as such).
pub fn issue_user(args: &UserCreateArgs, tls_dir: Option<&PathBuf>) -> anyhow::Result<()> {
    fabric_proto::tls::check_name("user", &args.name).map_err(anyhow::Error::msg)?;
    super::pki::check_file_name(&args.name)?;
    parse_role(&args.role).map_err(anyhow::Error::msg)?;
    let ca_dir = args
        .ca_dir
        .clone()
        .or_else(|| tls_dir.cloned())
        .context("give --ca-dir (the directory of ca-key.pem)")?;
    let (ca, cluster) = super::pki::read_ca(&ca_dir)?;
    let issued = super::pki::issue(
        &ca,
        &cluster,
        &Identity::User(args.name.clone()),
        &[],
        &[],
        args.ttl,
    )?;
    super::pki::write_files(&args.out, &args.name, &ca.cert_pem, &issued)
}

fn binding_text(b: &RoleBinding) -> String {
    let role = fabric_proto::v1::Role::try_from(b.role).unwrap_or_default();
    let scope = if b.project.is_empty() {
        "cluster-wide".to_string()
    } else {
        format!("in project {}", b.project)
    };
    format!("user/{} {} {scope}", b.user, role_name(role))
}

fn binding_json(b: &RoleBinding) -> serde_json::Value {
    let role = fabric_proto::v1::Role::try_from(b.role).unwrap_or_default();
    json!({"user": b.user, "role": role_name(role), "project": b.project})
}

pub async fn user(
    clients: &mut Clients,
    command: UserCommand,
    output: Output,
) -> anyhow::Result<()> {
    match command {
        UserCommand::Create(args) => {
            let binding = BindingArgs {
                user: args.name,
                role: args.role,
                project: args.project,
            }
            .binding()?;
            let done = reply(
                clients
                    .compute
                    .bind_role(BindRoleRequest {
                        binding: Some(binding.clone()),
                    })
                    .await,
            )?;
            match output {
                Output::Json => print_json(
                    &json!({"binding": binding_json(&binding), "newly_bound": done.newly_bound}),
                ),
                Output::Table => print(&format!("{}\n", binding_text(&binding))),
            }
        }
    }
}

pub async fn role(
    clients: &mut Clients,
    command: RoleCommand,
    output: Output,
) -> anyhow::Result<()> {
    match command {
        RoleCommand::Bind(args) => {
            let binding = args.binding()?;
            let done = reply(
                clients
                    .compute
                    .bind_role(BindRoleRequest {
                        binding: Some(binding.clone()),
                    })
                    .await,
            )?;
            match output {
                Output::Json => print_json(
                    &json!({"binding": binding_json(&binding), "newly_bound": done.newly_bound}),
                ),
                Output::Table => print(&format!(
                    "{}{}\n",
                    binding_text(&binding),
                    if done.newly_bound { "" } else { " (already)" }
                )),
            }
        }
        RoleCommand::Unbind(args) => {
            let binding = args.binding()?;
            let done = reply(
                clients
                    .compute
                    .unbind_role(UnbindRoleRequest {
                        binding: Some(binding.clone()),
                    })
                    .await,
            )?;
            match output {
                Output::Json => print_json(
                    &json!({"binding": binding_json(&binding), "was_bound": done.was_bound}),
                ),
                Output::Table => print(&format!(
                    "{} {}\n",
                    binding_text(&binding),
                    if done.was_bound {
                        "removed"
                    } else {
                        "was not bound"
                    }
                )),
            }
        }
        RoleCommand::List { user } => {
            let bindings = reply(
                clients
                    .compute
                    .list_role_bindings(ListRoleBindingsRequest {
                        user: user.unwrap_or_default(),
                    })
                    .await,
            )?
            .bindings;
            match output {
                Output::Json => print_json(&bindings.iter().map(binding_json).collect()),
                Output::Table => {
                    let mut table = super::render::Table::new(&["USER", "ROLE", "PROJECT"]);
                    for b in &bindings {
                        let role = fabric_proto::v1::Role::try_from(b.role).unwrap_or_default();
                        table.row(vec![
                            b.user.clone(),
                            role_name(role).to_string(),
                            if b.project.is_empty() {
                                "*".into()
                            } else {
                                b.project.clone()
                            },
                        ]);
                    }
                    print(&table.to_string())
                }
            }
        }
    }
}

fn quota_json(q: &ProjectQuota) -> serde_json::Value {
    json!({
        "project": q.project,
        "vcpus": q.vcpus, "memory_mib": q.memory_mib, "vms": q.vms,
        "used_vcpus": q.used_vcpus, "used_memory_mib": q.used_memory_mib, "used_vms": q.used_vms,
    })
}

fn limit(value: u64) -> String {
    if value == 0 {
        "unlimited".into()
    } else {
        value.to_string()
    }
}

pub async fn project(
    clients: &mut Clients,
    command: ProjectCommand,
    output: Output,
) -> anyhow::Result<()> {
    let ProjectCommand::Quota(command) = command;
    let quota = match command {
        QuotaCommand::Set {
            project,
            vcpus,
            memory_mib,
            vms,
        } => reply(
            clients
                .compute
                .set_quota(SetQuotaRequest {
                    quota: Some(ProjectQuota {
                        project,
                        vcpus,
                        memory_mib,
                        vms,
                        ..Default::default()
                    }),
                })
                .await,
        )?,
        QuotaCommand::Get { project } => {
            reply(clients.compute.get_quota(GetQuotaRequest { project }).await)?
        }
    };
    match output {
        Output::Json => print_json(&quota_json(&quota)),
        Output::Table => print(&format!(
            "project {}: vcpus {} of {}, memory {} of {} MiB, VMs {} of {}\n",
            quota.project,
            quota.used_vcpus,
            limit(quota.vcpus.into()),
            quota.used_memory_mib,
            limit(quota.memory_mib),
            quota.used_vms,
            limit(quota.vms.into()),
        )),
    }
}

fn entry_json(e: &AuditEntry) -> serde_json::Value {
    json!({
        "sequence": e.sequence,
        "time": e.time.as_ref().map(|t| t.to_string()).unwrap_or_default(),
        "identity": e.identity,
        "roles": e.roles,
        "project": e.project,
        "rpc": e.rpc,
        "target": e.target,
        "code": super::code_name(tonic::Code::from(e.code)),
        "message": e.message,
        "request_sha256": e.request_sha256,
    })
}

fn entry_line(e: &AuditEntry) -> String {
    let time = e.time.as_ref().map(|t| t.to_string()).unwrap_or_default();
    let outcome = super::code_name(tonic::Code::from(e.code));
    let mut line = format!(
        "{:>8} {time} {} [{}] {} {} {} {outcome}",
        e.sequence,
        e.identity,
        e.roles.join(","),
        e.rpc,
        if e.project.is_empty() {
            "-"
        } else {
            &e.project
        },
        if e.target.is_empty() { "-" } else { &e.target },
    );
    if !e.message.is_empty() {
        line.push_str(": ");
        line.push_str(&e.message.replace('\n', " "));
    }
    line
}

pub async fn audit(clients: &mut Clients, args: AuditArgs, output: Output) -> anyhow::Result<()> {
    let identity = match args.user {
        Some(u) if u.contains('/') || u == "local-root" => u,
        Some(u) => format!("user/{u}"),
        None => String::new(),
    };
    let since = args
        .since
        .map(|d| prost_types::Timestamp::from(fabric_proto::clock::now() - d));
    let mut after = 0;
    let mut all = Vec::new();
    loop {
        let page = reply(
            clients
                .compute
                .list_audit(ListAuditRequest {
                    after_sequence: after,
                    since,
                    identity: identity.clone(),
                    project: args.project.clone().unwrap_or_default(),
                    page_size: crate::audit::MAX_PAGE as u32,
                })
                .await,
        )?;
        let progressed = page.last_sequence > after;
        after = after.max(page.last_sequence);
        if args.follow {
            for e in &page.entries {
                match output {
                    Output::Json => println!("{}", entry_json(e)),
                    Output::Table => println!("{}", entry_line(e)),
                }
            }
            if !progressed {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            continue;
        }
        all.extend(page.entries);
        if !progressed {
            break;
        }
    }
    match output {
        Output::Json => print_json(&all.iter().map(entry_json).collect()),
        Output::Table => {
            let text: String = all.iter().map(|e| entry_line(e) + "\n").collect();
            print(&text)
        }
    }
}
