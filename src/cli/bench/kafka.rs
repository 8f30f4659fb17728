//! The Kafka-client driver (librdkafka through the `rdkafka` crate), built with `--features
//! kafka-bench`: Aqueduct's Kafka port driven by the client most Kafka users run. One
//! producer (one librdkafka instance, its own connections) per publisher, acks=all, batching
//! by librdkafka's `linger.ms`/`batch.size`; subscribers assign partitions `index, index+of,
//! …` and read from the start or the end, or join a consumer group (`--group`).

use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::{FutureExt, StreamExt};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};

use super::{AckFuture, Driver, Load, Publisher, Share, Subscriber, Target};

pub struct Kafka {
    bootstrap: String,
    topic: String,
    partitions: u32,
    replication_factor: u32,
    linger_ms: u64,
    batch_bytes: usize,
    in_flight: usize,
}

impl Kafka {
    pub fn new(target: &Target, load: &Load) -> Self {
        Self {
            bootstrap: target.kafka_bootstrap.clone(),
            topic: target.topic.clone(),
            partitions: target.partitions.max(1),
            replication_factor: target.replication_factor.max(1),
            linger_ms: load.linger_ms,
            batch_bytes: load.batch_bytes,
            in_flight: load.in_flight.max(1),
        }
    }

    fn config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.bootstrap)
            .set("partitioner", "murmur2_random");
        c
    }

    fn metadata_consumer(&self) -> anyhow::Result<BaseConsumer> {
        self.config()
            .set("group.id", "aqueduct-bench")
            .create()
            .map_err(|e| anyhow::anyhow!("kafka client: {e}"))
    }
}

impl Driver for Kafka {
    fn system(&self) -> String {
        "aqueduct-kafka".to_string()
    }

    fn batching(&self) -> String {
        format!(
            "librdkafka producer, acks=all, linger.ms={} batch.size={} (one batch per partition \
             per request), records acknowledged once the quorum fsynced them",
            self.linger_ms, self.batch_bytes
        )
    }

    fn prepare(&self) -> BoxFuture<'_, anyhow::Result<()>> {
        async move {
            let admin: AdminClient<DefaultClientContext> = self
                .config()
                .create()
                .map_err(|e| anyhow::anyhow!("kafka admin client: {e}"))?;
            let topic = NewTopic::new(
                &self.topic,
                self.partitions as i32,
                TopicReplication::Fixed(self.replication_factor as i32),
            );
            let results = admin
                .create_topics([&topic], &AdminOptions::new())
                .await
                .map_err(|e| anyhow::anyhow!("create topic {}: {e}", self.topic))?;
            for r in results {
                match r {
                    Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                    Err((t, code)) => anyhow::bail!("create topic {t}: {code}"),
                }
            }
            // Until every partition has a leader (elections follow the creation).
            let consumer = self.metadata_consumer()?;
            let (topic, partitions) = (self.topic.clone(), self.partitions as usize);
            tokio::task::spawn_blocking(move || {
                let deadline = std::time::Instant::now() + Duration::from_secs(30);
                loop {
                    let led = consumer
                        .fetch_metadata(Some(&topic), Duration::from_secs(5))
                        .ok()
                        .and_then(|m| {
                            m.topics().first().map(|t| {
                                t.partitions()
                                    .iter()
                                    .filter(|p| p.leader() >= 0 && p.error().is_none())
                                    .count()
                            })
                        })
                        .unwrap_or(0);
                    if led >= partitions {
                        return Ok(());
                    }
                    anyhow::ensure!(
                        std::time::Instant::now() < deadline,
                        "{topic}: {led} of {partitions} partitions have a leader after 30 s"
                    );
                    std::thread::sleep(Duration::from_millis(200));
                }
            })
            .await?
        }
        .boxed()
    }

    fn stored(&self) -> BoxFuture<'_, anyhow::Result<u64>> {
        async move {
            let consumer = self.metadata_consumer()?;
            let topic = self.topic.clone();
            let partitions = self.partitions;
            tokio::task::spawn_blocking(move || {
                let mut total = 0u64;
                for p in 0..partitions as i32 {
                    let (low, high) = consumer
                        .fetch_watermarks(&topic, p, Duration::from_secs(10))
                        .map_err(|e| anyhow::anyhow!("watermarks of {topic}/{p}: {e}"))?;
                    total += (high - low).max(0) as u64;
                }
                Ok(total)
            })
            .await?
        }
        .boxed()
    }

    fn publisher(&self) -> BoxFuture<'_, anyhow::Result<Box<dyn Publisher>>> {
        async move {
            let producer: FutureProducer = self
                .config()
                .set("acks", "all")
                .set("enable.idempotence", "false")
                .set("linger.ms", self.linger_ms.to_string())
                .set("batch.size", self.batch_bytes.to_string())
                .set(
                    "queue.buffering.max.messages",
                    (self.in_flight * 4).to_string(),
                )
                .set("compression.type", "none")
                .create()
                .map_err(|e| anyhow::anyhow!("kafka producer: {e}"))?;
            Ok(Box::new(KafkaPublisher {
                producer,
                topic: self.topic.clone(),
            }) as Box<dyn Publisher>)
        }
        .boxed()
    }

    fn subscriber(
        &self,
        share: Share,
        from_start: bool,
    ) -> BoxFuture<'_, anyhow::Result<Box<dyn Subscriber>>> {
        async move {
            let (index, of) = match share {
                Share::Split { index, of } => (index, of),
                Share::Group(group) => {
                    // librdkafka's defaults otherwise: range assignor, commits every 5 s.
                    let consumer: StreamConsumer = self
                        .config()
                        .set("group.id", &group)
                        .set("auto.offset.reset", "earliest")
                        .set("fetch.wait.max.ms", "100")
                        .create()
                        .map_err(|e| anyhow::anyhow!("kafka consumer: {e}"))?;
                    consumer
                        .subscribe(&[&self.topic])
                        .map_err(|e| anyhow::anyhow!("subscribe to {}: {e}", self.topic))?;
                    return Ok(Box::new(KafkaSubscriber { consumer }) as Box<dyn Subscriber>);
                }
            };
            let consumer: StreamConsumer = self
                .config()
                .set("group.id", "aqueduct-bench")
                .set("enable.auto.commit", "false")
                .set("fetch.wait.max.ms", "100")
                .create()
                .map_err(|e| anyhow::anyhow!("kafka consumer: {e}"))?;
            let mut assignment = TopicPartitionList::new();
            let start = if from_start {
                Offset::Beginning
            } else {
                Offset::End
            };
            for p in (0..self.partitions as usize).filter(|p| p % of.max(1) == index) {
                assignment
                    .add_partition_offset(&self.topic, p as i32, start)
                    .map_err(|e| anyhow::anyhow!("assign: {e}"))?;
            }
            consumer
                .assign(&assignment)
                .map_err(|e| anyhow::anyhow!("assign: {e}"))?;
            Ok(Box::new(KafkaSubscriber { consumer }) as Box<dyn Subscriber>)
        }
        .boxed()
    }

    fn seed_group(&self, group: String, from_start: bool) -> BoxFuture<'_, anyhow::Result<()>> {
        async move {
            let consumer: BaseConsumer = self
                .config()
                .set("group.id", &group)
                .set("enable.auto.commit", "false")
                .create()
                .map_err(|e| anyhow::anyhow!("kafka consumer: {e}"))?;
            let (topic, partitions) = (self.topic.clone(), self.partitions);
            tokio::task::spawn_blocking(move || {
                let mut offsets = TopicPartitionList::new();
                for p in 0..partitions as i32 {
                    let (low, high) = consumer
                        .fetch_watermarks(&topic, p, Duration::from_secs(10))
                        .map_err(|e| anyhow::anyhow!("watermarks of {topic}/{p}: {e}"))?;
                    let at = if from_start { low } else { high };
                    offsets
                        .add_partition_offset(&topic, p, Offset::Offset(at))
                        .map_err(|e| anyhow::anyhow!("offsets: {e}"))?;
                }
                // Not a member: an OffsetCommit with generation -1, refused while the group
                // has members.
                consumer
                    .commit(&offsets, CommitMode::Sync)
                    .map_err(|e| anyhow::anyhow!("set the offsets of group {group}: {e}"))
            })
            .await?
        }
        .boxed()
    }
}

struct KafkaPublisher {
    producer: FutureProducer,
    topic: String,
}

impl Publisher for KafkaPublisher {
    fn send(&self, key: Option<Bytes>, value: Bytes) -> BoxFuture<'_, anyhow::Result<AckFuture>> {
        async move {
            loop {
                let mut record = FutureRecord::<[u8], [u8]>::to(&self.topic).payload(&value[..]);
                if let Some(k) = &key {
                    record = record.key(&k[..]);
                }
                match self.producer.send_result(record) {
                    Ok(delivery) => {
                        let ack: AckFuture = async move {
                            match delivery.await {
                                Ok(Ok(_)) => Ok(()),
                                Ok(Err((e, _))) => Err(anyhow::anyhow!("delivery: {e}")),
                                Err(_) => Err(anyhow::anyhow!("delivery: producer dropped")),
                            }
                        }
                        .boxed();
                        return Ok(ack);
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                    Err((e, _)) => anyhow::bail!("produce: {e}"),
                }
            }
        }
        .boxed()
    }

    fn flush(&self) -> BoxFuture<'_, ()> {
        async move {
            let producer = self.producer.clone();
            let _ =
                tokio::task::spawn_blocking(move || producer.flush(Duration::from_secs(60))).await;
        }
        .boxed()
    }
}

struct KafkaSubscriber {
    consumer: StreamConsumer,
}

impl Subscriber for KafkaSubscriber {
    fn poll(&mut self, wait: Duration) -> BoxFuture<'_, anyhow::Result<Vec<Bytes>>> {
        async move {
            let mut out = Vec::new();
            let mut stream = self.consumer.stream();
            let deadline = tokio::time::Instant::now() + wait;
            while out.len() < 4096 {
                let next = if out.is_empty() {
                    tokio::time::timeout_at(deadline, stream.next()).await
                } else {
                    // Take what is already here without waiting again.
                    tokio::time::timeout(Duration::ZERO, stream.next()).await
                };
                match next {
                    Err(_) | Ok(None) => break,
                    Ok(Some(Ok(m))) => {
                        out.push(Bytes::copy_from_slice(m.payload().unwrap_or_default()))
                    }
                    Ok(Some(Err(e))) => anyhow::bail!("consume: {e}"),
                }
            }
            Ok(out)
        }
        .boxed()
    }

    fn assigned(&self) -> usize {
        self.consumer.assignment().map(|a| a.count()).unwrap_or(0)
    }

    fn close(self: Box<Self>) -> BoxFuture<'static, ()> {
        async move {
            // Dropping the consumer leaves the group (rd_kafka_consumer_close), blocking.
            let _ = tokio::task::spawn_blocking(move || drop(self)).await;
        }
        .boxed()
    }
}
