//! The data path of a partition leader: produce, fetch, list offsets.
//!
//! Produce checks the batch (RecordBatch v2 structure, CRC-32C, size limit) before it reaches
//! Raft, so a bad batch is refused and never becomes a log entry; [`Acks::All`] answers once
//! the batch is committed and applied here (a quorum has it on disk), [`Acks::Leader`] once
//! the leader's own log has it durable. Idempotent batches (a producer id) pass the sequence
//! gate (`idempotence.rs`) first. Fetch returns whole stored batches from the requested
//! offset, never at or past the high watermark, and waits (long poll) when there is nothing
//! new yet. The stored batch is the produced batch byte for byte (only the base offset and
//! leader epoch, outside the CRC, are stamped), so compressed batches pass through.
//!
//! Deleting records ([`Broker::delete_records`], Kafka's DeleteRecords) replicates a new log
//! start offset; reads below it are refused as out of range at once, and the segments wholly
//! below it are purged by the next retention point (`partitions/`).

use std::time::Duration;

use aqueduct_raft::types::{GroupCommand, GroupResponse};
use aqueduct_storage::batch;
use bytes::{Bytes, BytesMut};
use openraft::error::{ClientWriteError, RaftError};

use super::Broker;
use super::error::{BrokerError, BrokerResult, ErrorCode};
use super::idempotence::{self, Admitted, GateError};
use super::partitions::Replica;

/// Largest record batch a producer may send (DESIGN.md §5b default).
pub const MAX_BATCH_BYTES: usize = 1 << 20;
/// Largest fetch reply.
const MAX_FETCH_BYTES: usize = 8 << 20;
/// Longest wait for an `acks=leader` batch to reach the local log.
const LOCAL_APPEND_WAIT: Duration = Duration::from_secs(10);
/// Longest long poll.
const MAX_WAIT: Duration = Duration::from_secs(30);

/// When a produce is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acks {
    /// Committed by a quorum (each member fsynced per the topic policy).
    All,
    /// Durable in the leader's own log.
    Leader,
}

/// One batch for one partition.
#[derive(Debug, Clone)]
pub struct ProduceRequest {
    pub topic: String,
    pub partition: u32,
    /// One RecordBatch v2, as the producer built it.
    pub batch: Bytes,
    pub acks: Acks,
}

/// Where a produced batch landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Produced {
    pub base_offset: u64,
    pub last_offset: u64,
    /// The batch was a retry of one already written: these are the original's offsets.
    pub duplicate: bool,
    /// The partition's log start offset.
    pub log_start_offset: u64,
}

/// A read from one partition.
#[derive(Debug, Clone)]
pub struct FetchRequest {
    pub topic: String,
    pub partition: u32,
    pub offset: u64,
    pub max_bytes: usize,
    /// How long to wait when nothing at or after `offset` is committed yet.
    pub max_wait: Duration,
}

/// What a fetch read.
#[derive(Debug, Clone, Default)]
pub struct Fetched {
    /// Whole stored batches, concatenated; the first holds `offset` (it may start before).
    pub batches: Bytes,
    pub high_watermark: u64,
    /// Everything below it is settled (no transactions yet: the high watermark).
    pub last_stable_offset: u64,
    pub log_start_offset: u64,
}

/// Which offset [`Broker::list_offsets`] looks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OffsetSpec {
    Earliest,
    Latest,
    /// The first offset whose record timestamp is at or after this time (ms since the epoch);
    /// the high watermark when there is none.
    Timestamp(i64),
}

/// Why `b` is not a batch a producer may send, or `None`: RecordBatch v2 structure, the
/// CRC-32C over attributes..end, and the size limit.
pub fn batch_problem(b: &[u8]) -> Option<BrokerError> {
    if b.len() > MAX_BATCH_BYTES {
        return Some(BrokerError::new(
            ErrorCode::RecordBatchTooLarge,
            format!(
                "record batch of {} bytes exceeds the {MAX_BATCH_BYTES}-byte limit",
                b.len()
            ),
        ));
    }
    if b.len() > 16 && b[16] != 2 {
        return Some(BrokerError::new(
            ErrorCode::UnsupportedForMessageFormat,
            format!(
                "record batch magic {} is not supported (only RecordBatch v2, magic 2)",
                b[16]
            ),
        ));
    }
    if let Err(why) = batch::inspect(b) {
        return Some(BrokerError::new(
            ErrorCode::CorruptMessage,
            format!("record batch: {why}"),
        ));
    }
    let stated = u32::from_be_bytes([b[17], b[18], b[19], b[20]]);
    let actual = crc32c::crc32c(&b[21..]);
    if stated != actual {
        return Some(BrokerError::new(
            ErrorCode::CorruptMessage,
            format!("record batch CRC mismatch (stated {stated:08x}, computed {actual:08x})"),
        ));
    }
    records_problem(b).map(|(code, why)| BrokerError::new(code, format!("record batch: {why}")))
}

/// Checks what a producer's batch may contain: no control or transactional batches (not
/// supported yet), `recordCount == lastOffsetDelta + 1`, and, when uncompressed, records that
/// exactly fill the batch (each a zigzag-varint length and that many bytes) with offset deltas
/// 0, 1, 2, ….
fn records_problem(b: &[u8]) -> Option<(ErrorCode, &'static str)> {
    let attributes = i16::from_be_bytes([b[21], b[22]]);
    if attributes & 0x30 != 0 {
        return Some((
            ErrorCode::UnsupportedForMessageFormat,
            "transactional and control batches are not supported",
        ));
    }
    let corrupt = |why| Some((ErrorCode::CorruptMessage, why));
    let last_delta = i32::from_be_bytes([b[23], b[24], b[25], b[26]]);
    let count = i32::from_be_bytes([b[57], b[58], b[59], b[60]]);
    if count < 1 || i64::from(count) != i64::from(last_delta) + 1 {
        return corrupt("recordCount must be lastOffsetDelta + 1 and at least 1");
    }
    if attributes & 0x07 != 0 {
        // Compressed: the records are checked by whoever decompresses them.
        return None;
    }
    // Each record a length and that many bytes, filling the batch exactly, with offset
    // deltas 0, 1, 2, … (the storage crate's record walk).
    let Some(records) = aqueduct_storage::compact::records(b) else {
        return corrupt("the records do not fill the batch exactly");
    };
    let base = u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
    if records.len() != count as usize
        || records
            .iter()
            .enumerate()
            .any(|(i, r)| r.offset != base.wrapping_add(i as u64))
    {
        return corrupt("record offset deltas must be 0, 1, 2, … in order");
    }
    None
}

/// Withdraws an `acks=leader` registration when dropped.
struct AppendWaitGuard<'a> {
    replica: &'a Replica,
    batch: &'a Bytes,
}

impl Drop for AppendWaitGuard<'_> {
    fn drop(&mut self) {
        self.replica.cancel_appended(self.batch);
    }
}

/// How long an `acks=all` write waits for its commit before it nudges replication.
const NUDGE_REPLICATION_AFTER: Duration = Duration::from_millis(500);

fn internal(what: &str, e: impl std::fmt::Display) -> BrokerError {
    BrokerError::internal(what, e)
}

impl Broker {
    /// Appends one batch on the partition leader (see the module doc).
    pub async fn produce(&self, req: ProduceRequest) -> BrokerResult<Produced> {
        if let Some(e) = batch_problem(&req.batch) {
            return Err(e);
        }
        let replica = self.leader_replica(&req.topic, req.partition)?;
        let (base_offset, last_offset, duplicate) = self.append(&replica, &req).await?;
        Ok(Produced {
            base_offset,
            last_offset,
            duplicate,
            log_start_offset: log_start(&replica).unwrap_or(0),
        })
    }

    /// The refusal of a write whose outcome is unknown because leadership moved: sends the
    /// caller to the new leader, or asks it to retry.
    fn moved(&self, topic: &str, partition: u32, why: &str) -> BrokerError {
        match self.leader_replica(topic, partition) {
            Err(e) => e,
            Ok(_) => BrokerError::new(ErrorCode::LeaderNotAvailable, format!("{why}; retry")),
        }
    }

    /// The refusal of an idempotent batch the gate did not admit.
    fn gate_refusal(&self, req: &ProduceRequest, e: GateError) -> BrokerError {
        match e {
            GateError::NotLeader => self.moved(&req.topic, req.partition, "not the leader"),
            GateError::NotReady | GateError::Raft(_) => {
                BrokerError::new(ErrorCode::LeaderNotAvailable, e.to_string())
            }
            GateError::OutOfOrder { .. } => {
                BrokerError::new(ErrorCode::OutOfOrderSequenceNumber, e.to_string())
            }
            GateError::Fenced { .. } => {
                BrokerError::new(ErrorCode::InvalidProducerEpoch, e.to_string())
            }
        }
    }

    /// Waits for an `acks=leader` batch to be durable in this node's log.
    async fn wait_local(
        &self,
        replica: &Replica,
        req: &ProduceRequest,
        local: tokio::sync::oneshot::Receiver<aqueduct_raft::log_store::LocalAppend>,
    ) -> BrokerResult<(u64, u64, bool)> {
        // A leader that loses leadership before appending drops the batch: stop waiting as
        // soon as it no longer leads.
        let me = replica.raft_id();
        let lost = async {
            loop {
                tokio::time::sleep(Duration::from_millis(50)).await;
                if replica.leader().map(|l| l.0) != Some(me) {
                    return;
                }
            }
        };
        let outcome = tokio::select! {
            r = tokio::time::timeout(LOCAL_APPEND_WAIT, local) => r.ok().and_then(Result::ok),
            () = lost => None,
        };
        match outcome {
            Some(Ok((base, last))) => Ok((base, last, false)),
            Some(Err(e)) => Err(internal("append", e)),
            None => Err(self.moved(
                &req.topic,
                req.partition,
                "leadership changed before the batch reached the log",
            )),
        }
    }

    async fn append(
        &self,
        replica: &Replica,
        req: &ProduceRequest,
    ) -> BrokerResult<(u64, u64, bool)> {
        let producer = batch::producer(&req.batch);
        let batch = req.batch.clone();
        // The registration is withdrawn however this ends (also when the caller goes away
        // and this future is dropped).
        let local = (req.acks == Acks::Leader).then(|| {
            (
                replica.log_store_appended(&batch),
                AppendWaitGuard {
                    replica,
                    batch: &batch,
                },
            )
        });
        if let Some(info) = producer {
            let proposed = match replica.admit_idempotent(batch.clone(), info).await {
                Ok(Admitted::Proposed(rx)) => rx,
                Ok(Admitted::Duplicate {
                    base_offset,
                    last_offset,
                }) => return Ok((base_offset, last_offset, true)),
                Ok(Admitted::InFlight(rx)) => {
                    return match idempotence::outcome(rx).await {
                        Ok((b, l)) => Ok((b, l, true)),
                        Err(why) => Err(self.moved(&req.topic, req.partition, &why)),
                    };
                }
                Err(e) => return Err(self.gate_refusal(req, e)),
            };
            return match local {
                Some((local, _guard)) => self.wait_local(replica, req, local).await,
                None => match idempotence::outcome(proposed).await {
                    Ok((b, l)) => Ok((b, l, false)),
                    Err(why) => Err(self.moved(&req.topic, req.partition, &why)),
                },
            };
        }
        if let Some((local, _guard)) = local {
            if let Err(e) = replica
                .raft
                .client_write_ff(GroupCommand::Records(batch.clone()), None)
                .await
            {
                return Err(internal("append", e));
            }
            return self.wait_local(replica, req, local).await;
        }
        let write = replica
            .raft
            .client_write(GroupCommand::Records(batch.clone()));
        tokio::pin!(write);
        let written = loop {
            tokio::select! {
                r = &mut write => break r,
                () = tokio::time::sleep(NUDGE_REPLICATION_AFTER) => {
                    // Partition groups have no heartbeat timer: a follower that refused an
                    // append (say its replica of a just-created topic was not started yet)
                    // is sent it again only on the next write or heartbeat. A write left
                    // waiting this long sends that heartbeat.
                    if let Err(e) = replica.raft.trigger().heartbeat().await {
                        tracing::debug!(err = %e, "heartbeat for a waiting write");
                    }
                }
            }
        };
        match written.map(|r| r.response().clone()) {
            Ok(GroupResponse::Appended {
                base_offset,
                last_offset,
            }) => Ok((base_offset, last_offset, false)),
            Ok(other) => Err(internal("append", other)),
            Err(RaftError::APIError(
                ClientWriteError::ForwardToLeader(_) | ClientWriteError::LogEntryDiscarded(_),
            )) => {
                // Leadership moved while the batch was in flight: whether it commits is
                // unknown, and the caller retries (an idempotent producer's retry is
                // recognised; any other may be written twice).
                Err(self.moved(
                    &req.topic,
                    req.partition,
                    "leadership changed while appending",
                ))
            }
            Err(e) => Err(BrokerError::new(
                ErrorCode::LeaderNotAvailable,
                format!("append failed ({e}); retry"),
            )),
        }
    }

    /// Reads committed batches from the partition leader (see the module doc).
    pub async fn fetch(&self, req: FetchRequest) -> BrokerResult<Fetched> {
        let replica = self.leader_replica(&req.topic, req.partition)?;
        let log_start = log_start(&replica)?;
        let mut watch = replica.sm.watch();
        let mut hw = watch.borrow_and_update().high_watermark;
        // A new leader's high watermark may trail the old leader's until its first entry
        // commits: an offset inside its log is waited for, not refused.
        let log_end = replica.log.next_offset();
        if req.offset < log_start || req.offset > hw.max(log_end) {
            return Err(BrokerError::new(
                ErrorCode::OffsetOutOfRange,
                format!(
                    "offset {} is outside {log_start}..={hw} of {}/{}",
                    req.offset, req.topic, req.partition
                ),
            ));
        }
        if req.offset >= hw && !req.max_wait.is_zero() {
            let wait = req.max_wait.min(MAX_WAIT);
            let _ = tokio::time::timeout(wait, async {
                while watch.changed().await.is_ok() {
                    if watch.borrow_and_update().high_watermark > req.offset {
                        break;
                    }
                }
            })
            .await;
            hw = replica.sm.applied().high_watermark;
        }
        let max_bytes = req.max_bytes.clamp(1, MAX_FETCH_BYTES);
        let mut out = BytesMut::new();
        if req.offset < hw {
            let entries = match replica.log.read_offsets(req.offset, max_bytes) {
                Ok(entries) => entries,
                // Retention purged it meanwhile.
                Err(e @ aqueduct_storage::LogError::OffsetOutOfRange { .. }) => {
                    return Err(BrokerError::new(ErrorCode::OffsetOutOfRange, e.to_string()));
                }
                Err(e) => return Err(internal("read log", e)),
            };
            for e in entries {
                if e.base_offset >= hw {
                    break;
                }
                if e.entry.kind == aqueduct_storage::EntryKind::Data {
                    out.extend_from_slice(&e.entry.payload);
                }
            }
        }
        Ok(Fetched {
            batches: out.freeze(),
            high_watermark: hw,
            last_stable_offset: hw,
            log_start_offset: log_start,
        })
    }

    /// On the partition leader: the end of its log once everything in it is committed (a
    /// new leader's log may end in records of the old leader's term, committed with its own
    /// first entry). For leader-side state rebuilt from the partition: nothing acknowledged
    /// lies beyond it. Waits up to `within`.
    pub async fn settled_end(
        &self,
        topic: &str,
        partition: u32,
        within: Duration,
    ) -> BrokerResult<u64> {
        let replica = self.leader_replica(topic, partition)?;
        let mut watch = replica.sm.watch();
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let end = replica.log.next_offset();
            if watch.borrow_and_update().high_watermark >= end {
                return Ok(end);
            }
            match tokio::time::timeout_at(deadline, watch.changed()).await {
                Ok(Ok(())) => {}
                _ => {
                    return Err(BrokerError::new(
                        ErrorCode::LeaderNotAvailable,
                        format!(
                            "{topic}/{partition}: the new leader's log is not committed yet; retry"
                        ),
                    ));
                }
            }
        }
    }

    /// The first offset whose record timestamp is at or after `ms`, below the high watermark;
    /// `None` when there is none.
    pub fn offset_for_timestamp(
        &self,
        topic: &str,
        partition: u32,
        ms: i64,
    ) -> BrokerResult<Option<u64>> {
        let replica = self.leader_replica(topic, partition)?;
        let hw = replica.sm.applied().high_watermark;
        let start = log_start(&replica)?;
        Ok(replica
            .log
            .offset_for_timestamp(ms)
            .map_err(|e| internal("read time index", e))?
            .map(|o| o.max(start))
            .filter(|o| *o < hw))
    }

    /// The leader's Raft term (Kafka's leader epoch) of a partition led here, else -1.
    pub fn leader_epoch(&self, topic: &str, partition: u32) -> i32 {
        self.leader_replica(topic, partition)
            .map(|r| {
                let m = r.raft.metrics();
                let term = openraft::async_runtime::WatchReceiver::borrow_watched(&m).current_term;
                i32::try_from(term).unwrap_or(i32::MAX)
            })
            .unwrap_or(-1)
    }

    /// An offset of the partition, looked up on its leader.
    pub fn list_offsets(&self, topic: &str, partition: u32, spec: OffsetSpec) -> BrokerResult<u64> {
        let replica = self.leader_replica(topic, partition)?;
        let hw = replica.sm.applied().high_watermark;
        let start = log_start(&replica)?;
        Ok(match spec {
            OffsetSpec::Earliest => start,
            OffsetSpec::Latest => hw,
            OffsetSpec::Timestamp(ms) => replica
                .log
                .offset_for_timestamp(ms)
                .map_err(|e| internal("read time index", e))?
                .map_or(hw, |o| o.max(start).min(hw)),
        })
    }

    /// Deletes the records of a partition below `before` (the high watermark when `None`) on
    /// its leader; answers the new log start offset once a quorum applied it. Refused on a
    /// topic whose cleanup policy does not delete (compacted only), as Kafka does, and for an
    /// offset past the high watermark.
    pub async fn delete_records(
        &self,
        topic: &str,
        partition: u32,
        before: Option<u64>,
    ) -> BrokerResult<u64> {
        let replica = self.leader_replica(topic, partition)?;
        let info = self
            .partitions
            .metadata()
            .topic(topic)
            .map_err(|e| internal("read topic", e))?
            .ok_or_else(|| BrokerError::unknown_topic(topic))?;
        if !super::config::TopicConfig::from_stored(&info.configs)
            .cleanup()
            .delete
        {
            return Err(BrokerError::new(
                ErrorCode::PolicyViolation,
                format!(
                    "records of {topic}/{partition} cannot be deleted: its cleanup.policy does not include delete"
                ),
            ));
        }
        let hw = replica.sm.applied().high_watermark;
        let before = before.unwrap_or(hw);
        if before > hw {
            return Err(BrokerError::new(
                ErrorCode::OffsetOutOfRange,
                format!("offset {before} is past the high watermark {hw} of {topic}/{partition}"),
            ));
        }
        match replica
            .raft
            .client_write(GroupCommand::DeleteRecords { before })
            .await
            .map(|r| r.response().clone())
        {
            Ok(GroupResponse::LogStart(_)) => log_start(&replica),
            Ok(other) => Err(internal("delete records", other)),
            Err(RaftError::APIError(
                ClientWriteError::ForwardToLeader(_) | ClientWriteError::LogEntryDiscarded(_),
            )) => Err(self.moved(
                topic,
                partition,
                "leadership changed while deleting records",
            )),
            Err(e) => Err(BrokerError::new(
                ErrorCode::LeaderNotAvailable,
                format!("deleting records failed ({e}); retry"),
            )),
        }
    }
}

/// A replica's log start offset: the first record its log still holds, or the offset records
/// were deleted before, whichever is later.
fn log_start(replica: &Replica) -> BrokerResult<u64> {
    let stored = replica
        .log
        .start_offset()
        .map_err(|e| internal("read log start", e))?;
    Ok(stored.max(replica.sm.applied().deleted_before))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_are_checked_before_raft() {
        use crate::broker::records::{ProducerRecord, encode_batch};
        let code = |b: &[u8]| batch_problem(b).map(|e| e.code);
        let good = encode_batch(
            &[
                ProducerRecord::value("v1").with_key("k"),
                ProducerRecord::value("v2"),
            ],
            None,
        )
        .unwrap_or_default()
        .to_vec();
        assert!(batch_problem(&good).is_none(), "{:?}", batch_problem(&good));
        // Opaque bytes after the header are not records (`build` fills in a valid CRC).
        let opaque = batch::build(3, 1000, b"abc");
        assert_eq!(code(&opaque), Some(ErrorCode::CorruptMessage));
        let mut bad = good.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert_eq!(code(&bad), Some(ErrorCode::CorruptMessage));
        assert_eq!(code(b"short"), Some(ErrorCode::CorruptMessage));
        // An old message format (magic 1) is refused as such.
        let mut old = good.clone();
        old[16] = 1;
        assert_eq!(code(&old), Some(ErrorCode::UnsupportedForMessageFormat));
        // A record whose offset delta leaves its place (1 → 2) is refused.
        let first_len = usize::from(good[61] >> 1);
        let second = 61 + 1 + first_len;
        assert_eq!(good[second + 3], 2, "zigzag(1) expected");
        let mut skewed = good.clone();
        skewed[second + 3] = 4;
        let crc = crc32c::crc32c(&skewed[21..]);
        skewed[17..21].copy_from_slice(&crc.to_be_bytes());
        assert_eq!(code(&skewed), Some(ErrorCode::CorruptMessage));
        let huge = vec![0u8; MAX_BATCH_BYTES + 1];
        assert_eq!(code(&huge), Some(ErrorCode::RecordBatchTooLarge));
    }
}
