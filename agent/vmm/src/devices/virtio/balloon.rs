//! virtio-balloon (virtio 1.x, section 5.5): how the host takes memory back from a guest and
//! learns how the guest uses its memory.
//!
//! The host sets a target through the [`BalloonHandle`]: `num_pages` in the configuration space
//! (4 KiB pages), announced with a configuration-change interrupt. The driver allocates that
//! many pages inside the guest and sends their page frame numbers on the inflate queue; the
//! device discards them from the host mapping with `madvise(MADV_DONTNEED)` (guest RAM is an
//! anonymous private mapping: a discarded page holds no host memory and reads as zeros when the
//! guest touches it again), and the driver writes the balloon's size to `actual`. Deflating
//! needs nothing from the host: a page the guest takes back faults in when touched. When the
//! driver negotiates VIRTIO_BALLOON_F_MUST_TELL_HOST (Linux does), pages that cover only part
//! of a 2 MiB block are held back for up to half a second until the rest of the block arrives,
//! so that the host's huge page goes back whole instead of being split ([`held`]). With
//! VIRTIO_BALLOON_F_REPORTING the driver also reports ranges of free guest memory, which are
//! discarded the same way.
//!
//! Statistics (VIRTIO_BALLOON_F_STATS_VQ, section 5.5.6.3): the driver posts one buffer of
//! (tag, value) entries; the device keeps it and returns it when it wants fresh numbers (every
//! `stats-period` seconds, or when asked through the handle); the driver then fills it anew
//! and posts it again.
//!
//! Queues are numbered as Linux's virtio_mmio numbers them (and as virtio 1.3 spells out): 0
//! inflate, 1 deflate, then the statistics queue if STATS_VQ was negotiated, then the reporting
//! queue if REPORTING was: reporting is queue 3 with statistics, 2 without.
//!
//! Everything the guest hands in is checked: PFNs outside guest RAM are skipped and counted;
//! a PFN request whose length is not whole PFNs or holds more than [`MAX_PFNS_PER_REQUEST`] is
//! refused; reported ranges must be page-aligned and inside guest RAM; a statistics buffer must
//! be whole entries, at most [`MAX_STATS`] of them; buffers in the wrong direction are refused.
//! A refused request is returned used and the device serves the next one.

use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::sys::mman::{madvise, MmapAdvise};
use virtio_bindings::virtio_ids::VIRTIO_ID_BALLOON;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use super::queue::{
    check_in_memory, needs_interrupt, read_from_guest, serve_queue, Chain, ChainError,
    CHAINS_PER_TURN,
};
use super::{read_config_bytes, ActivateError, DeviceError, Interrupt, VirtioDevice};
use crate::devices::bus::lock;

mod held;

use held::{HeldBlocks, BLOCK_SIZE, HOLD_FOR, MAX_HELD_BLOCKS};

/// The driver tells the device before it uses a page it takes out of the balloon.
pub const VIRTIO_BALLOON_F_MUST_TELL_HOST: u32 = 0;
/// The driver wants a statistics queue.
pub const VIRTIO_BALLOON_F_STATS_VQ: u32 = 1;
/// The guest may deflate the balloon on its own when it runs out of memory.
pub const VIRTIO_BALLOON_F_DEFLATE_ON_OOM: u32 = 2;
/// The driver reports free pages on the reporting queue.
pub const VIRTIO_BALLOON_F_REPORTING: u32 = 5;

/// Statistics tags (section 5.5.6.3).
pub const VIRTIO_BALLOON_S_SWAP_IN: u16 = 0;
pub const VIRTIO_BALLOON_S_SWAP_OUT: u16 = 1;
pub const VIRTIO_BALLOON_S_MAJFLT: u16 = 2;
pub const VIRTIO_BALLOON_S_MINFLT: u16 = 3;
pub const VIRTIO_BALLOON_S_MEMFREE: u16 = 4;
pub const VIRTIO_BALLOON_S_MEMTOT: u16 = 5;
pub const VIRTIO_BALLOON_S_AVAIL: u16 = 6;
pub const VIRTIO_BALLOON_S_CACHES: u16 = 7;
pub const VIRTIO_BALLOON_S_HTLB_PGALLOC: u16 = 8;
pub const VIRTIO_BALLOON_S_HTLB_PGFAIL: u16 = 9;

/// The balloon's unit: PFNs and `num_pages`/`actual` count 4 KiB pages whatever the guest's
/// own page size.
pub const PAGE_SHIFT: u64 = 12;
pub const PAGE_SIZE: u64 = 1 << PAGE_SHIFT;
/// Balloon pages per MiB.
pub const PAGES_PER_MIB: u64 = (1 << 20) / PAGE_SIZE;
/// Entries in each queue (Linux needs at least 32 on the reporting queue).
pub const QUEUE_SIZE: u16 = 256;
/// The most PFNs one inflate or deflate request may carry (4 MiB of guest memory). Linux sends
/// at most 256; the bound keeps one notification from occupying the event loop.
pub const MAX_PFNS_PER_REQUEST: u64 = 1024;
/// The most statistics entries one buffer may carry (the spec defines 10 tags, Linux 6.x up to
/// 16).
pub const MAX_STATS: usize = 64;
/// One statistics entry: le16 tag, le64 value, packed.
const STAT_ENTRY_LEN: usize = 10;
/// PFNs read from guest memory at a time.
const PFN_CHUNK: usize = 256;
/// num_pages (le32), actual (le32).
const CONFIG_LEN: usize = 8;
/// The longest statistics period `stats-period=` accepts, in seconds.
const MAX_STATS_PERIOD_S: u32 = 3600;
/// After this many warnings about refused requests, further ones go to debug level.
const REQUEST_WARNINGS: u32 = 32;

/// `--balloon [deflate-on-oom=on,free-page-reporting=on,stats-period=SECONDS]`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BalloonConfig {
    /// Offer VIRTIO_BALLOON_F_DEFLATE_ON_OOM.
    pub deflate_on_oom: bool,
    /// Offer VIRTIO_BALLOON_F_REPORTING (free page reporting).
    pub free_page_reporting: bool,
    /// Seconds between statistics refreshes; 0: the guest refreshes its statistics when asked
    /// (each `GetMemoryStats`).
    pub stats_period_s: u32,
}

/// A `--balloon` value that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum BalloonOptionError {
    #[error("--balloon {spec}: unknown option {option:?} (expected deflate-on-oom=on|off, free-page-reporting=on|off, stats-period=SECONDS)")]
    Unknown { spec: String, option: String },
    #[error("--balloon {spec}: {key}={value}: expected {expected}")]
    BadValue {
        spec: String,
        key: String,
        value: String,
        expected: &'static str,
    },
}

impl BalloonConfig {
    /// Parses the comma-separated options of `--balloon` (empty: the defaults).
    pub fn parse(spec: &str) -> Result<BalloonConfig, BalloonOptionError> {
        let mut config = BalloonConfig::default();
        for option in spec.split(',').filter(|o| !o.is_empty()) {
            let Some((key, value)) = option.split_once('=') else {
                return Err(BalloonOptionError::Unknown {
                    spec: spec.to_string(),
                    option: option.to_string(),
                });
            };
            let bad = |expected| BalloonOptionError::BadValue {
                spec: spec.to_string(),
                key: key.to_string(),
                value: value.to_string(),
                expected,
            };
            let switch = |value: &str| match value {
                "on" | "true" | "1" => Ok(true),
                "off" | "false" | "0" => Ok(false),
                _ => Err(bad("on or off")),
            };
            match key {
                "deflate-on-oom" => config.deflate_on_oom = switch(value)?,
                "free-page-reporting" => config.free_page_reporting = switch(value)?,
                "stats-period" => {
                    config.stats_period_s = value
                        .parse()
                        .ok()
                        .filter(|s| *s <= MAX_STATS_PERIOD_S)
                        .ok_or_else(|| bad("a number of seconds from 0 to 3600"))?;
                }
                _ => {
                    return Err(BalloonOptionError::Unknown {
                        spec: spec.to_string(),
                        option: option.to_string(),
                    })
                }
            }
        }
        Ok(config)
    }
}

/// The guest's memory statistics as it last reported them; `None` for a tag it did not send.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GuestStats {
    /// Bytes swapped in since boot.
    pub swap_in: Option<u64>,
    /// Bytes swapped out since boot.
    pub swap_out: Option<u64>,
    pub major_faults: Option<u64>,
    pub minor_faults: Option<u64>,
    /// Bytes the guest does not use at all.
    pub free: Option<u64>,
    /// Bytes the guest kernel manages.
    pub total: Option<u64>,
    /// Bytes available to new work (MemAvailable).
    pub available: Option<u64>,
    /// Bytes of page cache.
    pub disk_caches: Option<u64>,
    pub hugetlb_allocations: Option<u64>,
    pub hugetlb_failures: Option<u64>,
}

impl GuestStats {
    /// Records one entry; entries with tags this device does not know are ignored, as the spec
    /// asks (a newer driver may send more).
    fn set(&mut self, tag: u16, value: u64) {
        let field = match tag {
            VIRTIO_BALLOON_S_SWAP_IN => &mut self.swap_in,
            VIRTIO_BALLOON_S_SWAP_OUT => &mut self.swap_out,
            VIRTIO_BALLOON_S_MAJFLT => &mut self.major_faults,
            VIRTIO_BALLOON_S_MINFLT => &mut self.minor_faults,
            VIRTIO_BALLOON_S_MEMFREE => &mut self.free,
            VIRTIO_BALLOON_S_MEMTOT => &mut self.total,
            VIRTIO_BALLOON_S_AVAIL => &mut self.available,
            VIRTIO_BALLOON_S_CACHES => &mut self.disk_caches,
            VIRTIO_BALLOON_S_HTLB_PGALLOC => &mut self.hugetlb_allocations,
            VIRTIO_BALLOON_S_HTLB_PGFAIL => &mut self.hugetlb_failures,
            _ => return,
        };
        *field = Some(value);
    }
}

/// What the device did so far, for logs and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BalloonCounters {
    /// Pages inflated (valid PFNs received on the inflate queue and discarded).
    pub inflated_pages: u64,
    /// Pages deflated (valid PFNs received on the deflate queue).
    pub deflated_pages: u64,
    /// PFNs outside guest RAM, skipped.
    pub invalid_pfns: u64,
    /// Bytes of free memory the guest reported and the host discarded.
    pub reported_bytes: u64,
    /// Requests and buffers refused as malformed.
    pub refused: u64,
    /// Statistics buffers received.
    pub stats_updates: u64,
}

/// The balloon as the control endpoint sees it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BalloonStatus {
    /// What the host asked for, in 4 KiB pages (`num_pages`).
    pub target_pages: u32,
    /// What the guest says the balloon holds, in 4 KiB pages (`actual`, at most guest RAM).
    pub actual_pages: u32,
    pub stats: GuestStats,
    /// When the guest last posted statistics; `None`: never.
    pub stats_updated_at: Option<SystemTime>,
    pub counters: BalloonCounters,
}

/// Whole MiB in `pages` balloon pages.
pub fn pages_to_mib(pages: u32) -> u64 {
    u64::from(pages) / PAGES_PER_MIB
}

struct SharedState {
    status: BalloonStatus,
    /// The device's interrupt while a driver runs it; config changes are announced through it.
    interrupt: Option<Interrupt>,
    /// The device holds a statistics buffer it can return to ask for fresh numbers.
    stats_buffer_held: bool,
}

/// What the device and the control endpoint share. The event loop owns the queues; this only
/// holds numbers, the interrupt to announce a new target, and an eventfd that asks the loop to
/// return the statistics buffer.
struct Shared {
    ram_pages: u32,
    stats_period: Option<Duration>,
    state: Mutex<SharedState>,
    /// Bumped on every change of the configuration space the device makes on its own.
    generation: AtomicU32,
    stats_request: EventFd,
    stats_updates: tokio::sync::watch::Sender<u64>,
}

impl Shared {
    fn count(&self, update: impl FnOnce(&mut BalloonCounters)) {
        update(&mut lock(&self.state).status.counters);
    }

    fn record_stats(&self, stats: GuestStats, held: bool) {
        let seq = {
            let mut state = lock(&self.state);
            state.status.stats = stats;
            state.status.stats_updated_at = Some(SystemTime::now());
            state.status.counters.stats_updates += 1;
            state.stats_buffer_held = held;
            state.status.counters.stats_updates
        };
        self.stats_updates.send_replace(seq);
    }

    fn set_stats_buffer_held(&self, held: bool) {
        lock(&self.state).stats_buffer_held = held;
    }
}

/// The control side of a balloon: set the target, read the status, ask for fresh statistics.
/// Cheap to clone; safe to use from any thread.
#[derive(Clone)]
pub struct BalloonHandle {
    shared: Arc<Shared>,
}

impl BalloonHandle {
    /// Guest RAM in MiB: the largest target.
    pub fn ram_mib(&self) -> u64 {
        pages_to_mib(self.shared.ram_pages)
    }

    /// Sets the balloon's target to `mib` MiB, clamped to guest RAM, and tells the driver.
    /// Returns the target in effect.
    pub fn set_target_mib(&self, mib: u64) -> u64 {
        let pages = (mib.min(self.ram_mib()) * PAGES_PER_MIB) as u32;
        let mut state = lock(&self.shared.state);
        if state.status.target_pages != pages {
            state.status.target_pages = pages;
            self.shared.generation.fetch_add(1, Ordering::SeqCst);
            if let Some(interrupt) = &state.interrupt {
                interrupt.signal_config_change();
            }
            tracing::info!(
                target_mib = pages_to_mib(pages),
                actual_mib = pages_to_mib(state.status.actual_pages),
                "virtio-balloon: new target"
            );
        }
        pages_to_mib(pages)
    }

    /// The target, the guest's acknowledged size, its latest statistics and the counters.
    pub fn status(&self) -> BalloonStatus {
        lock(&self.shared.state).status
    }

    /// True when statistics are refreshed on request ([`BalloonHandle::request_stats`]) rather
    /// than on a period.
    pub fn stats_on_request(&self) -> bool {
        self.shared.stats_period.is_none()
    }

    /// Asks the guest for fresh statistics: the event loop returns the statistics buffer, and
    /// the driver posts it again, filled. Returns false when the device holds no buffer (no
    /// driver, or one that has not posted statistics), so that no refresh will follow.
    pub fn request_stats(&self) -> bool {
        if !lock(&self.shared.state).stats_buffer_held {
            return false;
        }
        if let Err(error) = self.shared.stats_request.write(1) {
            tracing::error!(%error, "virtio-balloon: cannot wake the event loop");
            return false;
        }
        true
    }

    /// A receiver that changes each time the guest posts statistics.
    pub fn stats_updates(&self) -> tokio::sync::watch::Receiver<u64> {
        self.shared.stats_updates.subscribe()
    }
}

/// What a running driver set up.
struct Active {
    mem: GuestMemoryMmap,
    interrupt: Interrupt,
    inflate: Queue,
    deflate: Queue,
    /// The statistics queue and its index, if negotiated and set up.
    stats: Option<(usize, Queue)>,
    /// The reporting queue and its index, if negotiated and set up.
    reporting: Option<(usize, Queue)>,
    /// Head of the statistics buffer the device keeps until it wants fresh numbers.
    held_stats: Option<u16>,
    /// Ballooned pages not yet discarded, to keep the host's huge pages whole; `None` unless
    /// the driver negotiated MUST_TELL_HOST ([`held`]).
    held_pages: Option<HeldBlocks>,
}

/// Warnings about refused requests, rate-limited, and their count.
struct RequestLog {
    warnings_left: u32,
}

impl RequestLog {
    fn refused(&mut self, shared: &Shared, queue: &'static str, error: &str) {
        shared.count(|c| c.refused += 1);
        self.warn(queue, error, "virtio-balloon: request refused");
    }

    fn warn(&mut self, queue: &'static str, error: &str, message: &'static str) {
        if self.warnings_left > 0 {
            self.warnings_left -= 1;
            tracing::warn!(queue, error, "{message}");
        } else {
            tracing::debug!(queue, error, "{message}");
        }
    }
}

/// The balloon device.
pub struct Balloon {
    features: u64,
    queue_sizes: Vec<u16>,
    shared: Arc<Shared>,
    /// Fires every stats period while a driver runs the device (non-blocking).
    timer: TimerFd,
    /// Fires [`held::HOLD_FOR`] after pages were first held (non-blocking): they go then.
    flush_timer: TimerFd,
    flush_armed: bool,
    active: Option<Active>,
    log: RequestLog,
    /// Logged once each, as proof in the VMM log that the driver uses the queue.
    announced_inflate: bool,
    announced_report: bool,
}

/// Makes `fd` non-blocking, so that reading a timer that a reset disarmed after it fired
/// cannot block the event loop.
fn set_nonblocking(timer: &TimerFd) -> std::io::Result<()> {
    // SAFETY: the descriptor is `timer`'s, open for at least as long as this borrow of it
    // (vmm-sys-util's TimerFd has AsRawFd but not AsFd).
    let fd = unsafe { BorrowedFd::borrow_raw(timer.as_raw_fd()) };
    let flags = OFlag::from_bits_retain(fcntl(fd, FcntlArg::F_GETFL)?);
    fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(())
}

impl Balloon {
    /// A balloon for a guest of `memory_mib` MiB.
    pub fn new(config: BalloonConfig, memory_mib: u64) -> std::io::Result<Balloon> {
        let mut features =
            (1 << VIRTIO_BALLOON_F_MUST_TELL_HOST) | (1 << VIRTIO_BALLOON_F_STATS_VQ);
        if config.deflate_on_oom {
            features |= 1 << VIRTIO_BALLOON_F_DEFLATE_ON_OOM;
        }
        let mut queue_sizes = vec![QUEUE_SIZE; 3];
        if config.free_page_reporting {
            features |= 1 << VIRTIO_BALLOON_F_REPORTING;
            queue_sizes.push(QUEUE_SIZE);
        }
        let timer = TimerFd::new()?;
        set_nonblocking(&timer)?;
        let flush_timer = TimerFd::new()?;
        set_nonblocking(&flush_timer)?;
        let ram_pages = memory_mib
            .saturating_mul(PAGES_PER_MIB)
            .min(u64::from(u32::MAX) / PAGES_PER_MIB * PAGES_PER_MIB)
            as u32;
        let shared = Shared {
            ram_pages,
            stats_period: (config.stats_period_s > 0)
                .then(|| Duration::from_secs(config.stats_period_s.into())),
            state: Mutex::new(SharedState {
                status: BalloonStatus::default(),
                interrupt: None,
                stats_buffer_held: false,
            }),
            generation: AtomicU32::new(0),
            stats_request: EventFd::new(libc::EFD_NONBLOCK)?,
            stats_updates: tokio::sync::watch::Sender::new(0),
        };
        Ok(Balloon {
            features,
            queue_sizes,
            shared: Arc::new(shared),
            timer,
            flush_timer,
            flush_armed: false,
            active: None,
            log: RequestLog {
                warnings_left: REQUEST_WARNINGS,
            },
            announced_inflate: false,
            announced_report: false,
        })
    }

    /// The handle for the control endpoint.
    pub fn handle(&self) -> BalloonHandle {
        BalloonHandle {
            shared: self.shared.clone(),
        }
    }

    /// Returns the statistics buffer, if the device holds one: the driver's cue to refresh.
    fn return_stats_buffer(&mut self) -> Result<(), DeviceError> {
        let Some(active) = self.active.as_mut() else {
            return Ok(());
        };
        let (Some((index, queue)), Some(head)) = (active.stats.as_mut(), active.held_stats) else {
            return Ok(());
        };
        active.held_stats = None;
        self.shared.set_stats_buffer_held(false);
        let broken = |source| DeviceError::Queue {
            queue: *index,
            source,
        };
        queue.add_used(&active.mem, head, 0).map_err(broken)?;
        if needs_interrupt(queue, &active.mem).map_err(broken)? {
            active.interrupt.signal_used_queue();
        }
        Ok(())
    }
}

/// Discards every page the device holds back.
fn flush_held(active: &mut Active, log: &mut RequestLog) {
    let Some(held) = active.held_pages.as_mut() else {
        return;
    };
    let mem = &active.mem;
    if let Err(error) = held.flush(&mut |addr, len| discard(mem, GuestAddress(addr), len)) {
        log.warn("inflate", &error, "virtio-balloon: held pages not returned");
    }
}

/// Which PFN queue a request came on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PfnQueue {
    Inflate,
    Deflate,
}

impl PfnQueue {
    fn name(self) -> &'static str {
        match self {
            PfnQueue::Inflate => "inflate",
            PfnQueue::Deflate => "deflate",
        }
    }
}

/// What one PFN request held.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct PfnTally {
    pages: u64,
    invalid: u64,
}

/// Gives the host memory behind guest range `[addr, addr + len)` back to the host. The caller
/// checked that the range is page-aligned and inside guest RAM.
fn discard(mem: &GuestMemoryMmap, addr: GuestAddress, len: u64) -> Result<(), String> {
    let mut addr = addr;
    let mut left = len;
    while left > 0 {
        let Some((region, offset)) = mem.to_region_addr(addr) else {
            return Err(format!("{:#x} is not in guest memory", addr.raw_value()));
        };
        let n = left.min(region.len() - offset.raw_value());
        let host = region
            .get_host_address(offset)
            .map_err(|e| format!("{:#x}: {e}", addr.raw_value()))?;
        let host = NonNull::new(host.cast())
            .ok_or_else(|| format!("{:#x}: null host address", addr.raw_value()))?;
        // SAFETY: `host..host + n` lies inside one live mapping of guest RAM (the region was
        // found for `addr` and `n` stops at its end), which `mem` keeps mapped. It is
        // page-aligned because regions start on page boundaries and the caller checked `addr`
        // and `len`. MADV_DONTNEED on this anonymous private mapping only drops the contents
        // (later accesses read zeros); no Rust reference points into guest memory, which is
        // only ever accessed through raw volatile copies.
        if let Err(errno) = unsafe { madvise(host, n as usize, MmapAdvise::MADV_DONTNEED) } {
            return Err(format!(
                "madvise {:#x}+{n:#x}: {}",
                addr.raw_value(),
                std::io::Error::from(errno)
            ));
        }
        left -= n;
        addr = addr.unchecked_add(n);
    }
    Ok(())
}

/// Serves one inflate or deflate request: an array of le32 PFNs in device-readable buffers.
fn pfn_request(
    mem: &GuestMemoryMmap,
    chain: Result<Chain, ChainError>,
    queue: PfnQueue,
    mut held: Option<&mut HeldBlocks>,
) -> Result<PfnTally, String> {
    let chain = chain.map_err(|e| e.to_string())?;
    if !chain.writable.is_empty() {
        return Err("device-writable buffer in a PFN request".into());
    }
    check_in_memory(mem, &chain.readable).map_err(|e| e.to_string())?;
    let len = chain.readable_len();
    if len % 4 != 0 {
        return Err(format!("PFN array of {len} bytes is not whole le32 PFNs"));
    }
    if len / 4 > MAX_PFNS_PER_REQUEST {
        return Err(format!(
            "{} PFNs in one request, at most {MAX_PFNS_PER_REQUEST}",
            len / 4
        ));
    }
    let mut tally = PfnTally::default();
    let mut raw = [0u8; PFN_CHUNK * 4];
    let mut pfns = Vec::with_capacity(PFN_CHUNK);
    let mut offset = 0u64;
    while offset < len {
        let n = (len - offset).min(raw.len() as u64) as usize;
        read_from_guest(mem, &chain.readable, offset, &mut raw[..n]).map_err(|e| e.to_string())?;
        offset += n as u64;
        pfns.clear();
        pfns.extend(
            raw[..n]
                .chunks_exact(4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        );
        // Linux hands pages over in the reverse order it allocated them: sorted, neighbours
        // make one range and one madvise.
        pfns.sort_unstable();
        let mut run: Option<(u64, u64)> = None; // (first byte, length)
        for &pfn in &pfns {
            let addr = u64::from(pfn) << PAGE_SHIFT;
            if !GuestMemoryBackend::check_range(mem, GuestAddress(addr), PAGE_SIZE as usize) {
                tally.invalid += 1;
                continue;
            }
            tally.pages += 1;
            match &mut run {
                Some((start, run_len)) if *start + *run_len == addr => *run_len += PAGE_SIZE,
                // A PFN given twice in a row.
                Some((start, run_len)) if *start + *run_len > addr => {}
                _ => {
                    if let Some((start, run_len)) = run.take() {
                        pfn_run(mem, queue, held.as_deref_mut(), start, run_len)?;
                    }
                    run = Some((addr, PAGE_SIZE));
                }
            }
        }
        if let Some((start, run_len)) = run {
            pfn_run(mem, queue, held.as_deref_mut(), start, run_len)?;
        }
    }
    Ok(tally)
}

/// A run of neighbouring pages of a PFN request: inflated pages are discarded (or held, see
/// [`held`]); deflated ones leave what is held.
fn pfn_run(
    mem: &GuestMemoryMmap,
    queue: PfnQueue,
    held: Option<&mut HeldBlocks>,
    start: u64,
    len: u64,
) -> Result<(), String> {
    match (queue, held) {
        (PfnQueue::Inflate, Some(held)) => held.inflate(
            start,
            len,
            |block| GuestMemoryBackend::check_range(mem, GuestAddress(block), BLOCK_SIZE as usize),
            &mut |addr, len| discard(mem, GuestAddress(addr), len),
        ),
        (PfnQueue::Inflate, None) => discard(mem, GuestAddress(start), len),
        (PfnQueue::Deflate, Some(held)) => {
            held.deflate(start, len);
            Ok(())
        }
        (PfnQueue::Deflate, None) => Ok(()),
    }
}

/// Serves one free page report: device-writable buffers, each a page-aligned range of free
/// guest memory. Returns the bytes discarded.
fn report_request(mem: &GuestMemoryMmap, chain: Result<Chain, ChainError>) -> Result<u64, String> {
    let chain = chain.map_err(|e| e.to_string())?;
    if !chain.readable.is_empty() {
        return Err("device-readable buffer in a free page report".into());
    }
    for buffer in &chain.writable {
        let aligned = buffer.addr.raw_value() % PAGE_SIZE == 0
            && u64::from(buffer.len).is_multiple_of(PAGE_SIZE);
        if !aligned {
            return Err(format!(
                "reported range {:#x}+{:#x} is not page-aligned",
                buffer.addr.raw_value(),
                buffer.len
            ));
        }
    }
    check_in_memory(mem, &chain.writable).map_err(|e| e.to_string())?;
    for buffer in &chain.writable {
        discard(mem, buffer.addr, u64::from(buffer.len))?;
    }
    Ok(chain.writable_len())
}

/// Reads a statistics buffer: whole (le16 tag, le64 value) entries in device-readable buffers.
fn parse_stats(
    mem: &GuestMemoryMmap,
    chain: Result<Chain, ChainError>,
) -> Result<GuestStats, String> {
    let chain = chain.map_err(|e| e.to_string())?;
    if !chain.writable.is_empty() {
        return Err("device-writable buffer in a statistics buffer".into());
    }
    check_in_memory(mem, &chain.readable).map_err(|e| e.to_string())?;
    let len = chain.readable_len();
    if len == 0 || len % STAT_ENTRY_LEN as u64 != 0 {
        return Err(format!(
            "statistics buffer of {len} bytes is not whole {STAT_ENTRY_LEN}-byte entries"
        ));
    }
    if len > (MAX_STATS * STAT_ENTRY_LEN) as u64 {
        return Err(format!(
            "statistics buffer of {} entries, at most {MAX_STATS}",
            len / STAT_ENTRY_LEN as u64
        ));
    }
    let mut raw = [0u8; MAX_STATS * STAT_ENTRY_LEN];
    let raw = &mut raw[..len as usize];
    read_from_guest(mem, &chain.readable, 0, raw).map_err(|e| e.to_string())?;
    let mut stats = GuestStats::default();
    for entry in raw.chunks_exact(STAT_ENTRY_LEN) {
        let tag = u16::from_le_bytes([entry[0], entry[1]]);
        let mut value = [0u8; 8];
        value.copy_from_slice(&entry[2..]);
        stats.set(tag, u64::from_le_bytes(value));
    }
    Ok(stats)
}

/// Takes what the driver posted on the statistics queue: the newest valid buffer is kept (an
/// older one still held is returned: a driver keeps one at a time), malformed ones go back at
/// once. Returns true when chains are left for the next turn.
fn serve_stats(
    active: &mut Active,
    shared: &Shared,
    log: &mut RequestLog,
) -> Result<bool, DeviceError> {
    let Active {
        mem,
        interrupt,
        stats,
        held_stats,
        ..
    } = active;
    let Some((index, queue)) = stats.as_mut() else {
        return Ok(false);
    };
    let index = *index;
    let broken = |source| DeviceError::Queue {
        queue: index,
        source,
    };
    let mut taken = 0;
    let mut returned = false;
    let mut more = false;
    'turn: loop {
        queue.disable_notification(mem).map_err(broken)?;
        loop {
            if taken >= CHAINS_PER_TURN {
                more = true;
                break 'turn;
            }
            let chain = queue.iter(&*mem).map_err(broken)?.next();
            let Some(chain) = chain else { break };
            let head = chain.head_index();
            if head >= queue.size() {
                log.refused(
                    shared,
                    "stats",
                    "available ring names a descriptor past the table",
                );
                continue;
            }
            taken += 1;
            if let Some(old) = held_stats.take() {
                log.refused(
                    shared,
                    "stats",
                    "a second statistics buffer while the device held one; the older is returned",
                );
                queue.add_used(&*mem, old, 0).map_err(broken)?;
                returned = true;
            }
            match parse_stats(mem, Chain::parse(chain)) {
                Ok(guest_stats) => {
                    *held_stats = Some(head);
                    shared.record_stats(guest_stats, true);
                }
                Err(error) => {
                    log.refused(shared, "stats", &error);
                    queue.add_used(&*mem, head, 0).map_err(broken)?;
                    returned = true;
                }
            }
        }
        if !queue.enable_notification(&*mem).map_err(broken)? {
            break;
        }
    }
    shared.set_stats_buffer_held(held_stats.is_some());
    if returned && needs_interrupt(queue, mem).map_err(broken)? {
        interrupt.signal_used_queue();
    }
    Ok(more)
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BALLOON
    }

    fn name(&self) -> &'static str {
        "virtio-balloon"
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn config_len(&self) -> u64 {
        CONFIG_LEN as u64
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let status = lock(&self.shared.state).status;
        let mut config = [0u8; CONFIG_LEN];
        config[0..4].copy_from_slice(&status.target_pages.to_le_bytes());
        config[4..8].copy_from_slice(&status.actual_pages.to_le_bytes());
        read_config_bytes(&config, offset, data);
    }

    /// Only `actual` (bytes 4..8) is the driver's to write.
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let mut state = lock(&self.shared.state);
        let old = state.status.actual_pages;
        let mut actual = old.to_le_bytes();
        let mut ignored = false;
        for (i, &byte) in data.iter().enumerate() {
            match (offset as usize + i).checked_sub(4) {
                Some(at) if at < 4 => actual[at] = byte,
                _ => ignored = true,
            }
        }
        let actual = u32::from_le_bytes(actual).min(self.shared.ram_pages);
        state.status.actual_pages = actual;
        let target = state.status.target_pages;
        drop(state);
        if ignored {
            self.log.refused(
                &self.shared,
                "config",
                "driver wrote num_pages, which is the device's",
            );
        }
        if actual != old {
            tracing::debug!(
                actual_mib = pages_to_mib(actual),
                target_mib = pages_to_mib(target),
                "virtio-balloon: guest changed the balloon size"
            );
            if actual == target {
                tracing::info!(
                    actual_mib = pages_to_mib(actual),
                    "virtio-balloon: guest reached the target"
                );
            }
        }
    }

    fn config_generation(&self) -> u32 {
        self.shared.generation.load(Ordering::SeqCst)
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: Interrupt,
        acked_features: u64,
    ) -> Result<(), ActivateError> {
        if queues.len() != self.queue_sizes.len() {
            return Err(ActivateError::QueueCount(
                queues.len(),
                self.queue_sizes.len(),
            ));
        }
        let mut queues: Vec<Option<Queue>> = queues.into_iter().map(Some).collect();
        let mut take = |index: usize| queues.get_mut(index).and_then(Option::take);
        let (Some(inflate), Some(deflate)) = (take(0), take(1)) else {
            return Err(ActivateError::QueueCount(0, 2));
        };
        for (index, queue) in [(0, &inflate), (1, &deflate)] {
            if !queue.ready() {
                return Err(ActivateError::QueueNotReady(index));
            }
        }
        // Absent queues do not take a number (see the module comment).
        let mut next = 2;
        let mut optional = |feature: u32, name: &'static str| {
            if acked_features & (1 << feature) == 0 {
                return None;
            }
            let index = next;
            next += 1;
            match take(index) {
                Some(queue) if queue.ready() => Some((index, queue)),
                _ => {
                    tracing::warn!(
                        queue = index,
                        name,
                        "virtio-balloon: negotiated queue not set up; not served"
                    );
                    None
                }
            }
        };
        let stats = optional(VIRTIO_BALLOON_F_STATS_VQ, "stats");
        let reporting = optional(VIRTIO_BALLOON_F_REPORTING, "reporting");
        {
            let mut state = lock(&self.shared.state);
            state.interrupt = Some(interrupt.clone());
            state.stats_buffer_held = false;
        }
        self.active = Some(Active {
            mem,
            interrupt,
            inflate,
            deflate,
            stats,
            reporting,
            held_stats: None,
            held_pages: (acked_features & (1 << VIRTIO_BALLOON_F_MUST_TELL_HOST) != 0)
                .then(|| HeldBlocks::new(MAX_HELD_BLOCKS)),
        });
        if let Some(period) = self.shared.stats_period {
            if let Err(error) = self.timer.reset(period, Some(period)) {
                tracing::error!(%error, "virtio-balloon: cannot arm the statistics timer");
            }
        }
        // Linux posts its first statistics buffer before DRIVER_OK; its notification was
        // dropped then, so look now.
        if let Some(active) = self.active.as_mut() {
            if let Err(error) = serve_stats(active, &self.shared, &mut self.log) {
                tracing::warn!(%error, "virtio-balloon: statistics queue unusable");
                active.stats = None;
            }
        }
        Ok(())
    }

    fn queue_notified(&mut self, index: usize) -> Result<bool, DeviceError> {
        let Some(active) = self.active.as_mut() else {
            return Err(DeviceError::NoSuchQueue(index));
        };
        let shared = &*self.shared;
        let log = &mut self.log;
        let mem = &active.mem;
        let served = match index {
            0 | 1 => {
                let (queue, which) = if index == 0 {
                    (&mut active.inflate, PfnQueue::Inflate)
                } else {
                    (&mut active.deflate, PfnQueue::Deflate)
                };
                let mut total = PfnTally::default();
                let held = &mut active.held_pages;
                let served = serve_queue(queue, mem, |chain| {
                    match pfn_request(mem, chain, which, held.as_mut()) {
                        Ok(tally) => {
                            total.pages += tally.pages;
                            total.invalid += tally.invalid;
                        }
                        Err(error) => log.refused(shared, which.name(), &error),
                    }
                    0
                })
                .map_err(|source| DeviceError::Queue {
                    queue: index,
                    source,
                })?;
                shared.count(|c| {
                    match which {
                        PfnQueue::Inflate => c.inflated_pages += total.pages,
                        PfnQueue::Deflate => c.deflated_pages += total.pages,
                    }
                    c.invalid_pfns += total.invalid;
                });
                if total.invalid > 0 {
                    log.warn(
                        which.name(),
                        &format!("{} PFNs outside guest RAM", total.invalid),
                        "virtio-balloon: PFNs skipped",
                    );
                }
                let holding = active.held_pages.as_ref().is_some_and(|h| !h.is_empty());
                if holding && !self.flush_armed {
                    match self.flush_timer.reset(HOLD_FOR, None) {
                        Ok(()) => self.flush_armed = true,
                        Err(error) => {
                            tracing::warn!(%error, "virtio-balloon: cannot arm the flush timer");
                            flush_held(active, log);
                        }
                    }
                }
                if which == PfnQueue::Inflate && total.pages > 0 && !self.announced_inflate {
                    self.announced_inflate = true;
                    tracing::info!(
                        pages = total.pages,
                        "virtio-balloon: guest inflated the balloon; pages returned to the host"
                    );
                }
                served
            }
            i if active.stats.as_ref().is_some_and(|(s, _)| *s == i) => {
                return serve_stats(active, shared, log);
            }
            i if active.reporting.as_ref().is_some_and(|(r, _)| *r == i) => {
                let Some((_, queue)) = active.reporting.as_mut() else {
                    return Err(DeviceError::NoSuchQueue(index));
                };
                let mut bytes = 0;
                let served = serve_queue(queue, mem, |chain| {
                    match report_request(mem, chain) {
                        Ok(n) => bytes += n,
                        Err(error) => log.refused(shared, "reporting", &error),
                    }
                    0
                })
                .map_err(|source| DeviceError::Queue {
                    queue: index,
                    source,
                })?;
                shared.count(|c| c.reported_bytes += bytes);
                if bytes > 0 && !self.announced_report {
                    self.announced_report = true;
                    tracing::info!(
                        bytes,
                        "virtio-balloon: guest reported free pages; returned to the host"
                    );
                }
                served
            }
            _ => return Err(DeviceError::NoSuchQueue(index)),
        };
        if served.interrupt {
            active.interrupt.signal_used_queue();
        }
        Ok(served.more)
    }

    fn reset(&mut self) {
        // Held pages are forgotten, not discarded: the guest owns all its memory again.
        self.active = None;
        if let Err(error) = self.timer.clear() {
            tracing::error!(%error, "virtio-balloon: cannot disarm the statistics timer");
        }
        if let Err(error) = self.flush_timer.clear() {
            tracing::error!(%error, "virtio-balloon: cannot disarm the flush timer");
        }
        self.flush_armed = false;
        let mut state = lock(&self.shared.state);
        state.interrupt = None;
        state.stats_buffer_held = false;
        // A new driver starts with an empty balloon: the guest has all its memory again.
        state.status.actual_pages = 0;
    }

    fn event_fds(&self) -> Vec<RawFd> {
        vec![
            self.shared.stats_request.as_raw_fd(),
            self.timer.as_raw_fd(),
            self.flush_timer.as_raw_fd(),
        ]
    }

    fn handle_fd_event(&mut self, fd: RawFd) -> Result<(), DeviceError> {
        // Consume what woke the loop (it watches edge-triggered), then return the buffer.
        let asked = if fd == self.shared.stats_request.as_raw_fd() {
            self.shared.stats_request.read().is_ok()
        } else if fd == self.timer.as_raw_fd() {
            // Non-blocking: a timer disarmed after it fired reads EAGAIN.
            matches!(self.timer.wait(), Ok(n) if n > 0)
        } else if fd == self.flush_timer.as_raw_fd() {
            if matches!(self.flush_timer.wait(), Ok(n) if n > 0) {
                self.flush_armed = false;
                if let Some(active) = self.active.as_mut() {
                    flush_held(active, &mut self.log);
                }
            }
            false
        } else {
            false
        };
        if asked {
            self.return_stats_buffer()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::held::BLOCK_PAGES;
    use super::*;
    use crate::devices::bus::BusDevice;
    use crate::devices::virtio::test_driver::{TestDriver, DATA_AREA, MEM_SIZE, R, W};
    use crate::devices::EventSubscriber;
    use virtio_bindings::virtio_config::{
        VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_FEATURES_OK,
    };
    use vm_memory::Bytes;

    /// Pages the tests inflate: 2 MiB up, clear of rings and request buffers.
    const POOL: u64 = 0x20_0000;
    const POOL_PFN: u32 = (POOL >> PAGE_SHIFT) as u32;
    /// Where PFN arrays and statistics buffers go.
    const ARRAY: u64 = DATA_AREA;
    const STATS_BUF: u64 = DATA_AREA + 0x8000;

    fn all_features() -> BalloonConfig {
        BalloonConfig {
            deflate_on_oom: true,
            free_page_reporting: true,
            stats_period_s: 0,
        }
    }

    struct Fixture {
        d: TestDriver,
        handle: BalloonHandle,
        /// Used entries consumed so far, per queue.
        seen: [u16; 4],
    }

    /// A driver that does not negotiate MUST_TELL_HOST: the device discards inflated pages at
    /// once.
    fn fixture(config: BalloonConfig) -> Fixture {
        fixture_refusing(config, 1 << VIRTIO_BALLOON_F_MUST_TELL_HOST)
    }

    fn fixture_refusing(config: BalloonConfig, refused: u64) -> Fixture {
        let balloon = Balloon::new(config, MEM_SIZE >> 20).expect("balloon");
        let handle = balloon.handle();
        Fixture {
            d: TestDriver::running_without(Box::new(balloon), refused),
            handle,
            seen: [0; 4],
        }
    }

    impl Fixture {
        fn fill_pages(&mut self, first_pfn: u32, count: u32, byte: u8) {
            let page = vec![byte; PAGE_SIZE as usize];
            for pfn in first_pfn..first_pfn + count {
                self.d
                    .mem
                    .write_slice(&page, GuestAddress(u64::from(pfn) << PAGE_SHIFT))
                    .expect("fill");
            }
        }

        fn page_is_zero(&self, pfn: u32) -> bool {
            let mut page = vec![0xffu8; PAGE_SIZE as usize];
            self.d
                .mem
                .read_slice(&mut page, GuestAddress(u64::from(pfn) << PAGE_SHIFT))
                .expect("read");
            page.iter().all(|&b| b == 0)
        }

        fn write_pfns(&mut self, at: u64, pfns: &[u32]) -> u32 {
            let raw: Vec<u8> = pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
            self.d
                .mem
                .write_slice(&raw, GuestAddress(at))
                .expect("pfns");
            raw.len() as u32
        }

        /// Submits `buffers` on `queue` and expects the chain back, used length 0.
        fn submit(&mut self, queue: usize, buffers: &[(u64, u32, u16)]) {
            let head = self.d.add_chain(queue, buffers);
            self.d.notify(queue);
            let n = self.seen[queue];
            assert_eq!(
                self.d.used_idx(queue),
                n + 1,
                "queue {queue}: chain {buffers:x?} was not returned"
            );
            assert_eq!(self.d.used(queue, n), (u32::from(head), 0));
            self.seen[queue] += 1;
        }

        fn inflate(&mut self, pfns: &[u32]) {
            let len = self.write_pfns(ARRAY, pfns);
            self.submit(0, &[(ARRAY, len, R)]);
        }

        fn counters(&self) -> BalloonCounters {
            self.handle.status().counters
        }

        /// A good inflate of one page after whatever came before: the device still serves.
        fn assert_still_serves(&mut self, pfn: u32) {
            self.fill_pages(pfn, 1, 0x5a);
            let before = self.counters().inflated_pages;
            self.inflate(&[pfn]);
            assert!(self.page_is_zero(pfn), "pfn {pfn:#x} was not discarded");
            assert_eq!(self.counters().inflated_pages, before + 1);
        }

        fn post_stats(&mut self, entries: &[(u16, u64)]) -> u16 {
            let raw: Vec<u8> = entries
                .iter()
                .flat_map(|(tag, value)| {
                    let mut e = tag.to_le_bytes().to_vec();
                    e.extend_from_slice(&value.to_le_bytes());
                    e
                })
                .collect();
            self.d
                .mem
                .write_slice(&raw, GuestAddress(STATS_BUF))
                .expect("stats");
            let head = self.d.add_chain(2, &[(STATS_BUF, raw.len() as u32, R)]);
            self.d.notify(2);
            head
        }

        /// Serves the device's own fds (stats request, timer) as the event loop would.
        fn run_event_loop(&mut self) {
            let queue_fds: Vec<RawFd> = self
                .d
                .transport
                .queue_events()
                .iter()
                .map(|e| e.as_raw_fd())
                .collect();
            for fd in self.d.transport.event_fds() {
                if !queue_fds.contains(&fd) {
                    self.d.transport.handle_event(fd);
                }
            }
        }
    }

    #[test]
    fn options_parse_and_bad_ones_are_named() {
        assert_eq!(
            BalloonConfig::parse("").expect("empty"),
            BalloonConfig::default()
        );
        assert_eq!(
            BalloonConfig::parse("deflate-on-oom=on,free-page-reporting=on,stats-period=1")
                .expect("all"),
            BalloonConfig {
                deflate_on_oom: true,
                free_page_reporting: true,
                stats_period_s: 1
            }
        );
        let err = BalloonConfig::parse("deflate-on-oom=maybe").expect_err("bad switch");
        assert_eq!(
            err.to_string(),
            "--balloon deflate-on-oom=maybe: deflate-on-oom=maybe: expected on or off"
        );
        let err = BalloonConfig::parse("stats-period=99999").expect_err("too long");
        assert!(err.to_string().contains("0 to 3600"), "{err}");
        let err = BalloonConfig::parse("size=4").expect_err("unknown");
        assert!(
            err.to_string().contains("unknown option \"size=4\""),
            "{err}"
        );
        assert!(BalloonConfig::parse("on").is_err());
    }

    #[test]
    fn features_and_queues_follow_the_options() {
        let plain = Balloon::new(BalloonConfig::default(), 256).expect("plain");
        assert_eq!(
            plain.features(),
            (1 << VIRTIO_BALLOON_F_MUST_TELL_HOST) | (1 << VIRTIO_BALLOON_F_STATS_VQ)
        );
        assert_eq!(plain.queue_max_sizes().len(), 3);
        let all = Balloon::new(all_features(), 256).expect("all");
        assert_eq!(
            all.features(),
            (1 << VIRTIO_BALLOON_F_MUST_TELL_HOST)
                | (1 << VIRTIO_BALLOON_F_STATS_VQ)
                | (1 << VIRTIO_BALLOON_F_DEFLATE_ON_OOM)
                | (1 << VIRTIO_BALLOON_F_REPORTING)
        );
        assert_eq!(all.queue_max_sizes().len(), 4);
    }

    #[test]
    fn the_target_is_clamped_announced_and_actual_is_the_drivers() {
        let mut f = fixture(all_features());
        f.d.take_interrupt();
        let generation = f.d.read_reg(0xfc);
        assert_eq!(f.handle.set_target_mib(2), 2);
        assert_eq!(f.d.read_config(0, 4), (2 * 256u32).to_le_bytes());
        assert_eq!(f.d.take_interrupt() & 2, 2, "config-change interrupt");
        assert_ne!(f.d.read_reg(0xfc), generation, "config generation changed");
        // Clamped to the guest's 4 MiB.
        assert_eq!(f.handle.set_target_mib(1 << 40), 4);
        assert_eq!(f.handle.status().target_pages, 1024);
        // The driver writes actual, also in halves; num_pages is not the driver's.
        f.d.transport.write(0x100 + 4, &300u32.to_le_bytes());
        assert_eq!(f.handle.status().actual_pages, 300);
        f.d.transport.write(0x100 + 4, &[0x20, 0x01]);
        assert_eq!(f.handle.status().actual_pages, 0x120);
        f.d.transport.write(0x100, &7u32.to_le_bytes());
        assert_eq!(f.handle.status().target_pages, 1024);
        // An actual beyond guest RAM is reported as guest RAM.
        f.d.transport.write(0x100 + 4, &u32::MAX.to_le_bytes());
        assert_eq!(f.handle.status().actual_pages, 1024);
        assert_eq!(f.d.read_config(4, 4), 1024u32.to_le_bytes());
        // Setting the same target again is not a change.
        f.d.take_interrupt();
        f.handle.set_target_mib(4);
        assert_eq!(f.d.take_interrupt(), 0);
    }

    #[test]
    fn inflated_pages_are_discarded_and_deflate_touches_nothing() {
        let mut f = fixture(all_features());
        f.fill_pages(POOL_PFN, 64, 0xab);
        // Descending, as Linux sends them, with a gap.
        let mut pfns: Vec<u32> = (POOL_PFN..POOL_PFN + 16).rev().collect();
        pfns.extend(POOL_PFN + 20..POOL_PFN + 24);
        f.inflate(&pfns);
        for pfn in pfns.iter().copied() {
            assert!(f.page_is_zero(pfn), "pfn {pfn:#x} still holds data");
        }
        for pfn in [POOL_PFN + 16, POOL_PFN + 19, POOL_PFN + 24] {
            assert!(
                !f.page_is_zero(pfn),
                "pfn {pfn:#x} was not inflated but lost its data"
            );
        }
        assert_eq!(f.counters().inflated_pages, 20);
        assert_eq!(f.d.take_interrupt() & 1, 1);

        f.fill_pages(POOL_PFN + 30, 4, 0xcd);
        let len = f.write_pfns(ARRAY, &[POOL_PFN + 30, POOL_PFN + 31]);
        f.submit(1, &[(ARRAY, len, R)]);
        assert!(!f.page_is_zero(POOL_PFN + 30), "deflate discarded a page");
        assert_eq!(f.counters().deflated_pages, 2);
    }

    #[test]
    fn with_must_tell_host_a_huge_page_goes_back_whole() {
        let mut f = fixture_refusing(all_features(), 0);
        let half = (BLOCK_PAGES / 2) as u32;
        f.fill_pages(POOL_PFN, 2 * half, 0xab);
        // The top half of the 2 MiB block first, as a driver filling downward sends it: held.
        let top: Vec<u32> = (POOL_PFN + half..POOL_PFN + 2 * half).rev().collect();
        f.inflate(&top);
        assert_eq!(f.counters().inflated_pages, u64::from(half));
        assert!(
            top.iter().all(|&pfn| !f.page_is_zero(pfn)),
            "half a block was discarded, splitting the host's huge page"
        );
        // The bottom half completes the block: it goes in one piece.
        let bottom: Vec<u32> = (POOL_PFN..POOL_PFN + half).rev().collect();
        f.inflate(&bottom);
        for pfn in POOL_PFN..POOL_PFN + 2 * half {
            assert!(f.page_is_zero(pfn), "pfn {pfn:#x} still holds data");
        }
    }

    #[test]
    fn held_pages_go_after_a_moment_and_deflated_ones_never() {
        let mut f = fixture_refusing(all_features(), 0);
        f.fill_pages(POOL_PFN, 8, 0xab);
        let pfns: Vec<u32> = (POOL_PFN..POOL_PFN + 8).collect();
        f.inflate(&pfns);
        // The guest takes two back before they were discarded, and writes to them.
        let len = f.write_pfns(ARRAY, &[POOL_PFN + 2, POOL_PFN + 3]);
        f.submit(1, &[(ARRAY, len, R)]);
        f.fill_pages(POOL_PFN + 2, 2, 0xcd);
        assert!(!f.page_is_zero(POOL_PFN), "held, not yet discarded");
        std::thread::sleep(HOLD_FOR + Duration::from_millis(100));
        f.run_event_loop();
        for pfn in [0, 1, 4, 5, 6, 7].map(|i| POOL_PFN + i) {
            assert!(f.page_is_zero(pfn), "pfn {pfn:#x} was not discarded");
        }
        for pfn in [POOL_PFN + 2, POOL_PFN + 3] {
            assert!(
                !f.page_is_zero(pfn),
                "pfn {pfn:#x} was deflated, then discarded"
            );
        }
        // A reset forgets what is held: the guest owns its memory again.
        f.fill_pages(POOL_PFN + 8, 1, 0xef);
        f.inflate(&[POOL_PFN + 8]);
        f.d.restart();
        std::thread::sleep(HOLD_FOR + Duration::from_millis(100));
        f.run_event_loop();
        assert!(
            !f.page_is_zero(POOL_PFN + 8),
            "held page discarded after a reset"
        );
    }

    #[test]
    fn pfns_outside_memory_are_skipped_and_counted() {
        let mut f = fixture(all_features());
        f.fill_pages(POOL_PFN, 2, 0xab);
        let mmio_gap_pfn = (0xd000_0000u64 >> PAGE_SHIFT) as u32;
        let end_pfn = (MEM_SIZE >> PAGE_SHIFT) as u32;
        f.inflate(&[
            POOL_PFN,
            u32::MAX,
            end_pfn,
            mmio_gap_pfn,
            POOL_PFN + 1,
            end_pfn - 1,
        ]);
        let counters = f.counters();
        assert_eq!(counters.invalid_pfns, 3);
        assert_eq!(counters.inflated_pages, 3);
        assert_eq!(
            counters.refused, 0,
            "invalid PFNs are skipped, the request is served"
        );
        assert!(f.page_is_zero(POOL_PFN) && f.page_is_zero(POOL_PFN + 1));
        f.assert_still_serves(POOL_PFN + 5);
    }

    #[test]
    fn malformed_pfn_requests_are_refused_whole() {
        let mut f = fixture(all_features());
        f.fill_pages(POOL_PFN, 8, 0xab);
        let len = f.write_pfns(ARRAY, &[POOL_PFN, POOL_PFN + 1]);
        let too_many = 4 * (MAX_PFNS_PER_REQUEST as u32 + 1);
        let cases: [&[(u64, u32, u16)]; 6] = [
            // Not whole PFNs.
            &[(ARRAY, len - 1, R)],
            // Device-writable PFN array (wrong direction).
            &[(ARRAY, len, W)],
            &[(ARRAY, len, R), (ARRAY + 0x100, 4, W)],
            // More PFNs than a request may hold.
            &[(ARRAY, too_many, R)],
            // Outside memory, and an address that wraps.
            &[(MEM_SIZE - 4, 8, R)],
            &[(u64::MAX - 3, 8, R)],
        ];
        for buffers in cases {
            f.submit(0, buffers);
        }
        assert_eq!(f.counters().refused, cases.len() as u64);
        assert_eq!(f.counters().inflated_pages, 0);
        assert!(
            !f.page_is_zero(POOL_PFN),
            "a refused request discarded a page"
        );
        f.assert_still_serves(POOL_PFN + 7);
    }

    #[test]
    fn descriptor_loops_are_returned_unused() {
        let mut f = fixture(all_features());
        f.fill_pages(POOL_PFN, 1, 0xab);
        f.write_pfns(ARRAY, &[POOL_PFN]);
        f.d.write_desc(0, 0, ARRAY, 4, R | 1, 1);
        f.d.write_desc(0, 1, ARRAY, 4, R | 1, 0);
        f.d.push_avail(0, 0);
        f.d.notify(0);
        assert_eq!(f.d.used(0, 0), (0, 0));
        assert!(!f.page_is_zero(POOL_PFN), "a looping request was served");
        f.seen[0] = 1;
        // The fixture's chains start at descriptor 0 again, which the device has returned.
        f.assert_still_serves(POOL_PFN + 1);
    }

    #[test]
    fn free_page_reports_are_discarded_and_bad_ranges_refused() {
        let mut f = fixture(all_features());
        f.fill_pages(POOL_PFN, 32, 0xab);
        // Queue 3: statistics were negotiated too.
        f.submit(3, &[(POOL, 0x4000, W), (POOL + 0x8000, 0x2000, W)]);
        assert!(f.page_is_zero(POOL_PFN) && f.page_is_zero(POOL_PFN + 9));
        assert!(!f.page_is_zero(POOL_PFN + 4) && !f.page_is_zero(POOL_PFN + 10));
        assert_eq!(f.counters().reported_bytes, 0x6000);

        let cases: [&[(u64, u32, u16)]; 5] = [
            &[(POOL + 0x10000, 0x1000, R)],    // device-readable
            &[(POOL + 0x10800, 0x1000, W)],    // address not aligned
            &[(POOL + 0x10000, 0x1800, W)],    // length not aligned
            &[(MEM_SIZE - 0x1000, 0x2000, W)], // runs off the end of RAM
            &[(u64::MAX - 0xfff, 0x2000, W)],  // wraps
        ];
        for buffers in cases {
            f.submit(3, buffers);
        }
        // A report with one bad range discards none of it.
        f.submit(3, &[(POOL + 0x10000, 0x1000, W), (1 << 40, 0x1000, W)]);
        assert!(
            !f.page_is_zero(POOL_PFN + 16),
            "a refused report discarded a page"
        );
        assert_eq!(f.counters().refused, 6);
        assert_eq!(f.counters().reported_bytes, 0x6000);
        f.assert_still_serves(POOL_PFN + 20);
    }

    /// Without STATS_VQ, the reporting queue is number 2.
    #[test]
    fn reporting_moves_to_queue_2_without_statistics() {
        let balloon = Balloon::new(all_features(), MEM_SIZE >> 20).expect("balloon");
        let handle = balloon.handle();
        let mut d = TestDriver::new(Box::new(balloon));
        d.write_reg(0x70, VIRTIO_CONFIG_S_ACKNOWLEDGE);
        d.write_reg(0x70, VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER);
        d.write_reg(0x24, 0);
        d.write_reg(0x20, 1 << VIRTIO_BALLOON_F_REPORTING);
        d.write_reg(0x24, 1);
        d.write_reg(0x20, 1); // VERSION_1
        let status =
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK;
        d.write_reg(0x70, status);
        for queue in 0..3 {
            d.setup_queue(queue, QUEUE_SIZE);
        }
        d.driver_ok();
        d.mem
            .write_slice(&[0xab; 0x2000], GuestAddress(POOL))
            .expect("fill");
        d.add_chain(2, &[(POOL, 0x2000, W)]);
        d.notify(2);
        assert_eq!(d.used_idx(2), 1);
        assert_eq!(handle.status().counters.reported_bytes, 0x2000);
        assert_eq!(handle.status().counters.stats_updates, 0);
        let mut byte = [0xffu8; 1];
        d.mem
            .read_slice(&mut byte, GuestAddress(POOL))
            .expect("read");
        assert_eq!(byte, [0]);
    }

    #[test]
    fn statistics_are_kept_and_the_buffer_returned_on_request() {
        let mut f = fixture(all_features());
        assert!(!f.handle.request_stats(), "no buffer held yet");
        let head = f.post_stats(&[
            (VIRTIO_BALLOON_S_MEMTOT, 4 << 20),
            (VIRTIO_BALLOON_S_MEMFREE, 1 << 20),
            (VIRTIO_BALLOON_S_MAJFLT, 7),
            (0x99, 12345), // an unknown tag is ignored
        ]);
        assert_eq!(f.d.used_idx(2), 0, "the device keeps the statistics buffer");
        let status = f.handle.status();
        assert_eq!(status.stats.total, Some(4 << 20));
        assert_eq!(status.stats.free, Some(1 << 20));
        assert_eq!(status.stats.major_faults, Some(7));
        assert_eq!(status.stats.swap_in, None);
        assert!(status.stats_updated_at.is_some());
        let mut updates = f.handle.stats_updates();
        assert_eq!(*updates.borrow_and_update(), 1);

        // A request returns it.
        assert!(f.handle.request_stats());
        f.run_event_loop();
        assert_eq!(f.d.used_idx(2), 1);
        assert_eq!(f.d.used(2, 0), (u32::from(head), 0));
        assert!(
            !f.handle.request_stats(),
            "nothing held until the driver posts again"
        );

        // The driver posts fresh numbers.
        f.post_stats(&[(VIRTIO_BALLOON_S_MEMFREE, 2 << 20)]);
        assert!(updates.has_changed().expect("sender alive"));
        let status = f.handle.status();
        assert_eq!(status.stats.free, Some(2 << 20));
        assert_eq!(status.stats.total, None, "each buffer is a whole new set");
        assert_eq!(status.counters.stats_updates, 2);
    }

    #[test]
    fn malformed_statistics_buffers_are_returned_and_the_last_numbers_kept() {
        let mut f = fixture(all_features());
        f.post_stats(&[(VIRTIO_BALLOON_S_MEMTOT, 4 << 20)]);
        let mut returned = 0;
        let too_large = (MAX_STATS as u32 + 1) * STAT_ENTRY_LEN as u32;
        let cases: [&[(u64, u32, u16)]; 5] = [
            &[(STATS_BUF, 15, R)],        // not whole entries
            &[(STATS_BUF, too_large, R)], // too many entries
            &[(STATS_BUF, 10, W)],        // device-writable
            &[(MEM_SIZE - 5, 10, R)],     // outside memory
            &[(STATS_BUF, 0, R)],         // empty
        ];
        for buffers in cases {
            let head = f.d.add_chain(2, buffers);
            f.d.notify(2);
            // Each malformed buffer comes back at once. The first also pushes out the held
            // good one, which counts as a refusal of its own (two buffers at once).
            let used = f.d.used_idx(2);
            assert!(used > returned, "{buffers:x?} was kept");
            assert_eq!(f.d.used(2, used - 1), (u32::from(head), 0));
            returned = used;
        }
        assert_eq!(f.handle.status().stats.total, Some(4 << 20));
        assert_eq!(f.handle.status().counters.stats_updates, 1);
        // A good buffer is still taken.
        f.post_stats(&[(VIRTIO_BALLOON_S_AVAIL, 3 << 20)]);
        assert_eq!(f.handle.status().stats.available, Some(3 << 20));
        assert_eq!(f.d.used_idx(2), returned, "the good buffer is kept");
        f.assert_still_serves(POOL_PFN);
    }

    #[test]
    fn a_buffer_posted_before_driver_ok_is_taken_at_activation() {
        let balloon = Balloon::new(BalloonConfig::default(), MEM_SIZE >> 20).expect("balloon");
        let handle = balloon.handle();
        let mut d = TestDriver::new(Box::new(balloon));
        d.init();
        for queue in 0..3 {
            d.setup_queue(queue, QUEUE_SIZE);
        }
        let entry: Vec<u8> = [
            VIRTIO_BALLOON_S_MEMTOT.to_le_bytes().to_vec(),
            77u64.to_le_bytes().to_vec(),
        ]
        .concat();
        d.mem
            .write_slice(&entry, GuestAddress(STATS_BUF))
            .expect("stats");
        d.add_chain(2, &[(STATS_BUF, 10, R)]);
        d.notify(2); // dropped: the device is not running yet
        assert_eq!(handle.status().stats.total, None);
        d.driver_ok();
        assert_eq!(handle.status().stats.total, Some(77));
        assert!(handle.request_stats());
    }

    #[test]
    fn a_stats_period_returns_the_buffer_on_its_own() {
        let config = BalloonConfig {
            stats_period_s: 1,
            ..BalloonConfig::default()
        };
        let balloon = Balloon::new(config, MEM_SIZE >> 20).expect("balloon");
        let timer_fd = balloon.event_fds()[1];
        let handle = balloon.handle();
        assert!(!handle.stats_on_request());
        let mut f = Fixture {
            d: TestDriver::running(Box::new(balloon)),
            handle,
            seen: [0; 4],
        };
        f.post_stats(&[(VIRTIO_BALLOON_S_MEMTOT, 1)]);
        // Nothing before the period.
        f.d.transport.handle_event(timer_fd);
        assert_eq!(f.d.used_idx(2), 0);
        std::thread::sleep(Duration::from_millis(1100));
        f.d.transport.handle_event(timer_fd);
        assert_eq!(f.d.used_idx(2), 1, "the period returned the buffer");
        // A reset disarms the timer; a stale event must not block.
        f.d.write_reg(0x70, 0);
        f.d.transport.handle_event(timer_fd);
        assert_eq!(f.handle.status().actual_pages, 0);
    }

    #[test]
    fn a_reset_empties_the_balloon_and_detaches_the_interrupt() {
        let mut f = fixture(all_features());
        f.d.transport.write(0x100 + 4, &100u32.to_le_bytes());
        f.post_stats(&[(VIRTIO_BALLOON_S_MEMTOT, 1)]);
        f.d.write_reg(0x70, 0);
        assert_eq!(f.handle.status().actual_pages, 0);
        assert!(!f.handle.request_stats());
        f.handle.set_target_mib(1);
        assert_eq!(f.d.read_reg(0x60), 0, "no interrupt without a driver");
        // The target waits for the next driver.
        f.d.init();
        assert_eq!(f.d.read_config(0, 4), 256u32.to_le_bytes());
    }
}
