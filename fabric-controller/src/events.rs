//! The event feed: every VM and host transition, numbered, kept in a bounded in-memory log for
//! clients that resume (`since_sequence`) and broadcast to live watchers.
//!
//! Sequence numbers start, at each controller start, from the wall clock in microseconds, so
//! they keep growing across restarts (events themselves are not persisted; a client resuming
//! from before a restart receives what the new process has seen).
//!
//! Each VM event carries, inside the controller only, the project of its VM ([`Logged`]),
//! known from [`Events::track`] (called when a VM enters the model), so that watchers are
//! filtered by it even after the VM is gone (its deletion event included).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use fabric_proto::v1::{Event, EventKind, HostState, VmPhase};
use tokio::sync::broadcast;

/// Events kept for resuming clients, at most: this many...
const RETAINED: usize = 100_000;
/// ...taking at most this many bytes (encoded).
const RETAINED_BYTES: usize = 32 << 20;
/// Longest message or reason an event carries (longer ones are cut, marked with "…").
pub const MAX_EVENT_TEXT: usize = 1024;
/// Events a live watcher may fall behind before it is cut off (DATA_LOSS, resume from its
/// last sequence).
pub(crate) const LIVE_BACKLOG: usize = 8192;

/// An event as the controller keeps it: what watchers receive, and the project of its VM
/// (None for host-only events and for VMs the log was never told of).
#[derive(Debug)]
pub struct Logged {
    pub event: Event,
    pub project: Option<Arc<str>>,
}

impl std::ops::Deref for Logged {
    type Target = Event;
    fn deref(&self) -> &Event {
        &self.event
    }
}

struct Log {
    last: u64,
    events: VecDeque<Arc<Logged>>,
    bytes: usize,
    /// The project of each VM in the model (VMs leave it with their deletion event).
    projects: HashMap<String, Arc<str>>,
}

pub struct Events {
    log: Mutex<Log>,
    live: broadcast::Sender<Arc<Logged>>,
}

impl Default for Events {
    fn default() -> Self {
        Self::new()
    }
}

/// `text` cut to at most [`MAX_EVENT_TEXT`] bytes on a character boundary.
fn bounded(mut text: String) -> String {
    if text.len() > MAX_EVENT_TEXT {
        let mut end = MAX_EVENT_TEXT - '…'.len_utf8();
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push('…');
    }
    text
}

impl Events {
    pub fn new() -> Events {
        let start = fabric_proto::clock::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0);
        Events {
            log: Mutex::new(Log {
                last: start,
                events: VecDeque::new(),
                bytes: 0,
                projects: HashMap::new(),
            }),
            live: broadcast::channel(LIVE_BACKLOG).0,
        }
    }

    /// Records an event (its sequence and time are filled here, its texts bounded).
    pub fn emit(&self, mut event: Event) {
        event.message = bounded(std::mem::take(&mut event.message));
        event.reason = bounded(std::mem::take(&mut event.reason));
        let mut log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        log.last += 1;
        event.sequence = log.last;
        event.time = Some(prost_types::Timestamp::from(fabric_proto::clock::now()));
        tracing::debug!(kind = ?event.kind(), vm = %event.vm_id, host = %event.host_id, "{}", event.message);
        let size = prost::Message::encoded_len(&event);
        let project = log.projects.get(&event.vm_id).cloned();
        if event.kind() == EventKind::VmDeleted {
            log.projects.remove(&event.vm_id);
        }
        let event = Arc::new(Logged { event, project });
        log.bytes += size;
        log.events.push_back(event.clone());
        while log.events.len() > RETAINED || log.bytes > RETAINED_BYTES {
            let Some(old) = log.events.pop_front() else {
                break;
            };
            log.bytes -= prost::Message::encoded_len(&old.event);
        }
        let _ = self.live.send(event);
    }

    /// Remembers `vm`'s project for its events, until its deletion event.
    pub fn track(&self, vm: &fabric_proto::v1::Vm) {
        let project = match vm.spec.as_ref().map_or("", |s| s.project.as_str()) {
            "" => crate::authz::DEFAULT_PROJECT,
            project => project,
        };
        let mut log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        log.projects.insert(vm.id.clone(), Arc::from(project));
    }

    pub fn vm(&self, kind: EventKind, vm_id: &str, host_id: &str, reason: &str, message: String) {
        self.emit(Event {
            kind: kind as i32,
            vm_id: vm_id.to_string(),
            host_id: host_id.to_string(),
            reason: reason.to_string(),
            message,
            ..Default::default()
        });
    }

    pub fn vm_phase(&self, vm_id: &str, host_id: &str, phase: VmPhase, message: String) {
        self.emit(Event {
            kind: EventKind::VmPhaseChanged as i32,
            vm_id: vm_id.to_string(),
            host_id: host_id.to_string(),
            vm_phase: phase as i32,
            message,
            ..Default::default()
        });
    }

    pub fn host_state(&self, host_id: &str, state: HostState, reason: &str, message: String) {
        self.emit(Event {
            kind: EventKind::HostStateChanged as i32,
            host_id: host_id.to_string(),
            host_state: state as i32,
            reason: reason.to_string(),
            message,
            ..Default::default()
        });
    }

    /// A HOST_MEMORY event: the host became short of memory, fits again, or cannot be
    /// relieved (`reason`), with the figures in `message`.
    pub fn host_memory(&self, host_id: &str, reason: &str, message: String) {
        self.emit(Event {
            kind: EventKind::HostMemory as i32,
            host_id: host_id.to_string(),
            reason: reason.to_string(),
            message,
            ..Default::default()
        });
    }

    /// The retained events after `since` (none for 0: only what follows), a receiver for
    /// what follows (subscribed before the copy, so nothing falls between; duplicates are
    /// skipped by sequence), and the sequence the receiver's events follow: `since`, or for 0
    /// the newest event's (a watcher cut off before it got any event resumes from there, not
    /// from 0, which would mean "from now" and lose what it missed). The copy is of pointers,
    /// from the first event after `since` on.
    pub fn subscribe(
        &self,
        since: u64,
    ) -> (Vec<Arc<Logged>>, broadcast::Receiver<Arc<Logged>>, u64) {
        let log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        let rx = self.live.subscribe();
        if since == 0 {
            return (Vec::new(), rx, log.last);
        }
        let first = log.events.partition_point(|e| e.sequence <= since);
        (log.events.range(first..).cloned().collect(), rx, since)
    }

    /// Every retained event (tests).
    pub fn retained(&self) -> Vec<Event> {
        let log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        log.events.iter().map(|e| e.event.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn texts_are_bounded_and_the_log_by_count_and_bytes() {
        let events = Events::new();
        let long = "é".repeat(100_000);
        for _ in 0..3 {
            events.host_state("h", HostState::Cordoned, &long, long.clone());
        }
        let kept = events.retained();
        assert_eq!(kept.len(), 3);
        for e in &kept {
            assert!(e.message.len() <= MAX_EVENT_TEXT && e.message.ends_with('…'));
            assert!(e.reason.len() <= MAX_EVENT_TEXT);
        }
        // Bytes: ~2 KiB events, far more than RETAINED_BYTES of them.
        for _ in 0..(RETAINED_BYTES / 2048 + 1000) {
            events.host_state("h", HostState::Cordoned, &long, long.clone());
        }
        let log = events.log.lock().unwrap();
        assert!(log.bytes <= RETAINED_BYTES, "{}", log.bytes);
        assert!(log.events.len() < RETAINED_BYTES / 2048 + 1000);
        let sum: usize = log
            .events
            .iter()
            .map(|e| prost::Message::encoded_len(&e.event))
            .sum();
        assert_eq!(sum, log.bytes);
    }

    #[test]
    fn a_resuming_subscriber_gets_what_follows_its_sequence() {
        let events = Events::new();
        for i in 0..10 {
            events.host_state("h", HostState::Ready, "", format!("{i}"));
        }
        let all = events.retained();
        let (past, _, _) = events.subscribe(all[6].sequence);
        let messages: Vec<&str> = past.iter().map(|e| e.message.as_str()).collect();
        assert_eq!(messages, ["7", "8", "9"]);
        assert!(events.subscribe(0).0.is_empty());
    }
}
