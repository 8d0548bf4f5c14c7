//! Runs a built VM: starts the vCPU threads and serves one epoll loop for everything that is
//! not a vCPU exit — guest reset, control requests, console input, device work (virtio queue
//! notifications, through each device's [`EventSubscriber`] fds) — until the VM ends.
//!
//! SIGUSR2 asks every vCPU to log its state ([`VcpuThreads::dump_state`]); it arrives through
//! a signalfd, so the process must keep SIGUSR2 blocked in every thread ([`block_dump_signal`]
//! before any thread starts).

use std::io::Read;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::builder::BuiltVm;
use super::devices::boot_timer::BootTime;
use super::devices::bus::lock;
use super::devices::EventSubscriber;
use super::vcpu::{install_kick_handler, ExitReason, RunState, VcpuControl, VcpuThreads};

/// The VM's lifecycle state, as the control endpoint reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmState {
    Created,
    Running,
    Paused,
    ShuttingDown,
    Stopped,
}

/// A request to the running VM, from the control endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Pause,
    Resume,
    /// Press Ctrl-Alt-Del on the guest's keyboard (graceful shutdown request).
    CtrlAltDel,
    /// Stop the guest now.
    ForceStop,
}

/// A command with the channel its result goes back on.
pub struct Request {
    pub command: Command,
    pub reply: mpsc::Sender<Result<(), String>>,
}

/// Facts about the VM that the control endpoint reads without asking the event loop.
pub struct VmInfo {
    pub vcpus: u32,
    pub memory_mib: u64,
    pub started: Instant,
    pub boot_time: BootTime,
    state: tokio::sync::watch::Sender<VmState>,
    exit_reason: Mutex<Option<ExitReason>>,
}

impl VmInfo {
    pub fn new(vcpus: u32, memory_mib: u64, started: Instant, boot_time: BootTime) -> Arc<VmInfo> {
        Arc::new(VmInfo {
            vcpus,
            memory_mib,
            started,
            boot_time,
            state: tokio::sync::watch::Sender::new(VmState::Created),
            exit_reason: Mutex::new(None),
        })
    }

    pub fn state(&self) -> VmState {
        *self.state.borrow()
    }

    pub fn set_state(&self, state: VmState) {
        self.state.send_replace(state);
    }

    /// A receiver that sees every state change.
    pub fn watch(&self) -> tokio::sync::watch::Receiver<VmState> {
        self.state.subscribe()
    }

    pub fn exit_reason(&self) -> Option<ExitReason> {
        lock(&self.exit_reason).clone()
    }
}

/// The sending side of the control channel: requests plus an eventfd that wakes the loop.
#[derive(Clone)]
pub struct ControlSender {
    tx: mpsc::Sender<Request>,
    wake: Arc<EventFd>,
}

impl ControlSender {
    /// Sends `command` and waits (blocking) for its result.
    pub fn call(&self, command: Command) -> Result<(), String> {
        let (reply, result) = mpsc::channel();
        self.tx
            .send(Request { command, reply })
            .map_err(|_| "the VM is no longer running".to_string())?;
        self.wake
            .write(1)
            .map_err(|e| format!("cannot wake the VM event loop: {e}"))?;
        result
            .recv()
            .map_err(|_| "the VM stopped before answering".to_string())?
    }
}

/// The receiving side, owned by the event loop.
pub struct ControlReceiver {
    rx: mpsc::Receiver<Request>,
    wake: Arc<EventFd>,
}

/// A new control channel.
pub fn control_channel() -> std::io::Result<(ControlSender, ControlReceiver)> {
    let (tx, rx) = mpsc::channel();
    let wake = Arc::new(EventFd::new(libc::EFD_NONBLOCK)?);
    Ok((
        ControlSender {
            tx,
            wake: wake.clone(),
        },
        ControlReceiver { rx, wake },
    ))
}

/// Errors from starting the VM.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("starting vCPU threads: {0}")]
    Threads(#[source] std::io::Error),
    #[error("event loop: {0}")]
    EventLoop(#[source] std::io::Error),
}

const TOKEN_EXIT: u64 = 1;
const TOKEN_RESET: u64 = 2;
const TOKEN_CONTROL: u64 = 3;
const TOKEN_STDIN: u64 = 4;
const TOKEN_DUMP: u64 = 5;
/// Device fds get tokens from here up: token `TOKEN_DEVICES + i` is entry `i` of the table of
/// (fd, subscriber) pairs built when the loop starts.
const TOKEN_DEVICES: u64 = 100;

/// The signal that asks for a vCPU state dump.
pub const DUMP_SIGNAL: Signal = Signal::SIGUSR2;

fn dump_sigset() -> SigSet {
    let mut set = SigSet::empty();
    set.add(DUMP_SIGNAL);
    set
}

/// Blocks [`DUMP_SIGNAL`] in the calling thread and the threads it starts later, so that it
/// reaches the event loop's signalfd instead of ending the process. Call first thing in main.
pub fn block_dump_signal() -> std::io::Result<()> {
    dump_sigset().thread_block().map_err(std::io::Error::from)
}

/// A signalfd for [`DUMP_SIGNAL`].
struct DumpSignal(SignalFd);

impl DumpSignal {
    fn new() -> std::io::Result<DumpSignal> {
        let flags = SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC;
        Ok(DumpSignal(SignalFd::with_flags(&dump_sigset(), flags)?))
    }

    /// Takes every pending signal off the descriptor (until it would block, or fails).
    fn drain(&self) {
        while let Ok(Some(_)) = self.0.read_signal() {}
    }
}

/// How long vCPUs get to park when pausing or stopping.
const PARK_TIMEOUT: Duration = Duration::from_secs(2);

/// Runs `vm` until it ends; returns why. `console_input` forwards stdin to the serial port.
pub fn run_vm(
    vm: BuiltVm,
    info: &VmInfo,
    control_rx: ControlReceiver,
    console_input: bool,
) -> Result<ExitReason, RunError> {
    let exit_event = EventFd::new(libc::EFD_NONBLOCK).map_err(RunError::EventLoop)?;
    let vcpu_control = VcpuControl::new(exit_event.try_clone().map_err(RunError::EventLoop)?);
    install_kick_handler().map_err(RunError::Threads)?;

    let epoll = Epoll::new().map_err(RunError::EventLoop)?;
    let add = |fd: i32, token: u64| {
        epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, token),
        )
    };
    add(exit_event.as_raw_fd(), TOKEN_EXIT).map_err(RunError::EventLoop)?;
    add(vm.reset_event.as_raw_fd(), TOKEN_RESET).map_err(RunError::EventLoop)?;
    add(control_rx.wake.as_raw_fd(), TOKEN_CONTROL).map_err(RunError::EventLoop)?;
    let dump_signal = DumpSignal::new().map_err(RunError::EventLoop)?;
    add(dump_signal.0.as_raw_fd(), TOKEN_DUMP).map_err(RunError::EventLoop)?;
    let mut stdin_open = console_input && add(libc::STDIN_FILENO, TOKEN_STDIN).is_ok();
    let mut device_fds: Vec<(RawFd, Arc<Mutex<dyn EventSubscriber>>)> = Vec::new();
    for subscriber in &vm.event_subscribers {
        for fd in lock(subscriber).event_fds() {
            // Edge-triggered (see `EventSubscriber`): a tap whose frames wait for guest buffers
            // stays readable and must not wake the loop again until something changes.
            epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(
                        EventSet::IN | EventSet::EDGE_TRIGGERED,
                        TOKEN_DEVICES + device_fds.len() as u64,
                    ),
                )
                .map_err(RunError::EventLoop)?;
            device_fds.push((fd, subscriber.clone()));
        }
    }

    let BuiltVm {
        vm: _vm_fd,
        memory: _memory,
        vcpus,
        serial,
        i8042,
        reset_event,
        ..
    } = vm;
    let threads = VcpuThreads::start(vcpus, vcpu_control.clone()).map_err(RunError::Threads)?;
    info.set_state(VmState::Running);

    let mut events = vec![EpollEvent::default(); 8 + device_fds.len()];
    let reason = 'outer: loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(err) => break ExitReason::Failed(format!("epoll: {err}")),
        };
        for event in &events[..n] {
            match event.data() {
                TOKEN_EXIT => {
                    let _ = exit_event.read();
                    if let Some(reason) = vcpu_control.exit_reason() {
                        break 'outer reason;
                    }
                }
                TOKEN_RESET => {
                    let _ = reset_event.read();
                    vcpu_control.request_exit(ExitReason::GuestStopped("i8042 reset"));
                }
                TOKEN_CONTROL => {
                    let _ = control_rx.wake.read();
                    while let Ok(request) = control_rx.rx.try_recv() {
                        let result = match request.command {
                            Command::Pause => {
                                if threads.set_state(RunState::Paused, PARK_TIMEOUT) {
                                    info.set_state(VmState::Paused);
                                    Ok(())
                                } else {
                                    Err("vCPUs did not pause in time".to_string())
                                }
                            }
                            Command::Resume => {
                                threads.set_state(RunState::Running, PARK_TIMEOUT);
                                info.set_state(VmState::Running);
                                Ok(())
                            }
                            Command::CtrlAltDel => {
                                info.set_state(VmState::ShuttingDown);
                                lock(&i8042).send_ctrl_alt_del().map_err(|e| e.to_string())
                            }
                            Command::ForceStop => {
                                vcpu_control.request_exit(ExitReason::Forced);
                                Ok(())
                            }
                        };
                        let _ = request.reply.send(result);
                    }
                }
                TOKEN_DUMP => {
                    dump_signal.drain();
                    tracing::warn!("SIGUSR2: every vCPU logs its state");
                    threads.dump_state();
                }
                TOKEN_STDIN if stdin_open => {
                    let mut buf = [0u8; 64];
                    match std::io::stdin().lock().read(&mut buf) {
                        Ok(0) | Err(_) => {
                            let _ = epoll.ctl(
                                ControlOperation::Delete,
                                libc::STDIN_FILENO,
                                EpollEvent::default(),
                            );
                            stdin_open = false;
                        }
                        Ok(n) => {
                            lock(&serial).enqueue_input(&buf[..n]);
                        }
                    }
                }
                token if token >= TOKEN_DEVICES => {
                    if let Some((fd, subscriber)) = device_fds.get((token - TOKEN_DEVICES) as usize)
                    {
                        lock(subscriber).handle_event(*fd);
                    }
                }
                _ => {}
            }
        }
    };

    threads.set_state(RunState::Stopped, PARK_TIMEOUT);
    lock(&serial).flush();
    *lock(&info.exit_reason) = Some(reason.clone());
    info.set_state(VmState::Stopped);
    Ok(reason)
}
