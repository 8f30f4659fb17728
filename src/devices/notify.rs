//! Device notifications forwarded to application topics (the seed's "Subscribing to Device
//! Notifications"): a product subscribed with `aqueduct product notify PRODUCT --topic T
//! [--events online,offline,...]` has the events of its devices that `aq.device-events`
//! records from then on appended to `T`, keyed by device id, the value as `aqueduct device
//! subscribe --output json` prints it (`{device_id, product, event, seq, at, reason, node}`),
//! with headers `aq.event` and `aq.seq`.
//!
//! One node forwards: the leader of the compacted system topic `aq.device-notify-positions`
//! (one partition, key `$positions`: how far each partition of `aq.device-events` has been
//! forwarded). It reads every partition from there (from whichever node leads it), appends
//! the matching events with an idempotent producer, then the new positions. Delivery is at
//! least once: a forwarder lost between those two appends makes the next one forward the
//! same events again — each carries its device's gap-free `seq`, so a consumer recognises a
//! repeat by `(device_id, seq)`. Subscriptions are read from the metadata as they are when
//! an event is forwarded; an event recorded before its product subscribed is not forwarded.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde_json::json;

use super::Registry;
use super::events::{DeviceEvent, EVENTS_TOPIC};
use super::records::Notifications;
use super::telemetry::rfc3339_ms;
use crate::broker::records::{ProducerRecord, decode_batches, encode_batch, partition_for_key};
use crate::broker::routed::{Partitioning, RoutedProducer};
use crate::broker::{
    Acks, Broker, BrokerError, BrokerResult, FetchRequest, OffsetSpec, ProduceRequest,
};

pub const POSITIONS_TOPIC: &str = "aq.device-notify-positions";
const POSITIONS_KEY: &str = "$positions";

/// The forwarder's positions, as of a leader term.
#[derive(Debug)]
struct State {
    term: i32,
    /// Partition of `aq.device-events` → the next offset to forward.
    positions: BTreeMap<u32, u64>,
}

/// The notification forwarder (cheap to clone).
#[derive(Debug, Clone)]
pub struct Notifier {
    broker: Broker,
    registry: Registry,
    producer: RoutedProducer,
    replication_factor: Option<u16>,
    state: Arc<tokio::sync::Mutex<Option<State>>>,
}

/// The record an event becomes in a subscribed topic.
pub fn notification(e: &DeviceEvent) -> ProducerRecord {
    let value = json!({
        "device_id": e.device_id,
        "product": e.product,
        "event": e.event.as_str(),
        "seq": e.seq,
        "at": rfc3339_ms(e.at as i64),
        "reason": e.reason,
        "node": e.node,
    });
    ProducerRecord {
        key: Some(Bytes::from(e.device_id.clone().into_bytes())),
        value: Some(Bytes::from(value.to_string().into_bytes())),
        headers: vec![
            (
                "aq.event".to_string(),
                Some(Bytes::from_static(e.event.as_str().as_bytes())),
            ),
            (
                "aq.seq".to_string(),
                Some(Bytes::from(e.seq.to_string().into_bytes())),
            ),
        ],
        timestamp: Some(e.at as i64),
    }
}

/// Whether `subscription` asks for `e`.
pub fn wanted(subscription: &Notifications, e: &DeviceEvent) -> bool {
    subscription.events.iter().any(|k| k == e.event.as_str())
        && e.at as i64 >= subscription.since_ms
}

impl Notifier {
    pub fn new(broker: Broker, registry: Registry, replication_factor: Option<u16>) -> Self {
        let producer = RoutedProducer::new(broker.clone());
        Self {
            broker,
            registry,
            producer,
            replication_factor,
            state: Arc::default(),
        }
    }

    /// Forwards while this node leads the positions partition; until the node stops.
    pub async fn run(self) {
        loop {
            match self.step().await {
                Ok(true) => {}
                Ok(false) => tokio::time::sleep(Duration::from_millis(300)).await,
                Err(e) => {
                    tracing::debug!(error = %e, "device notifications: retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    /// One pass over the event partitions; whether it forwarded anything.
    async fn step(&self) -> BrokerResult<bool> {
        let subscriptions: HashMap<String, Notifications> = self
            .registry
            .products()?
            .into_iter()
            .filter_map(|p| p.notifications.map(|n| (p.name, n)))
            .collect();
        if subscriptions.is_empty() {
            return Ok(false);
        }
        let Some(events) = self.broker.topics().topic(EVENTS_TOPIC)? else {
            return Ok(false);
        };
        self.broker
            .topics()
            .ensure_system_with(
                POSITIONS_TOPIC,
                1,
                self.replication_factor,
                &[("cleanup.policy", "compact")],
            )
            .await?;
        let mut guard = self.state.lock().await;
        if !self.broker.leads(POSITIONS_TOPIC, 0) {
            *guard = None;
            return Ok(false);
        }
        let term = self.broker.leader_epoch(POSITIONS_TOPIC, 0);
        if guard.as_ref().is_none_or(|s| s.term != term) {
            *guard = None;
            *guard = Some(State {
                term,
                positions: self.rebuild().await?,
            });
        }
        let Some(state) = guard.as_mut() else {
            unreachable!("rebuilt above");
        };
        let mut out: BTreeMap<String, Vec<ProducerRecord>> = BTreeMap::new();
        let mut moved = BTreeMap::new();
        for partition in 0..events.record.partitions {
            let from = state.positions.get(&partition).copied().unwrap_or(0);
            let records = match self
                .broker
                .read_routed(EVENTS_TOPIC, partition, from, Duration::ZERO)
                .await
            {
                Ok(r) => r,
                Err(e) => {
                    tracing::debug!(partition, error = %e, "device notifications: not read");
                    continue;
                }
            };
            let Some(last) = records.last().map(|r| r.offset) else {
                continue;
            };
            for r in records {
                let Some(value) = r.value else { continue };
                let Ok(e) = serde_json::from_slice::<DeviceEvent>(&value) else {
                    continue;
                };
                if let Some(s) = subscriptions.get(&e.product)
                    && wanted(s, &e)
                {
                    out.entry(s.topic.clone())
                        .or_default()
                        .push(notification(&e));
                }
            }
            moved.insert(partition, last + 1);
        }
        if moved.is_empty() {
            return Ok(false);
        }
        for (topic, records) in out {
            self.append(&topic, records).await?;
        }
        let mut positions = state.positions.clone();
        positions.extend(moved);
        if let Err(e) = self.write_positions(&positions).await {
            *guard = None;
            return Err(e);
        }
        state.positions = positions;
        Ok(true)
    }

    /// Appends `records` to `topic` (created with the cluster defaults if it does not
    /// exist), each on its device's partition, in order.
    async fn append(&self, topic: &str, records: Vec<ProducerRecord>) -> BrokerResult<()> {
        let partitions = self.broker.topics().ensure(topic).await?.record.partitions;
        let mut by_partition: BTreeMap<u32, Vec<ProducerRecord>> = BTreeMap::new();
        for r in records {
            let p = partition_for_key(r.key.as_deref().unwrap_or_default(), partitions);
            by_partition.entry(p).or_default().push(r);
        }
        for (p, records) in by_partition {
            self.producer
                .send(topic, Partitioning::Partition(p), records)
                .await?;
        }
        Ok(())
    }

    async fn write_positions(&self, positions: &BTreeMap<u32, u64>) -> BrokerResult<()> {
        let value = serde_json::to_vec(positions)
            .map_err(|e| BrokerError::internal("encode notification positions", e))?;
        let record =
            ProducerRecord::value(value).with_key(Bytes::from_static(POSITIONS_KEY.as_bytes()));
        let batch = encode_batch(&[record], None)
            .map_err(|e| BrokerError::internal("encode notification positions", e))?;
        self.broker
            .produce(ProduceRequest {
                topic: POSITIONS_TOPIC.to_string(),
                partition: 0,
                batch,
                acks: Acks::All,
            })
            .await
            .map(|_| ())
    }

    /// The last positions recorded in the compacted partition (led here).
    async fn rebuild(&self) -> BrokerResult<BTreeMap<u32, u64>> {
        let end = self
            .broker
            .settled_end(POSITIONS_TOPIC, 0, Duration::from_secs(10))
            .await?;
        let mut offset = self
            .broker
            .list_offsets(POSITIONS_TOPIC, 0, OffsetSpec::Earliest)?;
        let mut positions = BTreeMap::new();
        while offset < end {
            let fetched = self
                .broker
                .fetch(FetchRequest {
                    topic: POSITIONS_TOPIC.to_string(),
                    partition: 0,
                    offset,
                    max_bytes: 1 << 20,
                    max_wait: Duration::ZERO,
                })
                .await?;
            let records = decode_batches(fetched.batches, POSITIONS_TOPIC, 0, offset)
                .map_err(|e| BrokerError::internal("read notification positions", e))?;
            let Some(last) = records.last().map(|r| r.offset) else {
                break;
            };
            for r in records {
                if r.key.as_deref() == Some(POSITIONS_KEY.as_bytes())
                    && let Some(v) = r.value
                    && let Ok(p) = serde_json::from_slice(&v)
                {
                    positions = p;
                }
            }
            offset = last + 1;
        }
        tracing::info!(?positions, "device notification forwarder ready");
        Ok(positions)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::events::EventKind;

    #[test]
    fn a_subscription_takes_the_kinds_it_names_from_its_start() {
        let e = |kind: EventKind, at: u64| DeviceEvent {
            device_id: "d1".into(),
            event: kind,
            seq: 4,
            at,
            reason: "clean disconnect".into(),
            node: 2,
            product: "thermo".into(),
            session: Some("n2-7".into()),
            online_session: None,
            online_at: None,
            lost_session: None,
            meta_index: 0,
        };
        let s = Notifications {
            topic: "device-status".into(),
            events: vec!["offline".into(), "deleted".into()],
            since_ms: 1_000,
        };
        assert!(wanted(&s, &e(EventKind::Offline, 1_000)));
        assert!(!wanted(&s, &e(EventKind::Online, 2_000)));
        assert!(!wanted(&s, &e(EventKind::Offline, 999)));
        let r = notification(&e(EventKind::Offline, 1_000));
        assert_eq!(r.key.as_deref(), Some(&b"d1"[..]));
        let v: serde_json::Value =
            serde_json::from_slice(r.value.as_deref().expect("a value")).expect("JSON");
        assert_eq!(v["event"], "offline");
        assert_eq!(v["seq"], 4);
        assert_eq!(v["reason"], "clean disconnect");
        assert_eq!(v["at"], "1970-01-01T00:00:01.000Z");
        // Internal state of the stream stays out of it.
        assert!(v.get("session").is_none() && v.get("meta_index").is_none());
        assert_eq!(r.headers[1].1.as_deref(), Some(&b"4"[..]));
    }
}
