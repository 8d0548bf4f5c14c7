//! The nemesis for long runs (`bench/nemesis --minutes N`): the harness of
//! `fabric_test_support::nemesis` (a controller, KVM and simulated hosts in network
//! namespaces, a workload, faults at random moments from a seed, a sampler every ~20 ms, a
//! checker) for as long as asked; prints the seed first and the verdict table last, and exits
//! non-zero when the verdict is not clean (a double run, a lost acknowledged write or a lost
//! VM). Everything the run made is removed at the end, also on an error, Ctrl-C or a panic,
//! and the program checks that nothing is left.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, ensure, Result};
use clap::Parser;
use fabric_bench::cleanup::{self, Made};
use fabric_bench::interrupt::until_interrupted;
use fabric_bench::require_kvm;
use fabric_test_support::nemesis::cluster::cleanup_leftovers;
use fabric_test_support::nemesis::faults::Fault;
use fabric_test_support::nemesis::rng::random_seed;
use fabric_test_support::nemesis::{self, Config};

#[derive(Parser, Clone)]
#[command(about = "The nemesis: faults at random moments from a seed, a verdict on double runs")]
struct Args {
    /// Minutes of faults (the workload runs as long; setting up and settling come on top).
    #[arg(long, default_value_t = 10.0)]
    minutes: f64,
    /// The seed every random choice comes from (default: a random one, printed).
    #[arg(long)]
    seed: Option<u64>,
    /// Real-KVM hosts (running the freestanding test guest).
    #[arg(long, default_value_t = 1)]
    kvm_hosts: usize,
    /// Simulated hosts.
    #[arg(long, default_value_t = 3)]
    sim_hosts: usize,
    /// VMs the workload keeps, about.
    #[arg(long, default_value_t = 6)]
    vms: usize,
    /// Fault streams injecting at once (overlapping faults).
    #[arg(long, default_value_t = 2)]
    nemeses: usize,
    /// Only these fault kinds, comma-separated (default: all). Kinds: agent-kill,
    /// agent-pause, vmm-kill, vmm-pause, controller-kill, controller-pause, partition,
    /// partition-host-to-controller, partition-controller-to-host, slow-disk,
    /// kill-at-after-spawn, kill-at-during-pull, kill-at-during-copy, boottime-jump,
    /// wallclock-jump.
    #[arg(long, value_delimiter = ',')]
    faults: Vec<String>,
    /// Longest wait after the faults for every VM to run again, seconds.
    #[arg(long, default_value_t = 60)]
    settle_secs: u64,
    /// Where the history (and the daemons' logs after a run that is not clean) go.
    #[arg(long, default_value = "/tmp")]
    log_dir: PathBuf,
}

fn register(prefix: &str, dir: &Path) {
    cleanup::register(Some(Made {
        dir: dir.to_path_buf(),
        prefix: prefix.to_string(),
    }));
}

/// After the default report of a panic (the release profile aborts, no Drop runs): the
/// processes, then the controller's mount and loop device, then the rest of the run.
fn remove_on_panic() {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        if let Some(made) = cleanup::registered() {
            for (pid, _) in made.processes() {
                // SAFETY: kill with a pid whose command line names this run's own directory.
                unsafe {
                    libc::kill(pid as i32, libc::SIGKILL);
                    libc::kill(pid as i32, libc::SIGCONT);
                }
            }
            std::thread::sleep(Duration::from_millis(300));
            cleanup_leftovers(&made.prefix, &made.dir);
            made.remove_everything();
        }
    }));
}

#[tokio::main(flavor = "multi_thread", worker_threads = 4)]
async fn main() -> Result<()> {
    let args = Args::parse();
    ensure!(args.kvm_hosts + args.sim_hosts >= 2, "at least 2 hosts");
    ensure!(args.minutes > 0.0, "--minutes: more than 0");
    if args.kvm_hosts > 0 {
        require_kvm()?;
    }
    remove_on_panic();
    let seed = args.seed.unwrap_or_else(random_seed);
    println!("nemesis-bench: seed {seed} (replay: bench/nemesis --seed {seed})");
    let mut config = Config::new(seed, Duration::from_secs_f64(args.minutes * 60.0));
    config.kvm_hosts = args.kvm_hosts;
    config.sim_hosts = args.sim_hosts;
    config.vms = args.vms;
    config.nemeses = args.nemeses;
    config.settle_time = Duration::from_secs(args.settle_secs);
    config.log_dir = args.log_dir.clone();
    config.on_start = Some(register);
    if !args.faults.is_empty() {
        config.faults = Vec::new();
        for name in &args.faults {
            match Fault::by_name(name) {
                Some(f) => config.faults.push(f),
                None => bail!("--faults: no fault kind {name:?}"),
            }
        }
    }
    let result = until_interrupted(nemesis::run(&config)).await;
    if let Some(made) = cleanup::registered() {
        // After an interruption the cluster was dropped with the future; check it is gone.
        cleanup_leftovers(&made.prefix, &made.dir);
        made.check_removed("nemesis-bench");
        cleanup::register(None);
    }
    let verdict = result?;
    println!();
    println!("{}", verdict.table());
    if !verdict.clean() {
        bail!("seed {seed}: the verdict is not clean");
    }
    Ok(())
}
