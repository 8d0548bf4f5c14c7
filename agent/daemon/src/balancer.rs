//! The memory balancer: every half second, from every running VM's memory specification and the
//! latest statistics its guest reported through the balloon, the balloon size each VM should
//! have. Pure logic: no I/O, no clock of its own; the agent's loop feeds it and applies what it
//! decides through each instance's balloon (a VMM's control socket, `SetBalloonTarget`, or a
//! simulated guest of `crate::sim`), and reports each step in heartbeats.
//!
//! # Model (Hyper-V Dynamic Memory, `shared/ARCHITECTURE.md`)
//!
//! A VM has `startup`, `minimum` and `maximum` MiB, a `buffer` percentage and a `weight`. Its
//! guest RAM is `maximum`; the balloon holds what the guest may not use, so the guest's
//! *usable* memory is `maximum − balloon`. Per step and per VM:
//!
//! - **Demand** is memory in use, not cache: `total − available` from the guest's statistics
//!   (free plus caches when it reports no `available`), less the balloon when the guest counts
//!   balloon pages in its total (Linux does with deflate-on-oom: the balloon's pages are then
//!   ordinary allocations). While the balloon moves, the sample's own balloon size is only known
//!   to lie between the sizes read at the step before the sample and at this one, so demand is
//!   a range; it is exact once the balloon stands still.
//! - **Target** (memory outside the balloon wanted) is `demand × (1 + buffer%)` plus the
//!   guest kernel's own overhead (guest RAM outside the balloon that the guest does not count
//!   in its total: its code, its page structures), clamped to `[minimum, maximum]`, so that the
//!   guest itself sees the buffer as available memory; for a demand range, memory is taken only down to the target of its
//!   high end and given only up to it when even the low end's target is above what the guest
//!   has (no oscillation while the balloon moves).
//! - **Pressure**: major faults growing faster than [`Params::major_faults_per_s`], or
//!   `available` below [`Params::low_available_percent`] of the guest's usable memory. A
//!   pressured VM counts as wanting its usable memory plus its buffer share (at least
//!   [`PRESSURE_GROW_MIN_MIB`]), and gets in one step, beyond that, whatever the budget can
//!   spare after every VM's share, up to its maximum: a guest that is short cannot show how
//!   much it lacks (its demand looks like all it has). For [`Params::pressure_hold`] afterwards
//!   no memory is taken from it; then the surplus goes back at the bounded rate.
//! - **Host short**: when the targets (plus the memory of VMs the balancer leaves alone) exceed
//!   the host's budget, the budget above the minimums is shared by weight (water-filling): no
//!   VM below its minimum, none above its target.
//! - **Moving**: memory is given back at once (the balloon target drops to `maximum − target`
//!   in one step); memory is taken at a bounded rate ([`Params::rate_mib_per_s`]), and the
//!   balloon target never runs more than one step ahead of what the guest has actually given.
//!   Changes smaller than [`Params::min_change_mib`] are not made (statistics jitter).
//!
//! Left alone: static VMs (`minimum == maximum`: never ballooned), VMs whose guest has not
//! reported statistics yet or whose statistics are older than [`Params::stale_after`] (their
//! balloon stays where it is, or at `maximum − startup` if the VMM has not told it yet). Their
//! usable memory still counts against the budget.
//!
//! Growing one VM while another shrinks at the bounded rate can put the sum of usable memory
//! above the budget for a few seconds; guest RAM is touched lazily, so that is room promised,
//! not memory used.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::time::{Duration, SystemTime};

use fabric_proto::v1::{MemorySpec, MemoryStats};

/// The buffer when a spec gives 0 (issue 8).
pub const DEFAULT_BUFFER_PERCENT: u64 = 20;
/// The weight when a spec gives 0.
pub const DEFAULT_WEIGHT: u64 = 5000;
/// Weights are clamped to this range.
pub const MAX_WEIGHT: u64 = 10_000;
/// A pressured VM is counted as wanting its usable memory plus its buffer share, at least
/// this much more (it gets more when the budget can spare it).
pub const PRESSURE_GROW_MIN_MIB: u64 = 32;
/// The step length assumed for the first step (a second's worth of the bounded rate) and for a
/// fault rate without sample times.
pub const NOMINAL_STEP: Duration = Duration::from_secs(1);
/// How often the agent steps the balancer: half the guests' statistics period (1 s), so a
/// fresh sample is acted on within half a second. Memory is taken at the bounded rate per
/// second whatever the interval (each step is credited the time since the previous one).
pub const STEP_INTERVAL: Duration = Duration::from_millis(500);
const MAX_STEP: Duration = Duration::from_secs(2);
const MIB: u64 = 1 << 20;

/// The balancer's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Params {
    /// Memory VMs may use in all, MiB: physical memory less the host's reserve, or configured.
    pub budget_mib: u64,
    /// How fast memory is taken from a guest (balloon inflation), MiB per second.
    pub rate_mib_per_s: u64,
    /// A guest with less available memory than this share of its usable memory is pressured.
    pub low_available_percent: u64,
    /// A guest whose major faults grow at least this fast is pressured.
    pub major_faults_per_s: u64,
    /// After pressure, no memory is taken from the VM for this long.
    pub pressure_hold: Duration,
    /// Statistics older than this are not acted on.
    pub stale_after: Duration,
    /// Smaller balloon changes are not made.
    pub min_change_mib: u64,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            budget_mib: u64::MAX,
            rate_mib_per_s: 256,
            low_available_percent: 10,
            major_faults_per_s: 20,
            pressure_hold: Duration::from_secs(3),
            stale_after: Duration::from_secs(10),
            min_change_mib: 4,
        }
    }
}

/// One running VM as the balancer sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct VmInput {
    pub vm_id: String,
    pub spec: MemorySpec,
    /// The VMM's latest balloon status and guest statistics; None when the VMM has not
    /// answered.
    pub stats: Option<MemoryStats>,
}

/// Why a VM's balloon is where the balancer puts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    Static,
    NoStats,
    Stale,
    PressureMajorFaults,
    PressureLowAvailable,
    RecentPressure,
    HostShort,
    Shrinking,
    Growing,
    Steady,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Static => "static memory: not ballooned",
            Reason::NoStats => "no statistics yet: balloon kept",
            Reason::Stale => "statistics stale: balloon kept",
            Reason::PressureMajorFaults => "pressure: major faults",
            Reason::PressureLowAvailable => "pressure: low available memory",
            Reason::RecentPressure => "recent pressure: not shrinking",
            Reason::HostShort => "host short: shared by weight",
            Reason::Shrinking => "idle: shrinking toward demand+buffer",
            Reason::Growing => "demand grew: growing to demand+buffer",
            Reason::Steady => "at demand+buffer",
        }
    }

    /// The VM is under memory pressure now.
    pub fn pressured(self) -> bool {
        matches!(
            self,
            Reason::PressureMajorFaults | Reason::PressureLowAvailable
        )
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the balancer decided for one VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub vm_id: String,
    /// The balloon target to be in effect after this step, MiB.
    pub balloon_target_mib: u64,
    /// The balloon target in effect before it (as the VMM reported), MiB.
    pub previous_target_mib: u64,
    /// True when `balloon_target_mib` must be sent to the VMM.
    pub changed: bool,
    /// Usable memory the VM should end up with (after sharing), MiB.
    pub target_mib: u64,
    /// Memory in use in the guest, MiB, when known.
    pub demand_mib: Option<u64>,
    pub reason: Reason,
}

/// The host's memory as the balancer sees it; VMs left alone count with their usable memory.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostSummary {
    pub budget_mib: u64,
    /// Memory in use in the guests (usable memory for VMs without statistics), MiB.
    pub demand_mib: u64,
    /// What the VMs want: the sum of their targets before sharing, MiB.
    pub wanted_mib: u64,
    /// What they get: the sum of their targets after sharing, MiB.
    pub assigned_mib: u64,
    /// The sum of their minimums, MiB.
    pub minimum_mib: u64,
    /// The targets did not fit the budget: shared by weight.
    pub short: bool,
    /// Not even the minimums fit: the controller should move VMs away.
    pub overcommitted: bool,
    /// VMs under pressure this step.
    pub pressured_vms: usize,
}

/// The result of one step.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub vms: Vec<Decision>,
    pub host: HostSummary,
}

/// What the balancer remembers of a VM between steps.
#[derive(Debug, Clone, Default)]
struct VmMemo {
    /// The last sample acted on: (when the guest posted it, its major faults).
    sample: Option<(SystemTime, Option<u64>)>,
    /// The balloon's size when that sample was made lay in this range (low, high).
    balloon_at_sample_mib: (u64, u64),
    /// The balloon size the VMM reported at the previous step.
    last_actual_mib: Option<u64>,
    /// No memory is taken while this runs.
    hold_left: Duration,
}

/// The balancer: call [`Balancer::step`] every half second ([`STEP_INTERVAL`]).
#[derive(Debug, Clone)]
pub struct Balancer {
    params: Params,
    memo: BTreeMap<String, VmMemo>,
    last_step: Option<SystemTime>,
}

/// A VM's memory specification with its defaults applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub startup_mib: u64,
    pub minimum_mib: u64,
    pub maximum_mib: u64,
    pub buffer_percent: u64,
    pub weight: u64,
}

impl Limits {
    /// Applies the defaults (0 means startup, 20 %, 5000) and orders the values so that
    /// `minimum <= startup <= maximum` whatever the input.
    pub fn of(spec: &MemorySpec) -> Limits {
        let or_startup = |v: u64| if v == 0 { spec.startup_mib } else { v };
        let maximum_mib = or_startup(spec.maximum_mib);
        let minimum_mib = or_startup(spec.minimum_mib).min(maximum_mib);
        let startup_mib = spec.startup_mib.clamp(minimum_mib, maximum_mib);
        let buffer_percent = match spec.buffer_percent {
            0 => DEFAULT_BUFFER_PERCENT,
            b => u64::from(b),
        };
        let weight = match spec.weight {
            0 => DEFAULT_WEIGHT,
            w => u64::from(w).min(MAX_WEIGHT),
        };
        Limits {
            startup_mib,
            minimum_mib,
            maximum_mib,
            buffer_percent,
            weight,
        }
    }

    /// Static memory: nothing to balance.
    pub fn is_static(&self) -> bool {
        self.minimum_mib >= self.maximum_mib
    }

    /// `demand × (1 + buffer%)` plus what the guest kernel keeps for itself (`overhead`:
    /// guest RAM it does not count in its total), rounded up, clamped to `[minimum, maximum]`.
    pub fn target_for(&self, demand_mib: u64, overhead_mib: u64) -> u64 {
        let wanted = u128::from(demand_mib) * u128::from(100 + self.buffer_percent);
        let wanted = u64::try_from(wanted.div_ceil(100)).unwrap_or(u64::MAX);
        wanted
            .saturating_add(overhead_mib)
            .clamp(self.minimum_mib, self.maximum_mib)
    }
}

fn ceil_mib(bytes: u64) -> u64 {
    bytes.div_ceil(MIB)
}

fn floor_mib(bytes: u64) -> u64 {
    bytes / MIB
}

fn sample_time(stats: &MemoryStats) -> Option<SystemTime> {
    stats.updated_at.and_then(|t| SystemTime::try_from(t).ok())
}

/// Per-VM working values within one step.
struct Work {
    limits: Limits,
    /// Balloon target before this step.
    current_balloon: u64,
    actual_balloon: u64,
    demand: Option<u64>,
    /// None: left alone (fixed at its current usable memory).
    cap: Option<u64>,
    /// In its pressure hold: the usable memory it keeps if no pressured VM needs it.
    held_mib: Option<u64>,
    reason: Reason,
}

impl Balancer {
    pub fn new(params: Params) -> Balancer {
        Balancer {
            params,
            memo: BTreeMap::new(),
            last_step: None,
        }
    }

    pub fn params(&self) -> &Params {
        &self.params
    }

    /// One balancing step at wall-clock time `now` over every running VM.
    pub fn step(&mut self, now: SystemTime, vms: &[VmInput]) -> Plan {
        let elapsed = match self.last_step {
            None => NOMINAL_STEP,
            Some(last) => now.duration_since(last).unwrap_or(Duration::ZERO),
        };
        self.last_step = Some(now);
        let present: HashSet<&str> = vms.iter().map(|v| v.vm_id.as_str()).collect();
        self.memo.retain(|id, _| present.contains(id.as_str()));

        let mut work: Vec<Work> = vms.iter().map(|vm| self.assess(now, elapsed, vm)).collect();
        let host = self.share(&mut work);

        // A late step does not take more than two steps' worth at once.
        let step_mib = u64::try_from(
            u128::from(self.params.rate_mib_per_s) * elapsed.min(MAX_STEP).as_millis() / 1000,
        )
        .unwrap_or(u64::MAX);
        let decisions = vms
            .iter()
            .zip(work)
            .map(|(vm, w)| self.decide(vm, w, step_mib))
            .collect();
        Plan {
            vms: decisions,
            host,
        }
    }

    /// Demand, pressure and the target before sharing.
    fn assess(&mut self, now: SystemTime, elapsed: Duration, vm: &VmInput) -> Work {
        let limits = Limits::of(&vm.spec);
        let memo = self.memo.entry(vm.vm_id.clone()).or_default();
        memo.hold_left = memo.hold_left.saturating_sub(elapsed);
        let (current_balloon, actual_balloon) = match &vm.stats {
            Some(s) => (s.balloon_target_mib, s.balloon_actual_mib),
            None => {
                let assumed = limits.maximum_mib - limits.startup_mib;
                (assumed, assumed)
            }
        };
        let last_actual = memo.last_actual_mib.replace(actual_balloon);
        let mut w = Work {
            limits,
            current_balloon,
            actual_balloon,
            demand: None,
            cap: None,
            held_mib: None,
            reason: Reason::NoStats,
        };
        if limits.is_static() {
            w.reason = Reason::Static;
            return w;
        }
        let Some(stats) = vm.stats.as_ref() else {
            return w;
        };
        let (Some(total_bytes), Some(at)) = (stats.total_bytes, sample_time(stats)) else {
            return w;
        };
        if now.duration_since(at).unwrap_or(Duration::ZERO) > self.params.stale_after {
            w.reason = Reason::Stale;
            return w;
        }

        let previous = memo.sample;
        let fresh = previous.is_none_or(|(t, _)| t != at);
        if fresh {
            // The guest posted this sample after the previous step's reading: its balloon was
            // between the size seen then and the size seen now.
            let before = last_actual.unwrap_or(actual_balloon);
            memo.balloon_at_sample_mib = (before.min(actual_balloon), before.max(actual_balloon));
            memo.sample = Some((at, stats.major_faults));
        }
        let (balloon_low, balloon_high) = memo.balloon_at_sample_mib;
        let available_bytes = match (stats.available_bytes, stats.free_bytes) {
            (Some(available), _) => available,
            (None, Some(free)) => free.saturating_add(stats.disk_caches_bytes.unwrap_or(0)),
            (None, None) => return w,
        };
        let total = floor_mib(total_bytes);
        let max = limits.maximum_mib;
        // Linux counts the balloon in its total with deflate-on-oom, and not without: a total
        // above what the balloon leaves the guest can only be one that includes it (a small
        // balloon that hides in the kernel's own reservations counts as demand: safe side).
        let in_total = |balloon: u64| {
            if total.saturating_add(balloon) > max {
                balloon.min(total)
            } else {
                0
            }
        };
        let demand_of = |balloon: u64| {
            ceil_mib(
                total_bytes
                    .saturating_sub(available_bytes)
                    .saturating_sub(in_total(balloon).saturating_mul(MIB)),
            )
        };
        // Guest RAM the guest kernel does not count in its total (its code, its page
        // structures): RAM outside the balloon less the guest's own usable total.
        let overhead_of = |balloon: u64| {
            max.saturating_sub(balloon)
                .saturating_sub(total.saturating_sub(in_total(balloon)))
        };
        // While the balloon moves, demand is known within a range: memory is taken only
        // above the high end's target and given only below the low end's.
        let demand = demand_of(balloon_low);
        let target_high = limits.target_for(demand, overhead_of(balloon_low));
        let target_low = limits.target_for(demand_of(balloon_high), overhead_of(balloon_high));
        let available = floor_mib(available_bytes);
        let usable_total = total.saturating_sub(in_total(balloon_high));
        w.demand = Some(demand);

        let faulting = match (fresh, previous, stats.major_faults) {
            (true, Some((then, Some(before))), Some(faults)) if faults > before => {
                let secs = at
                    .duration_since(then)
                    .unwrap_or(NOMINAL_STEP)
                    .as_secs_f64();
                (faults - before) as f64 / secs.max(0.001) >= self.params.major_faults_per_s as f64
            }
            _ => false,
        };
        let low = u128::from(available) * 100
            < u128::from(usable_total) * u128::from(self.params.low_available_percent);
        let usable_now = max.saturating_sub(current_balloon);
        let mut target = if (target_low..=target_high).contains(&usable_now) {
            usable_now
        } else {
            target_high
        };
        w.reason = if faulting || low {
            memo.hold_left = self.params.pressure_hold;
            // What it wants, as far as anyone can tell: what it has plus its buffer share.
            // [`Balancer::share`] then gives it whatever else the budget can spare.
            let grow = u128::from(usable_now) * u128::from(limits.buffer_percent) / 100;
            let grow = u64::try_from(grow).unwrap_or(u64::MAX);
            let grown = usable_now.saturating_add(grow.max(PRESSURE_GROW_MIN_MIB));
            target = target.max(grown.min(max));
            if faulting {
                Reason::PressureMajorFaults
            } else {
                Reason::PressureLowAvailable
            }
        } else if !memo.hold_left.is_zero() && target < usable_now {
            // It wants `target`; it keeps the rest only while no pressured VM needs it
            // ([`Balancer::share`]).
            w.held_mib = Some(usable_now.clamp(limits.minimum_mib, max));
            Reason::RecentPressure
        } else {
            Reason::Steady
        };
        w.cap = Some(target);
        w
    }

    /// Fits the targets into the budget (water-filling by weight above the minimums) and
    /// sums up the host.
    fn share(&self, work: &mut [Work]) -> HostSummary {
        let budget = self.params.budget_mib;
        let mut fixed: u64 = 0;
        let mut summary = HostSummary {
            budget_mib: budget,
            ..Default::default()
        };
        for w in work.iter() {
            match w.cap {
                None => {
                    let usable = w.limits.maximum_mib.saturating_sub(w.current_balloon);
                    fixed = fixed.saturating_add(usable);
                    summary.demand_mib = summary
                        .demand_mib
                        .saturating_add(w.demand.unwrap_or(usable));
                }
                Some(cap) => {
                    summary.wanted_mib = summary.wanted_mib.saturating_add(cap);
                    summary.minimum_mib = summary.minimum_mib.saturating_add(w.limits.minimum_mib);
                    summary.demand_mib = summary.demand_mib.saturating_add(w.demand.unwrap_or(0));
                    if w.reason.pressured() {
                        summary.pressured_vms += 1;
                    }
                }
            }
        }
        summary.wanted_mib = summary.wanted_mib.saturating_add(fixed);
        summary.minimum_mib = summary.minimum_mib.saturating_add(fixed);
        summary.short = summary.wanted_mib > budget;
        summary.overcommitted = summary.minimum_mib > budget;

        if summary.short {
            let floors: u64 = work
                .iter()
                .filter(|w| w.cap.is_some())
                .map(|w| w.limits.minimum_mib)
                .fold(0, u64::saturating_add);
            let extra = budget.saturating_sub(fixed).saturating_sub(floors);
            // Water-filling: VMs that need less than their weighted share of what is left get
            // all they need; the others split the rest by weight.
            let mut open: Vec<usize> = (0..work.len()).filter(|&i| work[i].cap.is_some()).collect();
            let need = |w: &Work| w.cap.unwrap_or(0).saturating_sub(w.limits.minimum_mib);
            open.sort_by(|&a, &b| {
                let (wa, wb) = (&work[a], &work[b]);
                (u128::from(need(wa)) * u128::from(wb.limits.weight))
                    .cmp(&(u128::from(need(wb)) * u128::from(wa.limits.weight)))
            });
            let mut left = u128::from(extra);
            let mut weights: u128 = open
                .iter()
                .map(|&i| u128::from(work[i].limits.weight))
                .sum();
            let mut split_from = open.len();
            for (k, &i) in open.iter().enumerate() {
                let w = &work[i];
                let weight = u128::from(w.limits.weight);
                if u128::from(need(w)) * weights <= left * weight {
                    left -= u128::from(need(w));
                    weights -= weight;
                } else {
                    split_from = k;
                    break;
                }
            }
            for &i in &open[split_from..] {
                let w = &mut work[i];
                let share = (left * u128::from(w.limits.weight) / weights.max(1)) as u64;
                let given = w.limits.minimum_mib.saturating_add(share);
                if let Some(cap) = w.cap.as_mut() {
                    if given < *cap {
                        *cap = given;
                        if !w.reason.pressured() {
                            w.reason = Reason::HostShort;
                        }
                    }
                }
            }
        }
        // What is spare goes first to the guests under pressure now, then back to those that
        // were lately (their hold), so a hold never keeps memory from a guest that waits.
        let room = budget.saturating_sub(fixed);
        Self::give_spare(work, room, |w| {
            w.reason.pressured().then_some(w.limits.maximum_mib)
        });
        Self::give_spare(work, room, |w| w.held_mib);
        for w in work.iter_mut() {
            if let (Some(held), Some(cap)) = (w.held_mib, w.cap) {
                if cap < held {
                    w.reason = Reason::HostShort;
                }
            }
        }
        summary.assigned_mib = work
            .iter()
            .map(|w| match w.cap {
                Some(cap) => cap,
                None => w.limits.maximum_mib.saturating_sub(w.current_balloon),
            })
            .fold(0, u64::saturating_add);
        summary
    }

    /// Gives what the budget (less the memory of VMs left alone, `room`) can spare after every
    /// VM got its share to the VMs `limit` names, by weight, each up to its limit. Pressured
    /// VMs get up to their maximums: a guest short of memory cannot show how much it lacks,
    /// and growing it by a buffer share per step took seven steps to go from 128 to 476 MiB
    /// (`bench/memory`). What it does not need goes back at the bounded rate once the pressure
    /// hold is over.
    fn give_spare(work: &mut [Work], room: u64, limit: impl Fn(&Work) -> Option<u64>) {
        let given: u64 = work
            .iter()
            .filter_map(|w| w.cap)
            .fold(0, u64::saturating_add);
        let mut spare = u128::from(room.saturating_sub(given));
        let below_limit =
            |w: &Work| matches!((w.cap, limit(w)), (Some(cap), Some(up_to)) if cap < up_to);
        let mut open: Vec<usize> = (0..work.len()).filter(|&i| below_limit(&work[i])).collect();
        // Each round either fills a VM to its limit (and drops it) or spends all that is left.
        while spare > 0 && !open.is_empty() {
            let weights: u128 = open
                .iter()
                .map(|&i| u128::from(work[i].limits.weight))
                .sum();
            let mut spent = 0u128;
            for &i in &open {
                let up_to = limit(&work[i]).unwrap_or(0);
                let w = &mut work[i];
                let Some(cap) = w.cap.as_mut() else { continue };
                let room_left = u128::from(up_to.saturating_sub(*cap));
                // Rounding leaves shares of 0 when little is spare: then 1 MiB each in turn.
                let share = (spare * u128::from(w.limits.weight) / weights.max(1)).max(1);
                let add = share.min(room_left).min(spare - spent);
                *cap += add as u64;
                spent += add;
            }
            if spent == 0 {
                break;
            }
            spare -= spent;
            open.retain(|&i| below_limit(&work[i]));
        }
    }

    /// Moves the balloon toward `maximum − target`: at once when giving memory, at most one
    /// step ahead of the guest when taking it.
    fn decide(&self, vm: &VmInput, w: Work, step_mib: u64) -> Decision {
        let max = w.limits.maximum_mib;
        let current = w.current_balloon;
        let Some(target) = w.cap else {
            return Decision {
                vm_id: vm.vm_id.clone(),
                balloon_target_mib: current,
                previous_target_mib: current,
                changed: false,
                target_mib: max.saturating_sub(current),
                demand_mib: w.demand,
                reason: w.reason,
            };
        };
        let wanted = max.saturating_sub(target);
        let next = if wanted > current {
            let base = current.min(w.actual_balloon);
            wanted.min(current.max(base.saturating_add(step_mib)))
        } else {
            wanted
        };
        let moved = next.abs_diff(current);
        let changed =
            moved > 0 && (moved >= self.params.min_change_mib || next == 0 || w.reason.pressured());
        let reason = match w.reason {
            Reason::Steady if changed && next > current => Reason::Shrinking,
            Reason::Steady if changed => Reason::Growing,
            other => other,
        };
        Decision {
            vm_id: vm.vm_id.clone(),
            balloon_target_mib: if changed { next } else { current },
            previous_target_mib: current,
            changed,
            target_mib: target,
            demand_mib: w.demand,
            reason,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    fn at(ms: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_700_000_000) + Duration::from_millis(ms)
    }

    fn spec(startup: u64, minimum: u64, maximum: u64) -> MemorySpec {
        MemorySpec {
            startup_mib: startup,
            minimum_mib: minimum,
            maximum_mib: maximum,
            ..Default::default()
        }
    }

    /// One recorded reading of a VM, in MiB: when the guest posted its statistics (ms), its
    /// total and available memory, its major faults, and the balloon's actual size and target
    /// as the VMM reported them.
    #[derive(Debug, Clone, Copy)]
    struct Reading {
        posted_ms: u64,
        total: u64,
        available: u64,
        faults: Option<u64>,
        actual: u64,
        target: u64,
    }

    impl Reading {
        fn stats(&self) -> MemoryStats {
            MemoryStats {
                total_bytes: Some(self.total << 20),
                available_bytes: Some(self.available << 20),
                free_bytes: Some(self.available << 20),
                major_faults: self.faults,
                balloon_actual_mib: self.actual,
                balloon_target_mib: self.target,
                updated_at: Some(at(self.posted_ms).into()),
                ..Default::default()
            }
        }
    }

    fn input(vm_id: &str, spec: MemorySpec, stats: Option<MemoryStats>) -> VmInput {
        VmInput {
            vm_id: vm_id.to_string(),
            spec,
            stats,
        }
    }

    /// (posted s, total, available, major faults, balloon actual, balloon target) -> (the
    /// balloon target decided, the reason).
    type TraceRow = ((u64, u64, u64, Option<u64>, u64, u64), (u64, Reason));

    /// Runs a recorded trace of one VM: per row, the reading (taken 500 ms after the guest
    /// posted it) and what the balancer must decide: the balloon target and the reason.
    fn run_trace(balancer: &mut Balancer, spec: MemorySpec, rows: &[TraceRow]) -> Vec<Decision> {
        let mut out = Vec::new();
        for (i, &((posted_s, total, available, faults, actual, target), want)) in
            rows.iter().enumerate()
        {
            let reading = Reading {
                posted_ms: posted_s * 1000,
                total,
                available,
                faults,
                actual,
                target,
            };
            let now = at(posted_s * 1000 + 500);
            let plan = balancer.step(now, &[input("vm", spec, Some(reading.stats()))]);
            let d = plan.vms[0].clone();
            assert_eq!(
                (d.balloon_target_mib, d.reason),
                want,
                "row {i} ({reading:?}): {d:?}"
            );
            assert_eq!(d.changed, d.balloon_target_mib != target, "row {i}: {d:?}");
            out.push(d);
        }
        out
    }

    #[test]
    fn defaults_and_disorder_in_a_spec_are_resolved() {
        let l = Limits::of(&spec(512, 0, 0));
        assert_eq!(
            (l.startup_mib, l.minimum_mib, l.maximum_mib),
            (512, 512, 512)
        );
        assert!(l.is_static());
        assert_eq!(l.buffer_percent, DEFAULT_BUFFER_PERCENT);
        assert_eq!(l.weight, DEFAULT_WEIGHT);
        let l = Limits::of(&MemorySpec {
            startup_mib: 2048,
            minimum_mib: 4096,
            maximum_mib: 1024,
            buffer_percent: 50,
            weight: 99_999,
        });
        assert_eq!(
            (l.startup_mib, l.minimum_mib, l.maximum_mib),
            (1024, 1024, 1024)
        );
        assert_eq!((l.buffer_percent, l.weight), (50, MAX_WEIGHT));
        let l = Limits::of(&spec(256, 96, 1024));
        assert_eq!(l.target_for(100, 24), 144);
        assert_eq!(l.target_for(10, 0), 96, "never below the minimum");
        assert_eq!(
            l.target_for(u64::MAX, u64::MAX),
            1024,
            "never above the maximum"
        );
    }

    /// A Linux guest with deflate-on-oom (the balloon counts in its total of 1000 MiB; 24 MiB
    /// of its 1024 MiB are the kernel's), 100 MiB in use, following each target within the
    /// second. It goes to max(minimum, 100 × 1.2 + 24) = 256 MiB, taking 256 MiB a second at
    /// most, and stays there.
    #[test]
    fn an_idle_vm_shrinks_toward_demand_plus_buffer_at_the_bounded_rate() {
        let mut balancer = Balancer::new(Params::default());
        // (posted s, total, available, faults, actual, target) -> (balloon target, reason)
        let trace = [
            ((0, 1000, 900, None, 0, 0), (256, Reason::Shrinking)),
            ((1, 1000, 644, None, 256, 256), (512, Reason::Shrinking)),
            // The balloon moved around this sample: demand is 100..356 MiB, so the next
            // target comes from the high end (356 × 1.2 + 24 = 452: balloon 572).
            ((2, 1000, 388, None, 512, 512), (572, Reason::Shrinking)),
            ((3, 1000, 328, None, 572, 572), (768, Reason::Shrinking)),
            ((4, 1000, 132, None, 768, 768), (768, Reason::Steady)),
            ((5, 1000, 132, None, 768, 768), (768, Reason::Steady)),
        ];
        let decisions = run_trace(&mut balancer, spec(1024, 256, 1024), &trace);
        for pair in decisions.windows(2) {
            assert!(pair[1].balloon_target_mib - pair[0].balloon_target_mib <= 256);
        }
        let last = decisions.last().expect("decisions");
        assert_eq!(last.demand_mib, Some(100));
        assert_eq!(last.target_mib, 256);
    }

    /// A guest slower than the rate: the target never runs more than one step (256 MiB) ahead
    /// of what the guest has given.
    #[test]
    fn the_target_never_runs_a_step_ahead_of_a_slow_guest() {
        let mut balancer = Balancer::new(Params::default());
        let spec = spec(4096, 512, 4096);
        let (mut actual, mut target) = (0u64, 0u64);
        for second in 0..60u64 {
            let reading = Reading {
                posted_ms: second * 1000,
                total: 4000,
                available: 3800 - actual,
                faults: None,
                actual,
                target,
            };
            let plan = balancer.step(
                at(second * 1000 + 500),
                &[input("slow", spec, Some(reading.stats()))],
            );
            target = plan.vms[0].balloon_target_mib;
            assert!(
                target <= actual + 256 || target == reading.target,
                "second {second}: target {target} with actual {actual}"
            );
            actual = (actual + 100).min(target);
        }
        // 200 MiB in use, +20 % + 96 MiB kernel: 336 < minimum 512 → balloon 3584.
        assert_eq!((target, actual), (3584, 3584));
    }

    /// Demand grows: a little, and the VM gets its target at once (not at the bounded rate);
    /// a lot, so that available memory runs low, and it gets its maximum at once.
    #[test]
    fn a_vm_whose_demand_grows_gets_memory_back_within_one_step() {
        let mut balancer = Balancer::new(Params::default());
        // 2048 MiB guest, 48 MiB kernel overhead; settled at 500 MiB demand: balloon 1400.
        let trace = [
            ((0, 2000, 100, None, 1400, 1400), (1400, Reason::Steady)),
            // 540 in use: 540 × 1.2 + 48 = 696 → balloon 1352 in one step.
            ((1, 2000, 60, None, 1400, 1400), (1352, Reason::Growing)),
            // 590 in use, 58 MiB available of 648: under 10 % → pressure: its maximum at once.
            (
                (2, 2000, 58, None, 1352, 1352),
                (0, Reason::PressureLowAvailable),
            ),
        ];
        run_trace(&mut balancer, spec(2048, 256, 2048), &trace);
    }

    #[test]
    fn major_fault_growth_deflates_at_once_and_holds_the_memory_a_while() {
        let mut balancer = Balancer::new(Params::default());
        // Settled at 100 MiB demand (balloon 768); then 3000 major faults in a second.
        let trace = [
            ((0, 1000, 132, Some(50), 768, 768), (768, Reason::Steady)),
            ((1, 1000, 132, Some(60), 768, 768), (768, Reason::Steady)),
            // Its maximum at once.
            (
                (2, 1000, 132, Some(3060), 768, 768),
                (0, Reason::PressureMajorFaults),
            ),
            // The faults stop and demand is as low as before: for the hold (3 s) nothing is
            // taken back.
            (
                (3, 1000, 900, Some(3061), 0, 0),
                (0, Reason::RecentPressure),
            ),
            (
                (4, 1000, 900, Some(3061), 0, 0),
                (0, Reason::RecentPressure),
            ),
            // Then the surplus goes back at the bounded rate.
            ((5, 1000, 900, Some(3061), 0, 0), (256, Reason::Shrinking)),
            (
                (6, 1000, 900, Some(3061), 256, 256),
                (512, Reason::Shrinking),
            ),
        ];
        run_trace(&mut balancer, spec(1024, 256, 1024), &trace);
    }

    /// A pressured guest gets, in one step, what the budget can spare once every VM has its
    /// share, up to its maximum; several pressured guests split the spare by weight, and a VM
    /// that is not pressured keeps its target.
    #[test]
    fn pressured_guests_get_what_the_budget_can_spare_at_once() {
        let mut balancer = Balancer::new(Params {
            budget_mib: 2000,
            ..Params::default()
        });
        let vm = |weight| MemorySpec {
            startup_mib: 256,
            minimum_mib: 128,
            maximum_mib: 1024,
            buffer_percent: 20,
            weight,
        };
        // Guests count all their usable memory; `used` of `usable` in use, balloon at 1024 −
        // usable.
        let reading = |usable: u64, used: u64| Reading {
            posted_ms: 0,
            total: usable,
            available: usable - used,
            faults: None,
            actual: 1024 - usable,
            target: 1024 - usable,
        };
        let inputs = [
            // 300 in use of 300: pressured. Wants 300 + 20 %; weight 3000.
            input("a", vm(3000), Some(reading(300, 300).stats())),
            // 200 of 200: pressured. Wants 240; weight 1000.
            input("b", vm(1000), Some(reading(200, 200).stats())),
            // Idle, 100 of 400 in use: wants 120, its minimum 128.
            input("c", vm(5000), Some(reading(400, 100).stats())),
        ];
        let plan = balancer.step(at(500), &inputs);
        let got: Vec<(u64, Reason)> = plan.vms.iter().map(|d| (d.target_mib, d.reason)).collect();
        // Wanted 360 + 240 + 128 = 728; 1272 spare, 3:1. a's share (954) tops it up to its
        // maximum (664) and b gets 318 by weight; then b takes the 290 a could not.
        assert_eq!(
            got,
            [
                (1024, Reason::PressureLowAvailable),
                (240 + 318 + 290, Reason::PressureLowAvailable),
                (128, Reason::Shrinking),
            ]
        );
        assert_eq!(plan.host.wanted_mib, 728);
        assert_eq!(plan.host.assigned_mib, 2000);
        assert!(!plan.host.short);
        // The balloons: given at once for a and b.
        let balloons: Vec<u64> = plan.vms.iter().map(|d| d.balloon_target_mib).collect();
        assert_eq!(balloons[..2], [0, 1024 - 848]);
    }

    /// A VM in its pressure hold keeps its memory only while nobody waits: when another guest
    /// comes under pressure, the held surplus goes to it (taken at the bounded rate).
    #[test]
    fn a_pressure_hold_yields_to_a_guest_under_pressure_now() {
        let mut balancer = Balancer::new(Params {
            budget_mib: 1000,
            ..Params::default()
        });
        let spec = spec(256, 128, 1024);
        let reading = |posted_ms, usable: u64, used: u64| Reading {
            posted_ms,
            total: usable,
            available: usable - used,
            faults: None,
            actual: 1024 - usable,
            target: 1024 - usable,
        };
        // a is under pressure (256 of 256 in use), b idle: a gets all b does not want.
        let plan = balancer.step(
            at(500),
            &[
                input("a", spec, Some(reading(0, 256, 256).stats())),
                input("b", spec, Some(reading(0, 256, 50).stats())),
            ],
        );
        assert_eq!(plan.vms[0].target_mib, 1000 - 128);
        // a's peak is over (100 in use of 872): its hold keeps the memory while b is idle.
        let plan = balancer.step(
            at(1500),
            &[
                input("a", spec, Some(reading(1000, 872, 100).stats())),
                input("b", spec, Some(reading(1000, 128, 50).stats())),
            ],
        );
        let got: Vec<(u64, Reason)> = plan.vms.iter().map(|d| (d.target_mib, d.reason)).collect();
        assert_eq!(got, [(872, Reason::RecentPressure), (128, Reason::Steady)]);
        // Now b waits for memory: it gets a's surplus above a's own want (100 + 20 % + its
        // overhead 0 = 120, its minimum 128), though a's hold is not over.
        let plan = balancer.step(
            at(2500),
            &[
                input("a", spec, Some(reading(2000, 872, 100).stats())),
                input("b", spec, Some(reading(2000, 128, 128).stats())),
            ],
        );
        let got: Vec<(u64, Reason)> = plan.vms.iter().map(|d| (d.target_mib, d.reason)).collect();
        assert_eq!(
            got,
            [
                (128, Reason::HostShort),
                (872, Reason::PressureLowAvailable)
            ]
        );
        // a gives it up at the bounded rate; b's balloon target is set at once.
        assert_eq!(plan.vms[0].balloon_target_mib, (1024 - 872) + 256);
        assert_eq!(plan.vms[1].balloon_target_mib, 1024 - 872);
    }

    /// The host's budget does not hold every target: minimums first, then the rest by weight,
    /// a VM that needs less than its share gets just what it needs.
    #[test]
    fn a_short_host_shares_by_weight_above_the_minimums() {
        let params = Params {
            budget_mib: 1000,
            ..Params::default()
        };
        let mut balancer = Balancer::new(params);
        let vm = |minimum, weight| MemorySpec {
            startup_mib: 1000,
            minimum_mib: minimum,
            maximum_mib: 1000,
            buffer_percent: 100,
            weight,
        };
        // The guests count all of their 1000 MiB (no overhead); buffer 100 %: target 2 × demand.
        let reading = |demand: u64| Reading {
            posted_ms: 0,
            total: 1000,
            available: 1000 - demand,
            faults: None,
            actual: 0,
            target: 0,
        };
        let inputs = [
            input("a", vm(100, 5000), Some(reading(250).stats())),
            input("b", vm(100, 10_000), Some(reading(250).stats())),
            input("c", vm(200, 1000), Some(reading(110).stats())),
        ];
        let plan = balancer.step(at(500), &inputs);
        let targets: Vec<(u64, Reason)> =
            plan.vms.iter().map(|d| (d.target_mib, d.reason)).collect();
        // Wanted 500 + 500 + 220 = 1220; minimums 400; 600 to share. c needs 20 (< its share):
        // 220. The remaining 580 go 1:2 to a and b.
        assert_eq!(
            targets,
            [
                (100 + 193, Reason::HostShort),
                (100 + 386, Reason::HostShort),
                (220, Reason::Shrinking),
            ]
        );
        assert_eq!(
            plan.host,
            HostSummary {
                budget_mib: 1000,
                demand_mib: 610,
                wanted_mib: 1220,
                assigned_mib: 999,
                minimum_mib: 400,
                short: true,
                overcommitted: false,
                pressured_vms: 0,
            }
        );
        // Balloons move at the bounded rate toward the shared targets.
        let balloons: Vec<u64> = plan.vms.iter().map(|d| d.balloon_target_mib).collect();
        assert_eq!(balloons, [256, 256, 256]);

        // Not even the minimums fit: every VM at its minimum, none below.
        let mut balancer = Balancer::new(Params {
            budget_mib: 300,
            ..Params::default()
        });
        let plan = balancer.step(at(500), &inputs);
        let targets: Vec<u64> = plan.vms.iter().map(|d| d.target_mib).collect();
        assert_eq!(targets, [100, 100, 200]);
        assert!(plan.host.short && plan.host.overcommitted);
    }

    #[test]
    fn vms_without_fresh_statistics_keep_their_balloon_and_count_against_the_budget() {
        let mut balancer = Balancer::new(Params {
            budget_mib: 2000,
            ..Params::default()
        });
        let vmm_only = MemoryStats {
            balloon_target_mib: 512,
            balloon_actual_mib: 300,
            ..Default::default()
        };
        let stale = Reading {
            posted_ms: 0,
            total: 1000,
            available: 900,
            faults: None,
            actual: 0,
            target: 0,
        };
        let now = at(60_000);
        let inputs = [
            // The VMM has not answered yet: at startup (balloon 1024 − 256).
            input("no-vmm", spec(256, 128, 1024), None),
            // The VMM answers, the guest has not reported: the balloon stays at 512.
            input("no-guest", spec(512, 128, 1024), Some(vmm_only)),
            // A minute-old report.
            input("stale", spec(1024, 128, 1024), Some(stale.stats())),
        ];
        let plan = balancer.step(now, &inputs);
        let got: Vec<(u64, bool, u64, Reason)> = plan
            .vms
            .iter()
            .map(|d| (d.balloon_target_mib, d.changed, d.target_mib, d.reason))
            .collect();
        assert_eq!(
            got,
            [
                (768, false, 256, Reason::NoStats),
                (512, false, 512, Reason::NoStats),
                (0, false, 1024, Reason::Stale),
            ]
        );
        assert_eq!(plan.host.assigned_mib, 256 + 512 + 1024);
        assert!(!plan.host.short);
    }

    #[test]
    fn static_memory_is_never_ballooned() {
        let mut balancer = Balancer::new(Params {
            budget_mib: 100,
            ..Params::default()
        });
        let idle = Reading {
            posted_ms: 0,
            total: 1000,
            available: 990,
            faults: None,
            actual: 0,
            target: 0,
        };
        for second in 0..5 {
            let reading = Reading {
                posted_ms: second * 1000,
                ..idle
            };
            let plan = balancer.step(
                at(second * 1000 + 500),
                &[
                    input("static", spec(1024, 1024, 1024), Some(reading.stats())),
                    input("startup-only", spec(1024, 0, 0), Some(reading.stats())),
                ],
            );
            for d in &plan.vms {
                assert_eq!(
                    (d.balloon_target_mib, d.changed, d.reason),
                    (0, false, Reason::Static),
                    "{d:?}"
                );
            }
            assert!(plan.host.overcommitted);
        }
    }

    /// The same guest without deflate-on-oom: Linux takes the balloon out of its total; the
    /// balancer gets there by a slightly different path (its kernel overhead is what is
    /// uncertain while the balloon moves) to the same demand and balloon.
    #[test]
    fn a_guest_that_leaves_the_balloon_out_of_its_total_has_the_same_demand() {
        let mut balancer = Balancer::new(Params::default());
        let trace = [
            ((0, 1000, 900, None, 0, 0), (256, Reason::Shrinking)),
            ((1, 744, 644, None, 256, 256), (512, Reason::Shrinking)),
            ((2, 488, 388, None, 512, 512), (624, Reason::Shrinking)),
            ((3, 376, 276, None, 624, 624), (768, Reason::Shrinking)),
            ((4, 232, 132, None, 768, 768), (768, Reason::Steady)),
            ((5, 232, 132, None, 768, 768), (768, Reason::Steady)),
        ];
        let decisions = run_trace(&mut balancer, spec(1024, 256, 1024), &trace);
        assert_eq!(decisions.last().and_then(|d| d.demand_mib), Some(100));
    }

    /// Whatever the guest and the controller send, the balancer neither panics nor puts a
    /// balloon beyond guest RAM or a balanced VM below its minimum.
    #[test]
    fn arbitrary_inputs_do_not_panic_and_keep_the_bounds() {
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut pick = move |choices: &[u64]| {
            let r = next();
            if r % 3 == 0 {
                r
            } else {
                choices[(r % choices.len() as u64) as usize]
            }
        };
        let mut balancer = Balancer::new(Params {
            budget_mib: 3000,
            ..Params::default()
        });
        for step in 0..3000u64 {
            let mut inputs = Vec::new();
            for vm in 0..4 {
                let values = [0, 1, 96, 256, 1024, u64::MAX, u64::MAX >> 20];
                let spec = MemorySpec {
                    startup_mib: pick(&values),
                    minimum_mib: pick(&values),
                    maximum_mib: pick(&values),
                    buffer_percent: pick(&[0, 1, 20, 2000]) as u32,
                    weight: pick(&[0, 1, 5000, 10_000]) as u32,
                };
                let some = |v: u64| (!v.is_multiple_of(5)).then_some(v);
                let stats = (pick(&[0, 1]) != 0).then(|| MemoryStats {
                    total_bytes: some(pick(&values)),
                    available_bytes: some(pick(&values)),
                    free_bytes: some(pick(&values)),
                    disk_caches_bytes: some(pick(&values)),
                    major_faults: some(pick(&values)),
                    balloon_actual_mib: pick(&values),
                    balloon_target_mib: pick(&values),
                    updated_at: Some(prost_types::Timestamp {
                        seconds: pick(&[0, 1_700_000_000, u64::MAX]) as i64,
                        nanos: pick(&[0, 999_999_999, u64::MAX]) as i32,
                    }),
                    ..Default::default()
                });
                inputs.push(input(&format!("vm-{vm}"), spec, stats));
            }
            let now = at(pick(&[step * 1000, 0, u64::MAX >> 30]));
            let plan = balancer.step(now, &inputs);
            for (d, vm) in plan.vms.iter().zip(&inputs) {
                let limits = Limits::of(&vm.spec);
                if d.changed {
                    assert!(d.balloon_target_mib <= limits.maximum_mib, "{d:?} {vm:?}");
                    assert!(d.target_mib >= limits.minimum_mib, "{d:?} {vm:?}");
                }
            }
        }
    }
}
