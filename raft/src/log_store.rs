//! `SegmentedLogStore`: openraft's log storage over the segmented partition log.
//!
//! Entry mapping: a Raft entry's log id becomes the frame's index, term and leader node id;
//! blank entries are `EntryKind::Blank`, membership changes `EntryKind::Membership` (JSON),
//! record batches `EntryKind::Data` (the batch itself, stamped by the log with its base offset
//! and leader epoch), other commands `EntryKind::Control` (JSON). Votes, the committed log id and the last
//! purged log id live in the metadata store's `raft` column family under `<group>/…`, written
//! with `sync`. The last purged id is written *before* the log is purged, so the log never
//! starts after `last_purged + 1`.
//!
//! The log calls are synchronous (page-cache writes; syncs happen on the group-commit thread,
//! except for truncation and purge, which are rare and must be durable on return).

use std::collections::HashMap;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::oneshot;

use aqueduct_storage::meta::{CF_RAFT, MetaStore};
use aqueduct_storage::{Entry as LogEntry, EntryKind, LogError, PartitionLog, StoredEntry};
use bytes::Bytes;
use openraft::impls::leader_id_adv::LeaderId;
use openraft::storage::{IOFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::{EntryPayload, OptionalSend};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::io_err;
use crate::types::{Entry, GroupCommand, GroupTypeConfig, LogId, Vote};

/// Largest batch of entries `limited_get_log_entries` returns, in bytes (at least one entry).
const READ_CAP_BYTES: usize = 1 << 20;

/// Where a record batch landed in the local log: its offsets, once durable per the log's
/// flush policy, or why it did not.
pub type LocalAppend = Result<(u64, u64), String>;

/// Batches whose local append someone waits for (`acks=leader`), keyed by the address of the
/// batch's bytes: the `Bytes` handed to Raft reaches the log store as the same allocation.
#[derive(Debug, Clone, Default)]
pub struct LocalAppendWaiters {
    waiting: Arc<Mutex<HashMap<usize, oneshot::Sender<LocalAppend>>>>,
}

impl LocalAppendWaiters {
    /// Registers interest in where `batch` lands; the receiver gets its offsets once the
    /// local log has it durable (and is dropped if this node never appends it).
    pub fn wait_for(&self, batch: &Bytes) -> oneshot::Receiver<LocalAppend> {
        let (tx, rx) = oneshot::channel();
        self.waiting.lock().insert(batch.as_ptr() as usize, tx);
        rx
    }

    /// Forgets a registration (the batch was refused before reaching the log).
    pub fn cancel(&self, batch: &Bytes) {
        self.waiting.lock().remove(&(batch.as_ptr() as usize));
    }

    fn take(&self, batch: &Bytes) -> Option<oneshot::Sender<LocalAppend>> {
        let mut w = self.waiting.lock();
        if w.is_empty() {
            return None;
        }
        w.remove(&(batch.as_ptr() as usize))
    }
}

/// openraft's `RaftLogStorage` (and log reader) for one Raft group over its segmented log.
#[derive(Debug, Clone)]
pub struct SegmentedLogStore {
    log: Arc<PartitionLog>,
    meta: Arc<dyn MetaStore>,
    group: String,
    waiters: LocalAppendWaiters,
    /// Sync each committed id (see [`Self::with_synced_commits`]).
    sync_committed: bool,
}

impl SegmentedLogStore {
    /// A store for Raft group `group` (a key prefix in the metadata store, e.g. `meta` or
    /// `p/<topic>/<partition>`) over `log`.
    pub fn new(log: Arc<PartitionLog>, meta: Arc<dyn MetaStore>, group: impl Into<String>) -> Self {
        Self {
            log,
            meta,
            group: group.into(),
            waiters: LocalAppendWaiters::default(),
            sync_committed: false,
        }
    }

    /// Syncs each committed id (the metadata group: its writes are rare, and its state
    /// machine applies without sync, so after a power loss its state never goes back behind a
    /// commit this node saw).
    pub fn with_synced_commits(mut self) -> Self {
        self.sync_committed = true;
        self
    }

    /// Uses `waiters` to report local appends of record batches (see [`LocalAppendWaiters`]).
    pub fn with_waiters(mut self, waiters: LocalAppendWaiters) -> Self {
        self.waiters = waiters;
        self
    }

    /// The underlying log.
    pub fn log(&self) -> &Arc<PartitionLog> {
        &self.log
    }

    fn key(&self, what: &str) -> Vec<u8> {
        format!("{}/{what}", self.group).into_bytes()
    }

    fn read_json<T: DeserializeOwned>(&self, what: &str) -> io::Result<Option<T>> {
        match self.meta.get(CF_RAFT, &self.key(what)).map_err(io_err)? {
            Some(v) => serde_json::from_slice(&v).map(Some).map_err(io_err),
            None => Ok(None),
        }
    }

    fn write_json<T: Serialize>(&self, what: &str, value: &T, sync: bool) -> io::Result<()> {
        let v = serde_json::to_vec(value).map_err(io_err)?;
        self.meta
            .put(CF_RAFT, &self.key(what), &v, sync)
            .map_err(io_err)
    }

    fn read_one(&self, index: u64) -> io::Result<Option<Entry>> {
        let got = self.log.read(index, index + 1, 1).map_err(io_err)?;
        got.into_iter().next().map(decode).transpose()
    }

    /// Entries in `[start, end)`, at most about `cap` bytes (at least one) when capped.
    fn read_range(&self, start: u64, end: u64, cap: Option<usize>) -> io::Result<Vec<Entry>> {
        let Some(first) = self.log.first_index() else {
            return Ok(Vec::new());
        };
        let mut from = start.max(first);
        let mut out = Vec::new();
        while from < end {
            let chunk = self
                .log
                .read(from, end, cap.unwrap_or(4 << 20))
                .map_err(io_err)?;
            let Some(last) = chunk.last() else { break };
            from = last.entry.index + 1;
            for e in chunk {
                out.push(decode(e)?);
            }
            if cap.is_some() {
                break;
            }
        }
        Ok(out)
    }
}

/// Converts a Raft entry to a log entry.
pub fn encode(e: &Entry) -> io::Result<LogEntry> {
    let (term, leader, index) = (
        e.log_id.leader_id.term,
        e.log_id.leader_id.node_id,
        e.log_id.index,
    );
    let (kind, body) = match &e.payload {
        EntryPayload::Blank => (EntryKind::Blank, Bytes::new()),
        EntryPayload::Normal(GroupCommand::Records(batch)) => {
            return Ok(LogEntry::data(index, term, leader, batch.clone()));
        }
        EntryPayload::Normal(cmd) => (
            EntryKind::Control,
            Bytes::from(serde_json::to_vec(cmd).map_err(io_err)?),
        ),
        EntryPayload::Membership(m) => (
            EntryKind::Membership,
            Bytes::from(serde_json::to_vec(m).map_err(io_err)?),
        ),
    };
    Ok(LogEntry::control(index, term, leader, kind, body))
}

/// Converts a stored log entry back to a Raft entry.
pub fn decode(s: StoredEntry) -> io::Result<Entry> {
    let e = s.entry;
    let log_id = LogId::new(
        LeaderId {
            term: e.term,
            node_id: e.leader,
        },
        e.index,
    );
    let payload = match e.kind {
        EntryKind::Blank => EntryPayload::Blank,
        EntryKind::Control => {
            EntryPayload::Normal(serde_json::from_slice(&e.payload).map_err(io_err)?)
        }
        EntryKind::Membership => {
            EntryPayload::Membership(serde_json::from_slice(&e.payload).map_err(io_err)?)
        }
        EntryKind::Data => EntryPayload::Normal(GroupCommand::Records(e.payload)),
    };
    Ok(openraft::Entry { log_id, payload })
}

fn bounds(range: &impl RangeBounds<u64>) -> (u64, u64) {
    let start = match range.start_bound() {
        Bound::Included(&x) => x,
        Bound::Excluded(&x) => x.saturating_add(1),
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        Bound::Included(&x) => x.saturating_add(1),
        Bound::Excluded(&x) => x,
        Bound::Unbounded => u64::MAX,
    };
    (start, end)
}

impl RaftLogReader<GroupTypeConfig> for SegmentedLogStore {
    /// Every entry of `range` that the log holds, without holes (purged entries at the start
    /// and not-yet-appended ones at the end are absent).
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + std::fmt::Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, io::Error> {
        let (start, end) = bounds(&range);
        self.read_range(start, end, None)
    }

    /// The persisted vote, if any.
    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        self.read_json("vote")
    }

    /// Entries from `start`, capped at about 1 MiB (at least one entry): replication batches
    /// are bounded by bytes, not only by count.
    async fn limited_get_log_entries(
        &mut self,
        start: u64,
        end: u64,
    ) -> Result<Vec<Entry>, io::Error> {
        self.read_range(start, end, Some(READ_CAP_BYTES))
    }
}

impl RaftLogStorage<GroupTypeConfig> for SegmentedLogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<GroupTypeConfig>, io::Error> {
        let last_purged_log_id: Option<LogId> = self.read_json("purged")?;
        let last_log_id = match self.log.last_index() {
            Some(i) => self.read_one(i)?.map(|e| e.log_id),
            None => None,
        }
        .or(last_purged_log_id);
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    /// Durable (synced to the metadata store) before returning.
    async fn save_vote(&mut self, vote: &Vote) -> Result<(), io::Error> {
        self.write_json("vote", vote, true)
    }

    /// Not synced for partition groups: it becomes durable with the next synced metadata
    /// write. A committed id older than the truth after a crash only means fewer entries are
    /// re-applied at start (openraft raises it to the last applied id); the entries themselves
    /// are durable on a quorum, and the next leader commits them again. (Syncing cost one
    /// extra fsync per commit on every replica.) Synced with [`Self::with_synced_commits`].
    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), io::Error> {
        self.write_json("committed", &committed, self.sync_committed)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, io::Error> {
        Ok(self.read_json::<Option<LogId>>("committed")?.flatten())
    }

    /// Readable on return; `callback` fires after the group `fdatasync` covering the entries.
    /// An empty log accepts a first entry after its end (entries before it were never here, as
    /// after a snapshot): the gap is recorded as purged in the log itself.
    async fn append<I>(
        &mut self,
        entries: I,
        callback: IOFlushed<GroupTypeConfig>,
    ) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        // Offsets of the batches someone waits for: only the Raft core appends to this log,
        // so the next offset now is where the first batch lands.
        let mut next_offset = self.log.next_offset();
        let mut notify = Vec::new();
        let entries = entries
            .into_iter()
            .map(|e| {
                if let EntryPayload::Normal(GroupCommand::Records(b)) = &e.payload {
                    let count = aqueduct_storage::batch::inspect(b)
                        .map(|i| u64::from(i.offset_count))
                        .unwrap_or(0);
                    if let Some(tx) = self.waiters.take(b) {
                        notify.push((tx, next_offset, next_offset + count.saturating_sub(1)));
                    }
                    next_offset += count;
                }
                encode(&e)
            })
            .collect::<io::Result<Vec<_>>>()?;
        if let Some(first) = entries.first()
            && self.log.first_index().is_none()
            && first.index > self.log.next_index()
        {
            self.log.purge_upto(first.index - 1).map_err(io_err)?;
        }
        self.log
            .append(
                &entries,
                Some(Box::new(move |r: Result<(), LogError>| {
                    for (tx, base, last) in notify {
                        let _ = tx.send(match &r {
                            Ok(()) => Ok((base, last)),
                            Err(e) => Err(e.to_string()),
                        });
                    }
                    callback.io_completed(r.map_err(io_err))
                })),
            )
            .map_err(io_err)
    }

    /// Durable on return; removes from the end backwards, so no hole is ever left.
    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        match last_log_id {
            Some(id) => self.log.truncate_after(id.index),
            None => match self.log.first_index() {
                Some(first) => self.log.truncate_from(first),
                None => Ok(()),
            },
        }
        .map_err(io_err)
    }

    /// Records the purge point durably, then purges.
    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        self.write_json("purged", &log_id, true)?;
        self.log.purge_upto(log_id.index).map_err(io_err)
    }
}
