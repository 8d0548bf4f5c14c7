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
//! - Retention: at most `retention.entries` entries and none older than `retention.age`.
//!   Every commit that adds entries deletes the oldest ones beyond either bound (at most
//!   [`PRUNE_PER_COMMIT`] per commit beyond the entries it adds, so the log converges back
//!   within a few commits after the bound is lowered).
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

#[derive(Default)]
struct State {
    next: u64,
    /// Committed entries, oldest first: (sequence, time in seconds).
    stored: VecDeque<(u64, i64)>,
    /// Sequences handed out whose commit has not ended yet.
    in_flight: BTreeSet<u64>,
}

pub struct Audit {
    store: Arc<dyn Store>,
    retention: Retention,
    state: Mutex<State>,
    queue: Mutex<Option<tokio::sync::mpsc::Sender<AuditEntry>>>,
    dropped: AtomicU64,
    /// Wakes followers when entries commit.
    pub committed: tokio::sync::watch::Sender<u64>,
}

/// Entries added to one transaction; tells the log on drop whether they committed.
pub struct Staged<'a> {
    audit: &'a Audit,
    entries: Vec<(u64, i64)>,
    pruned: Vec<(u64, i64)>,
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
        for (seq, _) in &self.entries {
            state.in_flight.remove(seq);
        }
        if self.committed {
            for entry in &self.entries {
                // Nearly always at the back: sequences commit nearly in order.
                let at = state.stored.partition_point(|e| e.0 < entry.0);
                state.stored.insert(at, *entry);
            }
        } else {
            // Nothing was deleted: the pruned entries are still the oldest.
            for entry in self.pruned.drain(..).rev() {
                state.stored.push_front(entry);
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
        let mut stored = VecDeque::with_capacity(kvs.len());
        for kv in kvs {
            let Some(seq) = sequence_of(&kv.key) else {
                return Err(format!("{}: not an audit key", kv.key));
            };
            let entry =
                AuditEntry::decode(kv.value.as_slice()).map_err(|e| format!("{}: {e}", kv.key))?;
            stored.push_back((seq, seconds(&entry)));
        }
        let next = stored.back().map_or(1, |e| e.0 + 1);
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
            }),
            queue: Mutex::new(None),
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
        self.state().stored.len()
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
        // A batch larger than the whole retention keeps only its newest entries.
        let skip = entries.len().saturating_sub(self.retention.entries);
        for (i, mut entry) in entries.into_iter().enumerate() {
            let seq = state.next;
            state.next += 1;
            if i < skip {
                continue;
            }
            state.in_flight.insert(seq);
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
            staged.entries.push((seq, seconds(&entry)));
            txn.ops.push(Op::Put(key(seq), entry.encode_to_vec()));
        }
        let oldest_kept = now_seconds().saturating_sub(self.retention.age.as_secs() as i64);
        let adding = staged.entries.len();
        let mut budget = adding + PRUNE_PER_COMMIT;
        while budget > 0 {
            let total = state.stored.len() + state.in_flight.len();
            let Some(&(seq, time)) = state.stored.front() else {
                break;
            };
            if total <= self.retention.entries && time >= oldest_kept {
                break;
            }
            state.stored.pop_front();
            staged.pruned.push((seq, time));
            txn.ops.push(Op::Delete(key(seq)));
            budget -= 1;
        }
        (txn, staged)
    }

    /// Queues the entry of a refused or failed call for the writer; never waits.
    pub fn record(&self, entry: AuditEntry) {
        let queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        let Some(tx) = queue.as_ref() else {
            return;
        };
        if tx.try_send(entry).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    async fn writer(
        audit: std::sync::Weak<Audit>,
        mut rx: tokio::sync::mpsc::Receiver<AuditEntry>,
    ) {
        let mut batch = Vec::with_capacity(WRITE_BATCH);
        let mut lost_reported = 0;
        loop {
            batch.clear();
            if rx.recv_many(&mut batch, WRITE_BATCH).await == 0 {
                return;
            }
            let Some(audit) = audit.upgrade() else {
                return;
            };
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

    fn stored_sequences(store: &dyn Store) -> Vec<u64> {
        let (kvs, _) = store.list(PREFIX).expect("list");
        kvs.iter().filter_map(|kv| sequence_of(&kv.key)).collect()
    }

    #[test]
    fn retention_by_count_prunes_the_oldest_as_entries_come() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store: Arc<dyn Store> =
            Arc::new(RedbStore::open(&dir.path().join("s.redb")).expect("store"));
        let retention = Retention {
            entries: 10,
            age: DEFAULT_RETENTION_AGE,
        };
        let audit = Audit::load(store.clone(), retention).expect("load");
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
