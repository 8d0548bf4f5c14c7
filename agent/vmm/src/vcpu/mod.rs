//! vCPU threads: one per vCPU, each running `KVM_RUN` and routing port and MMIO exits to the
//! buses. Nothing async here: an exit is handled on the thread that took it.
//!
//! Pausing and stopping: the controller of the threads sets the wanted [`RunState`] and kicks
//! each thread with a real-time signal until it acknowledges, so a vCPU blocked in `KVM_RUN`
//! (a halted guest never exits to user space) still comes back promptly.
//!
//! Diagnosis: [`VcpuThreads::dump_state`] kicks every thread out of `KVM_RUN` once; each logs
//! where its guest is (registers, control registers, run state) and carries on. fabric-vmm does
//! this on SIGUSR2, so a guest that stopped making progress can be located without stopping it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use super::devices::bus::{lock, Bus};

/// Why the VM stopped running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest reset or powered off: a normal end.
    GuestStopped(&'static str),
    /// The VMM was asked to stop the guest (forced shutdown).
    Forced,
    /// The guest hit something KVM could not run, or a KVM call failed.
    Failed(String),
}

/// The host's lease as the vCPUs enforce it: its expiry on CLOCK_BOOTTIME, nanoseconds
/// (`u64::MAX`: no lease). One VM per process, so one value per process; set by whoever reads
/// the lease file ([`set_lease_expiry`]).
static LEASE_EXPIRY_BOOTTIME_NS: AtomicU64 = AtomicU64::new(u64::MAX);

/// Sets the lease every vCPU checks before each entry into the guest. A vCPU that finds it
/// expired does not enter the guest again and ends the VM: a VMM that was paused (SIGSTOP,
/// a suspended host) past its lease runs not one more guest instruction when it resumes,
/// even before the thread that watches the lease file has looked.
pub fn set_lease_expiry(expires_boottime_ns: u64) {
    LEASE_EXPIRY_BOOTTIME_NS.store(expires_boottime_ns, Ordering::SeqCst);
}

fn lease_expired() -> bool {
    let expiry = LEASE_EXPIRY_BOOTTIME_NS.load(Ordering::SeqCst);
    expiry != u64::MAX && fabric_vmm_api::lease::boottime_ns() >= expiry
}

/// What the vCPU threads should be doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    Running,
    Paused,
    Stopped,
}

struct Shared {
    wanted: RunState,
    /// vCPUs that have seen `wanted` and parked (paused or exited).
    parked: usize,
}

/// Shared between the vCPU threads and whoever runs the VM.
pub struct VcpuControl {
    shared: Mutex<Shared>,
    changed: Condvar,
    exit_reason: Mutex<Option<ExitReason>>,
    exit_event: EventFd,
    /// Bumped by each state dump request; each vCPU dumps once per new value.
    dump_generation: AtomicU64,
}

impl VcpuControl {
    pub fn new(exit_event: EventFd) -> Arc<VcpuControl> {
        Arc::new(VcpuControl {
            shared: Mutex::new(Shared {
                wanted: RunState::Running,
                parked: 0,
            }),
            changed: Condvar::new(),
            exit_reason: Mutex::new(None),
            exit_event,
            dump_generation: AtomicU64::new(0),
        })
    }

    /// Records why the VM ends (the first reason wins) and wakes the event loop.
    pub fn request_exit(&self, reason: ExitReason) {
        let mut slot = lock(&self.exit_reason);
        if slot.is_none() {
            *slot = Some(reason);
        }
        drop(slot);
        if let Err(err) = self.exit_event.write(1) {
            tracing::error!(error = %err, "cannot signal VM exit");
        }
    }

    pub fn exit_reason(&self) -> Option<ExitReason> {
        lock(&self.exit_reason).clone()
    }
}

/// Signal used to kick vCPU threads out of `KVM_RUN`.
fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Nothing to do: delivery alone makes KVM_RUN return EINTR.
}

/// Installs the kick handler; call once before starting vCPU threads.
pub fn install_kick_handler() -> std::io::Result<()> {
    register_signal_handler(kick_signal(), handle_kick)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
}

/// One vCPU, ready to run.
pub struct Vcpu {
    pub id: u32,
    pub fd: VcpuFd,
    pub pio: Bus,
    pub mmio: Bus,
}

/// The running vCPU threads.
pub struct VcpuThreads {
    handles: Vec<JoinHandle<()>>,
    control: Arc<VcpuControl>,
}

impl VcpuThreads {
    pub fn start(vcpus: Vec<Vcpu>, control: Arc<VcpuControl>) -> std::io::Result<VcpuThreads> {
        let mut handles = Vec::with_capacity(vcpus.len());
        for vcpu in vcpus {
            let control = control.clone();
            let handle = std::thread::Builder::new()
                .name(format!("vcpu{}", vcpu.id))
                .spawn(move || run_vcpu(vcpu, control))?;
            handles.push(handle);
        }
        Ok(VcpuThreads { handles, control })
    }

    /// Asks every vCPU to log its state once (registers, control registers, run state),
    /// without stopping the guest.
    pub fn dump_state(&self) {
        self.control.dump_generation.fetch_add(1, Ordering::SeqCst);
        for handle in &self.handles {
            if !handle.is_finished() {
                let _ = handle.kill(kick_signal());
            }
        }
    }

    /// Moves every vCPU to `state` and waits until all have parked (for Paused/Stopped).
    pub fn set_state(&self, state: RunState, timeout: Duration) -> bool {
        {
            let mut shared = lock(&self.control.shared);
            if shared.wanted == RunState::Stopped {
                return state == RunState::Stopped;
            }
            shared.wanted = state;
            shared.parked = 0;
            self.control.changed.notify_all();
        }
        if state == RunState::Running {
            return true;
        }
        let deadline = Instant::now() + timeout;
        loop {
            for handle in &self.handles {
                if !handle.is_finished() {
                    let _ = handle.kill(kick_signal());
                }
            }
            let shared = lock(&self.control.shared);
            let (shared, _) = self
                .control
                .changed
                .wait_timeout(shared, Duration::from_millis(2))
                .unwrap_or_else(|p| p.into_inner());
            let finished = self.handles.iter().filter(|h| h.is_finished()).count();
            if shared.parked + finished >= self.handles.len() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
        }
    }
}

/// Parks while paused; returns false when the thread should end.
fn wait_while_parked(control: &VcpuControl) -> bool {
    let mut shared = lock(&control.shared);
    match shared.wanted {
        RunState::Running => true,
        RunState::Stopped => {
            shared.parked += 1;
            control.changed.notify_all();
            false
        }
        RunState::Paused => {
            shared.parked += 1;
            control.changed.notify_all();
            while shared.wanted == RunState::Paused {
                shared = control
                    .changed
                    .wait(shared)
                    .unwrap_or_else(|p| p.into_inner());
            }
            if shared.wanted == RunState::Stopped {
                shared.parked += 1;
                control.changed.notify_all();
                return false;
            }
            true
        }
    }
}

fn run_vcpu(mut vcpu: Vcpu, control: Arc<VcpuControl>) {
    let id = vcpu.id;
    let mut dumped = 0;
    loop {
        if !wait_while_parked(&control) {
            return;
        }
        let wanted_dump = control.dump_generation.load(Ordering::SeqCst);
        if wanted_dump != dumped {
            dumped = wanted_dump;
            log_state(id, &vcpu.fd);
        }
        if lease_expired() {
            tracing::warn!(
                vcpu = id,
                "the host's lease expired: not entering the guest again"
            );
            control.request_exit(ExitReason::Forced);
            return;
        }
        match vcpu.fd.run() {
            Ok(exit) => match exit {
                VcpuExit::IoIn(port, data) => {
                    vcpu.pio.read(port as u64, data);
                }
                VcpuExit::IoOut(port, data) => {
                    vcpu.pio.write(port as u64, data);
                }
                VcpuExit::MmioRead(addr, data) => {
                    if !vcpu.mmio.read(addr, data) {
                        data.fill(0);
                    }
                }
                VcpuExit::MmioWrite(addr, data) => {
                    vcpu.mmio.write(addr, data);
                }
                VcpuExit::Hlt => {
                    // With the in-kernel irqchip HLT stays in KVM; if it ever comes out,
                    // the guest has halted for good.
                    control.request_exit(ExitReason::GuestStopped("halt"));
                    return;
                }
                VcpuExit::Shutdown => {
                    // Triple fault: how `reboot=t` (and a crashing kernel) resets.
                    control.request_exit(ExitReason::GuestStopped("triple fault reset"));
                    return;
                }
                VcpuExit::SystemEvent(kind, _) => {
                    let reason = match kind {
                        kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => "poweroff",
                        kvm_bindings::KVM_SYSTEM_EVENT_RESET => "reset",
                        _ => "system event",
                    };
                    control.request_exit(ExitReason::GuestStopped(reason));
                    return;
                }
                VcpuExit::InternalError => {
                    let detail = internal_error_detail(&mut vcpu.fd);
                    tracing::error!(vcpu = id, %detail, "KVM internal error");
                    control.request_exit(ExitReason::Failed(format!(
                        "vCPU {id}: KVM internal error ({detail})"
                    )));
                    return;
                }
                VcpuExit::FailEntry(reason, cpu) => {
                    control.request_exit(ExitReason::Failed(format!(
                        "vCPU {id}: VM entry failed (hardware reason {reason:#x}, cpu {cpu})"
                    )));
                    return;
                }
                VcpuExit::Intr | VcpuExit::IrqWindowOpen => {}
                other => {
                    tracing::warn!(vcpu = id, exit = ?other, "unhandled vCPU exit");
                }
            },
            Err(err) if err.errno() == libc::EINTR || err.errno() == libc::EAGAIN => {
                vcpu.fd.set_kvm_immediate_exit(0);
            }
            Err(err) => {
                control.request_exit(ExitReason::Failed(format!("vCPU {id}: KVM_RUN: {err}")));
                return;
            }
        }
    }
}

/// Logs where the vCPU is: enough to find the guest function it runs (or halts in) with the
/// guest kernel's symbol table.
fn log_state(id: u32, fd: &VcpuFd) {
    let regs = fd.get_regs();
    let sregs = fd.get_sregs();
    let mp_state = fd.get_mp_state();
    match (regs, sregs) {
        (Ok(r), Ok(s)) => tracing::warn!(
            vcpu = id,
            rip = format_args!("{:#x}", r.rip),
            rsp = format_args!("{:#x}", r.rsp),
            rflags = format_args!("{:#x}", r.rflags),
            rax = format_args!("{:#x}", r.rax),
            rdi = format_args!("{:#x}", r.rdi),
            cs = format_args!("{:#x}", s.cs.selector),
            cr0 = format_args!("{:#x}", s.cr0),
            cr3 = format_args!("{:#x}", s.cr3),
            cr4 = format_args!("{:#x}", s.cr4),
            mp_state = mp_state.map(|m| m.mp_state).unwrap_or(u32::MAX),
            interrupt_bitmap = ?s.interrupt_bitmap,
            "vCPU state"
        ),
        (Err(e), _) | (_, Err(e)) => {
            tracing::warn!(vcpu = id, error = %e, "vCPU state: cannot read registers")
        }
    }
}

fn internal_error_detail(fd: &mut VcpuFd) -> String {
    let run = fd.get_kvm_run();
    // SAFETY: after a KVM_EXIT_INTERNAL_ERROR exit, KVM has filled the `internal` member of
    // the exit union; it is plain integers.
    let internal = unsafe { run.__bindgen_anon_1.internal };
    let n = (internal.ndata as usize).min(internal.data.len());
    let suberror = match internal.suberror {
        1 => "emulation failure",
        2 => "simultaneous exception",
        3 => "delivery event",
        4 => "unexpected exit reason",
        _ => "unknown",
    };
    format!(
        "suberror {} {suberror}, data {:x?}",
        internal.suberror,
        &internal.data[..n]
    )
}
