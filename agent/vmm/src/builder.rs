//! Assembles a VM from a [`VmConfig`]: KVM VM, guest memory, irqchip and PIT, kernel and boot
//! structures, devices on their buses, and configured vCPUs.
//!
//! Virtio devices are wired to KVM here, at the edge: each transport goes on the MMIO bus at its
//! slot, its queue eventfds become ioeventfds on QueueNotify and its interrupt an irqfd on its
//! GSI; the transports are also returned as event subscribers for the runner's loop.

use crate::logging::{RotatingFile, MAX_CONSOLE_BYTES};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{IoEventAddress, Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use super::boot::cpu::{setup_boot_vcpu, setup_common, write_boot_tables, CpuSetupError};
use super::boot::cpuid::{vcpu_cpuid, CpuProfile, CpuidError};
use super::boot::kernel::{load_kernel, KernelError, LoadedKernel};
use super::boot::mptable::{write_mptable, MpTableError};
use super::boot::params::{load_initrd, write_boot_params, ParamsError};
use super::boot::topology::Topology;
use super::boot::MPTABLE_ADDR;
use super::config::{ConsoleOutput, VirtioDeviceConfig, VmConfig};
use super::devices::boot_timer::{BootTime, BootTimer, BOOT_TIMER_PORT};
use super::devices::bus::{Bus, BusError};
use super::devices::i8042::{I8042Device, I8042_BASE, I8042_KBD_IRQ, I8042_LEN};
use super::devices::serial::{ConsoleSink, SerialDevice, COM1_BASE, COM1_IRQ, COM1_LEN};
use super::devices::virtio::balloon::{Balloon, BalloonHandle};
use super::devices::virtio::blk::{Block, BlockError};
use super::devices::virtio::mmio::{MmioError, MmioTransport, QUEUE_NOTIFY_OFFSET};
use super::devices::virtio::net::{format_mac, Net};
use super::devices::virtio::rng::Rng;
use super::devices::virtio::tap::{Tap, TapError};
use super::devices::virtio::{MmioSlot, VirtioDevice, MMIO_WINDOW_SIZE};
use super::devices::EventSubscriber;
use super::memory::{create_guest_memory, MemoryError};
use super::vcpu::Vcpu;

/// KVM's TSS lives in three pages just below the BIOS area at the top of 4 GiB.
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

/// Errors from building a VM.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("cannot open /dev/kvm: {0}")]
    OpenKvm(#[source] kvm_ioctls::Error),
    #[error("KVM {what}: {source}")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error(transparent)]
    Params(#[from] ParamsError),
    #[error(transparent)]
    MpTable(#[from] MpTableError),
    #[error(transparent)]
    Cpuid(#[from] CpuidError),
    #[error(transparent)]
    Cpu(#[from] CpuSetupError),
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error("eventfd: {0}")]
    EventFd(#[source] std::io::Error),
    #[error(transparent)]
    Disk(#[from] BlockError),
    #[error(transparent)]
    Tap(#[from] TapError),
    #[error("virtio transport: {0}")]
    Mmio(#[from] MmioError),
    #[error("console {path}: {source}")]
    Console {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> BuildError {
    move |source| BuildError::Kvm { what, source }
}

/// A VM ready to run.
pub struct BuiltVm {
    pub vm: VmFd,
    pub memory: GuestMemoryMmap,
    pub vcpus: Vec<Vcpu>,
    pub serial: Arc<Mutex<SerialDevice>>,
    pub i8042: Arc<Mutex<I8042Device>>,
    /// Signalled by the i8042 when the guest resets.
    pub reset_event: EventFd,
    /// Devices whose eventfds the runner's event loop serves (the virtio transports).
    pub event_subscribers: Vec<Arc<Mutex<dyn EventSubscriber>>>,
    /// The control side of the balloon, with `--balloon`.
    pub balloon: Option<BalloonHandle>,
    pub boot_time: BootTime,
    pub kernel: LoadedKernel,
    pub cpu_profile: CpuProfile,
}

/// Opens /dev/kvm.
pub fn open_kvm() -> Result<Kvm, BuildError> {
    Kvm::new().map_err(BuildError::OpenKvm)
}

fn eventfd() -> Result<EventFd, BuildError> {
    EventFd::new(libc::EFD_NONBLOCK).map_err(BuildError::EventFd)
}

fn console_sink(console: &ConsoleOutput) -> Result<ConsoleSink, BuildError> {
    Ok(match console {
        ConsoleOutput::Stdout => ConsoleSink::Stdout(std::io::stdout()),
        ConsoleOutput::Off => ConsoleSink::Off,
        ConsoleOutput::File(path) => ConsoleSink::File(
            RotatingFile::open(path, MAX_CONSOLE_BYTES).map_err(|source| BuildError::Console {
                path: path.clone(),
                source,
            })?,
        ),
    })
}

/// Builds the VM described by `config`; `start` is when the VMM process started.
pub fn build_vm(kvm: &Kvm, config: &VmConfig, start: Instant) -> Result<BuiltVm, BuildError> {
    let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;

    let memory = create_guest_memory(config.memory_mib)?;
    for (slot, region) in memory.iter().enumerate() {
        let mapping = kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
            flags: 0,
        };
        // SAFETY: the region is a live mapping of exactly `memory_size` bytes owned by `memory`,
        // which `BuiltVm` keeps alive for as long as the VM exists.
        unsafe { vm.set_user_memory_region(mapping) }
            .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
    }

    vm.set_tss_address(KVM_TSS_ADDRESS)
        .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
    vm.create_irq_chip()
        .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;

    // Guest memory contents.
    let kernel = load_kernel(&memory, &config.kernel, config.kernel_format)?;
    let initrd = match &config.initrd {
        Some(path) => Some(load_initrd(&memory, path, &kernel)?),
        None => None,
    };
    write_boot_params(&memory, &kernel, &config.kernel_cmdline(), initrd)?;
    // One package with a core per vCPU: the MP table and every vCPU's CPUID say the same.
    let topology = Topology::single_package(config.vcpus);
    write_mptable(&memory, MPTABLE_ADDR, topology)?;
    write_boot_tables(&memory)?;

    // Devices.
    let serial_irq = eventfd()?;
    vm.register_irqfd(&serial_irq, COM1_IRQ)
        .map_err(kvm_err("KVM_IRQFD (serial)"))?;
    let serial = Arc::new(Mutex::new(SerialDevice::new(
        serial_irq,
        console_sink(&config.console)?,
    )));
    let kbd_irq = eventfd()?;
    vm.register_irqfd(&kbd_irq, I8042_KBD_IRQ)
        .map_err(kvm_err("KVM_IRQFD (i8042)"))?;
    let reset_event = eventfd()?;
    let i8042 = Arc::new(Mutex::new(I8042Device::new(
        reset_event.try_clone().map_err(BuildError::EventFd)?,
        kbd_irq,
    )));
    let boot_time = BootTime::default();
    let boot_timer = Arc::new(Mutex::new(BootTimer::new(start, boot_time.clone())));
    let mut pio = Bus::new();
    pio.insert(serial.clone(), COM1_BASE, COM1_LEN)?;
    pio.insert(i8042.clone(), I8042_BASE, I8042_LEN)?;
    pio.insert(boot_timer, BOOT_TIMER_PORT, 1)?;
    let mut mmio = Bus::new();
    let mut event_subscribers: Vec<Arc<Mutex<dyn EventSubscriber>>> = Vec::new();
    let mut balloon = None;
    for (device, slot) in config.virtio_devices() {
        let transport = add_virtio_device(&vm, &memory, &mut mmio, &device, slot, &mut balloon)?;
        event_subscribers.push(transport);
    }

    // vCPUs.
    let cpu_profile = CpuProfile::detect();
    let supported = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
    let mut vcpus = Vec::with_capacity(config.vcpus as usize);
    for id in 0..config.vcpus {
        let fd = vm
            .create_vcpu(id as u64)
            .map_err(kvm_err("KVM_CREATE_VCPU"))?;
        let cpuid = vcpu_cpuid(&supported, id, topology, cpu_profile)?;
        fd.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
        setup_common(&fd, id)?;
        if id == 0 {
            setup_boot_vcpu(&fd, id, kernel.entry.0)?;
        }
        vcpus.push(Vcpu {
            id,
            fd,
            pio: pio.clone(),
            mmio: mmio.clone(),
        });
    }

    Ok(BuiltVm {
        vm,
        memory,
        vcpus,
        serial,
        i8042,
        reset_event,
        event_subscribers,
        balloon,
        boot_time,
        kernel,
        cpu_profile,
    })
}

/// Guest RAM in MiB, as mapped.
fn memory_mib(memory: &GuestMemoryMmap) -> u64 {
    memory.iter().map(|region| region.len()).sum::<u64>() >> 20
}

/// Creates one virtio device and wires it: MMIO window, ioeventfds, irqfd. A balloon's control
/// handle goes to `balloon`.
fn add_virtio_device(
    vm: &VmFd,
    memory: &GuestMemoryMmap,
    mmio: &mut Bus,
    device: &VirtioDeviceConfig,
    slot: MmioSlot,
    balloon: &mut Option<BalloonHandle>,
) -> Result<Arc<Mutex<MmioTransport>>, BuildError> {
    let virtio: Box<dyn VirtioDevice> = match device {
        VirtioDeviceConfig::Disk(disk) => {
            let block = Block::open(&disk.path, disk.read_only, disk.cache)?;
            tracing::info!(
                path = %disk.path.display(),
                read_only = disk.read_only,
                cache = disk.cache.as_str(),
                direct_io = block.direct_io(),
                sectors = block.capacity(),
                mmio_base = format_args!("{:#x}", slot.base),
                gsi = slot.gsi,
                "virtio-blk device"
            );
            Box::new(block)
        }
        VirtioDeviceConfig::Net(net) => {
            let tap = Tap::open(&net.tap)?;
            tracing::info!(
                tap = %net.tap,
                mac = %format_mac(&net.mac),
                mmio_base = format_args!("{:#x}", slot.base),
                gsi = slot.gsi,
                "virtio-net device"
            );
            Box::new(Net::new(Box::new(tap), net.mac).map_err(BuildError::EventFd)?)
        }
        VirtioDeviceConfig::Rng => {
            tracing::info!(
                mmio_base = format_args!("{:#x}", slot.base),
                gsi = slot.gsi,
                "virtio-rng device"
            );
            Box::new(Rng::new())
        }
        VirtioDeviceConfig::Balloon(config) => {
            let device = Balloon::new(*config, memory_mib(memory)).map_err(BuildError::EventFd)?;
            tracing::info!(
                deflate_on_oom = config.deflate_on_oom,
                free_page_reporting = config.free_page_reporting,
                stats_period_s = config.stats_period_s,
                mmio_base = format_args!("{:#x}", slot.base),
                gsi = slot.gsi,
                "virtio-balloon device"
            );
            *balloon = Some(device.handle());
            Box::new(device)
        }
    };
    let transport = MmioTransport::new(virtio, memory.clone())?;
    let notify = IoEventAddress::Mmio(slot.base + QUEUE_NOTIFY_OFFSET);
    for (index, event) in transport.queue_events().iter().enumerate() {
        vm.register_ioevent(event, &notify, index as u32)
            .map_err(kvm_err("KVM_IOEVENTFD (virtio queue notify)"))?;
    }
    vm.register_irqfd(transport.interrupt().irqfd(), slot.gsi)
        .map_err(kvm_err("KVM_IRQFD (virtio)"))?;
    let transport = Arc::new(Mutex::new(transport));
    mmio.insert(transport.clone(), slot.base, MMIO_WINDOW_SIZE)?;
    Ok(transport)
}
