//! Requests to devices: commands, property set and property get. Each is checked against
//! the product's thing model, sent on the device's down topic (DESIGN.md §7:
//! `commands/request_id={id}`, `properties/set/request_id={id}`,
//! `properties/get/request_id={id}`) through whichever node holds its session, and answered
//! by the device's response on the matching `…/response/request_id={id}` topic. Every
//! request and its outcome (the response, a timeout, the device offline) are recorded in
//! `aq.device-commands`, keyed by device id.
//!
//! * [`Sessions`]: this node's device sessions that can be written to (the MQTT front
//!   attaches each connected device and hands it the responses its devices publish), and
//!   the requests waiting for a response.
//! * [`Commands`]: the requester, on any node: checks, records, delivers here or asks every
//!   other node (`Devices.Deliver`), and records the outcome.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aqueduct_protocol::devices as pb;
use aqueduct_protocol::devices::devices_client::DevicesClient;
use aqueduct_raft::network::call_within;
use bytes::Bytes;
use serde_json::{Map, Value, json};
use tokio::sync::{mpsc, oneshot};

use super::model::ThingModel;
use super::records::DeviceRecord;
use super::{Registry, now_ms};
use crate::broker::records::ProducerRecord;
use crate::broker::routed::{Partitioning, RoutedProducer};
use crate::broker::{Broker, BrokerError, BrokerResult, ErrorCode};

/// Where requests and their outcomes are recorded.
pub const COMMANDS_TOPIC: &str = "aq.device-commands";
/// Longest a requester waits for a device's response.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(300);

/// What is asked of a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Command,
    SetProperties,
    GetProperties,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Command => "command",
            Kind::SetProperties => "set_properties",
            Kind::GetProperties => "get_properties",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [Kind::Command, Kind::SetProperties, Kind::GetProperties]
            .into_iter()
            .find(|k| k.as_str() == s)
    }

    /// The device's down topic for request `request_id`.
    pub fn topic(self, device_id: &str, request_id: &str) -> String {
        let what = match self {
            Kind::Command => "commands",
            Kind::SetProperties => "properties/set",
            Kind::GetProperties => "properties/get",
        };
        format!("$oc/devices/{device_id}/sys/{what}/request_id={request_id}")
    }
}

/// A request as asked for (by the CLI, over gRPC).
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub device_id: String,
    pub kind: Kind,
    /// Empty: the service is found in the model (the one with that command or those
    /// properties).
    pub service_id: String,
    /// Commands only.
    pub command_name: String,
    /// Command parameters, or the properties to set (an object); unused by get.
    pub params: Value,
    pub timeout: Duration,
}

/// A message for a device, written by its session.
#[derive(Debug)]
pub struct Down {
    pub topic: String,
    pub payload: Bytes,
    /// Whether the session wrote it (false: the device has not subscribed to the topic).
    pub written: oneshot::Sender<bool>,
}

/// How a delivery on this node ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivered {
    /// No session of the device here.
    NotHere,
    /// A node that may hold the session did not answer (never sent between nodes).
    Unreachable(String),
    /// The device has not subscribed to its request topic.
    NotSubscribed,
    /// Written; no response within the timeout.
    TimedOut,
    /// The device's response payload.
    Answered(Bytes),
}

#[derive(Debug, Default)]
struct SessionsInner {
    /// Device id → (session id, its way down).
    by_device: HashMap<String, (u64, mpsc::Sender<Down>)>,
    /// Request id → who waits for the response (and from which device).
    waiting: HashMap<String, (String, oneshot::Sender<Bytes>)>,
}

/// This node's writable device sessions (cheap to clone).
#[derive(Debug, Clone, Default)]
pub struct Sessions {
    inner: Arc<Mutex<SessionsInner>>,
}

impl Sessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, SessionsInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A device session started here (replacing an older one of the device).
    pub fn attach(&self, device_id: &str, session: u64, down: mpsc::Sender<Down>) {
        self.lock()
            .by_device
            .insert(device_id.to_string(), (session, down));
    }

    /// The session ended (unless a newer one of the device replaced it).
    pub fn detach(&self, device_id: &str, session: u64) {
        let mut s = self.lock();
        if s.by_device
            .get(device_id)
            .is_some_and(|(id, _)| *id == session)
        {
            s.by_device.remove(device_id);
        }
    }

    /// A device's response to `request_id`: given to the request waiting for it. False
    /// when none waits (late, or not asked of this device).
    pub fn respond(&self, device_id: &str, request_id: &str, payload: Bytes) -> bool {
        let mut s = self.lock();
        match s.waiting.get(request_id) {
            Some((device, _)) if device == device_id => {}
            _ => return false,
        }
        let Some((_, tx)) = s.waiting.remove(request_id) else {
            return false;
        };
        tx.send(payload).is_ok()
    }

    /// Writes `payload` on `topic` to the device's session here, then waits up to `timeout`
    /// for its response to `request_id`.
    pub async fn deliver(
        &self,
        device_id: &str,
        request_id: &str,
        topic: String,
        payload: Bytes,
        timeout: Duration,
    ) -> Delivered {
        let Some(down) = self.lock().by_device.get(device_id).map(|(_, d)| d.clone()) else {
            return Delivered::NotHere;
        };
        let deadline = tokio::time::Instant::now() + timeout;
        let (answer, answered) = oneshot::channel();
        self.lock()
            .waiting
            .insert(request_id.to_string(), (device_id.to_string(), answer));
        // No longer waited for once this returns, or once the caller gives up.
        let _waiting = Waiting {
            sessions: self,
            request_id,
        };
        let (written, was_written) = oneshot::channel();
        let write = async {
            down.send(Down {
                topic,
                payload,
                written,
            })
            .await
            .ok()?;
            was_written.await.ok()
        };
        match tokio::time::timeout_at(deadline, write).await {
            Ok(Some(true)) => match tokio::time::timeout_at(deadline, answered).await {
                Ok(Ok(response)) => Delivered::Answered(response),
                _ => Delivered::TimedOut,
            },
            Ok(Some(false)) => Delivered::NotSubscribed,
            // The session ended meanwhile.
            Ok(None) => Delivered::NotHere,
            // The session did not take the request in time (its device reads slowly).
            Err(_) => Delivered::TimedOut,
        }
    }
}

/// A request waiting for its response, forgotten when dropped.
struct Waiting<'a> {
    sessions: &'a Sessions,
    request_id: &'a str,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.sessions.lock().waiting.remove(self.request_id);
    }
}

/// Asks devices (cheap to clone).
#[derive(Debug, Clone)]
pub struct Commands {
    registry: Registry,
    broker: Broker,
    sessions: Sessions,
    producer: RoutedProducer,
    shape: (u32, Option<u16>),
}

/// What a device answered.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub request_id: String,
    pub response: Value,
}

fn refuse(code: ErrorCode, message: impl Into<String>) -> BrokerError {
    BrokerError::new(code, message)
}

impl Commands {
    pub fn new(
        registry: Registry,
        broker: Broker,
        sessions: Sessions,
        partitions: u32,
        replication_factor: Option<u16>,
    ) -> Self {
        Self {
            registry,
            producer: RoutedProducer::new(broker.clone()),
            broker,
            sessions,
            shape: (partitions.max(1), replication_factor),
        }
    }

    pub fn sessions(&self) -> &Sessions {
        &self.sessions
    }

    /// The device `req` is for, the model's service it addresses and the payload for the
    /// device, once `req` is checked against the device's thing model. Refused: NOT_FOUND (no
    /// such device or product), INVALID_CONFIG (naming what does not fit the model).
    pub fn check(&self, req: &Request) -> BrokerResult<(DeviceRecord, String, Value)> {
        let device = self.registry.device(&req.device_id)?.ok_or_else(|| {
            refuse(
                ErrorCode::NotFound,
                format!("device {} does not exist", req.device_id),
            )
        })?;
        let model = self
            .registry
            .product(&device.product)?
            .map(|p| p.model)
            .ok_or_else(|| {
                refuse(
                    ErrorCode::NotFound,
                    format!("product {} does not exist", device.product),
                )
            })?;
        let (service_id, body) =
            request_body(&model, req).map_err(|e| refuse(ErrorCode::InvalidConfig, e))?;
        Ok((device, service_id, body))
    }

    /// Checks `req`, records it, delivers it and waits for the device's response (recorded
    /// too). Refused: NOT_FOUND (no such device), INVALID_CONFIG (against the model),
    /// DEVICE_OFFLINE, TIMED_OUT.
    pub async fn send(&self, req: Request) -> BrokerResult<Answer> {
        let (device, service_id, body) = self.check(&req)?;
        let timeout = req.timeout.clamp(Duration::from_millis(100), MAX_TIMEOUT);
        let request_id = new_request_id();
        let topic = req.kind.topic(&req.device_id, &request_id);
        let mut record = json!({
            "request_id": request_id,
            "device_id": req.device_id,
            "product": device.product,
            "kind": req.kind.as_str(),
            "service_id": service_id,
            "topic": topic,
            "request": body,
            "node": self.broker.node_id(),
        });
        if req.kind == Kind::Command {
            record["command_name"] = json!(req.command_name);
        }
        self.record(&req.device_id, "sent", record.clone()).await?;
        let payload = Bytes::from(serde_json::to_vec(&body).unwrap_or_default());
        let outcome = self
            .deliver_anywhere(&req.device_id, &request_id, topic, payload, timeout)
            .await;
        let (status, result) = match outcome {
            Delivered::Answered(bytes) => {
                let response = serde_json::from_slice::<Value>(&bytes)
                    .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()));
                ("answered", Ok(response))
            }
            Delivered::TimedOut => (
                "timed_out",
                Err(refuse(
                    ErrorCode::TimedOut,
                    format!(
                        "device {} did not answer request {request_id} within {} ms",
                        req.device_id,
                        timeout.as_millis()
                    ),
                )),
            ),
            Delivered::NotSubscribed => (
                "not_subscribed",
                Err(refuse(
                    ErrorCode::DeviceOffline,
                    format!(
                        "device {} is connected but has not subscribed to its {} topic",
                        req.device_id,
                        req.kind.as_str()
                    ),
                )),
            ),
            Delivered::NotHere => (
                "offline",
                Err(refuse(
                    ErrorCode::DeviceOffline,
                    format!("device {} is offline", req.device_id),
                )),
            ),
            Delivered::Unreachable(why) => (
                "unreachable",
                Err(refuse(
                    ErrorCode::TryAgain,
                    format!(
                        "device {} is not connected to a node that answered ({why}); \
                         whether it is online is not known",
                        req.device_id
                    ),
                )),
            ),
        };
        let mut outcome = json!({
            "request_id": request_id,
            "device_id": req.device_id,
            "product": device.product,
            "kind": req.kind.as_str(),
            "node": self.broker.node_id(),
        });
        if let Ok(response) = &result {
            outcome["response"] = response.clone();
        }
        if let Err(e) = self.record(&req.device_id, status, outcome).await {
            tracing::warn!(request_id, error = %e, "the outcome of a device request not recorded");
        }
        result.map(|response| Answer {
            request_id,
            response,
        })
    }

    /// Appends `value` with its `status` and time to `aq.device-commands`.
    async fn record(&self, device_id: &str, status: &str, mut value: Value) -> BrokerResult<()> {
        value["status"] = json!(status);
        value["at"] = json!(now_ms());
        self.broker
            .topics()
            .ensure_system(COMMANDS_TOPIC, self.shape.0, self.shape.1)
            .await?;
        let bytes = serde_json::to_vec(&value)
            .map_err(|e| BrokerError::internal("encode a device request", e))?;
        let record = ProducerRecord::value(bytes).with_key(device_id.as_bytes().to_vec());
        self.producer
            .send(COMMANDS_TOPIC, Partitioning::ByKey, vec![record])
            .await?;
        Ok(())
    }

    /// Delivers here when the session is here, else on whichever other node answers that it
    /// holds it.
    async fn deliver_anywhere(
        &self,
        device_id: &str,
        request_id: &str,
        topic: String,
        payload: Bytes,
        timeout: Duration,
    ) -> Delivered {
        let here = self
            .sessions
            .deliver(
                device_id,
                request_id,
                topic.clone(),
                payload.clone(),
                timeout,
            )
            .await;
        if here != Delivered::NotHere {
            return here;
        }
        let me = self.broker.node_id();
        let nodes = self
            .registry
            .controller()
            .state()
            .nodes()
            .unwrap_or_default();
        let asks = nodes
            .into_iter()
            .filter(|n| n.node_id != me && self.broker.node_alive(n.node_id))
            .map(|n| {
                let this = self.clone();
                let req = pb::DeliverRequest {
                    device_id: device_id.to_string(),
                    request_id: request_id.to_string(),
                    topic: topic.clone(),
                    payload: payload.to_vec(),
                    timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
                };
                async move { this.ask(&n.addr, req, timeout).await }
            });
        // The first answer ends it; otherwise the most telling outcome.
        let mut asks: futures_util::stream::FuturesUnordered<_> = asks.collect();
        let mut outcome = Delivered::NotHere;
        while let Some(d) = futures_util::StreamExt::next(&mut asks).await {
            if matches!(d, Delivered::Answered(_)) {
                return d;
            }
            if d.rank() > outcome.rank() {
                outcome = d;
            }
        }
        outcome
    }

    /// One other node's delivery.
    async fn ask(&self, addr: &str, req: pb::DeliverRequest, timeout: Duration) -> Delivered {
        let channel = match self.broker.channels().get(addr) {
            Ok(c) => c,
            Err(e) => return Delivered::Unreachable(format!("{addr}: {e}")),
        };
        let limit = timeout + Duration::from_secs(5);
        match call_within(limit, req, |r| async move {
            DevicesClient::new(channel).deliver(r).await
        })
        .await
        {
            Ok(reply) => delivered_from_pb(reply),
            Err(s) => {
                tracing::debug!(addr, error = %s, "asking a node for a device session");
                Delivered::Unreachable(format!("{addr}: {}", s.message()))
            }
        }
    }
}

pub fn delivered_pb(d: Delivered) -> pb::DeliverReply {
    let (outcome, response) = match d {
        Delivered::NotHere | Delivered::Unreachable(_) => {
            (pb::deliver_reply::Outcome::NotHere, Vec::new())
        }
        Delivered::NotSubscribed => (pb::deliver_reply::Outcome::NotSubscribed, Vec::new()),
        Delivered::TimedOut => (pb::deliver_reply::Outcome::TimedOut, Vec::new()),
        Delivered::Answered(b) => (pb::deliver_reply::Outcome::Answered, b.to_vec()),
    };
    pb::DeliverReply {
        outcome: outcome as i32,
        response,
    }
}

impl Delivered {
    /// How much an outcome tells of the device, when several nodes were asked.
    fn rank(&self) -> u8 {
        match self {
            Delivered::NotHere => 0,
            Delivered::Unreachable(_) => 1,
            Delivered::NotSubscribed => 2,
            Delivered::TimedOut => 3,
            Delivered::Answered(_) => 4,
        }
    }
}

fn delivered_from_pb(r: pb::DeliverReply) -> Delivered {
    match pb::deliver_reply::Outcome::try_from(r.outcome) {
        Ok(pb::deliver_reply::Outcome::Answered) => Delivered::Answered(Bytes::from(r.response)),
        Ok(pb::deliver_reply::Outcome::TimedOut) => Delivered::TimedOut,
        Ok(pb::deliver_reply::Outcome::NotSubscribed) => Delivered::NotSubscribed,
        _ => Delivered::NotHere,
    }
}

fn new_request_id() -> String {
    let bytes: [u8; 8] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The service a request is for and the payload sent to the device, or why the request
/// does not fit the model (naming the service, command or property).
pub fn request_body(model: &ThingModel, req: &Request) -> Result<(String, Value), String> {
    let pick = |found: &dyn Fn(&super::model::Service) -> bool, what: &str| {
        if !req.service_id.is_empty() {
            return model
                .service(&req.service_id)
                .ok_or_else(|| format!("service {:?} is not in the model", req.service_id));
        }
        let mut matching = model.services.iter().filter(|s| found(s));
        match (matching.next(), matching.next()) {
            (Some(s), None) => Ok(s),
            (None, _) => Err(format!("no service of the model has {what}")),
            (Some(a), Some(b)) => Err(format!(
                "services {:?} and {:?} both have {what}: name one with --service",
                a.service_id, b.service_id
            )),
        }
    };
    let object = |v: &Value| -> Result<Map<String, Value>, String> {
        match v {
            Value::Object(m) => Ok(m.clone()),
            Value::Null => Ok(Map::new()),
            other => Err(format!("the parameters must be a JSON object, not {other}")),
        }
    };
    match req.kind {
        Kind::Command => {
            let name = &req.command_name;
            let service = pick(&|s| s.command(name).is_some(), &format!("command {name:?}"))?;
            let command = service.command(name).ok_or_else(|| {
                format!("service {:?} has no command {name:?}", service.service_id)
            })?;
            let paras = object(&req.params)?;
            for (k, v) in &paras {
                let Some(p) = command.paras.iter().find(|p| &p.name == k) else {
                    return Err(format!("command {name}: no parameter {k:?} in the model"));
                };
                if let Some(problem) = p.check(v) {
                    return Err(format!("command {name}: {problem}"));
                }
            }
            if let Some(missing) = command.paras.iter().find(|p| !paras.contains_key(&p.name)) {
                return Err(format!(
                    "command {name}: parameter {:?} is missing",
                    missing.name
                ));
            }
            Ok((
                service.service_id.clone(),
                json!({
                    "object_device_id": req.device_id,
                    "service_id": service.service_id,
                    "command_name": name,
                    "paras": paras,
                }),
            ))
        }
        Kind::SetProperties => {
            let props = object(&req.params)?;
            if props.is_empty() {
                return Err("set at least one property".into());
            }
            let service = pick(
                &|s| props.keys().all(|k| s.property(k).is_some()),
                &format!(
                    "properties {}",
                    props.keys().cloned().collect::<Vec<_>>().join(", ")
                ),
            )?;
            for (k, v) in &props {
                let Some(p) = service.property(k) else {
                    return Err(format!(
                        "{}.{k}: no such property in the model",
                        service.service_id
                    ));
                };
                if !p.access.writable() {
                    return Err(format!(
                        "{}.{k}: the property is read-only (access R)",
                        service.service_id
                    ));
                }
                if let Some(problem) = p.check(v) {
                    return Err(format!("{}: {problem}", service.service_id));
                }
            }
            Ok((
                service.service_id.clone(),
                json!({
                    "object_device_id": req.device_id,
                    "services": [{"service_id": service.service_id, "properties": props}],
                }),
            ))
        }
        Kind::GetProperties => {
            let service = if req.service_id.is_empty() {
                match model.services.as_slice() {
                    [only] => only,
                    _ => {
                        return Err(
                            "the model has several services: name one with --service".into()
                        );
                    }
                }
            } else {
                pick(&|_| true, "")?
            };
            Ok((
                service.service_id.clone(),
                json!({"object_device_id": req.device_id, "service_id": service.service_id}),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MODEL: &str = r#"{"name":"thermo","services":[{"service_id":"env","properties":[
        {"name":"temperature","type":"decimal","access":"R"},
        {"name":"target","type":"int","min":5,"max":30,"access":"RW"}],
        "commands":[{"name":"reboot","paras":[{"name":"delay","type":"int","min":0,"max":60}]}]}]}"#;

    fn req(kind: Kind, command: &str, params: Value) -> Request {
        Request {
            device_id: "d1".into(),
            kind,
            service_id: String::new(),
            command_name: command.into(),
            params,
            timeout: Duration::from_secs(5),
        }
    }

    #[test]
    fn requests_are_checked_against_the_model() {
        let model = ThingModel::parse(MODEL.as_bytes()).expect("model");
        let (service, body) =
            request_body(&model, &req(Kind::Command, "reboot", json!({"delay": 5}))).expect("ok");
        assert_eq!(service, "env");
        assert_eq!(body["paras"]["delay"], 5);
        assert_eq!(body["command_name"], "reboot");
        let problem = |kind, command, params| {
            request_body(&model, &req(kind, command, params)).expect_err("refused")
        };
        assert!(problem(Kind::Command, "reboot", json!({"delay": 99})).contains("delay"));
        assert!(problem(Kind::Command, "reboot", json!({})).contains("missing"));
        assert!(problem(Kind::Command, "reboot", json!({"delay": 1, "x": 2})).contains("\"x\""));
        assert!(problem(Kind::Command, "explode", json!({})).contains("explode"));
        assert!(problem(Kind::Command, "reboot", json!([1])).contains("object"));
        let (_, body) =
            request_body(&model, &req(Kind::SetProperties, "", json!({"target": 21}))).expect("ok");
        assert_eq!(body["services"][0]["properties"]["target"], 21);
        assert!(problem(Kind::SetProperties, "", json!({"temperature": 3})).contains("read-only"));
        assert!(problem(Kind::SetProperties, "", json!({"target": 99})).contains("target"));
        let (_, body) =
            request_body(&model, &req(Kind::GetProperties, "", Value::Null)).expect("ok");
        assert_eq!(body["service_id"], "env");
        assert_eq!(
            Kind::Command.topic("d1", "r1"),
            "$oc/devices/d1/sys/commands/request_id=r1"
        );
    }

    #[tokio::test]
    async fn a_response_reaches_only_the_request_waiting_for_it() {
        let sessions = Sessions::default();
        let (tx, mut rx) = mpsc::channel(4);
        sessions.attach("d1", 1, tx);
        let s = sessions.clone();
        let device = tokio::spawn(async move {
            let down = rx.recv().await.expect("a request");
            assert!(down.topic.ends_with("request_id=r1"));
            down.written.send(true).expect("written");
            // Another device cannot answer for d1; d1 can.
            assert!(!s.respond("d2", "r1", Bytes::from_static(b"{}")));
            assert!(s.respond("d1", "r1", Bytes::from_static(b"{\"result_code\":0}")));
        });
        let got = sessions
            .deliver(
                "d1",
                "r1",
                "$oc/devices/d1/sys/commands/request_id=r1".into(),
                Bytes::from_static(b"{}"),
                Duration::from_secs(5),
            )
            .await;
        device.await.expect("device");
        assert_eq!(
            got,
            Delivered::Answered(Bytes::from_static(b"{\"result_code\":0}"))
        );
        assert!(!sessions.respond("d1", "r1", Bytes::new()), "answered once");
        sessions.detach("d1", 1);
        let gone = sessions
            .deliver("d1", "r2", "t".into(), Bytes::new(), Duration::from_secs(1))
            .await;
        assert_eq!(gone, Delivered::NotHere);
    }
}
