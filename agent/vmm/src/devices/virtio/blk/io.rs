//! The host side of virtio-blk's data path: how the image is opened ([`CacheMode`]: direct I/O
//! by default, with a buffered descriptor beside it), and the pool of worker threads that move
//! data between the image and guest memory while the event loop goes on serving the queue.
//!
//! A [`Job`] is one or more checked requests for contiguous sectors (the device merges
//! neighbours, as QEMU does). A worker turns its guest ranges into host `iovec`s and runs one
//! `preadv`/`pwritev` (or `fdatasync`) straight into or out of guest memory, then hands the job
//! back with its result; the event loop, woken through an eventfd, writes the status bytes and
//! the used ring. Workers never touch the rings.
//!
//! Direct I/O needs the file offset, every buffer's address and every buffer's length aligned
//! as the filesystem says (`statx(STATX_DIOALIGN)`). A job that is not goes through the
//! buffered descriptor, as does one the kernel refuses with `EINVAL` anyway; `fdatasync` on
//! either descriptor flushes the inode, so FLUSH covers both paths.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::ErrorKind;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::{JoinHandle, Thread};

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::bus::lock;

/// Worker threads per disk at most; they are started as requests need them.
pub const MAX_WORKERS: usize = 8;
/// What one `preadv`/`pwritev` takes at most (Linux's `UIO_MAXIOV`).
const IOV_MAX: usize = 1024;
/// Direct I/O alignment assumed for a block device whose kernel does not report one: right for
/// every logical block size up to 4 KiB.
const FALLBACK_DIO_ALIGN: u64 = 4096;

/// How the image file is opened: `--disk PATH,cache=...`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum CacheMode {
    /// `O_DIRECT`: guest data does not also sit in the host's page cache (buffered I/O only
    /// where direct I/O is impossible).
    #[default]
    None,
    /// Through the host's page cache.
    Writeback,
}

impl CacheMode {
    /// The `cache=` value: `none` or `writeback`.
    pub fn parse(value: &str) -> Option<CacheMode> {
        match value {
            "none" => Some(CacheMode::None),
            "writeback" => Some(CacheMode::Writeback),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            CacheMode::None => "none",
            CacheMode::Writeback => "writeback",
        }
    }
}

/// An `O_DIRECT` descriptor of the image and the alignment it needs.
#[derive(Debug)]
struct DirectFile {
    file: File,
    /// Buffers' host addresses are multiples of this.
    mem_align: u64,
    /// File offsets and buffer lengths are multiples of this.
    offset_align: u64,
}

impl DirectFile {
    fn fits(&self, offset: u64, iovecs: &[libc::iovec]) -> bool {
        offset.is_multiple_of(self.offset_align)
            && iovecs.iter().all(|iov| {
                (iov.iov_base as u64).is_multiple_of(self.mem_align)
                    && (iov.iov_len as u64).is_multiple_of(self.offset_align)
            })
    }
}

/// The image's descriptors: always a buffered one, and a direct one with `cache=none` where the
/// filesystem allows it.
#[derive(Debug)]
pub struct DiskFiles {
    buffered: File,
    direct: Option<DirectFile>,
}

impl DiskFiles {
    /// Adds a direct descriptor to `buffered` (the image at `path`) for `cache=none`, if the
    /// file supports direct I/O; otherwise logs one warning and stays buffered.
    pub fn new(buffered: File, path: &Path, read_only: bool, cache: CacheMode) -> DiskFiles {
        let direct = match cache {
            CacheMode::Writeback => None,
            CacheMode::None => match open_direct(&buffered, path, read_only) {
                Ok(direct) => {
                    tracing::debug!(
                        path = %path.display(),
                        mem_align = direct.mem_align,
                        offset_align = direct.offset_align,
                        "disk image opened with O_DIRECT"
                    );
                    Some(direct)
                }
                Err(reason) => {
                    tracing::warn!(
                        path = %path.display(),
                        reason,
                        "cache=none: no direct I/O on this file; using the host page cache"
                    );
                    None
                }
            },
        };
        DiskFiles { buffered, direct }
    }

    /// Whether requests can bypass the host page cache.
    pub fn direct(&self) -> bool {
        self.direct.is_some()
    }

    /// The buffered descriptor.
    pub fn file(&self) -> &File {
        &self.buffered
    }
}

/// What `statx(STATX_DIOALIGN)` says about `file`: `Ok(None)` when the kernel or filesystem
/// reports nothing, `Ok(Some((0, _)))` when the file does not support direct I/O.
fn dio_alignment(file: &File) -> std::io::Result<Option<(u32, u32)>> {
    // nix has no statx.
    // SAFETY: statx is plain old data; all zeroes is a valid value.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: the path is a NUL-terminated empty string and AT_EMPTY_PATH makes statx describe
    // the open descriptor itself; `stx` is a valid, writable statx buffer for the whole call.
    let rc = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if stx.stx_mask & libc::STATX_DIOALIGN == 0 {
        return Ok(None);
    }
    Ok(Some((stx.stx_dio_mem_align, stx.stx_dio_offset_align)))
}

fn open_direct(buffered: &File, path: &Path, read_only: bool) -> Result<DirectFile, String> {
    let is_block_device = buffered
        .metadata()
        .map(|m| m.file_type().is_block_device())
        .unwrap_or(false);
    let file = OpenOptions::new()
        .read(true)
        .write(!read_only)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .map_err(|e| format!("open with O_DIRECT: {e}"))?;
    let (mem_align, offset_align) = match dio_alignment(&file) {
        Ok(Some((mem, offset))) if mem != 0 && offset != 0 => (u64::from(mem), u64::from(offset)),
        Ok(Some(_)) => return Err("the filesystem does not support direct I/O".into()),
        // tmpfs, for one, accepts O_DIRECT and reports no alignment: its "direct" I/O is its
        // page cache anyway. A block device on a kernel older than STATX_DIOALIGN gets a safe
        // guess instead.
        Ok(None) if is_block_device => (FALLBACK_DIO_ALIGN, FALLBACK_DIO_ALIGN),
        Ok(None) => return Err("the filesystem reports no direct I/O alignment".into()),
        Err(e) => return Err(format!("statx: {e}")),
    };
    if !(mem_align.is_power_of_two() && offset_align.is_power_of_two()) {
        return Err(format!(
            "direct I/O alignment {mem_align}/{offset_align} is not a power of two"
        ));
    }
    Ok(DirectFile {
        file,
        mem_align,
        offset_align,
    })
}

/// What a job does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobKind {
    /// File to guest memory.
    Read,
    /// Guest memory to file.
    Write,
    /// `fdatasync`.
    Flush,
}

/// A request the job completes: its chain's head, where its status byte goes, and the used
/// length to report when the job succeeds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    pub head: u16,
    pub status: GuestAddress,
    pub used_len: u32,
}

/// Work for the pool, checked by the event loop: the guest ranges are inside guest memory and
/// the file range inside the disk.
pub struct Job {
    pub kind: JobKind,
    /// Byte offset in the image.
    pub offset: u64,
    /// Bytes the job moves (the sum of `segments`).
    pub len: u64,
    /// Guest memory ranges, in file order.
    pub segments: Vec<(GuestAddress, usize)>,
    /// The requests, in file order.
    pub requests: Vec<Completion>,
    pub mem: Arc<GuestMemoryMmap>,
    /// Set by the worker.
    pub result: std::io::Result<()>,
}

impl Job {
    pub fn new(kind: JobKind, offset: u64, mem: Arc<GuestMemoryMmap>) -> Job {
        Job {
            kind,
            offset,
            len: 0,
            segments: Vec::new(),
            requests: Vec::new(),
            mem,
            result: Ok(()),
        }
    }
}

/// Requests the pool served by each path, and the calls that served them, for logs and tests.
#[derive(Debug, Default)]
pub struct IoCounters {
    direct: AtomicU64,
    buffered: AtomicU64,
    jobs: AtomicU64,
}

impl IoCounters {
    /// Read and write jobs run: one `preadv`/`pwritev` each (more if the kernel returns
    /// short), however many requests they merged.
    pub fn jobs(&self) -> u64 {
        self.jobs.load(Ordering::Relaxed)
    }

    /// Requests that went through the `O_DIRECT` descriptor.
    pub fn direct(&self) -> u64 {
        self.direct.load(Ordering::Relaxed)
    }

    /// Read and write requests that went through the page cache.
    pub fn buffered(&self) -> u64 {
        self.buffered.load(Ordering::Relaxed)
    }
}

struct State {
    queued: VecDeque<Job>,
    finished: Vec<Job>,
    /// Jobs a worker has taken and not yet finished.
    running: usize,
    /// Parked workers that nobody has woken yet, the most recently parked last: the next job
    /// goes to the worker that ran the last one, whose memory and CPU are still warm, so a
    /// stream of jobs keeps to one thread (and the scheduler's placement of it).
    idle: Vec<Thread>,
    /// [`IoPool::cancel`] waits on `drained`.
    cancelling: bool,
    shutdown: bool,
}

struct Shared {
    state: Mutex<State>,
    /// `running` dropped to 0.
    drained: Condvar,
    /// Signalled when `finished` goes from empty to not empty.
    done: EventFd,
    files: DiskFiles,
    counters: Arc<IoCounters>,
    einval_logged: AtomicBool,
}

/// The worker threads of one disk.
pub struct IoPool {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    spawn_failed: bool,
}

impl IoPool {
    pub fn new(files: DiskFiles) -> std::io::Result<IoPool> {
        Ok(IoPool {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    queued: VecDeque::new(),
                    finished: Vec::new(),
                    running: 0,
                    idle: Vec::new(),
                    cancelling: false,
                    shutdown: false,
                }),
                drained: Condvar::new(),
                done: EventFd::new(libc::EFD_NONBLOCK)?,
                files,
                counters: Arc::default(),
                einval_logged: AtomicBool::new(false),
            }),
            threads: Vec::new(),
            spawn_failed: false,
        })
    }

    pub fn files(&self) -> &DiskFiles {
        &self.shared.files
    }

    pub fn counters(&self) -> Arc<IoCounters> {
        self.shared.counters.clone()
    }

    /// Readable when finished jobs wait in [`IoPool::take_finished`].
    pub fn done_fd(&self) -> RawFd {
        self.shared.done.as_raw_fd()
    }

    /// Makes `done_fd` readable again (to come back to work deferred by the event loop).
    pub fn wake_event_loop(&self) {
        if let Err(error) = self.shared.done.write(1) {
            tracing::error!(%error, "virtio-blk: cannot signal the completion eventfd");
        }
    }

    /// Queues `job` for a worker, starting one if none is idle and fewer than [`MAX_WORKERS`]
    /// run.
    pub fn submit(&mut self, job: Job) {
        let mut state = lock(&self.shared.state);
        state.queued.push_back(job);
        if let Some(worker) = state.idle.pop() {
            drop(state);
            worker.unpark();
            return;
        }
        drop(state);
        if self.threads.len() < MAX_WORKERS && !self.spawn_failed {
            let shared = self.shared.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("blk-io-{}", self.threads.len()))
                .spawn(move || worker(&shared));
            match spawned {
                Ok(handle) => self.threads.push(handle),
                Err(error) => {
                    self.spawn_failed = true;
                    tracing::warn!(
                        %error,
                        workers = self.threads.len(),
                        "virtio-blk: cannot start an I/O thread"
                    );
                }
            }
        }
        if self.threads.is_empty() {
            // No thread at all: serve on the caller's thread rather than never.
            let job = lock(&self.shared.state).queued.pop_back();
            if let Some(mut job) = job {
                job.result = run_job(&self.shared, &job, &mut Vec::new());
                finish(&self.shared, job, false);
            }
        }
    }

    /// Moves the jobs the workers finished into `into` (which should be empty) and consumes the
    /// eventfd's signal.
    pub fn take_finished(&self, into: &mut Vec<Job>) {
        let _ = self.shared.done.read();
        let mut state = lock(&self.shared.state);
        std::mem::swap(&mut state.finished, into);
    }

    /// Drops every queued job, waits for the running ones to end, and drops what they
    /// finished: afterwards no worker touches guest memory for an earlier job.
    pub fn cancel(&mut self) {
        let mut state = lock(&self.shared.state);
        state.queued.clear();
        state.cancelling = true;
        while state.running > 0 {
            state = self
                .shared
                .drained
                .wait(state)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
        state.cancelling = false;
        state.finished.clear();
        drop(state);
        let _ = self.shared.done.read();
    }
}

impl Drop for IoPool {
    fn drop(&mut self) {
        let idle = {
            let mut state = lock(&self.shared.state);
            state.queued.clear();
            state.shutdown = true;
            std::mem::take(&mut state.idle)
        };
        for worker in idle {
            worker.unpark();
        }
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

fn worker(shared: &Shared) {
    let mut iovecs = Vec::new();
    loop {
        let job = {
            let mut state = lock(&shared.state);
            loop {
                if let Some(job) = state.queued.pop_front() {
                    state.running += 1;
                    break job;
                }
                if state.shutdown {
                    return;
                }
                let me = std::thread::current();
                state.idle.push(me.clone());
                drop(state);
                // An unpark between the unlock and here makes this return at once.
                std::thread::park();
                state = lock(&shared.state);
                // Whoever woke us took us off `idle`; a spurious wake-up did not.
                if let Some(at) = state.idle.iter().position(|t| t.id() == me.id()) {
                    state.idle.remove(at);
                }
            }
        };
        let mut job = job;
        job.result = run_job(shared, &job, &mut iovecs);
        finish(shared, job, true);
    }
}

/// Hands `job` back to the event loop.
fn finish(shared: &Shared, job: Job, was_running: bool) {
    let signal = {
        let mut state = lock(&shared.state);
        if was_running {
            state.running -= 1;
            if state.running == 0 && state.cancelling {
                shared.drained.notify_all();
            }
        }
        let signal = state.finished.is_empty();
        state.finished.push(job);
        signal
    };
    // The event loop reads the eventfd before it takes `finished`, so one signal per
    // empty-to-not-empty change loses nothing.
    if signal {
        if let Err(error) = shared.done.write(1) {
            tracing::error!(%error, "virtio-blk: cannot signal the completion eventfd");
        }
    }
}

fn run_job(shared: &Shared, job: &Job, iovecs: &mut Vec<libc::iovec>) -> std::io::Result<()> {
    let files = &shared.files;
    let write = match job.kind {
        JobKind::Flush => return files.buffered.sync_data(),
        JobKind::Read => false,
        JobKind::Write => true,
    };
    let requests = job.requests.len() as u64;
    shared.counters.jobs.fetch_add(1, Ordering::Relaxed);
    build_iovecs(job, iovecs)?;
    if let Some(direct) = files.direct.as_ref().filter(|d| d.fits(job.offset, iovecs)) {
        match transfer(direct.file.as_raw_fd(), iovecs, job.offset, write) {
            Err(error) if error.raw_os_error() == Some(libc::EINVAL) => {
                if !shared.einval_logged.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        offset = job.offset,
                        len = job.len,
                        "virtio-blk: direct I/O refused (EINVAL); such requests use the page cache"
                    );
                }
                // The iovecs moved on as far as the failed call got: lay them out again.
                build_iovecs(job, iovecs)?;
            }
            result => {
                shared
                    .counters
                    .direct
                    .fetch_add(requests, Ordering::Relaxed);
                return result;
            }
        }
    }
    shared
        .counters
        .buffered
        .fetch_add(requests, Ordering::Relaxed);
    transfer(files.buffered.as_raw_fd(), iovecs, job.offset, write)
}

/// The host addresses of the job's guest ranges, split where guest memory regions end.
fn build_iovecs(job: &Job, iovecs: &mut Vec<libc::iovec>) -> std::io::Result<()> {
    iovecs.clear();
    for &(addr, len) in &job.segments {
        for slice in job.mem.get_slices(addr, len) {
            // The event loop checked the ranges; memory does not shrink while the VM runs.
            let slice = slice.map_err(std::io::Error::other)?;
            iovecs.push(libc::iovec {
                iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                iov_len: slice.len(),
            });
        }
    }
    Ok(())
}

/// `preadv`s or `pwritev`s all of `iovecs` at `offset` of `fd`, however short each call is.
fn transfer(
    fd: RawFd,
    iovecs: &mut [libc::iovec],
    mut offset: u64,
    write: bool,
) -> std::io::Result<()> {
    let mut first = 0;
    while first < iovecs.len() {
        let batch = &iovecs[first..iovecs.len().min(first + IOV_MAX)];
        let file_offset = libc::off_t::try_from(offset)
            .map_err(|_| std::io::Error::from(ErrorKind::InvalidInput))?;
        // `batch.len()` is at most IOV_MAX, which fits a c_int.
        let count = batch.len() as libc::c_int;
        // Raw preadv/pwritev, not nix's: those take `IoSlice`/`IoSliceMut`, i.e. Rust slices
        // over guest memory (which the guest may change at any time) and a conversion pass per
        // request; the iovecs built from the descriptor chain go to the kernel as they are.
        let n = if write {
            // SAFETY: every iovec names a range of guest memory inside a mapping that the job's
            // `Arc<GuestMemoryMmap>` keeps alive until the job is dropped, after this call.
            // The kernel only reads it; guest memory is never behind a Rust reference (it is
            // shared with the guest and accessed through volatile slices).
            unsafe { libc::pwritev(fd, batch.as_ptr(), count, file_offset) }
        } else {
            // SAFETY: as for pwritev; the kernel writes into guest memory, which no Rust
            // reference covers, like a device doing DMA.
            unsafe { libc::preadv(fd, batch.as_ptr(), count, file_offset) }
        };
        let done = match usize::try_from(n) {
            Ok(0) => {
                return Err(if write {
                    ErrorKind::WriteZero.into()
                } else {
                    ErrorKind::UnexpectedEof.into()
                })
            }
            Ok(done) => done,
            Err(_) => {
                let error = std::io::Error::last_os_error();
                if error.kind() == ErrorKind::Interrupted {
                    continue;
                }
                return Err(error);
            }
        };
        offset += done as u64;
        let mut left = done;
        while left > 0 && first < iovecs.len() {
            let iov = &mut iovecs[first];
            if left >= iov.iov_len {
                left -= iov.iov_len;
                first += 1;
            } else {
                iov.iov_base = iov.iov_base.cast::<u8>().wrapping_add(left).cast();
                iov.iov_len -= left;
                left = 0;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use vm_memory::Bytes;

    #[test]
    fn cache_modes_parse() {
        assert_eq!(CacheMode::parse("none"), Some(CacheMode::None));
        assert_eq!(CacheMode::parse("writeback"), Some(CacheMode::Writeback));
        assert_eq!(CacheMode::parse("unsafe"), None);
        assert_eq!(CacheMode::default().as_str(), "none");
    }

    #[test]
    fn a_read_past_the_end_of_the_file_is_an_error() {
        let mut file = tempfile::tempfile().expect("file");
        file.write_all(&[9u8; 3]).expect("fill");
        let mut a = [0u8; 2];
        let mut b = [0u8; 2];
        let mut iovecs = [
            libc::iovec {
                iov_base: a.as_mut_ptr().cast(),
                iov_len: a.len(),
            },
            libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            },
        ];
        let err = transfer(file.as_raw_fd(), &mut iovecs, 0, false).expect_err("eof");
        assert_eq!(err.kind(), ErrorKind::UnexpectedEof);
        assert_eq!((a, b), ([9, 9], [9, 0]));
    }

    #[test]
    fn jobs_move_data_through_guest_memory() {
        let mem =
            Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).expect("mem"));
        let file = tempfile::tempfile().expect("file");
        file.set_len(4096).expect("size");
        let files = DiskFiles {
            buffered: file,
            direct: None,
        };
        let mut pool = IoPool::new(files).expect("pool");
        mem.write_slice(&[7u8; 1024], GuestAddress(0x1000))
            .expect("data");
        let mut write = Job::new(JobKind::Write, 512, mem.clone());
        write.segments = vec![(GuestAddress(0x1000), 1024)];
        write.len = 1024;
        pool.submit(write);
        let mut finished = Vec::new();
        while finished.is_empty() {
            std::thread::sleep(std::time::Duration::from_millis(1));
            pool.take_finished(&mut finished);
        }
        assert!(finished[0].result.is_ok());
        let mut read = Job::new(JobKind::Read, 0, mem.clone());
        read.segments = vec![(GuestAddress(0x4000), 2048)];
        read.len = 2048;
        pool.submit(read);
        finished.clear();
        while finished.is_empty() {
            std::thread::sleep(std::time::Duration::from_millis(1));
            pool.take_finished(&mut finished);
        }
        assert!(finished[0].result.is_ok());
        let mut back = [0u8; 2048];
        mem.read_slice(&mut back, GuestAddress(0x4000))
            .expect("read");
        assert!(back[..512].iter().all(|&b| b == 0));
        assert!(back[512..1536].iter().all(|&b| b == 7));
        assert!(back[1536..].iter().all(|&b| b == 0));
    }
}
