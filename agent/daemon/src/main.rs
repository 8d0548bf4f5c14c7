//! fabric-agent: the Fabric host daemon. See the module map of `fabric_agent`.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use fabric_agent::backend::Hypervisor;
use fabric_agent::config::{Config, Flags, HypervisorKind};
use fabric_agent::connect::{lazy_channel, Address, ControllerChannel};
use fabric_agent::images::ImageCache;
use fabric_agent::service::AgentService;
use fabric_agent::{kvm, link, sim, Host};
use fabric_proto::v1::agent_server::AgentServer;
use tokio::signal::unix::{signal, SignalKind};

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FABRIC_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let config = match Config::load(Flags::parse()) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("fabric-agent: {err}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("fabric-agent: cannot start the runtime: {err}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("fabric-agent: {err:#}");
            ExitCode::from(1)
        }
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    use anyhow::Context;
    std::fs::create_dir_all(config.data_dir.join("vms"))
        .with_context(|| format!("cannot create {}", config.data_dir.display()))?;
    let controller = Address::parse(&config.controller).map_err(anyhow::Error::msg)?;
    let tls = match &config.tls_dir {
        Some(dir) => {
            let files = fabric_proto::tls::TlsFiles::in_dir(dir, "host");
            fabric_agent::certs::recover_renewal(&files)?;
            if !files.cert.exists() {
                let Some(token) = &config.join_token else {
                    anyhow::bail!(
                        "{}: no host certificate: give a join token (join_token_file; fabricctl host token create --name {} makes one) or issue one (fabricctl pki issue --host {})",
                        files.cert.display(),
                        config.name,
                        config.name
                    );
                };
                fabric_agent::certs::join(&controller, &files, &config.name, token).await?;
            } else if config.join_token.is_some() {
                tracing::info!(cert = %files.cert.display(), "the host has its certificate: the join token is not used (it may be removed)");
            }
            let identity = files.identity().map_err(anyhow::Error::msg)?;
            let own = fabric_proto::tls::Identity::Host(config.name.clone());
            if identity != own {
                anyhow::bail!(
                    "{}: the certificate is {identity}'s; this agent registers as {own}",
                    files.cert.display()
                );
            }
            Some(files)
        }
        None => None,
    };
    let (channels, channel) = ControllerChannel::new(
        lazy_channel(&controller, tls.as_ref()).map_err(anyhow::Error::msg)?,
    );
    // A certificate for TCP is renewed before it expires (a Unix socket needs none).
    if let (Some(files), Address::Tcp(_)) = (&tls, &controller) {
        tokio::spawn(fabric_agent::certs::run_renewal(
            controller.clone(),
            files.clone(),
            config.name.clone(),
            channels,
        ));
    }
    let backend: Arc<dyn Hypervisor> = match config.hypervisor {
        HypervisorKind::Kvm => {
            let images = Arc::new(ImageCache::new(
                config.data_dir.join("images"),
                channel.clone(),
                config.image_cache_mib,
            ));
            Arc::new(kvm::Kvm::new(&config, images))
        }
        HypervisorKind::Sim => {
            tracing::warn!(
                "hypervisor = sim: VMs on this host are SIMULATED (records only, no guest runs)"
            );
            Arc::new(sim::Sim::new(config.sim.clone()))
        }
    };
    let listen = Address::parse(&config.listen).map_err(anyhow::Error::msg)?;
    tracing::info!(
        name = %config.name,
        controller = %config.controller,
        listen = %config.listen,
        hypervisor = backend.name(),
        "fabric-agent starting"
    );

    if let Some(path) = fabric_vmm_api::lease::test_offset_file() {
        tracing::warn!(
            file = %path.display(),
            "{} is set: the lease clock is moved by a TEST-ONLY offset; never set it in production",
            fabric_vmm_api::lease::TEST_OFFSET_ENV
        );
    }
    if let Some(path) = fabric_proto::clock::test_offset_file() {
        tracing::warn!(
            file = %path.display(),
            "{} is set: the wall clock is moved by a TEST-ONLY offset; never set it in production",
            fabric_proto::clock::TEST_OFFSET_ENV
        );
    }
    let kill_points = fabric_agent::testhook::kill_points();
    if !kill_points.is_empty() {
        if let Some(unknown) = kill_points
            .iter()
            .find(|p| !fabric_agent::testhook::KILL_POINTS.contains(&p.as_str()))
        {
            anyhow::bail!(
                "{}: unknown kill point {unknown:?} (known: {})",
                fabric_agent::testhook::KILL_AT_ENV,
                fabric_agent::testhook::KILL_POINTS.join(", ")
            );
        }
        tracing::warn!(
            points = %kill_points.join(","),
            "{} is set: the agent kills itself at these points of a VM start (TEST ONLY); never set it in production",
            fabric_agent::testhook::KILL_AT_ENV
        );
    }
    // One agent per data directory: two would both supervise (and restart) its VMs.
    let _data_dir_lock = lock_data_dir(&config.data_dir)?;
    // The lease a previous agent process left decides whether the VMs it ran may go on.
    let probe_host = Host::new(config.clone(), backend.clone(), false);
    let previous_lease = link::load_lease(&probe_host);
    drop(probe_host);
    let host = Host::new(config.clone(), backend, previous_lease.is_some());
    link::reserve_lease_file(&host, previous_lease);
    match previous_lease {
        Some(t) => tracing::info!(
            left_ms = t.remaining().as_millis() as u64,
            "the previous lease is still valid: running VMs are kept; nothing is started before the controller's assignments are read"
        ),
        None => tracing::info!("no valid lease yet: VMs start once the controller is reached and its assignments are read"),
    }
    host.load_vms();
    let lease = Arc::new(link::Lease::new(previous_lease));
    tokio::spawn(link::run_fence(host.clone(), lease.clone()));
    tokio::spawn(link::run(host.clone(), lease, channel));
    tokio::spawn(host.clone().run_memory_balancer());

    let standard = fabric_proto::standard_services(&[fabric_proto::AGENT_SERVICE]).await;
    let router = fabric_proto::server()
        .layer(fabric_proto::tls::AuthorizeLayer::new({
            let admins = config.admins.clone();
            Arc::new(move |path: &str, caller: &fabric_proto::tls::Identity| {
                fabric_agent::service::agent_policy(path, caller, &admins)
            })
        }))
        .add_service(standard.health)
        .add_service(standard.reflection)
        .add_service(standard.reflection_v1alpha)
        .add_service(AgentServer::new(AgentService::new(host.clone())));

    let mut sigterm = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let shutdown = async move {
        tokio::select! {
            _ = sigterm.recv() => tracing::info!("SIGTERM: exiting; VMs keep running"),
            _ = sigint.recv() => tracing::info!("SIGINT: exiting; VMs keep running"),
        }
    };
    match &listen {
        Address::Unix(path) => {
            let _ = std::fs::remove_file(path);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).ok();
            }
            let listener = tokio::net::UnixListener::bind(path)
                .with_context(|| format!("cannot listen on {}", path.display()))?;
            // Root only: a caller here is local-root.
            std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
                .with_context(|| format!("cannot restrict {}", path.display()))?;
            router
                .serve_with_incoming_shutdown(fabric_proto::unix::incoming(listener), shutdown)
                .await
                .context("Agent service")?;
        }
        Address::Tcp(_) => {
            let addr = listen.socket_addr().unwrap_or_default();
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr}"))?;
            let files = tls.as_ref().context("a TCP listener needs tls_dir")?;
            let cluster = files.cluster().map_err(anyhow::Error::msg)?;
            let config = files.server_config().map_err(anyhow::Error::msg)?;
            let incoming = fabric_proto::tls::incoming(listener, config, cluster);
            router
                .serve_with_incoming_shutdown(incoming, shutdown)
                .await
                .context("Agent service")?;
        }
    }
    Ok(())
}

/// Takes `<data_dir>/agent.lock` (flock, exclusive) for as long as the returned value lives;
/// fails, naming the holder, when another agent has it. The descriptor is close-on-exec, so
/// the VMMs the agent starts do not keep the lock after it ends.
fn lock_data_dir(data_dir: &std::path::Path) -> anyhow::Result<nix::fcntl::Flock<std::fs::File>> {
    use anyhow::Context;
    use std::io::Write;
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("cannot create the data directory {}", data_dir.display()))?;
    let path = data_dir.join("agent.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    let mut lock = match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
    {
        Ok(lock) => lock,
        Err((_, errno)) => {
            let holder = std::fs::read_to_string(&path).unwrap_or_default();
            anyhow::bail!(
                "another fabric-agent (pid {}) uses the data directory {}: one agent per data directory ({errno})",
                holder.trim(),
                data_dir.display()
            );
        }
    };
    let _ = lock.set_len(0);
    let _ = write!(lock, "{}", std::process::id());
    Ok(lock)
}
