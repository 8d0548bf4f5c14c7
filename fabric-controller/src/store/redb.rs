//! The embedded store backend: one redb file. Transactions are group-committed: a committer
//! thread takes every transaction queued while the previous commit was being made durable and
//! applies them in one redb write transaction (each with its own revision, each seeing the
//! ones before it), so many concurrent callers share one fsync.

use std::path::Path;
use std::sync::mpsc;
use std::sync::Arc;

use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::broadcast;

use super::{Change, Compare, KeyValue, Op, Revision, Store, StoreError, Txn, TxnOutcome};

/// key -> 8 bytes create revision, 8 bytes mod revision (little endian), then the value.
const KV: TableDefinition<&str, &[u8]> = TableDefinition::new("kv");
/// "revision" -> the store revision.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// Most transactions applied in one commit.
const MAX_BATCH: usize = 512;

fn err(e: impl std::fmt::Display) -> StoreError {
    StoreError(e.to_string())
}

fn encode(create: Revision, modified: Revision, value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + value.len());
    out.extend_from_slice(&create.to_le_bytes());
    out.extend_from_slice(&modified.to_le_bytes());
    out.extend_from_slice(value);
    out
}

fn decode(key: &str, raw: &[u8]) -> Result<KeyValue, StoreError> {
    if raw.len() < 16 {
        return Err(StoreError(format!("corrupt record for key {key:?}")));
    }
    let create = u64::from_le_bytes(raw[0..8].try_into().unwrap_or_default());
    let modified = u64::from_le_bytes(raw[8..16].try_into().unwrap_or_default());
    Ok(KeyValue {
        key: key.to_string(),
        value: raw[16..].to_vec(),
        create_revision: create,
        mod_revision: modified,
    })
}

type Reply = std::sync::mpsc::SyncSender<Result<TxnOutcome, StoreError>>;

/// The redb-backed store.
pub struct RedbStore {
    db: Arc<Database>,
    queue: Option<mpsc::Sender<(Txn, Reply)>>,
    committer: Option<std::thread::JoinHandle<()>>,
    changes: broadcast::Sender<Change>,
}

impl Drop for RedbStore {
    /// Finishes queued commits and closes the file, so it can be opened again at once.
    fn drop(&mut self) {
        self.queue = None;
        if let Some(thread) = self.committer.take() {
            let _ = thread.join();
        }
    }
}

impl RedbStore {
    /// Opens (or creates) the store file at `path`.
    pub fn open(path: &Path) -> Result<RedbStore, StoreError> {
        let db =
            Database::create(path).map_err(|e| StoreError(format!("{}: {e}", path.display())))?;
        {
            let txn = db.begin_write().map_err(err)?;
            txn.open_table(KV).map_err(err)?;
            txn.open_table(META).map_err(err)?;
            txn.commit().map_err(err)?;
        }
        let db = Arc::new(db);
        let (queue, pending) = mpsc::channel::<(Txn, Reply)>();
        let (changes, _) = broadcast::channel(65536);
        let committer_db = db.clone();
        let committer_changes = changes.clone();
        let thread = std::thread::Builder::new()
            .name("store-commit".into())
            .spawn(move || committer(committer_db, pending, committer_changes))
            .map_err(err)?;
        Ok(RedbStore {
            db,
            queue: Some(queue),
            committer: Some(thread),
            changes,
        })
    }
}

/// Applies queued transactions in batches until every sender is gone.
fn committer(
    db: Arc<Database>,
    pending: mpsc::Receiver<(Txn, Reply)>,
    changes: broadcast::Sender<Change>,
) {
    while let Ok(first) = pending.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match pending.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        match commit_batch(&db, &batch) {
            Ok((outcomes, committed)) => {
                // Watchers hear of a change before its writer returns.
                for change in committed {
                    let _ = changes.send(change);
                }
                for ((_, reply), outcome) in batch.into_iter().zip(outcomes) {
                    let _ = reply.send(Ok(outcome));
                }
            }
            Err(e) => {
                for (_, reply) in batch {
                    let _ = reply.send(Err(StoreError(e.0.clone())));
                }
            }
        }
    }
}

fn commit_batch(
    db: &Database,
    batch: &[(Txn, Reply)],
) -> Result<(Vec<TxnOutcome>, Vec<Change>), StoreError> {
    let mut write = db.begin_write().map_err(err)?;
    write.set_durability(Durability::Immediate).map_err(err)?;
    let mut outcomes = Vec::with_capacity(batch.len());
    let mut committed = Vec::new();
    {
        let mut kv = write.open_table(KV).map_err(err)?;
        let mut meta = write.open_table(META).map_err(err)?;
        let mut revision = meta
            .get("revision")
            .map_err(err)?
            .map(|g| g.value())
            .unwrap_or(0);
        for (txn, _) in batch {
            let mut failed = None;
            for compare in &txn.compares {
                let holds = match compare {
                    Compare::Absent(key) => kv.get(key.as_str()).map_err(err)?.is_none(),
                    Compare::ModRevision(key, want) => match kv.get(key.as_str()).map_err(err)? {
                        Some(raw) => decode(key, raw.value())?.mod_revision == *want,
                        None => false,
                    },
                };
                if !holds {
                    failed = Some(compare.clone());
                    break;
                }
            }
            if let Some(compare) = failed {
                outcomes.push(TxnOutcome::Failed(compare));
                continue;
            }
            revision += 1;
            for op in &txn.ops {
                match op {
                    Op::Put(key, value) => {
                        let create = match kv.get(key.as_str()).map_err(err)? {
                            Some(raw) => decode(key, raw.value())?.create_revision,
                            None => revision,
                        };
                        kv.insert(key.as_str(), encode(create, revision, value).as_slice())
                            .map_err(err)?;
                        committed.push(Change::Put(KeyValue {
                            key: key.clone(),
                            value: value.clone(),
                            create_revision: create,
                            mod_revision: revision,
                        }));
                    }
                    Op::Delete(key) => {
                        if kv.remove(key.as_str()).map_err(err)?.is_some() {
                            committed.push(Change::Delete {
                                key: key.clone(),
                                revision,
                            });
                        }
                    }
                }
            }
            outcomes.push(TxnOutcome::Committed(revision));
        }
        meta.insert("revision", revision).map_err(err)?;
    }
    write.commit().map_err(err)?;
    Ok((outcomes, committed))
}

impl Store for RedbStore {
    fn txn(&self, txn: Txn) -> Result<TxnOutcome, StoreError> {
        let (reply, result) = mpsc::sync_channel(1);
        self.queue
            .as_ref()
            .ok_or_else(|| StoreError("the store is closed".into()))?
            .send((txn, reply))
            .map_err(|_| StoreError("the committer stopped".into()))?;
        result
            .recv()
            .map_err(|_| StoreError("the committer stopped".into()))?
    }

    fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let read = self.db.begin_read().map_err(err)?;
        let kv = read.open_table(KV).map_err(err)?;
        match kv.get(key).map_err(err)? {
            Some(raw) => Ok(Some(decode(key, raw.value())?)),
            None => Ok(None),
        }
    }

    fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision), StoreError> {
        let read = self.db.begin_read().map_err(err)?;
        let kv = read.open_table(KV).map_err(err)?;
        let meta = read.open_table(META).map_err(err)?;
        let revision = meta
            .get("revision")
            .map_err(err)?
            .map(|g| g.value())
            .unwrap_or(0);
        let mut out = Vec::new();
        for entry in kv.range(prefix..).map_err(err)? {
            let (key, value) = entry.map_err(err)?;
            let key = key.value();
            if !key.starts_with(prefix) {
                break;
            }
            out.push(decode(key, value.value())?);
        }
        Ok((out, revision))
    }

    fn list_after(
        &self,
        prefix: &str,
        after: &str,
        limit: usize,
    ) -> Result<Vec<KeyValue>, StoreError> {
        let read = self.db.begin_read().map_err(err)?;
        let kv = read.open_table(KV).map_err(err)?;
        let start = if after > prefix { after } else { prefix };
        let mut out = Vec::new();
        for entry in kv.range(start..).map_err(err)? {
            let (key, value) = entry.map_err(err)?;
            let key = key.value();
            if !key.starts_with(prefix) || out.len() == limit {
                break;
            }
            if key == after {
                continue;
            }
            out.push(decode(key, value.value())?);
        }
        Ok(out)
    }

    fn revision(&self) -> Result<Revision, StoreError> {
        let read = self.db.begin_read().map_err(err)?;
        let meta = read.open_table(META).map_err(err)?;
        Ok(meta
            .get("revision")
            .map_err(err)?
            .map(|g| g.value())
            .unwrap_or(0))
    }

    fn watch(&self) -> broadcast::Receiver<Change> {
        self.changes.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compare_and_swap_revisions_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        let store = RedbStore::open(&path).unwrap();
        let mut watch = store.watch();
        assert_eq!(store.revision().unwrap(), 0);
        let created = store
            .txn(
                Txn::new()
                    .when(Compare::Absent("vms/a".into()))
                    .put("vms/a", b"1".to_vec()),
            )
            .unwrap();
        assert_eq!(created, TxnOutcome::Committed(1));
        // A second create of the same key fails and changes nothing.
        let again = store
            .txn(
                Txn::new()
                    .when(Compare::Absent("vms/a".into()))
                    .put("vms/a", b"2".to_vec()),
            )
            .unwrap();
        assert_eq!(again, TxnOutcome::Failed(Compare::Absent("vms/a".into())));
        // Update with the right revision, then a stale one.
        let updated = store
            .txn(
                Txn::new()
                    .when(Compare::ModRevision("vms/a".into(), 1))
                    .put("vms/a", b"3".to_vec()),
            )
            .unwrap();
        assert_eq!(updated, TxnOutcome::Committed(2));
        let stale = store
            .txn(
                Txn::new()
                    .when(Compare::ModRevision("vms/a".into(), 1))
                    .delete("vms/a"),
            )
            .unwrap();
        assert!(matches!(stale, TxnOutcome::Failed(_)));
        store
            .txn(
                Txn::new()
                    .put("vms/b", b"x".to_vec())
                    .put("hosts/h", b"y".to_vec()),
            )
            .unwrap();
        let a = store.get("vms/a").unwrap().unwrap();
        assert_eq!(
            (a.value.as_slice(), a.create_revision, a.mod_revision),
            (&b"3"[..], 1, 2)
        );
        let (vms, rev) = store.list("vms/").unwrap();
        assert_eq!(
            vms.iter().map(|k| k.key.as_str()).collect::<Vec<_>>(),
            ["vms/a", "vms/b"]
        );
        assert_eq!(rev, 3);
        store.txn(Txn::new().delete("vms/b")).unwrap();
        let seen: Vec<(String, Revision)> = (0..5)
            .map(|_| watch.try_recv().unwrap())
            .map(|c| (c.key().to_string(), c.revision()))
            .collect();
        assert_eq!(
            seen,
            [
                ("vms/a".into(), 1),
                ("vms/a".into(), 2),
                ("vms/b".into(), 3),
                ("hosts/h".into(), 3),
                ("vms/b".into(), 4)
            ]
        );
        drop(store);
        let reopened = RedbStore::open(&path).unwrap();
        assert_eq!(reopened.revision().unwrap(), 4);
        assert!(reopened.get("vms/b").unwrap().is_none());
        assert_eq!(reopened.get("vms/a").unwrap().unwrap().value, b"3");
    }

    #[test]
    fn concurrent_transactions_are_serialized_by_compare() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(RedbStore::open(&dir.path().join("s.redb")).unwrap());
        let threads: Vec<_> = (0..8)
            .map(|i| {
                let store = store.clone();
                std::thread::spawn(move || {
                    (0..50)
                        .filter(|j| {
                            let key = format!("names/n{}", j);
                            matches!(
                                store
                                    .txn(
                                        Txn::new()
                                            .when(Compare::Absent(key.clone()))
                                            .put(key, vec![i])
                                    )
                                    .unwrap(),
                                TxnOutcome::Committed(_)
                            )
                        })
                        .count()
                })
            })
            .collect();
        let won: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
        // Each of the 50 names was created exactly once.
        assert_eq!(won, 50);
        assert_eq!(store.list("names/").unwrap().0.len(), 50);
    }
}
