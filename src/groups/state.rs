//! One consumer group's membership state machine (Kafka's classic group protocol), without
//! I/O: the coordinator ([`super::Coordinator`]) calls these under its lock and does the
//! writing and waiting.
//!
//! States: `Empty` (no members; offsets may exist) → `PreparingRebalance` (members (re)join;
//! ends when every member has joined, after the initial delay for a new group, or at the
//! rebalance deadline, dropping members that did not rejoin) → `CompletingRebalance` (a new
//! generation; the leader's SyncGroup carries everyone's assignment) → `Stable`. A member that
//! joins, leaves or misses its session timeout sends the group back to `PreparingRebalance`.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use aqueduct_protocol::group as pb;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::GroupErrorCode as E;

/// How long a new group waits for more members before its first generation (Kafka's
/// `group.initial.rebalance.delay.ms`).
pub const INITIAL_REBALANCE_DELAY: Duration = Duration::from_secs(3);
/// Shortest and longest session timeout a member may ask for.
pub const MIN_SESSION_TIMEOUT: Duration = Duration::from_millis(1000);
pub const MAX_SESSION_TIMEOUT: Duration = Duration::from_secs(1800);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum GroupState {
    Empty,
    PreparingRebalance,
    CompletingRebalance,
    Stable,
}

impl GroupState {
    pub fn as_str(self) -> &'static str {
        match self {
            GroupState::Empty => "Empty",
            GroupState::PreparingRebalance => "PreparingRebalance",
            GroupState::CompletingRebalance => "CompletingRebalance",
            GroupState::Stable => "Stable",
        }
    }
}

/// A refusal: a stable code and a message.
pub type Refusal = (E, String);

pub type JoinReply = Result<pb::JoinGroupReply, Refusal>;
pub type SyncReply = Result<Bytes, Refusal>;

#[derive(Debug)]
pub struct Member {
    pub id: String,
    pub client_id: String,
    pub host: String,
    pub protocols: Vec<(String, Bytes)>,
    pub session_timeout: Duration,
    pub rebalance_timeout: Duration,
    pub last_heard: Instant,
    pub assignment: Bytes,
    /// Joined the current rebalance.
    pub joined: bool,
    /// Order of first join (the earliest member leads when the leader leaves).
    pub seq: u64,
    pub join_waiter: Option<oneshot::Sender<JoinReply>>,
    pub sync_waiter: Option<oneshot::Sender<SyncReply>>,
}

/// A committed offset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Committed {
    pub offset: i64,
    pub metadata: String,
}

#[derive(Debug)]
pub struct Group {
    pub name: String,
    pub state: GroupState,
    pub generation: i32,
    pub protocol_type: String,
    pub protocol: String,
    pub leader: String,
    pub members: BTreeMap<String, Member>,
    /// When the current rebalance phase gives up on members that have not (re)joined/synced.
    pub deadline: Instant,
    /// A new group's first rebalance waits at least until then.
    pub delay_until: Instant,
    pub offsets: HashMap<(String, u32), Committed>,
    /// The group became empty: its record (no members) is still to be written, so that a new
    /// coordinator does not bring back members that left.
    pub needs_record: bool,
    next_seq: u64,
}

/// What the coordinator persists of a group (the `group` record).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupRecord {
    pub protocol_type: String,
    pub protocol: String,
    pub generation: i32,
    pub leader: String,
    pub members: Vec<MemberRecord>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberRecord {
    pub id: String,
    pub client_id: String,
    pub host: String,
    pub session_timeout_ms: u64,
    pub rebalance_timeout_ms: u64,
    pub assignment: Vec<u8>,
}

fn refuse<T>(code: E, message: impl Into<String>) -> Result<T, Refusal> {
    Err((code, message.into()))
}

impl Group {
    pub fn new(name: &str, now: Instant) -> Self {
        Self {
            name: name.to_string(),
            state: GroupState::Empty,
            generation: 0,
            protocol_type: String::new(),
            protocol: String::new(),
            leader: String::new(),
            members: BTreeMap::new(),
            deadline: now,
            delay_until: now,
            offsets: HashMap::new(),
            needs_record: false,
            next_seq: 0,
        }
    }

    /// Restores a group from its record (a new coordinator): members get a full session to
    /// find it.
    pub fn restore(&mut self, rec: GroupRecord, now: Instant) {
        self.protocol_type = rec.protocol_type;
        self.protocol = rec.protocol;
        self.generation = rec.generation;
        self.leader = rec.leader;
        self.members.clear();
        for m in rec.members {
            self.next_seq += 1;
            self.members.insert(
                m.id.clone(),
                Member {
                    id: m.id,
                    client_id: m.client_id,
                    host: m.host,
                    protocols: Vec::new(),
                    session_timeout: Duration::from_millis(m.session_timeout_ms),
                    rebalance_timeout: Duration::from_millis(m.rebalance_timeout_ms),
                    last_heard: now,
                    assignment: Bytes::from(m.assignment),
                    joined: false,
                    seq: self.next_seq,
                    join_waiter: None,
                    sync_waiter: None,
                },
            );
        }
        self.state = if self.members.is_empty() {
            GroupState::Empty
        } else {
            GroupState::Stable
        };
    }

    pub fn record(&self) -> GroupRecord {
        GroupRecord {
            protocol_type: self.protocol_type.clone(),
            protocol: self.protocol.clone(),
            generation: self.generation,
            leader: self.leader.clone(),
            members: self
                .members
                .values()
                .map(|m| MemberRecord {
                    id: m.id.clone(),
                    client_id: m.client_id.clone(),
                    host: m.host.clone(),
                    session_timeout_ms: m.session_timeout.as_millis() as u64,
                    rebalance_timeout_ms: m.rebalance_timeout.as_millis() as u64,
                    assignment: m.assignment.to_vec(),
                })
                .collect(),
        }
    }

    /// A member (re)joins; the receiver answers when the rebalance completes.
    pub fn join(
        &mut self,
        req: &pb::JoinGroupRequest,
        host: &str,
        now: Instant,
    ) -> Result<oneshot::Receiver<JoinReply>, Refusal> {
        let session = Duration::from_millis(u64::from(req.session_timeout_ms));
        if !(MIN_SESSION_TIMEOUT..=MAX_SESSION_TIMEOUT).contains(&session) {
            return refuse(
                E::InvalidSessionTimeout,
                format!(
                    "session timeout {} ms is outside {}..={} ms",
                    req.session_timeout_ms,
                    MIN_SESSION_TIMEOUT.as_millis(),
                    MAX_SESSION_TIMEOUT.as_millis()
                ),
            );
        }
        if req.protocol_type.is_empty() || req.protocols.is_empty() {
            return refuse(
                E::InconsistentGroupProtocol,
                "a member needs a protocol type and at least one protocol",
            );
        }
        if !self.members.is_empty() {
            if req.protocol_type != self.protocol_type {
                return refuse(
                    E::InconsistentGroupProtocol,
                    format!(
                        "group {} uses protocol type {:?}, not {:?}",
                        self.name, self.protocol_type, req.protocol_type
                    ),
                );
            }
            let others = self.members.values().filter(|m| m.id != req.member_id);
            let common = req.protocols.iter().any(|p| {
                others
                    .clone()
                    .all(|m| m.protocols.is_empty() || m.protocols.iter().any(|q| q.0 == p.name))
            });
            if !common {
                return refuse(
                    E::InconsistentGroupProtocol,
                    format!(
                        "no protocol of this member is supported by every member of {}",
                        self.name
                    ),
                );
            }
        }
        let id = if req.member_id.is_empty() {
            let prefix = if req.client_id.is_empty() {
                "member"
            } else {
                &req.client_id
            };
            format!("{prefix}-{:016x}", rand::random::<u64>())
        } else if self.members.contains_key(&req.member_id) {
            req.member_id.clone()
        } else {
            return refuse(
                E::UnknownMemberId,
                format!("member {} is not in group {}", req.member_id, self.name),
            );
        };
        self.protocol_type = req.protocol_type.clone();
        let (tx, rx) = oneshot::channel();
        self.next_seq += 1;
        let seq = self.next_seq;
        let member = self.members.entry(id.clone()).or_insert_with(|| Member {
            id: id.clone(),
            client_id: req.client_id.clone(),
            host: host.to_string(),
            protocols: Vec::new(),
            session_timeout: session,
            rebalance_timeout: session,
            last_heard: now,
            assignment: Bytes::new(),
            joined: false,
            seq,
            join_waiter: None,
            sync_waiter: None,
        });
        member.protocols = req
            .protocols
            .iter()
            .map(|p| (p.name.clone(), Bytes::from(p.metadata.clone())))
            .collect();
        member.session_timeout = session;
        member.rebalance_timeout =
            Duration::from_millis(u64::from(req.rebalance_timeout_ms)).max(session);
        member.last_heard = now;
        member.joined = true;
        member.join_waiter = Some(tx);
        if self.state != GroupState::PreparingRebalance {
            self.prepare_rebalance(now, Some(&id));
        }
        self.maybe_complete_join(now);
        Ok(rx)
    }

    /// Starts a rebalance: every member must rejoin (`except` just did).
    fn prepare_rebalance(&mut self, now: Instant, except: Option<&str>) {
        let was_empty = self.state == GroupState::Empty;
        for m in self.members.values_mut() {
            if Some(m.id.as_str()) != except {
                m.joined = false;
            }
            if let Some(w) = m.sync_waiter.take() {
                let _ = w.send(refuse(
                    E::RebalanceInProgress,
                    "the group is rebalancing; rejoin",
                ));
            }
        }
        let longest = self
            .members
            .values()
            .map(|m| m.rebalance_timeout)
            .max()
            .unwrap_or(MIN_SESSION_TIMEOUT);
        self.deadline = now + longest;
        self.delay_until = if was_empty {
            now + INITIAL_REBALANCE_DELAY.min(longest)
        } else {
            now
        };
        self.state = GroupState::PreparingRebalance;
    }

    /// Completes the join phase when everyone has joined (and a new group's delay is over)
    /// or the deadline passed.
    pub fn maybe_complete_join(&mut self, now: Instant) {
        if self.state != GroupState::PreparingRebalance {
            return;
        }
        let all = self.members.values().all(|m| m.joined);
        if !((all && now >= self.delay_until) || now >= self.deadline) {
            return;
        }
        self.members.retain(|_, m| m.joined);
        self.generation += 1;
        if self.members.is_empty() {
            self.state = GroupState::Empty;
            self.protocol.clear();
            self.leader.clear();
            self.needs_record = true;
            return;
        }
        if !self.members.contains_key(&self.leader) {
            self.leader = self
                .members
                .values()
                .min_by_key(|m| m.seq)
                .map(|m| m.id.clone())
                .unwrap_or_default();
        }
        let leader_protocols: Vec<String> = self
            .members
            .get(&self.leader)
            .map(|m| m.protocols.iter().map(|p| p.0.clone()).collect())
            .unwrap_or_default();
        self.protocol = leader_protocols
            .into_iter()
            .find(|p| {
                self.members
                    .values()
                    .all(|m| m.protocols.iter().any(|q| &q.0 == p))
            })
            .unwrap_or_default();
        self.state = GroupState::CompletingRebalance;
        let longest = self
            .members
            .values()
            .map(|m| m.rebalance_timeout)
            .max()
            .unwrap_or(MIN_SESSION_TIMEOUT);
        self.deadline = now + longest;
        let everyone: Vec<pb::JoinedMember> = self
            .members
            .values()
            .map(|m| pb::JoinedMember {
                member_id: m.id.clone(),
                metadata: m
                    .protocols
                    .iter()
                    .find(|p| p.0 == self.protocol)
                    .map(|p| p.1.to_vec())
                    .unwrap_or_default(),
            })
            .collect();
        for m in self.members.values_mut() {
            m.assignment = Bytes::new();
            m.last_heard = now;
            if let Some(w) = m.join_waiter.take() {
                let _ = w.send(Ok(pb::JoinGroupReply {
                    generation: self.generation,
                    protocol: self.protocol.clone(),
                    leader: self.leader.clone(),
                    member_id: m.id.clone(),
                    members: if m.id == self.leader {
                        everyone.clone()
                    } else {
                        Vec::new()
                    },
                }));
            }
        }
    }

    fn member(&mut self, id: &str, generation: i32) -> Result<&mut Member, Refusal> {
        let name = self.name.clone();
        let current = self.generation;
        let m = self.members.get_mut(id).ok_or_else(|| {
            (
                E::UnknownMemberId,
                format!("member {id} is not in group {name}"),
            )
        })?;
        if generation != current {
            return refuse(
                E::IllegalGeneration,
                format!("generation {generation} is not group {name}'s current {current}"),
            );
        }
        Ok(m)
    }

    /// SyncGroup. `Ok(Err(rx))`: wait for the leader; `Ok(Ok(bytes))`: the assignment now.
    /// When the leader syncs, the group becomes stable and the senders of every waiting
    /// member are returned in `wake` to be answered once the group record is written.
    #[allow(clippy::type_complexity)]
    pub fn sync(
        &mut self,
        req: &pb::SyncGroupRequest,
        now: Instant,
        wake: &mut Vec<(oneshot::Sender<SyncReply>, Bytes)>,
    ) -> Result<Result<Bytes, oneshot::Receiver<SyncReply>>, Refusal> {
        if self.state == GroupState::PreparingRebalance {
            self.member(&req.member_id, req.generation)?;
            return refuse(E::RebalanceInProgress, "the group is rebalancing; rejoin");
        }
        let state = self.state;
        let leader = self.leader.clone();
        let m = self.member(&req.member_id, req.generation)?;
        m.last_heard = now;
        if state == GroupState::Stable {
            return Ok(Ok(m.assignment.clone()));
        }
        let (tx, rx) = oneshot::channel();
        m.sync_waiter = Some(tx);
        if req.member_id == leader {
            for a in &req.assignments {
                if let Some(m) = self.members.get_mut(&a.member_id) {
                    m.assignment = Bytes::from(a.assignment.clone());
                }
            }
            self.state = GroupState::Stable;
            for m in self.members.values_mut() {
                if let Some(w) = m.sync_waiter.take() {
                    wake.push((w, m.assignment.clone()));
                }
            }
        }
        Ok(Err(rx))
    }

    pub fn heartbeat(&mut self, req: &pb::HeartbeatRequest, now: Instant) -> Result<(), Refusal> {
        let state = self.state;
        let m = self.member(&req.member_id, req.generation)?;
        m.last_heard = now;
        if state == GroupState::PreparingRebalance {
            return refuse(E::RebalanceInProgress, "the group is rebalancing; rejoin");
        }
        Ok(())
    }

    pub fn leave(&mut self, member_id: &str, now: Instant) -> Result<(), Refusal> {
        if self.members.remove(member_id).is_none() {
            return refuse(
                E::UnknownMemberId,
                format!("member {member_id} is not in group {}", self.name),
            );
        }
        self.member_gone(now);
        Ok(())
    }

    fn member_gone(&mut self, now: Instant) {
        match self.state {
            GroupState::Stable | GroupState::CompletingRebalance => {
                self.prepare_rebalance(now, None);
                if self.members.is_empty() {
                    self.deadline = now;
                }
            }
            GroupState::PreparingRebalance | GroupState::Empty => {}
        }
        self.maybe_complete_join(now);
    }

    /// Whether a commit by this member (generation -1 and no member: from outside the group)
    /// is allowed now.
    pub fn may_commit(
        &mut self,
        member_id: &str,
        generation: i32,
        now: Instant,
    ) -> Result<(), Refusal> {
        if generation < 0 && member_id.is_empty() {
            if self.members.is_empty() {
                return Ok(());
            }
            return refuse(
                E::NonEmptyGroup,
                format!(
                    "group {} has active members; offsets can be set from outside only while it has none",
                    self.name
                ),
            );
        }
        let state = self.state;
        let m = self.member(member_id, generation)?;
        m.last_heard = now;
        if state == GroupState::CompletingRebalance {
            return refuse(E::RebalanceInProgress, "the group is rebalancing; rejoin");
        }
        Ok(())
    }

    /// Expires members past their session timeout, moves rebalances on; returns whether the
    /// group changed.
    pub fn tick(&mut self, now: Instant) {
        let before = self.members.len();
        self.members.retain(|_, m| {
            // A member waiting in JoinGroup is alive.
            m.join_waiter.is_some() || now.duration_since(m.last_heard) < m.session_timeout
        });
        if self.members.len() != before {
            tracing::info!(group = %self.name, expired = before - self.members.len(), "members' sessions expired");
            self.member_gone(now);
        }
        match self.state {
            GroupState::PreparingRebalance => self.maybe_complete_join(now),
            GroupState::CompletingRebalance if now >= self.deadline => {
                // The leader never sent the assignment.
                self.prepare_rebalance(now, None);
            }
            _ => {}
        }
    }

    /// The group has nothing to remember.
    pub fn is_forgettable(&self) -> bool {
        self.members.is_empty() && self.offsets.is_empty() && self.state == GroupState::Empty
    }

    /// Answers every waiter with a refusal (the coordinator moved).
    pub fn abandon(&mut self, code: E, why: &str) {
        for m in self.members.values_mut() {
            if let Some(w) = m.join_waiter.take() {
                let _ = w.send(refuse(code, why));
            }
            if let Some(w) = m.sync_waiter.take() {
                let _ = w.send(refuse(code, why));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn join_req(member: &str) -> pb::JoinGroupRequest {
        pb::JoinGroupRequest {
            group: "g".into(),
            member_id: member.into(),
            protocol_type: "consumer".into(),
            protocols: vec![pb::Protocol {
                name: "range".into(),
                metadata: member.as_bytes().to_vec(),
            }],
            session_timeout_ms: 6000,
            rebalance_timeout_ms: 10_000,
            client_id: "c".into(),
        }
    }

    #[test]
    fn members_join_sync_and_a_silent_one_is_expired() {
        let t0 = Instant::now();
        let mut g = Group::new("g", t0);
        let mut a = g.join(&join_req(""), "h", t0).unwrap();
        let mut b = g.join(&join_req(""), "h", t0).unwrap();
        // A new group waits for the initial delay.
        g.tick(t0 + Duration::from_secs(1));
        assert!(a.try_recv().is_err());
        g.tick(t0 + INITIAL_REBALANCE_DELAY);
        let ra = a.try_recv().unwrap().unwrap();
        let rb = b.try_recv().unwrap().unwrap();
        assert_eq!(ra.generation, 1);
        assert_eq!(ra.protocol, "range");
        assert_eq!(ra.leader, ra.member_id);
        assert_eq!(ra.members.len(), 2);
        assert!(rb.members.is_empty());
        assert_eq!(g.state, GroupState::CompletingRebalance);
        // A stale generation is refused.
        let now = t0 + INITIAL_REBALANCE_DELAY;
        let bad = pb::HeartbeatRequest {
            group: "g".into(),
            generation: 0,
            member_id: rb.member_id.clone(),
        };
        assert_eq!(g.heartbeat(&bad, now).unwrap_err().0, E::IllegalGeneration);
        // The follower waits for the leader's assignment.
        let mut wake = Vec::new();
        let follower = pb::SyncGroupRequest {
            group: "g".into(),
            generation: 1,
            member_id: rb.member_id.clone(),
            assignments: vec![],
        };
        let Ok(Err(mut frx)) = g.sync(&follower, now, &mut wake) else {
            panic!("follower should wait")
        };
        let leader = pb::SyncGroupRequest {
            group: "g".into(),
            generation: 1,
            member_id: ra.member_id.clone(),
            assignments: vec![
                pb::MemberAssignment {
                    member_id: ra.member_id.clone(),
                    assignment: b"A".to_vec(),
                },
                pb::MemberAssignment {
                    member_id: rb.member_id.clone(),
                    assignment: b"B".to_vec(),
                },
            ],
        };
        assert!(g.sync(&leader, now, &mut wake).is_ok());
        assert_eq!(g.state, GroupState::Stable);
        assert_eq!(wake.len(), 2);
        for (w, a) in wake {
            let _ = w.send(Ok(a));
        }
        assert_eq!(frx.try_recv().unwrap().unwrap(), Bytes::from_static(b"B"));
        // Only the leader keeps heartbeating: the follower expires after its session.
        let later = now + Duration::from_secs(5);
        let hb = pb::HeartbeatRequest {
            group: "g".into(),
            generation: 1,
            member_id: ra.member_id.clone(),
        };
        g.heartbeat(&hb, later).unwrap();
        g.tick(now + Duration::from_secs(7));
        assert_eq!(g.state, GroupState::PreparingRebalance);
        assert_eq!(g.members.len(), 1);
        assert_eq!(
            g.heartbeat(&hb, now + Duration::from_secs(7))
                .unwrap_err()
                .0,
            E::RebalanceInProgress
        );
        // The leader rejoins alone: generation 2, straight away.
        let mut again = g
            .join(&join_req(&ra.member_id), "h", now + Duration::from_secs(8))
            .unwrap();
        let r = again.try_recv().unwrap().unwrap();
        assert_eq!(r.generation, 2);
        assert_eq!(r.members.len(), 1);
    }

    #[test]
    fn mismatched_protocols_and_unknown_members_are_refused() {
        let t0 = Instant::now();
        let mut g = Group::new("g", t0);
        let _a = g.join(&join_req(""), "h", t0).unwrap();
        let mut other = join_req("");
        other.protocol_type = "connect".into();
        assert_eq!(
            g.join(&other, "h", t0).unwrap_err().0,
            E::InconsistentGroupProtocol
        );
        let mut rr = join_req("");
        rr.protocols[0].name = "roundrobin".into();
        assert_eq!(
            g.join(&rr, "h", t0).unwrap_err().0,
            E::InconsistentGroupProtocol
        );
        assert_eq!(
            g.join(&join_req("nobody"), "h", t0).unwrap_err().0,
            E::UnknownMemberId
        );
        let mut short = join_req("");
        short.session_timeout_ms = 10;
        assert_eq!(
            g.join(&short, "h", t0).unwrap_err().0,
            E::InvalidSessionTimeout
        );
        // Commits from outside the group need it to be empty.
        assert_eq!(g.may_commit("", -1, t0).unwrap_err().0, E::NonEmptyGroup);
    }
}
