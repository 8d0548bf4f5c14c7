//! The simulated backend (`hypervisor = "sim"`): a VM is a record that "boots" after a
//! configurable delay and whose guest memory is a small model ([`SimMemory`]) that the memory
//! balancer can act on. No process, tap, cgroup or guest exists, so one machine can carry
//! thousands of hollow hosts for scale tests of the controller, with the real balancer
//! deciding their balloons. Everything it reports says that it is simulated.
//!
//! # The simulated guest's memory
//!
//! A Linux guest without deflate-on-oom, in MiB:
//!
//! - guest RAM is the VM's maximum; the guest may use `usable = maximum − balloon`;
//! - the balloon starts at `maximum − startup` and follows its target: it deflates at once,
//!   and inflates only as far as the guest has free memory (a balloon driver can only give
//!   pages nobody uses), so it never takes memory in use;
//! - the guest's **demand** (memory in use) is `[sim] memory_used_percent` of its startup
//!   memory, or the VM's placement label [`MEMORY_DEMAND_LABEL`] (`fabric.sim/memory-demand-mib`,
//!   whole MiB), read when the simulated VM starts. A label that is not a whole number of MiB
//!   is named on the VM's status message and the default is used;
//! - its statistics: `total = usable`, `used = min(demand, usable)`, `available = free =
//!   usable − used`, fresh (`updated_at` = now) at every probe;
//! - while demand exceeds usable memory the guest pages: its major faults grow by
//!   [`MAJOR_FAULTS_PER_SHORT_MIB_PER_S`] per MiB of shortfall per second (the shortfall's
//!   pages read back once a second), far above the balancer's pressure threshold; its
//!   available memory is then 0 as well.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use fabric_proto::v1::{MemoryStats, VmSpec};
use futures::future::BoxFuture;
use futures::FutureExt;

use super::backend::{Balloon, Exit, Hypervisor, Instance, Probe, StartRequest};
use super::balancer::Limits;
use super::config::SimConfig;
use super::record::VmRecord;

/// The VM placement label that sets a simulated guest's memory demand, whole MiB.
pub const MEMORY_DEMAND_LABEL: &str = "fabric.sim/memory-demand-mib";
/// Major faults per second per MiB of memory the guest wants but may not use: each of the
/// shortfall's 4 KiB pages read back from disk once a second.
pub const MAJOR_FAULTS_PER_SHORT_MIB_PER_S: u64 = 256;
const MIB: u64 = 1 << 20;

/// The demand a VM's labels ask for: None without the label, an error naming the label and
/// the value when it is not a whole number of MiB.
pub fn demand_label(labels: &HashMap<String, String>) -> Result<Option<u64>, String> {
    let Some(value) = labels.get(MEMORY_DEMAND_LABEL) else {
        return Ok(None);
    };
    let shown: String = value.chars().take(64).collect();
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "label {MEMORY_DEMAND_LABEL}={shown:?}: not a whole number of MiB"
        ));
    }
    value
        .parse::<u64>()
        .map(Some)
        .map_err(|_| format!("label {MEMORY_DEMAND_LABEL}={shown:?}: too large"))
}

/// A simulated guest's demand, MiB: from its label, else `used_percent` of its startup
/// memory; with the complaint about a bad label, if any.
pub fn guest_demand_mib(spec: &VmSpec, used_percent: u8) -> (u64, Option<String>) {
    let startup = Limits::of(&spec.memory.unwrap_or_default()).startup_mib;
    let default = startup.saturating_mul(u64::from(used_percent)) / 100;
    let labels = spec
        .placement
        .as_ref()
        .map(|p| &p.labels)
        .cloned()
        .unwrap_or_default();
    match demand_label(&labels) {
        Ok(Some(demand)) => (demand, None),
        Ok(None) => (default, None),
        Err(why) => (
            default,
            Some(format!(
                "{why}; using {used_percent}% of startup ({default} MiB)"
            )),
        ),
    }
}

/// The memory of one simulated guest (see the module documentation), MiB.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimMemory {
    guest_ram_mib: u64,
    demand_mib: u64,
    balloon_mib: u64,
    balloon_target_mib: u64,
    major_faults: u64,
    /// When faults were last counted up to.
    counted_until: SystemTime,
}

impl SimMemory {
    /// A guest of `limits` that has just started at `now` with `demand_mib` in use.
    pub fn new(limits: &Limits, demand_mib: u64, now: SystemTime) -> SimMemory {
        let balloon = limits.maximum_mib - limits.startup_mib;
        SimMemory {
            guest_ram_mib: limits.maximum_mib,
            demand_mib,
            balloon_mib: balloon,
            balloon_target_mib: balloon,
            major_faults: 0,
            counted_until: now,
        }
    }

    pub fn demand_mib(&self) -> u64 {
        self.demand_mib
    }

    pub fn balloon_mib(&self) -> u64 {
        self.balloon_mib
    }

    /// Memory the guest may use: guest RAM outside the balloon.
    pub fn usable_mib(&self) -> u64 {
        self.guest_ram_mib - self.balloon_mib
    }

    /// Memory in use: the demand, as far as the guest has room for it.
    pub fn used_mib(&self) -> u64 {
        self.demand_mib.min(self.usable_mib())
    }

    pub fn free_mib(&self) -> u64 {
        self.usable_mib() - self.used_mib()
    }

    /// Demand the guest has no room for.
    pub fn shortfall_mib(&self) -> u64 {
        self.demand_mib.saturating_sub(self.usable_mib())
    }

    /// A new balloon target (at most guest RAM): the balloon deflates to it at once, or
    /// inflates toward it as far as the guest has free memory.
    pub fn set_balloon_target(&mut self, balloon_target_mib: u64) {
        self.balloon_target_mib = balloon_target_mib.min(self.guest_ram_mib);
        self.follow_target();
    }

    fn follow_target(&mut self) {
        let target = self.balloon_target_mib;
        if target <= self.balloon_mib {
            self.balloon_mib = target;
        } else {
            let inflatable = self.balloon_mib + self.free_mib();
            self.balloon_mib = target.min(inflatable);
        }
    }

    /// The guest's statistics at `now`, as its balloon driver would post them; faults for the
    /// time since the previous sample are counted first.
    pub fn sample(&mut self, now: SystemTime) -> MemoryStats {
        self.follow_target();
        let elapsed = now
            .duration_since(self.counted_until)
            .unwrap_or(Duration::ZERO);
        if now > self.counted_until {
            self.counted_until = now;
        }
        let faults = u128::from(self.shortfall_mib())
            * u128::from(MAJOR_FAULTS_PER_SHORT_MIB_PER_S)
            * elapsed.as_millis()
            / 1000;
        self.major_faults = self
            .major_faults
            .saturating_add(u64::try_from(faults).unwrap_or(u64::MAX));
        let bytes = |mib: u64| mib.saturating_mul(MIB);
        MemoryStats {
            total_bytes: Some(bytes(self.usable_mib())),
            free_bytes: Some(bytes(self.free_mib())),
            available_bytes: Some(bytes(self.free_mib())),
            major_faults: Some(self.major_faults),
            balloon_actual_mib: self.balloon_mib,
            balloon_target_mib: self.balloon_target_mib,
            updated_at: Some(prost_types::Timestamp::from(now)),
            ..Default::default()
        }
    }
}

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
            let limits = Limits::of(&memory);
            let (demand_mib, complaint) = guest_demand_mib(spec, self.config.memory_used_percent);
            if let Some(complaint) = &complaint {
                tracing::warn!(vm = %request.record.vm_id, "simulated guest: {complaint}");
            }
            (request.proceed)()?;
            let started_at = fabric_proto::clock::now();
            request.record.pid = None;
            request.record.started_at_ms = Some(super::process::unix_ms(started_at));
            let memory = SimMemory::new(&limits, demand_mib, started_at);
            Ok(Box::new(SimInstance {
                started_at,
                ready_after: Duration::from_millis(self.config.start_delay_ms),
                memory: Arc::new(SimBalloon {
                    memory: Mutex::new(memory),
                }),
                complaint,
            }) as Box<dyn Instance>)
        }
        .boxed()
    }

    fn adopt(&self, _record: &mut VmRecord, _dir: &Path) -> Option<Box<dyn Instance>> {
        // Simulated VMs live in the agent's memory only; a restarted agent starts them again.
        None
    }

    fn kill_all(&self, _vm_id: &str) -> BoxFuture<'_, Result<(), String>> {
        async { Ok(()) }.boxed()
    }

    fn cleanup<'a>(&'a self, _record: &'a VmRecord) -> BoxFuture<'a, Result<(), String>> {
        async { Ok(()) }.boxed()
    }
}

/// A simulated guest's memory, shared by its instance (probes) and the balancer (targets).
#[derive(Debug)]
struct SimBalloon {
    memory: Mutex<SimMemory>,
}

impl SimBalloon {
    fn memory(&self) -> std::sync::MutexGuard<'_, SimMemory> {
        self.memory.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Balloon for SimBalloon {
    fn set_target(&self, balloon_target_mib: u64) -> BoxFuture<'_, Result<(), String>> {
        self.memory().set_balloon_target(balloon_target_mib);
        async { Ok(()) }.boxed()
    }
}

struct SimInstance {
    started_at: SystemTime,
    ready_after: Duration,
    memory: Arc<SimBalloon>,
    /// What is wrong with the VM's simulation settings (a bad demand label), for its status.
    complaint: Option<String>,
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

    fn kill(&mut self) -> BoxFuture<'_, Exit> {
        async {
            Exit {
                clean: true,
                description: "simulated VM killed".to_string(),
            }
        }
        .boxed()
    }

    fn probe(&mut self) -> BoxFuture<'_, Probe> {
        let now = fabric_proto::clock::now();
        let age = now.duration_since(self.started_at).unwrap_or_default();
        let running = age >= self.ready_after;
        let memory = running.then(|| self.memory.memory().sample(now));
        let mut message = if running {
            "simulated VM running (no guest)".to_string()
        } else {
            "simulated VM starting".to_string()
        };
        if let Some(complaint) = &self.complaint {
            message.push_str("; ");
            message.push_str(complaint);
        }
        async move {
            Probe {
                running,
                memory,
                message: Some(message),
            }
        }
        .boxed()
    }

    fn balloon(&self) -> Option<Arc<dyn Balloon>> {
        Some(self.memory.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balancer::{Balancer, Params, VmInput};
    use fabric_proto::v1::{MemorySpec, Placement};
    use std::time::UNIX_EPOCH;

    fn at(ms: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_700_000_000) + Duration::from_millis(ms)
    }

    fn memory_spec(startup: u64, minimum: u64, maximum: u64) -> MemorySpec {
        MemorySpec {
            startup_mib: startup,
            minimum_mib: minimum,
            maximum_mib: maximum,
            ..Default::default()
        }
    }

    fn vm_spec(startup: u64, label: Option<&str>) -> VmSpec {
        let mut labels = HashMap::new();
        if let Some(value) = label {
            labels.insert(MEMORY_DEMAND_LABEL.to_string(), value.to_string());
        }
        VmSpec {
            vcpus: 1,
            memory: Some(memory_spec(startup, 128, 1024)),
            placement: Some(Placement {
                labels,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn mib(bytes: Option<u64>) -> u64 {
        bytes.expect("reported") / MIB
    }

    #[test]
    fn the_demand_label_is_whole_mib_and_a_bad_one_falls_back_to_the_default() {
        assert_eq!(
            guest_demand_mib(&vm_spec(512, Some("900")), 40),
            (900, None)
        );
        assert_eq!(guest_demand_mib(&vm_spec(512, Some("0")), 40), (0, None));
        assert_eq!(guest_demand_mib(&vm_spec(512, None), 40), (204, None));
        assert_eq!(guest_demand_mib(&vm_spec(512, None), 0), (0, None));
        let no_placement = VmSpec {
            placement: None,
            ..vm_spec(1000, None)
        };
        assert_eq!(guest_demand_mib(&no_placement, 25), (250, None));
        for bad in [
            "",
            "-5",
            "12MiB",
            "1.5",
            " 300",
            "0x10",
            "99999999999999999999999",
        ] {
            let (demand, complaint) = guest_demand_mib(&vm_spec(512, Some(bad)), 40);
            assert_eq!(demand, 204, "{bad:?}: the default is used");
            let complaint = complaint.unwrap_or_else(|| panic!("{bad:?} accepted"));
            assert!(
                complaint.contains(MEMORY_DEMAND_LABEL) && complaint.contains("204 MiB"),
                "{bad:?}: {complaint}"
            );
        }
        assert!(demand_label(&HashMap::from([(
            MEMORY_DEMAND_LABEL.to_string(),
            "é".repeat(10_000)
        )]))
        .is_err_and(|e| e.len() < 300));
    }

    #[test]
    fn the_balloon_deflates_at_once_and_inflates_only_into_free_memory() {
        let limits = Limits::of(&memory_spec(512, 128, 1024));
        let mut guest = SimMemory::new(&limits, 300, at(0));
        // Started at startup: balloon 512, usable 512, 300 in use.
        assert_eq!((guest.balloon_mib(), guest.usable_mib()), (512, 512));
        let stats = guest.sample(at(1000));
        assert_eq!(
            (
                mib(stats.total_bytes),
                mib(stats.available_bytes),
                mib(stats.free_bytes)
            ),
            (512, 212, 212)
        );
        assert_eq!(stats.major_faults, Some(0));
        assert_eq!(
            (stats.balloon_actual_mib, stats.balloon_target_mib),
            (512, 512)
        );

        // Asked to leave the guest 124 MiB: it gives only its 212 free (balloon 724, usable
        // 300, nothing free), and no more later.
        guest.set_balloon_target(900);
        assert_eq!((guest.balloon_mib(), guest.free_mib()), (724, 0));
        let stats = guest.sample(at(2000));
        assert_eq!(
            (stats.balloon_actual_mib, stats.balloon_target_mib),
            (724, 900)
        );
        assert_eq!(mib(stats.total_bytes), 300);
        assert_eq!(stats.major_faults, Some(0), "no shortfall: no paging");

        // Deflating is immediate, and a target beyond guest RAM is guest RAM.
        guest.set_balloon_target(100);
        assert_eq!((guest.balloon_mib(), guest.usable_mib()), (100, 924));
        guest.set_balloon_target(5000);
        assert_eq!(guest.balloon_mib(), 1024 - 300);
    }

    #[test]
    fn demand_above_usable_memory_shows_as_paging_and_no_available_memory() {
        let limits = Limits::of(&memory_spec(512, 128, 1024));
        let mut guest = SimMemory::new(&limits, 700, at(0));
        assert_eq!(guest.shortfall_mib(), 188);
        let first = guest.sample(at(1000));
        let second = guest.sample(at(2000));
        assert_eq!(
            (mib(second.total_bytes), mib(second.available_bytes)),
            (512, 0)
        );
        let per_second = second.major_faults.expect("faults") - first.major_faults.expect("faults");
        assert_eq!(per_second, 188 * MAJOR_FAULTS_PER_SHORT_MIB_PER_S);
        assert!(per_second > 100 * Params::default().major_faults_per_s);
        // A clock that steps back counts nothing.
        let back = guest.sample(at(1500));
        assert_eq!(back.major_faults, second.major_faults);
        // Given room, the paging stops.
        guest.set_balloon_target(200);
        let third = guest.sample(at(3000));
        assert_eq!(third.major_faults, second.major_faults);
        assert_eq!(mib(third.available_bytes), 824 - 700);
    }

    /// The real balancer over simulated guests, step by step: an idle guest shrinks to its
    /// demand plus buffer, a guest that wants more than it has is seen under pressure and
    /// gets its memory, within a few steps.
    #[test]
    fn the_balancer_acts_on_simulated_guests() {
        let spec = memory_spec(512, 128, 1024);
        let limits = Limits::of(&spec);
        let mut idle = SimMemory::new(&limits, 204, at(0));
        let mut hungry = SimMemory::new(&limits, 700, at(0));
        let mut balancer = Balancer::new(Params::default());
        let mut reasons = Vec::new();
        for second in 1..=20u64 {
            let now = at(second * 1000);
            let inputs = [
                VmInput {
                    vm_id: "idle".into(),
                    spec,
                    stats: Some(idle.sample(now)),
                },
                VmInput {
                    vm_id: "hungry".into(),
                    spec,
                    stats: Some(hungry.sample(now)),
                },
            ];
            let plan = balancer.step(now, &inputs);
            for (decision, guest) in plan.vms.iter().zip([&mut idle, &mut hungry]) {
                if decision.changed {
                    guest.set_balloon_target(decision.balloon_target_mib);
                }
            }
            reasons.push(plan.vms[1].reason);
        }
        // 204 × 1.2 = 245 MiB usable: balloon 779.
        assert_eq!((idle.balloon_mib(), idle.usable_mib()), (779, 245));
        assert!(
            reasons[0].pressured(),
            "the hungry guest is pressured at once: {reasons:?}"
        );
        assert_eq!(hungry.shortfall_mib(), 0, "{reasons:?}");
        assert!(hungry.usable_mib() >= 700 * 12 / 10, "{hungry:?}");
        assert!(
            !reasons.last().is_some_and(|r| r.pressured()),
            "{reasons:?}"
        );
        // One step gives the pressured guest its maximum: no pressure after the first.
        assert!(reasons[1..].iter().all(|r| !r.pressured()), "{reasons:?}");
    }
}
