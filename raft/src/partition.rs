//! `PartitionStateMachine`: the state machine of one partition's Raft group.
//!
//! The records themselves live only in the partition log (the Raft log *is* the partition
//! log): applying a record batch reads its base offset (stamped by the log on append) and
//! publishes the new high watermark, the offset up to which records are committed and may be
//! fetched. The small state (last applied log id, membership, high watermark) is kept in the
//! metadata store under `<group>/…` in the `state` column family, written once per applied
//! chunk without sync: after a crash it may be behind, and openraft re-applies from there,
//! which only recomputes the same values.
//!
//! Retention (DESIGN.md §5): the leader decides a retention point and replicates it as a
//! `Retain { upto }` entry. Applying it records the point (its log id, the next offset after
//! it, the membership) and publishes it; the replica then asks openraft for a snapshot, which
//! this state machine builds at exactly that index, and openraft purges the log up to the
//! snapshot (`max_in_snapshot_log_to_keep = 0`). Partition groups never snapshot otherwise
//! (`SnapshotPolicy::Never`), so every replica holds the same log from the same start.
//! Snapshots carry only the small state; a replica that installs one past its own log's end
//! (it was down across the purge) resets its log to continue after the snapshot index at the
//! snapshot's next offset, and receives every later entry by replication.
//!
//! Deleting records (Kafka's DeleteRecords): a `DeleteRecords { before }` entry moves the
//! replica's log start offset (`Applied::deleted_before`) up to `before`, clamped to the high
//! watermark at that entry, so every replica reaches the same value. Reads below it are
//! refused by the broker; the segments wholly below it go with the next retention point.

use std::io::{self, Cursor};
use std::sync::Arc;

use aqueduct_storage::meta::{CF_STATE, MetaStore, MetaWriteBatch};
use aqueduct_storage::{PartitionLog, batch};
use futures_util::StreamExt;
use openraft::storage::{EntryResponder, RaftSnapshotBuilder, RaftStateMachine};
use openraft::{EntryPayload, OptionalSend, Snapshot, SnapshotMeta};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::io_err;
use crate::producers::{ProducerEntry, ProducerTable};
use crate::types::{GroupCommand, GroupResponse, GroupTypeConfig, LogId, StoredMembership};

type PartitionSnapshotMeta = SnapshotMeta<
    openraft::impls::leader_id_adv::LeaderId<u64, u64>,
    u64,
    openraft::impls::BasicNode,
>;
type PartitionSnapshot = Snapshot<
    openraft::impls::leader_id_adv::LeaderId<u64, u64>,
    u64,
    openraft::impls::BasicNode,
    Cursor<Vec<u8>>,
>;

/// The state a partition replica has applied.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    /// Last applied log index (`None` before the first entry).
    pub index: Option<u64>,
    /// One past the last committed record offset: consumers may read below it.
    pub high_watermark: u64,
    /// The latest applied retention point (entries up to it are to be purged).
    pub retain_upto: Option<u64>,
    /// Term of the last applied entry: once it is the leader's own term, everything of
    /// earlier terms in its log is applied.
    pub term: Option<u64>,
    /// The latest applied compaction point (compacted topics).
    pub compact_upto: Option<u64>,
    /// The log start offset set by `DeleteRecords` (0 when none applied): records below it
    /// are deleted even where their segment remains.
    pub deleted_before: u64,
}

/// A retention point as applied: where the snapshot that purges the log is taken.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct RetainPoint {
    log_id: LogId,
    next_offset: u64,
    membership: StoredMembership,
    /// The producer table when the point was applied (it may reflect a few entries past the
    /// point: applying them again changes nothing).
    #[serde(default)]
    producers: ProducerTable,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Stored {
    applied: Option<LogId>,
    membership: StoredMembership,
    high_watermark: u64,
    #[serde(default)]
    retain: Option<RetainPoint>,
    #[serde(default)]
    producers: ProducerTable,
    #[serde(default)]
    compact_upto: Option<u64>,
    #[serde(default)]
    deleted_before: u64,
}

impl Stored {
    fn published(&self) -> Applied {
        Applied {
            index: self.applied.map(|l| l.index),
            high_watermark: self.high_watermark,
            retain_upto: self.retain.as_ref().map(|r| r.log_id.index),
            term: self.applied.map(|l| l.leader_id.term),
            compact_upto: self.compact_upto,
            deleted_before: self.deleted_before,
        }
    }
}

#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: PartitionSnapshotMeta,
    state: Stored,
}

/// A partition's state machine (cheap to clone: clones share everything).
#[derive(Debug, Clone)]
pub struct PartitionStateMachine {
    log: Arc<PartitionLog>,
    meta: Arc<dyn MetaStore>,
    group: String,
    applied: Arc<watch::Sender<Applied>>,
    /// The applied producer table (also in the stored state), for the leader's checks.
    producers: Arc<parking_lot::Mutex<ProducerTable>>,
}

impl PartitionStateMachine {
    /// The state machine of group `group` (a key prefix, e.g. `p/orders/0`) over `log`.
    pub fn new(
        log: Arc<PartitionLog>,
        meta: Arc<dyn MetaStore>,
        group: impl Into<String>,
    ) -> io::Result<Self> {
        let sm = Self {
            log,
            meta,
            group: group.into(),
            applied: Arc::new(watch::channel(Applied::default()).0),
            producers: Arc::default(),
        };
        sm.reset_behind_snapshot()?;
        let stored = sm.stored()?;
        *sm.producers.lock() = stored.producers.clone();
        sm.applied.send_replace(stored.published());
        Ok(sm)
    }

    /// When the current snapshot lies past the log's end (this replica was down across a
    /// purge and installed it), the log continues right after the snapshot, at the
    /// snapshot's next offset: what it lacks is gone on every replica.
    fn reset_behind_snapshot(&self) -> io::Result<()> {
        let Some(v) = self
            .meta
            .get(CF_STATE, &self.key("snapshot"))
            .map_err(io_err)?
        else {
            return Ok(());
        };
        let s: StoredSnapshot = serde_json::from_slice(&v).map_err(io_err)?;
        let Some(at) = s.meta.last_log_id.map(|l| l.index) else {
            return Ok(());
        };
        if self.log.next_index() <= at {
            tracing::info!(
                group = %self.group,
                index = at,
                next_offset = s.state.high_watermark,
                "snapshot past the local log's end: resetting the log to continue after it"
            );
            self.log
                .reset_after(at, s.state.high_watermark)
                .map_err(io_err)?;
        }
        Ok(())
    }

    /// Follows what this replica has applied (the high watermark moves as records commit).
    pub fn watch(&self) -> watch::Receiver<Applied> {
        self.applied.subscribe()
    }

    /// Waits up to `within` until this replica has applied an entry of `term` or later (a
    /// new leader then has everything of earlier terms applied); `false` if it did not.
    pub async fn wait_applied_term(&self, term: u64, within: std::time::Duration) -> bool {
        let mut applied = self.watch();
        let reached = tokio::time::timeout(within, async {
            loop {
                if applied.borrow_and_update().term >= Some(term) {
                    return true;
                }
                if applied.changed().await.is_err() {
                    return false;
                }
            }
        })
        .await;
        reached == Ok(true)
    }

    /// What this replica has applied now.
    pub fn applied(&self) -> Applied {
        *self.applied.borrow()
    }

    /// What the applied log says of producer `producer_id` (idempotent producers).
    pub fn producer(&self, producer_id: i64) -> Option<ProducerEntry> {
        self.producers.lock().get(producer_id).cloned()
    }

    /// The partition log.
    pub fn log(&self) -> &Arc<PartitionLog> {
        &self.log
    }

    fn key(&self, what: &str) -> Vec<u8> {
        format!("{}/{what}", self.group).into_bytes()
    }

    fn stored(&self) -> io::Result<Stored> {
        match self.meta.get(CF_STATE, &self.key("sm")).map_err(io_err)? {
            Some(v) => serde_json::from_slice(&v).map_err(io_err),
            None => Ok(Stored::default()),
        }
    }

    fn put_stored(&self, batch: &mut MetaWriteBatch, stored: &Stored) -> io::Result<()> {
        batch.put(
            CF_STATE,
            self.key("sm"),
            serde_json::to_vec(stored).map_err(io_err)?,
        );
        Ok(())
    }
}

/// Base offset (stamped by the log) and offset count of a stored batch.
fn batch_offsets(b: &[u8]) -> io::Result<(u64, u32)> {
    let info = batch::inspect(b).map_err(|why| io::Error::new(io::ErrorKind::InvalidData, why))?;
    let mut base = [0u8; 8];
    base.copy_from_slice(&b[..8]);
    Ok((u64::from_be_bytes(base), info.offset_count))
}

impl RaftSnapshotBuilder<GroupTypeConfig> for PartitionStateMachine {
    type SnapshotData = Cursor<Vec<u8>>;

    /// The small state at the latest retention point (or, without one, at the last applied
    /// entry); it also becomes the current snapshot.
    async fn build_snapshot(&mut self) -> Result<PartitionSnapshot, io::Error> {
        let mut state = self.stored()?;
        if let Some(r) = state.retain.take() {
            state = Stored {
                applied: Some(r.log_id),
                membership: r.membership,
                high_watermark: r.next_offset,
                retain: None,
                producers: r.producers,
                compact_upto: state.compact_upto,
                // It may come from an entry past the point; the clamp keeps it within the
                // snapshot, and replaying that entry sets it again.
                deleted_before: state.deleted_before.min(r.next_offset),
            };
        }
        let meta = PartitionSnapshotMeta {
            last_log_id: state.applied,
            last_membership: state.membership.clone(),
        };
        let data = serde_json::to_vec(&state).map_err(io_err)?;
        let stored = StoredSnapshot {
            meta: meta.clone(),
            state,
        };
        self.meta
            .put(
                CF_STATE,
                &self.key("snapshot"),
                &serde_json::to_vec(&stored).map_err(io_err)?,
                true,
            )
            .map_err(io_err)?;
        Ok(Snapshot {
            meta,
            snapshot: Cursor::new(data),
        })
    }
}

impl RaftStateMachine<GroupTypeConfig> for PartitionStateMachine {
    type SnapshotData = Cursor<Vec<u8>>;
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), io::Error> {
        let s = self.stored()?;
        Ok((s.applied, s.membership))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), io::Error>
    where
        Strm: futures_util::Stream<Item = Result<EntryResponder<GroupTypeConfig>, io::Error>>
            + Unpin
            + OptionalSend,
    {
        let mut state = self.stored()?;
        let mut responders = Vec::new();
        while let Some(item) = entries.next().await {
            let (entry, responder) = item?;
            state.applied = Some(entry.log_id);
            let response = match &entry.payload {
                EntryPayload::Normal(GroupCommand::Records(b)) => {
                    let (base, count) = batch_offsets(b)?;
                    let next = base + u64::from(count);
                    state.high_watermark = next;
                    if let Some(p) = batch::producer(b) {
                        state.producers.record(&p, base, next.saturating_sub(1));
                    }
                    GroupResponse::Appended {
                        base_offset: base,
                        last_offset: next.saturating_sub(1),
                    }
                }
                EntryPayload::Normal(GroupCommand::Retain { upto }) => {
                    let newer = state.retain.as_ref().is_none_or(|r| r.log_id.index < *upto);
                    // A point before the latest membership change is skipped (the snapshot
                    // there would carry a membership the log has not reached yet); every
                    // replica decides the same, and the leader proposes a later point.
                    let before_membership =
                        state.membership.log_id().is_some_and(|m| m.index > *upto);
                    // Skipped too when this replica no longer has the entry (it installed a
                    // snapshot past it); any other read failure is an error.
                    let at = if newer && !before_membership && *upto < entry.log_id.index {
                        match self.log.read(*upto, *upto + 1, 1) {
                            Ok(v) => v.into_iter().next(),
                            Err(aqueduct_storage::LogError::Purged { .. }) => None,
                            Err(e) => return Err(io_err(e)),
                        }
                    } else {
                        None
                    };
                    if let Some(at) = at {
                        state.retain = Some(RetainPoint {
                            log_id: LogId::new(
                                openraft::impls::leader_id_adv::LeaderId {
                                    term: at.entry.term,
                                    node_id: at.entry.leader,
                                },
                                *upto,
                            ),
                            next_offset: at.next_offset(),
                            membership: state.membership.clone(),
                            producers: state.producers.clone(),
                        });
                    }
                    GroupResponse::Appended {
                        base_offset: state.high_watermark,
                        last_offset: state.high_watermark.saturating_sub(1),
                    }
                }
                EntryPayload::Normal(GroupCommand::Compact { upto }) => {
                    // Compaction itself runs beside apply (`src/partitions.rs`), which stays
                    // cheap; only entries already applied are ever compacted.
                    let upto = (*upto).min(entry.log_id.index);
                    if state.compact_upto.is_none_or(|c| c < upto) {
                        state.compact_upto = Some(upto);
                    }
                    GroupResponse::Appended {
                        base_offset: state.high_watermark,
                        last_offset: state.high_watermark.saturating_sub(1),
                    }
                }
                EntryPayload::Normal(GroupCommand::DeleteRecords { before }) => {
                    // Every replica applies the same clamp: the high watermark at this entry
                    // is the same everywhere.
                    let before = (*before).min(state.high_watermark);
                    state.deleted_before = state.deleted_before.max(before);
                    GroupResponse::LogStart(state.deleted_before)
                }
                EntryPayload::Normal(GroupCommand::Meta(_)) => GroupResponse::WrongGroup,
                EntryPayload::Membership(m) => {
                    state.membership = StoredMembership::new(Some(entry.log_id), m.clone());
                    GroupResponse::Appended {
                        base_offset: state.high_watermark,
                        last_offset: state.high_watermark.saturating_sub(1),
                    }
                }
                EntryPayload::Blank => GroupResponse::Appended {
                    base_offset: state.high_watermark,
                    last_offset: state.high_watermark.saturating_sub(1),
                },
            };
            if let Some(r) = responder {
                responders.push((r, response));
            }
        }
        let mut batch = MetaWriteBatch::new();
        self.put_stored(&mut batch, &state)?;
        self.meta.write(batch, false).map_err(io_err)?;
        *self.producers.lock() = state.producers.clone();
        self.applied.send_replace(state.published());
        for (r, response) in responders {
            r.send(response);
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn install_snapshot(
        &mut self,
        meta: &PartitionSnapshotMeta,
        snapshot: Cursor<Vec<u8>>,
    ) -> Result<(), io::Error> {
        let state: Stored = serde_json::from_slice(&snapshot.into_inner()).map_err(io_err)?;
        // The state and snapshot are made durable first, then the log is reset; a crash in
        // between is finished by `new` (see `reset_behind_snapshot`).
        let mut batch = MetaWriteBatch::new();
        self.put_stored(&mut batch, &state)?;
        batch.put(
            CF_STATE,
            self.key("snapshot"),
            serde_json::to_vec(&StoredSnapshot {
                meta: meta.clone(),
                state: state.clone(),
            })
            .map_err(io_err)?,
        );
        self.meta.write(batch, true).map_err(io_err)?;
        self.reset_behind_snapshot()?;
        *self.producers.lock() = state.producers.clone();
        self.applied.send_replace(state.published());
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<PartitionSnapshot>, io::Error> {
        let Some(v) = self
            .meta
            .get(CF_STATE, &self.key("snapshot"))
            .map_err(io_err)?
        else {
            return Ok(None);
        };
        let s: StoredSnapshot = serde_json::from_slice(&v).map_err(io_err)?;
        Ok(Some(Snapshot {
            meta: s.meta,
            snapshot: Cursor::new(serde_json::to_vec(&s.state).map_err(io_err)?),
        }))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use aqueduct_storage::fs::StdFs;
    use aqueduct_storage::meta::WELL_KNOWN_CFS;
    use aqueduct_storage::meta::memory::MemoryMetaStore;
    use aqueduct_storage::metrics::StorageMetrics;
    use aqueduct_storage::{Entry as LogEntry, LogOptions};
    use bytes::Bytes;
    use openraft::impls::leader_id_adv::LeaderId;

    use super::*;
    use crate::log_store::{decode, encode};
    use crate::types::Entry;

    fn open(dir: &std::path::Path) -> (Arc<PartitionLog>, PartitionStateMachine) {
        let log = Arc::new(
            PartitionLog::open(
                Arc::new(StdFs),
                dir,
                LogOptions::default(),
                Arc::new(StorageMetrics::default()),
            )
            .unwrap(),
        );
        let meta: Arc<dyn MetaStore> = Arc::new(MemoryMetaStore::new(WELL_KNOWN_CFS));
        let sm = PartitionStateMachine::new(Arc::clone(&log), meta, "p/t/0/1").unwrap();
        (log, sm)
    }

    fn id(index: u64) -> LogId {
        LogId::new(
            LeaderId {
                term: 1,
                node_id: 1,
            },
            index,
        )
    }

    /// Appends `entries` to the log, reads them back (stamped, as openraft's apply sees them)
    /// and applies them.
    async fn append_and_apply(
        log: &PartitionLog,
        sm: &mut PartitionStateMachine,
        entries: Vec<Entry>,
    ) {
        let stored: Vec<LogEntry> = entries.iter().map(|e| encode(e).unwrap()).collect();
        log.append_durable(&stored).unwrap();
        let first = entries[0].log_id.index;
        let read: Vec<_> = log
            .read(first, first + entries.len() as u64, usize::MAX)
            .unwrap()
            .into_iter()
            .map(|s| Ok((decode(s).unwrap(), None)))
            .collect();
        sm.apply(futures_util::stream::iter(read)).await.unwrap();
    }

    fn records(index: u64, count: u32) -> Entry {
        Entry {
            log_id: id(index),
            payload: EntryPayload::Normal(GroupCommand::Records(Bytes::from(batch::build(
                count, 0, b"x",
            )))),
        }
    }

    /// Applying batches moves the high watermark to one past their last offset; a retention
    /// point makes the next snapshot sit exactly there (not at the last applied entry), with
    /// the offset that follows it; a replica that installs that snapshot with an empty log
    /// continues right after it, at that offset, also across a reopen.
    #[tokio::test]
    async fn retention_point_snapshot_and_install_past_the_log_end() {
        let dir = tempfile::tempdir().unwrap();
        let (log, mut sm) = open(&dir.path().join("leader"));
        append_and_apply(
            &log,
            &mut sm,
            vec![records(0, 2), records(1, 2), records(2, 2)],
        )
        .await;
        assert_eq!(sm.applied().high_watermark, 6);
        append_and_apply(
            &log,
            &mut sm,
            vec![Entry {
                log_id: id(3),
                payload: EntryPayload::Normal(GroupCommand::Retain { upto: 1 }),
            }],
        )
        .await;
        let applied = sm.applied();
        assert_eq!((applied.index, applied.retain_upto), (Some(3), Some(1)));
        assert_eq!(
            applied.high_watermark, 6,
            "a retention point moves no offsets"
        );

        let snapshot = sm.build_snapshot().await.unwrap();
        assert_eq!(snapshot.meta.last_log_id, Some(id(1)));
        let data = snapshot.snapshot.into_inner();
        let state: Stored = serde_json::from_slice(&data).unwrap();
        assert_eq!(state.high_watermark, 4, "entries 0 and 1 hold offsets 0..4");

        // A replica that was down across the purge: empty log, gets the snapshot.
        let follower_dir = dir.path().join("follower");
        let (flog, mut fsm) = open(&follower_dir);
        fsm.install_snapshot(&snapshot.meta, Cursor::new(data))
            .await
            .unwrap();
        assert_eq!((flog.next_index(), flog.next_offset()), (2, 4));
        assert_eq!(fsm.applied().high_watermark, 4);
        drop((flog, fsm));
        let (flog, _) = open(&follower_dir);
        assert_eq!((flog.next_index(), flog.next_offset()), (2, 4));
    }

    /// `DeleteRecords` moves the log start offset up, never past the high watermark and
    /// never back; a snapshot carries it.
    #[tokio::test]
    async fn delete_records_moves_the_log_start_within_the_high_watermark() {
        let dir = tempfile::tempdir().unwrap();
        let (log, mut sm) = open(dir.path());
        let delete = |index, before| Entry {
            log_id: id(index),
            payload: EntryPayload::Normal(GroupCommand::DeleteRecords { before }),
        };
        append_and_apply(&log, &mut sm, vec![records(0, 3), delete(1, 2)]).await;
        assert_eq!(sm.applied().deleted_before, 2);
        append_and_apply(&log, &mut sm, vec![delete(2, 1)]).await;
        assert_eq!(sm.applied().deleted_before, 2, "never moves back");
        append_and_apply(&log, &mut sm, vec![delete(3, 100)]).await;
        assert_eq!(
            sm.applied().deleted_before,
            3,
            "clamped to the high watermark"
        );
        let snapshot = sm.build_snapshot().await.unwrap();
        let state: Stored = serde_json::from_slice(&snapshot.snapshot.into_inner()).unwrap();
        assert_eq!(state.deleted_before, 3);
    }

    /// A retention point before the latest membership change is skipped on every replica (the
    /// snapshot there could not carry the membership of its own index).
    #[tokio::test]
    async fn retention_point_before_a_membership_change_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let (log, mut sm) = open(dir.path());
        let membership = openraft::Membership::new_with_defaults(
            vec![std::collections::BTreeSet::from([1u64])],
            std::collections::BTreeSet::<u64>::new(),
        );
        append_and_apply(
            &log,
            &mut sm,
            vec![
                records(0, 1),
                Entry {
                    log_id: id(1),
                    payload: EntryPayload::Membership(membership),
                },
                Entry {
                    log_id: id(2),
                    payload: EntryPayload::Normal(GroupCommand::Retain { upto: 0 }),
                },
            ],
        )
        .await;
        assert_eq!(sm.applied().retain_upto, None);
    }
}
