//! The freestanding device-test guest (`images/testguest`, built by `images/build.sh` into
//! `images/out/testguest.elf`): where its ELF is, and how to read what it prints.
//!
//! It runs the scenario named by `fabric.test=NAME` on its command line and prints
//! `testguest: NAME: ...` lines on the serial console, ending with a verdict
//! (`testguest: NAME: PASS ...` or `testguest: NAME: FAIL reason`). The `memload` scenario
//! also prints timed events, `testguest: memload: t=MS EVENT key=value ...`, which
//! [`MemloadEvent`] parses for the balancer's tests and `bench/memory`.

use std::collections::BTreeMap;
use std::path::PathBuf;

/// `images/out/testguest.elf`; panics, saying how to build it, when it is not there.
pub fn elf() -> PathBuf {
    let path = crate::image::image_dir().join(crate::image::TESTGUEST);
    assert!(
        path.is_file(),
        "{} is missing: build it with `bash images/build.sh` (its testguest stage takes a second)",
        path.display()
    );
    path
}

/// The kernel command line that runs scenario `name`.
pub fn cmdline(name: &str) -> String {
    format!("fabric.test={name}")
}

/// The lines scenario `name` printed, without their `testguest: NAME: ` prefix.
pub fn lines<'a>(console: &'a str, name: &str) -> impl Iterator<Item = &'a str> {
    let prefix = format!("testguest: {name}: ");
    console
        .lines()
        .filter_map(move |l| l.trim_end().strip_prefix(prefix.as_str()))
}

/// The first verdict line of scenario `name` ("PASS ..." or "FAIL ..."), if it printed one.
pub fn verdict<'a>(console: &'a str, name: &str) -> Option<&'a str> {
    lines(console, name).find(|l| is_verdict(l))
}

/// The lines scenario `name` printed besides its verdict (notes on what it did).
pub fn notes(console: &str, name: &str) -> Vec<String> {
    lines(console, name)
        .filter(|l| !is_verdict(l))
        .map(str::to_owned)
        .collect()
}

fn is_verdict(line: &str) -> bool {
    line.starts_with("PASS") || line.starts_with("FAIL")
}

/// One `testguest: memload: t=MS EVENT key=value ...` line: the `memload` scenario's
/// workload and balloon driver saying what happened when (`t` is on the host's clock, ms).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemloadEvent {
    pub t: u64,
    /// `phase`, `grown`, `wait-start`, `wait-end`, `oom-kill`, `balloon`, `status`, ...
    pub kind: String,
    pub fields: BTreeMap<String, String>,
}

impl MemloadEvent {
    /// The event on `line`, if it is one.
    pub fn parse(line: &str) -> Option<MemloadEvent> {
        let rest = line.trim().strip_prefix("testguest: memload: t=")?;
        let mut words = rest.split_whitespace();
        let t = words.next()?.parse().ok()?;
        let kind = words.next()?.to_string();
        let fields = words
            .filter_map(|w| w.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Some(MemloadEvent { t, kind, fields })
    }

    /// Every event of a console, oldest first.
    pub fn all(console: &str) -> Vec<MemloadEvent> {
        console.lines().filter_map(MemloadEvent::parse).collect()
    }

    /// A numeric field.
    pub fn num(&self, key: &str) -> Option<u64> {
        self.fields.get(key)?.parse().ok()
    }

    /// The fields as the guest printed them (`key=value ...`), for messages.
    pub fn describe(&self) -> String {
        let fields: Vec<String> = self
            .fields
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        format!("{} {}", self.kind, fields.join(" "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts_notes_and_memload_events() {
        let console = "boot\ntestguest: start blk\ntestguest: blk: sector-past-end: refused\r\n\
                       testguest: blk: PASS capacity 2048 sectors\ntestguest: memload: t=1700 \
                       wait-end waited_ms=120 reason=satisfied\n";
        assert_eq!(verdict(console, "blk"), Some("PASS capacity 2048 sectors"));
        assert_eq!(verdict(console, "net"), None);
        assert_eq!(notes(console, "blk"), ["sector-past-end: refused"]);
        let events = MemloadEvent::all(console);
        assert_eq!(events.len(), 1);
        assert_eq!((events[0].t, events[0].kind.as_str()), (1700, "wait-end"));
        assert_eq!(events[0].num("waited_ms"), Some(120));
        assert_eq!(events[0].fields["reason"], "satisfied");
    }
}
