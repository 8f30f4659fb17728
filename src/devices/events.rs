//! Device notifications: `aq.device-events`, keyed by device id, one stream per device of
//! `online`, `offline`, `created`, `updated`, `deleted` and `auth_failed` events, each with
//! a `seq` that is gap-free and without duplicates per device.
//!
//! * Nodes *report* through [`Events`]: the MQTT front its sessions (online, offline) and
//!   refused connects (auth_failed), the metadata leader the registry's changes (created,
//!   updated, deleted; from the family's outbox, see [`super::records`]). Reports are batched
//!   per partition of the topic, in the order they were made, and sent to the partition
//!   leader, again until it answers: a report may be sent twice, it is recorded once.
//! * The partition leader's [`Sequencer`] decides which reports are events and numbers
//!   them. It keeps each device's [`DeviceState`] (last seq, the session online, the last
//!   metadata change recorded, recent session and attempt ids); every record carries that
//!   state, and whenever this node gains leadership the state is rebuilt from the partition,
//!   so numbering continues across failovers. A report seen before is not recorded again (the
//!   same session online again, the offline of a session that is not online, a metadata
//!   change already recorded, an auth attempt already recorded). The offline of a session a
//!   newer one replaced (the device reconnected, maybe to another node) is not recorded, and
//!   a new session replacing a live one first records the old one's offline ("taken over by
//!   a new session"), so a device's events alternate online / offline.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aqueduct_protocol::devices as pb;
use aqueduct_protocol::devices::devices_client::DevicesClient;
use aqueduct_raft::network::call_within;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::Registry;
use super::records::{DeviceCommand, FAMILY, outbox_index};
use crate::broker::records::{ProducerRecord, decode_batches, encode_batch, partition_for_key};
use crate::broker::{
    Acks, Broker, BrokerError, BrokerResult, ErrorCode, FetchRequest, OffsetSpec, ProduceRequest,
    Redirect, from_status,
};

/// The notification topic.
pub const EVENTS_TOPIC: &str = "aq.device-events";
/// Most reports in one batch sent to a partition leader.
const MAX_BATCH: usize = 500;
/// Session and attempt ids kept per device to recognise a report sent twice.
const RECENT: usize = 8;
/// How long after start a node begins taking unanswering peers' sessions for lost.
const SWEEP_GRACE: Duration = Duration::from_secs(10);
/// How often a report the partition leader has not taken yet is logged as late.
const REPORT_LATE: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    Online,
    Offline,
    Created,
    Updated,
    Deleted,
    AuthFailed,
}

impl EventKind {
    pub const ALL: [EventKind; 6] = [
        EventKind::Online,
        EventKind::Offline,
        EventKind::Created,
        EventKind::Updated,
        EventKind::Deleted,
        EventKind::AuthFailed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Online => "online",
            EventKind::Offline => "offline",
            EventKind::Created => "created",
            EventKind::Updated => "updated",
            EventKind::Deleted => "deleted",
            EventKind::AuthFailed => "auth_failed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

/// Why a session went offline (the `reason` of offline events).
pub mod reasons {
    pub const CLEAN_DISCONNECT: &str = "clean disconnect";
    pub const KEEP_ALIVE: &str = "keep-alive expired";
    pub const SOCKET_CLOSED: &str = "socket closed";
    pub const TAKEN_OVER: &str = "taken over by a new session";
    pub const DISABLED: &str = "disabled";
    pub const DELETED: &str = "deleted";
    /// The node holding the session stopped answering (its sessions are gone with it).
    pub const NODE_LOST: &str = "node lost";
    /// The node holding the session started again (a new incarnation has no old sessions).
    pub const NODE_RESTARTED: &str = "node restarted";
    /// (online) A session taken for lost with its node, still connected when the node
    /// answered again.
    pub const NODE_BACK: &str = "node answers again";
}

/// The node a session id (`{node}-{incarnation}-{n}`) belongs to.
pub fn session_node(session: &str) -> Option<u64> {
    session.split('-').next()?.parse().ok()
}

/// The incarnation of the node a session id belongs to.
pub fn session_incarnation(session: &str) -> Option<u64> {
    session.split('-').nth(1)?.parse().ok()
}

/// What a node reports; the sequencer decides whether it is an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub device_id: String,
    pub product: String,
    pub event: EventKind,
    /// When it happened, ms since the epoch.
    pub at: u64,
    pub reason: String,
    /// The node it happened on.
    pub node: u64,
    /// online / offline: the session (unique in the cluster); auth_failed: the attempt.
    pub origin: String,
    /// created / updated / deleted: the metadata log index of the change.
    pub meta_index: u64,
}

/// One record of `aq.device-events` (DESIGN.md §7: `{device_id, event, seq, at, reason,
/// node}`, plus the device's state after the event).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceEvent {
    pub device_id: String,
    pub event: EventKind,
    pub seq: u64,
    pub at: u64,
    pub reason: String,
    pub node: u64,
    pub product: String,
    /// online / offline: the session; auth_failed: the attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    /// The session online after this event, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub online_session: Option<String>,
    /// When that session came online.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub online_at: Option<u64>,
    /// The session last recorded offline because its node was lost (while no other
    /// session came online since): the node may answer again with it still connected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lost_session: Option<String>,
    /// The last metadata change recorded for the device, up to this event.
    #[serde(default)]
    pub meta_index: u64,
}

/// What the partition leader knows of one device.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceState {
    pub seq: u64,
    pub product: String,
    /// The last event and its time.
    pub last: Option<(EventKind, u64)>,
    pub online: Option<String>,
    /// When the online session came online.
    pub online_at: Option<u64>,
    /// The session recorded offline as its node was lost, until another comes online.
    pub lost: Option<String>,
    pub meta_index: u64,
    /// Session and attempt ids recently recorded, newest last.
    pub recent: VecDeque<String>,
}

impl DeviceState {
    /// Takes in one recorded event (also when rebuilding from the partition).
    pub fn fold(&mut self, e: &DeviceEvent) {
        self.seq = e.seq;
        self.product.clone_from(&e.product);
        self.last = Some((e.event, e.at));
        self.online.clone_from(&e.online_session);
        self.online_at = e.online_at;
        self.lost.clone_from(&e.lost_session);
        self.meta_index = self.meta_index.max(e.meta_index);
        if let Some(s) = &e.session
            && !self.recent.contains(s)
        {
            if self.recent.len() == RECENT {
                self.recent.pop_front();
            }
            self.recent.push_back(s.clone());
        }
    }

    /// The events `r` makes (none when it was recorded before or is moot), folded in.
    pub fn decide(&mut self, r: &Report) -> Vec<DeviceEvent> {
        let mut out = Vec::new();
        let seen = self.recent.contains(&r.origin);
        match r.event {
            EventKind::Online => {
                // A session seen before comes online again only when it was taken for
                // lost with its node, and the node answers again with it still connected.
                let back = self.lost.as_deref() == Some(r.origin.as_str());
                if self.online.as_deref() == Some(r.origin.as_str()) || (seen && !back) {
                    return out;
                }
                // A late report of a session older than the one online (its node could not
                // reach the leader for a while): that session has already been replaced.
                if self.online.is_some() && self.online_at.is_some_and(|t| r.at < t) {
                    return out;
                }
                if let Some(old) = self.online.clone() {
                    out.push(self.next(r, EventKind::Offline, Some(old), reasons::TAKEN_OVER));
                }
                out.push(self.next(r, EventKind::Online, Some(r.origin.clone()), &r.reason));
            }
            EventKind::Offline => {
                if self.online.as_deref() != Some(r.origin.as_str()) {
                    return out;
                }
                out.push(self.next(r, EventKind::Offline, Some(r.origin.clone()), &r.reason));
            }
            EventKind::Created | EventKind::Updated | EventKind::Deleted => {
                if r.meta_index <= self.meta_index {
                    return out;
                }
                out.push(self.next(r, r.event, None, &r.reason));
            }
            EventKind::AuthFailed => {
                if seen {
                    return out;
                }
                out.push(self.next(r, r.event, Some(r.origin.clone()), &r.reason));
            }
        }
        out
    }

    fn next(
        &mut self,
        r: &Report,
        event: EventKind,
        session: Option<String>,
        reason: &str,
    ) -> DeviceEvent {
        let (online_session, online_at) = match event {
            EventKind::Online => (session.clone(), Some(r.at)),
            EventKind::Offline => (None, None),
            _ => (self.online.clone(), self.online_at),
        };
        let lost_session = match event {
            EventKind::Online => None,
            EventKind::Offline if reason == reasons::NODE_LOST => session.clone(),
            EventKind::Offline => None,
            _ => self.lost.clone(),
        };
        let meta_index = match event {
            EventKind::Created | EventKind::Updated | EventKind::Deleted => r.meta_index,
            _ => self.meta_index,
        };
        let e = DeviceEvent {
            device_id: r.device_id.clone(),
            event,
            seq: self.seq + 1,
            at: r.at,
            reason: reason.to_string(),
            node: r.node,
            product: r.product.clone(),
            session,
            online_session,
            online_at,
            lost_session,
            meta_index,
        };
        self.fold(&e);
        e
    }
}

/// The device states of one partition, as of a leader term.
#[derive(Debug)]
struct Ledger {
    term: i32,
    devices: HashMap<String, DeviceState>,
}

impl Ledger {
    /// Offline reports for the sessions online on nodes that are gone: `gone(node,
    /// incarnation)` gives the reason (node lost, node restarted) or None while the node
    /// holding a session of that incarnation answers.
    fn lost_sessions(&self, gone: impl Fn(u64, u64) -> Option<&'static str>) -> Vec<Report> {
        self.devices
            .iter()
            .filter_map(|(id, d)| {
                let session = d.online.as_ref()?;
                let node = session_node(session)?;
                let reason = gone(node, session_incarnation(session).unwrap_or(0))?;
                Some(Report {
                    device_id: id.clone(),
                    product: d.product.clone(),
                    event: EventKind::Offline,
                    at: u64::try_from(super::now_ms()).unwrap_or(0),
                    reason: reason.to_string(),
                    node,
                    origin: session.clone(),
                    meta_index: 0,
                })
            })
            .collect()
    }
}

/// Each partition's ledger, behind a lock held while a batch is numbered and written.
type Ledgers = HashMap<u32, Arc<tokio::sync::Mutex<Option<Ledger>>>>;

/// Numbers the events of the partitions this node leads (cheap to clone).
#[derive(Debug, Clone)]
pub struct Sequencer {
    broker: Broker,
    ledgers: Arc<Mutex<Ledgers>>,
}

impl Sequencer {
    pub fn new(broker: Broker) -> Self {
        Self {
            broker,
            ledgers: Arc::default(),
        }
    }

    fn ledger(&self, partition: u32) -> Arc<tokio::sync::Mutex<Option<Ledger>>> {
        let mut all = self.ledgers.lock().unwrap_or_else(|p| p.into_inner());
        Arc::clone(all.entry(partition).or_default())
    }

    /// Records the events `reports` (all of `partition`) make, once a quorum has them;
    /// answers each report with the seq of the last event it made, or None when it made
    /// none. Refused (with the leader's address) where this node does not lead.
    pub async fn sequence(
        &self,
        partition: u32,
        reports: &[Report],
    ) -> BrokerResult<Vec<Option<u64>>> {
        self.broker.leader_replica(EVENTS_TOPIC, partition)?;
        let ledger = self.ledger(partition);
        let mut ledger = ledger.lock().await;
        let term = self.broker.leader_epoch(EVENTS_TOPIC, partition);
        if ledger.as_ref().is_none_or(|l| l.term != term) {
            *ledger = None;
            *ledger = Some(self.rebuild(partition, term).await?);
        }
        let Some(l) = ledger.as_mut() else {
            unreachable!("rebuilt above");
        };
        let mut outcomes = Vec::with_capacity(reports.len());
        let mut records = Vec::new();
        for r in reports {
            let state = l.devices.entry(r.device_id.clone()).or_default();
            let made = state.decide(r);
            outcomes.push(made.last().map(|e| e.seq));
            for e in made {
                let value = serde_json::to_vec(&e)
                    .map_err(|e| BrokerError::internal("encode a device event", e))?;
                records.push(
                    ProducerRecord::value(value).with_key(Bytes::from(e.device_id.into_bytes())),
                );
            }
        }
        if records.is_empty() {
            return Ok(outcomes);
        }
        let batch = encode_batch(&records, None)
            .map_err(|e| BrokerError::internal("encode device events", e))?;
        let produced = self
            .broker
            .produce(ProduceRequest {
                topic: EVENTS_TOPIC.to_string(),
                partition,
                batch,
                acks: Acks::All,
            })
            .await;
        match produced {
            Ok(_) => Ok(outcomes),
            Err(e) => {
                // Whether it was written is unknown: learn it from the log next time.
                *ledger = None;
                Err(e)
            }
        }
    }

    /// What the ledger of `partition` (led here) says of `device_id`.
    pub async fn presence(&self, partition: u32, device_id: &str) -> BrokerResult<pb::Presence> {
        self.sequence(partition, &[]).await?;
        let ledger = self.ledger(partition);
        let ledger = ledger.lock().await;
        let state = ledger
            .as_ref()
            .and_then(|l| l.devices.get(device_id))
            .cloned()
            .unwrap_or_default();
        Ok(presence_pb(&state))
    }

    /// Records offline ("node lost") for the sessions online on nodes that stopped
    /// answering, in the partitions this node leads; runs until the node stops.
    pub async fn sweep(self) {
        // A node just started has not heard from its peers yet: none is taken for lost then.
        tokio::time::sleep(SWEEP_GRACE).await;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let partitions = match self.broker.topics().topic(EVENTS_TOPIC) {
                Ok(Some(info)) => info.record.partitions,
                _ => continue,
            };
            for partition in 0..partitions {
                if !self.broker.leads(EVENTS_TOPIC, partition) {
                    continue;
                }
                // An empty batch loads the ledger of a partition this node just took over.
                if let Err(e) = self.sequence(partition, &[]).await {
                    tracing::debug!(partition, error = %e, "device event ledger not ready");
                    continue;
                }
                let ledger = self.ledger(partition);
                let gone = |node: u64, incarnation: u64| {
                    if !self.broker.node_alive(node) {
                        return Some(reasons::NODE_LOST);
                    }
                    // A node that answers as a later incarnation started again.
                    self.broker
                        .node_incarnation(node)
                        .is_some_and(|now| now != incarnation)
                        .then_some(reasons::NODE_RESTARTED)
                };
                let lost = match ledger.lock().await.as_ref() {
                    Some(l) => l.lost_sessions(gone),
                    None => continue,
                };
                if lost.is_empty() {
                    continue;
                }
                if let Err(e) = self.sequence(partition, &lost).await {
                    tracing::debug!(partition, error = %e, "recording lost sessions; will retry");
                }
            }
        }
    }

    /// Every device's state, from the partition's records (the last one of each device
    /// carries its state), once every record this leader holds is committed.
    async fn rebuild(&self, partition: u32, term: i32) -> BrokerResult<Ledger> {
        let end = self
            .broker
            .settled_end(EVENTS_TOPIC, partition, Duration::from_secs(10))
            .await?;
        let mut offset = self
            .broker
            .list_offsets(EVENTS_TOPIC, partition, OffsetSpec::Earliest)?;
        let mut devices: HashMap<String, DeviceState> = HashMap::new();
        let mut records = 0usize;
        while offset < end {
            let fetched = self
                .broker
                .fetch(FetchRequest {
                    topic: EVENTS_TOPIC.to_string(),
                    partition,
                    offset,
                    max_bytes: 4 << 20,
                    max_wait: Duration::ZERO,
                })
                .await?;
            let batch = decode_batches(fetched.batches, EVENTS_TOPIC, partition, offset)
                .map_err(|e| BrokerError::internal("read device events", e))?;
            let Some(last) = batch.last().map(|r| r.offset) else {
                break;
            };
            for r in batch {
                let Some(value) = r.value else { continue };
                match serde_json::from_slice::<DeviceEvent>(&value) {
                    Ok(e) => {
                        devices.entry(e.device_id.clone()).or_default().fold(&e);
                        records += 1;
                    }
                    Err(e) => {
                        tracing::warn!(partition, offset = r.offset, error = %e,
                            "skipping a record of {EVENTS_TOPIC} that is not a device event");
                    }
                }
            }
            offset = last + 1;
        }
        tracing::info!(
            partition,
            term,
            records,
            devices = devices.len(),
            "device event sequencer ready"
        );
        Ok(Ledger { term, devices })
    }
}

/// A report on its way to its partition's worker.
struct Pending {
    report: Report,
    done: Option<oneshot::Sender<BrokerResult<Option<u64>>>>,
}

/// Reports events from this node (cheap to clone).
#[derive(Debug, Clone)]
pub struct Events {
    broker: Broker,
    sequencer: Sequencer,
    node: u64,
    shape: (u32, Option<u16>),
    dispatcher: Arc<Mutex<Option<mpsc::UnboundedSender<Pending>>>>,
}

impl Events {
    /// `partitions` and `replication_factor` (None: the cluster default) shape the topic
    /// when it is created on first use.
    pub fn new(
        broker: Broker,
        sequencer: Sequencer,
        partitions: u32,
        replication_factor: Option<u16>,
    ) -> Self {
        Self {
            node: broker.node_id(),
            broker,
            sequencer,
            shape: (partitions.max(1), replication_factor),
            dispatcher: Arc::default(),
        }
    }

    /// This node's id (the `node` of its reports).
    pub fn node(&self) -> u64 {
        self.node
    }

    /// This process's incarnation (the middle of its session ids).
    pub fn incarnation(&self) -> u64 {
        self.broker.incarnation()
    }

    /// Reports the sessions `live` lists online again whenever a peer answers after a
    /// silence: a partition leader that could not reach this node took them for lost
    /// ("node lost"), and they are still connected. Sessions recorded online already make
    /// no event. Runs until dropped.
    pub async fn reassert(self, live: impl Fn() -> Vec<Report> + Send) {
        let mut runs: HashMap<u64, Option<std::time::Instant>> = HashMap::new();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let mut back = false;
            for (node, since) in self.broker.peer_runs() {
                let before = runs.insert(node, since);
                back |= since.is_some() && before.is_some_and(|b| b != since);
            }
            if back {
                for r in live() {
                    self.report(r);
                }
            }
        }
    }

    /// Reports `r`, at once and in order with this node's other reports; it is recorded in
    /// the background.
    pub fn report(&self, r: Report) {
        self.send(Pending {
            report: r,
            done: None,
        });
    }

    /// Reports `r` at once (as [`Events::report`]); resolves when the partition leader has
    /// recorded it (or found it made no event), with the seq of its last event.
    pub fn record(
        &self,
        r: Report,
    ) -> impl std::future::Future<Output = BrokerResult<Option<u64>>> + Send + 'static {
        let (done, wait) = oneshot::channel();
        self.send(Pending {
            report: r,
            done: Some(done),
        });
        async move {
            wait.await
                .map_err(|_| BrokerError::internal("device events", "the reporter stopped"))?
        }
    }

    /// On the metadata leader (on every node, working while it leads): records the device
    /// registry's outbox (created, updated, deleted; see [`super::records`]) in order, then
    /// trims what was recorded. A new leader records again what the old one may have
    /// recorded without trimming; the sequencer recognises it.
    pub async fn follow_outbox(self, registry: Registry) {
        let mut feed = registry.controller().state().changes();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                got = feed.recv() => match got {
                    Ok(c) if c.family != FAMILY => continue,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                    _ => {}
                },
            }
            if !registry.controller().leads() {
                continue;
            }
            if let Err(e) = self.drain_outbox(&registry).await {
                tracing::debug!(error = %e, "device outbox: retrying");
            }
        }
    }

    async fn drain_outbox(&self, registry: &Registry) -> BrokerResult<()> {
        loop {
            let entries = registry.outbox(MAX_BATCH)?;
            let Some(through) = entries.last().map(|(k, _)| k.clone()) else {
                return Ok(());
            };
            let waits: Vec<_> = entries
                .into_iter()
                .filter_map(|(key, e)| {
                    let event = EventKind::parse(&e.event)?;
                    Some(self.record(Report {
                        device_id: e.device_id,
                        product: e.product,
                        event,
                        at: u64::try_from(e.at_ms).unwrap_or(0),
                        reason: e.reason,
                        node: self.node,
                        origin: String::new(),
                        meta_index: outbox_index(&key)?,
                    }))
                })
                .collect();
            for w in waits {
                w.await?;
            }
            registry
                .propose(&DeviceCommand::TrimOutbox { through })
                .await?;
        }
    }

    fn send(&self, p: Pending) {
        let tx = {
            let mut d = self.dispatcher.lock().unwrap_or_else(|e| e.into_inner());
            match d.as_ref() {
                Some(tx) if !tx.is_closed() => tx.clone(),
                _ => {
                    let (tx, rx) = mpsc::unbounded_channel();
                    *d = Some(tx.clone());
                    tokio::spawn(self.clone().dispatch(rx));
                    tx
                }
            }
        };
        if let Err(mpsc::error::SendError(p)) = tx.send(p)
            && let Some(done) = p.done
        {
            let _ = done.send(Err(BrokerError::internal(
                "device events",
                "the reporter stopped",
            )));
        }
    }

    /// Sends each report on to its partition's worker, in order; the topic is created (or
    /// looked up) before the first.
    async fn dispatch(self, mut rx: mpsc::UnboundedReceiver<Pending>) {
        let mut partitions: Option<u32> = None;
        let mut workers: HashMap<u32, mpsc::UnboundedSender<Pending>> = HashMap::new();
        while let Some(p) = rx.recv().await {
            let n = match partitions {
                Some(n) => n,
                None => loop {
                    match self
                        .broker
                        .topics()
                        .ensure_system_with(
                            EVENTS_TOPIC,
                            self.shape.0,
                            self.shape.1,
                            // Compacted, not deleted by age: the last record of every device
                            // carries its state, so numbering continues however long a
                            // device stays quiet (the active segment keeps full history).
                            &[("cleanup.policy", "compact")],
                        )
                        .await
                    {
                        Ok(info) => break *partitions.insert(info.record.partitions),
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot create {EVENTS_TOPIC}; retrying");
                            tokio::time::sleep(Duration::from_millis(500)).await;
                        }
                    }
                },
            };
            let partition = partition_for_key(p.report.device_id.as_bytes(), n);
            let worker = workers.entry(partition).or_insert_with(|| {
                let (tx, rx) = mpsc::unbounded_channel();
                tokio::spawn(self.clone().run(partition, rx));
                tx
            });
            let _ = worker.send(p);
        }
    }

    /// One partition's reports, a batch at a time, each batch until the leader takes it.
    async fn run(self, partition: u32, mut rx: mpsc::UnboundedReceiver<Pending>) {
        while let Some(first) = rx.recv().await {
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(p) => batch.push(p),
                    Err(_) => break,
                }
            }
            let reports: Vec<Report> = batch.iter().map(|p| p.report.clone()).collect();
            let seqs = self.deliver(partition, &reports).await;
            for (i, p) in batch.into_iter().enumerate() {
                if let Some(done) = p.done {
                    let _ = done.send(Ok(seqs.get(i).copied().flatten()));
                }
            }
        }
    }

    /// What the leader of the device's partition says of it now (here or on another node).
    pub async fn presence(&self, device_id: &str) -> BrokerResult<pb::Presence> {
        let Some(info) = self.broker.topics().topic(EVENTS_TOPIC)? else {
            // No event was ever recorded: nobody has been online.
            return Ok(pb::Presence::default());
        };
        let partition = partition_for_key(device_id.as_bytes(), info.record.partitions);
        if self.broker.leads(EVENTS_TOPIC, partition) {
            return self.sequencer.presence(partition, device_id).await;
        }
        let channel = self.broker.leader_channel(EVENTS_TOPIC, partition)?;
        let request = pb::PresenceRequest {
            partition,
            device_id: device_id.to_string(),
        };
        call_within(Duration::from_secs(5), request, |r| async move {
            DevicesClient::new(channel).get_presence(r).await
        })
        .await
        .map_err(|s| from_status(&s))
    }

    /// Offers `reports` to the partition leader (here or on another node) until it takes
    /// them: a report is never given up (the ones behind it wait, in order), and one not
    /// taken for a while is logged.
    async fn deliver(&self, partition: u32, reports: &[Report]) -> Vec<Option<u64>> {
        let mut late = Instant::now() + REPORT_LATE;
        let mut redirect: Option<String> = None;
        let mut pause = Duration::from_millis(50);
        loop {
            let attempt = match redirect.take() {
                None if self.broker.leads(EVENTS_TOPIC, partition) => {
                    self.sequencer.sequence(partition, reports).await
                }
                given => {
                    match given.or_else(|| self.broker.leader_address(EVENTS_TOPIC, partition)) {
                        Some(addr) => self.forward(&addr, partition, reports).await,
                        None => Err(BrokerError::new(
                            ErrorCode::LeaderNotAvailable,
                            format!("{EVENTS_TOPIC}/{partition} has no known leader"),
                        )),
                    }
                }
            };
            match attempt {
                Ok(seqs) => return seqs,
                Err(e) => {
                    if Instant::now() >= late {
                        tracing::warn!(partition, reports = reports.len(), error = %e,
                            "device events not recorded yet; still trying");
                        late = Instant::now() + REPORT_LATE;
                    } else {
                        tracing::debug!(partition, error = %e, "device events: retrying");
                    }
                    if let Redirect::Leader { addr, .. } = &e.redirect {
                        redirect = Some(addr.clone());
                        // Two nodes naming each other while leadership moves: not a spin.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    } else {
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(Duration::from_secs(2));
                    }
                }
            }
        }
    }

    async fn forward(
        &self,
        addr: &str,
        partition: u32,
        reports: &[Report],
    ) -> BrokerResult<Vec<Option<u64>>> {
        let channel = self.broker.channels().get(addr).map_err(|e| {
            BrokerError::new(
                ErrorCode::LeaderNotAvailable,
                format!("cannot reach the leader at {addr}: {e}"),
            )
        })?;
        let request = pb::RecordEventsRequest {
            partition,
            reports: reports.iter().map(report_pb).collect(),
        };
        let reply = call_within(Duration::from_secs(15), request, |r| async move {
            DevicesClient::new(channel).record_events(r).await
        })
        .await
        .map_err(|s| from_status(&s))?;
        Ok(reply
            .outcomes
            .into_iter()
            .map(|o| o.recorded.then_some(o.seq))
            .collect())
    }
}

pub fn presence_pb(s: &DeviceState) -> pb::Presence {
    pb::Presence {
        online: s.online.is_some(),
        node: s.online.as_deref().and_then(session_node).unwrap_or(0),
        last_event: s
            .last
            .map(|(k, _)| k.as_str().to_string())
            .unwrap_or_default(),
        seq: s.seq,
        last_at_ms: s.last.map_or(0, |(_, at)| at),
    }
}

pub fn report_pb(r: &Report) -> pb::EventReport {
    pb::EventReport {
        device_id: r.device_id.clone(),
        product: r.product.clone(),
        event: r.event.as_str().to_string(),
        at_ms: r.at,
        reason: r.reason.clone(),
        node: r.node,
        origin: r.origin.clone(),
        meta_index: r.meta_index,
    }
}

pub fn report_from_pb(r: pb::EventReport) -> Result<Report, String> {
    let event = EventKind::parse(&r.event).ok_or_else(|| format!("unknown event {:?}", r.event))?;
    Ok(Report {
        device_id: r.device_id,
        product: r.product,
        event,
        at: r.at_ms,
        reason: r.reason,
        node: r.node,
        origin: r.origin,
        meta_index: r.meta_index,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(event: EventKind, origin: &str, meta_index: u64) -> Report {
        Report {
            device_id: "d1".into(),
            product: "thermo".into(),
            event,
            at: 1,
            reason: String::new(),
            node: 1,
            origin: origin.into(),
            meta_index,
        }
    }

    fn kinds(events: &[DeviceEvent]) -> Vec<(EventKind, u64)> {
        events.iter().map(|e| (e.event, e.seq)).collect()
    }

    #[test]
    fn events_alternate_and_are_numbered_without_gaps_or_repeats() {
        use EventKind::*;
        let mut s = DeviceState::default();
        assert_eq!(
            kinds(&s.decide(&report(Created, "", 7))),
            vec![(Created, 1)]
        );
        // The same change reported again (a new metadata leader resending it): nothing.
        assert!(s.decide(&report(Created, "", 7)).is_empty());
        assert_eq!(
            kinds(&s.decide(&report(Online, "n1-a", 0))),
            vec![(Online, 2)]
        );
        assert!(s.decide(&report(Online, "n1-a", 0)).is_empty());
        // The device reconnects to another node before node 1 sees its socket close: the
        // old session is recorded offline (taken over), node 1's late offline is not.
        let moved = s.decide(&report(Online, "n2-b", 0));
        assert_eq!(kinds(&moved), vec![(Offline, 3), (Online, 4)]);
        assert_eq!(moved[0].reason, reasons::TAKEN_OVER);
        assert_eq!(moved[0].session.as_deref(), Some("n1-a"));
        assert!(s.decide(&report(Offline, "n1-a", 0)).is_empty());
        assert_eq!(
            kinds(&s.decide(&report(Offline, "n2-b", 0))),
            vec![(Offline, 5)]
        );
        // A whole batch sent again after its answer was lost: nothing new.
        assert!(s.decide(&report(Online, "n2-b", 0)).is_empty());
        assert!(s.decide(&report(Offline, "n2-b", 0)).is_empty());
        assert_eq!(
            kinds(&s.decide(&report(AuthFailed, "n1-x", 0))),
            vec![(AuthFailed, 6)]
        );
        assert!(s.decide(&report(AuthFailed, "n1-x", 0)).is_empty());
        assert_eq!(
            kinds(&s.decide(&report(Updated, "", 9))),
            vec![(Updated, 7)]
        );
        assert!(s.decide(&report(Updated, "", 8)).is_empty());
    }

    fn at(mut r: Report, at: u64) -> Report {
        r.at = at;
        r
    }

    #[test]
    fn a_late_report_of_an_older_session_does_not_replace_the_one_online() {
        use EventKind::*;
        let mut s = DeviceState::default();
        assert_eq!(
            kinds(&s.decide(&at(report(Online, "2-9-5", 0), 200))),
            vec![(Online, 1)]
        );
        // Node 1 could not reach the leader: its session, which started earlier, is late.
        assert!(s.decide(&at(report(Online, "1-9-3", 0), 100)).is_empty());
        assert!(s.decide(&at(report(Offline, "1-9-3", 0), 150)).is_empty());
        assert_eq!(s.online.as_deref(), Some("2-9-5"));
        // A newer session does take over.
        assert_eq!(
            kinds(&s.decide(&at(report(Online, "1-9-4", 0), 300))),
            vec![(Offline, 2), (Online, 3)]
        );
    }

    #[test]
    fn a_session_taken_for_lost_comes_back_when_its_node_answers_again() {
        use EventKind::*;
        let mut s = DeviceState::default();
        s.decide(&report(Online, "2-9-5", 0));
        let mut lost = report(Offline, "2-9-5", 0);
        lost.reason = reasons::NODE_LOST.into();
        assert_eq!(kinds(&s.decide(&lost)), vec![(Offline, 2)]);
        assert_eq!(s.lost.as_deref(), Some("2-9-5"));
        // The node answers again and reports its live sessions: online again, once.
        assert_eq!(
            kinds(&s.decide(&report(Online, "2-9-5", 0))),
            vec![(Online, 3)]
        );
        assert!(s.decide(&report(Online, "2-9-5", 0)).is_empty());
        assert_eq!(s.lost, None);
        // A session that ended normally does not come back from a resent report.
        assert_eq!(
            kinds(&s.decide(&report(Offline, "2-9-5", 0))),
            vec![(Offline, 4)]
        );
        assert!(s.decide(&report(Online, "2-9-5", 0)).is_empty());
    }

    #[test]
    fn sessions_of_a_lost_or_restarted_node_are_reported_offline() {
        use EventKind::*;
        let mut ledger = Ledger {
            term: 1,
            devices: HashMap::new(),
        };
        for (device, session) in [("a", "1-100-1"), ("b", "2-200-1"), ("c", "3-300-1")] {
            let mut r = report(Online, session, 0);
            r.device_id = device.into();
            ledger.devices.entry(device.into()).or_default().decide(&r);
        }
        // Node 1 answers as incarnation 100 still, node 2 as 201 (restarted), node 3 not.
        let gone = |node: u64, incarnation: u64| match node {
            1 => (incarnation != 100).then_some(reasons::NODE_RESTARTED),
            2 => (incarnation != 201).then_some(reasons::NODE_RESTARTED),
            _ => Some(reasons::NODE_LOST),
        };
        let mut lost: Vec<(String, String)> = ledger
            .lost_sessions(gone)
            .into_iter()
            .map(|r| (r.device_id, r.reason))
            .collect();
        lost.sort();
        assert_eq!(
            lost,
            vec![
                ("b".to_string(), reasons::NODE_RESTARTED.to_string()),
                ("c".to_string(), reasons::NODE_LOST.to_string())
            ]
        );
    }

    #[test]
    fn the_state_is_rebuilt_from_the_records() {
        use EventKind::*;
        let mut live = DeviceState::default();
        let mut log = Vec::new();
        for r in [
            report(Created, "", 3),
            report(Online, "s1", 0),
            report(Online, "s2", 0),
            report(AuthFailed, "a1", 0),
        ] {
            log.extend(live.decide(&r));
        }
        // Every record serialized and read back, as a new leader reads the partition.
        let mut rebuilt = DeviceState::default();
        for e in &log {
            let bytes = serde_json::to_vec(e).expect("encode");
            let back: DeviceEvent = serde_json::from_slice(&bytes).expect("decode");
            rebuilt.fold(&back);
        }
        assert_eq!(rebuilt, live);
        assert_eq!(rebuilt.online.as_deref(), Some("s2"));
        // Compacted down to its last record, the partition still gives the same state
        // (but for the ring of recent ids).
        let mut compacted = DeviceState::default();
        compacted.fold(log.last().expect("events"));
        assert_eq!(
            (compacted.seq, &compacted.online, compacted.online_at),
            (live.seq, &live.online, live.online_at)
        );
        // And it goes on where the old leader stopped.
        assert_eq!(
            kinds(&rebuilt.decide(&report(Offline, "s2", 0))),
            vec![(Offline, 6)]
        );
        assert!(rebuilt.decide(&report(Online, "s1", 0)).is_empty());
    }
}
