//! The routed producer: writes accepted on any node, forwarded to the partition leader.
//!
//! Fronts that take writes wherever a client happens to be connected (MQTT devices, the
//! gateway's topic backends, data tasks, rules; later issues) cannot send their clients to
//! the leader as Kafka does. [`RoutedProducer::send`] appends a batch to the local replica
//! when it leads the partition, and otherwise forwards it to the leader's data service over
//! the node-to-node gRPC connection, following redirects and retrying while leadership moves.
//!
//! It is idempotent: each producer has an id from the metadata leader and numbers its
//! batches per partition, so a batch retried after a lost answer or a leader change is
//! written once (the partition leader's sequence gate recognises it). One batch per
//! partition is in flight at a time, which keeps the sequence simple; callers that need more
//! throughput batch more records per call.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use aqueduct_protocol::data as dpb;
use aqueduct_protocol::data::data_client::DataClient;
use aqueduct_raft::network::call_within;
use tokio::sync::Mutex;
use tokio::time::Instant;

use super::Broker;
use super::data::{Acks, FetchRequest, Fetched, OffsetSpec, ProduceRequest, Produced};
use super::error::{BrokerError, BrokerResult, ErrorCode, Redirect};
use super::forward::from_status;
use super::records::{
    ConsumerRecord, ProducerRecord, Sequence, decode_batches, encode_batch, partition_for_key,
};

/// Longest a send keeps retrying (leader elections take about a second).
pub const SEND_TIMEOUT: Duration = Duration::from_secs(15);

/// Where a record goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Partitioning {
    /// This partition.
    Partition(u32),
    /// The partition murmur2 of the key picks (as the Java client and the native client).
    ByKey,
}

impl Broker {
    /// A channel to the node that leads the partition (for a request this node cannot
    /// answer itself).
    pub fn leader_channel(
        &self,
        topic: &str,
        partition: u32,
    ) -> BrokerResult<tonic::transport::Channel> {
        let addr = self.leader_address(topic, partition).ok_or_else(|| {
            BrokerError::new(
                ErrorCode::LeaderNotAvailable,
                format!("{topic}/{partition} has no known leader"),
            )
        })?;
        self.channels().get(&addr).map_err(|e| {
            BrokerError::new(
                ErrorCode::LeaderNotAvailable,
                format!("cannot reach the leader at {addr}: {e}"),
            )
        })
    }

    /// The committed records of a partition from offset `from` (up to about 1 MiB; waiting
    /// up to `max_wait` for one when there is none yet), read on its leader wherever it is.
    pub async fn read_routed(
        &self,
        topic: &str,
        partition: u32,
        from: u64,
        max_wait: Duration,
    ) -> BrokerResult<Vec<ConsumerRecord>> {
        let fetched = self
            .fetch_routed(FetchRequest {
                topic: topic.to_string(),
                partition,
                offset: from,
                max_bytes: 1 << 20,
                max_wait,
            })
            .await?;
        decode_batches(fetched.batches, topic, partition, from)
            .map_err(|e| BrokerError::internal(&format!("read {topic}/{partition}"), e))
    }

    /// Reads committed batches from the partition's leader, here or over its data service:
    /// for projections that read a topic from whichever node they run on.
    pub async fn fetch_routed(&self, req: FetchRequest) -> BrokerResult<Fetched> {
        if self.leads(&req.topic, req.partition) {
            return self.fetch(req).await;
        }
        let channel = self.leader_channel(&req.topic, req.partition)?;
        let request = dpb::FetchRequest {
            topic: req.topic.clone(),
            partition: req.partition,
            offset: req.offset,
            max_bytes: u32::try_from(req.max_bytes).unwrap_or(u32::MAX),
            max_wait_ms: u32::try_from(req.max_wait.as_millis()).unwrap_or(u32::MAX),
        };
        let reply = call_within(
            req.max_wait + Duration::from_secs(10),
            request,
            |r| async move { DataClient::new(channel).fetch(r).await },
        )
        .await
        .map_err(|s| from_status(&s))?;
        Ok(Fetched {
            batches: reply.batches.into(),
            high_watermark: reply.high_watermark,
            last_stable_offset: reply.high_watermark,
            log_start_offset: reply.log_start_offset,
        })
    }

    /// [`Broker::list_offsets`] asked of the partition's leader, here or over its data
    /// service.
    pub async fn list_offsets_routed(
        &self,
        topic: &str,
        partition: u32,
        spec: OffsetSpec,
    ) -> BrokerResult<u64> {
        if self.leads(topic, partition) {
            return self.list_offsets(topic, partition, spec);
        }
        let channel = self.leader_channel(topic, partition)?;
        let (spec, timestamp_ms) = match spec {
            OffsetSpec::Earliest => (dpb::OffsetSpec::Earliest, 0),
            OffsetSpec::Latest => (dpb::OffsetSpec::Latest, 0),
            OffsetSpec::Timestamp(ms) => (dpb::OffsetSpec::Timestamp, ms),
        };
        let request = dpb::ListOffsetsRequest {
            topic: topic.to_string(),
            partition,
            spec: spec as i32,
            timestamp_ms,
        };
        let reply = call_within(Duration::from_secs(10), request, |r| async move {
            DataClient::new(channel).list_offsets(r).await
        })
        .await
        .map_err(|s| from_status(&s))?;
        Ok(reply.offset)
    }
}

/// An idempotent producer usable on any node (cheap to clone: clones share the producer id
/// and sequences).
#[derive(Debug, Clone)]
pub struct RoutedProducer {
    broker: Broker,
    id: Arc<Mutex<Option<(i64, i16)>>>,
    /// The next sequence per partition, each behind its own lock (one batch in flight).
    sequences: Arc<std::sync::Mutex<Sequences>>,
}

/// The next sequence of each (topic, partition), each behind its own lock.
type Sequences = HashMap<(String, u32), Arc<Mutex<i32>>>;

impl RoutedProducer {
    pub fn new(broker: Broker) -> Self {
        Self {
            broker,
            id: Arc::default(),
            sequences: Arc::default(),
        }
    }

    /// This producer's id and epoch, asked of the metadata leader once.
    async fn producer_id(&self, deadline: Instant) -> BrokerResult<(i64, i16)> {
        let mut id = self.id.lock().await;
        if let Some(id) = *id {
            return Ok(id);
        }
        let within = deadline.saturating_duration_since(Instant::now());
        let got = (self.broker.init_producer_id(within).await?, 0);
        *id = Some(got);
        Ok(got)
    }

    /// Has the producer id allocated now (if it has none yet), waiting up to `within`, so
    /// a later send does not wait on the metadata group: a partition that has its quorum
    /// can then be written even while the metadata group has none.
    pub async fn ready(&self, within: Duration) -> BrokerResult<()> {
        self.producer_id(Instant::now() + within).await.map(|_| ())
    }

    fn sequence(&self, topic: &str, partition: u32) -> Arc<Mutex<i32>> {
        let mut all = self.sequences.lock().unwrap_or_else(|p| p.into_inner());
        Arc::clone(
            all.entry((topic.to_string(), partition))
                .or_insert_with(|| Arc::new(Mutex::new(0))),
        )
    }

    /// Appends `records` as one batch (all to the same partition) with `acks=all`, on
    /// whichever node leads the partition; resolves once a quorum has it.
    pub async fn send(
        &self,
        topic: &str,
        partitioning: Partitioning,
        records: Vec<ProducerRecord>,
    ) -> BrokerResult<(u32, Produced)> {
        let deadline = Instant::now() + SEND_TIMEOUT;
        if records.is_empty() {
            return Err(BrokerError::new(
                ErrorCode::InvalidRequest,
                "no records to send",
            ));
        }
        let info = self.broker.topics().ensure(topic).await?;
        let partition = match partitioning {
            Partitioning::Partition(p) if p < info.record.partitions => p,
            Partitioning::Partition(p) => {
                return Err(BrokerError::new(
                    ErrorCode::UnknownTopicOrPartition,
                    format!("topic {topic} has no partition {p}"),
                ));
            }
            Partitioning::ByKey => match &records[0].key {
                Some(k) => partition_for_key(k, info.record.partitions),
                None => rand::random_range(0..info.record.partitions.max(1)),
            },
        };
        let (producer_id, epoch) = self.producer_id(deadline).await?;
        let sequence = self.sequence(topic, partition);
        let mut next = sequence.lock().await;
        let batch = encode_batch(
            &records,
            Some(Sequence {
                producer_id,
                epoch,
                first_seq: *next,
            }),
        )
        .map_err(|e| BrokerError::new(ErrorCode::CorruptMessage, e.to_string()))?;
        let req = ProduceRequest {
            topic: topic.to_string(),
            partition,
            batch,
            acks: Acks::All,
        };
        let mut redirect: Option<String> = None;
        loop {
            let attempt = match redirect.take() {
                None if self.broker.leads(topic, partition) => {
                    self.broker.produce(req.clone()).await
                }
                given => {
                    let addr = given.or_else(|| self.broker.leader_address(topic, partition));
                    match addr {
                        Some(addr) => self.forward(&addr, &req).await,
                        None => Err(BrokerError::new(
                            ErrorCode::LeaderNotAvailable,
                            format!("{topic}/{partition} has no known leader"),
                        )),
                    }
                }
            };
            match attempt {
                Ok(produced) => {
                    *next = next.wrapping_add(records.len() as i32);
                    return Ok((partition, produced));
                }
                Err(e) if e.code.retriable() && Instant::now() < deadline => {
                    if let Redirect::Leader { addr, .. } = &e.redirect {
                        redirect = Some(addr.clone());
                    } else {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
                Err(e) => {
                    // The outcome may be unknown: the next batch must not reuse the sequence
                    // numbers of one that may have been written, so start a new producer.
                    *self.id.lock().await = None;
                    self.sequences
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .clear();
                    return Err(e);
                }
            }
        }
    }

    /// One produce on another node's data service.
    async fn forward(&self, addr: &str, req: &ProduceRequest) -> BrokerResult<Produced> {
        let channel = self.broker.channels().get(addr).map_err(|e| {
            BrokerError::new(
                ErrorCode::LeaderNotAvailable,
                format!("cannot reach the leader at {addr}: {e}"),
            )
        })?;
        let request = dpb::ProduceRequest {
            topic: req.topic.clone(),
            partition: req.partition,
            batch: req.batch.to_vec(),
            acks: dpb::Acks::All as i32,
        };
        let reply = call_within(Duration::from_secs(10), request, |r| async move {
            DataClient::new(channel).produce(r).await
        })
        .await
        .map_err(|s| from_status(&s))?;
        Ok(Produced {
            base_offset: reply.base_offset,
            last_offset: reply.last_offset,
            duplicate: reply.duplicate,
            log_start_offset: 0,
        })
    }
}
