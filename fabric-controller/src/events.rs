//! The event feed: every VM and host transition, numbered, kept in a bounded in-memory log for
//! clients that resume (`since_sequence`) and broadcast to live watchers.
//!
//! Sequence numbers start, at each controller start, from the wall clock in microseconds, so
//! they keep growing across restarts (events themselves are not persisted; a client resuming
//! from before a restart receives what the new process has seen).

use std::collections::VecDeque;
use std::sync::Mutex;

use fabric_proto::v1::{Event, EventKind, HostState, VmPhase};
use tokio::sync::broadcast;

/// Events kept for resuming clients.
const RETAINED: usize = 100_000;

pub struct Events {
    log: Mutex<(u64, VecDeque<Event>)>,
    live: broadcast::Sender<Event>,
}

impl Default for Events {
    fn default() -> Self {
        Self::new()
    }
}

impl Events {
    pub fn new() -> Events {
        let start = fabric_proto::clock::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0);
        Events {
            log: Mutex::new((start, VecDeque::new())),
            live: broadcast::channel(65536).0,
        }
    }

    /// Records an event (its sequence and time are filled here).
    pub fn emit(&self, mut event: Event) {
        let mut log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        log.0 += 1;
        event.sequence = log.0;
        event.time = Some(prost_types::Timestamp::from(fabric_proto::clock::now()));
        tracing::debug!(kind = ?event.kind(), vm = %event.vm_id, host = %event.host_id, "{}", event.message);
        if log.1.len() == RETAINED {
            log.1.pop_front();
        }
        log.1.push_back(event.clone());
        let _ = self.live.send(event);
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

    /// The retained events after `since`, and a receiver for what follows (subscribed before
    /// the copy, so nothing falls between; duplicates are skipped by sequence).
    pub fn subscribe(&self, since: u64) -> (Vec<Event>, broadcast::Receiver<Event>) {
        let log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        let rx = self.live.subscribe();
        let past = log
            .1
            .iter()
            .filter(|e| e.sequence > since)
            .cloned()
            .collect();
        (past, rx)
    }
}
