//! The audit log: one [`AuditEntry`] per mutating call and per refused call, durable in the
//! store under `audit/<20-digit sequence>` (so key order is sequence order).
//!
//! - A mutation's entry is committed in the transaction that makes the change
//!   ([`Audit::stage`]): the log holds an entry for every change and no change without one.
//! - A refusal (and a mutating call that failed, so changed nothing) goes through a bounded
//!   queue to one writer task that commits up to [`WRITE_BATCH`] entries per transaction
//!   ([`Audit::record`]): the caller's answer never waits on the store, and a flood of
//!   refused calls costs one commit per batch. When the queue is full the entry is dropped
//!   and counted; the next batch that commits carries an entry saying how many were lost.
//! - Retention: none older than `retention.age`, and at most `retention.entries` entries of
//!   each of two kinds ([`Kind`]): the calls that succeeded (changes) and the refused or
//!   failed ones. Any certificate holder can make refusals, thousands a second; counted
//!   apart, they evict only older refusals, never the record of a change. Every commit that
//!   adds entries deletes the oldest ones of each kind beyond either bound (at most
//!   [`PRUNE_PER_COMMIT`] per kind per commit beyond the entries it adds, so the log
//!   converges back within a few commits after the bound is lowered).
//! - Refusals are also limited per identity ([`REFUSAL_BURST`], then
//!   [`REFUSALS_PER_SECOND`]): beyond, they are counted, and within a second one entry
//!   says "N more refused calls from IDENTITY", so a flood from one identity costs a few
//!   entries a second, not one per call, and does not push everyone else's refusals out.
//! - Readers ([`Audit::list`]) see only entries below every sequence still being committed,
//!   so a follower polling with the last sequence it saw misses none that commit late.

use std::collections::{BTreeSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use fabric_proto::v1::AuditEntry;
use prost::Message;
use sha2::{Digest, Sha256};

use crate::store::{Op, Store, Txn, TxnOutcome};

pub const PREFIX: &str = "audit/";
/// Refusals waiting for the writer; beyond it they are dropped (and counted).
pub const QUEUE: usize = 4096;
/// Entries the writer commits in one transaction at most.
pub const WRITE_BATCH: usize = 256;
/// Old entries one commit deletes beyond the ones it adds.
pub const PRUNE_PER_COMMIT: usize = 64;
/// Default retention: entries.
pub const DEFAULT_RETENTION_ENTRIES: usize = 100_000;
/// Default retention: age (90 days).
pub const DEFAULT_RETENTION_AGE: Duration = Duration::from_secs(90 * 24 * 3600);
/// Refused-call entries one identity may add at once, and then per second; beyond, its
/// refusals are folded into one counting entry per second ([`Audit::record`]).
pub const REFUSAL_BURST: f64 = 100.0;
pub const REFUSALS_PER_SECOND: f64 = 20.0;
/// Identities whose refusals are counted apart at most; beyond, the others share one count.
pub const MAX_LIMITED_IDENTITIES: usize = 4096;
/// The shared count's name, beyond [`MAX_LIMITED_IDENTITIES`].
const OTHER_IDENTITIES: &str = "(other identities)";
/// Entries ListAudit returns at most in one page.
pub const MAX_PAGE: usize = 5000;
/// Status messages are cut to this many bytes in an entry.
pub const MAX_MESSAGE: usize = 1024;
/// Target, identity, project and RPC are cut to this many bytes.
pub const MAX_FIELD: usize = 128;
/// Role bindings listed in one entry at most.
pub const MAX_ROLES: usize = 64;

/// How much of the log is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    pub entries: usize,
    pub age: Duration,
}

impl Default for Retention {
    fn default() -> Retention {
        Retention {
            entries: DEFAULT_RETENTION_ENTRIES,
            age: DEFAULT_RETENTION_AGE,
        }
    }
}

pub fn key(sequence: u64) -> String {
    format!("{PREFIX}{sequence:020}")
}

fn sequence_of(key: &str) -> Option<u64> {
    key.strip_prefix(PREFIX)?.parse().ok()
}

/// sha256 of an encoded request, hex.
pub fn digest(request: &impl Message) -> String {
    hex::encode(Sha256::digest(request.encode_to_vec()))
}

fn seconds(entry: &AuditEntry) -> i64 {
    entry.time.as_ref().map_or(0, |t| t.seconds)
}

fn now_seconds() -> i64 {
    fabric_proto::clock::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// One identity's refusal budget: a token bucket of [`REFUSAL_BURST`] refilled at
/// [`REFUSALS_PER_SECOND`], and the refusals it folded since its last counting entry.
struct Budget {
    tokens: f64,
    at: std::time::Instant,
    folded: u64,
}

impl Budget {
    fn tokens_at(&self, now: std::time::Instant) -> f64 {
        let refilled = now.saturating_duration_since(self.at).as_secs_f64() * REFUSALS_PER_SECOND;
        (self.tokens + refilled).min(REFUSAL_BURST)
    }
}

/// The two kinds of entries, each kept up to the retention's count on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A call that succeeded: a change (or a mutating call that changed nothing).
    Change = 0,
    /// A refused or failed call, and the log's own notes (entries dropped).
    Refusal = 1,
}

impl Kind {
    pub fn of(entry: &AuditEntry) -> Kind {
        if entry.code == 0 {
            Kind::Change
        } else {
            Kind::Refusal
        }
    }
}

/// A committed or staged entry in the index: sequence, time in seconds, kind.
type Indexed = (u64, i64, Kind);

#[derive(Default)]
struct State {
    next: u64,
    /// Committed entries of each kind, oldest first.
    stored: [VecDeque<Indexed>; 2],
    /// Sequences handed out whose commit has not ended yet.
    in_flight: BTreeSet<u64>,
    /// How many of those are of each kind.
    in_flight_of: [usize; 2],
}

pub struct Audit {
    store: Arc<dyn Store>,
    retention: Retention,
    state: Mutex<State>,
    queue: Mutex<Option<tokio::sync::mpsc::Sender<AuditEntry>>>,
    /// Each identity's refusal budget and the refusals folded since its last counting entry.
    limits: Mutex<std::collections::HashMap<String, Budget>>,
    dropped: AtomicU64,
    /// Wakes followers when entries commit.
    pub committed: tokio::sync::watch::Sender<u64>,
}

/// Entries added to one transaction; tells the log on drop whether they committed.
pub struct Staged<'a> {
    audit: &'a Audit,
    entries: Vec<Indexed>,
    pruned: Vec<Indexed>,
    committed: bool,
}

impl Staged<'_> {
    pub fn committed(mut self) {
        self.committed = true;
    }
}

impl Drop for Staged<'_> {
    fn drop(&mut self) {
        let mut state = self.audit.state();
        for (seq, _, kind) in &self.entries {
            state.in_flight.remove(seq);
            state.in_flight_of[*kind as usize] -= 1;
        }
        if self.committed {
            for entry in &self.entries {
                // Nearly always at the back: sequences commit nearly in order.
                let stored = &mut state.stored[entry.2 as usize];
                let at = stored.partition_point(|e| e.0 < entry.0);
                stored.insert(at, *entry);
            }
        } else {
            // Nothing was deleted: the pruned entries are still the oldest of their kind.
            for entry in self.pruned.drain(..).rev() {
                state.stored[entry.2 as usize].push_front(entry);
            }
        }
        drop(state);
        if self.committed {
            self.audit.committed.send_modify(|v| *v += 1);
        }
    }
}

impl Audit {
    /// Reads the log's index (sequences and times) from the store.
    pub fn load(store: Arc<dyn Store>, retention: Retention) -> Result<Arc<Audit>, String> {
        let (kvs, _) = store.list(PREFIX).map_err(|e| e.to_string())?;
        let mut stored: [VecDeque<Indexed>; 2] = Default::default();
        for kv in kvs {
            let Some(seq) = sequence_of(&kv.key) else {
                return Err(format!("{}: not an audit key", kv.key));
            };
            let entry =
                AuditEntry::decode(kv.value.as_slice()).map_err(|e| format!("{}: {e}", kv.key))?;
            let kind = Kind::of(&entry);
            stored[kind as usize].push_back((seq, seconds(&entry), kind));
        }
        let next = stored
            .iter()
            .filter_map(|s| s.back())
            .map(|e| e.0 + 1)
            .max()
            .unwrap_or(1);
        let audit = Arc::new(Audit {
            store,
            retention: Retention {
                entries: retention.entries.max(1),
                age: retention.age,
            },
            state: Mutex::new(State {
                next,
                stored,
                in_flight: BTreeSet::new(),
                in_flight_of: [0; 2],
            }),
            queue: Mutex::new(None),
            limits: Mutex::new(Default::default()),
            dropped: AtomicU64::new(0),
            committed: tokio::sync::watch::channel(0).0,
        });
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let (tx, rx) = tokio::sync::mpsc::channel(QUEUE);
            *audit.queue.lock().unwrap_or_else(|e| e.into_inner()) = Some(tx);
            runtime.spawn(Audit::writer(Arc::downgrade(&audit), rx));
        } else {
            tracing::warn!("no runtime: refused calls are not written to the audit log");
        }
        Ok(audit)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn retention(&self) -> Retention {
        self.retention
    }

    /// Entries in the log now (committed).
    pub fn len(&self) -> usize {
        let state = self.state();
        state.stored.iter().map(VecDeque::len).sum()
    }

    /// Entries of `kind` in the log now (committed).
    pub fn len_of(&self, kind: Kind) -> usize {
        self.state().stored[kind as usize].len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Refused-call entries dropped because the writer's queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Adds `entries` (their sequences and times filled here) and the deletion of the oldest
    /// entries beyond the retention to `txn`.
    pub fn stage(&self, txn: Txn, entries: Vec<AuditEntry>) -> (Txn, Staged<'_>) {
        let mut txn = txn;
        let mut state = self.state();
        let now = fabric_proto::clock::now();
        let mut staged = Staged {
            audit: self,
            entries: Vec::with_capacity(entries.len()),
            pruned: Vec::new(),
            committed: false,
        };
        // A batch with more entries of a kind than the retention keeps only its newest.
        let mut skip = [0usize; 2];
        for entry in &entries {
            skip[Kind::of(entry) as usize] += 1;
        }
        for s in &mut skip {
            *s = s.saturating_sub(self.retention.entries);
        }
        let mut adding = [0usize; 2];
        for mut entry in entries {
            let seq = state.next;
            state.next += 1;
            let kind = Kind::of(&entry);
            if skip[kind as usize] > 0 {
                skip[kind as usize] -= 1;
                continue;
            }
            adding[kind as usize] += 1;
            state.in_flight.insert(seq);
            state.in_flight_of[kind as usize] += 1;
            entry.sequence = seq;
            if entry.time.is_none() {
                entry.time = Some(prost_types::Timestamp::from(now));
            }
            // Whatever a caller put in a request, an entry stays small.
            entry
                .message
                .truncate(floor_char_boundary(&entry.message, MAX_MESSAGE));
            for field in [
                &mut entry.target,
                &mut entry.identity,
                &mut entry.project,
                &mut entry.rpc,
            ] {
                let cut = floor_char_boundary(field, MAX_FIELD);
                field.truncate(cut);
            }
            entry.roles.truncate(MAX_ROLES);
            staged.entries.push((seq, seconds(&entry), kind));
            txn.ops.push(Op::Put(key(seq), entry.encode_to_vec()));
        }
        let oldest_kept = now_seconds().saturating_sub(self.retention.age.as_secs() as i64);
        for kind in [Kind::Change, Kind::Refusal] {
            let k = kind as usize;
            let mut budget = adding[k] + PRUNE_PER_COMMIT;
            while budget > 0 {
                let total = state.stored[k].len() + state.in_flight_of[k];
                let Some(&(seq, time, _)) = state.stored[k].front() else {
                    break;
                };
                if total <= self.retention.entries && time >= oldest_kept {
                    break;
                }
                state.stored[k].pop_front();
                staged.pruned.push((seq, time, kind));
                txn.ops.push(Op::Delete(key(seq)));
                budget -= 1;
            }
        }
        (txn, staged)
    }

    /// Queues the entry of a refused or failed call for the writer; never waits. A refusal
    /// beyond its identity's budget is only counted, for the writer's next counting entry.
    pub fn record(&self, entry: AuditEntry) {
        if Kind::of(&entry) == Kind::Refusal && !self.within_budget(&entry.identity) {
            return;
        }
        let queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        let Some(tx) = queue.as_ref() else {
            return;
        };
        if tx.try_send(entry).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Whether `identity` may add one more refusal entry now; counts it as folded if not.
    fn within_budget(&self, identity: &str) -> bool {
        let now = std::time::Instant::now();
        let mut limits = self.limits.lock().unwrap_or_else(|e| e.into_inner());
        if limits.len() >= MAX_LIMITED_IDENTITIES && !limits.contains_key(identity) {
            limits.retain(|_, b| b.folded > 0 || b.tokens_at(now) < REFUSAL_BURST);
        }
        let key = if limits.len() >= MAX_LIMITED_IDENTITIES && !limits.contains_key(identity) {
            OTHER_IDENTITIES
        } else {
            identity
        };
        let budget = limits.entry(key.to_string()).or_insert(Budget {
            tokens: REFUSAL_BURST,
            at: now,
            folded: 0,
        });
        budget.tokens = budget.tokens_at(now);
        budget.at = now;
        if budget.tokens >= 1.0 {
            budget.tokens -= 1.0;
            true
        } else {
            budget.folded += 1;
            false
        }
    }

    /// One entry per identity whose refusals were folded since the last call, saying how
    /// many; forgets identities whose budget is full again.
    fn folded_entries(&self) -> Vec<AuditEntry> {
        let now = std::time::Instant::now();
        let mut limits = self.limits.lock().unwrap_or_else(|e| e.into_inner());
        let mut entries = Vec::new();
        for (identity, budget) in limits.iter_mut() {
            if budget.folded > 0 {
                entries.push(AuditEntry {
                    identity: identity.clone(),
                    rpc: "audit".into(),
                    code: tonic::Code::ResourceExhausted as i32,
                    message: format!(
                        "{} more refused calls from {identity} (over {REFUSAL_BURST} at once \
                         or {REFUSALS_PER_SECOND} a second: counted, not written one by one)",
                        budget.folded
                    ),
                    ..Default::default()
                });
                budget.folded = 0;
            }
        }
        limits.retain(|_, b| b.tokens_at(now) < REFUSAL_BURST);
        entries
    }

    async fn writer(
        audit: std::sync::Weak<Audit>,
        mut rx: tokio::sync::mpsc::Receiver<AuditEntry>,
    ) {
        let mut batch = Vec::with_capacity(WRITE_BATCH);
        let mut lost_reported = 0;
        loop {
            batch.clear();
            // Woken at least each second, for the entries counting folded refusals.
            let received = tokio::time::timeout(
                Duration::from_secs(1),
                rx.recv_many(&mut batch, WRITE_BATCH),
            )
            .await;
            if received == Ok(0) {
                return;
            }
            let Some(audit) = audit.upgrade() else {
                return;
            };
            batch.extend(audit.folded_entries());
            if batch.is_empty() {
                continue;
            }
            let lost = audit.dropped();
            if lost > lost_reported {
                batch.push(AuditEntry {
                    identity: "controller".into(),
                    rpc: "audit".into(),
                    code: tonic::Code::ResourceExhausted as i32,
                    message: format!(
                        "{} refused-call entries dropped since start: the audit queue ({QUEUE}) was full",
                        lost
                    ),
                    ..Default::default()
                });
            }
            let (txn, staged) = audit.stage(Txn::new(), std::mem::take(&mut batch));
            let store = audit.store.clone();
            match tokio::task::spawn_blocking(move || store.txn(txn)).await {
                Ok(Ok(TxnOutcome::Committed(_))) => {
                    lost_reported = lost;
                    staged.committed();
                }
                Ok(Ok(TxnOutcome::Failed(_))) => {}
                Ok(Err(err)) => {
                    tracing::error!(error = %err, "cannot write refused calls to the audit log")
                }
                Err(err) => tracing::error!(error = %err, "audit writer task"),
            }
        }
    }

    /// Entries after `after` (sequence) that `keep` accepts, oldest first, at most `limit`,
    /// and the last sequence looked at. Only entries below every commit in flight are read.
    pub fn list(
        &self,
        after: u64,
        limit: usize,
        keep: impl Fn(&AuditEntry) -> bool,
    ) -> Result<(Vec<AuditEntry>, u64), String> {
        let limit = limit.clamp(1, MAX_PAGE);
        let settled_below = {
            let state = self.state();
            state.in_flight.first().copied().unwrap_or(state.next)
        };
        let mut out = Vec::new();
        let mut last = after;
        let mut from = key(after);
        // Reads in chunks, so a filter that matches rarely does not read the whole log into
        // memory at once; stops after MAX_PAGE * 4 entries looked at.
        let mut budget = MAX_PAGE * 4;
        'scan: loop {
            let chunk = self
                .store
                .list_after(PREFIX, &from, 512)
                .map_err(|e| e.to_string())?;
            if chunk.is_empty() {
                break;
            }
            for kv in &chunk {
                let Some(seq) = sequence_of(&kv.key) else {
                    continue;
                };
                if seq >= settled_below {
                    break 'scan;
                }
                last = seq;
                let entry = AuditEntry::decode(kv.value.as_slice())
                    .map_err(|e| format!("{}: {e}", kv.key))?;
                if keep(&entry) {
                    out.push(entry);
                    if out.len() == limit {
                        break 'scan;
                    }
                }
                budget -= 1;
                if budget == 0 {
                    break 'scan;
                }
            }
            from = chunk.last().map(|kv| kv.key.clone()).unwrap_or_default();
        }
        Ok((out, last))
    }
}

fn floor_char_boundary(s: &str, max: usize) -> usize {
    if s.len() <= max {
        return s.len();
    }
    let mut at = max;
    while !s.is_char_boundary(at) {
        at -= 1;
    }
    at
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::redb::RedbStore;

    fn entry(identity: &str) -> AuditEntry {
        AuditEntry {
            identity: identity.into(),
            rpc: "/fabric.v1.Compute/DeleteVm".into(),
            code: tonic::Code::PermissionDenied as i32,
            ..Default::default()
        }
    }

    fn commit(audit: &Audit, store: &dyn Store, entries: Vec<AuditEntry>) {
        let (txn, staged) = audit.stage(Txn::new(), entries);
        assert!(matches!(store.txn(txn), Ok(TxnOutcome::Committed(_))));
        staged.committed();
    }

    /// A fresh store and an audit log keeping 10 entries (of each kind).
    fn ten_entries() -> (tempfile::TempDir, Arc<dyn Store>, Retention, Arc<Audit>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store: Arc<dyn Store> =
            Arc::new(RedbStore::open(&dir.path().join("s.redb")).expect("store"));
        let retention = Retention {
            entries: 10,
            age: DEFAULT_RETENTION_AGE,
        };
        let audit = Audit::load(store.clone(), retention).expect("load");
        (dir, store, retention, audit)
    }

    fn stored_sequences(store: &dyn Store) -> Vec<u64> {
        let (kvs, _) = store.list(PREFIX).expect("list");
        kvs.iter().filter_map(|kv| sequence_of(&kv.key)).collect()
    }

    #[test]
    fn retention_by_count_prunes_the_oldest_as_entries_come() {
        let (_dir, store, retention, audit) = ten_entries();
        for i in 0..25 {
            commit(&audit, store.as_ref(), vec![entry(&format!("user/u{i}"))]);
            assert!(audit.len() <= 10, "{} entries after {i}", audit.len());
        }
        assert_eq!(
            stored_sequences(store.as_ref()),
            (16..=25).collect::<Vec<_>>()
        );
        // A batch larger than the bound still leaves the bound.
        commit(
            &audit,
            store.as_ref(),
            (0..30).map(|_| entry("user/x")).collect(),
        );
        let kept = stored_sequences(store.as_ref());
        assert!(kept.len() <= 30, "{}", kept.len());
        commit(&audit, store.as_ref(), vec![entry("user/y")]);
        assert_eq!(stored_sequences(store.as_ref()).len(), 10);
        // The index survives a restart, and pruning goes on from it.
        drop(audit);
        let audit = Audit::load(store.clone(), retention).expect("reload");
        assert_eq!(audit.len(), 10);
        commit(&audit, store.as_ref(), vec![entry("user/z")]);
        let kept = stored_sequences(store.as_ref());
        assert_eq!(kept.len(), 10);
        assert_eq!(kept.last(), Some(&57));
    }

    /// Refusals, which any certificate holder can make by the thousand, are kept up to the
    /// retention's count on their own: a flood of them evicts older refusals, never the
    /// record of a change.
    #[test]
    fn a_flood_of_refusals_does_not_evict_changes() {
        let (_dir, store, retention, audit) = ten_entries();
        let change = |who: &str| AuditEntry {
            code: 0,
            ..entry(who)
        };
        for i in 0..3 {
            commit(
                &audit,
                store.as_ref(),
                vec![change(&format!("user/admin{i}"))],
            );
        }
        for _ in 0..100 {
            commit(&audit, store.as_ref(), vec![entry("user/flood")]);
        }
        commit(
            &audit,
            store.as_ref(),
            (0..50).map(|_| entry("user/flood")).collect(),
        );
        assert_eq!(stored_sequences(store.as_ref())[..3], [1, 2, 3]);
        assert_eq!(audit.len_of(Kind::Change), 3);
        assert_eq!(audit.len_of(Kind::Refusal), 10);
        assert_eq!(stored_sequences(store.as_ref()).len(), 13);
        // Changes beyond the count evict the oldest changes, and the index survives a restart.
        for i in 0..12 {
            commit(&audit, store.as_ref(), vec![change(&format!("user/op{i}"))]);
        }
        drop(audit);
        let audit = Audit::load(store.clone(), retention).expect("reload");
        assert_eq!(
            (audit.len_of(Kind::Change), audit.len_of(Kind::Refusal)),
            (10, 10)
        );
        commit(&audit, store.as_ref(), vec![entry("user/flood")]);
        assert_eq!(stored_sequences(store.as_ref()).len(), 20);
        let (kvs, _) = store.list(PREFIX).expect("list");
        let changes = kvs
            .iter()
            .filter(|kv| AuditEntry::decode(kv.value.as_slice()).unwrap().code == 0)
            .count();
        assert_eq!(changes, 10);
    }

    #[test]
    fn retention_by_age_and_failed_commits_keep_the_index_true() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store: Arc<dyn Store> =
            Arc::new(RedbStore::open(&dir.path().join("s.redb")).expect("store"));
        let retention = Retention {
            entries: 100,
            age: Duration::from_secs(3600),
        };
        let audit = Audit::load(store.clone(), retention).expect("load");
        let mut old = entry("user/old");
        old.time = Some(prost_types::Timestamp {
            seconds: now_seconds() - 7200,
            nanos: 0,
        });
        commit(&audit, store.as_ref(), vec![old.clone(), old]);
        // A transaction that does not commit deletes nothing and adds nothing.
        let (txn, staged) = audit.stage(
            Txn::new().when(crate::store::Compare::Absent(PREFIX.into())),
            vec![entry("user/a")],
        );
        let _ = txn;
        drop(staged);
        assert_eq!(audit.len(), 2);
        commit(&audit, store.as_ref(), vec![entry("user/new")]);
        assert_eq!(stored_sequences(store.as_ref()), vec![4]);
        assert_eq!(audit.len(), 1);
    }

    #[tokio::test]
    async fn refusals_are_written_in_batches_and_listed_with_filters() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store: Arc<dyn Store> =
            Arc::new(RedbStore::open(&dir.path().join("s.redb")).expect("store"));
        let audit = Audit::load(
            store.clone(),
            Retention {
                entries: 50,
                age: DEFAULT_RETENTION_AGE,
            },
        )
        .expect("load");
        let mut committed = audit.committed.subscribe();
        let before = store.revision().expect("revision");
        for i in 0..200 {
            audit.record(entry(if i % 2 == 0 { "user/a" } else { "user/b" }));
        }
        tokio::time::timeout(Duration::from_secs(10), async {
            while audit.len() < 50 || audit.state().next < 201 {
                let _ = committed.changed().await;
            }
        })
        .await
        .expect("the writer commits");
        let commits = store.revision().expect("revision") - before;
        assert!(commits < 200, "{commits} commits for 200 refusals");
        assert_eq!(stored_sequences(store.as_ref()).len(), 50, "flood bounded");
        let (page, last) = audit.list(0, 10, |e| e.identity == "user/a").expect("list");
        assert_eq!(page.len(), 10);
        assert!(page.iter().all(|e| e.identity == "user/a"));
        assert!(page.windows(2).all(|w| w[0].sequence < w[1].sequence));
        assert_eq!(last, page[9].sequence);
        let (rest, _) = audit.list(last, MAX_PAGE, |_| true).expect("list");
        assert!(rest.iter().all(|e| e.sequence > last));
    }

    /// One identity's flood of refusals is written as its burst and then counted: one entry
    /// says how many more there were, so every refusal is accounted for in a few entries,
    /// and another identity's refusals are all written one by one.
    #[tokio::test]
    async fn a_flood_from_one_identity_is_counted_not_written_one_by_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store: Arc<dyn Store> =
            Arc::new(RedbStore::open(&dir.path().join("s.redb")).expect("store"));
        let audit = Audit::load(store.clone(), Retention::default()).expect("load");
        let mut committed = audit.committed.subscribe();
        for _ in 0..10_000 {
            audit.record(entry("user/flood"));
        }
        for _ in 0..5 {
            audit.record(entry("user/other"));
        }
        let count = |entries: &[AuditEntry]| {
            let mut written = 0u64;
            let mut counted = 0u64;
            for e in entries.iter().filter(|e| e.identity == "user/flood") {
                if e.rpc == "audit" {
                    let n = e.message.split(' ').next().unwrap_or("");
                    counted += n.parse::<u64>().expect("a count first");
                } else {
                    written += 1;
                }
            }
            (written, counted)
        };
        let (written, counted) = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let (entries, _) = audit.list(0, MAX_PAGE, |_| true).expect("list");
                let (written, counted) = count(&entries);
                if written + counted == 10_000 {
                    let others = entries.iter().filter(|e| e.identity == "user/other");
                    assert_eq!(others.count(), 5);
                    return (written, counted);
                }
                let _ = tokio::time::timeout(Duration::from_millis(200), committed.changed()).await;
            }
        })
        .await
        .expect("every refusal written or counted within 10 s");
        assert!(written >= REFUSAL_BURST as u64, "{written}");
        assert!(written <= REFUSAL_BURST as u64 + 200, "{written} written");
        assert!(counted >= 9_000, "{counted}");
        assert!(
            audit.len() < 400,
            "{} entries for 10,005 refusals",
            audit.len()
        );
        assert_eq!(audit.dropped(), 0);
    }

    /// An entry whose commit is still in flight hides every later one from readers, so a
    /// follower polling with the last sequence it saw misses none that commit late.
    #[test]
    fn readers_see_nothing_past_a_commit_in_flight() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store: Arc<dyn Store> =
            Arc::new(RedbStore::open(&dir.path().join("s.redb")).expect("store"));
        let audit = Audit::load(store.clone(), Retention::default()).expect("load");
        commit(&audit, store.as_ref(), vec![entry("user/first")]);
        let (slow_txn, slow) = audit.stage(Txn::new(), vec![entry("user/slow")]);
        commit(&audit, store.as_ref(), vec![entry("user/fast")]);
        let (seen, last) = audit.list(0, 100, |_| true).expect("list");
        assert_eq!(seen.len(), 1, "{seen:?}");
        assert_eq!(last, 1);
        assert!(matches!(store.txn(slow_txn), Ok(TxnOutcome::Committed(_))));
        slow.committed();
        let (seen, _) = audit.list(last, 100, |_| true).expect("list");
        let who: Vec<&str> = seen.iter().map(|e| e.identity.as_str()).collect();
        assert_eq!(who, ["user/slow", "user/fast"]);
    }

    #[test]
    fn an_entry_stays_small_whatever_the_request_held() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store: Arc<dyn Store> =
            Arc::new(RedbStore::open(&dir.path().join("s.redb")).expect("store"));
        let audit = Audit::load(store.clone(), Retention::default()).expect("load");
        let mut big = entry("user/x");
        big.target = format!("vm/{}", "é".repeat(1 << 20));
        big.message = "m".repeat(1 << 20);
        big.roles = vec!["viewer@p".into(); 10_000];
        commit(&audit, store.as_ref(), vec![big]);
        let (kvs, _) = store.list(PREFIX).expect("list");
        assert!(kvs[0].value.len() < 4096, "{} bytes", kvs[0].value.len());
    }
}
