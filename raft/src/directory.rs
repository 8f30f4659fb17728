//! The leader directory: which node leads every partition, and each node's client listeners,
//! known on every node without a request per partition.
//!
//! Each node publishes the partition groups it leads (with the Raft term) and its listeners
//! ([`Directory::publish`], [`Directory::set_listeners`]); the publication has a version that
//! changes with every change and starts from a random base when the node starts. Node pings
//! (`liveness.rs`) carry the version the pinger holds, and the answer carries the whole list
//! only when that version is stale, so an idle cluster exchanges no lists at all.
//!
//! A partition's leader is the claim with the highest term among the nodes that answer pings
//! (an old leader cut off from the others still claims its old term, and loses to the new
//! one). The caller prefers what a local replica knows of its own group.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, RwLock};

/// One partition this node leads.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Claim {
    pub topic: String,
    pub partition: u32,
    pub term: u64,
}

#[derive(Debug, Default)]
struct Published {
    version: u64,
    claims: Arc<Vec<Claim>>,
    listeners: HashMap<String, String>,
}

#[derive(Debug, Default, Clone)]
struct Peer {
    /// The peer's incarnation (0: not heard yet).
    incarnation: u64,
    version: u64,
    claims: Arc<Vec<Claim>>,
    listeners: HashMap<String, String>,
}

/// This node's publication and what it heard from its peers (cheap to clone: clones share).
#[derive(Debug, Clone)]
pub struct Directory {
    /// This process's incarnation: ms since the epoch when it started, new on every start.
    incarnation: u64,
    own: Arc<RwLock<Published>>,
    peers: Arc<RwLock<HashMap<u64, Peer>>>,
}

impl Default for Directory {
    fn default() -> Self {
        let since = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let base = since.as_nanos() as u64 | 1;
        Self {
            incarnation: (since.as_millis() as u64).max(1),
            own: Arc::new(RwLock::new(Published {
                version: base,
                ..Published::default()
            })),
            peers: Arc::default(),
        }
    }
}

impl Directory {
    /// Replaces this node's claims; the version changes only if they did.
    pub fn publish(&self, mut claims: Vec<Claim>) {
        claims.sort();
        if let Ok(mut own) = self.own.write()
            && *own.claims != claims
        {
            own.claims = Arc::new(claims);
            own.version = own.version.wrapping_add(1).max(1);
        }
    }

    /// Sets this node's client listeners (protocol → `HOST:PORT`).
    pub fn set_listeners(&self, listeners: HashMap<String, String>) {
        if let Ok(mut own) = self.own.write() {
            own.listeners = listeners;
        }
    }

    /// This node's listeners.
    pub fn own_listeners(&self) -> HashMap<String, String> {
        self.own
            .read()
            .map(|o| o.listeners.clone())
            .unwrap_or_default()
    }

    /// What a ping answers: (version, claims if `known` is stale, listeners).
    pub fn answer(&self, known: u64) -> (u64, Option<Arc<Vec<Claim>>>, HashMap<String, String>) {
        match self.own.read() {
            Ok(own) => (
                own.version,
                (own.version != known).then(|| Arc::clone(&own.claims)),
                own.listeners.clone(),
            ),
            Err(_) => (0, None, HashMap::new()),
        }
    }

    /// The version of `node`'s claims held here (0: none).
    pub fn known_version(&self, node: u64) -> u64 {
        self.peers
            .read()
            .ok()
            .and_then(|p| p.get(&node).map(|p| p.version))
            .unwrap_or(0)
    }

    /// This process's incarnation (new on every start of the node).
    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }

    /// The incarnation `node` last answered a ping with, if it has (this process's own
    /// under `me`).
    pub fn incarnation_of(&self, me: u64, node: u64) -> Option<u64> {
        if node == me {
            return Some(self.incarnation);
        }
        let peers = self.peers.read().ok()?;
        peers.get(&node).map(|p| p.incarnation).filter(|i| *i != 0)
    }

    /// Records a ping answer from `node` (incarnation 0: a node too old to say).
    pub fn heard(
        &self,
        node: u64,
        incarnation: u64,
        version: u64,
        claims: Option<Vec<Claim>>,
        listeners: HashMap<String, String>,
    ) {
        if let Ok(mut peers) = self.peers.write() {
            let peer = peers.entry(node).or_default();
            if incarnation != 0 {
                peer.incarnation = incarnation;
            }
            if let Some(claims) = claims {
                peer.claims = Arc::new(claims);
                peer.version = version;
            }
            peer.listeners = listeners;
        }
    }

    /// Forgets the nodes not in `members`.
    pub fn retain(&self, members: &BTreeSet<u64>) {
        if let Ok(mut peers) = self.peers.write() {
            peers.retain(|id, _| members.contains(id));
        }
    }

    /// `node`'s listener for `protocol` (this node's own when `node == me`).
    pub fn listener(&self, me: u64, node: u64, protocol: &str) -> Option<String> {
        if node == me {
            return self.own.read().ok()?.listeners.get(protocol).cloned();
        }
        self.peers
            .read()
            .ok()?
            .get(&node)?
            .listeners
            .get(protocol)
            .cloned()
    }

    /// The leader of every partition claimed by a node for which `alive` holds (this node's
    /// own claims included under `me`): (topic, partition) → (node, term), highest term
    /// winning.
    pub fn leaders(
        &self,
        me: u64,
        alive: impl Fn(u64) -> bool,
    ) -> HashMap<(String, u32), (u64, u64)> {
        let mut out: HashMap<(String, u32), (u64, u64)> = HashMap::new();
        let mut add = |node: u64, claims: &[Claim]| {
            for c in claims {
                let slot = out
                    .entry((c.topic.clone(), c.partition))
                    .or_insert((node, 0));
                if c.term >= slot.1 {
                    *slot = (node, c.term);
                }
            }
        };
        if let Ok(own) = self.own.read() {
            add(me, &own.claims);
        }
        if let Ok(peers) = self.peers.read() {
            for (id, p) in peers.iter() {
                if *id != me && alive(*id) {
                    add(*id, &p.claims);
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(topic: &str, partition: u32, term: u64) -> Claim {
        Claim {
            topic: topic.into(),
            partition,
            term,
        }
    }

    #[test]
    fn the_highest_term_among_live_claims_leads() {
        let d = Directory::default();
        d.publish(vec![claim("t", 0, 3)]);
        d.heard(
            2,
            50,
            7,
            Some(vec![claim("t", 0, 4), claim("t", 1, 1)]),
            HashMap::new(),
        );
        d.heard(3, 0, 9, Some(vec![claim("t", 1, 2)]), HashMap::new());
        // Incarnations: as answered, none from a node too old to say, and this process's.
        assert_eq!(d.incarnation_of(1, 2), Some(50));
        assert_eq!(d.incarnation_of(1, 3), None);
        assert_eq!(d.incarnation_of(1, 1), Some(d.incarnation()));
        let all = d.leaders(1, |_| true);
        assert_eq!(all[&("t".to_string(), 0)], (2, 4));
        assert_eq!(all[&("t".to_string(), 1)], (3, 2));
        // A dead node's claims do not count.
        let some = d.leaders(1, |n| n != 3);
        assert_eq!(some[&("t".to_string(), 1)], (2, 1));
        assert_eq!(some[&("t".to_string(), 0)], (2, 4));
    }

    #[test]
    fn the_list_travels_only_when_the_pinger_holds_a_stale_version() {
        let d = Directory::default();
        let (v1, claims, _) = d.answer(0);
        assert!(claims.is_some());
        assert!(d.answer(v1).1.is_none(), "up to date: no list");
        d.publish(vec![]);
        assert_eq!(d.answer(v1).0, v1, "nothing changed: same version");
        d.publish(vec![claim("t", 0, 1)]);
        let (v2, claims, _) = d.answer(v1);
        assert_ne!(v1, v2);
        assert_eq!(claims.map(|c| c.len()), Some(1));
    }
}
