//! Durable creates per second through the controller's API: a release fabric-controller on a
//! fresh data directory (redb, fsync on every commit), N concurrent clients calling CreateVm
//! over a Unix socket for a fixed time. Prints creates/s and the latency distribution.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use fabric_bench::stats::percentile;
use fabric_proto::v1::compute_client::ComputeClient;
use fabric_proto::v1::{CreateVmRequest, DesiredState};
use fabric_test_support::cluster::{controller_command, path_appears, unix_channel, Process};
use fabric_test_support::vmspec::simulated_vm;

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
}

/// Durable creates a second over `clients` concurrent clients, and every create's latency,
/// in milliseconds.
async fn run(args: &Args, clients: usize) -> anyhow::Result<(f64, Vec<f64>)> {
    let dir = tempfile::Builder::new()
        .prefix("fabric-bench-ctl")
        .tempdir_in("/var/tmp")?;
    let socket = dir.path().join("c.sock");
    let mut command = controller_command(&args.controller, &socket, &dir.path().join("data"));
    command.env("FABRIC_LOG", "warn");
    let controller = Process::try_spawn("fabric-controller", command, dir.path().join("log"))
        .with_context(|| format!("cannot start {}", args.controller.display()))?;
    anyhow::ensure!(
        path_appears(&socket, Duration::from_secs(20)),
        "the controller did not start:\n{}",
        controller.log_tail(20)
    );
    let channel = unix_channel(&socket).await;
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
    println!("| clients | durable creates/s | p50 ms | p99 ms |");
    println!("|---:|---:|---:|---:|");
    for clients in args.clients.split(',') {
        let clients: usize = clients.trim().parse().context("--clients")?;
        let (rate, latencies) = run(&args, clients).await?;
        println!(
            "| {clients} | {rate:.0} | {:.2} | {:.2} |",
            percentile(&latencies, 0.5),
            percentile(&latencies, 0.99)
        );
    }
    Ok(())
}
