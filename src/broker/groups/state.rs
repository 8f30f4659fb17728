//! One consumer group's membership state machine (Kafka's classic group protocol), without
//! I/O: the coordinator ([`super::Coordinator`]) calls these under its lock and does the
//! writing and waiting.
//!
//! States: `Empty` (no members; offsets may exist) → `PreparingRebalance` (members (re)join;
//! ends when every member has joined, after the initial delay for a new group, or at the
//! rebalance deadline, dropping members that did not rejoin) → `CompletingRebalance` (a new
//! generation; the leader's SyncGroup carries everyone's assignment) → `Stable`. A member that
//! joins, leaves or misses its session timeout sends the group back to `PreparingRebalance`.
//!
//! Static members (Kafka's `group.instance.id`, KIP-345) keep their place across restarts: a
//! member rejoining with a known instance id and no member id gets a new member id, takes
//! the old one's assignment, and the old id is fenced (`FENCED_INSTANCE_ID`); a stable group
//! does not rebalance for it unless it leads the group or changed its protocols. New dynamic
//! members that must learn their id first (Kafka's JoinGroup v4+, KIP-394) are kept pending
//! until they rejoin with it.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::broker::error::{BrokerError, BrokerResult, ErrorCode as E};

/// How long a new group waits for more members before its first generation (Kafka's
/// `group.initial.rebalance.delay.ms`).
pub const INITIAL_REBALANCE_DELAY: Duration = Duration::from_secs(3);
/// Shortest and longest session timeout a member may ask for (Kafka's
/// `group.min.session.timeout.ms` is 6 s; ours is lower for tests and fast failover).
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

fn refuse<T>(code: E, message: impl Into<String>) -> BrokerResult<T> {
    Err(BrokerError::new(code, message))
}

/// A protocol a member supports, with its assignor metadata (opaque to the coordinator).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Protocol {
    pub name: String,
    pub metadata: Bytes,
}

/// A member (re)joining.
#[derive(Debug, Clone)]
pub struct JoinRequest {
    pub group: String,
    /// Empty for a new member.
    pub member_id: String,
    /// A static member's id (`group.instance.id`).
    pub instance_id: Option<String>,
    pub protocol_type: String,
    pub protocols: Vec<Protocol>,
    pub session_timeout: Duration,
    pub rebalance_timeout: Duration,
    pub client_id: String,
    /// The member's address as the front saw it.
    pub host: String,
    /// A new dynamic member first gets its id (`MemberIdRequired`) and rejoins with it.
    pub require_member_id: bool,
}

/// One member as the leader sees it in a join answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinedMember {
    pub member_id: String,
    pub instance_id: Option<String>,
    pub metadata: Bytes,
}

/// A completed join.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Joined {
    pub generation: i32,
    pub protocol_type: String,
    pub protocol: String,
    pub leader: String,
    pub member_id: String,
    /// Only for the leader: every member with its metadata for the chosen protocol.
    pub members: Vec<JoinedMember>,
}

/// What a join gives: a generation, or (KIP-394) the id to rejoin with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JoinOutcome {
    Joined(Joined),
    MemberIdRequired(String),
}

/// A member naming itself in a call (heartbeat, sync, commit).
#[derive(Debug, Clone, Default)]
pub struct MemberRef {
    pub member_id: String,
    pub generation: i32,
    pub instance_id: Option<String>,
}

/// A member's SyncGroup.
#[derive(Debug, Clone, Default)]
pub struct SyncRequest {
    pub group: String,
    pub member: MemberRef,
    /// When given, must match the group's (Kafka's SyncGroup v5).
    pub protocol_type: Option<String>,
    pub protocol: Option<String>,
    /// Only from the leader: each member's assignment.
    pub assignments: Vec<(String, Bytes)>,
}

/// A completed sync: the member's assignment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Synced {
    pub protocol_type: String,
    pub protocol: String,
    pub assignment: Bytes,
}

pub type JoinReply = BrokerResult<Joined>;
pub type SyncReply = BrokerResult<Bytes>;

#[derive(Debug)]
pub struct Member {
    pub id: String,
    pub instance_id: Option<String>,
    pub client_id: String,
    pub host: String,
    pub protocols: Vec<Protocol>,
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

impl Member {
    /// Its metadata for `protocol`.
    pub fn metadata(&self, protocol: &str) -> Bytes {
        self.protocols
            .iter()
            .find(|p| p.name == protocol)
            .map(|p| p.metadata.clone())
            .unwrap_or_default()
    }
}

/// A committed offset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Committed {
    pub offset: i64,
    pub metadata: String,
    /// When it was committed (ms since the epoch; 0 for records written before this field).
    #[serde(default)]
    pub commit_ms: i64,
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
    /// Static members: instance id → member id.
    pub instances: HashMap<String, String>,
    /// Member ids handed out (KIP-394) and not yet used, with when they lapse.
    pub pending: HashMap<String, Instant>,
    /// When the current rebalance phase gives up on members that have not (re)joined/synced.
    pub deadline: Instant,
    /// A new group's first rebalance waits at least until then.
    pub delay_until: Instant,
    pub offsets: HashMap<(String, u32), Committed>,
    /// The group's membership changed without a rebalance (it became empty, a static member
    /// was replaced): its record is still to be written, so that a new coordinator does not
    /// bring back members that are gone.
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
    #[serde(default)]
    pub instance_id: Option<String>,
    pub client_id: String,
    pub host: String,
    pub session_timeout_ms: u64,
    pub rebalance_timeout_ms: u64,
    /// Its metadata for the group's protocol (the subscription).
    #[serde(default)]
    pub metadata: Vec<u8>,
    pub assignment: Vec<u8>,
}

fn new_member_id(client_id: &str) -> String {
    let prefix = if client_id.is_empty() {
        "member"
    } else {
        client_id
    };
    format!("{prefix}-{:016x}", rand::random::<u64>())
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
            instances: HashMap::new(),
            pending: HashMap::new(),
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
        self.instances.clear();
        for m in rec.members {
            self.next_seq += 1;
            if let Some(i) = &m.instance_id {
                self.instances.insert(i.clone(), m.id.clone());
            }
            let protocols = if self.protocol.is_empty() {
                Vec::new()
            } else {
                vec![Protocol {
                    name: self.protocol.clone(),
                    metadata: Bytes::from(m.metadata),
                }]
            };
            self.members.insert(
                m.id.clone(),
                Member {
                    id: m.id,
                    instance_id: m.instance_id,
                    client_id: m.client_id,
                    host: m.host,
                    protocols,
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
                    instance_id: m.instance_id.clone(),
                    client_id: m.client_id.clone(),
                    host: m.host.clone(),
                    session_timeout_ms: m.session_timeout.as_millis() as u64,
                    rebalance_timeout_ms: m.rebalance_timeout.as_millis() as u64,
                    metadata: m.metadata(&self.protocol).to_vec(),
                    assignment: m.assignment.to_vec(),
                })
                .collect(),
        }
    }

    /// Whether a joining member's protocols fit the group's other members.
    fn check_protocols(&self, req: &JoinRequest, except: &str) -> BrokerResult<()> {
        if req.protocol_type.is_empty() || req.protocols.is_empty() {
            return refuse(
                E::InconsistentGroupProtocol,
                "a member needs a protocol type and at least one protocol",
            );
        }
        if self.members.is_empty() {
            return Ok(());
        }
        if req.protocol_type != self.protocol_type {
            return refuse(
                E::InconsistentGroupProtocol,
                format!(
                    "group {} uses protocol type {:?}, not {:?}",
                    self.name, self.protocol_type, req.protocol_type
                ),
            );
        }
        let others = self.members.values().filter(|m| m.id != except);
        let common = req.protocols.iter().any(|p| {
            others
                .clone()
                .all(|m| m.protocols.is_empty() || m.protocols.iter().any(|q| q.name == p.name))
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
        Ok(())
    }

    /// A member (re)joins. `Ok(Ok(outcome))`: answered now; `Ok(Err(rx))`: the receiver
    /// answers when the rebalance completes.
    pub fn join(
        &mut self,
        req: &JoinRequest,
        now: Instant,
    ) -> BrokerResult<Result<JoinOutcome, oneshot::Receiver<JoinReply>>> {
        if !(MIN_SESSION_TIMEOUT..=MAX_SESSION_TIMEOUT).contains(&req.session_timeout) {
            return refuse(
                E::InvalidSessionTimeout,
                format!(
                    "session timeout {} ms is outside {}..={} ms",
                    req.session_timeout.as_millis(),
                    MIN_SESSION_TIMEOUT.as_millis(),
                    MAX_SESSION_TIMEOUT.as_millis()
                ),
            );
        }
        self.pending.retain(|_, until| *until > now);
        let known_instance = req
            .instance_id
            .as_ref()
            .and_then(|i| self.instances.get(i))
            .cloned();
        let id = match (&known_instance, req.member_id.is_empty()) {
            // A static member coming back (a restart): it replaces its earlier self.
            (Some(old), true) => {
                self.check_protocols(req, old)?;
                let Some(member) = self.members.remove(old) else {
                    return refuse(
                        E::Internal,
                        format!("instance of group {} names no member {old}", self.name),
                    );
                };
                return Ok(self.replace_static(member, req, now));
            }
            (Some(current), false) if *current != req.member_id => {
                return refuse(
                    E::FencedInstanceId,
                    format!(
                        "instance {} of group {} is now member {current}, not {}",
                        req.instance_id.as_deref().unwrap_or_default(),
                        self.name,
                        req.member_id
                    ),
                );
            }
            (None, true) if req.require_member_id && req.instance_id.is_none() => {
                self.check_protocols(req, "")?;
                let id = new_member_id(&req.client_id);
                self.pending.insert(id.clone(), now + req.session_timeout);
                return Ok(Ok(JoinOutcome::MemberIdRequired(id)));
            }
            (None, true) => new_member_id(&req.client_id),
            _ if self.members.contains_key(&req.member_id) => req.member_id.clone(),
            _ if self.pending.remove(&req.member_id).is_some() => req.member_id.clone(),
            _ => {
                return refuse(
                    E::UnknownMemberId,
                    format!("member {} is not in group {}", req.member_id, self.name),
                );
            }
        };
        self.check_protocols(req, &id)?;
        self.protocol_type = req.protocol_type.clone();
        let (tx, rx) = oneshot::channel();
        self.next_seq += 1;
        let seq = self.next_seq;
        let member = self.members.entry(id.clone()).or_insert_with(|| Member {
            id: id.clone(),
            instance_id: req.instance_id.clone(),
            client_id: req.client_id.clone(),
            host: req.host.clone(),
            protocols: Vec::new(),
            session_timeout: req.session_timeout,
            rebalance_timeout: req.session_timeout,
            last_heard: now,
            assignment: Bytes::new(),
            joined: false,
            seq,
            join_waiter: None,
            sync_waiter: None,
        });
        member.protocols = req.protocols.clone();
        member.session_timeout = req.session_timeout;
        member.rebalance_timeout = req.rebalance_timeout.max(req.session_timeout);
        member.last_heard = now;
        member.joined = true;
        if let Some(old) = member.join_waiter.replace(tx) {
            let _ = old.send(refuse(
                E::RebalanceInProgress,
                "superseded by a newer join of the same member; rejoin",
            ));
        }
        if let Some(i) = &req.instance_id {
            self.instances.insert(i.clone(), id.clone());
        }
        if self.state != GroupState::PreparingRebalance {
            self.prepare_rebalance(now, Some(&id));
        }
        self.maybe_complete_join(now);
        Ok(Err(rx))
    }

    /// A known static member rejoined without its member id: it takes the place (and the
    /// assignment) of its earlier self, `member` (just removed), under a new id; the old id
    /// is fenced.
    fn replace_static(
        &mut self,
        mut member: Member,
        req: &JoinRequest,
        now: Instant,
    ) -> Result<JoinOutcome, oneshot::Receiver<JoinReply>> {
        let id = new_member_id(&req.client_id);
        let old = std::mem::take(&mut member.id);
        let fenced = || {
            BrokerError::new(
                E::FencedInstanceId,
                "a newer member with the same group.instance.id joined",
            )
        };
        if let Some(w) = member.join_waiter.take() {
            let _ = w.send(Err(fenced()));
        }
        if let Some(w) = member.sync_waiter.take() {
            let _ = w.send(Err(fenced()));
        }
        let unchanged = member
            .protocols
            .iter()
            .map(|p| &p.name)
            .eq(req.protocols.iter().map(|p| &p.name))
            && member
                .protocols
                .iter()
                .zip(&req.protocols)
                .all(|(a, b)| a.metadata == b.metadata);
        member.id = id.clone();
        member.client_id = req.client_id.clone();
        member.host = req.host.clone();
        member.protocols = req.protocols.clone();
        member.session_timeout = req.session_timeout;
        member.rebalance_timeout = req.rebalance_timeout.max(req.session_timeout);
        member.last_heard = now;
        let was_leader = self.leader == old;
        if was_leader {
            self.leader = id.clone();
        }
        if let Some(i) = &req.instance_id {
            self.instances.insert(i.clone(), id.clone());
        }
        if self.state == GroupState::Stable && unchanged && !was_leader {
            // Nothing changed for the others: no rebalance, the member syncs to get its
            // assignment back.
            self.members.insert(id.clone(), member);
            self.needs_record = true;
            return Ok(JoinOutcome::Joined(Joined {
                generation: self.generation,
                protocol_type: self.protocol_type.clone(),
                protocol: self.protocol.clone(),
                leader: self.leader.clone(),
                member_id: id,
                members: Vec::new(),
            }));
        }
        let (tx, rx) = oneshot::channel();
        member.joined = true;
        member.join_waiter = Some(tx);
        self.members.insert(id.clone(), member);
        if self.state != GroupState::PreparingRebalance {
            self.prepare_rebalance(now, Some(&id));
        }
        self.maybe_complete_join(now);
        Err(rx)
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
        let longest = self.longest_rebalance_timeout();
        self.deadline = now + longest;
        self.delay_until = if was_empty {
            now + INITIAL_REBALANCE_DELAY.min(longest)
        } else {
            now
        };
        self.state = GroupState::PreparingRebalance;
    }

    fn longest_rebalance_timeout(&self) -> Duration {
        self.members
            .values()
            .map(|m| m.rebalance_timeout)
            .max()
            .unwrap_or(MIN_SESSION_TIMEOUT)
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
        let members = &self.members;
        self.instances.retain(|_, id| members.contains_key(id));
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
            .map(|m| m.protocols.iter().map(|p| p.name.clone()).collect())
            .unwrap_or_default();
        self.protocol = leader_protocols
            .into_iter()
            .find(|p| {
                self.members
                    .values()
                    .all(|m| m.protocols.iter().any(|q| &q.name == p))
            })
            .unwrap_or_default();
        self.state = GroupState::CompletingRebalance;
        self.deadline = now + self.longest_rebalance_timeout();
        let everyone: Vec<JoinedMember> = self
            .members
            .values()
            .map(|m| JoinedMember {
                member_id: m.id.clone(),
                instance_id: m.instance_id.clone(),
                metadata: m.metadata(&self.protocol),
            })
            .collect();
        for m in self.members.values_mut() {
            m.assignment = Bytes::new();
            m.last_heard = now;
            if let Some(w) = m.join_waiter.take() {
                let _ = w.send(Ok(Joined {
                    generation: self.generation,
                    protocol_type: self.protocol_type.clone(),
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

    /// The member a call names, checked: a fenced static member, an unknown member, a stale
    /// generation (`None`: not checked) are refused.
    fn member(&mut self, who: &MemberRef, generation: Option<i32>) -> BrokerResult<&mut Member> {
        if let Some(i) = &who.instance_id
            && let Some(current) = self.instances.get(i)
            && *current != who.member_id
        {
            return refuse(
                E::FencedInstanceId,
                format!(
                    "instance {i} of group {} is now member {current}, not {}",
                    self.name, who.member_id
                ),
            );
        }
        let name = self.name.clone();
        let current = self.generation;
        let m = self.members.get_mut(&who.member_id).ok_or_else(|| {
            BrokerError::new(
                E::UnknownMemberId,
                format!("member {} is not in group {name}", who.member_id),
            )
        })?;
        if let Some(generation) = generation
            && generation != current
        {
            return refuse(
                E::IllegalGeneration,
                format!("generation {generation} is not group {name}'s current {current}"),
            );
        }
        Ok(m)
    }

    /// SyncGroup. `Ok(Ok(bytes))`: the assignment now; `Ok(Err(rx))`: wait for the leader.
    /// When the leader syncs, the group becomes stable and the senders of every waiting
    /// member are returned in `wake` to be answered once the group record is written.
    #[allow(clippy::type_complexity)]
    pub fn sync(
        &mut self,
        req: &SyncRequest,
        now: Instant,
        wake: &mut Vec<(oneshot::Sender<SyncReply>, Bytes)>,
    ) -> BrokerResult<Result<Bytes, oneshot::Receiver<SyncReply>>> {
        let generation = Some(req.member.generation);
        if self.state == GroupState::PreparingRebalance {
            self.member(&req.member, generation)?;
            return refuse(E::RebalanceInProgress, "the group is rebalancing; rejoin");
        }
        if req
            .protocol_type
            .as_ref()
            .is_some_and(|t| *t != self.protocol_type)
            || req.protocol.as_ref().is_some_and(|p| *p != self.protocol)
        {
            return refuse(
                E::InconsistentGroupProtocol,
                format!(
                    "group {} uses protocol {:?} of type {:?}",
                    self.name, self.protocol, self.protocol_type
                ),
            );
        }
        let state = self.state;
        let leader = self.leader.clone();
        let m = self.member(&req.member, generation)?;
        m.last_heard = now;
        if state == GroupState::Stable {
            return Ok(Ok(m.assignment.clone()));
        }
        let (tx, rx) = oneshot::channel();
        if let Some(old) = m.sync_waiter.replace(tx) {
            let _ = old.send(refuse(
                E::RebalanceInProgress,
                "superseded by a newer sync of the same member",
            ));
        }
        if req.member.member_id == leader {
            for (member, assignment) in &req.assignments {
                if let Some(m) = self.members.get_mut(member) {
                    m.assignment = assignment.clone();
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

    pub fn heartbeat(&mut self, who: &MemberRef, now: Instant) -> BrokerResult<()> {
        let state = self.state;
        let m = self.member(who, Some(who.generation))?;
        m.last_heard = now;
        if state == GroupState::PreparingRebalance {
            return refuse(E::RebalanceInProgress, "the group is rebalancing; rejoin");
        }
        Ok(())
    }

    /// A member leaves: by member id, or (a static member) by instance id with the member id
    /// empty or its current one.
    pub fn leave(
        &mut self,
        member_id: &str,
        instance_id: Option<&str>,
        now: Instant,
    ) -> BrokerResult<()> {
        let id = match instance_id {
            Some(i) => match self.instances.get(i) {
                Some(current) if member_id.is_empty() || current == member_id => current.clone(),
                Some(current) => {
                    return refuse(
                        E::FencedInstanceId,
                        format!(
                            "instance {i} of group {} is now member {current}, not {member_id}",
                            self.name
                        ),
                    );
                }
                None => {
                    return refuse(
                        E::UnknownMemberId,
                        format!("instance {i} is not in group {}", self.name),
                    );
                }
            },
            None => member_id.to_string(),
        };
        let Some(mut m) = self.members.remove(&id) else {
            return refuse(
                E::UnknownMemberId,
                format!("member {id} is not in group {}", self.name),
            );
        };
        if let Some(i) = &m.instance_id {
            self.instances.remove(i);
        }
        if let Some(w) = m.join_waiter.take() {
            let _ = w.send(refuse(E::UnknownMemberId, "the member left the group"));
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

    /// Whether a commit by this member (generation -1 and no member: from outside the group,
    /// e.g. a reset or a consumer without group management) is allowed now.
    pub fn may_commit(&mut self, who: &MemberRef, now: Instant) -> BrokerResult<()> {
        if who.generation < 0 && who.member_id.is_empty() {
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
        let m = self.member(who, Some(who.generation))?;
        m.last_heard = now;
        if state == GroupState::CompletingRebalance {
            return refuse(E::RebalanceInProgress, "the group is rebalancing; rejoin");
        }
        Ok(())
    }

    /// Expires members past their session timeout and moves rebalances on.
    pub fn tick(&mut self, now: Instant) {
        let before = self.members.len();
        self.members.retain(|_, m| {
            // A member waiting in JoinGroup is alive.
            m.join_waiter.is_some() || now.duration_since(m.last_heard) < m.session_timeout
        });
        if self.members.len() != before {
            let members = &self.members;
            self.instances.retain(|_, id| members.contains_key(id));
            tracing::info!(group = %self.name, expired = before - self.members.len(), "members' sessions expired");
            self.member_gone(now);
        }
        self.pending.retain(|_, until| *until > now);
        match self.state {
            GroupState::PreparingRebalance => self.maybe_complete_join(now),
            GroupState::CompletingRebalance if now >= self.deadline => {
                // The leader never sent the assignment.
                self.prepare_rebalance(now, None);
            }
            _ => {}
        }
    }

    /// The group has nothing to remember: no member, no member id handed out and not yet
    /// used, no committed offset.
    pub fn is_forgettable(&self) -> bool {
        self.members.is_empty()
            && self.pending.is_empty()
            && self.offsets.is_empty()
            && self.state == GroupState::Empty
    }

    /// The state as Kafka names it (`Dead` for a group with nothing).
    pub fn state_name(&self) -> &'static str {
        if self.is_forgettable() {
            "Dead"
        } else {
            self.state.as_str()
        }
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

    fn join_req(member: &str) -> JoinRequest {
        JoinRequest {
            group: "g".into(),
            member_id: member.into(),
            instance_id: None,
            protocol_type: "consumer".into(),
            protocols: vec![Protocol {
                name: "range".into(),
                metadata: Bytes::copy_from_slice(member.as_bytes()),
            }],
            session_timeout: Duration::from_secs(6),
            rebalance_timeout: Duration::from_secs(10),
            client_id: "c".into(),
            host: "h".into(),
            require_member_id: false,
        }
    }

    fn waiting(
        r: BrokerResult<Result<JoinOutcome, oneshot::Receiver<JoinReply>>>,
    ) -> oneshot::Receiver<JoinReply> {
        match r.unwrap() {
            Err(rx) => rx,
            Ok(o) => panic!("answered at once: {o:?}"),
        }
    }

    fn who(member: &str, generation: i32) -> MemberRef {
        MemberRef {
            member_id: member.into(),
            generation,
            instance_id: None,
        }
    }

    #[test]
    fn members_join_sync_and_a_silent_one_is_expired() {
        let t0 = Instant::now();
        let mut g = Group::new("g", t0);
        let mut a = waiting(g.join(&join_req(""), t0));
        let mut b = waiting(g.join(&join_req(""), t0));
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
        assert_eq!(
            g.heartbeat(&who(&rb.member_id, 0), now).unwrap_err().code,
            E::IllegalGeneration
        );
        // The follower waits for the leader's assignment.
        let mut wake = Vec::new();
        let follower = SyncRequest {
            group: "g".into(),
            member: who(&rb.member_id, 1),
            ..SyncRequest::default()
        };
        let Ok(Err(mut frx)) = g.sync(&follower, now, &mut wake) else {
            panic!("follower should wait")
        };
        let leader = SyncRequest {
            group: "g".into(),
            member: who(&ra.member_id, 1),
            assignments: vec![
                (ra.member_id.clone(), Bytes::from_static(b"A")),
                (rb.member_id.clone(), Bytes::from_static(b"B")),
            ],
            ..SyncRequest::default()
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
        g.heartbeat(&who(&ra.member_id, 1), later).unwrap();
        g.tick(now + Duration::from_secs(7));
        assert_eq!(g.state, GroupState::PreparingRebalance);
        assert_eq!(g.members.len(), 1);
        assert_eq!(
            g.heartbeat(&who(&ra.member_id, 1), now + Duration::from_secs(7))
                .unwrap_err()
                .code,
            E::RebalanceInProgress
        );
        // The leader rejoins alone: generation 2, straight away.
        let mut again = waiting(g.join(&join_req(&ra.member_id), now + Duration::from_secs(8)));
        let r = again.try_recv().unwrap().unwrap();
        assert_eq!(r.generation, 2);
        assert_eq!(r.members.len(), 1);
    }

    #[test]
    fn mismatched_protocols_and_unknown_members_are_refused() {
        let t0 = Instant::now();
        let mut g = Group::new("g", t0);
        let _a = waiting(g.join(&join_req(""), t0));
        let mut other = join_req("");
        other.protocol_type = "connect".into();
        assert_eq!(
            g.join(&other, t0).unwrap_err().code,
            E::InconsistentGroupProtocol
        );
        let mut rr = join_req("");
        rr.protocols[0].name = "roundrobin".into();
        assert_eq!(
            g.join(&rr, t0).unwrap_err().code,
            E::InconsistentGroupProtocol
        );
        assert_eq!(
            g.join(&join_req("nobody"), t0).unwrap_err().code,
            E::UnknownMemberId
        );
        let mut short = join_req("");
        short.session_timeout = Duration::from_millis(10);
        assert_eq!(
            g.join(&short, t0).unwrap_err().code,
            E::InvalidSessionTimeout
        );
        // Commits from outside the group need it to be empty.
        assert_eq!(
            g.may_commit(&who("", -1), t0).unwrap_err().code,
            E::NonEmptyGroup
        );
    }

    #[test]
    fn a_new_member_learns_its_id_first_and_rejoins_with_it() {
        let t0 = Instant::now();
        let mut g = Group::new("g", t0);
        let mut first = join_req("");
        first.require_member_id = true;
        let Ok(Ok(JoinOutcome::MemberIdRequired(id))) = g.join(&first, t0) else {
            panic!("a member id should be required")
        };
        assert!(g.members.is_empty());
        // The coordinator forgets empty groups on its tick; one with an id handed out is kept
        // until that id lapses.
        g.tick(t0 + Duration::from_millis(100));
        assert!(!g.is_forgettable(), "a pending member id is remembered");
        let mut rx = waiting(g.join(&join_req(&id), t0));
        g.tick(t0 + INITIAL_REBALANCE_DELAY);
        assert_eq!(rx.try_recv().unwrap().unwrap().member_id, id);
        // An id never handed out stays unknown; a handed-out one lapses with the session.
        let Ok(Ok(JoinOutcome::MemberIdRequired(late))) = g.join(&first, t0) else {
            panic!("a member id should be required")
        };
        assert_eq!(
            g.join(&join_req(&late), t0 + Duration::from_secs(7))
                .unwrap_err()
                .code,
            E::UnknownMemberId
        );
    }

    #[test]
    fn a_static_member_restarting_keeps_its_assignment_and_fences_its_old_self() {
        let t0 = Instant::now();
        let mut g = Group::new("g", t0);
        let mut a = join_req("");
        a.instance_id = Some("a".into());
        let mut b = join_req("");
        b.instance_id = Some("b".into());
        let mut ra = waiting(g.join(&a, t0));
        let mut rb = waiting(g.join(&b, t0));
        g.tick(t0 + INITIAL_REBALANCE_DELAY);
        let ja = ra.try_recv().unwrap().unwrap();
        let jb = rb.try_recv().unwrap().unwrap();
        let now = t0 + INITIAL_REBALANCE_DELAY;
        let (leader, follower) = if ja.leader == ja.member_id {
            (ja, jb)
        } else {
            (jb, ja)
        };
        let mut wake = Vec::new();
        let sync = SyncRequest {
            group: "g".into(),
            member: who(&leader.member_id, 1),
            assignments: vec![
                (leader.member_id.clone(), Bytes::from_static(b"L")),
                (follower.member_id.clone(), Bytes::from_static(b"F")),
            ],
            ..SyncRequest::default()
        };
        let _ = g.sync(&sync, now, &mut wake).unwrap();
        assert_eq!(g.state, GroupState::Stable);
        // The follower restarts: same instance id, no member id. No rebalance.
        let follower_instance = g.members[&follower.member_id].instance_id.clone();
        let mut again = join_req("");
        again.instance_id = follower_instance.clone();
        again.protocols[0].metadata = Bytes::new();
        let Ok(Ok(JoinOutcome::Joined(j))) = g.join(&again, now) else {
            panic!("a static member with unchanged protocols rejoins at once")
        };
        assert_eq!(j.generation, 1);
        assert_ne!(j.member_id, follower.member_id);
        assert_eq!(g.state, GroupState::Stable);
        let new = MemberRef {
            member_id: j.member_id.clone(),
            generation: 1,
            instance_id: follower_instance.clone(),
        };
        let resync = SyncRequest {
            group: "g".into(),
            member: new.clone(),
            ..SyncRequest::default()
        };
        let Ok(Ok(assignment)) = g.sync(&resync, now, &mut Vec::new()) else {
            panic!("stable group answers at once")
        };
        assert_eq!(assignment, Bytes::from_static(b"F"));
        // The old incarnation is fenced.
        let old = MemberRef {
            member_id: follower.member_id.clone(),
            generation: 1,
            instance_id: follower_instance.clone(),
        };
        assert_eq!(
            g.heartbeat(&old, now).unwrap_err().code,
            E::FencedInstanceId
        );
        // Leaving by instance id alone removes it and rebalances.
        g.leave("", follower_instance.as_deref(), now).unwrap();
        assert_eq!(g.state, GroupState::PreparingRebalance);
        assert_eq!(g.members.len(), 1);
        assert!(g.heartbeat(&new, now).is_err());
    }
}
