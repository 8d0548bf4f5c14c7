//! The controller's durable store: a key-value space with a global revision, compare-and-swap
//! transactions and watches, shaped like etcd's so that an etcd backend can replace the
//! embedded one ([`redb::RedbStore`], a file in the data directory) without changing callers.
//!
//! - Keys are UTF-8 strings with `/`-separated prefixes (`vms/<id>`); values are bytes
//!   (protobuf messages).
//! - Every committed transaction increments the store's revision by one; each key remembers
//!   the revision that created it and the one that last modified it.
//! - A [`Txn`] is applied only if all its [`Compare`]s hold, atomically, and is durable when
//!   [`Store::txn`] returns.
//! - [`Store::watch`] streams committed changes under a prefix, in revision order.

pub mod redb;

use tokio::sync::broadcast;

/// A store revision: 0 before the first commit.
pub type Revision = u64;

/// A stored key and its value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    pub create_revision: Revision,
    pub mod_revision: Revision,
}

/// A condition a transaction checks before applying.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Compare {
    /// The key does not exist.
    Absent(String),
    /// The key exists and was last modified at this revision.
    ModRevision(String, Revision),
}

/// A change a transaction makes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Put(String, Vec<u8>),
    Delete(String),
}

/// Compare-and-swap: if every compare holds, apply every op.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Txn {
    pub compares: Vec<Compare>,
    pub ops: Vec<Op>,
}

impl Txn {
    pub fn new() -> Txn {
        Txn::default()
    }
    pub fn when(mut self, compare: Compare) -> Txn {
        self.compares.push(compare);
        self
    }
    pub fn put(mut self, key: impl Into<String>, value: Vec<u8>) -> Txn {
        self.ops.push(Op::Put(key.into(), value));
        self
    }
    pub fn delete(mut self, key: impl Into<String>) -> Txn {
        self.ops.push(Op::Delete(key.into()));
        self
    }
}

/// What a transaction did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxnOutcome {
    /// Applied; the store is now at this revision.
    Committed(Revision),
    /// A compare did not hold (the first failing one); nothing was applied.
    Failed(Compare),
}

/// One committed change, as watches see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Put(KeyValue),
    /// A deleted key and the revision of the deletion.
    Delete {
        key: String,
        revision: Revision,
    },
}

impl Change {
    pub fn key(&self) -> &str {
        match self {
            Change::Put(kv) => &kv.key,
            Change::Delete { key, .. } => key,
        }
    }
    pub fn revision(&self) -> Revision {
        match self {
            Change::Put(kv) => kv.mod_revision,
            Change::Delete { revision, .. } => *revision,
        }
    }
}

/// A store failure (I/O, corruption), as opposed to a failed compare.
#[derive(Debug, thiserror::Error)]
#[error("store: {0}")]
pub struct StoreError(pub String);

/// The store interface. Calls block (the embedded backend does file I/O); async callers use
/// `spawn_blocking`.
pub trait Store: Send + Sync + 'static {
    /// Applies `txn` if its compares hold; durable on return.
    fn txn(&self, txn: Txn) -> Result<TxnOutcome, StoreError>;
    fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError>;
    /// Every key starting with `prefix`, in key order, and the revision they were read at.
    fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision), StoreError>;
    /// At most `limit` keys starting with `prefix` and greater than `after`, in key order
    /// (a page of [`Store::list`]).
    fn list_after(
        &self,
        prefix: &str,
        after: &str,
        limit: usize,
    ) -> Result<Vec<KeyValue>, StoreError> {
        let (all, _) = self.list(prefix)?;
        Ok(all
            .into_iter()
            .filter(|kv| kv.key.as_str() > after)
            .take(limit)
            .collect())
    }
    /// The current revision.
    fn revision(&self) -> Result<Revision, StoreError>;
    /// Changes committed from now on (all prefixes; filter by [`Change::key`]).
    fn watch(&self) -> broadcast::Receiver<Change>;
}
