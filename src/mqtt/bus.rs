//! The cluster-wide MQTT bus: one MQTT namespace over every node. Each node's rumqttd keeps
//! that node's subscriptions, sessions and retained messages; the log carries the messages
//! between the nodes and keeps what has to outlive them.
//!
//! - `aq.mqtt-messages` (keyed by MQTT topic, so one topic's messages keep their order):
//!   every message a general client publishes, appended by the node it is connected to
//!   (which answers PUBACK or PUBREC once a quorum has it). Every node tails every
//!   partition from where it stood when the node started and hands each message to its own
//!   rumqttd through a local link, the node that took the message included: a subscriber on
//!   any node gets it exactly once, and a message acknowledged to its publisher is in the log.
//! - `aq.mqtt-retained` (compacted, keyed by topic): each retained message, appended with
//!   the message itself (an empty payload clears the topic's). A starting node reads it back
//!   into its rumqttd before it takes general clients, so retained messages survive a restart
//!   of the whole cluster.
//!
//! A record's key is the MQTT topic and its value the payload, so Kafka clients read the
//! messages as they are; the QoS, the retain flag, the publisher's client id and the MQTT 5
//! properties ride in headers (user properties as headers of their own name).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rumqttd::protocol::{Publish, PublishProperties};
use tokio::sync::watch;

use super::general::GeneralBroker;
use super::sessions::SessionStore;
use super::shares::{Delivery, LocalShares, Target};
use super::sink::Sink;
use crate::broker::records::{ConsumerRecord, ProducerRecord};
use crate::broker::{Broker, BrokerError, BrokerResult, ErrorCode, OffsetSpec};

pub const MESSAGES_TOPIC: &str = "aq.mqtt-messages";
pub const RETAINED_TOPIC: &str = "aq.mqtt-retained";

const H_QOS: &str = "mqtt.qos";
const H_RETAIN: &str = "mqtt.retain";
const H_CLIENT: &str = "mqtt.client-id";
const H_PAYLOAD_FORMAT: &str = "mqtt.payload-format";
const H_EXPIRY: &str = "mqtt.message-expiry";
const H_RESPONSE_TOPIC: &str = "mqtt.response-topic";
const H_CORRELATION: &str = "mqtt.correlation-data";
const H_CONTENT_TYPE: &str = "mqtt.content-type";
/// The shared groups the message goes to and the node of each one's member (JSON).
const H_SHARE: &str = "mqtt.share";
/// A user property whose name starts with `mqtt.` is stored under this prefix, so it can
/// never be taken for one of the headers above.
const H_USER_ESCAPE: &str = "mqtt.user.";

/// Longest a fetch of the tail waits for new messages.
const TAIL_WAIT: Duration = Duration::from_millis(500);

/// One message published by a general client.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
    /// MQTT 5 properties (none from a 3.1.1 client); never a topic alias.
    pub props: Option<PublishProperties>,
    pub client_id: String,
}

fn header(name: &str, value: impl Into<Bytes>) -> (String, Option<Bytes>) {
    (name.to_string(), Some(value.into()))
}

/// The log record of a message.
pub fn to_record(m: &Message) -> ProducerRecord {
    let mut headers = vec![
        header(H_QOS, m.qos.to_string()),
        header(H_CLIENT, m.client_id.clone()),
    ];
    if m.retain {
        headers.push(header(H_RETAIN, "1"));
    }
    if let Some(p) = &m.props {
        if let Some(v) = p.payload_format_indicator {
            headers.push(header(H_PAYLOAD_FORMAT, v.to_string()));
        }
        if let Some(v) = p.message_expiry_interval {
            headers.push(header(H_EXPIRY, v.to_string()));
        }
        if let Some(v) = &p.response_topic {
            headers.push(header(H_RESPONSE_TOPIC, v.clone()));
        }
        if let Some(v) = &p.correlation_data {
            headers.push(header(H_CORRELATION, v.clone()));
        }
        if let Some(v) = &p.content_type {
            headers.push(header(H_CONTENT_TYPE, v.clone()));
        }
        for (name, value) in &p.user_properties {
            let name = match name.starts_with("mqtt.") {
                true => format!("{H_USER_ESCAPE}{name}"),
                false => name.clone(),
            };
            headers.push((name, Some(Bytes::from(value.clone().into_bytes()))));
        }
    }
    ProducerRecord {
        key: Some(Bytes::from(m.topic.clone().into_bytes())),
        value: Some(m.payload.clone()),
        headers,
        timestamp: None,
    }
}

/// The message a log record holds; `None` for a record that is not one (no topic).
pub fn from_record(r: &ConsumerRecord) -> Option<Message> {
    let topic = String::from_utf8(r.key.as_deref()?.to_vec()).ok()?;
    let mut m = Message {
        topic,
        payload: r.value.clone().unwrap_or_default(),
        qos: 0,
        retain: false,
        props: None,
        client_id: String::new(),
    };
    let mut props = PublishProperties::default();
    let mut v5 = false;
    for (name, value) in &r.headers {
        let value = value.clone().unwrap_or_default();
        let text = || String::from_utf8_lossy(&value).into_owned();
        match name.as_str() {
            H_QOS => m.qos = text().parse().unwrap_or(0),
            H_RETAIN => m.retain = value.as_ref() == b"1",
            H_CLIENT => m.client_id = text(),
            H_PAYLOAD_FORMAT => props.payload_format_indicator = text().parse().ok(),
            H_EXPIRY => props.message_expiry_interval = text().parse().ok(),
            H_RESPONSE_TOPIC => props.response_topic = Some(text()),
            H_CORRELATION => props.correlation_data = Some(value.clone()),
            H_CONTENT_TYPE => props.content_type = Some(text()),
            H_SHARE => continue,
            other => {
                let name = other.strip_prefix(H_USER_ESCAPE).unwrap_or(other);
                props.user_properties.push((name.to_string(), text()));
            }
        }
        v5 |= !matches!(name.as_str(), H_QOS | H_RETAIN | H_CLIENT);
    }
    m.props = v5.then_some(props);
    Some(m)
}

/// The shared groups a message's record names (see [`super::shares`]).
pub fn share_targets(r: &ConsumerRecord) -> Vec<Target> {
    r.headers
        .iter()
        .find(|(name, _)| name == H_SHARE)
        .and_then(|(_, v)| serde_json::from_slice(v.as_deref()?).ok())
        .unwrap_or_default()
}

/// The bus of this node (cheap to clone).
#[derive(Debug, Clone)]
pub struct Bus {
    broker: Broker,
    sink: Sink,
    general: GeneralBroker,
    /// Partitions and replication of the bus topics.
    shape: (u32, Option<u16>),
    /// True once the retained messages are back in rumqttd and the tail runs.
    ready: Arc<watch::Sender<bool>>,
    sessions: SessionStore,
    shares: LocalShares,
    node: u64,
}

impl Bus {
    pub fn new(
        broker: Broker,
        sink: Sink,
        general: GeneralBroker,
        partitions: u32,
        replication_factor: Option<u16>,
    ) -> Self {
        Self {
            sessions: SessionStore::new(
                broker.clone(),
                sink.clone(),
                partitions,
                replication_factor,
            ),
            node: broker.node_id(),
            shares: LocalShares::default(),
            broker,
            sink,
            general,
            shape: (partitions.max(1), replication_factor),
            ready: Arc::new(watch::channel(false).0),
        }
    }

    /// This node's members of shared groups.
    pub fn shares(&self) -> &LocalShares {
        &self.shares
    }

    /// The cluster's general MQTT sessions, as this node follows them.
    pub fn sessions(&self) -> &SessionStore {
        &self.sessions
    }

    /// Appends a message (and, retained, the topic's retained message), enqueued at once,
    /// so what one client publishes keeps its order; resolves once a quorum has it.
    pub fn publish(
        &self,
        m: &Message,
    ) -> impl std::future::Future<Output = BrokerResult<()>> + Send + 'static {
        let mut record = to_record(m);
        let shares = self.sessions.share_targets(&m.topic);
        if !shares.is_empty()
            && let Ok(json) = serde_json::to_vec(&shares)
        {
            record.headers.push(header(H_SHARE, json));
        }
        let retained = m
            .retain
            .then(|| self.sink.enqueue_record(RETAINED_TOPIC, record.clone()));
        let message = self.sink.enqueue_record(MESSAGES_TOPIC, record);
        async move {
            let stopped = |_| BrokerError::internal("MQTT bus", "the sink stopped");
            message.await.map_err(stopped)??;
            if let Some(r) = retained {
                r.await.map_err(stopped)??;
            }
            Ok(())
        }
    }

    /// Waits up to `within` for the bus to serve; whether it does.
    pub async fn ready(&self, within: Duration) -> bool {
        let mut rx = self.ready.subscribe();
        tokio::time::timeout(within, rx.wait_for(|r| *r))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Brings the retained messages and the sessions back, then hands every new message to
    /// rumqttd and follows the sessions; until the node stops.
    pub async fn run(self) {
        let starts = loop {
            match self.prepare().await {
                Ok(s) => break s,
                Err(e) => {
                    tracing::debug!(error = %e, "MQTT bus: not ready yet");
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
            }
        };
        let session_starts = loop {
            match self.sessions.load().await {
                Ok(s) => break s,
                Err(e) => {
                    tracing::debug!(error = %e, "MQTT sessions: not loaded yet");
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
            }
        };
        self.ready.send_replace(true);
        tracing::info!(partitions = starts.len(), "MQTT bus: serving");
        let mut tails = tokio::task::JoinSet::new();
        tails.spawn(self.sessions.clone().follow(session_starts));
        for (partition, from) in starts.into_iter().enumerate() {
            let bus = self.clone();
            tails.spawn(async move { bus.tail(partition as u32, from).await });
        }
        while tails.join_next().await.is_some() {}
    }

    /// Creates the topics, notes where each message partition ends (the tail starts there,
    /// before the retained messages are read, so none published meanwhile is missed) and
    /// hands the retained messages to rumqttd.
    async fn prepare(&self) -> BrokerResult<Vec<u64>> {
        let topics = self.broker.topics();
        let messages = topics
            .ensure_system(MESSAGES_TOPIC, self.shape.0, self.shape.1)
            .await?;
        let retained = topics
            .ensure_system_with(
                RETAINED_TOPIC,
                self.shape.0,
                self.shape.1,
                &[("cleanup.policy", "compact")],
            )
            .await?;
        let mut starts = Vec::new();
        for p in 0..messages.record.partitions {
            starts.push(
                self.broker
                    .list_offsets_routed(MESSAGES_TOPIC, p, OffsetSpec::Latest)
                    .await?,
            );
        }
        let mut latest: HashMap<String, Message> = HashMap::new();
        for p in 0..retained.record.partitions {
            let end = self
                .broker
                .list_offsets_routed(RETAINED_TOPIC, p, OffsetSpec::Latest)
                .await?;
            let mut from = self
                .broker
                .list_offsets_routed(RETAINED_TOPIC, p, OffsetSpec::Earliest)
                .await?;
            while from < end {
                let records = self.read(RETAINED_TOPIC, p, from, Duration::ZERO).await?;
                let Some(last) = records.last().map(|r| r.offset) else {
                    break;
                };
                for m in records.iter().filter_map(from_record) {
                    latest.insert(m.topic.clone(), m);
                }
                from = last + 1;
            }
        }
        let mut restored = 0;
        for m in latest.into_values().filter(|m| !m.payload.is_empty()) {
            self.inject(m, true).await?;
            restored += 1;
        }
        if restored > 0 {
            tracing::info!(restored, "MQTT bus: retained messages restored");
        }
        Ok(starts)
    }

    /// Hands one partition's messages to rumqttd as they are committed.
    async fn tail(self, partition: u32, mut from: u64) {
        loop {
            match self.read(MESSAGES_TOPIC, partition, from, TAIL_WAIT).await {
                Ok(records) => {
                    for r in &records {
                        let Some(m) = from_record(r) else { continue };
                        self.share(r, &m);
                        if let Err(e) = self.inject(m, false).await {
                            tracing::error!(error = %e, "MQTT bus stopped");
                            return;
                        }
                    }
                    if let Some(last) = records.last() {
                        from = last.offset + 1;
                    }
                }
                Err(e) if e.code == ErrorCode::OffsetOutOfRange => {
                    // Retention passed the tail (a node far behind): on from the start.
                    match self
                        .broker
                        .list_offsets_routed(MESSAGES_TOPIC, partition, OffsetSpec::Earliest)
                        .await
                    {
                        Ok(start) if start > from => {
                            tracing::warn!(
                                partition,
                                from,
                                start,
                                "MQTT bus: messages expired before this node read them"
                            );
                            from = start;
                        }
                        _ => tokio::time::sleep(Duration::from_millis(200)).await,
                    }
                }
                Err(e) => {
                    tracing::debug!(partition, error = %e, "MQTT bus: tail retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }

    async fn read(
        &self,
        topic: &str,
        partition: u32,
        from: u64,
        max_wait: Duration,
    ) -> BrokerResult<Vec<ConsumerRecord>> {
        self.broker
            .read_routed(topic, partition, from, max_wait)
            .await
    }

    /// Hands a message to this node's members of the shared groups its record names here.
    fn share(&self, r: &ConsumerRecord, m: &Message) {
        let mut message: Option<Arc<Message>> = None;
        for t in share_targets(r).into_iter().filter(|t| t.node == self.node) {
            let message = message.get_or_insert_with(|| Arc::new(m.clone())).clone();
            let (group, filter) = (t.group, t.filter);
            if !self.shares.deliver(Delivery {
                message,
                group: group.clone(),
                filter,
            }) {
                tracing::debug!(group, topic = %m.topic,
                    "MQTT shared subscription: no member here to take the message");
            }
        }
    }

    /// Hands a message to rumqttd; `retained` only for a restored retained message (a new
    /// one carries its own flag).
    async fn inject(&self, m: Message, retained: bool) -> BrokerResult<()> {
        let publish = Publish::new(
            Bytes::from(m.topic.into_bytes()),
            m.payload,
            m.retain || retained,
        );
        self.general
            .inject((publish, m.props))
            .await
            .map_err(|e| BrokerError::internal("MQTT bus", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn consumed(r: ProducerRecord) -> ConsumerRecord {
        ConsumerRecord {
            topic: MESSAGES_TOPIC.to_string(),
            partition: 0,
            offset: 7,
            timestamp: 0,
            key: r.key,
            value: r.value,
            headers: r.headers,
        }
    }

    #[test]
    fn a_message_comes_back_from_its_record_as_it_went_in() {
        let plain = Message {
            topic: "sensors/1/temp".to_string(),
            payload: Bytes::from_static(b"21.5"),
            qos: 1,
            retain: true,
            props: None,
            client_id: "c-1".to_string(),
        };
        assert_eq!(
            from_record(&consumed(to_record(&plain))),
            Some(plain.clone())
        );
        let v5 = Message {
            qos: 2,
            retain: false,
            props: Some(PublishProperties {
                payload_format_indicator: Some(1),
                message_expiry_interval: Some(60),
                response_topic: Some("replies/c-1".to_string()),
                correlation_data: Some(Bytes::from_static(&[0, 1, 2])),
                content_type: Some("application/json".to_string()),
                user_properties: vec![
                    ("site".to_string(), "north".to_string()),
                    ("mqtt.qos".to_string(), "not ours".to_string()),
                ],
                ..PublishProperties::default()
            }),
            ..plain
        };
        let record = to_record(&v5);
        assert_eq!(record.key.as_deref(), Some(&b"sensors/1/temp"[..]));
        assert_eq!(record.value.as_deref(), Some(&b"21.5"[..]));
        assert!(record.headers.iter().any(|(n, _)| n == "site"));
        assert_eq!(from_record(&consumed(record)), Some(v5));
    }

    #[test]
    fn a_record_without_a_topic_is_not_a_message() {
        let mut r = consumed(ProducerRecord::value(Bytes::from_static(b"x")));
        assert_eq!(from_record(&r), None);
        r.key = Some(Bytes::from_static(b"t"));
        let m = from_record(&r).expect("a message");
        assert_eq!((m.qos, m.retain, m.props), (0, false, None));
    }
}
