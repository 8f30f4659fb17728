//! Node-level liveness: which peers answer right now.
//!
//! Partition groups run without openraft's timers (no heartbeats, no election timeouts; see
//! `src/partitions.rs`): a thousand idle groups would otherwise cost a thousand timers and
//! heartbeat streams per node pair. Instead each node pings every other member over the shared
//! connection (`RaftTransport.Ping`) every `dead_after / 4`, and a peer counts as dead once no
//! ping has been answered for `dead_after`. The partition supervisor calls an election in the
//! groups whose leader's node is dead, and has a leader send a heartbeat to a peer that comes
//! back (so that it learns who leads without an election).
//!
//! A peer that has just been added (or every peer, just after this node started) gets the
//! benefit of the doubt for `dead_after` before it is declared dead.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use aqueduct_protocol::raft::PingRequest;
use aqueduct_protocol::raft::raft_transport_client::RaftTransportClient;

use crate::directory::{Claim, Directory};
use crate::network::{Channels, call_within};

/// What this node knows of one peer.
#[derive(Debug, Clone)]
struct Peer {
    addr: String,
    /// When this node started pinging the peer (at its current address).
    since: Instant,
    /// The last answered ping.
    last_ok: Option<Instant>,
    /// The start of the peer's current run of answered pings.
    alive_since: Option<Instant>,
    /// A ping to the peer is outstanding.
    pinging: bool,
}

impl Peer {
    fn alive(&self, now: Instant, dead_after: Duration) -> bool {
        match self.last_ok {
            Some(ok) => now.duration_since(ok) < dead_after,
            None => now.duration_since(self.since) < dead_after,
        }
    }
}

/// The liveness of a node's peers, shared by everything on the node.
#[derive(Debug, Clone)]
pub struct Liveness {
    me: u64,
    channels: Channels,
    dead_after: Duration,
    peers: Arc<RwLock<HashMap<u64, Peer>>>,
    directory: Directory,
}

impl Liveness {
    pub fn new(me: u64, channels: Channels, dead_after: Duration) -> Self {
        Self::with_directory(me, channels, dead_after, Directory::default())
    }

    /// Liveness whose pings also exchange leaderships and listeners through `directory`.
    pub fn with_directory(
        me: u64,
        channels: Channels,
        dead_after: Duration,
        directory: Directory,
    ) -> Self {
        Self {
            me,
            channels,
            dead_after,
            peers: Arc::default(),
            directory,
        }
    }

    /// The leader directory the pings keep current.
    pub fn directory(&self) -> &Directory {
        &self.directory
    }

    /// How long an unanswering peer takes to count as dead.
    pub fn dead_after(&self) -> Duration {
        self.dead_after
    }

    /// Whether `node` answers (this node always does). A node that is not a peer (not a member,
    /// as far as this node knows) does not.
    pub fn alive(&self, node: u64) -> bool {
        if node == self.me {
            return true;
        }
        let now = Instant::now();
        self.peers
            .read()
            .ok()
            .and_then(|p| p.get(&node).map(|p| p.alive(now, self.dead_after)))
            .unwrap_or(false)
    }

    /// The start of `node`'s current run of answered pings, if it is alive and has answered:
    /// a new value means the peer came back (or was seen for the first time).
    pub fn alive_since(&self, node: u64) -> Option<Instant> {
        let now = Instant::now();
        let peers = self.peers.read().ok()?;
        let p = peers.get(&node)?;
        if p.alive(now, self.dead_after) {
            p.alive_since
        } else {
            None
        }
    }

    /// The peers' ids.
    pub fn peers(&self) -> Vec<u64> {
        self.peers
            .read()
            .map(|p| p.keys().copied().collect())
            .unwrap_or_default()
    }

    /// Makes `members` (id, gRPC address) the peers to ping; this node is left out.
    pub fn set_members(&self, members: impl IntoIterator<Item = (u64, String)>) {
        let now = Instant::now();
        let Ok(mut peers) = self.peers.write() else {
            return;
        };
        let mut keep = HashMap::new();
        for (id, addr) in members {
            if id == self.me {
                continue;
            }
            let peer = match peers.remove(&id) {
                Some(p) if p.addr == addr => p,
                _ => Peer {
                    addr,
                    since: now,
                    last_ok: None,
                    alive_since: None,
                    pinging: false,
                },
            };
            keep.insert(id, peer);
        }
        self.directory.retain(&keep.keys().copied().collect());
        *peers = keep;
    }

    /// Pings every peer every `dead_after / 4`, calling `members` first to refresh the peer
    /// list, until the returned future is dropped.
    pub async fn run<F>(self, members: F)
    where
        F: Fn() -> Vec<(u64, String)>,
    {
        let every = (self.dead_after / 4).max(Duration::from_millis(10));
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.set_members(members());
            let due: Vec<(u64, String)> = match self.peers.write() {
                Ok(mut peers) => peers
                    .iter_mut()
                    .filter(|(_, p)| !p.pinging)
                    .map(|(id, p)| {
                        p.pinging = true;
                        (*id, p.addr.clone())
                    })
                    .collect(),
                Err(_) => return,
            };
            for (id, addr) in due {
                tokio::spawn(self.clone().ping(id, addr));
            }
        }
    }

    /// One ping; an answer from another node id (an address taken over) does not count.
    async fn ping(self, id: u64, addr: String) {
        let answered = match self.channels.get(&addr) {
            Ok(channel) => {
                let mut client = RaftTransportClient::new(channel);
                let request = PingRequest {
                    from: self.me,
                    leaderships_version: self.directory.known_version(id),
                };
                let reply = call_within(self.dead_after / 2, request, |r| client.ping(r)).await;
                match reply {
                    Ok(r) if r.node_id == id => {
                        let claims = r.leaderships_included.then(|| {
                            r.leaderships
                                .into_iter()
                                .map(|l| Claim {
                                    topic: l.topic,
                                    partition: l.partition,
                                    term: l.term,
                                })
                                .collect()
                        });
                        self.directory.heard(
                            id,
                            r.incarnation,
                            r.leaderships_version,
                            claims,
                            r.listeners.into_iter().collect(),
                        );
                        true
                    }
                    _ => false,
                }
            }
            Err(_) => false,
        };
        let now = Instant::now();
        if let Ok(mut peers) = self.peers.write()
            && let Some(p) = peers.get_mut(&id)
            && p.addr == addr
        {
            p.pinging = false;
            if answered {
                let was_alive = p
                    .last_ok
                    .is_some_and(|ok| now.duration_since(ok) < self.dead_after);
                if !was_alive {
                    p.alive_since = Some(now);
                }
                p.last_ok = Some(now);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_is_alive_while_it_answers_and_for_a_grace_period_at_first() {
        let dead_after = Duration::from_millis(600);
        let t0 = Instant::now();
        let mut p = Peer {
            addr: "x".into(),
            since: t0,
            last_ok: None,
            alive_since: None,
            pinging: false,
        };
        assert!(p.alive(t0 + Duration::from_millis(100), dead_after));
        assert!(!p.alive(t0 + Duration::from_millis(700), dead_after));
        p.last_ok = Some(t0 + Duration::from_millis(650));
        assert!(p.alive(t0 + Duration::from_millis(700), dead_after));
        assert!(!p.alive(t0 + Duration::from_millis(1300), dead_after));
    }

    #[tokio::test]
    async fn only_members_are_peers_and_this_node_is_always_alive() {
        let l = Liveness::new(1, Channels::default(), Duration::from_millis(600));
        l.set_members([(1, "a:1".to_string()), (2, "b:1".to_string())]);
        assert!(l.alive(1));
        assert!(l.alive(2), "a new peer gets a grace period");
        assert!(!l.alive(3), "not a member");
        assert_eq!(l.alive_since(2), None, "not answered yet");
        l.set_members([(1, "a:1".to_string())]);
        assert!(!l.alive(2), "removed");
    }
}
