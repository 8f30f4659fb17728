//! Resource families in the metadata state (DESIGN.md §3: each resource family owns its
//! records).
//!
//! A family (products and devices; later rules, data sources, APIs) defines its own command
//! type, validation and apply function in its own module, outside this crate, and registers
//! a [`Family`] with the [`crate::state_machine::MetaStateMachine`]. Its commands travel as
//! [`crate::types::MetaCommand::Family`] (the family's name and its command as JSON); the state
//! machine only dispatches them. A family's records live under `rec/<family>/` in the state
//! column family, so snapshots, checksums and snapshot installs carry them like every other
//! record. After each applied entry the keys a family wrote are announced on the state
//! machine's change feed ([`Changed`]), so projections on every node (the MQTT front's
//! connected devices, the gateway's routing table) follow the log without polling.
//!
//! Apply must be deterministic: it may read only the state (as of the previous entry), the
//! command and the entry's index and time proposed in the command — never the clock.

use std::io;

use aqueduct_storage::meta::{CF_STATE, MetaStore, MetaWriteBatch};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::io_err;
use crate::types::MetaResponse;

/// A resource family's handler of its metadata commands.
pub trait Family: Send + Sync + 'static {
    /// The family's name: `MetaCommand::Family { family }` and its key prefix
    /// `rec/<name>/`. `[a-z0-9-]+`, never changed once records exist.
    fn name(&self) -> &'static str;

    /// Applies one of its commands: reads and writes through `txn`. A refusal is a
    /// `MetaResponse::Rejected` (nothing written); an `Err` stops the state machine (storage
    /// failure only).
    fn apply(&self, txn: &mut Txn<'_>, command: &serde_json::Value) -> io::Result<MetaResponse>;
}

/// The prefix of `family`'s records.
pub fn prefix(family: &str) -> String {
    format!("rec/{family}/")
}

/// One entry's access to one family's records: reads see the state before the entry (and not
/// this entry's own writes), writes go into the entry's atomic batch.
pub struct Txn<'a> {
    /// The index of the entry being applied (unique and increasing: usable as an id).
    pub index: u64,
    view: View<'a>,
    batch: &'a mut MetaWriteBatch,
    changed: Vec<String>,
}

impl std::fmt::Debug for Txn<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Txn({} at {})", self.view.family, self.index)
    }
}

impl<'a> Txn<'a> {
    /// The state machine opens one per family command; a family's tests open their own over
    /// an in-memory store and write `batch` themselves.
    pub fn new(
        index: u64,
        family: &'a str,
        meta: &'a dyn MetaStore,
        batch: &'a mut MetaWriteBatch,
    ) -> Self {
        Self {
            index,
            view: View { family, meta },
            batch,
            changed: Vec::new(),
        }
    }

    /// The record at `key`, as of the previous entry.
    pub fn get<T: DeserializeOwned>(&self, key: &str) -> io::Result<Option<T>> {
        self.view.get(key)
    }

    /// Every record whose key starts with `key_prefix`, in key order.
    pub fn scan<T: DeserializeOwned>(&self, key_prefix: &str) -> io::Result<Vec<(String, T)>> {
        self.view.scan(key_prefix)
    }

    /// How many records start with `key_prefix` (at most `limit` counted).
    pub fn count(&self, key_prefix: &str, limit: usize) -> io::Result<usize> {
        self.view.count(key_prefix, limit)
    }

    pub fn put<T: Serialize>(&mut self, key: &str, value: &T) -> io::Result<()> {
        let v = serde_json::to_vec(value).map_err(io_err)?;
        self.batch.put(CF_STATE, self.view.key(key), v);
        self.changed.push(key.to_string());
        Ok(())
    }

    pub fn delete(&mut self, key: &str) {
        self.batch.delete(CF_STATE, self.view.key(key));
        self.changed.push(key.to_string());
    }

    /// The keys written or deleted.
    pub fn into_changed(self) -> Vec<String> {
        self.changed
    }
}

/// Read access to one family's records (applied state, on any node).
#[derive(Clone, Copy)]
pub struct View<'a> {
    family: &'a str,
    meta: &'a dyn MetaStore,
}

impl std::fmt::Debug for View<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "View({})", self.family)
    }
}

impl<'a> View<'a> {
    pub fn new(family: &'a str, meta: &'a dyn MetaStore) -> Self {
        Self { family, meta }
    }

    fn key(&self, key: &str) -> Vec<u8> {
        format!("rec/{}/{key}", self.family).into_bytes()
    }

    pub fn get<T: DeserializeOwned>(&self, key: &str) -> io::Result<Option<T>> {
        match self.meta.get(CF_STATE, &self.key(key)).map_err(io_err)? {
            Some(v) => serde_json::from_slice(&v).map(Some).map_err(io_err),
            None => Ok(None),
        }
    }

    pub fn scan<T: DeserializeOwned>(&self, key_prefix: &str) -> io::Result<Vec<(String, T)>> {
        let strip = prefix(self.family).len();
        self.meta
            .scan_prefix(CF_STATE, &self.key(key_prefix), usize::MAX)
            .map_err(io_err)?
            .into_iter()
            .map(|(k, v)| {
                let key = String::from_utf8_lossy(&k[strip..]).into_owned();
                Ok((key, serde_json::from_slice(&v).map_err(io_err)?))
            })
            .collect()
    }

    pub fn count(&self, key_prefix: &str, limit: usize) -> io::Result<usize> {
        Ok(self
            .meta
            .scan_prefix(CF_STATE, &self.key(key_prefix), limit)
            .map_err(io_err)?
            .len())
    }
}

/// Records of a family changed on this node's state machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Changed {
    pub family: String,
    /// The keys written or deleted; `None`: possibly all of them (a snapshot was installed).
    pub keys: Option<Vec<String>>,
}
