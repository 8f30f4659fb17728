//! The NATS JetStream driver (async-nats), built with `--features nats`: a file-storage
//! stream named after the topic, one connection per publisher and subscriber, asynchronous
//! publish acknowledgements, and one shared pull consumer for the subscribers.

use std::pin::Pin;
use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::{FutureExt, Stream, StreamExt};
use tokio::sync::OnceCell;

use super::{AckFuture, Driver, Load, Publisher, Share, Subscriber, Target};

pub struct Nats {
    urls: Vec<String>,
    topic: String,
    replicas: usize,
    in_flight: usize,
    /// The pull consumer every subscriber of this run shares.
    consumer: OnceCell<String>,
}

impl Nats {
    pub fn new(target: &Target, load: &Load) -> Self {
        Self {
            urls: target
                .nats_url
                .split(',')
                .map(|u| u.trim().to_string())
                .filter(|u| !u.is_empty())
                .collect(),
            topic: target.topic.clone(),
            replicas: target.replication_factor.max(1) as usize,
            in_flight: load.in_flight.max(1),
            consumer: OnceCell::new(),
        }
    }

    async fn connect(&self) -> anyhow::Result<jetstream::Context> {
        let client = async_nats::connect(self.urls.clone())
            .await
            .map_err(|e| anyhow::anyhow!("cannot connect to NATS at {:?}: {e}", self.urls))?;
        Ok(jetstream::ContextBuilder::new()
            .max_ack_inflight(self.in_flight)
            .build(client))
    }
}

impl Driver for Nats {
    fn system(&self) -> String {
        "nats".to_string()
    }

    fn batching(&self) -> String {
        "no client batching: one publish per record, acknowledgements awaited asynchronously; \
         the server appends each message and fsyncs per its sync_interval"
            .to_string()
    }

    fn prepare(&self) -> BoxFuture<'_, anyhow::Result<()>> {
        async move {
            let js = self.connect().await?;
            // A new cluster answers before its JetStream meta leader is elected: retry.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            loop {
                let created = js
                    .get_or_create_stream(stream::Config {
                        name: self.topic.clone(),
                        subjects: vec![self.topic.clone(), format!("{}.>", self.topic)],
                        storage: stream::StorageType::File,
                        num_replicas: self.replicas,
                        ..Default::default()
                    })
                    .await;
                match created {
                    Ok(_) => return Ok(()),
                    Err(e) if tokio::time::Instant::now() >= deadline => {
                        anyhow::bail!("cannot create stream {}: {e}", self.topic)
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
                }
            }
        }
        .boxed()
    }

    fn stored(&self) -> BoxFuture<'_, anyhow::Result<u64>> {
        async move {
            let js = self.connect().await?;
            let mut s = js
                .get_stream(&self.topic)
                .await
                .map_err(|e| anyhow::anyhow!("stream {}: {e}", self.topic))?;
            let info = s
                .info()
                .await
                .map_err(|e| anyhow::anyhow!("stream {}: {e}", self.topic))?;
            Ok(info.state.messages)
        }
        .boxed()
    }

    fn publisher(&self) -> BoxFuture<'_, anyhow::Result<Box<dyn Publisher>>> {
        async move {
            Ok(Box::new(NatsPublisher {
                js: self.connect().await?,
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
            if let Share::Group(_) = share {
                anyhow::bail!(NO_GROUPS);
            }
            let js = self.connect().await?;
            let s = js
                .get_stream(&self.topic)
                .await
                .map_err(|e| anyhow::anyhow!("stream {}: {e}", self.topic))?;
            let name = self
                .consumer
                .get_or_try_init(|| async {
                    let name = format!("bench-{}-{}", std::process::id(), rand::random::<u32>());
                    s.create_consumer(consumer::pull::Config {
                        name: Some(name.clone()),
                        deliver_policy: if from_start {
                            consumer::DeliverPolicy::All
                        } else {
                            consumer::DeliverPolicy::New
                        },
                        ack_policy: consumer::AckPolicy::None,
                        inactive_threshold: Duration::from_secs(30),
                        ..Default::default()
                    })
                    .await
                    .map_err(|e| anyhow::anyhow!("cannot create a pull consumer: {e}"))?;
                    Ok::<_, anyhow::Error>(name)
                })
                .await?;
            let c: consumer::PullConsumer = s
                .get_consumer(name)
                .await
                .map_err(|e| anyhow::anyhow!("pull consumer {name}: {e}"))?;
            let messages = c
                .messages()
                .await
                .map_err(|e| anyhow::anyhow!("pull consumer {name}: {e}"))?
                .ready_chunks(4096)
                .boxed();
            Ok(Box::new(NatsSubscriber { messages }) as Box<dyn Subscriber>)
        }
        .boxed()
    }

    fn seed_group(&self, _group: String, _from_start: bool) -> BoxFuture<'_, anyhow::Result<()>> {
        async { anyhow::bail!(NO_GROUPS) }.boxed()
    }
}

const NO_GROUPS: &str = "--group: JetStream has no consumer groups; the NATS consumers already \
                         share one pull consumer, run without --group";

struct NatsPublisher {
    js: jetstream::Context,
    topic: String,
}

impl Publisher for NatsPublisher {
    fn send(&self, key: Option<Bytes>, value: Bytes) -> BoxFuture<'_, anyhow::Result<AckFuture>> {
        async move {
            let subject = match key {
                Some(k) => format!("{}.{}", self.topic, String::from_utf8_lossy(&k)),
                None => self.topic.clone(),
            };
            let ack = self
                .js
                .publish(subject, value)
                .await
                .map_err(|e| anyhow::anyhow!("publish: {e}"))?;
            let ack: AckFuture = async move {
                ack.await
                    .map(|_| ())
                    .map_err(|e| anyhow::anyhow!("publish acknowledgement: {e}"))
            }
            .boxed();
            Ok(ack)
        }
        .boxed()
    }

    fn flush(&self) -> BoxFuture<'_, ()> {
        // Publishes are acknowledged one by one; the engine waits for every acknowledgement.
        async {}.boxed()
    }
}

type Chunks = Pin<
    Box<dyn Stream<Item = Vec<Result<jetstream::Message, consumer::pull::MessagesError>>> + Send>,
>;

struct NatsSubscriber {
    messages: Chunks,
}

impl Subscriber for NatsSubscriber {
    fn poll(&mut self, wait: Duration) -> BoxFuture<'_, anyhow::Result<Vec<Bytes>>> {
        async move {
            match tokio::time::timeout(wait, self.messages.next()).await {
                Err(_) => Ok(Vec::new()),
                Ok(None) => anyhow::bail!("the pull consumer's message stream ended"),
                Ok(Some(chunk)) => chunk
                    .into_iter()
                    .map(|m| {
                        m.map(|m| m.payload.clone())
                            .map_err(|e| anyhow::anyhow!("pull consumer: {e}"))
                    })
                    .collect(),
            }
        }
        .boxed()
    }

    fn assigned(&self) -> usize {
        1
    }

    fn close(self: Box<Self>) -> BoxFuture<'static, ()> {
        async {}.boxed()
    }
}
