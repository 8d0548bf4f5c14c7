//! Durable creates per second through the controller's API: a release fabric-controller on a
//! fresh data directory (redb, fsync on every commit), N concurrent clients calling CreateVm
//! over a Unix socket for a fixed time. Prints creates/s and the latency distribution.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use fabric_proto::v1::compute_client::ComputeClient;
use fabric_proto::v1::{BootImage, CreateVmRequest, MemorySpec, VmSpec};

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

struct Child(std::process::Child);
impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn run(args: &Args, clients: usize) -> anyhow::Result<(f64, Vec<Duration>)> {
    let dir = tempfile::Builder::new()
        .prefix("fabric-bench-ctl")
        .tempdir_in("/var/tmp")?;
    let socket = dir.path().join("c.sock");
    let _controller = Child(
        std::process::Command::new(&args.controller)
            .arg("--listen")
            .arg(format!("unix:{}", socket.display()))
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .env("FABRIC_LOG", "warn")
            .spawn()
            .with_context(|| format!("cannot start {}", args.controller.display()))?,
    );
    let start = Instant::now();
    while !socket.exists() {
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(20),
            "the controller did not start"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let path = socket.clone();
    let channel = tonic::transport::Endpoint::from_static("http://bench.invalid")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(path).await?,
                ))
            }
        }))
        .await?;
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
                let spec = VmSpec {
                    name: format!("b-{w}-{i}"),
                    vcpus: 1,
                    memory: Some(MemorySpec {
                        startup_mib: 256,
                        ..Default::default()
                    }),
                    image: Some(BootImage {
                        kernel_sha256: "0".repeat(64),
                        ..Default::default()
                    }),
                    ..Default::default()
                };
                let t = Instant::now();
                client
                    .create_vm(CreateVmRequest {
                        spec: Some(spec),
                        desired_state: 2,
                    })
                    .await
                    .map_err(|s| anyhow::anyhow!("CreateVm: {s}"))?;
                mine.push(t.elapsed());
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
    let mut all = std::mem::take(&mut *latencies.lock().unwrap_or_else(|e| e.into_inner()));
    all.sort();
    Ok((all.len() as f64 / elapsed, all))
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
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
            pct(&latencies, 0.5),
            pct(&latencies, 0.99)
        );
    }
    Ok(())
}
