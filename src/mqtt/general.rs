//! The general MQTT broker: ordinary pub/sub for clients that are not devices (retained
//! messages, wills, QoS 0/1/2, clean and persistent sessions, MQTT 5 properties), served by
//! rumqttd's router and its v4 and v5 servers on loopback ports of their own. The front
//! reads such a client's CONNECT itself (limits, deadline, whether anonymous clients are
//! allowed at all), then relays the connection to rumqttd's server for its protocol level,
//! checking each packet the client sends on the way: the device namespace (`$oc/...`) is
//! not theirs to publish or subscribe in.
//!
//! rumqttd keeps its state in memory. What general clients publish reaches it through the
//! cluster-wide bus ([`super::bus`]), which also keeps retained messages across restarts;
//! sessions are recorded cluster-wide by [`super::sessions`] (takeover across nodes, a
//! persistent session's subscriptions restored where rumqttd does not hold it).
//!
//! MQTT 5 session lifetimes are kept here, not by rumqttd: it keeps a session after the
//! connection closes exactly when the CONNECT had clean start off, whatever the session
//! expiry interval says. So the relay forwards every MQTT 5 CONNECT whose session is to
//! outlive its connection with clean start off (after ending the old session itself when
//! the client asked for a clean start), and ends a kept session when its expiry interval
//! (from the CONNECT, or changed by the client's DISCONNECT) runs out: by connecting to
//! rumqttd with that client id and clean start on, then disconnecting.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, TcpListener as StdListener};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use rumqttd::protocol::v4::V4;
use rumqttd::protocol::v5::V5;
use rumqttd::protocol::{
    Connect, Packet, Protocol, Publish, PublishProperties, SubscribeReasonCode,
};
use rumqttd::{ConnectionSettings, Router, RouterConfig, Server, ServerSettings};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::OwnedMutexGuard;

/// The device namespace: reserved for devices, whatever a general client asks.
pub const DEVICE_NAMESPACE: &str = "$oc/";

/// Whether a general client may use `topic` (a topic or a filter).
pub fn general_topic_allowed(topic: &str) -> bool {
    !topic.starts_with(DEVICE_NAMESPACE) && topic != "$oc"
}

/// rumqttd running inside this node (cheap to clone).
#[derive(Debug, Clone)]
pub struct GeneralBroker {
    v4: SocketAddr,
    v5: SocketAddr,
    sessions: Arc<SessionTable>,
    /// Messages handed to rumqttd's router through a local link (see [`Self::inject`]).
    inject: tokio::sync::mpsc::Sender<Injected>,
}

/// A message for rumqttd's subscribers (and its retained store, when `retain`).
pub type Injected = (Publish, Option<PublishProperties>);

/// Messages waiting for the injecting thread at most.
const INJECT_QUEUE: usize = 4096;

/// Relayed client ids: the connection that holds each now (its generation, unique across
/// the table's life), and a gate that a connection's CONNECT and the ending of a session
/// both pass, so an expiring session is never ended after a new connection took it up.
#[derive(Debug, Default)]
struct SessionTable {
    clients: Mutex<HashMap<String, Slot>>,
    generations: AtomicU64,
}

#[derive(Debug)]
struct Slot {
    generation: u64,
    gate: Arc<tokio::sync::Mutex<()>>,
    /// The timer that ends the session after its expiry interval, while one runs.
    expiry: Option<tokio::task::AbortHandle>,
}

/// What becomes of a relayed connection's session when the connection ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionEnd {
    /// rumqttd does the right thing itself (3.1.1, or MQTT 5 with clean start and no
    /// expiry: the session ends with the connection).
    Broker,
    /// MQTT 5: the session ends now, or after this many seconds without a new connection
    /// (u32::MAX: never, as MQTT 5 says).
    After(u32),
}

/// A relayed connection's hold on its client id (see [`GeneralBroker::begin`]).
#[derive(Debug)]
pub struct Hold {
    pub generation: u64,
    /// Held while the CONNECT goes to rumqttd; dropped once it is on its way.
    pub gate: OwnedMutexGuard<()>,
}

impl SessionTable {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Slot>> {
        self.clients.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn is_current(&self, client_id: &str, generation: u64) -> bool {
        self.lock()
            .get(client_id)
            .is_some_and(|s| s.generation == generation)
    }

    /// Forgets the client id if `generation` still holds it.
    fn forget(&self, client_id: &str, generation: u64) {
        let mut t = self.lock();
        if t.get(client_id).is_some_and(|s| s.generation == generation) {
            t.remove(client_id);
        }
    }
}

impl GeneralBroker {
    /// Starts rumqttd's router and its servers (on threads of their own, as rumqttd runs
    /// them) listening on free loopback ports; `max_packet` caps payloads as the front does.
    pub fn start(max_packet: usize, max_connections: usize) -> std::io::Result<Self> {
        let v4 = free_loopback_port()?;
        let v5 = free_loopback_port()?;
        let router = Router::new(
            0,
            RouterConfig {
                max_connections: max_connections.max(1),
                max_outgoing_packet_count: 200,
                max_segment_size: 16 << 20,
                max_segment_count: 4,
                ..RouterConfig::default()
            },
        );
        let router_tx = router.spawn();
        let (link_tx, link_rx, _) =
            rumqttd::local::LinkBuilder::new("aq-cluster-bus", router_tx.clone())
                .build()
                .map_err(|e| {
                    std::io::Error::other(format!("cannot link to the MQTT router: {e}"))
                })?;
        let inject = start_injector(link_tx, link_rx)?;
        for (name, addr, v5_protocol) in [("aq-general-v4", v4, false), ("aq-general-v5", v5, true)]
        {
            let settings = ServerSettings {
                name: name.to_string(),
                listen: addr,
                tls: None,
                next_connection_delay_ms: 0,
                connections: ConnectionSettings {
                    // The front already waited for the CONNECT; this one is relayed at once.
                    connection_timeout_ms: 5_000,
                    max_payload_size: max_packet,
                    max_inflight_count: 100,
                    auth: None,
                    external_auth: None,
                    dynamic_filters: true,
                },
            };
            let router_tx = router_tx.clone();
            std::thread::Builder::new()
                .name(name.to_string())
                .spawn(move || {
                    let runtime = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(r) => r,
                        Err(e) => {
                            tracing::error!(error = %e, "cannot start the general MQTT broker");
                            return;
                        }
                    };
                    runtime.block_on(async move {
                        let outcome = if v5_protocol {
                            Server::new(settings, router_tx, V5)
                                .start(rumqttd::LinkType::Remote)
                                .await
                        } else {
                            Server::new(settings, router_tx, V4)
                                .start(rumqttd::LinkType::Remote)
                                .await
                        };
                        if let Err(e) = outcome {
                            tracing::error!(error = %e, "the general MQTT broker stopped");
                        }
                    });
                })?;
        }
        Ok(Self {
            v4,
            v5,
            sessions: Arc::default(),
            inject,
        })
    }

    /// Hands a message to this node's subscribers (and, retained, to its retained store),
    /// as if a client of this node had published it; waits while the router is behind.
    pub async fn inject(&self, message: Injected) -> anyhow::Result<()> {
        self.inject
            .send(message)
            .await
            .map_err(|_| anyhow::anyhow!("the general broker's router link stopped"))
    }

    /// A relayed connection with this client id begins: it holds the id from now on (an
    /// older connection's session can no longer be ended on expiry), and once any ending
    /// of the session under way has finished, it may send its CONNECT.
    pub async fn begin(&self, client_id: &str) -> Hold {
        let generation = self.sessions.generations.fetch_add(1, Ordering::Relaxed) + 1;
        let gate = {
            let mut t = self.sessions.lock();
            let slot = t.entry(client_id.to_string()).or_insert_with(|| Slot {
                generation,
                gate: Arc::default(),
                expiry: None,
            });
            slot.generation = generation;
            // A new connection takes the session up: its old timer has nothing to end.
            if let Some(timer) = slot.expiry.take() {
                timer.abort();
            }
            slot.gate.clone()
        };
        Hold {
            generation,
            gate: gate.lock_owned().await,
        }
    }

    /// Whether a newer connection with this client id has taken up the session that
    /// connection `generation` left (it has not merely ended).
    pub fn resumed(&self, client_id: &str, generation: u64) -> bool {
        self.sessions
            .lock()
            .get(client_id)
            .is_some_and(|s| s.generation > generation)
    }

    /// Whether a newer connection with this client id has begun since `generation`.
    pub fn superseded(&self, client_id: &str, generation: u64) -> bool {
        !self.sessions.is_current(client_id, generation)
    }

    /// A relayed connection ended: its session ends as `end` says (at once, before this
    /// returns, when it ends with the connection), unless a newer connection with the
    /// client id has begun.
    pub async fn ended(&self, client_id: &str, generation: u64, end: SessionEnd) {
        match end {
            SessionEnd::Broker | SessionEnd::After(u32::MAX) => {
                self.sessions.forget(client_id, generation)
            }
            SessionEnd::After(0) => self.expire(client_id, generation).await,
            SessionEnd::After(secs) => {
                if !self.sessions.is_current(client_id, generation) {
                    return;
                }
                let broker = self.clone();
                let id = client_id.to_string();
                let timer = tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_secs(u64::from(secs))).await;
                    broker.expire(&id, generation).await;
                });
                let mut t = self.sessions.lock();
                match t.get_mut(client_id) {
                    Some(slot) if slot.generation == generation => {
                        if let Some(old) = slot.expiry.replace(timer.abort_handle()) {
                            old.abort();
                        }
                    }
                    _ => timer.abort(),
                }
            }
        }
    }

    /// Ends the session rumqttd keeps for `client_id` if no connection has taken it up
    /// since `generation`.
    async fn expire(&self, client_id: &str, generation: u64) {
        let gate = {
            let t = self.sessions.lock();
            match t.get(client_id) {
                Some(slot) if slot.generation == generation => slot.gate.clone(),
                _ => return,
            }
        };
        let _held = gate.lock().await;
        if !self.sessions.is_current(client_id, generation) {
            return;
        }
        if let Err(e) = self.end_session(client_id).await {
            tracing::warn!(client_id, error = %e, "cannot end an expired MQTT session");
        }
        self.sessions.forget(client_id, generation);
    }

    /// Ends the session rumqttd keeps for `client_id`: a clean-start connection with that
    /// id (rumqttd drops the old state, and keeps nothing when it disconnects), closed once
    /// rumqttd has accepted it and has seen it go.
    pub async fn end_session(&self, client_id: &str) -> anyhow::Result<()> {
        let mut stream = self.connect(true).await?;
        let mut out = BytesMut::new();
        V5.write(
            Packet::Connect(
                Connect {
                    keep_alive: 10,
                    client_id: client_id.to_string(),
                    clean_session: true,
                },
                None,
                None,
                None,
                None,
            ),
            &mut out,
        )
        .map_err(|e| anyhow::anyhow!("encode: {e:?}"))?;
        stream.write_all(&out).await?;
        let wait = Duration::from_secs(5);
        let mut buf = BytesMut::with_capacity(64);
        // The CONNACK (4 bytes and its properties): its first bytes are enough to know.
        let n = tokio::time::timeout(wait, stream.read_buf(&mut buf)).await??;
        anyhow::ensure!(n > 0 && buf[0] >> 4 == 2, "no CONNACK from the broker");
        // DISCONNECT, normal disconnection; then rumqttd closes the link.
        stream.write_all(&[0xE0, 0x00]).await?;
        let _ = tokio::time::timeout(wait, async {
            while stream.read_buf(&mut buf).await.is_ok_and(|n| n > 0) {
                buf.clear();
            }
        })
        .await;
        Ok(())
    }

    /// Where the relay connects for a client of this protocol level.
    pub fn addr(&self, v5: bool) -> SocketAddr {
        if v5 { self.v5 } else { self.v4 }
    }

    /// Connects to rumqttd's server for this protocol level (it may still be starting).
    pub async fn connect(&self, v5: bool) -> std::io::Result<tokio::net::TcpStream> {
        let addr = self.addr(v5);
        let mut last = None;
        for _ in 0..50 {
            match tokio::net::TcpStream::connect(addr).await {
                Ok(s) => {
                    let _ = s.set_nodelay(true);
                    return Ok(s);
                }
                Err(e) => {
                    last = Some(e);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
        Err(last.unwrap_or_else(|| std::io::Error::other("no connection")))
    }
}

/// A thread that owns a local link to rumqttd's router and publishes what it is given
/// (QoS 0: a local link does not take part in acknowledgements; each subscriber gets the
/// message at its subscription's QoS, as rumqttd delivers every message).
fn start_injector(
    mut link_tx: rumqttd::local::LinkTx,
    link_rx: rumqttd::local::LinkRx,
) -> std::io::Result<tokio::sync::mpsc::Sender<Injected>> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Injected>(INJECT_QUEUE);
    let runtime = tokio::runtime::Builder::new_current_thread().build()?;
    std::thread::Builder::new()
        .name("aq-mqtt-inject".to_string())
        .spawn(move || {
            // Held, never read: nothing is sent to a link without subscriptions.
            let _link_rx = link_rx;
            runtime.block_on(async move {
                while let Some((publish, props)) = rx.recv().await {
                    if let Err(e) = link_tx.send(Packet::Publish(publish, props)).await {
                        tracing::error!(error = %e, "the MQTT router link failed: messages stop reaching this node's subscribers");
                        return;
                    }
                }
            });
        })?;
    Ok(tx)
}

fn free_loopback_port() -> std::io::Result<SocketAddr> {
    let l = StdListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    l.local_addr()
}

/// SUBSCRIBEs forwarded without some of their filters: packet id → (positions refused, how
/// many filters the client asked for), so rumqttd's SUBACK can be given back their codes.
#[derive(Debug, Default)]
pub struct Splices {
    pending: HashMap<u16, (Vec<(usize, SubscribeReasonCode)>, usize)>,
}

impl Splices {
    /// The SUBSCRIBE `pkid` went on without the filters at the positions of `own`, whose
    /// codes the relay gives itself; it had `asked` filters.
    pub fn insert(&mut self, pkid: u16, own: Vec<(usize, SubscribeReasonCode)>, asked: usize) {
        self.pending.insert(pkid, (own, asked));
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    pub fn take(&mut self, pkid: u16) -> Option<(Vec<(usize, SubscribeReasonCode)>, usize)> {
        self.pending.remove(&pkid)
    }
}

/// Puts the relay's `own` codes back at their positions among a SUBACK's codes for `asked`
/// filters (`missing` where the broker answered fewer than it was asked).
pub fn splice_codes<T: Clone>(
    granted: Vec<T>,
    own: &[(usize, T)],
    asked: usize,
    missing: T,
) -> Vec<T> {
    let mut granted = granted.into_iter();
    (0..asked)
        .map(|i| match own.iter().find(|(at, _)| *at == i) {
            Some((_, code)) => code.clone(),
            None => granted.next().unwrap_or_else(|| missing.clone()),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_device_namespace_is_not_for_general_clients() {
        assert!(general_topic_allowed("sensors/1/temp"));
        assert!(general_topic_allowed("#"));
        assert!(general_topic_allowed("$SYS/uptime"));
        assert!(!general_topic_allowed("$oc/devices/d1/sys/messages/down"));
        assert!(!general_topic_allowed("$oc/#"));
        assert!(!general_topic_allowed("$oc"));
    }

    #[test]
    fn refused_filters_get_their_failure_code_back_in_place() {
        assert_eq!(
            splice_codes(vec![1, 0], &[(1, 0x87)], 3, 0x80),
            vec![1, 0x87, 0]
        );
        assert_eq!(
            splice_codes(Vec::<u8>::new(), &[(0, 0x87), (1, 1)], 2, 0x80),
            vec![0x87, 1]
        );
        assert_eq!(splice_codes(vec![2], &[], 1, 0x80), vec![2]);
        assert_eq!(splice_codes(vec![], &[], 1, 0x80), vec![0x80]);
    }
}
