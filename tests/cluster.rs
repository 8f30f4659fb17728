//! Multi-process cluster tests: real `aqueduct serve` processes on 127.0.0.x with their default
//! ports (each node has its own loopback address, as `--listen-host` promises), driven through
//! the real CLI. They are serialized (one lock) and each uses its own addresses and temporary
//! directories.
//!
//! * three nodes bootstrapped by `--join`, the metadata leader SIGKILLed and restarted
//!   repeatedly while metadata writes (topic creations) run: no acknowledged write lost, every
//!   node converges to the same state (applied index and state checksum);
//! * a full-cluster restart (SIGKILL of every node) keeps everything;
//! * `cluster remove-node` leaves a working two-node cluster; bad requests fail with one line.
//!
//! `AQ_CLUSTER_KILLS` sets the number of leader kills (default 5).

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::sleep;
use std::time::{Duration, Instant};

use common::{Cluster, NodeProc, aqueduct, serial, stderr_line};
use serde_json::Value;

/// Creates topics `w-0, w-1, …` until `stop`; returns (acknowledged, attempted).
fn write_topics(servers: String, stop: Arc<AtomicBool>) -> (Vec<String>, usize) {
    let mut acked = Vec::new();
    let mut attempted = 0;
    while !stop.load(Ordering::Relaxed) {
        let name = format!("w-{attempted}");
        attempted += 1;
        let out = aqueduct()
            .args([
                "topic",
                "create",
                &name,
                // One single-replica partition each: the point is the metadata writes, not
                // hundreds of partition groups competing for two cores.
                "--partitions",
                "1",
                "--replication-factor",
                "1",
                "--timeout",
                "20",
                "--server",
                &servers,
            ])
            .output()
            .unwrap();
        if out.status.success() {
            acked.push(name);
        }
    }
    (acked, attempted)
}

#[test]
fn leader_kills_under_metadata_writes_lose_nothing_and_nodes_converge() {
    let _serial = serial();
    let kills: usize = std::env::var("AQ_CLUSTER_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let mut cluster = Cluster::start(&["127.0.1.1", "127.0.1.2", "127.0.1.3"]);

    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let servers = cluster.servers();
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || write_topics(servers, stop))
    };
    for round in 0..kills {
        sleep(Duration::from_millis(1500));
        let leader = cluster.leader();
        eprintln!("round {round}: SIGKILL metadata leader node {leader}");
        cluster.node(leader).kill();
        // The other two elect a new leader and keep taking writes while it is down.
        let deadline = Instant::now() + Duration::from_secs(30);
        let new_leader = loop {
            let l = cluster.leader();
            if l != leader {
                break l;
            }
            assert!(
                Instant::now() < deadline,
                "no new leader after killing {leader}"
            );
            sleep(Duration::from_millis(200));
        };
        eprintln!("round {round}: node {new_leader} took over");
        sleep(Duration::from_millis(1000));
        cluster.node(leader).start();
        cluster.wait_members(3, Duration::from_secs(60));
    }
    sleep(Duration::from_millis(1000));
    stop.store(true, Ordering::Relaxed);
    let (acked, attempted) = writer.join().unwrap();
    eprintln!(
        "{} of {attempted} topic creations acknowledged",
        acked.len()
    );
    assert!(
        acked.len() >= 10 * kills,
        "too few writes acknowledged ({} of {attempted})\n{}",
        acked.len(),
        cluster.logs()
    );

    let status = cluster.wait_converged(Duration::from_secs(60));
    let topics = cluster.topics();
    let lost: Vec<&String> = acked.iter().filter(|t| !topics.contains(*t)).collect();
    assert!(lost.is_empty(), "acknowledged topics lost: {lost:?}");
    for n in status["nodes"].as_array().unwrap() {
        assert!(n["records"].as_u64().unwrap() >= acked.len() as u64);
    }
    for node in &mut cluster.nodes {
        assert!(node.running(), "node {} died\n{}", node.id, node.log_tail());
    }
}

#[test]
fn full_cluster_restart_keeps_everything() {
    let _serial = serial();
    let mut cluster = Cluster::start(&["127.0.2.1", "127.0.2.2", "127.0.2.3"]);
    for name in ["orders", "payments", "audit.log"] {
        let out = cluster.cli(&[
            "topic",
            "create",
            name,
            "--partitions",
            "4",
            "--replication-factor",
            "2",
            "--config",
            "retention.ms=60000",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let before = cluster.wait_converged(Duration::from_secs(30));
    let topics_before = cluster.cli(&["topic", "list", "--output", "json"]).stdout;

    for node in &mut cluster.nodes {
        node.kill();
    }
    for node in &mut cluster.nodes {
        node.start();
    }
    cluster.wait_members(3, Duration::from_secs(60));
    let after = cluster.wait_converged(Duration::from_secs(60));
    assert_eq!(
        after["nodes"][0]["state_checksum"], before["nodes"][0]["state_checksum"],
        "metadata changed across the restart"
    );
    let topics_after = cluster.cli(&["topic", "list", "--output", "json"]).stdout;
    assert_eq!(
        String::from_utf8_lossy(&topics_after),
        String::from_utf8_lossy(&topics_before)
    );
    // And the cluster still takes writes.
    let out = cluster.cli(&["topic", "create", "after-restart"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A voter whose data directory was wiped cannot come back as if nothing happened: its
    // vote and log are gone. Asked to join, the cluster refuses and the node exits.
    let node = cluster.node(3);
    node.kill();
    std::fs::remove_dir_all(&node.data_dir).unwrap();
    node.start();
    let exit = node.wait_exit(Duration::from_secs(30));
    assert_eq!(exit.and_then(|s| s.code()), Some(1), "{}", node.log_tail());
    let log = std::fs::read_to_string(&node.log).unwrap();
    assert!(log.contains("REJOIN_WITHOUT_STATE"), "{}", node.log_tail());
}

#[test]
fn remove_node_leaves_a_working_two_node_cluster() {
    let _serial = serial();
    let mut cluster = Cluster::start(&["127.0.3.1", "127.0.3.2", "127.0.3.3"]);
    // Removing the leader itself: it hands leadership over first.
    let victim = cluster.leader();

    let out = cluster.cli(&[
        "cluster",
        "remove-node",
        &victim.to_string(),
        "--output",
        "json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["removed"], victim);
    let log = std::fs::read_to_string(&cluster.node(victim).log).unwrap();
    assert!(
        log.contains("transferring metadata leadership"),
        "the leader did not hand over before its removal:\n{log}"
    );
    // Repeating the removal (as after a lost reply) succeeds: the node is already gone.
    let out = cluster.cli(&["cluster", "remove-node", &victim.to_string()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The removed node keeps running for a while but never campaigns: the term and the
    // leader stay put across several election timeouts.
    let victim_addr = cluster.node(victim).grpc();
    let others: Vec<String> = cluster
        .nodes
        .iter()
        .map(NodeProc::grpc)
        .filter(|a| *a != victim_addr)
        .collect();
    let others = others.join(",");
    let status = |servers: &str| -> Value {
        let out = aqueduct()
            .args(["cluster", "status", "--output", "json", "--server", servers])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let before = status(&others);
    sleep(Duration::from_secs(4));
    let after = status(&others);
    assert_eq!(
        (&before["term"], &before["leader_id"]),
        (&after["term"], &after["leader_id"]),
        "the removed node disturbed the cluster"
    );
    cluster.node(victim).kill();
    cluster.nodes.retain(|n| n.id != victim);

    let status = cluster.wait_members(2, Duration::from_secs(30));
    let ids: BTreeSet<u64> = status["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["node_id"].as_u64().unwrap())
        .collect();
    assert!(!ids.contains(&victim));

    // The two-node cluster takes writes, and keeps taking them after losing its leader's
    // process for a moment (both nodes are needed for a quorum, so it waits for the restart).
    let out = cluster.cli(&["topic", "create", "two-nodes", "--replication-factor", "2"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let leader = cluster.leader();
    cluster.node(leader).kill();
    cluster.node(leader).start();
    cluster.wait_members(2, Duration::from_secs(60));
    let out = cluster.cli(&["topic", "create", "two-nodes-again"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(cluster.topics().contains("two-nodes"));
    cluster.wait_converged(Duration::from_secs(30));

    // A new node joins the two (as the third voter), and removing that follower brings the
    // cluster back to the same two nodes.
    let first = cluster.nodes[0].grpc();
    let mut joined = NodeProc::new(4, "127.0.3.4", cluster.dir.path(), Some(first));
    joined.start();
    cluster.nodes.push(joined);
    cluster.wait_members(3, Duration::from_secs(60));
    let out = cluster.cli(&["cluster", "remove-node", "4"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    cluster.node(4).kill();
    cluster.nodes.retain(|n| n.id != 4);
    cluster.wait_members(2, Duration::from_secs(30));
    let out = cluster.cli(&["topic", "create", "after-follower-removal"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    cluster.wait_converged(Duration::from_secs(30));

    // Refusals: one line, non-zero exit, stable code.
    let out = cluster.cli(&["cluster", "remove-node", "99"]);
    assert!(!out.status.success());
    assert!(stderr_line(&out).contains("UNKNOWN_NODE"));
    let out = cluster.cli(&["topic", "create", "two-nodes"]);
    assert!(!out.status.success());
    assert!(stderr_line(&out).contains("TOPIC_EXISTS"));
    let out = cluster.cli(&["topic", "create", "__reserved"]);
    assert!(!out.status.success());
    assert!(stderr_line(&out).contains("INVALID_TOPIC_NAME"));
    let out = cluster.cli(&["topic", "create", "x", "--replication-factor", "3"]);
    assert!(!out.status.success());
    assert!(stderr_line(&out).contains("INVALID_REPLICATION_FACTOR"));
    let out = cluster.cli(&["topic", "create", "huge", "--partitions", "3000000"]);
    assert!(!out.status.success());
    assert!(stderr_line(&out).contains("INVALID_PARTITION"));

    // A new node claiming a member's id is refused, and exits with one line.
    let taken = cluster.nodes[0].id;
    let first = cluster.nodes[0].grpc();
    let mut impostor = NodeProc::new(taken, "127.0.3.5", cluster.dir.path(), Some(first));
    impostor.data_dir = cluster.dir.path().join("impostor");
    impostor.log = cluster.dir.path().join("impostor.log");
    impostor.start();
    let exit = impostor.wait_exit(Duration::from_secs(30));
    assert_eq!(
        exit.and_then(|s| s.code()),
        Some(1),
        "{}",
        impostor.log_tail()
    );
    let log = std::fs::read_to_string(&impostor.log).unwrap();
    assert!(log.contains("NODE_ID_IN_USE"), "{log}");
}

/// No server reachable: the CLI gives up after its timeout with one line naming the servers.
#[test]
fn unreachable_cluster_is_one_clear_line() {
    let out = aqueduct()
        .args([
            "cluster",
            "status",
            "--server",
            "127.0.4.1:1",
            "--timeout",
            "1",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let line = stderr_line(&out);
    assert!(
        line.starts_with("aqueduct: error: cannot get the cluster status")
            && line.contains("127.0.4.1:1"),
        "{line}"
    );
}

/// A node with cluster state in its data directory rejoins that cluster: a `--join` on its
/// command line (say, a restart script shared with fresh nodes) does not move it elsewhere.
#[test]
fn node_with_data_rejoins_its_own_cluster_despite_join() {
    let _serial = serial();
    let mut cluster = Cluster::start(&["127.0.5.1"]);
    let out = cluster.cli(&["topic", "create", "mine"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let node = cluster.node(1);
    node.kill();
    node.join = Some("127.0.5.9:7070".into());
    node.start();
    cluster.wait_members(1, Duration::from_secs(30));
    assert!(cluster.topics().contains("mine"));
    let log = std::fs::read_to_string(&cluster.node(1).log).unwrap();
    assert!(log.contains("ignoring --join"), "{log}");
}
