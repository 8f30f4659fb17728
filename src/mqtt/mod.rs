//! The MQTT front on 1883 (DESIGN.md §6–§7): devices connect here, MQTT 3.1.1 and 5 on
//! rumqttd's packet codecs (`rumqttd::protocol::{v4, v5}`), one task per connection.
//!
//! What it owns: reading CONNECT within the connect deadline (the protocol level picks the
//! codec), device authentication (`devices::auth`) with the right CONNACK code, the session
//! table of this node (a second connection with the same client id takes the session over),
//! per-topic authorization of every PUBLISH and SUBSCRIBE (`devices::telemetry`), telemetry
//! appended to `aq.telemetry.{product}` keyed by device id through the broker's routed
//! producer ([`sink::Sink`]) with the PUBACK (or PUBREC) sent only after a quorum committed
//! it, invalid property reports to `aq.telemetry-dlq` with the reason, keep-alive (1.5×),
//! packet size limits checked from the fixed header before anything is buffered, a cap on
//! connections per IP, and disconnecting a device within a second of it being disabled or
//! deleted (the metadata state machine's change feed, on every node).
//!
//! Requests to devices (commands, property set/get, `devices::commands`) are written down
//! the session of whichever node holds it.
//!
//! A client that connects without a user name is not a device: when anonymous clients are
//! allowed its connection is relayed to the general broker ([`general`], rumqttd) for
//! ordinary pub/sub outside the device namespace; otherwise it is refused (Not authorized).
//! What such a client publishes (and its will) does not go to rumqttd directly but to the
//! cluster-wide [`bus`], which hands it to the rumqttd of every node.

pub mod bus;
pub mod general;
pub mod sessions;
pub mod shares;
pub mod sink;

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use rumqttd::protocol::v4::V4;
use rumqttd::protocol::v5::V5;
use rumqttd::protocol::{
    ConnAck, ConnAckProperties, ConnectReturnCode, Disconnect, DisconnectProperties,
    DisconnectReasonCode, LastWill, LastWillProperties, Packet, PingResp, Protocol, PubAck,
    PubAckReason, PubComp, PubCompReason, PubRec, PubRecReason, Publish, PublishProperties, SubAck,
    SubscribeReasonCode, UnsubAck, UnsubAckReason,
};
use sessions::{NEVER, SessionRecord};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::devices::auth::{Credentials, Refusal, authenticate};
use crate::devices::commands::{Down, Sessions};
use crate::devices::events::{EventKind, Events, Report, reasons};
use crate::devices::model::ThingModel;
use crate::devices::records::{DeviceRecord, Status};
use crate::devices::telemetry::{
    DLQ_TOPIC, Up, check_report, classify_publish, dlq_value, may_subscribe, record_value,
    telemetry_topic, topic_matches,
};
use crate::devices::{Registry, now_ms};
use sink::Sink;

/// Limits and defaults of the front.
#[derive(Debug, Clone)]
pub struct MqttSettings {
    /// Largest packet accepted (remaining length), bytes.
    pub max_packet_bytes: usize,
    /// Most connections from one IP address.
    pub max_connections_per_ip: usize,
    /// A connection that has not sent a complete CONNECT by then is closed.
    pub connect_timeout: Duration,
    /// Whether clients without a user name may connect for general pub/sub.
    pub allow_anonymous: bool,
}

/// One connected device's handle in the session table.
struct Session {
    id: u64,
    device_id: String,
    product: String,
    /// Set to the reason when the session must end (taken over, disabled, deleted).
    kick: watch::Sender<Option<Kick>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kick {
    TakenOver,
    Disabled,
    Deleted,
}

/// What the server sends a device session (a kick, requests to the device), and the reason
/// of its offline notification once it ends.
struct Control {
    kicked: watch::Receiver<Option<Kick>>,
    down: mpsc::Receiver<Down>,
    reason: &'static str,
}

impl Kick {
    /// The reason of the offline notification.
    fn offline_reason(self) -> &'static str {
        match self {
            Kick::TakenOver => reasons::TAKEN_OVER,
            Kick::Disabled => reasons::DISABLED,
            Kick::Deleted => reasons::DELETED,
        }
    }

    fn why(self) -> &'static str {
        match self {
            Kick::TakenOver => "another connection took the session over",
            Kick::Disabled => "the device was disabled",
            Kick::Deleted => "the device was deleted",
        }
    }

    fn v5_reason(self) -> DisconnectReasonCode {
        match self {
            Kick::TakenOver => DisconnectReasonCode::SessionTakenOver,
            Kick::Disabled | Kick::Deleted => DisconnectReasonCode::NotAuthorized,
        }
    }
}

#[derive(Default)]
struct Tables {
    /// Client id → its live session.
    sessions: HashMap<String, Session>,
    per_ip: HashMap<IpAddr, usize>,
    next_id: u64,
}

/// The front (cheap to clone).
#[derive(Clone)]
pub struct MqttFront {
    registry: Registry,
    sink: Sink,
    events: Events,
    /// This node's device sessions that requests to devices are written to.
    device_sessions: Sessions,
    /// This process's incarnation, which makes its session ids unique in the cluster:
    /// `{node}-{incarnation}-{n}` (a session of an earlier incarnation is gone).
    boot: u64,
    /// rumqttd and the cluster-wide bus, when anonymous clients are allowed.
    general: Option<(general::GeneralBroker, bus::Bus)>,
    settings: Arc<MqttSettings>,
    tables: Arc<Mutex<Tables>>,
}

impl std::fmt::Debug for MqttFront {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttFront")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl MqttFront {
    /// The front; with `allow_anonymous` this also starts the general broker.
    pub fn new(
        registry: Registry,
        sink: Sink,
        events: Events,
        device_sessions: Sessions,
        settings: MqttSettings,
        bus_shape: (u32, Option<u16>),
    ) -> std::io::Result<Self> {
        let general = if settings.allow_anonymous {
            let broker = general::GeneralBroker::start(settings.max_packet_bytes, 100_000)?;
            let bus = bus::Bus::new(
                sink.broker().clone(),
                sink.clone(),
                broker.clone(),
                bus_shape.0,
                bus_shape.1,
            );
            Some((broker, bus))
        } else {
            None
        };
        Ok(Self {
            registry,
            sink,
            boot: events.incarnation(),
            events,
            device_sessions,
            general,
            settings: Arc::new(settings),
            tables: Arc::default(),
        })
    }

    fn tables(&self) -> std::sync::MutexGuard<'_, Tables> {
        self.tables.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How many devices are connected to this node.
    pub fn connected(&self) -> usize {
        self.tables().sessions.len()
    }

    /// Accepts connections until `stop` resolves; also follows the registry's changes.
    pub async fn serve(self, listener: TcpListener, stop: impl std::future::Future<Output = ()>) {
        let watcher = tokio::spawn(self.clone().follow_registry());
        let front = self.clone();
        let reassert = tokio::spawn(self.events.clone().reassert(move || front.live_sessions()));
        let bus = self
            .general
            .as_ref()
            .map(|(_, bus)| tokio::spawn(bus.clone().run()));
        tokio::pin!(stop);
        loop {
            tokio::select! {
                _ = &mut stop => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        let front = self.clone();
                        tokio::spawn(async move { front.connection(stream, peer).await });
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "MQTT accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
            }
        }
        watcher.abort();
        reassert.abort();
        if let Some(bus) = bus {
            bus.abort();
        }
    }

    /// Online reports for every device session of this node (see [`Events::reassert`]).
    fn live_sessions(&self) -> Vec<Report> {
        let t = self.tables();
        t.sessions
            .values()
            .map(|s| {
                self.report_of(
                    &s.device_id,
                    &s.product,
                    EventKind::Online,
                    self.session_name(s.id),
                    reasons::NODE_BACK.to_string(),
                )
            })
            .collect()
    }

    /// The cluster-wide name of this node's session `id`.
    fn session_name(&self, id: u64) -> String {
        format!("{}-{}-{id}", self.events.node(), self.boot)
    }

    /// Disconnects sessions whose device was disabled, deleted or given a new secret.
    async fn follow_registry(self) {
        let mut feed = self.registry.controller().state().changes();
        loop {
            let changed: Option<Vec<String>> = match feed.recv().await {
                Ok(c) if c.family == crate::devices::records::FAMILY => c.keys.map(|keys| {
                    keys.into_iter()
                        .filter_map(|k| k.strip_prefix("device/").map(str::to_string))
                        .collect()
                }),
                Ok(_) => continue,
                // Fell behind: look at every session.
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => None,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            };
            let sessions: Vec<(String, String, u64)> = {
                let t = self.tables();
                t.sessions
                    .iter()
                    .filter(|(_, s)| {
                        changed
                            .as_ref()
                            .is_none_or(|ids| ids.contains(&s.device_id))
                    })
                    .map(|(c, s)| (c.clone(), s.device_id.clone(), s.id))
                    .collect()
            };
            for (client_id, device_id, _) in sessions {
                let kick = match self.registry.device(&device_id) {
                    Ok(None) => Some(Kick::Deleted),
                    Ok(Some(d)) if d.status == Status::Disabled => Some(Kick::Disabled),
                    Ok(Some(_)) => None,
                    Err(e) => {
                        tracing::warn!(error = %e, "reading the device registry");
                        None
                    }
                };
                if let Some(kick) = kick
                    && let Some(s) = self.tables().sessions.get(&client_id)
                {
                    let _ = s.kick.send(Some(kick));
                }
            }
        }
    }

    async fn connection(self, stream: TcpStream, peer: SocketAddr) {
        let ip = peer.ip();
        {
            let mut t = self.tables();
            let n = t.per_ip.entry(ip).or_default();
            if *n >= self.settings.max_connections_per_ip {
                drop(t);
                tracing::debug!(%peer, "MQTT connection refused: too many from this address");
                return;
            }
            *n += 1;
        }
        let _ = stream.set_nodelay(true);
        let mut conn = Conn {
            stream,
            // Small to start with: most connections are idle devices; both grow as needed.
            buf: BytesMut::with_capacity(512),
            out: BytesMut::with_capacity(128),
            max: self.settings.max_packet_bytes,
        };
        if let Err(e) = self.session(&mut conn, peer).await {
            tracing::debug!(%peer, error = %e, "MQTT connection closed");
        }
        let mut t = self.tables();
        if let Some(n) = t.per_ip.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                t.per_ip.remove(&ip);
            }
        }
    }

    async fn session(&self, conn: &mut Conn, peer: SocketAddr) -> anyhow::Result<()> {
        let deadline = Instant::now() + self.settings.connect_timeout;
        let first = tokio::time::timeout_at(deadline, conn.frame())
            .await
            .map_err(|_| anyhow::anyhow!("no CONNECT within the connect deadline"))??;
        let level = connect_level(&first)?;
        let v5 = match level {
            4 => false,
            5 => true,
            other => {
                // 3.1 (MQIsdp, level 3) and unknown levels: the 3.1.1 refusal.
                conn.write(
                    false,
                    Packet::ConnAck(
                        ConnAck {
                            session_present: false,
                            code: ConnectReturnCode::RefusedProtocolVersion,
                        },
                        None,
                    ),
                )
                .await?;
                anyhow::bail!("protocol level {other} is not MQTT 3.1.1 or 5");
            }
        };
        let raw_connect = first.clone().freeze();
        let packet = conn.decode(v5, first)?;
        let Packet::Connect(connect, props, will, will_props, login) = packet else {
            anyhow::bail!("the first packet is not CONNECT");
        };
        if login.is_none() {
            // Not a device (devices always give their id as the user name).
            let will_allowed = will
                .as_ref()
                .is_none_or(|w| general::general_topic_allowed(&String::from_utf8_lossy(&w.topic)));
            match &self.general {
                Some((broker, bus)) if will_allowed => {
                    let asked = SessionAsked {
                        client_id: &connect.client_id,
                        clean_start: connect.clean_session,
                        expiry: props
                            .as_ref()
                            .and_then(|p| p.session_expiry_interval)
                            .unwrap_or(0),
                        will: will.map(|w| (w, will_props)),
                    };
                    let general = (broker.clone(), bus.clone());
                    return self.relay(conn, v5, raw_connect, general, asked).await;
                }
                _ => {
                    let why = if will_allowed {
                        "anonymous clients are not allowed"
                    } else {
                        "the will topic is in the device namespace"
                    };
                    tracing::info!(%peer, client_id = %connect.client_id, "MQTT client refused: {why}");
                    conn.write(v5, connack_code(v5, ConnectReturnCode::NotAuthorized, why))
                        .await?;
                    return Ok(());
                }
            }
        }
        let creds = Credentials {
            client_id: &connect.client_id,
            username: login.as_ref().map(|l| l.username.as_str()),
            password: login.as_ref().map(|l| l.password.as_bytes()),
        };
        let now = now_ms() / 1000;
        let device = authenticate(&creds, now, |id| self.registry.device(id).ok().flatten());
        let device = match device {
            Ok(d) => d,
            Err(refusal) => {
                tracing::info!(%peer, client_id = %connect.client_id, reason = %refusal.reason(),
                    "MQTT device refused");
                // Registered devices only: attempts on unknown ids are not anyone's events.
                if let Some(claimed) = creds.username
                    && let Ok(Some(d)) = self.registry.device(claimed)
                {
                    let attempt = self.next_session_id();
                    self.report(&d, EventKind::AuthFailed, attempt, refusal.reason());
                }
                conn.write(v5, connack_refusal(v5, &refusal)).await?;
                return Ok(());
            }
        };
        // The first device on this node has the telemetry producer's id allocated before
        // its CONNACK: its reports then need only their partition's quorum, not also the
        // metadata group's.
        if let Err(e) = self.sink.ready(SINK_READY_WAIT).await {
            tracing::debug!(error = %e, "telemetry producer id not allocated yet");
        }
        let (id, kicked) = self.register(&connect.client_id, &device);
        let session = self.session_name(id);
        self.report(&device, EventKind::Online, session.clone(), String::new());
        let (down_tx, down) = mpsc::channel(16);
        self.device_sessions.attach(&device.device_id, id, down_tx);
        let mut control = Control {
            kicked,
            down,
            reason: reasons::SOCKET_CLOSED,
        };
        let result = self
            .connected_session(
                conn,
                v5,
                &connect.client_id,
                connect.keep_alive,
                &device,
                &mut control,
            )
            .await;
        self.device_sessions.detach(&device.device_id, id);
        self.report(
            &device,
            EventKind::Offline,
            session,
            control.reason.to_string(),
        );
        let mut t = self.tables();
        if t.sessions
            .get(&connect.client_id)
            .is_some_and(|s| s.id == id)
        {
            t.sessions.remove(&connect.client_id);
        }
        result
    }

    /// A new id for an auth attempt, unique in the cluster as session ids are.
    fn next_session_id(&self) -> String {
        let mut t = self.tables();
        t.next_id += 1;
        let id = t.next_id;
        drop(t);
        self.session_name(id)
    }

    /// Reports a device notification (recorded in the background, in order).
    fn report(&self, device: &DeviceRecord, event: EventKind, origin: String, reason: String) {
        self.events.report(self.report_of(
            &device.device_id,
            &device.product,
            event,
            origin,
            reason,
        ));
    }

    /// A report of a session (or attempt) `origin` of this node, happening now.
    fn report_of(
        &self,
        device_id: &str,
        product: &str,
        event: EventKind,
        origin: String,
        reason: String,
    ) -> Report {
        Report {
            device_id: device_id.to_string(),
            product: product.to_string(),
            event,
            at: now_ms().unsigned_abs(),
            reason,
            node: self.events.node(),
            origin,
            meta_index: 0,
        }
    }

    /// Registers a session for `client_id`, taking over (kicking) any earlier one.
    fn register(
        &self,
        client_id: &str,
        device: &DeviceRecord,
    ) -> (u64, watch::Receiver<Option<Kick>>) {
        let (tx, rx) = watch::channel(None);
        let mut t = self.tables();
        t.next_id += 1;
        let id = t.next_id;
        let old = t.sessions.insert(
            client_id.to_string(),
            Session {
                id,
                device_id: device.device_id.clone(),
                product: device.product.clone(),
                kick: tx,
            },
        );
        if let Some(old) = old {
            let _ = old.kick.send(Some(Kick::TakenOver));
        }
        (id, rx)
    }

    async fn connected_session(
        &self,
        conn: &mut Conn,
        v5: bool,
        client_id: &str,
        keep_alive: u16,
        device: &DeviceRecord,
        control: &mut Control,
    ) -> anyhow::Result<()> {
        // Read once per session: a product's model never changes, and a product with
        // devices cannot be deleted.
        let model = self.registry.product(&device.product)?.map(|p| p.model);
        let props = v5.then(|| ConnAckProperties {
            max_packet_size: Some(self.settings.max_packet_bytes as u32),
            retain_available: Some(0),
            shared_subscription_available: Some(0),
            subscription_identifiers_available: Some(0),
            wildcard_subscription_available: Some(1),
            topic_alias_max: Some(0),
            max_qos: Some(1),
            ..ConnAckProperties::default()
        });
        conn.write(
            v5,
            Packet::ConnAck(
                ConnAck {
                    session_present: false,
                    code: ConnectReturnCode::Success,
                },
                props,
            ),
        )
        .await?;
        tracing::debug!(client_id, device = %device.device_id, v5, "MQTT device connected");
        // MQTT: a server disconnects a client silent for 1.5 × its keep-alive.
        let silence = (keep_alive > 0).then(|| Duration::from_millis(u64::from(keep_alive) * 1500));
        // Acknowledgements are written in the order the PUBLISHes arrived.
        let mut pending: VecDeque<Owed> = VecDeque::new();
        let mut awaiting_rel: HashSet<u16> = HashSet::new();
        let mut last_heard = Instant::now();
        // What the device subscribed to (requests are written only to those topics).
        let mut filters: Vec<String> = Vec::new();
        loop {
            // Flush acknowledgements that are ready, in order.
            while pending.front().is_some_and(Owed::is_ready) {
                if let Some(p) = pending.pop_front().expect("front exists").take().await? {
                    conn.write(v5, p).await?;
                }
            }
            let expiry = silence.map(|s| last_heard + s);
            let frame = tokio::select! {
                f = conn.frame() => f?,
                Some(down) = control.down.recv() => {
                    // A request to the device: written if it subscribed to the topic (QoS
                    // 0: rumqttd's codec builds only those).
                    let subscribed = filters
                        .iter()
                        .any(|f| topic_matches(f, &down.topic));
                    if subscribed {
                        let publish = Publish::new(
                            Bytes::from(down.topic.into_bytes()),
                            down.payload,
                            false,
                        );
                        conn.write(v5, Packet::Publish(publish, None)).await?;
                    }
                    let _ = down.written.send(subscribed);
                    continue;
                }
                _ = control.kicked.changed() => {
                    let kick = (*control.kicked.borrow()).unwrap_or(Kick::TakenOver);
                    control.reason = kick.offline_reason();
                    tracing::info!(client_id, ?kick, "MQTT session ended by the server");
                    if v5 {
                        let _ = conn.write(true, disconnect(kick.v5_reason(), kick.why())).await;
                    }
                    return Ok(());
                }
                // The oldest publish committed: its acknowledgement goes out now (the
                // ones behind it follow at the top of the loop).
                owed = front_committed(&mut pending) => {
                    pending.pop_front();
                    if let Some(p) = owed? {
                        conn.write(v5, p).await?;
                    }
                    continue;
                }
                _ = sleep_until(expiry) => {
                    control.reason = reasons::KEEP_ALIVE;
                    anyhow::bail!("keep-alive expired ({keep_alive} s × 1.5 without a packet)");
                }
            };
            last_heard = Instant::now();
            let kind = frame[0] >> 4;
            if !matches!(kind, 3..=8 | 10 | 12 | 14) {
                // Server-to-client packets, a second CONNECT, AUTH: a protocol error.
                if v5 {
                    let _ = conn
                        .write(
                            true,
                            disconnect(
                                DisconnectReasonCode::ProtocolError,
                                "a client does not send this packet",
                            ),
                        )
                        .await;
                }
                anyhow::bail!("packet type {kind} is not one a client sends");
            }
            let (qos, pkid) = if kind == 3 {
                publish_qos_pkid(&frame)?
            } else {
                (0, 0)
            };
            match conn.decode(v5, frame)? {
                Packet::Publish(publish, _) => {
                    let topic = String::from_utf8_lossy(&publish.topic).into_owned();
                    let up = match classify_publish(&device.device_id, &topic) {
                        Ok(up) => up,
                        Err(why) => {
                            tracing::info!(client_id, %topic, "MQTT publish refused: {why}");
                            if !v5 {
                                anyhow::bail!("not authorized to publish on {topic}");
                            }
                            match qos {
                                1 => pending.push_back(ready(Some(puback(
                                    pkid,
                                    PubAckReason::NotAuthorized,
                                )))),
                                2 => pending.push_back(ready(Some(pubrec(
                                    pkid,
                                    PubRecReason::NotAuthorized,
                                )))),
                                _ => {}
                            }
                            continue;
                        }
                    };
                    if let Up::CommandResponse { request_id }
                    | Up::PropertiesSetResponse { request_id }
                    | Up::PropertiesGetResponse { request_id } = &up
                        && !self.device_sessions.respond(
                            &device.device_id,
                            request_id,
                            publish.payload.clone(),
                        )
                    {
                        tracing::debug!(client_id, request_id, "a response no request waits for");
                    }
                    if qos == 2 && !awaiting_rel.insert(pkid) {
                        // A retransmission of a QoS 2 PUBLISH already taken: no second copy.
                        pending.push_back(ready(Some(pubrec(pkid, PubRecReason::Success))));
                        continue;
                    }
                    let job =
                        self.telemetry(device, model.as_ref(), topic, up, publish.payload.clone());
                    pending.push_back(Owed::Job(tokio::spawn(async move {
                        let ok = job.await;
                        match (qos, ok) {
                            (1, Ok(invalid)) => Ok(Some(puback(
                                pkid,
                                if invalid && v5 {
                                    PubAckReason::PayloadFormatInvalid
                                } else {
                                    PubAckReason::Success
                                },
                            ))),
                            (2, Ok(_)) => Ok(Some(pubrec(pkid, PubRecReason::Success))),
                            (0, Ok(_)) => Ok(None),
                            (0, Err(e)) => {
                                tracing::warn!(error = %e, "QoS 0 telemetry not stored");
                                Ok(None)
                            }
                            (1, Err(_)) if v5 => {
                                Ok(Some(puback(pkid, PubAckReason::UnspecifiedError)))
                            }
                            // 3.1.1 has no failure acknowledgement, and a QoS 2 packet id
                            // must not be taken as delivered: close the connection, so the
                            // client sends the message again when it reconnects.
                            (_, Err(e)) => {
                                tracing::warn!(error = %e, qos, "telemetry not stored: closing the connection");
                                Err(format!("telemetry not stored: {e}"))
                            }
                            _ => Ok(None),
                        }
                    })));
                }
                Packet::PubRel(rel, _) => {
                    awaiting_rel.remove(&rel.pkid);
                    pending.push_back(ready(Some(Packet::PubComp(
                        PubComp {
                            pkid: rel.pkid,
                            reason: PubCompReason::Success,
                        },
                        None,
                    ))));
                }
                // Acknowledgements of messages down (issue 17): nothing is sent down yet.
                Packet::PubAck(..) | Packet::PubRec(..) | Packet::PubComp(..) => {}
                Packet::Subscribe(sub, _) => {
                    let return_codes = sub
                        .filters
                        .iter()
                        .map(|f| {
                            if may_subscribe(&device.device_id, &f.path) {
                                if !filters.contains(&f.path) {
                                    filters.push(f.path.clone());
                                }
                                match f.qos as u8 {
                                    0 => SubscribeReasonCode::QoS0,
                                    _ => SubscribeReasonCode::QoS1,
                                }
                            } else {
                                tracing::info!(client_id, filter = %f.path, "MQTT subscribe refused");
                                if v5 {
                                    SubscribeReasonCode::NotAuthorized
                                } else {
                                    SubscribeReasonCode::Failure
                                }
                            }
                        })
                        .collect();
                    pending.push_back(ready(Some(Packet::SubAck(
                        SubAck {
                            pkid: sub.pkid,
                            return_codes,
                        },
                        None,
                    ))));
                }
                Packet::Unsubscribe(unsub, _) => {
                    filters.retain(|f| !unsub.filters.contains(f));
                    let reasons = unsub
                        .filters
                        .iter()
                        .map(|_| UnsubAckReason::Success)
                        .collect();
                    pending.push_back(ready(Some(Packet::UnsubAck(
                        UnsubAck {
                            pkid: unsub.pkid,
                            reasons,
                        },
                        None,
                    ))));
                }
                Packet::PingReq(_) => pending.push_back(ready(Some(Packet::PingResp(PingResp)))),
                Packet::Disconnect(..) => {
                    control.reason = reasons::CLEAN_DISCONNECT;
                    // Flush what is owed, then close.
                    for owed in pending.drain(..) {
                        if let Some(p) = owed.take().await? {
                            conn.write(v5, p).await?;
                        }
                    }
                    return Ok(());
                }
                other => anyhow::bail!("unexpected packet {other:?}"),
            }
        }
    }

    /// Relays a general (non-device) client to rumqttd: its CONNECT (with clean start off
    /// when an MQTT 5 session is to outlive the connection, see `general`; without its
    /// will, which the relay publishes itself), then every packet it sends, checked (the
    /// device namespace is refused, as a device's publish outside its own topics is), and
    /// everything rumqttd answers. What the client publishes goes to the cluster-wide bus,
    /// acknowledged by the relay once it is committed.
    async fn relay(
        &self,
        conn: &mut Conn,
        v5: bool,
        connect: Bytes,
        (broker, bus): (general::GeneralBroker, bus::Bus),
        asked: SessionAsked<'_>,
    ) -> anyhow::Result<()> {
        let client_id = asked.client_id;
        // A client that gives up waiting (its own CONNACK timeout) must not come back to
        // life once the bus serves: it would take the session over from the connection it
        // retried with.
        let ready = tokio::select! {
            ready = bus.ready(BUS_WAIT) => ready,
            () = closed(&conn.stream) => {
                tracing::debug!(client_id, "MQTT client left while the bus was starting");
                return Ok(());
            }
        };
        if !ready {
            let why = "the cluster-wide MQTT bus is not serving yet";
            tracing::warn!(client_id, "MQTT client refused: {why}");
            let code = match v5 {
                true => ConnectReturnCode::ServerUnavailable,
                false => ConnectReturnCode::ServiceUnavailable,
            };
            conn.write(v5, connack_code(v5, code, why)).await?;
            return Ok(());
        }
        // An empty client id gets one from rumqttd, for this connection only.
        let tracked = !client_id.is_empty();
        let hold = match tracked {
            true => Some(broker.begin(client_id).await),
            false => None,
        };
        let generation = hold.as_ref().map_or(0, |h| h.generation);
        // MQTT 5: the session outlives the connection unless it started clean and has no
        // expiry interval.
        let kept = v5 && tracked && !(asked.clean_start && asked.expiry == 0);
        // 3.1.1: clean session off keeps the session for ever.
        let persistent = match v5 {
            true => kept,
            false => tracked && !asked.clean_start,
        };
        // The cluster's record of the session: a connection elsewhere is taken over, and a
        // persistent session this node's rumqttd does not hold gets its subscriptions back.
        let store = bus.sessions().clone();
        let prior = tracked.then(|| store.lookup(client_id)).flatten();
        let resumed = persistent && !asked.clean_start;
        let restore = resumed
            && prior
                .as_ref()
                .is_some_and(|p| p.expiry > 0 && !store.held_here(p));
        let record = SessionRecord {
            client_id: client_id.to_string(),
            node: store.node(),
            started_ms: store.next_start(),
            connected: true,
            subscriptions: match (resumed, &prior) {
                (true, Some(p)) if p.expiry > 0 => p.subscriptions.clone(),
                _ => Default::default(),
            },
            expiry: match (persistent, v5) {
                (false, _) => 0,
                (true, true) => asked.expiry,
                (true, false) => NEVER,
            },
            left_ms: None,
        };
        let mut kicked = watch::channel(false).1;
        if tracked {
            // A connection elsewhere is taken over once this record is committed: waited
            // for, briefly (a slow commit delays the takeover, not the CONNACK).
            match tokio::time::timeout(SESSION_SAVE_WAIT, store.save(&record)).await {
                Ok(Err(e)) => tracing::warn!(client_id, error = %e, "MQTT session not recorded"),
                Err(_) => tracing::debug!(client_id, "MQTT session record not committed yet"),
                Ok(Ok(())) => {}
            }
            kicked = store.attach(&record);
        }
        let mut relayed = Relayed {
            client_id: client_id.to_string(),
            session: tracked.then(|| record.clone()),
            persistent,
            ..Relayed::default()
        };
        // The session's shared subscriptions (a resumed one's come back with it).
        let mut shared = shares::SharedOut::new(bus.shares().clone(), client_id, generation);
        for (path, qos) in &record.subscriptions {
            shared.join(path, *qos);
        }
        // However it ends (also before it reached the broker), the session ends as asked.
        let outcome = async {
            let connect = forwarded_connect(v5, connect, asked.will.is_some())?;
            let connect = if kept && asked.clean_start {
                // A clean start ends the old session first.
                broker.end_session(client_id).await?;
                without_clean_start(connect)?
            } else {
                if restore {
                    // Whatever this node's rumqttd still holds of the client is older.
                    broker.end_session(client_id).await?;
                }
                connect
            };
            let mut upstream = broker.connect(v5).await?;
            // A client that gave up meanwhile must not take the session over from the
            // connection it retried with.
            if tokio::time::timeout(Duration::ZERO, closed(&conn.stream))
                .await
                .is_ok()
            {
                anyhow::bail!("the client left before its CONNECT was passed on");
            }
            upstream.write_all(&connect).await?;
            drop(hold);
            tracing::debug!(
                client_id,
                v5,
                restore,
                "MQTT general client relayed to the broker"
            );
            let down = match restore {
                true => resubscribe(conn, v5, &mut upstream, &record.subscriptions).await?,
                false => BytesMut::new(),
            };
            self.pipe(
                conn,
                v5,
                &mut upstream,
                &bus,
                (&mut relayed, &mut shared),
                down,
                &mut kicked,
                || tracked && broker.superseded(client_id, generation),
            )
            .await
        }
        .await;
        shared.end();
        let taken_over = *kicked.borrow();
        if tracked {
            store.detach(client_id, record.stamp());
            if !taken_over && !store.superseded(client_id, record.stamp()) {
                let expiry = relayed.expiry.unwrap_or(record.expiry);
                let saved = match (persistent, expiry) {
                    (true, e) if e > 0 => {
                        let mut last = relayed.session.clone().unwrap_or(record.clone());
                        last.connected = false;
                        last.expiry = expiry;
                        last.left_ms = Some(crate::devices::now_ms());
                        store.save(&last).await
                    }
                    _ => store.end(client_id).await,
                };
                if let Err(e) = saved {
                    tracing::warn!(client_id, error = %e, "MQTT session end not recorded");
                }
            }
        }
        let expiry = relayed.expiry.unwrap_or(asked.expiry);
        if !relayed.clean_disconnect
            && let Some((will, props)) = asked.will
        {
            // The will goes out now, or after its delay unless the session was resumed
            // (and no later than the session ends).
            let session = match kept {
                true => expiry,
                false => 0,
            };
            let delay = props
                .as_ref()
                .and_then(|p| p.delay_interval)
                .unwrap_or(0)
                .min(session);
            let message = will_message(client_id, will, props);
            let (broker, bus) = (broker.clone(), bus.clone());
            let id = client_id.to_string();
            tokio::spawn(async move {
                if delay > 0 {
                    tokio::time::sleep(Duration::from_secs(u64::from(delay))).await;
                    if tracked && broker.resumed(&id, generation) {
                        return;
                    }
                }
                if let Err(e) = bus.publish(&message).await {
                    tracing::warn!(client_id = %id, error = %e, "MQTT will not published");
                }
            });
        }
        if tracked {
            let end = match (taken_over, kept) {
                // Another node holds the session now: this node's copy goes.
                (true, _) => general::SessionEnd::After(0),
                (false, true) => general::SessionEnd::After(expiry),
                (false, false) => general::SessionEnd::Broker,
            };
            broker.ended(client_id, generation, end).await;
        }
        outcome
    }

    /// Copies packets both ways between a general client and rumqttd until either side
    /// ends, except what the client publishes, which goes to the bus (`relayed` keeps the
    /// connection's topic aliases and QoS 2 exchanges, and follows a session expiry
    /// interval the client's DISCONNECT gives).
    #[allow(clippy::too_many_arguments)]
    async fn pipe(
        &self,
        conn: &mut Conn,
        v5: bool,
        upstream: &mut TcpStream,
        bus: &bus::Bus,
        (relayed, shared): (&mut Relayed, &mut shares::SharedOut),
        mut down: BytesMut,
        kicked: &mut watch::Receiver<bool>,
        taken_over: impl Fn() -> bool,
    ) -> anyhow::Result<()> {
        let (mut up_r, mut up_w) = upstream.split();
        let (mut cl_r, mut cl_w) = conn.stream.split();
        let max = conn.max;
        down.reserve(16 << 10);
        let mut out = BytesMut::new();
        let mut splices = general::Splices::default();
        // What rumqttd sent right behind the frames the relay read itself (a restored
        // session's first messages) goes out first.
        if !down.is_empty() {
            while let Some(frame) = split_frame(&mut down, usize::MAX >> 4)? {
                splice_suback(v5, frame, &mut splices, &mut out)?;
            }
            cl_w.write_all(&out).await?;
        }
        // The relay's own answers (to PUBLISH and PUBREL), in the order they are owed.
        let mut pending: VecDeque<Owed> = VecDeque::new();
        loop {
            while pending.front().is_some_and(Owed::is_ready) {
                if let Some(p) = pending.pop_front().expect("front exists").take().await? {
                    out.clear();
                    encode(v5, p, &mut out)?;
                    cl_w.write_all(&out).await?;
                }
            }
            tokio::select! {
                // While too many answers are owed, the client waits (TCP pushes back).
                frame = read_frame(&mut cl_r, &mut conn.buf, max), if pending.len() < MAX_OWED => {
                    let frame = match frame {
                        Ok(f) => f,
                        // The client went away: so does its relayed connection.
                        Err(_) => return Ok(()),
                    };
                    // The client's answer to a shared subscription's delivery is the relay's.
                    if let Some(reply) = shared.answer(&frame) {
                        if let Some(rel) = reply {
                            cl_w.write_all(&rel).await?;
                        }
                        continue;
                    }
                    if frame[0] >> 4 == 14 {
                        relayed.disconnect(v5, &frame);
                    }
                    if let Some(record) = relayed.track(v5, &frame) {
                        let store = bus.sessions().clone();
                        tokio::spawn(async move {
                            if let Err(e) = store.save(&record).await {
                                tracing::warn!(client_id = %record.client_id, error = %e,
                                    "MQTT session subscriptions not recorded");
                            }
                        });
                    }
                    let mut changes = Vec::new();
                    let untracked = relayed.session.is_none();
                    let inspected = inspect_general(v5, frame, &mut splices, &mut changes, untracked)?;
                    for change in changes {
                        match change {
                            ShareChange::Join(path, qos) => shared.join(&path, qos),
                            ShareChange::Leave(path) => shared.leave(&path),
                        }
                    }
                    match inspected {
                        Inspected::Forward(bytes) => up_w.write_all(&bytes).await?,
                        Inspected::Publish(frame) => {
                            if let Err(refusal) = relayed.publish(v5, frame, max, bus, &mut pending) {
                                tracing::info!(client = %relayed.client_id, "MQTT general client disconnected: {}", refusal.1);
                                if v5 {
                                    out.clear();
                                    encode(true, disconnect(refusal.0, &refusal.1), &mut out)?;
                                    let _ = cl_w.write_all(&out).await;
                                }
                                return Ok(());
                            }
                        }
                        Inspected::Release(pkid) => pending.push_back(relayed.release(pkid)),
                        Inspected::Answer(packet) => pending.push_back(Owed::Ready(Some(packet))),
                    }
                }
                Some((delivery, qos)) = shared.next() => {
                    out.clear();
                    shared.publish(v5, delivery, qos, &mut out)?;
                    cl_w.write_all(&out).await?;
                }
                owed = front_committed(&mut pending) => {
                    pending.pop_front();
                    if let Some(p) = owed? {
                        out.clear();
                        encode(v5, p, &mut out)?;
                        cl_w.write_all(&out).await?;
                    }
                }
                Ok(()) = kicked.changed() => {
                    if !*kicked.borrow() {
                        continue;
                    }
                    tracing::info!(client = %relayed.client_id,
                        "MQTT session taken over by a connection on another node");
                    if v5 {
                        let _ = cl_w.write_all(&taken_over_disconnect()?).await;
                    }
                    return Ok(());
                }
                n = up_r.read_buf(&mut down) => {
                    if n? == 0 {
                        if v5 && taken_over() {
                            let _ = cl_w.write_all(&taken_over_disconnect()?).await;
                        }
                        return Ok(());
                    }
                    // Frame by frame (whole frames only: the relay's own answers go
                    // between them): a SUBACK may be given its refused codes back, and
                    // after rumqttd's own MQTT 5 DISCONNECT (whose length it gets one byte
                    // short) nothing more is sent.
                    out.clear();
                    let mut last = false;
                    while let Some(frame) = split_frame(&mut down, usize::MAX >> 4)? {
                        last = frame[0] >> 4 == 14;
                        splice_suback(v5, frame, &mut splices, &mut out)?;
                        if last {
                            break;
                        }
                    }
                    cl_w.write_all(&out).await?;
                    if last {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// Appends one device publish to the log: a valid report or message to the product's
    /// telemetry topic, an invalid report to the DLQ. It is checked and enqueued here, at
    /// once, so a device's records keep the order it sent them in; the future resolves
    /// when a quorum has it, with Ok(true) when it went to the DLQ.
    fn telemetry(
        &self,
        device: &DeviceRecord,
        model: Option<&ThingModel>,
        topic: String,
        up: Up,
        payload: Bytes,
    ) -> impl std::future::Future<Output = anyhow::Result<bool>> + Send + 'static {
        let enqueued = self.check_and_enqueue(device, model, &topic, up, &payload);
        async move {
            let Some((committed, invalid)) = enqueued? else {
                return Ok(false);
            };
            committed
                .await
                .map_err(|_| anyhow::anyhow!("the telemetry sink stopped"))??;
            Ok(invalid)
        }
    }

    fn check_and_enqueue(
        &self,
        device: &DeviceRecord,
        model: Option<&ThingModel>,
        topic: &str,
        up: Up,
        payload: &Bytes,
    ) -> anyhow::Result<Option<(sink::Committed, bool)>> {
        if !up.is_telemetry() {
            // Responses went to the request waiting for them (recorded by the requester).
            return Ok(None);
        }
        let (device_id, product) = (&device.device_id, &device.product);
        let at = now_ms();
        let problem = match up {
            Up::PropertiesReport => match model {
                Some(model) => check_report(model, payload),
                None => Some(format!("product {product} no longer exists")),
            },
            _ => None,
        };
        let (target, value) = match &problem {
            None => (
                telemetry_topic(product),
                record_value(device_id, product, topic, at, payload),
            ),
            Some(reason) => (
                DLQ_TOPIC.to_string(),
                dlq_value(device_id, product, topic, at, payload, reason),
            ),
        };
        let value = Bytes::from(serde_json::to_vec(&value)?);
        Ok(Some((
            self.sink.enqueue(&target, device_id, value),
            problem.is_some(),
        )))
    }
}

/// The session a general client's CONNECT asks for.
struct SessionAsked<'a> {
    client_id: &'a str,
    clean_start: bool,
    /// MQTT 5 session expiry interval, seconds (0 when absent, and in 3.1.1).
    expiry: u32,
    will: Option<(LastWill, Option<LastWillProperties>)>,
}

/// Longest a general client's CONNECT waits for the bus to serve (a starting node).
const BUS_WAIT: Duration = Duration::from_secs(10);
/// Longest a device's first CONNECT on a node waits for the telemetry producer's id.
const SINK_READY_WAIT: Duration = Duration::from_secs(5);
/// Longest a general client's CONNECT waits for its session record to commit.
const SESSION_SAVE_WAIT: Duration = Duration::from_secs(2);
/// Most answers the relay owes one client before it stops reading from it.
const MAX_OWED: usize = 1024;

/// What the relay keeps of one general connection.
#[derive(Debug, Default)]
struct Relayed {
    client_id: String,
    /// The topic aliases the client set (MQTT 5).
    aliases: HashMap<u16, String>,
    /// QoS 2 packet ids taken (committed, or being committed) and not released yet.
    awaiting_rel: HashSet<u16>,
    /// The client's DISCONNECT asked for no will.
    clean_disconnect: bool,
    /// The session expiry interval its MQTT 5 DISCONNECT set.
    expiry: Option<u32>,
    /// The session's record, for a connection with a client id: a persistent session's
    /// subscriptions kept up to date, a clean one's shared subscriptions (see
    /// [`shares`]).
    session: Option<SessionRecord>,
    persistent: bool,
}

/// Why the relay disconnects a client (MQTT 5 gets the reason).
type Refused = (DisconnectReasonCode, String);

impl Relayed {
    /// A SUBSCRIBE or UNSUBSCRIBE: the session's record with the subscriptions as they are
    /// now (filters refused are not kept; a clean session keeps its shared ones only), to be
    /// saved when they changed.
    fn track(&mut self, v5: bool, frame: &BytesMut) -> Option<SessionRecord> {
        let persistent = self.persistent;
        let session = self.session.as_mut()?;
        let before = session.subscriptions.clone();
        match decode_frame(v5, frame.clone(), usize::MAX >> 4).ok()? {
            Packet::Subscribe(sub, _) => {
                for f in sub.filters {
                    let kept = match shares::parse(&f.path) {
                        Some((_, filter)) => general::general_topic_allowed(filter),
                        None => {
                            persistent
                                && !shares::malformed(&f.path)
                                && general::general_topic_allowed(&f.path)
                        }
                    };
                    if kept {
                        session.subscriptions.insert(f.path, f.qos as u8);
                    }
                }
            }
            Packet::Unsubscribe(unsub, _) => {
                for f in unsub.filters {
                    session.subscriptions.remove(&f);
                }
            }
            _ => return None,
        }
        (persistent || session.subscriptions != before).then(|| session.clone())
    }

    /// The client's DISCONNECT: whether its will is still to go out, and its expiry.
    fn disconnect(&mut self, v5: bool, frame: &BytesMut) {
        if !v5 {
            self.clean_disconnect = true;
            return;
        }
        if let Ok(Packet::Disconnect(d, props)) = decode_frame(true, frame.clone(), usize::MAX >> 4)
        {
            self.clean_disconnect =
                d.reason_code != DisconnectReasonCode::DisconnectWithWillMessage;
            self.expiry = props
                .and_then(|p| p.session_expiry_interval)
                .or(self.expiry);
        }
    }

    /// A PUBLISH of the client: its topic (an alias resolved) checked, then enqueued on
    /// the bus, its acknowledgement owed once committed.
    fn publish(
        &mut self,
        v5: bool,
        frame: BytesMut,
        max: usize,
        bus: &bus::Bus,
        pending: &mut VecDeque<Owed>,
    ) -> Result<(), Refused> {
        let malformed = |e: anyhow::Error| (DisconnectReasonCode::MalformedPacket, e.to_string());
        let (qos, pkid) = publish_qos_pkid(&frame).map_err(malformed)?;
        let Packet::Publish(publish, mut props) =
            decode_frame(v5, frame, max).map_err(malformed)?
        else {
            return Err((
                DisconnectReasonCode::MalformedPacket,
                "not a PUBLISH".into(),
            ));
        };
        let invalid = |why: String| (DisconnectReasonCode::TopicNameInvalid, why);
        let mut topic = String::from_utf8(publish.topic.to_vec())
            .map_err(|_| invalid("the topic is not UTF-8".into()))?;
        if let Some(alias) = props.as_mut().and_then(|p| p.topic_alias.take()) {
            if alias == 0 {
                return Err((
                    DisconnectReasonCode::TopicAliasInvalid,
                    "topic alias 0".into(),
                ));
            }
            if topic.is_empty() {
                topic = self.aliases.get(&alias).cloned().ok_or_else(|| {
                    (
                        DisconnectReasonCode::ProtocolError,
                        format!("topic alias {alias} was never set"),
                    )
                })?;
            } else {
                self.aliases.insert(alias, topic.clone());
            }
        }
        if topic.is_empty() || topic.contains(['+', '#']) {
            return Err(invalid(format!("{topic:?} is not a topic name")));
        }
        if !general::general_topic_allowed(&topic) {
            let why = format!("publishing on {topic} (the device namespace)");
            if !v5 {
                return Err((DisconnectReasonCode::NotAuthorized, why));
            }
            match qos {
                1 => pending.push_back(ready(Some(puback(pkid, PubAckReason::NotAuthorized)))),
                2 => pending.push_back(ready(Some(pubrec(pkid, PubRecReason::NotAuthorized)))),
                _ => {}
            }
            return Ok(());
        }
        if qos == 2 && !self.awaiting_rel.insert(pkid) {
            // A retransmission of a QoS 2 PUBLISH already taken: no second copy.
            pending.push_back(ready(Some(pubrec(pkid, PubRecReason::Success))));
            return Ok(());
        }
        let message = bus::Message {
            topic,
            payload: publish.payload,
            qos,
            retain: publish.retain,
            props: props.filter(|p| *p != PublishProperties::default()),
            client_id: self.client_id.clone(),
        };
        let committed = bus.publish(&message);
        pending.push_back(Owed::Job(tokio::spawn(async move {
            match (qos, committed.await) {
                (0, Ok(())) => Ok(None),
                (0, Err(e)) => {
                    tracing::warn!(error = %e, "QoS 0 MQTT message not stored");
                    Ok(None)
                }
                (1, Ok(())) => Ok(Some(puback(pkid, PubAckReason::Success))),
                (_, Ok(())) => Ok(Some(pubrec(pkid, PubRecReason::Success))),
                (1, Err(_)) if v5 => Ok(Some(puback(pkid, PubAckReason::UnspecifiedError))),
                // 3.1.1 has no failure acknowledgement, and a QoS 2 packet id must not be
                // taken as delivered: close the connection, so the client sends it again.
                (_, Err(e)) => Err(format!("MQTT message not stored: {e}")),
            }
        })));
        Ok(())
    }

    /// A PUBREL: the QoS 2 exchange of `pkid` is over (the message went to the bus when it
    /// arrived; a PUBREL of an earlier connection's exchange is completed too).
    fn release(&mut self, pkid: u16) -> Owed {
        self.awaiting_rel.remove(&pkid);
        ready(Some(Packet::PubComp(
            PubComp {
                pkid,
                reason: PubCompReason::Success,
            },
            None,
        )))
    }
}

/// A general client's will as a message for the bus.
fn will_message(
    client_id: &str,
    will: LastWill,
    props: Option<LastWillProperties>,
) -> bus::Message {
    let props = props
        .map(|p| PublishProperties {
            payload_format_indicator: p.payload_format_indicator,
            message_expiry_interval: p.message_expiry_interval,
            response_topic: p.response_topic,
            correlation_data: p.correlation_data,
            user_properties: p.user_properties,
            content_type: p.content_type,
            ..PublishProperties::default()
        })
        .filter(|p| *p != PublishProperties::default());
    bus::Message {
        topic: String::from_utf8_lossy(&will.topic).into_owned(),
        payload: will.message,
        qos: will.qos as u8,
        retain: will.retain,
        props,
        client_id: client_id.to_string(),
    }
}

/// The CONNECT frame as rumqttd gets it: without its will (the relay publishes the will
/// itself), and without an MQTT 5 Topic Alias Maximum. rumqttd would give its outgoing
/// messages one alias per subscription filter, so the messages a wildcard filter matches
/// would all arrive under the first one's topic; without the property it sends topics.
fn forwarded_connect(v5: bool, connect: Bytes, drop_will: bool) -> anyhow::Result<Bytes> {
    if !drop_will && !v5 {
        return Ok(connect);
    }
    let Packet::Connect(c, mut props, will, will_props, login) =
        decode_frame(v5, BytesMut::from(&connect[..]), usize::MAX >> 4)?
    else {
        anyhow::bail!("not a CONNECT");
    };
    let aliases = props.as_ref().and_then(|p| p.topic_alias_max).is_some();
    if !drop_will && !aliases {
        return Ok(connect);
    }
    if let Some(p) = props.as_mut() {
        p.topic_alias_max = None;
    }
    let (will, will_props) = match drop_will {
        true => (None, None),
        false => (will, will_props),
    };
    let mut out = BytesMut::new();
    encode(
        v5,
        Packet::Connect(c, props, will, will_props, login),
        &mut out,
    )?;
    Ok(out.freeze())
}

/// The CONNECT frame with its clean start (clean session) flag off.
fn without_clean_start(connect: Bytes) -> anyhow::Result<Bytes> {
    // The protocol name, the level, then the connect flags.
    let (_, at) = first_string(&connect, "CONNECT")?;
    let mut frame = BytesMut::from(&connect[..]);
    let flags = frame
        .get_mut(at + 1)
        .ok_or_else(|| anyhow::anyhow!("CONNECT too short"))?;
    *flags &= !0x02;
    Ok(frame.freeze())
}

/// What the relay does with one packet from a general client.
enum Inspected {
    /// Send these bytes on to the broker.
    Forward(Bytes),
    /// A PUBLISH: it goes to the bus.
    Publish(BytesMut),
    /// A PUBREL of this packet id: the relay completes it.
    Release(u16),
    /// Answer the client directly; nothing goes to the broker.
    Answer(Box<Packet>),
}

/// Resolves when the peer has closed a stream nothing has been read from since it last
/// sent (never, once it sends more: that waits to be read).
async fn closed(stream: &TcpStream) {
    let mut b = [0u8; 1];
    loop {
        if stream.readable().await.is_err() {
            return;
        }
        match stream.peek(&mut b).await {
            Ok(0) | Err(_) => return,
            Ok(_) => std::future::pending::<()>().await,
        }
    }
}

/// The MQTT 5 DISCONNECT of a connection whose session another one took over (0x8E).
fn taken_over_disconnect() -> anyhow::Result<BytesMut> {
    let mut out = BytesMut::new();
    encode(
        true,
        disconnect(
            DisconnectReasonCode::SessionTakenOver,
            "another connection took the session over",
        ),
        &mut out,
    )?;
    Ok(out)
}

/// A persistent session resumed where rumqttd does not hold it: rumqttd's CONNACK goes to
/// the client with session present (once rumqttd accepted the connection), after the
/// session's subscriptions were made again (retained messages not sent again: MQTT 5's
/// retain handling 2; a 3.1.1 connection gets them, rumqttd has no such option there).
/// What rumqttd sent after its SUBACK, for the client.
async fn resubscribe(
    conn: &mut Conn,
    v5: bool,
    upstream: &mut TcpStream,
    subscriptions: &std::collections::BTreeMap<String, u8>,
) -> anyhow::Result<BytesMut> {
    let mut buf = BytesMut::new();
    let mut connack = read_frame(upstream, &mut buf, usize::MAX >> 4).await?;
    anyhow::ensure!(
        connack[0] >> 4 == 2,
        "the broker did not answer the CONNECT"
    );
    let at = fixed_header_len(&connack);
    let accepted = connack.get(at + 1) == Some(&0);
    if accepted {
        let filters: Vec<_> = subscriptions
            .iter()
            .filter(|(path, _)| shares::parse(path).is_none())
            .collect();
        if !filters.is_empty() {
            let filters = filters
                .into_iter()
                .map(|(path, qos)| rumqttd::protocol::Filter {
                    path: path.clone(),
                    qos: rumqttd::protocol::qos(*qos).unwrap_or_default(),
                    nolocal: false,
                    preserve_retain: false,
                    retain_forward_rule: rumqttd::protocol::RetainForwardRule::Never,
                })
                .collect();
            let mut out = BytesMut::new();
            let subscribe = rumqttd::protocol::Subscribe { pkid: 1, filters };
            encode(v5, Packet::Subscribe(subscribe, None), &mut out)?;
            upstream.write_all(&out).await?;
            let suback = read_frame(upstream, &mut buf, usize::MAX >> 4).await?;
            anyhow::ensure!(
                suback[0] >> 4 == 9,
                "the broker did not answer the SUBSCRIBE"
            );
        }
        if let Some(flags) = connack.get_mut(at) {
            *flags |= 1;
        }
    }
    conn.stream.write_all(&connack).await?;
    Ok(buf)
}

/// A shared subscription the client made or ended (the relay keeps them, not rumqttd).
#[derive(Debug, Clone, PartialEq, Eq)]
enum ShareChange {
    Join(String, u8),
    Leave(String),
}

/// Sorts one packet of a general client: publishes and releases for the relay, filters
/// checked against the device namespace, shared subscriptions taken out for the relay
/// (noted in `shared`; refused when the connection is `untracked`: without a client id its
/// membership cannot be recorded), the rest on to the broker.
fn inspect_general(
    v5: bool,
    frame: BytesMut,
    splices: &mut general::Splices,
    shared: &mut Vec<ShareChange>,
    untracked: bool,
) -> anyhow::Result<Inspected> {
    match frame[0] >> 4 {
        3 => Ok(Inspected::Publish(frame)),
        6 => {
            let at = fixed_header_len(&frame);
            let pkid = frame
                .get(at..at + 2)
                .ok_or_else(|| anyhow::anyhow!("PUBREL too short"))?;
            Ok(Inspected::Release(u16::from_be_bytes([pkid[0], pkid[1]])))
        }
        8 => {
            let raw = frame.clone().freeze();
            let Packet::Subscribe(mut sub, props) = decode_frame(v5, frame, usize::MAX >> 4)?
            else {
                anyhow::bail!("malformed SUBSCRIBE");
            };
            let asked = sub.filters.len();
            let refused = match v5 {
                true => SubscribeReasonCode::NotAuthorized,
                false => SubscribeReasonCode::Failure,
            };
            let invalid = match v5 {
                true => SubscribeReasonCode::TopicFilterInvalid,
                false => SubscribeReasonCode::Failure,
            };
            let unsupported = match v5 {
                true => SubscribeReasonCode::SharedSubscriptionsNotSupported,
                false => SubscribeReasonCode::Failure,
            };
            // The relay's own codes: refusals, and the shared subscriptions it keeps.
            let mut own = Vec::new();
            for (i, f) in sub.filters.iter().enumerate() {
                let code = match shares::parse(&f.path) {
                    _ if shares::malformed(&f.path) => invalid,
                    Some(_) if untracked => unsupported,
                    Some((_, filter)) if !general::general_topic_allowed(filter) => refused,
                    Some(_) => {
                        shared.push(ShareChange::Join(f.path.clone(), f.qos as u8));
                        SubscribeReasonCode::Success(f.qos)
                    }
                    None if !general::general_topic_allowed(&f.path) => refused,
                    None => continue,
                };
                own.push((i, code));
            }
            if own.is_empty() {
                return Ok(Inspected::Forward(raw));
            }
            if own.len() == asked {
                return Ok(Inspected::Answer(Box::new(Packet::SubAck(
                    SubAck {
                        pkid: sub.pkid,
                        return_codes: own.into_iter().map(|(_, c)| c).collect(),
                    },
                    None,
                ))));
            }
            let mut i = 0;
            sub.filters.retain(|_| {
                i += 1;
                !own.iter().any(|(at, _)| *at == i - 1)
            });
            splices.insert(sub.pkid, own, asked);
            let mut out = BytesMut::new();
            encode(v5, Packet::Subscribe(sub, props), &mut out)?;
            Ok(Inspected::Forward(out.freeze()))
        }
        10 => {
            let raw = frame.clone().freeze();
            let Packet::Unsubscribe(unsub, _) = decode_frame(v5, frame, usize::MAX >> 4)? else {
                anyhow::bail!("malformed UNSUBSCRIBE");
            };
            let before = shared.len();
            for f in &unsub.filters {
                if shares::parse(f).is_some() {
                    shared.push(ShareChange::Leave(f.clone()));
                }
            }
            // Only shared filters: the relay answers. With others, rumqttd does (and in
            // MQTT 5 says of the shared ones that there was no such subscription).
            if shared.len() - before < unsub.filters.len() {
                return Ok(Inspected::Forward(raw));
            }
            Ok(Inspected::Answer(Box::new(Packet::UnsubAck(
                UnsubAck {
                    pkid: unsub.pkid,
                    reasons: vec![UnsubAckReason::Success; unsub.filters.len()],
                },
                None,
            ))))
        }
        _ => Ok(Inspected::Forward(frame.freeze())),
    }
}

/// Copies one frame from the broker to `out`, putting refused filters' codes back into a
/// SUBACK that was forwarded without them.
fn splice_suback(
    v5: bool,
    frame: BytesMut,
    splices: &mut general::Splices,
    out: &mut BytesMut,
) -> anyhow::Result<()> {
    if frame[0] >> 4 != 9 {
        out.extend_from_slice(&frame);
        return Ok(());
    }
    let raw = frame.clone();
    let Ok(Packet::SubAck(ack, props)) = decode_frame(v5, frame, usize::MAX >> 4) else {
        out.extend_from_slice(&raw);
        return Ok(());
    };
    let Some((own, asked)) = splices.take(ack.pkid) else {
        out.extend_from_slice(&raw);
        return Ok(());
    };
    let missing = match v5 {
        true => SubscribeReasonCode::Unspecified,
        false => SubscribeReasonCode::Failure,
    };
    let return_codes = general::splice_codes(ack.return_codes, &own, asked, missing);
    encode(
        v5,
        Packet::SubAck(
            SubAck {
                pkid: ack.pkid,
                return_codes,
            },
            props,
        ),
        out,
    )
}

fn encode(v5: bool, packet: Packet, out: &mut BytesMut) -> anyhow::Result<()> {
    if v5 {
        V5.write(packet, out)
    } else {
        V4.write(packet, out)
    }
    .map(|_| ())
    .map_err(|e| anyhow::anyhow!("encode: {e:?}"))
}

/// Decodes one complete frame with the codec of the protocol level (`v5` or 3.1.1).
fn decode_frame(v5: bool, mut frame: BytesMut, max: usize) -> anyhow::Result<Packet> {
    let packet = if v5 {
        V5.read_mut(&mut frame, max)
    } else {
        V4.read_mut(&mut frame, max)
    }
    .map_err(|e| anyhow::anyhow!("malformed packet: {e:?}"))?;
    anyhow::ensure!(!frame.has_remaining(), "malformed packet: trailing bytes");
    Ok(packet)
}

/// The length-prefixed string that starts the variable header of a complete frame, and
/// the offset just after it; `what` names the packet in errors.
fn first_string<'a>(frame: &'a [u8], what: &str) -> anyhow::Result<(&'a [u8], usize)> {
    let header = fixed_header_len(frame);
    let len = frame
        .get(header..header + 2)
        .map(|b| u16::from_be_bytes([b[0], b[1]]) as usize)
        .ok_or_else(|| anyhow::anyhow!("{what} too short"))?;
    let end = header + 2 + len;
    let s = frame
        .get(header + 2..end)
        .ok_or_else(|| anyhow::anyhow!("{what} too short"))?;
    Ok((s, end))
}

/// An answer owed to the client, in the order of the packets it answers.
enum Owed {
    Ready(Option<Box<Packet>>),
    /// A publish being committed; its acknowledgement once it is.
    Job(tokio::task::JoinHandle<Result<Option<Packet>, String>>),
}

impl Owed {
    fn is_ready(&self) -> bool {
        match self {
            Owed::Ready(_) => true,
            Owed::Job(h) => h.is_finished(),
        }
    }

    /// The acknowledgement to send; an error ends the connection.
    async fn take(self) -> anyhow::Result<Option<Packet>> {
        match self {
            Owed::Ready(p) => Ok(p.map(|p| *p)),
            Owed::Job(h) => job_outcome(h.await),
        }
    }
}

/// The acknowledgement a finished publish job gives; an error ends the connection.
fn job_outcome(
    joined: Result<Result<Option<Packet>, String>, tokio::task::JoinError>,
) -> anyhow::Result<Option<Packet>> {
    match joined {
        Ok(r) => r.map_err(anyhow::Error::msg),
        Err(e) => anyhow::bail!("telemetry task failed: {e}"),
    }
}

/// The acknowledgement of the publish at the front of `pending`, once it is committed
/// (never resolves while the front is not a publish being committed).
async fn front_committed(pending: &mut VecDeque<Owed>) -> anyhow::Result<Option<Packet>> {
    match pending.front_mut() {
        Some(Owed::Job(h)) => job_outcome(h.await),
        _ => std::future::pending().await,
    }
}

fn ready(p: Option<Packet>) -> Owed {
    Owed::Ready(p.map(Box::new))
}

/// An MQTT 5 DISCONNECT from the server, with its reason string. (Always with properties:
/// rumqttd 0.20 encodes a DISCONNECT without properties one byte longer than its length.)
fn disconnect(reason_code: DisconnectReasonCode, why: &str) -> Packet {
    Packet::Disconnect(
        Disconnect { reason_code },
        Some(DisconnectProperties {
            session_expiry_interval: None,
            reason_string: Some(why.to_string()),
            user_properties: Vec::new(),
            server_reference: None,
        }),
    )
}

fn puback(pkid: u16, reason: PubAckReason) -> Packet {
    Packet::PubAck(PubAck { pkid, reason }, None)
}

fn pubrec(pkid: u16, reason: PubRecReason) -> Packet {
    Packet::PubRec(PubRec { pkid, reason }, None)
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn connack_refusal(v5: bool, refusal: &Refusal) -> Packet {
    let code = if v5 {
        match refusal.v5_code() {
            0x85 => ConnectReturnCode::ClientIdentifierNotValid,
            0x86 => ConnectReturnCode::BadUserNamePassword,
            0x8A => ConnectReturnCode::Banned,
            _ => ConnectReturnCode::NotAuthorized,
        }
    } else {
        match refusal.v4_code() {
            2 => ConnectReturnCode::ClientIdentifierNotValid,
            4 => ConnectReturnCode::BadUserNamePassword,
            _ => ConnectReturnCode::NotAuthorized,
        }
    };
    let why = match refusal {
        // Say what is wrong without saying why the credentials do not match.
        Refusal::UnknownDevice | Refusal::BadCredentials(_) => {
            "bad client id, user name or password".to_string()
        }
        other => other.reason(),
    };
    connack_code(v5, code, &why)
}

/// A refusing CONNACK; MQTT 5 also gets the reason string.
fn connack_code(v5: bool, code: ConnectReturnCode, why: &str) -> Packet {
    let props = v5.then(|| ConnAckProperties {
        reason_string: Some(why.to_string()),
        ..ConnAckProperties::default()
    });
    Packet::ConnAck(
        ConnAck {
            session_present: false,
            code,
        },
        props,
    )
}

/// The protocol level of a CONNECT frame (4: 3.1.1, 5: 5), read from its variable header.
fn connect_level(frame: &[u8]) -> anyhow::Result<u8> {
    anyhow::ensure!(frame[0] >> 4 == 1, "the first packet is not CONNECT");
    // The protocol name, then the level.
    let (_, at) = first_string(frame, "CONNECT")?;
    frame
        .get(at)
        .copied()
        .ok_or_else(|| anyhow::anyhow!("CONNECT too short"))
}

/// The length of a complete frame's fixed header (1 byte + the remaining-length varint).
fn fixed_header_len(frame: &[u8]) -> usize {
    1 + frame[1..]
        .iter()
        .take(4)
        .position(|b| b & 0x80 == 0)
        .map_or(4, |p| p + 1)
}

/// QoS and packet id of a complete PUBLISH frame (rumqttd keeps them crate-private).
fn publish_qos_pkid(frame: &[u8]) -> anyhow::Result<(u8, u16)> {
    let qos = (frame[0] >> 1) & 3;
    anyhow::ensure!(qos < 3, "PUBLISH with QoS 3");
    if qos == 0 {
        return Ok((0, 0));
    }
    let (_, at) = first_string(frame, "PUBLISH")?;
    let pkid = frame
        .get(at..at + 2)
        .map(|b| u16::from_be_bytes([b[0], b[1]]))
        .ok_or_else(|| anyhow::anyhow!("PUBLISH too short"))?;
    anyhow::ensure!(pkid != 0, "PUBLISH with QoS {qos} and packet id 0");
    Ok((qos, pkid))
}

/// The next complete frame from `reader`, buffered in `buf`. Its remaining length is checked
/// against `max` as soon as the fixed header is in, before the body is buffered. Cancel-safe:
/// what was read stays in `buf`.
async fn read_frame<R: tokio::io::AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut BytesMut,
    max: usize,
) -> anyhow::Result<BytesMut> {
    loop {
        if let Some(frame) = split_frame(buf, max)? {
            return Ok(frame);
        }
        let n = reader.read_buf(buf).await?;
        if n == 0 {
            anyhow::bail!("socket closed");
        }
    }
}

/// A complete frame off the front of `buf`, if there is one.
fn split_frame(buf: &mut BytesMut, max: usize) -> anyhow::Result<Option<BytesMut>> {
    match rumqttd::protocol::v4::check(buf.iter(), max) {
        Ok(h) => Ok(Some(buf.split_to(h.frame_length()))),
        Err(rumqttd::protocol::Error::InsufficientBytes(n)) => {
            // Room for the rest of this frame (bounded: the length was checked), no more.
            buf.reserve(n.min(64 << 10));
            Ok(None)
        }
        Err(e) => anyhow::bail!("bad packet: {e}"),
    }
}

/// One connection's socket and buffers.
struct Conn {
    stream: TcpStream,
    buf: BytesMut,
    out: BytesMut,
    max: usize,
}

impl Conn {
    /// The next complete frame.
    async fn frame(&mut self) -> anyhow::Result<BytesMut> {
        read_frame(&mut self.stream, &mut self.buf, self.max).await
    }

    /// Decodes one complete frame with the session's codec.
    fn decode(&self, v5: bool, frame: BytesMut) -> anyhow::Result<Packet> {
        decode_frame(v5, frame, self.max)
    }

    async fn write(&mut self, v5: bool, packet: Packet) -> anyhow::Result<()> {
        self.out.clear();
        encode(v5, packet, &mut self.out)?;
        self.stream.write_all(&self.out).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttd::protocol::{Connect, ConnectProperties};

    fn connect_frame(v5: bool, clean: bool, expiry: Option<u32>) -> Bytes {
        let props = expiry.map(|secs| ConnectProperties {
            session_expiry_interval: Some(secs),
            receive_maximum: None,
            max_packet_size: None,
            topic_alias_max: None,
            request_response_info: None,
            request_problem_info: None,
            user_properties: Vec::new(),
            authentication_method: None,
            authentication_data: None,
        });
        let connect = Connect {
            keep_alive: 30,
            client_id: "c-1".to_string(),
            clean_session: clean,
        };
        let mut out = BytesMut::new();
        encode(
            v5,
            Packet::Connect(connect, props, None, None, None),
            &mut out,
        )
        .expect("encode");
        out.freeze()
    }

    #[test]
    fn a_connect_forwarded_without_clean_start_keeps_everything_else() {
        for v5 in [false, true] {
            let frame = connect_frame(v5, true, v5.then_some(60));
            let rewritten = without_clean_start(frame).expect("rewrite");
            let Packet::Connect(connect, props, ..) =
                decode_frame(v5, BytesMut::from(&rewritten[..]), 1 << 20).expect("decode")
            else {
                panic!("not a CONNECT");
            };
            assert!(!connect.clean_session, "v5={v5}");
            assert_eq!(
                (connect.client_id.as_str(), connect.keep_alive),
                ("c-1", 30)
            );
            assert_eq!(
                props.and_then(|p| p.session_expiry_interval),
                v5.then_some(60)
            );
        }
    }

    #[test]
    fn rumqttd_gets_no_topic_alias_maximum() {
        let frame = connect_frame(true, true, Some(60));
        let Packet::Connect(c, Some(mut props), ..) =
            decode_frame(true, BytesMut::from(&frame[..]), 1 << 20).expect("decode")
        else {
            panic!("not a CONNECT with properties");
        };
        props.topic_alias_max = Some(10);
        let mut aliased = BytesMut::new();
        encode(
            true,
            Packet::Connect(c, Some(props), None, None, None),
            &mut aliased,
        )
        .expect("encode");
        let forwarded = forwarded_connect(true, aliased.freeze(), false).expect("rewrite");
        let Packet::Connect(connect, Some(props), ..) =
            decode_frame(true, BytesMut::from(&forwarded[..]), 1 << 20).expect("decode")
        else {
            panic!("not a CONNECT with properties");
        };
        assert_eq!(props.topic_alias_max, None);
        assert_eq!(props.session_expiry_interval, Some(60));
        assert_eq!(connect.client_id, "c-1");
        // Nothing to change: the frame goes as it came.
        let plain = connect_frame(false, true, None);
        assert_eq!(
            forwarded_connect(false, plain.clone(), false).expect("as it came"),
            plain
        );
    }

    #[test]
    fn a_disconnect_can_change_the_session_expiry() {
        let mut out = BytesMut::new();
        let mut props = match disconnect(DisconnectReasonCode::NormalDisconnection, "bye") {
            Packet::Disconnect(d, Some(p)) => (d, p),
            _ => unreachable!(),
        };
        props.1.session_expiry_interval = Some(0);
        encode(true, Packet::Disconnect(props.0, Some(props.1)), &mut out).expect("encode");
        let mut relayed = Relayed::default();
        relayed.disconnect(true, &out);
        assert_eq!(relayed.expiry, Some(0));
        assert!(relayed.clean_disconnect);
        // No properties: the interval of the CONNECT stands.
        let mut relayed = Relayed::default();
        relayed.disconnect(true, &BytesMut::from(&[0xE0u8, 0x00][..]));
        assert_eq!((relayed.expiry, relayed.clean_disconnect), (None, true));
        // 0x04: disconnect with the will message.
        let mut relayed = Relayed::default();
        relayed.disconnect(true, &BytesMut::from(&[0xE0u8, 0x01, 0x04][..]));
        assert!(!relayed.clean_disconnect);
    }
}
