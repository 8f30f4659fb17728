//! Device shadows: the latest reported value (and when it was reported) of each property of
//! each device, a projection of the telemetry topics kept in the compacted system topic
//! `aq.device-shadows` (one partition, keyed by device id; the key `$positions` holds how
//! far each telemetry partition has been read — `$` is not allowed in device ids).
//!
//! The leader of that partition runs the projection: it reads every `aq.telemetry.*`
//! partition from its position (from whichever node leads it), folds the property reports
//! into the shadows, and appends the shadows that changed together with the new positions
//! (the positions last, so a batch that did not make it is read again; folding a report
//! again gives the same shadow). When a node gains that leadership it rebuilds the shadows
//! and positions from the compacted partition first, so every leader, and a reader of the
//! topic on any node, sees the same shadows.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use aqueduct_protocol::devices as pb;
use aqueduct_protocol::devices::devices_client::DevicesClient;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::telemetry::DLQ_TOPIC;
use crate::broker::records::{ProducerRecord, decode_batches, encode_batch};
use crate::broker::{
    Acks, Broker, BrokerError, BrokerResult, ErrorCode, FetchRequest, OffsetSpec, ProduceRequest,
    from_status,
};

pub const SHADOW_TOPIC: &str = "aq.device-shadows";
const POSITIONS_KEY: &str = "$positions";
const TELEMETRY_PREFIX: &str = "aq.telemetry.";
/// Shadows per appended batch.
const BATCH: usize = 500;

/// One reported property value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reported {
    pub value: Value,
    /// When the platform received the report (RFC 3339).
    pub at: String,
    /// The report's own `event_time`, when it gave one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_time: Option<String>,
}

/// A device's shadow.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Shadow {
    pub device_id: String,
    pub product: String,
    /// Service → property → its latest reported value.
    pub reported: BTreeMap<String, BTreeMap<String, Reported>>,
}

/// Folds one telemetry record value (`{device_id, product, topic, received_at, payload}`)
/// into the shadows when it is a property report; the device whose shadow changed.
pub fn fold_report(shadows: &mut HashMap<String, Shadow>, record: &Value) -> Option<String> {
    let topic = record.get("topic")?.as_str()?;
    if !topic.ends_with("/sys/properties/report") {
        return None;
    }
    let device_id = record.get("device_id")?.as_str()?;
    let at = record
        .get("received_at")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let services = record.get("payload")?.get("services")?.as_array()?;
    let shadow = shadows
        .entry(device_id.to_string())
        .or_insert_with(|| Shadow {
            device_id: device_id.to_string(),
            ..Shadow::default()
        });
    if let Some(product) = record.get("product").and_then(Value::as_str) {
        shadow.product = product.to_string();
    }
    for s in services {
        let (Some(service), Some(props)) = (
            s.get("service_id").and_then(Value::as_str),
            s.get("properties").and_then(Value::as_object),
        ) else {
            continue;
        };
        let event_time = s
            .get("event_time")
            .and_then(Value::as_str)
            .map(str::to_string);
        let reported = shadow.reported.entry(service.to_string()).or_default();
        for (name, value) in props {
            reported.insert(
                name.clone(),
                Reported {
                    value: value.clone(),
                    at: at.to_string(),
                    event_time: event_time.clone(),
                },
            );
        }
    }
    Some(device_id.to_string())
}

/// The projection's state, as of a leader term.
#[derive(Debug)]
struct State {
    term: i32,
    shadows: HashMap<String, Shadow>,
    /// `topic/partition` → the next telemetry offset to read.
    positions: BTreeMap<String, u64>,
}

/// The shadow projection and its reads (cheap to clone).
#[derive(Debug, Clone)]
pub struct Shadows {
    broker: Broker,
    replication_factor: Option<u16>,
    state: Arc<tokio::sync::Mutex<Option<State>>>,
}

impl Shadows {
    pub fn new(broker: Broker, replication_factor: Option<u16>) -> Self {
        Self {
            broker,
            replication_factor,
            state: Arc::default(),
        }
    }

    /// Runs the projection while this node leads the shadow partition; until the node stops.
    pub async fn run(self) {
        loop {
            match self.step().await {
                Ok(true) => {}
                Ok(false) => tokio::time::sleep(Duration::from_millis(300)).await,
                Err(e) => {
                    tracing::debug!(error = %e, "device shadows: retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    /// One pass over the telemetry partitions; whether it found anything new.
    async fn step(&self) -> BrokerResult<bool> {
        let telemetry: Vec<(String, u32)> = self
            .broker
            .topics()
            .topics()?
            .into_iter()
            .filter(|t| t.record.name.starts_with(TELEMETRY_PREFIX) && t.record.name != DLQ_TOPIC)
            .map(|t| (t.record.name, t.record.partitions))
            .collect();
        if telemetry.is_empty() {
            return Ok(false);
        }
        self.broker
            .topics()
            .ensure_system_with(
                SHADOW_TOPIC,
                1,
                self.replication_factor,
                &[("cleanup.policy", "compact")],
            )
            .await?;
        let mut guard = self.state.lock().await;
        if !self.broker.leads(SHADOW_TOPIC, 0) {
            *guard = None;
            return Ok(false);
        }
        let term = self.broker.leader_epoch(SHADOW_TOPIC, 0);
        if guard.as_ref().is_none_or(|s| s.term != term) {
            *guard = None;
            *guard = Some(self.rebuild(term).await?);
        }
        let Some(state) = guard.as_mut() else {
            unreachable!("rebuilt above");
        };
        let mut changed = BTreeSet::new();
        let mut moved = false;
        for (topic, partitions) in telemetry {
            for partition in 0..partitions {
                let key = format!("{topic}/{partition}");
                let from = state.positions.get(&key).copied().unwrap_or(0);
                let fetched = match self
                    .broker
                    .fetch_routed(FetchRequest {
                        topic: topic.clone(),
                        partition,
                        offset: from,
                        max_bytes: 1 << 20,
                        max_wait: Duration::ZERO,
                    })
                    .await
                {
                    Ok(f) => f,
                    Err(e) => {
                        tracing::debug!(%key, error = %e, "device shadows: telemetry not read");
                        continue;
                    }
                };
                let records = decode_batches(fetched.batches, &topic, partition, from)
                    .map_err(|e| BrokerError::internal("read telemetry", e))?;
                let Some(last) = records.last().map(|r| r.offset) else {
                    continue;
                };
                for r in records {
                    let Some(value) = r.value else { continue };
                    if let Ok(v) = serde_json::from_slice::<Value>(&value)
                        && let Some(device) = fold_report(&mut state.shadows, &v)
                    {
                        changed.insert(device);
                    }
                }
                state.positions.insert(key, last + 1);
                moved = true;
            }
        }
        if !moved {
            return Ok(false);
        }
        if let Err(e) = self.write(state, &changed).await {
            *guard = None;
            return Err(e);
        }
        Ok(true)
    }

    /// Appends the changed shadows, then the positions.
    async fn write(&self, state: &State, changed: &BTreeSet<String>) -> BrokerResult<()> {
        let mut records: Vec<ProducerRecord> = Vec::new();
        for device in changed {
            if let Some(s) = state.shadows.get(device) {
                records.push(
                    ProducerRecord::value(json_bytes(s)?)
                        .with_key(Bytes::from(device.clone().into_bytes())),
                );
            }
        }
        records.push(
            ProducerRecord::value(json_bytes(&state.positions)?)
                .with_key(Bytes::from_static(POSITIONS_KEY.as_bytes())),
        );
        for chunk in records.chunks(BATCH) {
            let batch = encode_batch(chunk, None)
                .map_err(|e| BrokerError::internal("encode device shadows", e))?;
            self.broker
                .produce(ProduceRequest {
                    topic: SHADOW_TOPIC.to_string(),
                    partition: 0,
                    batch,
                    acks: Acks::All,
                })
                .await?;
        }
        Ok(())
    }

    /// The shadows and positions from the compacted partition (last record of each key).
    async fn rebuild(&self, term: i32) -> BrokerResult<State> {
        let end = self
            .broker
            .settled_end(SHADOW_TOPIC, 0, Duration::from_secs(10))
            .await?;
        let mut offset = self
            .broker
            .list_offsets(SHADOW_TOPIC, 0, OffsetSpec::Earliest)?;
        let mut state = State {
            term,
            shadows: HashMap::new(),
            positions: BTreeMap::new(),
        };
        while offset < end {
            let fetched = self
                .broker
                .fetch(FetchRequest {
                    topic: SHADOW_TOPIC.to_string(),
                    partition: 0,
                    offset,
                    max_bytes: 4 << 20,
                    max_wait: Duration::ZERO,
                })
                .await?;
            let records = decode_batches(fetched.batches, SHADOW_TOPIC, 0, offset)
                .map_err(|e| BrokerError::internal("read device shadows", e))?;
            let Some(last) = records.last().map(|r| r.offset) else {
                break;
            };
            for r in records {
                let key = r
                    .key
                    .as_deref()
                    .map(String::from_utf8_lossy)
                    .unwrap_or_default();
                match (key.as_ref(), r.value) {
                    (POSITIONS_KEY, Some(v)) => {
                        if let Ok(p) = serde_json::from_slice(&v) {
                            state.positions = p;
                        }
                    }
                    (_, Some(v)) => {
                        if let Ok(s) = serde_json::from_slice::<Shadow>(&v) {
                            state.shadows.insert(s.device_id.clone(), s);
                        }
                    }
                    (device, None) => {
                        state.shadows.remove(device);
                    }
                }
            }
            offset = last + 1;
        }
        tracing::info!(
            term,
            devices = state.shadows.len(),
            "device shadow projection ready"
        );
        Ok(state)
    }

    /// Whether this node runs the projection.
    pub fn leads(&self) -> bool {
        self.broker.leads(SHADOW_TOPIC, 0)
    }

    /// A device's shadow, from the projection (here when this node runs it, else from the
    /// node that does). `None`: it never reported a property.
    pub async fn shadow(&self, device_id: &str) -> BrokerResult<Option<Shadow>> {
        if self.broker.leads(SHADOW_TOPIC, 0) {
            let guard = self.state.lock().await;
            let state = guard.as_ref().ok_or_else(|| {
                BrokerError::new(ErrorCode::TryAgain, "the device shadows are being loaded")
            })?;
            return Ok(state.shadows.get(device_id).cloned());
        }
        if self.broker.topics().topic(SHADOW_TOPIC)?.is_none() {
            return Ok(None);
        }
        let channel = self.broker.leader_channel(SHADOW_TOPIC, 0)?;
        let mut request = tonic::Request::new(pb::GetShadowRequest {
            device_id: device_id.to_string(),
        });
        request.set_timeout(Duration::from_secs(5));
        let reply = DevicesClient::new(channel)
            .get_shadow(request)
            .await
            .map_err(|s| from_status(&s))?
            .into_inner();
        if reply.shadow_json.is_empty() {
            return Ok(None);
        }
        serde_json::from_str(&reply.shadow_json)
            .map(Some)
            .map_err(|e| BrokerError::internal("read a device shadow", e))
    }
}

fn json_bytes<T: Serialize>(v: &T) -> BrokerResult<Vec<u8>> {
    serde_json::to_vec(v).map_err(|e| BrokerError::internal("encode a device shadow", e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reports_fold_into_the_latest_value_of_each_property() {
        let mut shadows = HashMap::new();
        let report = |t: f64, at: &str| {
            json!({"device_id":"d1","product":"thermo","topic":"$oc/devices/d1/sys/properties/report",
                   "received_at": at,
                   "payload":{"services":[{"service_id":"env","properties":{"temperature":t},
                                           "event_time":"20261207T101500Z"}]}})
        };
        assert_eq!(
            fold_report(&mut shadows, &report(20.5, "t1")).as_deref(),
            Some("d1")
        );
        assert_eq!(
            fold_report(&mut shadows, &report(21.0, "t2")).as_deref(),
            Some("d1")
        );
        // Messages up are not property reports.
        let message =
            json!({"device_id":"d1","topic":"$oc/devices/d1/sys/messages/up","payload":"x"});
        assert_eq!(fold_report(&mut shadows, &message), None);
        let env = &shadows["d1"].reported["env"];
        assert_eq!(env["temperature"].value, json!(21.0));
        assert_eq!(env["temperature"].at, "t2");
        assert_eq!(
            env["temperature"].event_time.as_deref(),
            Some("20261207T101500Z")
        );
        // Folding the same report again (read twice after a failover) changes nothing.
        let before = shadows.clone();
        fold_report(&mut shadows, &report(21.0, "t2"));
        assert_eq!(shadows, before);
        let back: Shadow =
            serde_json::from_slice(&serde_json::to_vec(&shadows["d1"]).expect("encode"))
                .expect("decode");
        assert_eq!(back, shadows["d1"]);
    }
}
