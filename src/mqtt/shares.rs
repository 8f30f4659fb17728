//! Shared subscriptions (`$share/{group}/{filter}`) over the cluster: each message matching
//! a group's filter goes to one member of the group, whichever node the members are on.
//!
//! rumqttd does not see these subscriptions: its shared groups are per node (and keyed by
//! group name alone, whatever the filter). Instead:
//! - the relay keeps them out of what it forwards to rumqttd, answers for them in the
//!   SUBACK, and records them in the session's `aq.mqtt-sessions` record (every tracked
//!   session, persistent or not), so every node knows every group's members and their
//!   nodes;
//! - the node that takes a message picks, for each group whose filter matches, one
//!   connected member (round robin over the cluster's members) and writes the member's node
//!   in the message's record (header `mqtt.share`): one decision per message, so no copy
//!   and no gap between nodes that see the membership a moment apart;
//! - the node named there hands the message, as it tails `aq.mqtt-messages`, to one of its
//!   own members of the group ([`LocalShares`], round robin, skipping a member whose queue is
//!   full), and that member's relay sends it with a packet id of its own range
//!   ([`FIRST_PKID`] on; rumqttd numbers from 1 to 100) and takes the client's answers to it.
//!   What a member had not acknowledged when its connection ended goes to another member of
//!   the group on that node.
//!
//! Retained messages are not sent to shared subscriptions, as MQTT 5 says.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::bus::Message;
use super::sessions::SessionRecord;
use crate::devices::telemetry::topic_matches;

/// The first packet id the relay gives its own deliveries.
pub const FIRST_PKID: u16 = 1000;

/// Most deliveries queued for one member.
pub const MEMBER_QUEUE: usize = 256;

/// `$share/{group}/{filter}` → (group, filter); `None` for any other filter, and for a
/// shared one that is malformed (see [`malformed`]).
pub fn parse(path: &str) -> Option<(&str, &str)> {
    let rest = path.strip_prefix("$share/")?;
    let (group, filter) = rest.split_once('/')?;
    (!group.is_empty() && !group.contains(['+', '#']) && !filter.is_empty())
        .then_some((group, filter))
}

/// Whether `path` asks for a shared subscription that is not a valid one (an empty group
/// or filter, or a wildcard in the group name: MQTT 5 §4.8.2).
pub fn malformed(path: &str) -> bool {
    (path.starts_with("$share/") || path == "$share") && parse(path).is_none()
}

/// One group's delivery of a message: to a member on `node`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Target {
    pub group: String,
    pub filter: String,
    pub node: u64,
}

/// The groups `topic` goes to, each with the node of the connected member picked (a group
/// whose members are all away gets nothing: a persistent session's shared subscriptions do
/// not queue while it has no connection).
pub fn targets<'a>(
    sessions: impl Iterator<Item = &'a SessionRecord>,
    topic: &str,
    turn: &AtomicU64,
) -> Vec<Target> {
    // (group, filter) → members' nodes, by client id so every pick sees the same order.
    let mut groups: BTreeMap<(&str, &str), BTreeMap<&'a str, u64>> = BTreeMap::new();
    for r in sessions.filter(|r| r.connected) {
        // The shared filters, in order: "$share/" sorts before what follows it.
        let shared = r
            .subscriptions
            .range::<str, _>((
                std::ops::Bound::Included("$share/"),
                std::ops::Bound::Unbounded,
            ))
            .map(|(path, _)| path)
            .take_while(|path| path.starts_with("$share/"));
        for path in shared {
            if let Some((group, filter)) = parse(path)
                && topic_matches(filter, topic)
            {
                groups
                    .entry((group, filter))
                    .or_default()
                    .insert(&r.client_id, r.node);
            }
        }
    }
    if groups.is_empty() {
        return Vec::new();
    }
    let turn = turn.fetch_add(1, Ordering::Relaxed);
    groups
        .into_iter()
        .filter_map(|((group, filter), members)| {
            let node = *members
                .values()
                .nth((turn % members.len() as u64) as usize)?;
            Some(Target {
                group: group.to_string(),
                filter: filter.to_string(),
                node,
            })
        })
        .collect()
}

/// A message for one member of a group on this node.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub message: Arc<Message>,
    pub group: String,
    pub filter: String,
}

/// A group's members here and whose turn is next.
type Groups = HashMap<(String, String), (Vec<Member>, usize)>;

#[derive(Debug)]
struct Member {
    client_id: String,
    generation: u64,
    qos: u8,
    tx: tokio::sync::mpsc::Sender<(Delivery, u8)>,
}

/// This node's members of shared groups (cheap to clone).
#[derive(Debug, Clone, Default)]
pub struct LocalShares {
    groups: Arc<Mutex<Groups>>,
}

impl LocalShares {
    fn lock(&self) -> std::sync::MutexGuard<'_, Groups> {
        self.groups.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The connection `generation` of `client_id` joins `group` with `filter` at `qos`
    /// (again: its QoS changes); deliveries come on `tx` with the QoS to send them at.
    pub fn join(
        &self,
        (group, filter): (&str, &str),
        qos: u8,
        client_id: &str,
        generation: u64,
        tx: &tokio::sync::mpsc::Sender<(Delivery, u8)>,
    ) {
        let mut groups = self.lock();
        let (members, _) = groups
            .entry((group.to_string(), filter.to_string()))
            .or_default();
        members.retain(|m| m.client_id != client_id);
        members.push(Member {
            client_id: client_id.to_string(),
            generation,
            qos,
            tx: tx.clone(),
        });
    }

    /// The connection leaves one group, or every group when `which` is `None`.
    pub fn leave(&self, which: Option<(&str, &str)>, client_id: &str, generation: u64) {
        let mut groups = self.lock();
        groups.retain(|(g, f), (members, _)| {
            if which.is_none_or(|(wg, wf)| wg == g && wf == f) {
                members.retain(|m| !(m.client_id == client_id && m.generation == generation));
            }
            !members.is_empty()
        });
    }

    /// Hands `d` to the next member of its group here that has room; whether one took it.
    pub fn deliver(&self, d: Delivery) -> bool {
        let mut groups = self.lock();
        let Some((members, next)) = groups.get_mut(&(d.group.clone(), d.filter.clone())) else {
            return false;
        };
        members.retain(|m| !m.tx.is_closed());
        let mut d = d;
        for _ in 0..members.len() {
            *next = (*next + 1) % members.len();
            let m = &members[*next];
            let qos = d.message.qos.min(m.qos);
            match m.tx.try_send((d, qos)) {
                Ok(()) => return true,
                Err(tokio::sync::mpsc::error::TrySendError::Full((back, _)))
                | Err(tokio::sync::mpsc::error::TrySendError::Closed((back, _))) => d = back,
            }
        }
        false
    }
}

/// Most deliveries one member has unacknowledged; more wait in its queue.
const MEMBER_INFLIGHT: usize = 100;

/// The relay's side of one connection's shared subscriptions: the deliveries it sends the
/// client and the client's answers to them.
#[derive(Debug)]
pub struct SharedOut {
    shares: LocalShares,
    client_id: String,
    generation: u64,
    tx: tokio::sync::mpsc::Sender<(Delivery, u8)>,
    rx: tokio::sync::mpsc::Receiver<(Delivery, u8)>,
    /// Sent at QoS 1 or 2 and not acknowledged (QoS 2: not completed), by packet id.
    inflight: BTreeMap<u16, Delivery>,
    next_pkid: u16,
}

impl SharedOut {
    pub fn new(shares: LocalShares, client_id: &str, generation: u64) -> Self {
        let (tx, rx) = tokio::sync::mpsc::channel(MEMBER_QUEUE);
        Self {
            shares,
            client_id: client_id.to_string(),
            generation,
            tx,
            rx,
            inflight: BTreeMap::new(),
            next_pkid: FIRST_PKID,
        }
    }

    /// The connection joins the shared subscription `path` (ignored if it is not one).
    pub fn join(&self, path: &str, qos: u8) {
        if let Some(which) = parse(path) {
            let tx = &self.tx;
            self.shares
                .join(which, qos, &self.client_id, self.generation, tx);
        }
    }

    pub fn leave(&self, path: &str) {
        if let Some(which) = parse(path) {
            self.shares
                .leave(Some(which), &self.client_id, self.generation);
        }
    }

    /// The next delivery for the client, while it has room for one.
    pub async fn next(&mut self) -> Option<(Delivery, u8)> {
        if self.inflight.len() >= MEMBER_INFLIGHT {
            return std::future::pending().await;
        }
        self.rx.recv().await
    }

    /// Encodes `d` for the client at `qos` into `out`, with a packet id of the relay's own.
    pub fn publish(
        &mut self,
        v5: bool,
        d: Delivery,
        qos: u8,
        out: &mut bytes::BytesMut,
    ) -> anyhow::Result<()> {
        let m = &d.message;
        let publish = rumqttd::protocol::Publish::new(
            bytes::Bytes::from(m.topic.clone().into_bytes()),
            m.payload.clone(),
            false,
        );
        let props = match v5 {
            true => m.props.clone().map(|mut p| {
                p.topic_alias = None;
                p.subscription_identifiers.clear();
                p
            }),
            false => None,
        };
        let mut frame = bytes::BytesMut::new();
        super::encode(
            v5,
            rumqttd::protocol::Packet::Publish(publish, props),
            &mut frame,
        )?;
        if qos == 0 {
            out.extend_from_slice(&frame);
            return Ok(());
        }
        let pkid = self.take_pkid();
        with_qos(&frame, qos, pkid, out);
        self.inflight.insert(pkid, d);
        Ok(())
    }

    fn take_pkid(&mut self) -> u16 {
        loop {
            let pkid = self.next_pkid;
            self.next_pkid = match pkid {
                u16::MAX => FIRST_PKID,
                p => p + 1,
            };
            if !self.inflight.contains_key(&pkid) {
                return pkid;
            }
        }
    }

    /// A PUBACK, PUBREC or PUBCOMP of the client: `None` when it answers a delivery of
    /// rumqttd's (it goes on to rumqttd), else what to send the client back (a PUBREL for
    /// a PUBREC).
    pub fn answer(&mut self, frame: &[u8]) -> Option<Option<[u8; 4]>> {
        let kind = frame[0] >> 4;
        if !matches!(kind, 4 | 5 | 7) {
            return None;
        }
        let at = super::fixed_header_len(frame);
        let pkid = u16::from_be_bytes([*frame.get(at)?, *frame.get(at + 1)?]);
        if pkid < FIRST_PKID {
            return None;
        }
        match kind {
            5 => {
                // A PUBREC with a failure code (MQTT 5, ≥ 0x80) ends the exchange.
                if frame.get(at + 2).is_some_and(|rc| *rc >= 0x80) {
                    self.inflight.remove(&pkid);
                    return Some(None);
                }
                let [hi, lo] = pkid.to_be_bytes();
                Some(Some([0x62, 0x02, hi, lo]))
            }
            _ => {
                self.inflight.remove(&pkid);
                Some(None)
            }
        }
    }

    /// The connection ended: it leaves its groups, and what it had not acknowledged (or
    /// not been sent yet) goes to another member of the group here, if there is one.
    pub fn end(mut self) {
        self.shares.leave(None, &self.client_id, self.generation);
        self.rx.close();
        let mut left: Vec<Delivery> = std::mem::take(&mut self.inflight).into_values().collect();
        while let Ok((d, _)) = self.rx.try_recv() {
            left.push(d);
        }
        let mut lost = 0;
        for d in left {
            if d.message.qos > 0 && !self.shares.deliver(d) {
                lost += 1;
            }
        }
        if lost > 0 {
            tracing::info!(client_id = %self.client_id, lost,
                "MQTT shared subscription: messages unacknowledged by a member that left, \
                 and no other member here");
        }
    }
}

/// `frame`, a QoS 0 PUBLISH, at `qos` with packet id `pkid`, into `out`.
fn with_qos(frame: &[u8], qos: u8, pkid: u16, out: &mut bytes::BytesMut) {
    let at = super::fixed_header_len(frame);
    let topic_len = usize::from(u16::from_be_bytes([frame[at], frame[at + 1]]));
    let split = at + 2 + topic_len;
    let mut remaining = frame.len() - at + 2;
    out.extend_from_slice(&[(frame[0] & !0x06) | (qos << 1)]);
    loop {
        let byte = (remaining % 128) as u8;
        remaining /= 128;
        if remaining == 0 {
            out.extend_from_slice(&[byte]);
            break;
        }
        out.extend_from_slice(&[byte | 0x80]);
    }
    out.extend_from_slice(&frame[at..split]);
    out.extend_from_slice(&pkid.to_be_bytes());
    out.extend_from_slice(&frame[split..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(client_id: &str, node: u64, connected: bool, subs: &[&str]) -> SessionRecord {
        SessionRecord {
            client_id: client_id.to_string(),
            node,
            started_ms: 1,
            connected,
            subscriptions: subs.iter().map(|s| (s.to_string(), 1)).collect(),
            expiry: if connected { 0 } else { 3600 },
            left_ms: Some(10),
        }
    }

    #[test]
    fn shared_filters_are_parsed_as_mqtt_5_says() {
        assert_eq!(parse("$share/g/a/+"), Some(("g", "a/+")));
        assert_eq!(parse("$share/g/#"), Some(("g", "#")));
        assert_eq!(parse("a/b"), None);
        for bad in [
            "$share/g",
            "$share//a",
            "$share/g+/a",
            "$share/g/",
            "$share",
        ] {
            assert!(malformed(bad), "{bad}");
        }
        assert!(!malformed("$share/g/a") && !malformed("a/$share/g"));
    }

    #[test]
    fn each_group_gets_one_connected_member_in_turn() {
        let records = [
            member("a", 1, true, &["$share/g/s/#"]),
            member("b", 2, true, &["$share/g/s/+"]),
            member("c", 3, true, &["$share/g/s/#", "$share/h/s/x"]),
            member("d", 2, false, &["$share/h/s/x"]),
            member("e", 3, false, &["s/#"]),
        ];
        let turn = AtomicU64::new(0);
        let picks: Vec<Vec<Target>> = (0..4)
            .map(|_| targets(records.iter(), "s/x", &turn))
            .collect();
        // Groups (g, s/#), (g, s/+) and (h, s/x): three deliveries per message.
        assert!(picks.iter().all(|p| p.len() == 3), "{picks:?}");
        let nodes = |g: &str, f: &str| -> Vec<u64> {
            picks
                .iter()
                .map(|p| {
                    p.iter()
                        .find(|t| t.group == g && t.filter == f)
                        .expect("the group is picked")
                        .node
                })
                .collect()
        };
        assert_eq!(nodes("g", "s/#"), vec![1, 3, 1, 3]);
        assert_eq!(nodes("g", "s/+"), vec![2, 2, 2, 2]);
        // d is away: c, the connected member, gets them all.
        assert_eq!(nodes("h", "s/x"), vec![3, 3, 3, 3]);
        assert!(targets(records.iter(), "other", &turn).is_empty());
        // Only away members: nobody gets it.
        let away = [member("d", 2, false, &["$share/h/s/x"])];
        assert!(targets(away.iter(), "s/x", &turn).is_empty());
    }

    #[test]
    fn deliveries_carry_the_relays_packet_ids_and_answers_are_taken() {
        let mut out = SharedOut::new(LocalShares::default(), "c", 1);
        for v5 in [false, true] {
            let delivery = Delivery {
                message: Arc::new(Message {
                    topic: "s/x".to_string(),
                    payload: bytes::Bytes::from_static(b"payload"),
                    qos: 2,
                    retain: true,
                    props: v5.then(|| rumqttd::protocol::PublishProperties {
                        user_properties: vec![("k".to_string(), "v".to_string())],
                        ..Default::default()
                    }),
                    client_id: "pub".to_string(),
                }),
                group: "g".to_string(),
                filter: "s/#".to_string(),
            };
            let mut frame = bytes::BytesMut::new();
            out.publish(v5, delivery, 1, &mut frame).expect("encode");
            let (qos, pkid) = super::super::publish_qos_pkid(&frame).expect("a PUBLISH");
            assert_eq!(qos, 1);
            assert!(pkid >= FIRST_PKID);
            let Ok(rumqttd::protocol::Packet::Publish(p, props)) =
                super::super::decode_frame(v5, frame, 1 << 20)
            else {
                panic!("not a PUBLISH");
            };
            assert_eq!(
                (&p.topic[..], &p.payload[..], p.retain),
                (&b"s/x"[..], &b"payload"[..], false)
            );
            assert_eq!(props.map(|p| p.user_properties.len()), v5.then_some(1));
            // The client's PUBACK is the relay's; one for rumqttd's ids goes on.
            let [hi, lo] = pkid.to_be_bytes();
            assert_eq!(out.answer(&[0x40, 2, hi, lo]), Some(None));
            assert_eq!(out.answer(&[0x40, 2, 0, 7]), None);
            assert!(out.inflight.is_empty());
        }
        // QoS 2: PUBREC gets a PUBREL, PUBCOMP ends it.
        out.inflight.insert(
            FIRST_PKID,
            Delivery {
                message: Arc::new(Message {
                    topic: "t".to_string(),
                    payload: bytes::Bytes::new(),
                    qos: 2,
                    retain: false,
                    props: None,
                    client_id: String::new(),
                }),
                group: "g".to_string(),
                filter: "t".to_string(),
            },
        );
        let [hi, lo] = FIRST_PKID.to_be_bytes();
        assert_eq!(
            out.answer(&[0x50, 2, hi, lo]),
            Some(Some([0x62, 2, hi, lo]))
        );
        assert_eq!(out.inflight.len(), 1);
        assert_eq!(out.answer(&[0x70, 2, hi, lo]), Some(None));
        assert!(out.inflight.is_empty());
    }

    #[tokio::test]
    async fn a_delivery_goes_to_one_member_with_room() {
        let shares = LocalShares::default();
        let (tx1, mut rx1) = tokio::sync::mpsc::channel(1);
        let (tx2, mut rx2) = tokio::sync::mpsc::channel(1);
        shares.join(("g", "s/#"), 1, "one", 1, &tx1);
        shares.join(("g", "s/#"), 0, "two", 2, &tx2);
        let delivery = || Delivery {
            message: Arc::new(Message {
                topic: "s/x".to_string(),
                payload: bytes::Bytes::from_static(b"p"),
                qos: 1,
                retain: false,
                props: None,
                client_id: "pub".to_string(),
            }),
            group: "g".to_string(),
            filter: "s/#".to_string(),
        };
        assert!(shares.deliver(delivery()));
        assert!(shares.deliver(delivery()));
        // Both queues are full now.
        assert!(!shares.deliver(delivery()));
        let (_, q1) = rx1.recv().await.expect("one delivery");
        let (_, q2) = rx2.recv().await.expect("one delivery");
        // The QoS is the lower of the message's and the subscription's.
        let mut qos = [q1, q2];
        qos.sort();
        assert_eq!(qos, [0, 1]);
        shares.leave(None, "one", 1);
        shares.leave(Some(("g", "s/#")), "two", 2);
        assert!(!shares.deliver(delivery()));
    }
}
