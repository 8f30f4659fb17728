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
//!
//! A shadow also holds **desired** property values (`device set-desired`, any node, passed
//! on to the projection's leader, which checks them against the thing model and appends
//! the shadow before it answers). The leader sends them to the device as a property set
//! (through [`Commands`], so through whichever node holds the session) at once, and again
//! whenever `aq.device-events` — which it follows too — records the device coming online;
//! what the device accepted (`result_code` 0) is removed from the shadow. A device's
//! `deleted` event removes its shadow (a tombstone in the compacted topic).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aqueduct_protocol::devices as pb;
use aqueduct_protocol::devices::devices_client::DevicesClient;
use aqueduct_raft::network::call_within;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::commands::{Commands, Kind, Request};
use super::events::{DeviceEvent, EVENTS_TOPIC, EventKind};
use super::telemetry::{DLQ_TOPIC, rfc3339_ms};
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

/// A desired property value: kept until the device accepts it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Desired {
    pub value: Value,
    /// When it was set (RFC 3339).
    pub at: String,
}

/// A device's shadow.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Shadow {
    pub device_id: String,
    pub product: String,
    /// Service → property → its latest reported value.
    pub reported: BTreeMap<String, BTreeMap<String, Reported>>,
    /// Service → property → the value wanted, not yet accepted by the device.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub desired: BTreeMap<String, BTreeMap<String, Desired>>,
}

/// What a device event means for the shadows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventEffect {
    Nothing,
    /// The device came online with desired values pending: send them.
    Deliver(String),
    /// The device was deleted: its shadow is gone.
    Removed(String),
}

/// Folds one `aq.device-events` record into the shadows.
pub fn fold_event(shadows: &mut HashMap<String, Shadow>, event: &DeviceEvent) -> EventEffect {
    match event.event {
        EventKind::Online
            if shadows
                .get(&event.device_id)
                .is_some_and(|s| !s.desired.is_empty()) =>
        {
            EventEffect::Deliver(event.device_id.clone())
        }
        EventKind::Deleted => match shadows.remove(&event.device_id) {
            Some(_) => EventEffect::Removed(event.device_id.clone()),
            None => EventEffect::Nothing,
        },
        _ => EventEffect::Nothing,
    }
}

/// Sets desired values of `service` in `shadow`.
pub fn set_desired(shadow: &mut Shadow, service: &str, values: &Map<String, Value>, at: &str) {
    let desired = shadow.desired.entry(service.to_string()).or_default();
    for (name, value) in values {
        desired.insert(
            name.clone(),
            Desired {
                value: value.clone(),
                at: at.to_string(),
            },
        );
    }
}

/// Removes from `shadow` the desired values of `service` the device accepted (those `sent`,
/// unless set again since); whether anything was removed.
pub fn accepted(shadow: &mut Shadow, service: &str, sent: &BTreeMap<String, Desired>) -> bool {
    let Some(desired) = shadow.desired.get_mut(service) else {
        return false;
    };
    let before = desired.len();
    desired.retain(|name, d| sent.get(name) != Some(d));
    let removed = desired.len() != before;
    if desired.is_empty() {
        shadow.desired.remove(service);
    }
    removed
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

/// How long a device has to answer the property set carrying its desired values.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(30);

/// The shadow projection and its reads (cheap to clone).
#[derive(Debug, Clone)]
pub struct Shadows {
    broker: Broker,
    commands: Commands,
    replication_factor: Option<u16>,
    state: Arc<tokio::sync::Mutex<Option<State>>>,
    /// Devices whose desired values are being sent → whether to look again when done.
    delivering: Arc<Mutex<HashMap<String, bool>>>,
}

impl Shadows {
    pub fn new(broker: Broker, commands: Commands, replication_factor: Option<u16>) -> Self {
        Self {
            broker,
            commands,
            replication_factor,
            state: Arc::default(),
            delivering: Arc::default(),
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

    /// The projection's state, rebuilt from the log first when this node's leadership of
    /// the shadow partition is new; None where this node does not lead it. Devices with
    /// desired values pending are sent them after a rebuild (the previous leader may have
    /// stopped while sending).
    async fn current<'a>(
        &self,
        guard: &'a mut tokio::sync::MutexGuard<'_, Option<State>>,
    ) -> BrokerResult<Option<&'a mut State>> {
        if !self.broker.leads(SHADOW_TOPIC, 0) {
            **guard = None;
            return Ok(None);
        }
        let term = self.broker.leader_epoch(SHADOW_TOPIC, 0);
        if guard.as_ref().is_none_or(|s| s.term != term) {
            **guard = None;
            let state = self.rebuild(term).await?;
            for (device, shadow) in &state.shadows {
                if !shadow.desired.is_empty() {
                    self.deliver(device);
                }
            }
            **guard = Some(state);
        }
        Ok(guard.as_mut())
    }

    async fn ensure_topic(&self) -> BrokerResult<()> {
        self.broker
            .topics()
            .ensure_system_with(
                SHADOW_TOPIC,
                1,
                self.replication_factor,
                &[("cleanup.policy", "compact")],
            )
            .await
            .map(|_| ())
    }

    /// One pass over the telemetry and device event partitions; whether it found anything
    /// new.
    async fn step(&self) -> BrokerResult<bool> {
        let sources: Vec<(String, u32)> = self
            .broker
            .topics()
            .topics()?
            .into_iter()
            .filter(|t| {
                let name = &t.record.name;
                (name.starts_with(TELEMETRY_PREFIX) && name != DLQ_TOPIC) || name == EVENTS_TOPIC
            })
            .map(|t| (t.record.name, t.record.partitions))
            .collect();
        // No telemetry yet and no shadow topic (no desired value was ever set): nothing to
        // keep, and no topic is created for it.
        let telemetry = sources.iter().any(|(name, _)| name != EVENTS_TOPIC);
        if !telemetry && self.broker.topics().topic(SHADOW_TOPIC)?.is_none() {
            return Ok(false);
        }
        self.ensure_topic().await?;
        let mut guard = self.state.lock().await;
        let Some(state) = self.current(&mut guard).await? else {
            return Ok(false);
        };
        let mut changed = BTreeSet::new();
        let mut to_deliver = BTreeSet::new();
        let mut moved = false;
        for (topic, partitions) in sources {
            for partition in 0..partitions {
                let key = format!("{topic}/{partition}");
                let from = state.positions.get(&key).copied().unwrap_or(0);
                let records = match self
                    .broker
                    .read_routed(&topic, partition, from, Duration::ZERO)
                    .await
                {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::debug!(%key, error = %e, "device shadows: source not read");
                        continue;
                    }
                };
                let Some(last) = records.last().map(|r| r.offset) else {
                    continue;
                };
                for r in records {
                    let Some(value) = r.value else { continue };
                    if topic == EVENTS_TOPIC {
                        let Ok(event) = serde_json::from_slice::<DeviceEvent>(&value) else {
                            continue;
                        };
                        match fold_event(&mut state.shadows, &event) {
                            EventEffect::Deliver(device) => {
                                to_deliver.insert(device);
                            }
                            EventEffect::Removed(device) => {
                                to_deliver.remove(&device);
                                changed.insert(device);
                            }
                            EventEffect::Nothing => {}
                        }
                    } else if let Ok(v) = serde_json::from_slice::<Value>(&value)
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
        if let Err(e) = self.write(state, &changed, true).await {
            *guard = None;
            return Err(e);
        }
        drop(guard);
        for device in &to_deliver {
            self.deliver(device);
        }
        Ok(true)
    }

    /// Appends the changed shadows (a tombstone for one that is gone), then the positions
    /// when `positions`.
    async fn write(
        &self,
        state: &State,
        changed: &BTreeSet<String>,
        positions: bool,
    ) -> BrokerResult<()> {
        let mut records: Vec<ProducerRecord> = Vec::new();
        for device in changed {
            let key = Bytes::from(device.clone().into_bytes());
            records.push(match state.shadows.get(device) {
                Some(s) => ProducerRecord::value(json_bytes(s)?).with_key(key),
                None => ProducerRecord {
                    key: Some(key),
                    ..ProducerRecord::default()
                },
            });
        }
        if positions {
            records.push(
                ProducerRecord::value(json_bytes(&state.positions)?)
                    .with_key(Bytes::from_static(POSITIONS_KEY.as_bytes())),
            );
        }
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

    /// Sets desired values of a device (`values` empty and `clear`: withdraws them all):
    /// checked against its thing model (writable properties of one service), appended to
    /// its shadow on the leader of the shadow partition (this node, or the one the request
    /// is passed on to), then sent to the device if it is online. The shadow as appended.
    pub async fn set_desired(
        &self,
        device_id: &str,
        service_id: &str,
        values: Map<String, Value>,
        clear: bool,
        forwarded: bool,
    ) -> BrokerResult<Shadow> {
        let invalid = |why: &str| Err(BrokerError::new(ErrorCode::InvalidConfig, why.to_string()));
        let (product, service) = match (clear, values.is_empty()) {
            (true, true) => match self.commands.check(&Request {
                device_id: device_id.to_string(),
                kind: Kind::GetProperties,
                service_id: String::new(),
                command_name: String::new(),
                params: Value::Null,
                timeout: DELIVERY_TIMEOUT,
            }) {
                Ok((device, _, _)) => (device.product, String::new()),
                Err(e) if e.code == ErrorCode::NotFound => return Err(e),
                // A model with several services: the device exists, which is all a clear needs.
                Err(_) => (String::new(), String::new()),
            },
            (true, false) => return invalid("--clear takes no values"),
            (false, true) => return invalid("no desired values given: name at least one property"),
            (false, false) => {
                let (device, service, _) = self.commands.check(&Request {
                    device_id: device_id.to_string(),
                    kind: Kind::SetProperties,
                    service_id: service_id.to_string(),
                    command_name: String::new(),
                    params: Value::Object(values.clone()),
                    timeout: DELIVERY_TIMEOUT,
                })?;
                (device.product, service)
            }
        };
        self.ensure_topic().await?;
        if !self.broker.leads(SHADOW_TOPIC, 0) {
            if forwarded {
                return Err(BrokerError::new(
                    ErrorCode::NotLeader,
                    "this node does not keep the device shadows",
                ));
            }
            return self
                .forward_desired(device_id, &service, &values, clear)
                .await;
        }
        let mut guard = self.state.lock().await;
        let state = self.current(&mut guard).await?.ok_or_else(|| {
            BrokerError::new(ErrorCode::NotLeader, "the device shadows moved; retry")
        })?;
        let shadow = state
            .shadows
            .entry(device_id.to_string())
            .or_insert_with(|| Shadow {
                device_id: device_id.to_string(),
                ..Shadow::default()
            });
        if !product.is_empty() {
            shadow.product = product;
        }
        if clear {
            shadow.desired.clear();
        } else {
            set_desired(shadow, &service, &values, &rfc3339_ms(super::now_ms()));
        }
        let shadow = shadow.clone();
        let changed = BTreeSet::from([device_id.to_string()]);
        if let Err(e) = self.write(state, &changed, false).await {
            // Whether it was appended is unknown: the next leader term reads it back.
            *guard = None;
            return Err(e);
        }
        drop(guard);
        self.deliver(device_id);
        Ok(shadow)
    }

    async fn forward_desired(
        &self,
        device_id: &str,
        service_id: &str,
        values: &Map<String, Value>,
        clear: bool,
    ) -> BrokerResult<Shadow> {
        let channel = self.broker.leader_channel(SHADOW_TOPIC, 0)?;
        let request = pb::SetDesiredRequest {
            device_id: device_id.to_string(),
            service_id: service_id.to_string(),
            params_json: Value::Object(values.clone()).to_string(),
            forwarded: true,
            clear,
        };
        let reply = call_within(Duration::from_secs(10), request, |r| async move {
            DevicesClient::new(channel).set_desired(r).await
        })
        .await
        .map_err(|s| from_status(&s))?;
        serde_json::from_str(&reply.shadow_json)
            .map_err(|e| BrokerError::internal("read a device shadow", e))
    }

    /// Sends `device_id`'s desired values to it in the background, one property set per
    /// service, and removes what it accepted; a device offline or not answering keeps them
    /// for its next online event. One delivery per device at a time (a second request looks
    /// again when the first ends).
    fn deliver(&self, device_id: &str) {
        {
            let mut delivering = self.delivering.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(again) = delivering.get_mut(device_id) {
                *again = true;
                return;
            }
            delivering.insert(device_id.to_string(), false);
        }
        let me = self.clone();
        let device_id = device_id.to_string();
        tokio::spawn(async move {
            loop {
                me.deliver_once(&device_id).await;
                let mut delivering = me.delivering.lock().unwrap_or_else(|p| p.into_inner());
                match delivering.get_mut(&device_id) {
                    Some(again) if *again => *again = false,
                    _ => {
                        delivering.remove(&device_id);
                        return;
                    }
                }
            }
        });
    }

    async fn deliver_once(&self, device_id: &str) {
        let wanted = {
            let guard = self.state.lock().await;
            match guard.as_ref().and_then(|s| s.shadows.get(device_id)) {
                Some(s) => s.desired.clone(),
                None => return,
            }
        };
        for (service, values) in wanted {
            let params = values
                .iter()
                .map(|(k, d)| (k.clone(), d.value.clone()))
                .collect();
            let answer = self
                .commands
                .send(Request {
                    device_id: device_id.to_string(),
                    kind: Kind::SetProperties,
                    service_id: service.clone(),
                    command_name: String::new(),
                    params: Value::Object(params),
                    timeout: DELIVERY_TIMEOUT,
                })
                .await;
            match answer {
                Ok(a) if a.response.get("result_code").and_then(Value::as_i64) == Some(0) => {
                    if let Err(e) = self.accepted(device_id, &service, &values).await {
                        tracing::warn!(device = device_id, error = %e,
                            "desired values accepted by the device but not removed from its shadow");
                    }
                }
                Ok(a) => {
                    tracing::info!(device = device_id, service, response = %a.response,
                        "the device refused its desired values; kept for its next connection");
                }
                Err(e) => {
                    tracing::debug!(device = device_id, error = %e,
                        "desired values not delivered; kept for the device's next connection");
                    return;
                }
            }
        }
    }

    /// Removes the desired values of `service` the device accepted and appends the shadow.
    async fn accepted(
        &self,
        device_id: &str,
        service: &str,
        sent: &BTreeMap<String, Desired>,
    ) -> BrokerResult<()> {
        let mut guard = self.state.lock().await;
        let Some(state) = self.current(&mut guard).await? else {
            return Ok(());
        };
        let Some(shadow) = state.shadows.get_mut(device_id) else {
            return Ok(());
        };
        if !accepted(shadow, service, sent) {
            return Ok(());
        }
        let changed = BTreeSet::from([device_id.to_string()]);
        if let Err(e) = self.write(state, &changed, false).await {
            *guard = None;
            return Err(e);
        }
        Ok(())
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
        let request = pb::GetShadowRequest {
            device_id: device_id.to_string(),
        };
        let reply = call_within(Duration::from_secs(5), request, |r| async move {
            DevicesClient::new(channel).get_shadow(r).await
        })
        .await
        .map_err(|s| from_status(&s))?;
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

    fn event(device: &str, kind: EventKind) -> DeviceEvent {
        DeviceEvent {
            device_id: device.to_string(),
            event: kind,
            seq: 1,
            at: 0,
            reason: String::new(),
            node: 1,
            product: "boiler".into(),
            session: None,
            online_session: None,
            online_at: None,
            lost_session: None,
            meta_index: 0,
        }
    }

    #[test]
    fn desired_values_are_sent_on_online_and_removed_once_accepted() {
        let mut shadows = HashMap::new();
        let mut shadow = Shadow {
            device_id: "b1".into(),
            ..Shadow::default()
        };
        let values = |v: Value| v.as_object().cloned().expect("an object");
        set_desired(&mut shadow, "env", &values(json!({"target": 21})), "t1");
        assert_eq!(shadow.desired["env"]["target"].value, json!(21));
        let sent = shadow.desired["env"].clone();
        shadows.insert("b1".to_string(), shadow);
        assert_eq!(
            fold_event(&mut shadows, &event("b1", EventKind::Online)),
            EventEffect::Deliver("b1".into())
        );
        assert_eq!(
            fold_event(&mut shadows, &event("b1", EventKind::Offline)),
            EventEffect::Nothing
        );
        assert_eq!(
            fold_event(&mut shadows, &event("b2", EventKind::Online)),
            EventEffect::Nothing
        );
        // Set again while the first value was on its way: the newer one stays.
        let b1 = shadows.get_mut("b1").expect("b1");
        set_desired(b1, "env", &values(json!({"target": 22})), "t3");
        assert!(!accepted(b1, "env", &sent));
        assert_eq!(b1.desired["env"]["target"].value, json!(22));
        let sent = b1.desired["env"].clone();
        assert!(accepted(b1, "env", &sent));
        assert!(b1.desired.is_empty());
        // Nothing desired: coming online sends nothing; deleted removes the shadow.
        assert_eq!(
            fold_event(&mut shadows, &event("b1", EventKind::Online)),
            EventEffect::Nothing
        );
        assert_eq!(
            fold_event(&mut shadows, &event("b1", EventKind::Deleted)),
            EventEffect::Removed("b1".into())
        );
        assert!(shadows.is_empty());
        // A shadow without desired values reads as before (and old records still decode).
        let old: Shadow =
            serde_json::from_value(json!({"device_id":"b1","product":"boiler","reported":{}}))
                .expect("decode");
        assert!(old.desired.is_empty());
        assert!(
            !serde_json::to_string(&old)
                .expect("encode")
                .contains("desired")
        );
    }

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
