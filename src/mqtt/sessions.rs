//! General MQTT sessions over the cluster, kept in the compacted system topic
//! `aq.mqtt-sessions` (keyed by client id): which node holds each client's connection (or
//! held it last), since when, the subscriptions of a persistent session (3.1.1 clean
//! session off, MQTT 5 with a session expiry interval) and when its connection ended.
//!
//! Every node loads the topic when it starts and then follows it ([`SessionStore`]), so:
//! - a client that connects with the same client id to another node takes the session over
//!   there: the node still holding the old connection sees the newer record and closes it
//!   (MQTT 5: DISCONNECT 0x8E), as MQTT asks of one broker;
//! - a persistent session resumed on a node whose rumqttd does not hold it (another node's,
//!   or the node restarted, or the whole cluster did) gets its subscriptions back: the relay
//!   subscribes them again in rumqttd before it hands the client its CONNACK, with session
//!   present set.
//!
//! Records are ordered by their connection's stamp (start time in ms, node id): a record of
//! an older connection appended after a newer one (an ending racing a takeover) is ignored
//! by every reader, and the node holding the newest connection appends its record again, so
//! the last record of a key (the one compaction keeps) is the newest connection's. A clean
//! session's record goes (a tombstone) when its connection ends, and so does a persistent
//! one whose expiry interval was 0 at the end, or whose interval ran out (the node that held
//! it last appends the tombstone). Messages that arrive while a persistent
//! session has no connection are queued by the node's rumqttd that holds the session, so
//! they are delivered when the client comes back to that node; a session resumed elsewhere
//! or after a restart gets its subscriptions back, not those messages.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::sink::Sink;
use crate::broker::records::{ConsumerRecord, ProducerRecord};
use crate::broker::{Broker, BrokerError, BrokerResult, ErrorCode, OffsetSpec};

pub const SESSIONS_TOPIC: &str = "aq.mqtt-sessions";

/// How often a node ends the expired sessions it held.
const SWEEP_EVERY: Duration = Duration::from_secs(30);

/// A session that never expires (3.1.1's persistent sessions, MQTT 5's 0xFFFFFFFF).
pub const NEVER: u32 = u32::MAX;

/// Which connection a record is of: (start time in ms, node id); newer is greater.
pub type Stamp = (i64, u64);

/// What `aq.mqtt-sessions` holds of one client id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRecord {
    pub client_id: String,
    /// The node holding (or that held last) the session's connection.
    pub node: u64,
    /// When that connection began (ms since the epoch; per node, increasing).
    pub started_ms: i64,
    pub connected: bool,
    /// Filter → QoS, for a persistent session.
    #[serde(default)]
    pub subscriptions: BTreeMap<String, u8>,
    /// Seconds the session outlives its connection: 0 a clean session, [`NEVER`].
    pub expiry: u32,
    /// When the connection ended (ms), once it has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub left_ms: Option<i64>,
}

impl SessionRecord {
    pub fn stamp(&self) -> Stamp {
        (self.started_ms, self.node)
    }

    /// Whether the session is over: no connection and its expiry interval has run out.
    pub fn expired(&self, now_ms: i64) -> bool {
        if self.connected || self.expiry == NEVER {
            return false;
        }
        let left = self.left_ms.unwrap_or(self.started_ms);
        left.saturating_add(i64::from(self.expiry) * 1000) <= now_ms
    }
}

/// Folds one record (or tombstone) of `client_id` into `known`: a record of an older
/// connection than the one known is ignored. Whether it changed what is known.
pub fn fold(
    known: &mut HashMap<String, SessionRecord>,
    client_id: &str,
    record: Option<SessionRecord>,
) -> bool {
    match record {
        None => known.remove(client_id).is_some(),
        Some(r) => match known.get(client_id) {
            Some(current) if current.stamp() > r.stamp() => false,
            Some(current) if *current == r => false,
            _ => {
                known.insert(client_id.to_string(), r);
                true
            }
        },
    }
}

/// A connection of this node, as the store knows it.
#[derive(Debug)]
struct Live {
    record: SessionRecord,
    /// Set when a newer connection elsewhere took the session over.
    kicked: watch::Sender<bool>,
}

/// This node's view of the cluster's sessions (cheap to clone).
#[derive(Debug, Clone)]
pub struct SessionStore {
    broker: Broker,
    sink: Sink,
    node: u64,
    /// When this process started (ms): a record of this node from before was held by a
    /// rumqttd that is gone.
    process_start_ms: i64,
    last_stamp: Arc<AtomicI64>,
    shape: (u32, Option<u16>),
    known: Arc<Mutex<HashMap<String, SessionRecord>>>,
    live: Arc<Mutex<HashMap<String, Live>>>,
    /// Whose turn it is in the shared groups (see [`super::shares::targets`]).
    share_turn: Arc<AtomicU64>,
}

fn now_ms() -> i64 {
    crate::devices::now_ms()
}

impl SessionStore {
    pub fn new(
        broker: Broker,
        sink: Sink,
        partitions: u32,
        replication_factor: Option<u16>,
    ) -> Self {
        let start = now_ms();
        Self {
            node: broker.node_id(),
            broker,
            sink,
            process_start_ms: start,
            last_stamp: Arc::new(AtomicI64::new(start)),
            shape: (partitions.max(1), replication_factor),
            known: Arc::default(),
            live: Arc::default(),
            share_turn: Arc::default(),
        }
    }

    fn known(&self) -> std::sync::MutexGuard<'_, HashMap<String, SessionRecord>> {
        self.known.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn live(&self) -> std::sync::MutexGuard<'_, HashMap<String, Live>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new connection's start time, after every earlier one of this node.
    pub fn next_start(&self) -> i64 {
        let now = now_ms();
        let prev = self
            .last_stamp
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |last| {
                Some(now.max(last + 1))
            })
            .unwrap_or(now);
        now.max(prev + 1)
    }

    pub fn node(&self) -> u64 {
        self.node
    }

    /// The session known for `client_id`, unless it is over.
    pub fn lookup(&self, client_id: &str) -> Option<SessionRecord> {
        let now = now_ms();
        self.known()
            .get(client_id)
            .filter(|r| !r.expired(now))
            .cloned()
    }

    /// The shared groups a message on `topic` goes to, each with the node of the member
    /// picked for it.
    pub fn share_targets(&self, topic: &str) -> Vec<super::shares::Target> {
        super::shares::targets(self.known().values(), topic, &self.share_turn)
    }

    /// Whether this node's rumqttd holds the session of `r` (it was this process's).
    pub fn held_here(&self, r: &SessionRecord) -> bool {
        r.node == self.node && r.started_ms >= self.process_start_ms
    }

    /// Whether a connection newer than `stamp` holds `client_id`'s session now.
    pub fn superseded(&self, client_id: &str, stamp: Stamp) -> bool {
        self.known()
            .get(client_id)
            .is_some_and(|r| r.stamp() > stamp)
    }

    /// A connection of this node begins (after its record is saved): the receiver turns
    /// true when a newer connection elsewhere takes the session over.
    pub fn attach(&self, record: &SessionRecord) -> watch::Receiver<bool> {
        let (tx, rx) = watch::channel(false);
        self.live().insert(
            record.client_id.clone(),
            Live {
                record: record.clone(),
                kicked: tx,
            },
        );
        rx
    }

    /// The connection of `stamp` ended.
    pub fn detach(&self, client_id: &str, stamp: Stamp) {
        let mut live = self.live();
        if live
            .get(client_id)
            .is_some_and(|l| l.record.stamp() == stamp)
        {
            live.remove(client_id);
        }
    }

    /// Appends `r` (known here at once); resolves once a quorum has it.
    pub async fn save(&self, r: &SessionRecord) -> BrokerResult<()> {
        {
            fold(&mut self.known(), &r.client_id, Some(r.clone()));
            let mut live = self.live();
            if let Some(l) = live.get_mut(&r.client_id)
                && l.record.stamp() == r.stamp()
            {
                l.record = r.clone();
            }
        }
        let value = serde_json::to_vec(r)
            .map_err(|e| BrokerError::internal("encode an MQTT session", e))?;
        let record =
            ProducerRecord::value(value).with_key(Bytes::from(r.client_id.clone().into_bytes()));
        self.appended(self.sink.enqueue_record(SESSIONS_TOPIC, record))
            .await
    }

    /// Ends `client_id`'s session for the cluster (a tombstone).
    pub async fn end(&self, client_id: &str) -> BrokerResult<()> {
        self.known().remove(client_id);
        let record = ProducerRecord {
            key: Some(Bytes::from(client_id.to_string().into_bytes())),
            ..ProducerRecord::default()
        };
        self.appended(self.sink.enqueue_record(SESSIONS_TOPIC, record))
            .await
    }

    async fn appended(&self, committed: super::sink::Committed) -> BrokerResult<()> {
        committed
            .await
            .map_err(|_| BrokerError::internal("MQTT sessions", "the sink stopped"))?
            .map(|_| ())
    }

    /// Creates the topic and reads it into memory; where each partition ended. Connections
    /// this node held before it restarted are recorded as ended now.
    pub async fn load(&self) -> BrokerResult<Vec<u64>> {
        let info = self
            .broker
            .topics()
            .ensure_system_with(
                SESSIONS_TOPIC,
                self.shape.0,
                self.shape.1,
                &[("cleanup.policy", "compact")],
            )
            .await?;
        let mut ends = Vec::new();
        let mut known = HashMap::new();
        for p in 0..info.record.partitions {
            let end = self
                .broker
                .list_offsets_routed(SESSIONS_TOPIC, p, OffsetSpec::Latest)
                .await?;
            let mut from = self
                .broker
                .list_offsets_routed(SESSIONS_TOPIC, p, OffsetSpec::Earliest)
                .await?;
            while from < end {
                let records = self
                    .broker
                    .read_routed(SESSIONS_TOPIC, p, from, Duration::ZERO)
                    .await?;
                let Some(last) = records.last().map(|r| r.offset) else {
                    break;
                };
                for r in &records {
                    if let Some((client_id, record)) = decode(r) {
                        fold(&mut known, &client_id, record);
                    }
                }
                from = last + 1;
            }
            ends.push(end);
        }
        let stale: Vec<SessionRecord> = known
            .values()
            .filter(|r| r.connected && r.node == self.node && r.started_ms < self.process_start_ms)
            .cloned()
            .collect();
        let count = known.len();
        *self.known() = known;
        for mut r in stale {
            r.connected = false;
            r.left_ms = Some(now_ms());
            let done = match r.expiry {
                0 => self.end(&r.client_id).await,
                _ => self.save(&r).await,
            };
            if let Err(e) = done {
                tracing::warn!(client_id = %r.client_id, error = %e,
                    "MQTT session of before the restart not recorded as ended");
            }
        }
        if count > 0 {
            tracing::info!(sessions = count, "MQTT sessions loaded");
        }
        Ok(ends)
    }

    /// Follows every partition from `starts` on, and ends this node's sessions whose
    /// expiry interval ran out; until the node stops.
    pub async fn follow(self, starts: Vec<u64>) {
        let mut tails = tokio::task::JoinSet::new();
        for (p, from) in starts.into_iter().enumerate() {
            let store = self.clone();
            tails.spawn(async move { store.tail(p as u32, from).await });
        }
        let store = self.clone();
        tails.spawn(async move { store.sweep().await });
        while tails.join_next().await.is_some() {}
    }

    /// Tombstones the expired sessions this node held last, every [`SWEEP_EVERY`], so the
    /// compacted topic does not keep every client id ever seen.
    async fn sweep(self) {
        loop {
            tokio::time::sleep(SWEEP_EVERY).await;
            let now = now_ms();
            let expired: Vec<String> = self
                .known()
                .values()
                .filter(|r| r.node == self.node && r.expired(now))
                .map(|r| r.client_id.clone())
                .collect();
            for client_id in expired {
                if let Err(e) = self.end(&client_id).await {
                    tracing::debug!(client_id, error = %e, "expired MQTT session not ended yet");
                }
            }
        }
    }

    async fn tail(self, partition: u32, mut from: u64) {
        loop {
            match self
                .broker
                .read_routed(SESSIONS_TOPIC, partition, from, Duration::from_millis(500))
                .await
            {
                Ok(records) => {
                    for r in &records {
                        if let Some((client_id, record)) = decode(r) {
                            self.apply(&client_id, record).await;
                        }
                    }
                    if let Some(last) = records.last() {
                        from = last.offset + 1;
                    }
                }
                Err(e) if e.code == ErrorCode::OffsetOutOfRange => {
                    match self
                        .broker
                        .list_offsets_routed(SESSIONS_TOPIC, partition, OffsetSpec::Earliest)
                        .await
                    {
                        Ok(start) if start > from => from = start,
                        _ => tokio::time::sleep(Duration::from_millis(200)).await,
                    }
                }
                Err(e) => {
                    tracing::debug!(partition, error = %e, "MQTT sessions: tail retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }

    /// One record from the log: folded in; a live connection here that a newer one
    /// elsewhere took over is told so, and one whose record an older connection's
    /// overwrote appends its own again.
    async fn apply(&self, client_id: &str, record: Option<SessionRecord>) {
        let newer_elsewhere = record.as_ref().is_some_and(|r| r.node != self.node);
        let incoming = record.as_ref().map(SessionRecord::stamp);
        fold(&mut self.known(), client_id, record);
        let again = {
            let live = self.live();
            let Some(l) = live.get(client_id) else {
                return;
            };
            let mine = l.record.stamp();
            match incoming {
                Some(stamp) if stamp > mine && newer_elsewhere => {
                    let _ = l.kicked.send(true);
                    None
                }
                Some(stamp) if stamp == mine => None,
                // A tombstone or an older connection's record over the live one's.
                _ => Some(l.record.clone()),
            }
        };
        if let Some(r) = again
            && let Err(e) = self.save(&r).await
        {
            tracing::warn!(client_id, error = %e, "MQTT session record not restored");
        }
    }
}

/// A record of the topic: its client id and the record (None: a tombstone).
fn decode(r: &ConsumerRecord) -> Option<(String, Option<SessionRecord>)> {
    let client_id = String::from_utf8(r.key.as_deref()?.to_vec()).ok()?;
    match &r.value {
        None => Some((client_id, None)),
        Some(v) => serde_json::from_slice(v)
            .ok()
            .map(|record| (client_id, Some(record))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(node: u64, started_ms: i64, connected: bool) -> SessionRecord {
        SessionRecord {
            client_id: "c1".into(),
            node,
            started_ms,
            connected,
            subscriptions: BTreeMap::from([("a/#".to_string(), 1)]),
            expiry: NEVER,
            left_ms: (!connected).then_some(started_ms + 5),
        }
    }

    #[test]
    fn the_newest_connection_wins_whatever_the_order() {
        let mut known = HashMap::new();
        assert!(fold(&mut known, "c1", Some(record(1, 100, true))));
        // Taken over on node 2; node 1's ending arrives after it and is ignored.
        assert!(fold(&mut known, "c1", Some(record(2, 200, true))));
        assert!(!fold(&mut known, "c1", Some(record(1, 100, false))));
        assert_eq!(known["c1"].node, 2);
        // The same connection's later record (its ending) replaces it.
        assert!(fold(&mut known, "c1", Some(record(2, 200, false))));
        assert!(!known["c1"].connected);
        assert!(fold(&mut known, "c1", None));
        assert!(known.is_empty());
    }

    #[test]
    fn a_session_expires_after_its_interval_without_a_connection() {
        let mut r = record(1, 1_000, false);
        r.left_ms = Some(2_000);
        r.expiry = 10;
        assert!(!r.expired(11_999));
        assert!(r.expired(12_000));
        r.expiry = NEVER;
        assert!(!r.expired(i64::MAX));
        r.expiry = 10;
        r.connected = true;
        assert!(!r.expired(i64::MAX));
    }
}
