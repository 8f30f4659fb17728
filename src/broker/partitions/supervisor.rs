//! One loop per node that keeps every local partition group led and on its assignment.
//!
//! Partition groups run with openraft's timers off (`enable_tick = false`): an idle group
//! costs nothing, no heartbeats cross the network and no timer fires (a thousand ticking
//! groups kept a whole core busy on an idle node). What the timers did is done here, for all
//! groups at once, every `dead_after / 4`, from node-level liveness ([`Liveness`], one ping
//! per node pair):
//!
//! * **Elections.** A voter whose leader's node is dead, or that knows no leader, calls an
//!   election. The replicas of a partition take turns in the order of its assignment (the
//!   preferred replica first), `dead_after` apart, so that one candidate usually runs alone; a
//!   replica that knows no leader first waits `dead_after` to hear from one (a leader sends a
//!   heartbeat to every node that comes back), except in a group that never had one.
//! * **Heartbeats on return.** A leader sends a heartbeat in every group it shares with a
//!   peer that has just come back (or been seen for the first time), so that the peer learns
//!   the leader without an election.
//! * **Moves and preferred leaders.** Every second, the leaders of moving partitions take a
//!   step of the move ([`move_replicas`]); every 3 seconds, a leader that is not its
//!   partition's preferred replica hands over to it when it is alive and caught up. Both run
//!   as their own tasks, at most one per group, so a slow membership change does not hold
//!   elections up.
//!
//! The assignments come from the metadata state, read again only when the metadata group has
//! applied something new.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aqueduct_raft::liveness::Liveness;
use aqueduct_raft::network::MetaRaft;
use aqueduct_raft::types::GroupTypeConfig;
use openraft::Instant as _;
use openraft::ServerState;
use openraft::async_runtime::WatchReceiver as _;
use openraft::error::Fatal;
use openraft::raft::TransferLeaderRequest;

use super::{
    LEADER_LEASE, Partitions, Replica, Result, group_name, move_replicas, restore_preferred_leader,
};

/// How often leaders of moving partitions take a step of the move.
const MOVE_EVERY: Duration = Duration::from_secs(1);

/// How often leaders check that leadership is with the preferred replica.
const PREFERRED_EVERY: Duration = Duration::from_secs(3);

/// One partition's assignment, as the supervisor last read it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Assignment {
    /// The assigned replicas, the preferred one first.
    replicas: Vec<u64>,
    /// Whether a move is under way.
    moving: bool,
}

/// The order in which a partition's voters stand for election: the assignment's order (the
/// preferred replica first), then voters outside it, leaving out `dead` ones.
fn candidates(assigned: &[u64], voters: &[u64], alive: impl Fn(u64) -> bool) -> Vec<u64> {
    let mut order: Vec<u64> = assigned
        .iter()
        .copied()
        .filter(|id| voters.contains(id))
        .collect();
    order.extend(voters.iter().copied().filter(|v| !assigned.contains(v)));
    order.retain(|id| alive(*id));
    order
}

/// How long a voter with `rank` in [`candidates`] waits, once its group lost its leader (or
/// never heard of one), before it calls an election.
fn election_wait(
    rank: usize,
    leader_known: bool,
    ever_led: bool,
    dead_after: Duration,
) -> Duration {
    let settle = if leader_known || !ever_led {
        Duration::ZERO
    } else {
        dead_after
    };
    settle + dead_after * rank as u32
}

/// Calls an election as a leadership transfer from the leader this replica last voted for (a
/// dead one) to itself: the other voters grant it although they heard from that leader within
/// its lease ([`LEADER_LEASE`]), as long as this replica's log is as complete as theirs.
async fn take_over(r: &Replica, me: u64) -> std::result::Result<(), Fatal<GroupTypeConfig>> {
    let vote = r.raft.with_raft_state(|st| *st.vote_ref()).await?;
    let _answer = r
        .raft
        .handle_transfer_leader(TransferLeaderRequest::new(vote, me, None))
        .await?;
    Ok(())
}

/// A spread of up to a quarter of `dead_after`, fixed per group and node, so that two replicas
/// that rank themselves alike (their liveness views differ) do not stand at the same moment.
fn jitter(group: &str, me: u64, dead_after: Duration) -> Duration {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (group, me).hash(&mut h);
    let quarter = (dead_after.as_millis() as u64 / 4).max(1);
    Duration::from_millis(h.finish() % quarter)
}

/// The per-node supervisor state (see the module doc).
struct Supervisor {
    partitions: Partitions,
    liveness: Liveness,
    /// By group name.
    assignments: HashMap<String, Assignment>,
    /// The metadata log index the assignments were read at.
    read_at: Option<u64>,
    /// Groups without a (live) leader, and since when.
    leaderless: HashMap<String, Instant>,
    /// When this node last called an election in a group.
    elected: HashMap<String, Instant>,
    /// When this node last sent a heartbeat in a group it leads.
    heartbeats: HashMap<String, Instant>,
    /// The start of each peer's current run of answered pings, as last seen.
    seen_alive: HashMap<u64, Instant>,
    /// Groups with a move or handover task running.
    busy: Arc<Mutex<HashSet<String>>>,
    last_move: Instant,
    last_preferred: Instant,
    last_pass: Instant,
}

impl Partitions {
    /// Runs the supervisor (see the module doc) until `meta_raft` shuts down.
    pub async fn supervise(self, meta_raft: MetaRaft, liveness: Liveness) {
        let every = (liveness.dead_after() / 4).max(Duration::from_millis(10));
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let now = Instant::now();
        let mut s = Supervisor {
            partitions: self,
            liveness,
            assignments: HashMap::new(),
            read_at: None,
            leaderless: HashMap::new(),
            elected: HashMap::new(),
            heartbeats: HashMap::new(),
            seen_alive: HashMap::new(),
            busy: Arc::default(),
            last_move: now,
            last_preferred: now,
            last_pass: now,
        };
        let metrics = meta_raft.metrics();
        loop {
            tick.tick().await;
            let applied = {
                let m = metrics.borrow_watched();
                if m.running_state.is_err() {
                    return;
                }
                m.last_applied.map(|l| l.index)
            };
            if applied != s.read_at {
                match s.read_assignments() {
                    Ok(a) => {
                        s.assignments = a;
                        s.read_at = applied;
                    }
                    Err(e) => tracing::warn!(err = %e, "reading partition assignments"),
                }
            }
            s.pass().await;
        }
    }
}

impl Supervisor {
    fn read_assignments(&self) -> Result<HashMap<String, Assignment>> {
        let sm = self.partitions.metadata();
        let mut out = HashMap::new();
        for topic in sm.topics()? {
            for p in 0..topic.partitions {
                let Some(replicas) = sm.replicas(&topic.name, p)? else {
                    continue;
                };
                let moving = sm.moving_from(&topic.name, p)?.is_some();
                out.insert(
                    group_name(&topic.name, p, topic.id),
                    Assignment { replicas, moving },
                );
            }
        }
        Ok(out)
    }

    /// Peers that came back (or answered for the first time) since the last pass.
    fn revived(&mut self) -> Vec<u64> {
        let mut back = Vec::new();
        for id in self.liveness.peers() {
            match self.liveness.alive_since(id) {
                Some(t) if self.seen_alive.get(&id) != Some(&t) => {
                    self.seen_alive.insert(id, t);
                    back.push(id);
                }
                Some(_) => {}
                None => {
                    self.seen_alive.remove(&id);
                }
            }
        }
        back
    }

    async fn pass(&mut self) {
        let now = Instant::now();
        let me = self.partitions.node_id();
        let dead_after = self.liveness.dead_after();
        let revived = self.revived();
        // A pass long overdue means this process did not run for a while (frozen, or starved):
        // the others may have elected new leaders meanwhile, so every group this node leads
        // sends a heartbeat at once, and steps down on the answer if it was replaced.
        let stalled = now.duration_since(self.last_pass) > dead_after;
        self.last_pass = now;
        let moves = now.duration_since(self.last_move) >= MOVE_EVERY;
        if moves {
            self.last_move = now;
        }
        let preferred = now.duration_since(self.last_preferred) >= PREFERRED_EVERY;
        if preferred {
            self.last_preferred = now;
        }
        let replicas = self.partitions.all();
        // The groups this node leads, published to the leader directory (node pings carry it).
        let mut claims = Vec::new();
        for r in &replicas {
            // The common cases (following a live leader; leading) read the metrics without
            // copying anything out of them.
            let (state, leader, term, ack_age, revived_member) = {
                let m = r.raft.metrics();
                let m = m.borrow_watched();
                if m.running_state.is_err() {
                    continue;
                }
                let membership = m.membership_config.membership();
                (
                    m.state,
                    m.current_leader,
                    m.current_term,
                    m.last_quorum_acked.as_ref().map(|t| t.elapsed()),
                    revived.iter().any(|p| membership.get_node(p).is_some()),
                )
            };
            let leading = leader == Some(me) && state == ServerState::Leader;
            let led = !leading && leader.is_some_and(|l| l != me && self.liveness.alive(l));
            if (leading || led) && !self.leaderless.is_empty() {
                self.leaderless.remove(&r.group);
            }
            if led {
                continue;
            }
            if leading {
                claims.push(aqueduct_raft::directory::Claim {
                    topic: r.topic.clone(),
                    partition: r.partition,
                    term,
                });
                self.lead(r, ack_age, revived_member || stalled, moves, preferred, now)
                    .await;
                continue;
            }
            // No live leader known.
            let voters: Vec<u64> = {
                let m = r.raft.metrics();
                let m = m.borrow_watched();
                m.membership_config.membership().voter_ids().collect()
            };
            let assignment = self.assignments.get(&r.group);
            if voters.is_empty() {
                // A new group nobody has reached yet (the preferred replica initializes it).
                if let Some(a) = assignment.filter(|a| !a.moving) {
                    self.initialize_late(r, &a.replicas.clone(), now).await;
                }
                continue;
            }
            // Standing is pointless without a live majority of voters (it would only raise
            // the term, again and again, while a node is down): wait for one.
            let alive = voters
                .iter()
                .filter(|v| **v == me || self.liveness.alive(**v))
                .count();
            if !voters.contains(&me) || state == ServerState::Leader || alive * 2 <= voters.len() {
                self.leaderless.remove(&r.group);
                continue;
            }
            let since = *self.leaderless.entry(r.group.clone()).or_insert(now);
            let assigned = assignment.map_or(&[][..], |a| &a.replicas[..]);
            let order = candidates(assigned, &voters, |id| {
                Some(id) != leader && self.liveness.alive(id)
            });
            let rank = order.iter().position(|id| *id == me).unwrap_or(order.len());
            let wait = election_wait(rank, leader.is_some(), term > 0, dead_after)
                + jitter(&r.group, me, dead_after);
            let recently = self
                .elected
                .get(&r.group)
                .is_some_and(|t| now.duration_since(*t) < dead_after / 2);
            if now.duration_since(since) >= wait && !recently {
                tracing::info!(
                    topic = %r.topic,
                    partition = r.partition,
                    leader = ?leader,
                    term,
                    "partition leader lost: calling an election"
                );
                self.elected.insert(r.group.clone(), now);
                if let Err(e) = take_over(r, me).await {
                    tracing::debug!(group = %r.group, err = %e, "calling an election");
                }
            }
        }
        self.liveness.directory().publish(claims);
        if moves {
            let live: HashSet<&str> = replicas.iter().map(|r| r.group.as_str()).collect();
            self.leaderless.retain(|g, _| live.contains(g.as_str()));
            self.elected.retain(|g, _| live.contains(g.as_str()));
            self.heartbeats.retain(|g, _| live.contains(g.as_str()));
        }
    }

    /// What a leader does each pass: a heartbeat (`now_heartbeat`: a peer came back, or this
    /// node did not run for a while) tells the others who leads, and renews
    /// the lease of a leader nobody acknowledged for a while (an idle group, or a leader that
    /// restarted as leader); every [`MOVE_EVERY`] a step of a move, every [`PREFERRED_EVERY`]
    /// a handover to the preferred replica.
    async fn lead(
        &mut self,
        r: &Arc<Replica>,
        ack_age: Option<Duration>,
        now_heartbeat: bool,
        moves: bool,
        preferred: bool,
        now: Instant,
    ) {
        let me = self.partitions.node_id();
        let renew = ack_age.is_none_or(|age| age >= LEADER_LEASE / 4)
            && self
                .heartbeats
                .get(&r.group)
                .is_none_or(|t| now.duration_since(*t) >= self.liveness.dead_after());
        if now_heartbeat || renew {
            self.heartbeats.insert(r.group.clone(), now);
            if let Err(e) = r.raft.trigger().heartbeat().await {
                tracing::debug!(group = %r.group, err = %e, "heartbeat");
            }
        }
        if !(moves || preferred) {
            return;
        }
        let Some(a) = self.assignments.get(&r.group) else {
            return;
        };
        if moves && a.moving {
            let (r, meta) = (Arc::clone(r), self.partitions.metadata().clone());
            let channels = self.partitions.channels().clone();
            self.spawn(&r.group.clone(), async move {
                if let Err(e) = move_replicas(&r, &meta, &channels).await {
                    tracing::warn!(topic = %r.topic, partition = r.partition, err = %e, "moving replicas");
                }
            });
        } else if preferred
            && !a.moving
            && let Some(&first) = a.replicas.first()
            && first != me
        {
            let (r, liveness) = (Arc::clone(r), self.liveness.clone());
            self.spawn(&r.group.clone(), async move {
                if let Err(e) = restore_preferred_leader(&r, first, &liveness).await {
                    tracing::debug!(topic = %r.topic, partition = r.partition, err = %e, "preferred leader check");
                }
            });
        }
    }

    /// Initializes a new group that the replicas before this one in the assignment have not
    /// formed: `dead_after` per replica ahead of this one that answers pings.
    async fn initialize_late(&mut self, r: &Arc<Replica>, assigned: &[u64], now: Instant) {
        let me = self.partitions.node_id();
        let dead_after = self.liveness.dead_after();
        let since = *self.leaderless.entry(r.group.clone()).or_insert(now);
        let order = candidates(assigned, assigned, |id| self.liveness.alive(id));
        let rank = order.iter().position(|id| *id == me).unwrap_or(order.len());
        let wait = dead_after * (rank as u32 + 1) + jitter(&r.group, me, dead_after);
        let recently = self
            .elected
            .get(&r.group)
            .is_some_and(|t| now.duration_since(*t) < dead_after);
        if now.duration_since(since) < wait || recently {
            return;
        }
        self.elected.insert(r.group.clone(), now);
        tracing::info!(topic = %r.topic, partition = r.partition, "forming a partition group its first replicas did not");
        if let Err(e) = self.partitions.initialize(r, assigned).await {
            tracing::warn!(topic = %r.topic, partition = r.partition, err = %e, "forming a partition group");
        }
    }

    /// Runs `task` for `group` unless one is still running.
    fn spawn(&self, group: &str, task: impl std::future::Future<Output = ()> + Send + 'static) {
        let Ok(mut busy) = self.busy.lock() else {
            return;
        };
        if !busy.insert(group.to_string()) {
            return;
        }
        let (busy, group) = (Arc::clone(&self.busy), group.to_string());
        tokio::spawn(async move {
            task.await;
            if let Ok(mut b) = busy.lock() {
                b.remove(&group);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_preferred_live_replica_stands_first() {
        let alive = |id: u64| id != 1;
        assert_eq!(candidates(&[1, 2, 3], &[1, 2, 3], alive), vec![2, 3]);
        assert_eq!(candidates(&[3, 1, 2], &[1, 2, 3], alive), vec![3, 2]);
        // A voter outside the assignment (a move under way) stands last.
        assert_eq!(candidates(&[2, 3], &[1, 2, 3, 4], alive), vec![2, 3, 4]);
        // A learner never stands.
        assert_eq!(candidates(&[4, 2, 3], &[2, 3], |_| true), vec![2, 3]);
    }

    #[test]
    fn later_candidates_wait_longer_and_a_group_that_knew_no_leader_waits_to_hear() {
        let d = Duration::from_millis(600);
        assert_eq!(election_wait(0, true, true, d), Duration::ZERO);
        assert_eq!(election_wait(1, true, true, d), d);
        assert_eq!(election_wait(0, false, true, d), d);
        assert_eq!(election_wait(0, false, false, d), Duration::ZERO);
        assert_eq!(election_wait(2, false, true, d), d * 3);
        assert!(jitter("p/t/0/1", 1, d) < d / 4);
    }
}
