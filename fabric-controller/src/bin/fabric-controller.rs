//! fabric-controller: the Fabric control plane. Serves Compute (operators), HostLink (agents)
//! and Images on one address, keeps its state in a redb file in the data directory, and runs
//! the reconciler that places and heals VMs.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use fabric_controller::controller::{Controller, Settings};
use fabric_controller::images::ImageStore;
use fabric_controller::reconcile::Reconciler;
use fabric_controller::store::redb::RedbStore;
use tokio::signal::unix::{signal, SignalKind};

/// The longest --host-cert-ttl.
const MAX_HOST_CERT_TTL: Duration = Duration::from_secs(365 * 86_400);

#[derive(Debug, Parser)]
#[command(name = "fabric-controller", version, about = "The Fabric controller")]
struct Args {
    /// Where to serve: HOST:PORT (mutual TLS, with --tls-dir) or unix:/PATH (root only, for
    /// local administration). Repeatable (e.g. a TCP address for agents and operators and a
    /// Unix socket on the machine).
    #[arg(long, default_values_t = ["0.0.0.0:7070".to_string()])]
    listen: Vec<String>,
    /// The controller's certificate: a directory with ca.pem, controller.pem and
    /// controller-key.pem (`fabricctl pki init` makes one). Every TCP listener needs it: the
    /// controller serves no plain TCP. controller.pem is read again when it changes.
    /// With ca-key.pem there too (where `fabricctl pki init` writes it), the controller signs
    /// the certificates of hosts that join with a token and renews them; without it, those
    /// calls are refused (FAILED_PRECONDITION).
    #[arg(long, value_name = "DIR")]
    tls_dir: Option<PathBuf>,
    /// How long the certificates the controller issues to hosts (join, renewal) are valid:
    /// 90s, 15m, 24h, 7d; at most 365d. Agents renew theirs at two thirds of it.
    #[arg(long, default_value = "24h", value_parser = fabric_controller::cli::pki::parse_duration, value_name = "DURATION")]
    host_cert_ttl: Duration,
    /// The store file and image blobs live here.
    #[arg(long, default_value = "/var/lib/fabric-controller")]
    data_dir: PathBuf,
    /// Lease granted to hosts by each heartbeat, seconds.
    #[arg(long, default_value_t = 10.0)]
    lease_ttl: f64,
    /// How often agents heartbeat, seconds.
    #[arg(long, default_value_t = 1.0)]
    heartbeat_interval: f64,
    /// Time after a host's lease expired before it is DEAD and its VMs are placed elsewhere,
    /// seconds (covers the agent stopping its VMs when its own lease view expires).
    #[arg(long, default_value_t = 5.0)]
    fencing_margin: f64,
    /// vCPUs placed per host CPU.
    #[arg(long, default_value_t = 4.0)]
    cpu_overcommit: f64,
    /// Memory relief: a host whose VMs have wanted more memory than its budget for this long
    /// (its balancer reports it short) has one VM moved to the host with the most room (stopped
    /// there and started on the other host); after a move, the host must stay short for this
    /// long again before the next. Seconds; 0 turns memory relief off. The default, 30 s, is ten
    /// times the balancer's 3 s pressure hold: a burst that sharing by weight carries moves
    /// nothing, a lasting over-commitment is relieved within a minute.
    #[arg(long, default_value_t = 30.0, value_name = "SECS")]
    memory_relief_window: f64,
    /// Most space image files may take in the data directory, MiB; a push beyond it is refused
    /// (RESOURCE_EXHAUSTED) and takes nothing.
    #[arg(long, default_value_t = 256 * 1024, value_name = "MIB")]
    image_quota_mib: u64,
    /// Most audit entries kept of each kind (changes; refused or failed calls); each new
    /// entry beyond it deletes the oldest of its kind.
    #[arg(long, default_value_t = fabric_controller::audit::DEFAULT_RETENTION_ENTRIES, value_name = "N")]
    audit_retention_entries: usize,
    /// Oldest audit entries kept, days.
    #[arg(long, default_value_t = 90, value_name = "DAYS")]
    audit_retention_days: u64,
    /// Binds the admin role cluster-wide to user/NAME at the first start with this flag for
    /// NAME (the store remembers; a later `role unbind` stands across restarts): how the first
    /// admin, made by `fabricctl pki init --admin NAME`, gets its role. Repeatable.
    #[arg(long, value_name = "NAME")]
    bootstrap_admin: Vec<String>,
}

fn seconds(name: &str, value: f64) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(value)
        .ok()
        .filter(|d| !d.is_zero())
        .with_context(|| format!("--{name} {value}: a positive number of seconds"))
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FABRIC_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let args = Args::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("fabric-controller: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fabric-controller: {e:#}");
            ExitCode::from(1)
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    if let Some(path) = fabric_proto::clock::test_offset_file() {
        tracing::warn!(
            file = %path.display(),
            "{} is set: the wall clock is moved by a TEST-ONLY offset; never set it in production",
            fabric_proto::clock::TEST_OFFSET_ENV
        );
    }
    let settings = Settings {
        data_dir: args.data_dir.clone(),
        lease_ttl: seconds("lease-ttl", args.lease_ttl)?,
        heartbeat_interval: seconds("heartbeat-interval", args.heartbeat_interval)?,
        fencing_margin: seconds("fencing-margin", args.fencing_margin)?,
        cpu_overcommit: args.cpu_overcommit,
        memory_relief_window: Duration::try_from_secs_f64(args.memory_relief_window)
            .ok()
            .with_context(|| {
                format!(
                    "--memory-relief-window {}: a number of seconds, 0 or more",
                    args.memory_relief_window
                )
            })?,
        audit_retention: fabric_controller::audit::Retention {
            entries: args.audit_retention_entries.max(1),
            age: Duration::from_secs(args.audit_retention_days.max(1).saturating_mul(24 * 3600)),
        },
    };
    if settings.heartbeat_interval * 2 > settings.lease_ttl {
        anyhow::bail!("--heartbeat-interval must be at most half of --lease-ttl");
    }
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("cannot create {}", args.data_dir.display()))?;
    let store_path = args.data_dir.join("store.redb");
    let store = Arc::new(RedbStore::open(&store_path)?);
    if settings.memory_relief_window.is_zero() {
        tracing::info!("memory relief off (--memory-relief-window 0)");
    } else {
        tracing::info!(
            window_s = settings.memory_relief_window.as_secs_f64(),
            "memory relief on"
        );
    }
    let controller = Controller::load(settings, store.clone()).map_err(anyhow::Error::msg)?;
    let images = Arc::new(ImageStore::new(
        &args.data_dir,
        store,
        args.image_quota_mib,
    )?);
    for name in &args.bootstrap_admin {
        fabric_proto::tls::check_name("user", name)
            .map_err(|e| anyhow::anyhow!("--bootstrap-admin: {e}"))?;
        let newly = controller
            .bootstrap_admin(name)
            .await
            .map_err(|s| anyhow::anyhow!("--bootstrap-admin {name}: {}", s.message()))?;
        if newly {
            tracing::info!(user = %name, "bootstrap admin bound");
        }
    }
    images.audit_with(controller.clone());
    tokio::spawn(Reconciler::default().run(controller.clone()));
    tokio::spawn(controller.clone().settle_lease_bound());

    let services = fabric_proto::standard_services(&[
        fabric_proto::COMPUTE_SERVICE,
        fabric_proto::HOST_LINK_SERVICE,
        fabric_proto::IMAGES_SERVICE,
    ])
    .await;
    let tls = match &args.tls_dir {
        Some(dir) => {
            let files = fabric_proto::tls::TlsFiles::in_dir(dir, "controller");
            let cluster = files.cluster().map_err(anyhow::Error::msg)?;
            let identity = files.identity().map_err(anyhow::Error::msg)?;
            if identity != fabric_proto::tls::Identity::Controller {
                anyhow::bail!(
                    "{}: the certificate is {identity}'s, not the controller's",
                    files.cert.display()
                );
            }
            // Callers without a certificate get through the handshake only to join with a
            // token (the authorization policy refuses them everything else).
            let config = files
                .server_config_allowing_anonymous()
                .map_err(anyhow::Error::msg)?;
            tracing::info!(cluster, cert = %files.cert.display(), "mutual TLS on TCP listeners");
            let ca_key = dir.join(fabric_proto::tls::CA_KEY_FILE);
            if args.host_cert_ttl.is_zero() || args.host_cert_ttl > MAX_HOST_CERT_TTL {
                anyhow::bail!(
                    "--host-cert-ttl {} s: more than 0 and at most 365 days (hosts renew theirs at two thirds)",
                    args.host_cert_ttl.as_secs()
                );
            }
            if let Ok(meta) = std::fs::metadata(&ca_key) {
                use std::os::unix::fs::PermissionsExt;
                if meta.permissions().mode() & 0o077 != 0 {
                    tracing::warn!(ca_key = %ca_key.display(), mode = format!("{:o}", meta.permissions().mode() & 0o777), "the CA key is readable by others than its owner: whoever reads it can issue any identity (chmod 600)");
                }
            }
            if ca_key.exists() {
                tracing::info!(ca_key = %ca_key.display(), host_cert_ttl_s = args.host_cert_ttl.as_secs(), "hosts may join with tokens and renew their certificates");
            } else {
                tracing::warn!(ca_key = %ca_key.display(), "no CA key: hosts cannot join with tokens or renew their certificates");
            }
            controller.set_issuer(fabric_controller::join::Issuer {
                tls_dir: dir.clone(),
                cluster: cluster.clone(),
                host_cert_lifetime: args.host_cert_ttl,
            });
            Some((config, cluster))
        }
        None => None,
    };
    let router = fabric_proto::server()
        .layer(fabric_controller::server::authorize_layer(&controller))
        .add_routes(
            fabric_controller::server::fabric_routes(&controller, &images)
                .add_service(services.health)
                .add_service(services.reflection)
                .add_service(services.reflection_v1alpha),
        );
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut servers = tokio::task::JoinSet::new();
    for listen in &args.listen {
        let router = router.clone();
        let mut stop = stop_rx.clone();
        let shutdown = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        if let Some(path) = listen.strip_prefix("unix:") {
            let path = PathBuf::from(path.strip_prefix("//").unwrap_or(path));
            let _ = std::fs::remove_file(&path);
            let listener = tokio::net::UnixListener::bind(&path)
                .with_context(|| format!("cannot listen on {}", path.display()))?;
            // Root only: a caller here is local-root, who may do anything.
            std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
                .with_context(|| format!("cannot restrict {}", path.display()))?;
            tracing::info!(address = %listen, "listening");
            servers.spawn(
                router
                    .serve_with_incoming_shutdown(fabric_proto::unix::incoming(listener), shutdown),
            );
        } else {
            let Some((config, cluster)) = &tls else {
                anyhow::bail!(
                    "--listen {listen}: TCP is served with mutual TLS only: give --tls-dir (fabricctl pki init makes one), or listen on unix:/PATH"
                );
            };
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("cannot listen on {listen}"))?;
            tracing::info!(address = %listener.local_addr()?, "listening (mutual TLS)");
            servers.spawn(router.serve_with_incoming_shutdown(
                fabric_proto::tls::incoming(listener, config.clone(), cluster.clone()),
                shutdown,
            ));
        }
    }
    tracing::info!(data_dir = %args.data_dir.display(), store = %store_path.display(), "fabric-controller serving");
    tokio::select! {
        _ = sigterm.recv() => {}
        _ = sigint.recv() => {}
        Some(result) = servers.join_next() => {
            result.context("server task")?.context("server")?;
        }
    }
    tracing::info!("shutting down");
    let _ = stop_tx.send(true);
    while let Some(result) = servers.join_next().await {
        result.context("server task")?.context("server")?;
    }
    Ok(())
}
