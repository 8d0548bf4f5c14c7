//! What `/proc` tells about a process: its command line, its state, its resident memory and
//! its CPU time; and which live processes have a command line that names something (a test's
//! or a benchmark's directory), which is how tests and benchmarks find what they started.

/// The arguments of a live process (empty for a zombie, a kernel thread or a process that is
/// gone).
pub fn cmdline(pid: u32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|bytes| {
            bytes
                .split(|b| *b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// The fields of `/proc/<pid>/stat` the tests use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stat {
    /// `R`, `S`, `Z`, ...
    pub state: char,
    /// CPU time in user and in system mode, clock ticks.
    pub utime: u64,
    pub stime: u64,
    /// When it started, clock ticks since boot (with the pid, what tells it from a later
    /// process that got the same pid).
    pub start: u64,
}

/// `/proc/<pid>/stat`, None once the process is gone.
pub fn stat(pid: u32) -> Option<Stat> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces: fields start after the last ')'.
    let fields: Vec<&str> = stat[stat.rfind(')')? + 1..].split_whitespace().collect();
    // `fields[0]` is field 3 of stat (the state): field N is `fields[N - 3]`.
    let field = |n: usize| fields.get(n - 3)?.parse().ok();
    Some(Stat {
        state: fields.first()?.chars().next()?,
        utime: field(14)?,
        stime: field(15)?,
        start: field(22)?,
    })
}

/// Whether `pid` is a zombie, or gone.
pub fn is_zombie(pid: u32) -> bool {
    stat(pid).is_none_or(|s| s.state == 'Z')
}

/// Clock ticks a second (`_SC_CLK_TCK`), the unit of [`Stat`]'s times.
pub fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }) as f64
}

/// CPU time (user + system) of a process, seconds.
pub fn cpu_secs(pid: u32) -> Option<f64> {
    let stat = stat(pid)?;
    Some((stat.utime + stat.stime) as f64 / ticks_per_second())
}

/// CPU time (user + system) of a process as a fraction of the wall time since it started.
pub fn cpu_share(pid: u32) -> Option<f64> {
    let stat = stat(pid)?;
    let uptime: f64 = std::fs::read_to_string("/proc/uptime")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    let alive = uptime - stat.start as f64 / ticks_per_second();
    if alive <= 0.0 {
        return None;
    }
    Some((stat.utime + stat.stime) as f64 / ticks_per_second() / alive)
}

/// Resident memory of a process (`VmRSS`), KiB; None once it is gone.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The live processes (zombies and this one left out) with an argument containing `marker`,
/// with their arguments.
pub fn naming(marker: &str) -> Vec<(u32, Vec<String>)> {
    let me = std::process::id();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if pid == me {
            continue;
        }
        let args = cmdline(pid);
        if args.iter().any(|a| a.contains(marker)) && !is_zombie(pid) {
            found.push((pid, args));
        }
    }
    found
}

/// Whether `args` (a command line) runs fabric-vmm.
pub fn is_fabric_vmm(args: &[String]) -> bool {
    args.first()
        .and_then(|a| a.rsplit('/').next())
        .is_some_and(|name| name.contains("fabric-vmm"))
}

/// The load average over 1, 5 and 15 minutes, as `/proc/loadavg` has it.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}
