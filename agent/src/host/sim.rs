//! The simulated backend (`hypervisor = "sim"`): a VM is a record that "boots" after a
//! configurable delay and reports memory statistics from a configured share of its memory.
//! No process, tap, cgroup or guest exists, so one machine can carry thousands of hollow hosts
//! for scale tests of the controller. Everything it reports says that it is simulated.

use std::path::Path;
use std::time::{Duration, SystemTime};

use fabric_proto::v1::MemoryStats;
use futures::future::BoxFuture;
use futures::FutureExt;

use super::backend::{Exit, Hypervisor, Instance, Probe, StartRequest};
use super::config::SimConfig;
use super::record::VmRecord;

/// The simulated backend.
pub struct Sim {
    config: SimConfig,
}

impl Sim {
    pub fn new(config: SimConfig) -> Sim {
        Sim { config }
    }
}

impl Hypervisor for Sim {
    fn name(&self) -> &'static str {
        "sim"
    }

    fn start<'a>(
        &'a self,
        request: StartRequest<'a>,
    ) -> BoxFuture<'a, Result<Box<dyn Instance>, String>> {
        async move {
            let spec = request.spec;
            if spec.vcpus == 0 {
                return Err("vcpus 0: must be at least 1".to_string());
            }
            let memory = spec.memory.unwrap_or_default();
            if memory.startup_mib == 0 {
                return Err("memory startup_mib must be > 0".to_string());
            }
            let max_mib = memory.maximum_mib.max(memory.startup_mib);
            let started_at = SystemTime::now();
            request.record.pid = None;
            request.record.started_at_ms = Some(super::process::unix_ms(started_at));
            Ok(Box::new(SimInstance {
                started_at,
                ready_after: Duration::from_millis(self.config.start_delay_ms),
                max_mib,
                startup_mib: memory.startup_mib,
                used_percent: self.config.memory_used_percent,
            }) as Box<dyn Instance>)
        }
        .boxed()
    }

    fn adopt(&self, _record: &VmRecord, _dir: &Path) -> Option<Box<dyn Instance>> {
        // Simulated VMs live in the agent's memory only; a restarted agent starts them again.
        None
    }

    fn cleanup<'a>(&'a self, _record: &'a VmRecord) -> BoxFuture<'a, Result<(), String>> {
        async { Ok(()) }.boxed()
    }
}

struct SimInstance {
    started_at: SystemTime,
    ready_after: Duration,
    max_mib: u64,
    startup_mib: u64,
    used_percent: u8,
}

impl Instance for SimInstance {
    fn pid(&self) -> u32 {
        0
    }

    fn started_at(&self) -> SystemTime {
        self.started_at
    }

    fn socket_path(&self) -> Option<std::path::PathBuf> {
        None
    }

    fn exited(&mut self) -> BoxFuture<'_, Exit> {
        // A simulated VM never dies on its own.
        futures::future::pending().boxed()
    }

    fn stop(&mut self, _timeout: Duration) -> BoxFuture<'_, Exit> {
        async {
            Exit {
                clean: true,
                description: "simulated VM stopped".to_string(),
            }
        }
        .boxed()
    }

    fn probe(&mut self) -> BoxFuture<'_, Probe> {
        let age = self.started_at.elapsed().unwrap_or_default();
        let running = age >= self.ready_after;
        let mib = 1024 * 1024;
        let balloon = self.max_mib - self.startup_mib;
        let total = self.startup_mib * mib;
        let used = total * u64::from(self.used_percent) / 100;
        let memory = running.then(|| MemoryStats {
            total_bytes: Some(total),
            free_bytes: Some(total - used),
            available_bytes: Some(total - used),
            balloon_actual_mib: balloon,
            balloon_target_mib: balloon,
            updated_at: Some(prost_types::Timestamp::from(SystemTime::now())),
            ..Default::default()
        });
        let message = if running {
            "simulated VM running (no guest)"
        } else {
            "simulated VM starting"
        };
        async move {
            Probe {
                running,
                memory,
                message: Some(message.to_string()),
            }
        }
        .boxed()
    }
}
