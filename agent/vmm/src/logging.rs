//! Bounded output: what a guest can make fabric-vmm write is limited in rate and in size.
//!
//! A guest drives most of what the VMM logs (every refused request is a warning) and all of
//! what its console prints, and both land on the host's disk (`vmm.log`, `console.log` in the
//! VM's directory). So:
//!
//! - each log call site may emit at most [`RATE_BURST`] events per [`RATE_WINDOW`]; the rest
//!   are counted, and the next event let through after the window says how many were dropped;
//! - the log (stderr, when the agent points it at a file) and the console file are rotated
//!   at [`MAX_LOG_BYTES`] and [`MAX_CONSOLE_BYTES`]: the file is renamed to `NAME.1` (replacing
//!   the previous one) and a new one started, so each takes at most twice its limit.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tracing::callsite::Identifier;
use tracing::Metadata;

/// Events one call site may log per [`RATE_WINDOW`].
pub const RATE_BURST: u32 = 20;
pub const RATE_WINDOW: Duration = Duration::from_secs(10);
/// Size at which the VMM's log is rotated.
pub const MAX_LOG_BYTES: u64 = 8 << 20;
/// Size at which the console file is rotated.
pub const MAX_CONSOLE_BYTES: u64 = 8 << 20;

/// The per-call-site rate limit; `K` names a call site.
pub struct RateLimit<K = Identifier> {
    sites: Mutex<HashMap<K, Site>>,
}

impl<K> Default for RateLimit<K> {
    fn default() -> Self {
        RateLimit {
            sites: Mutex::new(HashMap::new()),
        }
    }
}

struct Site {
    window_start: Instant,
    count: u32,
    dropped: u64,
}

impl RateLimit {
    /// Whether an event of `metadata` may be logged now (spans always are). `note` receives a
    /// line to write first when events of this site were dropped in an earlier window.
    pub fn allow(&self, metadata: &Metadata<'_>, now: Instant, note: impl FnOnce(String)) -> bool {
        if !metadata.is_event() {
            return true;
        }
        self.allow_site(metadata.callsite(), now, |dropped| {
            note(format!(
                "fabric-vmm: {dropped} more messages from {}:{} were dropped (at most {RATE_BURST} per {} s)\n",
                metadata.file().unwrap_or("?"),
                metadata.line().unwrap_or(0),
                RATE_WINDOW.as_secs()
            ))
        })
    }
}

impl<K: std::hash::Hash + Eq> RateLimit<K> {
    /// Counts one event of `site` at `now`: whether it may be logged. `dropped` hears how many
    /// were dropped in the site's previous window, when any were.
    pub fn allow_site(&self, site: K, now: Instant, dropped: impl FnOnce(u64)) -> bool {
        let mut sites = self.sites.lock().unwrap_or_else(|e| e.into_inner());
        let site = sites.entry(site).or_insert(Site {
            window_start: now,
            count: 0,
            dropped: 0,
        });
        if now.saturating_duration_since(site.window_start) >= RATE_WINDOW {
            if site.dropped > 0 {
                dropped(site.dropped);
            }
            *site = Site {
                window_start: now,
                count: 0,
                dropped: 0,
            };
        }
        if site.count < RATE_BURST {
            site.count += 1;
            true
        } else {
            site.dropped += 1;
            false
        }
    }
}

/// The VMM's log layer: `env` decides what is logged at all, then each call site is held to
/// its rate ([`RateLimit`]); lines go to `writer` (stderr through [`LogWriter`]), dropped
/// counts straight to [`LogWriter::write_line`].
pub fn log_layer<S, W>(
    env: tracing_subscriber::EnvFilter,
    writer: W,
    ansi: bool,
) -> impl tracing_subscriber::Layer<S>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    use tracing_subscriber::Layer;
    let limit = RateLimit::default();
    // Dynamic: asked at every event (a plain `filter_fn` is asked once per call site).
    let rate = tracing_subscriber::filter::dynamic_filter_fn(move |metadata, _| {
        limit.allow(metadata, Instant::now(), |note| {
            LogWriter::write_line(&note)
        })
    });
    tracing_subscriber::fmt::layer()
        .with_writer(writer)
        .with_ansi(ansi)
        .with_filter(env)
        .with_filter(rate)
}

/// A file that is rotated to `NAME.1` when it would grow past its limit.
pub struct RotatingFile {
    path: PathBuf,
    file: File,
    written: u64,
    max_bytes: u64,
}

impl RotatingFile {
    /// Opens `path` for appending (creating it); what it holds already counts.
    pub fn open(path: &Path, max_bytes: u64) -> std::io::Result<RotatingFile> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let written = file.metadata()?.len();
        Ok(RotatingFile {
            path: path.to_owned(),
            file,
            written,
            max_bytes,
        })
    }

    /// `NAME.1`.
    pub fn rotated_path(path: &Path) -> PathBuf {
        let mut name = path.as_os_str().to_owned();
        name.push(".1");
        PathBuf::from(name)
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        std::fs::rename(&self.path, Self::rotated_path(&self.path))?;
        self.file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        self.written = 0;
        Ok(())
    }
}

impl Write for RotatingFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.written > 0 && self.written + buf.len() as u64 > self.max_bytes {
            // A file that cannot be rotated (its directory gone) is written on: the next
            // write tries again.
            let _ = self.rotate();
        }
        let n = self.file.write(buf)?;
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// Bytes written to stderr since it was last rotated.
static STDERR_WRITTEN: AtomicU64 = AtomicU64::new(0);
static STDERR_ROTATION: Mutex<()> = Mutex::new(());

/// Writes to stderr; when stderr is a regular file that has grown past [`MAX_LOG_BYTES`], it
/// is renamed to `NAME.1` and a new file takes its place on descriptor 2 (and 1, when stdout
/// was the same file).
pub struct LogWriter;

impl LogWriter {
    /// Counts what stderr already holds (the agent appends to one file across restarts).
    pub fn init() {
        if let Ok(meta) = std::fs::metadata("/proc/self/fd/2") {
            if meta.is_file() {
                STDERR_WRITTEN.store(meta.len(), Ordering::SeqCst);
            }
        }
    }

    fn rotate_if_due(incoming: usize) {
        let written = STDERR_WRITTEN.load(Ordering::SeqCst);
        if written == 0 || written + incoming as u64 <= MAX_LOG_BYTES {
            return;
        }
        let _held = STDERR_ROTATION.lock().unwrap_or_else(|e| e.into_inner());
        if STDERR_WRITTEN.load(Ordering::SeqCst) + incoming as u64 <= MAX_LOG_BYTES {
            return; // another thread rotated meanwhile
        }
        let (Ok(path), Ok(meta)) = (
            std::fs::read_link("/proc/self/fd/2"),
            std::fs::metadata("/proc/self/fd/2"),
        ) else {
            return;
        };
        if !meta.is_file() {
            // A pipe or a terminal: not ours to bound.
            STDERR_WRITTEN.store(0, Ordering::SeqCst);
            return;
        }
        let stdout_same = std::fs::metadata("/proc/self/fd/1").is_ok_and(|m| {
            use std::os::unix::fs::MetadataExt;
            m.dev() == meta.dev() && m.ino() == meta.ino()
        });
        if std::fs::rename(&path, RotatingFile::rotated_path(&path)).is_err() {
            return;
        }
        let Ok(fresh) = OpenOptions::new().create(true).append(true).open(&path) else {
            return;
        };
        // SAFETY: dup2 onto the standard descriptors, from a file open for the whole call.
        unsafe {
            libc::dup2(fresh.as_raw_fd(), 2);
            if stdout_same {
                libc::dup2(fresh.as_raw_fd(), 1);
            }
        }
        STDERR_WRITTEN.store(0, Ordering::SeqCst);
    }

    /// Writes `line` to stderr directly (not through tracing), counted and rotated.
    pub fn write_line(line: &str) {
        let _ = LogWriter.write_all(line.as_bytes());
    }
}

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        Self::rotate_if_due(buf.len());
        let n = std::io::stderr().write(buf)?;
        STDERR_WRITTEN.fetch_add(n as u64, Ordering::SeqCst);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_site_logs_a_burst_per_window_and_then_says_how_many_were_dropped() {
        let limit: RateLimit<&str> = RateLimit::default();
        let start = Instant::now();
        let mut notes = Vec::new();
        let allowed = (0..1000)
            .filter(|_| limit.allow_site("a", start, |n| notes.push(n)))
            .count();
        assert_eq!(allowed, RATE_BURST as usize);
        // Another site has its own budget.
        assert!(limit.allow_site("b", start, |n| notes.push(n)));
        assert!(notes.is_empty());
        assert!(!limit.allow_site("a", start + RATE_WINDOW / 2, |n| notes.push(n)));
        assert!(limit.allow_site("a", start + RATE_WINDOW, |n| notes.push(n)));
        assert_eq!(notes, [1000 - u64::from(RATE_BURST) + 1]);
    }

    #[test]
    fn a_guest_driven_warning_in_a_loop_logs_one_burst() {
        use tracing_subscriber::layer::SubscriberExt;
        let lines: std::sync::Arc<Mutex<Vec<u8>>> = Default::default();
        let sink = lines.clone();
        let writer = move || Sink(sink.clone());
        let subscriber = tracing_subscriber::registry().with(log_layer(
            tracing_subscriber::EnvFilter::new("info"),
            writer,
            false,
        ));
        tracing::subscriber::with_default(subscriber, || {
            for i in 0..1000 {
                tracing::warn!(i, "driver wrote the read-only configuration space; ignored");
            }
            tracing::info!("another call site");
        });
        let text = String::from_utf8(lines.lock().unwrap().clone()).unwrap();
        assert_eq!(
            text.matches("read-only configuration space").count(),
            RATE_BURST as usize,
            "{text}"
        );
        assert!(text.contains("another call site"));
    }

    struct Sink(std::sync::Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_rotating_file_keeps_at_most_twice_its_limit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let mut file = RotatingFile::open(&path, 1000).unwrap();
        for i in 0..500 {
            writeln!(file, "line {i:05}").unwrap();
        }
        let now = std::fs::metadata(&path).unwrap().len();
        let old = std::fs::metadata(RotatingFile::rotated_path(&path))
            .unwrap()
            .len();
        assert!(now <= 1000 && old <= 1000, "{now} {old}");
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.ends_with("line 00499\n"), "{text}");
    }
}
