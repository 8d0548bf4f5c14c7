//! Durable creates per second through the controller's API: a release fabric-controller on a
//! fresh data directory (redb, fsync on every commit), N concurrent clients calling CreateVm
//! for a fixed time, over the Unix socket (local-root) and over TCP with mutual TLS (a user's
//! certificate from a cluster CA made for the run), side by side. Prints creates/s, the
//! latency distribution, and what a new connection costs on each (TLS: the handshake).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use fabric_bench::stats::percentile;
use fabric_proto::tls::TlsFiles;
use fabric_proto::v1::compute_client::ComputeClient;
use fabric_proto::v1::{CreateVmRequest, DesiredState};
use fabric_test_support::cluster::{controller_command, path_appears, unix_channel, Process};
use fabric_test_support::vmspec::simulated_vm;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

#[derive(Parser)]
#[command(about = "Durable CreateVm throughput of fabric-controller")]
struct Args {
    /// The fabric-controller binary.
    #[arg(long, default_value = "target/release/fabric-controller")]
    controller: PathBuf,
    /// Concurrent clients, comma-separated list of runs.
    #[arg(long, default_value = "1,16,64")]
    clients: String,
    /// Seconds per run.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Transports, comma-separated: unix (local-root), tls (TCP, mutual TLS).
    #[arg(long, default_value = "unix,tls")]
    transports: String,
    /// New connections timed per transport for the connection cost.
    #[arg(long, default_value_t = 200)]
    connections: usize,
}

#[derive(Clone, Copy, PartialEq)]
enum Transport {
    Unix,
    Tls,
}

/// A running controller for one run: its channel factory and its directory.
struct Running {
    _controller: Process,
    dir: tempfile::TempDir,
    socket: PathBuf,
    port: u16,
    transport: Transport,
}

impl Running {
    async fn channel(&self) -> anyhow::Result<Channel> {
        match self.transport {
            Transport::Unix => Ok(unix_channel(&self.socket).await),
            Transport::Tls => {
                let tls = TlsFiles::in_dir(&self.dir.path().join("pki"), "bench")
                    .client_config()
                    .map_err(anyhow::Error::msg)?;
                Ok(
                    Endpoint::from_shared(format!("https://127.0.0.1:{}", self.port))?
                        .tls_config(tls)?
                        .connect()
                        .await?,
                )
            }
        }
    }
}

/// The cluster CA, the controller's certificate and user/bench's, in `dir`.
fn make_pki(dir: &Path) -> anyhow::Result<()> {
    use fabric_proto::tls::{self, Identity};
    std::fs::create_dir_all(dir)?;
    let day = Duration::from_secs(86_400);
    let ca = tls::new_ca("bench", day).map_err(anyhow::Error::msg)?;
    std::fs::write(dir.join(tls::CA_FILE), &ca.cert_pem)?;
    tls::write_private(&dir.join(tls::CA_KEY_FILE), &ca.key_pem)?;
    for (name, identity) in [
        ("controller", Identity::Controller),
        ("bench", Identity::User("bench".into())),
    ] {
        let issued = tls::issue(
            &ca,
            "bench",
            &tls::Request {
                identity: &identity,
                dns_names: &[],
                ips: &[std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)],
                backdate: Duration::ZERO,
                lifetime: day,
            },
        )
        .map_err(anyhow::Error::msg)?;
        let files = TlsFiles::in_dir(dir, name);
        std::fs::write(&files.cert, &issued.cert_pem)?;
        tls::write_private(&files.key, &issued.key_pem)?;
    }
    Ok(())
}

async fn start(args: &Args, transport: Transport) -> anyhow::Result<Running> {
    let dir = tempfile::Builder::new()
        .prefix("fabric-bench-ctl")
        .tempdir_in("/var/tmp")?;
    let socket = dir.path().join("c.sock");
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut command = controller_command(&args.controller, &socket, &dir.path().join("data"));
    command.env("FABRIC_LOG", "warn");
    if transport == Transport::Tls {
        make_pki(&dir.path().join("pki"))?;
        command
            .args(["--bootstrap-admin", "bench"])
            .args(["--listen", &format!("127.0.0.1:{port}"), "--tls-dir"])
            .arg(dir.path().join("pki"));
    }
    let controller = Process::try_spawn("fabric-controller", command, dir.path().join("log"))
        .with_context(|| format!("cannot start {}", args.controller.display()))?;
    anyhow::ensure!(
        path_appears(&socket, Duration::from_secs(20)),
        "the controller did not start:\n{}",
        controller.log_tail(20)
    );
    Ok(Running {
        _controller: controller,
        dir,
        socket,
        port,
        transport,
    })
}

/// Milliseconds per new connection and first call (a health check): for TLS, the TCP
/// connection, the mutual-TLS handshake and HTTP/2's; for the Unix socket, the connection
/// and HTTP/2's.
async fn connection_cost(running: &Running, connections: usize) -> anyhow::Result<Vec<f64>> {
    let mut costs = Vec::with_capacity(connections);
    for _ in 0..connections {
        let t = Instant::now();
        let channel = running.channel().await?;
        HealthClient::new(channel)
            .check(HealthCheckRequest::default())
            .await
            .map_err(|s| anyhow::anyhow!("health: {s}"))?;
        costs.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    Ok(costs)
}

/// Durable creates a second over `clients` concurrent clients, and every create's latency,
/// in milliseconds.
async fn run(args: &Args, transport: Transport, clients: usize) -> anyhow::Result<(f64, Vec<f64>)> {
    let running = start(args, transport).await?;
    let channel = running.channel().await?;
    let deadline = Instant::now() + Duration::from_secs(args.seconds);
    let latencies = Arc::new(std::sync::Mutex::new(Vec::new()));
    let began = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..clients {
        let mut client = ComputeClient::new(channel.clone());
        let latencies = latencies.clone();
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            let mut i = 0u64;
            while Instant::now() < deadline {
                let spec = simulated_vm(&format!("b-{w}-{i}"));
                let t = Instant::now();
                // Stopped: the controller stores the VM and places nothing.
                let request = CreateVmRequest {
                    spec: Some(spec),
                    desired_state: DesiredState::Stopped as i32,
                };
                client
                    .create_vm(request)
                    .await
                    .map_err(|s| anyhow::anyhow!("CreateVm: {s}"))?;
                mine.push(t.elapsed().as_secs_f64() * 1000.0);
                i += 1;
            }
            latencies
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend(mine);
            Ok::<_, anyhow::Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let elapsed = began.elapsed().as_secs_f64();
    let all = std::mem::take(&mut *latencies.lock().unwrap_or_else(|e| e.into_inner()));
    Ok((all.len() as f64 / elapsed, all))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let transports = args
        .transports
        .split(',')
        .map(|t| match t.trim() {
            "unix" => Ok((Transport::Unix, "Unix socket")),
            "tls" => Ok((Transport::Tls, "TCP, mutual TLS")),
            other => Err(anyhow::anyhow!(
                "--transports: {other:?} is not unix or tls"
            )),
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    println!("| clients | transport | durable creates/s | p50 ms | p99 ms |");
    println!("|---:|---|---:|---:|---:|");
    let mut rates = Vec::new();
    for clients in args.clients.split(',') {
        let clients: usize = clients.trim().parse().context("--clients")?;
        for &(transport, name) in &transports {
            let (rate, latencies) = run(&args, transport, clients).await?;
            println!(
                "| {clients} | {name} | {rate:.0} | {:.2} | {:.2} |",
                percentile(&latencies, 0.5),
                percentile(&latencies, 0.99)
            );
            rates.push((clients, transport, rate));
        }
    }
    if transports.len() == 2 {
        println!();
        println!("| clients | creates/s lost to mutual TLS |");
        println!("|---:|---:|");
        for &(clients, transport, unix) in &rates {
            if transport != Transport::Unix {
                continue;
            }
            if let Some(&(_, _, tls)) = rates
                .iter()
                .find(|(c, t, _)| *c == clients && *t == Transport::Tls)
            {
                println!("| {clients} | {:.1} % |", (1.0 - tls / unix) * 100.0);
            }
        }
    }
    println!();
    println!("| transport | new connection + first call, p50 ms | p99 ms |");
    println!("|---|---:|---:|");
    for &(transport, name) in &transports {
        let running = start(&args, transport).await?;
        let costs = connection_cost(&running, args.connections).await?;
        println!(
            "| {name} | {:.2} | {:.2} |",
            percentile(&costs, 0.5),
            percentile(&costs, 0.99)
        );
    }
    Ok(())
}
