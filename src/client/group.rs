//! Client-side partition assignment for consumer groups: the range, round-robin and sticky
//! assignors, and the subscription/assignment encoding (Kafka's `ConsumerProtocolSubscription`
//! v1 and `ConsumerProtocolAssignment` v0, each preceded by its version as an `i16`, so a
//! group can be shared with Kafka clients).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use kafka_protocol::messages::consumer_protocol_assignment::TopicPartition as AssignedTopic;
use kafka_protocol::messages::consumer_protocol_subscription::TopicPartition as OwnedTopic;
use kafka_protocol::messages::{
    ConsumerProtocolAssignment, ConsumerProtocolSubscription, TopicName,
};
use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};

use super::ClientError;

/// The protocol type of consumer groups.
pub const PROTOCOL_TYPE: &str = "consumer";

/// A topic partition.
pub type Tp = (String, u32);

/// How the group leader spreads partitions over members.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Assignor {
    /// Per topic, consecutive ranges of partitions (Kafka's `range`).
    Range,
    /// All partitions dealt out one by one (Kafka's `roundrobin`).
    RoundRobin,
    /// Balanced, keeping what members already own (Kafka's `sticky`).
    Sticky,
}

impl Assignor {
    pub fn name(self) -> &'static str {
        match self {
            Assignor::Range => "range",
            Assignor::RoundRobin => "roundrobin",
            Assignor::Sticky => "sticky",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "range" => Some(Assignor::Range),
            "roundrobin" => Some(Assignor::RoundRobin),
            "sticky" => Some(Assignor::Sticky),
            _ => None,
        }
    }
}

/// What a member asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Subscription {
    pub topics: Vec<String>,
    /// What it owned in the previous generation (for the sticky assignor).
    pub owned: Vec<Tp>,
}

fn codec_err(e: impl std::fmt::Display) -> ClientError {
    ClientError::Records(format!("group protocol: {e}"))
}

pub fn encode_subscription(s: &Subscription) -> Result<Bytes, ClientError> {
    let mut owned: BTreeMap<&str, Vec<i32>> = BTreeMap::new();
    for (t, p) in &s.owned {
        owned.entry(t).or_default().push(*p as i32);
    }
    let msg = ConsumerProtocolSubscription::default()
        .with_topics(
            s.topics
                .iter()
                .map(|t| StrBytes::from_string(t.clone()))
                .collect(),
        )
        .with_owned_partitions(
            owned
                .into_iter()
                .map(|(t, ps)| {
                    OwnedTopic::default()
                        .with_topic(TopicName(StrBytes::from_string(t.to_string())))
                        .with_partitions(ps)
                })
                .collect(),
        );
    let mut buf = BytesMut::new();
    buf.put_i16(1);
    msg.encode(&mut buf, 1).map_err(codec_err)?;
    Ok(buf.freeze())
}

pub fn decode_subscription(mut b: Bytes) -> Result<Subscription, ClientError> {
    if b.len() < 2 {
        return Err(codec_err("subscription too short"));
    }
    let version = b.get_i16().clamp(0, 3);
    let msg = ConsumerProtocolSubscription::decode(&mut b, version).map_err(codec_err)?;
    Ok(Subscription {
        topics: msg.topics.iter().map(|t| t.to_string()).collect(),
        owned: msg
            .owned_partitions
            .iter()
            .flat_map(|tp| {
                tp.partitions
                    .iter()
                    .filter(|p| **p >= 0)
                    .map(|p| (tp.topic.0.to_string(), *p as u32))
            })
            .collect(),
    })
}

pub fn encode_assignment(parts: &[Tp]) -> Result<Bytes, ClientError> {
    let mut by_topic: BTreeMap<&str, Vec<i32>> = BTreeMap::new();
    for (t, p) in parts {
        by_topic.entry(t).or_default().push(*p as i32);
    }
    let msg = ConsumerProtocolAssignment::default().with_assigned_partitions(
        by_topic
            .into_iter()
            .map(|(t, ps)| {
                AssignedTopic::default()
                    .with_topic(TopicName(StrBytes::from_string(t.to_string())))
                    .with_partitions(ps)
            })
            .collect(),
    );
    let mut buf = BytesMut::new();
    buf.put_i16(0);
    msg.encode(&mut buf, 0).map_err(codec_err)?;
    Ok(buf.freeze())
}

pub fn decode_assignment(mut b: Bytes) -> Result<Vec<Tp>, ClientError> {
    if b.is_empty() {
        return Ok(Vec::new());
    }
    if b.len() < 2 {
        return Err(codec_err("assignment too short"));
    }
    let version = b.get_i16().clamp(0, 3);
    let msg = ConsumerProtocolAssignment::decode(&mut b, version).map_err(codec_err)?;
    let mut out: Vec<Tp> = msg
        .assigned_partitions
        .iter()
        .flat_map(|tp| {
            tp.partitions
                .iter()
                .filter(|p| **p >= 0)
                .map(|p| (tp.topic.0.to_string(), *p as u32))
        })
        .collect();
    out.sort();
    Ok(out)
}

/// Assigns the partitions of each topic (`partitions[topic]` = count) to the members
/// subscribed to it. Deterministic: members are taken in id order.
pub fn assign(
    assignor: Assignor,
    members: &BTreeMap<String, Subscription>,
    partitions: &HashMap<String, u32>,
) -> BTreeMap<String, Vec<Tp>> {
    let mut out: BTreeMap<String, Vec<Tp>> =
        members.keys().map(|m| (m.clone(), Vec::new())).collect();
    let topics: BTreeSet<&String> = members.values().flat_map(|s| &s.topics).collect();
    let subscribers = |t: &str| -> Vec<&String> {
        members
            .iter()
            .filter(|(_, s)| s.topics.iter().any(|x| x == t))
            .map(|(m, _)| m)
            .collect()
    };
    match assignor {
        Assignor::Range => {
            for t in topics {
                let n = partitions.get(t.as_str()).copied().unwrap_or(0);
                let subs = subscribers(t);
                if subs.is_empty() {
                    continue;
                }
                let per = n / subs.len() as u32;
                let extra = n % subs.len() as u32;
                let mut next = 0;
                for (i, m) in subs.iter().enumerate() {
                    let count = per + u32::from((i as u32) < extra);
                    for p in next..next + count {
                        out.entry((*m).clone()).or_default().push((t.clone(), p));
                    }
                    next += count;
                }
            }
        }
        Assignor::RoundRobin => {
            let all: Vec<Tp> = topics
                .iter()
                .flat_map(|t| {
                    (0..partitions.get(t.as_str()).copied().unwrap_or(0)).map(|p| ((*t).clone(), p))
                })
                .collect();
            let ids: Vec<&String> = members.keys().collect();
            let mut turn = 0usize;
            for tp in all {
                // The next member (in turn) subscribed to this topic.
                for _ in 0..ids.len() {
                    let m = ids[turn % ids.len()];
                    turn += 1;
                    if members[m].topics.contains(&tp.0) {
                        out.entry(m.clone()).or_default().push(tp);
                        break;
                    }
                }
            }
        }
        Assignor::Sticky => sticky(members, partitions, &topics, &mut out),
    }
    for v in out.values_mut() {
        v.sort();
    }
    out
}

/// Balanced (counts differ by at most one among members with the same subscription) and
/// sticky: a member keeps as much of what it owned as balance allows.
fn sticky(
    members: &BTreeMap<String, Subscription>,
    partitions: &HashMap<String, u32>,
    topics: &BTreeSet<&String>,
    out: &mut BTreeMap<String, Vec<Tp>>,
) {
    let all: Vec<Tp> = topics
        .iter()
        .flat_map(|t| {
            (0..partitions.get(t.as_str()).copied().unwrap_or(0)).map(|p| ((*t).clone(), p))
        })
        .collect();
    let total = all.len();
    let n = members.len().max(1);
    let floor = total / n;
    let mut ceil_slots = total % n;
    let exists: BTreeSet<&Tp> = all.iter().collect();
    let mut taken: BTreeSet<Tp> = BTreeSet::new();
    // Members with most owned first keep theirs (ties by id).
    let mut order: Vec<(&String, &Subscription)> = members.iter().collect();
    order.sort_by_key(|(m, s)| (std::cmp::Reverse(s.owned.len()), (*m).clone()));
    for (m, s) in order {
        let valid: Vec<&Tp> = s
            .owned
            .iter()
            .filter(|tp| exists.contains(tp) && s.topics.contains(&tp.0) && !taken.contains(*tp))
            .collect();
        let mut quota = floor;
        if valid.len() > floor && ceil_slots > 0 {
            quota += 1;
            ceil_slots -= 1;
        }
        for tp in valid.into_iter().take(quota) {
            taken.insert(tp.clone());
            out.entry(m.clone()).or_default().push(tp.clone());
        }
    }
    for tp in all {
        if taken.contains(&tp) {
            continue;
        }
        let target = members
            .iter()
            .filter(|(_, s)| s.topics.contains(&tp.0))
            .map(|(m, _)| m)
            .min_by_key(|m| (out.get(*m).map_or(0, Vec::len), (*m).clone()));
        if let Some(m) = target {
            out.entry(m.clone()).or_default().push(tp);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn members(ids: &[&str], owned: &[&[u32]]) -> BTreeMap<String, Subscription> {
        ids.iter()
            .enumerate()
            .map(|(i, m)| {
                (
                    m.to_string(),
                    Subscription {
                        topics: vec!["t".into()],
                        owned: owned
                            .get(i)
                            .map(|ps| ps.iter().map(|p| ("t".to_string(), *p)).collect())
                            .unwrap_or_default(),
                    },
                )
            })
            .collect()
    }

    fn parts(a: &BTreeMap<String, Vec<Tp>>, m: &str) -> Vec<u32> {
        a[m].iter().map(|tp| tp.1).collect()
    }

    #[test]
    fn range_and_round_robin_spread_six_partitions_over_three() {
        let m = members(&["a", "b", "c"], &[]);
        let n: HashMap<String, u32> = [("t".to_string(), 6)].into();
        let r = assign(Assignor::Range, &m, &n);
        assert_eq!(parts(&r, "a"), vec![0, 1]);
        assert_eq!(parts(&r, "c"), vec![4, 5]);
        let rr = assign(Assignor::RoundRobin, &m, &n);
        assert_eq!(parts(&rr, "a"), vec![0, 3]);
        assert_eq!(parts(&rr, "b"), vec![1, 4]);
        let n7: HashMap<String, u32> = [("t".to_string(), 7)].into();
        let r7 = assign(Assignor::Range, &m, &n7);
        assert_eq!(parts(&r7, "a"), vec![0, 1, 2]);
        assert_eq!(parts(&r7, "b"), vec![3, 4]);
    }

    #[test]
    fn sticky_keeps_owned_partitions_and_balances() {
        let n: HashMap<String, u32> = [("t".to_string(), 6)].into();
        // c left: a and b keep theirs and share c's.
        let m = members(&["a", "b"], &[&[0, 3], &[1, 4]]);
        let s = assign(Assignor::Sticky, &m, &n);
        assert!(parts(&s, "a").starts_with(&[0]) && parts(&s, "a").contains(&3));
        assert!(parts(&s, "b").contains(&1) && parts(&s, "b").contains(&4));
        assert_eq!(parts(&s, "a").len(), 3);
        assert_eq!(parts(&s, "b").len(), 3);
        // A newcomer takes one from each without moving anything else.
        let m = members(&["a", "b", "c"], &[&[0, 2, 3], &[1, 4, 5], &[]]);
        let s = assign(Assignor::Sticky, &m, &n);
        assert_eq!(parts(&s, "a"), vec![0, 2]);
        assert_eq!(parts(&s, "b"), vec![1, 4]);
        assert_eq!(parts(&s, "c"), vec![3, 5]);
    }

    #[test]
    fn subscriptions_and_assignments_round_trip_in_kafka_format() {
        let s = Subscription {
            topics: vec!["orders".into(), "audit".into()],
            owned: vec![("orders".into(), 2)],
        };
        let b = encode_subscription(&s).unwrap();
        assert_eq!(&b[..2], &[0, 1], "version 1 prefix");
        assert_eq!(decode_subscription(b).unwrap(), s);
        let a = vec![("audit".to_string(), 0), ("orders".to_string(), 3)];
        assert_eq!(
            decode_assignment(encode_assignment(&a).unwrap()).unwrap(),
            a
        );
        assert!(decode_assignment(Bytes::from_static(b"\x00")).is_err());
    }
}
