//! The data service (`aqueduct.data.v1.Data`, see `protocol/proto/aqueduct/data.proto`):
//! produce, fetch and list offsets, served by partition leaders.
//!
//! Produce checks the batch (RecordBatch v2 structure, CRC-32C, size limit) before it reaches
//! Raft, so a bad batch is refused and never becomes a log entry; `acks=all` answers once the
//! batch is committed and applied here (a quorum has it on disk), `acks=leader` once the
//! leader's own log has it durable. Fetch returns whole stored batches from the requested
//! offset, never at or past the high watermark, and waits (long poll) when there is nothing
//! new yet. Refusals carry a stable `aq-error` code ([`DataErrorCode`]).

use std::time::Duration;

use aqueduct_protocol::data as pb;
use aqueduct_protocol::data::data_server::{Data, DataServer};
use aqueduct_raft::types::{GroupCommand, GroupResponse};
use aqueduct_storage::batch;
use bytes::{Bytes, BytesMut};
use openraft::error::{ClientWriteError, RaftError};
use tonic::metadata::MetadataValue;
use tonic::{Code, Request, Response, Status};

use crate::idempotence::{self, Admitted, GateError};
use crate::partitions::{Partitions, Replica};

/// Largest record batch a producer may send (DESIGN.md §5b default).
pub const MAX_BATCH_BYTES: usize = 1 << 20;
/// Largest request the data service decodes at all.
const MAX_REQUEST_BYTES: usize = 16 << 20;
/// Largest fetch reply.
const MAX_FETCH_BYTES: usize = 8 << 20;
/// Longest wait for an `acks=leader` batch to reach the local log.
const LOCAL_APPEND_WAIT: Duration = Duration::from_secs(10);
/// Longest long poll.
const MAX_WAIT: Duration = Duration::from_secs(30);

/// Stable error codes of the data service (`aq-error` trailer; numbers never reused).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum DataErrorCode {
    /// This replica is not the partition leader; `aq-leader` names it.
    NotLeader = 1,
    /// No leader is known yet (election under way, group starting): retry shortly.
    LeaderNotAvailable = 2,
    /// This node holds no replica; `aq-replicas` lists the replicas' addresses.
    NotReplica = 3,
    UnknownTopicOrPartition = 4,
    /// The batch is not a well-formed RecordBatch v2 or fails its CRC.
    CorruptMessage = 5,
    RecordBatchTooLarge = 6,
    /// The offset is below the log start or above the high watermark.
    OffsetOutOfRange = 7,
    /// Storage or Raft failure; the message says what.
    Internal = 8,
    /// An idempotent batch that is not its producer's next one (a gap in the sequence).
    OutOfOrderSequenceNumber = 9,
    /// An idempotent batch from an epoch older than its producer's current one.
    InvalidProducerEpoch = 10,
}

impl DataErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            DataErrorCode::NotLeader => "NOT_LEADER",
            DataErrorCode::LeaderNotAvailable => "LEADER_NOT_AVAILABLE",
            DataErrorCode::NotReplica => "NOT_REPLICA",
            DataErrorCode::UnknownTopicOrPartition => "UNKNOWN_TOPIC_OR_PARTITION",
            DataErrorCode::CorruptMessage => "CORRUPT_MESSAGE",
            DataErrorCode::RecordBatchTooLarge => "RECORD_BATCH_TOO_LARGE",
            DataErrorCode::OffsetOutOfRange => "OFFSET_OUT_OF_RANGE",
            DataErrorCode::Internal => "INTERNAL",
            DataErrorCode::OutOfOrderSequenceNumber => "OUT_OF_ORDER_SEQUENCE_NUMBER",
            DataErrorCode::InvalidProducerEpoch => "INVALID_PRODUCER_EPOCH",
        }
    }

    fn grpc(self) -> Code {
        match self {
            DataErrorCode::NotLeader | DataErrorCode::NotReplica => Code::FailedPrecondition,
            DataErrorCode::LeaderNotAvailable => Code::Unavailable,
            DataErrorCode::UnknownTopicOrPartition => Code::NotFound,
            DataErrorCode::CorruptMessage | DataErrorCode::RecordBatchTooLarge => {
                Code::InvalidArgument
            }
            DataErrorCode::OffsetOutOfRange => Code::OutOfRange,
            DataErrorCode::OutOfOrderSequenceNumber | DataErrorCode::InvalidProducerEpoch => {
                Code::FailedPrecondition
            }
            DataErrorCode::Internal => Code::Internal,
        }
    }
}

fn refuse(code: DataErrorCode, message: impl Into<String>) -> Status {
    let mut status = Status::new(code.grpc(), message.into());
    status
        .metadata_mut()
        .insert("aq-error", MetadataValue::from_static(code.as_str()));
    status
}

fn internal(what: &str, e: impl std::fmt::Display) -> Status {
    refuse(DataErrorCode::Internal, format!("{what}: {e}"))
}

/// Why `b` is not a batch a producer may send, or `None`: RecordBatch v2 structure, the
/// CRC-32C over attributes..end, and the size limit.
pub fn batch_problem(b: &[u8]) -> Option<(DataErrorCode, String)> {
    if b.len() > MAX_BATCH_BYTES {
        return Some((
            DataErrorCode::RecordBatchTooLarge,
            format!(
                "record batch of {} bytes exceeds the {MAX_BATCH_BYTES}-byte limit",
                b.len()
            ),
        ));
    }
    if let Err(why) = batch::inspect(b) {
        return Some((
            DataErrorCode::CorruptMessage,
            format!("record batch: {why}"),
        ));
    }
    let stated = u32::from_be_bytes([b[17], b[18], b[19], b[20]]);
    let actual = crc32c::crc32c(&b[21..]);
    if stated != actual {
        return Some((
            DataErrorCode::CorruptMessage,
            format!("record batch CRC mismatch (stated {stated:08x}, computed {actual:08x})"),
        ));
    }
    records_problem(b).map(|why| {
        (
            DataErrorCode::CorruptMessage,
            format!("record batch: {why}"),
        )
    })
}

/// Checks what a producer's batch may contain: no control or transactional batches (not
/// supported yet), `recordCount == lastOffsetDelta + 1`, and, when uncompressed, records that
/// exactly fill the batch (each a zigzag-varint length and that many bytes) with offset deltas
/// 0, 1, 2, ….
fn records_problem(b: &[u8]) -> Option<&'static str> {
    let attributes = i16::from_be_bytes([b[21], b[22]]);
    if attributes & 0x30 != 0 {
        return Some("transactional and control batches are not supported");
    }
    let last_delta = i32::from_be_bytes([b[23], b[24], b[25], b[26]]);
    let count = i32::from_be_bytes([b[57], b[58], b[59], b[60]]);
    if count < 1 || i64::from(count) != i64::from(last_delta) + 1 {
        return Some("recordCount must be lastOffsetDelta + 1 and at least 1");
    }
    if attributes & 0x07 != 0 {
        // Compressed: the records are checked by whoever decompresses them.
        return None;
    }
    // Each record a length and that many bytes, filling the batch exactly, with offset
    // deltas 0, 1, 2, … (the storage crate's record walk).
    let Some(records) = aqueduct_storage::compact::records(b) else {
        return Some("the records do not fill the batch exactly");
    };
    let base = u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
    if records.len() != count as usize
        || records
            .iter()
            .enumerate()
            .any(|(i, r)| r.offset != base.wrapping_add(i as u64))
    {
        return Some("record offset deltas must be 0, 1, 2, … in order");
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

/// The data service of one node.
#[derive(Debug, Clone)]
pub struct DataService {
    partitions: Partitions,
}

impl DataService {
    pub fn new(partitions: Partitions) -> Self {
        Self { partitions }
    }

    pub fn into_server(self) -> DataServer<Self> {
        // Larger than a batch may be, so that an oversized batch reaches `produce` and gets
        // its typed refusal; still bounded, so nothing unbounded is allocated.
        DataServer::new(self).max_decoding_message_size(MAX_REQUEST_BYTES)
    }

    /// The local replica when it leads the partition; otherwise the refusal that sends the
    /// client to the leader (or to the replicas).
    pub(crate) fn leader_replica(
        &self,
        topic: &str,
        partition: u32,
    ) -> Result<std::sync::Arc<Replica>, Status> {
        let Some(replica) = self.partitions.get(topic, partition) else {
            return Err(self.not_here(topic, partition));
        };
        match replica.leader() {
            Some((id, _)) if id == replica.raft_id() => Ok(replica),
            Some((id, addr)) => {
                let mut status = refuse(
                    DataErrorCode::NotLeader,
                    format!("not the leader of {topic}/{partition}; node {id} at {addr} is"),
                );
                if let Ok(v) = addr.parse() {
                    status.metadata_mut().insert("aq-leader", v);
                }
                Err(status)
            }
            None => Err(refuse(
                DataErrorCode::LeaderNotAvailable,
                format!("{topic}/{partition} has no leader right now; retry shortly"),
            )),
        }
    }

    /// The refusal of a write whose outcome is unknown because leadership moved: sends the
    /// client to the new leader, or asks it to retry.
    fn moved(&self, req: &pb::ProduceRequest, why: &str) -> Status {
        match self.leader_replica(&req.topic, req.partition) {
            Err(status) => status,
            Ok(_) => refuse(DataErrorCode::LeaderNotAvailable, format!("{why}; retry")),
        }
    }

    /// The refusal of an idempotent batch the gate did not admit.
    fn gate_refusal(&self, req: &pb::ProduceRequest, e: GateError) -> Status {
        match e {
            GateError::NotLeader => self.moved(req, "not the leader"),
            GateError::NotReady | GateError::Raft(_) => {
                refuse(DataErrorCode::LeaderNotAvailable, e.to_string())
            }
            GateError::OutOfOrder { .. } => {
                refuse(DataErrorCode::OutOfOrderSequenceNumber, e.to_string())
            }
            GateError::Fenced { .. } => refuse(DataErrorCode::InvalidProducerEpoch, e.to_string()),
        }
    }

    /// Waits for an `acks=leader` batch to be durable in this node's log.
    async fn wait_local(
        &self,
        replica: &Replica,
        req: &pb::ProduceRequest,
        local: tokio::sync::oneshot::Receiver<aqueduct_raft::log_store::LocalAppend>,
    ) -> Result<Response<pb::ProduceReply>, Status> {
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
            Some(Ok((base_offset, last_offset))) => Ok(Response::new(pb::ProduceReply {
                base_offset,
                last_offset,
                duplicate: false,
            })),
            Some(Err(e)) => Err(internal("append", e)),
            None => Err(self.moved(req, "leadership changed before the batch reached the log")),
        }
    }

    /// The refusal of a node without a replica: the replicas' addresses, or unknown.
    fn not_here(&self, topic: &str, partition: u32) -> Status {
        let meta = self.partitions.metadata();
        let replicas = meta.replicas(topic, partition).ok().flatten();
        let Some(replicas) = replicas else {
            return refuse(
                DataErrorCode::UnknownTopicOrPartition,
                format!("no partition {partition} of topic {topic:?}"),
            );
        };
        if replicas.contains(&self.partitions.node_id()) {
            // Assigned here but not started yet (the topic was just created).
            return refuse(
                DataErrorCode::LeaderNotAvailable,
                format!("the replica of {topic}/{partition} on this node is starting; retry"),
            );
        }
        let addrs: Vec<String> = replicas
            .iter()
            .filter_map(|id| meta.node(*id).ok().flatten().map(|n| n.addr))
            .collect();
        let mut status = refuse(
            DataErrorCode::NotReplica,
            format!(
                "this node holds no replica of {topic}/{partition}; its replicas are at {}",
                addrs.join(",")
            ),
        );
        if let Ok(v) = addrs.join(",").parse() {
            status.metadata_mut().insert("aq-replicas", v);
        }
        status
    }

    /// Produce without the injected reply faults.
    async fn produce_batch(
        &self,
        mut req: pb::ProduceRequest,
    ) -> Result<Response<pb::ProduceReply>, Status> {
        if let Some((code, why)) = batch_problem(&req.batch) {
            return Err(refuse(code, why));
        }
        let replica = self.leader_replica(&req.topic, req.partition)?;
        let acks = pb::Acks::try_from(req.acks).unwrap_or(pb::Acks::All);
        let producer = batch::producer(&req.batch);
        let batch = Bytes::from(std::mem::take(&mut req.batch));
        // The registration is withdrawn however this ends (also when the client goes away
        // and this future is dropped).
        let local = (acks == pb::Acks::Leader).then(|| {
            (
                replica.log_store_appended(&batch),
                AppendWaitGuard {
                    replica: &replica,
                    batch: &batch,
                },
            )
        });
        let reply = |(base_offset, last_offset): (u64, u64), duplicate: bool| {
            Response::new(pb::ProduceReply {
                base_offset,
                last_offset,
                duplicate,
            })
        };
        if let Some(info) = producer {
            let proposed = match replica.admit_idempotent(batch.clone(), info).await {
                Ok(Admitted::Proposed(rx)) => rx,
                Ok(Admitted::Duplicate {
                    base_offset,
                    last_offset,
                }) => return Ok(reply((base_offset, last_offset), true)),
                Ok(Admitted::InFlight(rx)) => {
                    return match idempotence::outcome(rx).await {
                        Ok(offsets) => Ok(reply(offsets, true)),
                        Err(why) => Err(self.moved(&req, &why)),
                    };
                }
                Err(e) => return Err(self.gate_refusal(&req, e)),
            };
            return match local {
                Some((local, _guard)) => self.wait_local(&replica, &req, local).await,
                None => match idempotence::outcome(proposed).await {
                    Ok(offsets) => Ok(reply(offsets, false)),
                    Err(why) => Err(self.moved(&req, &why)),
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
            return self.wait_local(&replica, &req, local).await;
        }
        match replica
            .raft
            .client_write(GroupCommand::Records(batch.clone()))
            .await
            .map(|r| r.response().clone())
        {
            Ok(GroupResponse::Appended {
                base_offset,
                last_offset,
            }) => Ok(reply((base_offset, last_offset), false)),
            Ok(other) => Err(internal("append", other)),
            Err(RaftError::APIError(
                ClientWriteError::ForwardToLeader(_) | ClientWriteError::LogEntryDiscarded(_),
            )) => {
                // Leadership moved while the batch was in flight: whether it commits is
                // unknown, and the client retries (an idempotent producer's retry is
                // recognised; any other may be written twice).
                Err(self.moved(&req, "leadership changed while appending"))
            }
            Err(e) => Err(refuse(
                DataErrorCode::LeaderNotAvailable,
                format!("append failed ({e}); retry"),
            )),
        }
    }
}

#[tonic::async_trait]
impl Data for DataService {
    async fn produce(
        &self,
        request: Request<pb::ProduceRequest>,
    ) -> Result<Response<pb::ProduceReply>, Status> {
        let reply = self.produce_batch(request.into_inner()).await?;
        if crate::faults::Faults::drop_reply() {
            tracing::warn!("injected fault: dropping an acknowledged produce reply");
            return Err(Status::unavailable("injected fault: reply dropped"));
        }
        Ok(reply)
    }

    async fn fetch(
        &self,
        request: Request<pb::FetchRequest>,
    ) -> Result<Response<pb::FetchReply>, Status> {
        let req = request.into_inner();
        let replica = self.leader_replica(&req.topic, req.partition)?;
        let log_start = replica
            .log
            .start_offset()
            .map_err(|e| internal("read log start", e))?;
        let mut watch = replica.sm.watch();
        let mut hw = watch.borrow_and_update().high_watermark;
        // A new leader's high watermark may trail the old leader's until its first entry
        // commits: an offset inside its log is waited for, not refused.
        let log_end = replica.log.next_offset();
        if req.offset < log_start || req.offset > hw.max(log_end) {
            return Err(refuse(
                DataErrorCode::OffsetOutOfRange,
                format!(
                    "offset {} is outside {log_start}..={hw} of {}/{}",
                    req.offset, req.topic, req.partition
                ),
            ));
        }
        if req.offset >= hw && req.max_wait_ms > 0 {
            let wait = Duration::from_millis(u64::from(req.max_wait_ms)).min(MAX_WAIT);
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
        let max_bytes = (req.max_bytes as usize).clamp(1, MAX_FETCH_BYTES);
        let mut out = BytesMut::new();
        if req.offset < hw {
            let entries = match replica.log.read_offsets(req.offset, max_bytes) {
                Ok(entries) => entries,
                // Retention purged it meanwhile.
                Err(e @ aqueduct_storage::LogError::OffsetOutOfRange { .. }) => {
                    return Err(refuse(DataErrorCode::OffsetOutOfRange, e.to_string()));
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
        Ok(Response::new(pb::FetchReply {
            batches: out.to_vec(),
            high_watermark: hw,
            log_start_offset: log_start,
        }))
    }

    async fn list_offsets(
        &self,
        request: Request<pb::ListOffsetsRequest>,
    ) -> Result<Response<pb::ListOffsetsReply>, Status> {
        let req = request.into_inner();
        let replica = self.leader_replica(&req.topic, req.partition)?;
        let hw = replica.sm.applied().high_watermark;
        let offset = match pb::OffsetSpec::try_from(req.spec).unwrap_or(pb::OffsetSpec::Latest) {
            pb::OffsetSpec::Earliest => replica
                .log
                .start_offset()
                .map_err(|e| internal("read log start", e))?,
            pb::OffsetSpec::Latest => hw,
            pb::OffsetSpec::Timestamp => replica
                .log
                .offset_for_timestamp(req.timestamp_ms)
                .map_err(|e| internal("read time index", e))?
                .map_or(hw, |o| o.min(hw)),
        };
        Ok(Response::new(pb::ListOffsetsReply { offset }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_are_checked_before_raft() {
        use crate::client::records::{ProducerRecord, encode_batch};
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
        assert_eq!(
            batch_problem(&opaque).map(|p| p.0),
            Some(DataErrorCode::CorruptMessage)
        );
        let mut bad = good.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert_eq!(
            batch_problem(&bad).map(|p| p.0),
            Some(DataErrorCode::CorruptMessage)
        );
        assert_eq!(
            batch_problem(b"short").map(|p| p.0),
            Some(DataErrorCode::CorruptMessage)
        );
        // A record whose offset delta leaves its place (1 → 2) is refused.
        let first_len = usize::from(good[61] >> 1);
        let second = 61 + 1 + first_len;
        assert_eq!(good[second + 3], 2, "zigzag(1) expected");
        let mut skewed = good.clone();
        skewed[second + 3] = 4;
        let crc = crc32c::crc32c(&skewed[21..]);
        skewed[17..21].copy_from_slice(&crc.to_be_bytes());
        assert_eq!(
            batch_problem(&skewed).map(|p| p.0),
            Some(DataErrorCode::CorruptMessage)
        );
        let huge = vec![0u8; MAX_BATCH_BYTES + 1];
        assert_eq!(
            batch_problem(&huge).map(|p| p.0),
            Some(DataErrorCode::RecordBatchTooLarge)
        );
    }
}
