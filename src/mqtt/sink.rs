//! The telemetry sink: records from every MQTT connection of this node, batched per
//! partition and appended through the broker's routed producer (`acks=all`), each caller
//! told when its record is committed by a quorum (the PUBACK waits for that).
//!
//! One worker per (topic, partition) sends one batch at a time (the routed producer keeps
//! one idempotent batch in flight per partition); whatever arrives while a batch is in flight
//! goes into the next one, so batches grow with the load without a linger delay.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use crate::broker::records::{ProducerRecord, partition_for_key};
use crate::broker::routed::{Partitioning, RoutedProducer};
use crate::broker::{Broker, BrokerError, BrokerResult};

/// Most records in one batch.
const MAX_BATCH_RECORDS: usize = 2048;
/// Most value bytes in one batch (below the 1 MiB batch limit with headroom for keys).
const MAX_BATCH_BYTES: usize = 768 << 10;

/// One worker's queue per (topic, partition).
type Workers = HashMap<(String, u32), mpsc::UnboundedSender<Item>>;

struct Item {
    record: ProducerRecord,
    done: oneshot::Sender<BrokerResult<u64>>,
}

/// A record on its way to a topic's dispatcher, which finds its partition.
struct Keyed {
    /// With its key (which picks the partition).
    record: ProducerRecord,
    done: oneshot::Sender<BrokerResult<u64>>,
}

/// A handle on the sink (cheap to clone).
#[derive(Clone)]
pub struct Sink {
    broker: Broker,
    producer: RoutedProducer,
    /// One dispatcher per topic: records enqueued in one order are appended in that order.
    topics: Arc<Mutex<HashMap<String, mpsc::UnboundedSender<Keyed>>>>,
    workers: Arc<Mutex<Workers>>,
    /// Partitions and replication of the telemetry topics this sink creates.
    shape: (u32, Option<u16>),
}

impl std::fmt::Debug for Sink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sink").field("shape", &self.shape).finish()
    }
}

/// Resolves with the record's offset once a quorum has it.
pub type Committed = oneshot::Receiver<BrokerResult<u64>>;

impl Sink {
    /// `partitions` and `replication_factor` (None: the cluster default) shape the system
    /// topics created on first use.
    pub fn new(broker: Broker, partitions: u32, replication_factor: Option<u16>) -> Self {
        Self {
            producer: RoutedProducer::new(broker.clone()),
            broker,
            topics: Arc::default(),
            workers: Arc::default(),
            shape: (partitions.max(1), replication_factor),
        }
    }

    /// Has the sink's producer id allocated (once per node), waiting up to `within`.
    pub async fn ready(&self, within: std::time::Duration) -> BrokerResult<()> {
        self.producer.ready(within).await
    }

    /// The broker the sink appends through.
    pub fn broker(&self) -> &Broker {
        &self.broker
    }

    /// Enqueues `value` keyed by `key` for `topic` (a system topic, created on first use),
    /// at once: what one caller enqueues is appended in that order. The receiver resolves
    /// with its offset once a quorum has it.
    pub fn enqueue(&self, topic: &str, key: &str, value: Bytes) -> Committed {
        self.enqueue_record(
            topic,
            ProducerRecord::value(value).with_key(Bytes::copy_from_slice(key.as_bytes())),
        )
    }

    /// [`Self::enqueue`] for a whole record (headers too); its key picks the partition.
    pub fn enqueue_record(&self, topic: &str, record: ProducerRecord) -> Committed {
        let (done, wait) = oneshot::channel();
        let item = Keyed { record, done };
        if let Err(mpsc::error::SendError(item)) = self.dispatcher(topic).send(item) {
            let _ = item.done.send(Err(BrokerError::internal(
                "telemetry sink",
                "the dispatcher stopped",
            )));
        }
        wait
    }

    fn dispatcher(&self, topic: &str) -> mpsc::UnboundedSender<Keyed> {
        let mut all = self.topics.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = all.get(topic)
            && !tx.is_closed()
        {
            return tx.clone();
        }
        let (tx, rx) = mpsc::unbounded_channel();
        all.insert(topic.to_string(), tx.clone());
        tokio::spawn(self.clone().dispatch(topic.to_string(), rx));
        tx
    }

    /// Sends each record of `topic` on to its partition's worker, in arrival order; the
    /// topic is created (or looked up) before the first one.
    async fn dispatch(self, topic: String, mut rx: mpsc::UnboundedReceiver<Keyed>) {
        let mut partitions: Option<u32> = None;
        while let Some(item) = rx.recv().await {
            let n = match partitions {
                Some(n) => n,
                None => match self
                    .broker
                    .topics()
                    .ensure_system(&topic, self.shape.0, self.shape.1)
                    .await
                {
                    Ok(info) => *partitions.insert(info.record.partitions),
                    Err(e) => {
                        let _ = item.done.send(Err(e));
                        continue;
                    }
                },
            };
            let partition = partition_for_key(item.record.key.as_deref().unwrap_or_default(), n);
            let work = Item {
                record: item.record,
                done: item.done,
            };
            if let Err(mpsc::error::SendError(work)) = self.worker(&topic, partition).send(work) {
                let _ = work.done.send(Err(BrokerError::internal(
                    "telemetry sink",
                    "the worker stopped",
                )));
            }
        }
    }

    fn worker(&self, topic: &str, partition: u32) -> mpsc::UnboundedSender<Item> {
        let mut all = self.workers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = all.get(&(topic.to_string(), partition))
            && !tx.is_closed()
        {
            return tx.clone();
        }
        let (tx, rx) = mpsc::unbounded_channel();
        all.insert((topic.to_string(), partition), tx.clone());
        tokio::spawn(run(self.producer.clone(), topic.to_string(), partition, rx));
        tx
    }
}

async fn run(
    producer: RoutedProducer,
    topic: String,
    partition: u32,
    mut rx: mpsc::UnboundedReceiver<Item>,
) {
    while let Some(first) = rx.recv().await {
        let mut bytes = first.record.size();
        let mut items = vec![first];
        while items.len() < MAX_BATCH_RECORDS && bytes < MAX_BATCH_BYTES {
            match rx.try_recv() {
                Ok(item) => {
                    bytes += item.record.size();
                    items.push(item);
                }
                Err(_) => break,
            }
        }
        let records = items.iter().map(|i| i.record.clone()).collect();
        let outcome = producer
            .send(&topic, Partitioning::Partition(partition), records)
            .await;
        match outcome {
            Ok((_, produced)) => {
                for (i, item) in items.into_iter().enumerate() {
                    let _ = item.done.send(Ok(produced.base_offset + i as u64));
                }
            }
            Err(e) => {
                for item in items {
                    let _ = item.done.send(Err(e.clone()));
                }
            }
        }
    }
}
