//! The Aqueduct driver: the Rust client's idempotent `Producer` and a `Consumer` per
//! subscriber reading its share of the partitions.

use std::time::Duration;

use aqueduct_protocol::cluster as cpb;
use aqueduct_protocol::data as pb;
use aqueduct_protocol::group as gpb;
use bytes::Bytes;
use futures_util::FutureExt;
use futures_util::future::BoxFuture;

use super::{AckFuture, Driver, Load, Publisher, Share, Subscriber, Target};
use crate::cli::Acks;
use crate::cli::data::admin_client;
use crate::client::AdminClient;
use crate::client::consumer::{Consumer, ConsumerConfig, Coordinator, OffsetReset};
use crate::client::producer::{Producer, ProducerConfig};
use crate::client::records::ProducerRecord;
use crate::client::router::Router;

pub struct Native {
    admin: AdminClient,
    topic: String,
    partitions: u32,
    replication_factor: u32,
    config: ProducerConfig,
}

impl Native {
    pub fn new(target: &Target, load: &Load) -> Self {
        let acks = match load.acks {
            Acks::All => pb::Acks::All,
            Acks::Leader => pb::Acks::Leader,
        };
        Self {
            admin: admin_client(&target.client),
            topic: target.topic.clone(),
            partitions: target.partitions,
            replication_factor: target.replication_factor,
            config: ProducerConfig {
                acks,
                batch_bytes: load.batch_bytes.max(1),
                linger: Duration::from_millis(load.linger_ms),
                max_in_flight: 5,
                queue: load.in_flight.max(1),
                ..ProducerConfig::default()
            },
        }
    }

    async fn router(&self) -> anyhow::Result<Router> {
        Ok(Router::new(&self.admin, &self.topic, false).await?)
    }

    async fn create(&self) -> anyhow::Result<()> {
        let request = cpb::CreateTopicRequest {
            name: self.topic.clone(),
            partitions: self.partitions,
            replication_factor: self.replication_factor,
            configs: Default::default(),
            request_id: rand::random::<u64>() | 1,
            ..Default::default()
        };
        self.admin
            .on_leader(|mut c| {
                let request = request.clone();
                async move { c.create_topic(request).await }
            })
            .await?;
        Ok(())
    }

    /// Whether every partition's leader answers a `ListOffsets` and is its preferred replica
    /// (where leadership settles: the cluster hands it there a few seconds after an election).
    async fn leaders_answer(&self) -> anyhow::Result<bool> {
        let router = self.router().await?;
        let mut preferred = true;
        for p in 0..router.partitions() {
            let (_, leader) = router.list_offset(p, pb::OffsetSpec::Latest, 0).await?;
            preferred &= router.replicas(p).first() == Some(&leader);
        }
        Ok(preferred)
    }
}

impl Driver for Native {
    fn system(&self) -> String {
        "aqueduct".to_string()
    }

    fn batching(&self) -> String {
        let acks = match self.config.acks {
            pb::Acks::Leader => "acks=leader: after the leader's write",
            _ => "acks=all: after a quorum fsynced",
        };
        format!(
            "client batches per partition up to {} B or {} ms, {} requests in flight; {acks} \
             (group commit)",
            self.config.batch_bytes,
            self.config.linger.as_millis(),
            self.config.max_in_flight,
        )
    }

    fn prepare(&self) -> BoxFuture<'_, anyhow::Result<()>> {
        async move {
            let topics = self
                .admin
                .on_leader(|mut c| async move { c.list_topics(cpb::ListTopicsRequest {}).await })
                .await?;
            if !topics.topics.iter().any(|t| t.name == self.topic) {
                self.create().await?;
            }
            // Start the clock only once every partition has its leader where it settles (its
            // preferred replica), so a new topic's elections and leadership handovers are not
            // measured as produce latency.
            // (A handover happens within seconds of an election: the preferred replica is
            // waited for 10 s at most, in case it is down.)
            let start = tokio::time::Instant::now();
            let deadline = start + Duration::from_secs(60);
            loop {
                let expired = tokio::time::Instant::now() >= deadline;
                match self.leaders_answer().await {
                    Ok(true) => return Ok(()),
                    Ok(false) if start.elapsed() >= Duration::from_secs(10) => {
                        tracing::warn!(topic = %self.topic, "leaders are not on their preferred replicas; starting anyway");
                        return Ok(());
                    }
                    Err(e) if expired => {
                        return Err(e.context(format!("topic {} has no leaders", self.topic)));
                    }
                    _ => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            }
        }
        .boxed()
    }

    fn stored(&self) -> BoxFuture<'_, anyhow::Result<u64>> {
        async move {
            let router = self.router().await?;
            let mut n = 0;
            for p in 0..router.partitions() {
                let (start, _) = router.list_offset(p, pb::OffsetSpec::Earliest, 0).await?;
                let (end, _) = router.list_offset(p, pb::OffsetSpec::Latest, 0).await?;
                n += end.saturating_sub(start);
            }
            Ok(n)
        }
        .boxed()
    }

    fn publisher(&self) -> BoxFuture<'_, anyhow::Result<Box<dyn Publisher>>> {
        async move {
            let producer = Producer::new(&self.admin, &self.topic, self.config.clone()).await?;
            Ok(Box::new(NativePublisher(producer)) as Box<dyn Publisher>)
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
                    let mut consumer = Consumer::new(
                        &self.admin,
                        ConsumerConfig {
                            group: Some(group),
                            client_id: "aqueduct-bench".to_string(),
                            auto_commit: Some(Duration::from_secs(5)),
                            reset: OffsetReset::Earliest,
                            fetch_max_bytes: 4 << 20,
                            ..ConsumerConfig::default()
                        },
                    );
                    consumer.subscribe(vec![self.topic.clone()]).await?;
                    return Ok(Box::new(NativeSubscriber(consumer)) as Box<dyn Subscriber>);
                }
            };
            let router = self.router().await?;
            let spec = if from_start {
                pb::OffsetSpec::Earliest
            } else {
                pb::OffsetSpec::Latest
            };
            let mut start = Vec::new();
            for p in (0..router.partitions()).filter(|p| *p as usize % of.max(1) == index) {
                let (offset, _) = router.list_offset(p, spec, 0).await?;
                start.push(((self.topic.clone(), p), offset));
            }
            let mut consumer = Consumer::new(
                &self.admin,
                ConsumerConfig {
                    client_id: format!("aqueduct-bench-{index}"),
                    auto_commit: None,
                    reset: OffsetReset::None,
                    fetch_max_bytes: 4 << 20,
                    ..ConsumerConfig::default()
                },
            );
            consumer.assign(start).await?;
            Ok(Box::new(NativeSubscriber(consumer)) as Box<dyn Subscriber>)
        }
        .boxed()
    }

    fn seed_group(&self, group: String, from_start: bool) -> BoxFuture<'_, anyhow::Result<()>> {
        async move {
            let router = self.router().await?;
            let spec = if from_start {
                pb::OffsetSpec::Earliest
            } else {
                pb::OffsetSpec::Latest
            };
            let mut offsets = Vec::new();
            for p in 0..router.partitions() {
                let (offset, _) = router.list_offset(p, spec, 0).await?;
                offsets.push(gpb::TopicPartitionOffset {
                    topic: self.topic.clone(),
                    partition: p,
                    offset: offset as i64,
                    metadata: String::new(),
                });
            }
            Coordinator::locate(&self.admin, &group)
                .await?
                .commit_inactive(&group, offsets)
                .await
                .map_err(|e| anyhow::anyhow!("set the offsets of group {group}: {e}"))
        }
        .boxed()
    }
}

struct NativePublisher(Producer);

impl Publisher for NativePublisher {
    fn send(&self, key: Option<Bytes>, value: Bytes) -> BoxFuture<'_, anyhow::Result<AckFuture>> {
        async move {
            let mut record = ProducerRecord::value(value);
            record.key = key;
            let delivery = self.0.send(record, None).await?;
            let ack: AckFuture = async move {
                match delivery.await {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(e)) => Err(anyhow::anyhow!("{e}")),
                    Err(_) => Err(anyhow::anyhow!("producer closed")),
                }
            }
            .boxed();
            Ok(ack)
        }
        .boxed()
    }

    fn flush(&self) -> BoxFuture<'_, ()> {
        self.0.flush().boxed()
    }
}

struct NativeSubscriber(Consumer);

impl Subscriber for NativeSubscriber {
    fn poll(&mut self, wait: Duration) -> BoxFuture<'_, anyhow::Result<Vec<Bytes>>> {
        async move {
            let records = self.0.poll(wait).await?;
            Ok(records
                .into_iter()
                .map(|r| r.value.unwrap_or_default())
                .collect())
        }
        .boxed()
    }

    fn assigned(&self) -> usize {
        self.0.assignment().len()
    }

    fn close(self: Box<Self>) -> BoxFuture<'static, ()> {
        async move {
            let NativeSubscriber(consumer) = *self;
            if let Err(e) = consumer.close().await {
                tracing::debug!(error = %e, "closing a bench consumer");
            }
        }
        .boxed()
    }
}
