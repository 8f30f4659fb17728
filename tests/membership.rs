//! Membership under load (issue 7): `cluster rebalance` moves replicas and leaderships onto a
//! node that joined while a producer runs, `cluster remove-node` drains a node before removing
//! it, and no acknowledged record is lost or written twice; a follower that missed 100,000
//! records catches up. Real node processes on 127.0.25.x and 127.0.26.x.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::thread::sleep;
use std::time::{Duration, Instant};

use common::{
    Cluster, LineProducer, NodeProc, Produced, ack_places, serial, signal, stored_records,
};
use serde_json::Value;

/// `topic describe --output json`, if it answers.
fn describe(cluster: &Cluster, topic: &str) -> Option<Value> {
    let out = cluster.cli(&[
        "topic",
        "describe",
        topic,
        "--output",
        "json",
        "--timeout",
        "3",
    ]);
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).ok())
        .flatten()
}

/// Waits until `check` holds for the topic's description.
fn wait_topic(cluster: &Cluster, topic: &str, what: &str, check: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut last = None;
    while Instant::now() < deadline {
        if let Some(doc) = describe(cluster, topic) {
            if check(&doc) {
                return doc;
            }
            last = Some(doc);
        }
        sleep(Duration::from_millis(500));
    }
    panic!("{what}: last seen {last:?}\n{}", cluster.logs());
}

fn all_led(doc: &Value) -> bool {
    doc["partitions"]
        .as_array()
        .is_some_and(|ps| ps.iter().all(|p| p["leader"].is_string()))
}

/// Addresses of the nodes holding a replica of any partition.
fn replica_nodes(doc: &Value) -> BTreeSet<String> {
    doc["partitions"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|p| p["replicas"].as_array().cloned().unwrap_or_default())
        .filter_map(|r| r.as_str().map(str::to_string))
        .collect()
}

fn leader_hosts(doc: &Value) -> BTreeSet<String> {
    doc["partitions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["leader"].as_str().map(str::to_string))
        .collect()
}

fn ok(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Partition directories of `topic` under a node's data directory.
fn partition_dirs(data_dir: &Path, topic: &str) -> usize {
    std::fs::read_dir(data_dir.join("partitions"))
        .map(|d| {
            d.flatten()
                .filter(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .starts_with(&format!("{topic}-"))
                })
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn rebalance_onto_a_new_node_and_drain_a_node_under_load() {
    let _serial = serial();
    let mut cluster = Cluster::start(&["127.0.25.1", "127.0.25.2", "127.0.25.3"]);
    ok(&cluster.cli(&[
        "topic",
        "create",
        "moving",
        "--partitions",
        "4",
        "--replication-factor",
        "2",
    ]));
    wait_topic(&cluster, "moving", "every partition led", all_led);

    // An idempotent producer runs throughout; its acknowledgements come on stdout.
    let producer = LineProducer::start(&cluster, &["moving", "--acks", "all"]);
    sleep(Duration::from_secs(2));

    // Node 4 joins; a rebalance gives it replicas and leaderships.
    let first = cluster.nodes[0].grpc();
    let mut node4 = NodeProc::new(4, "127.0.25.4", cluster.dir.path(), Some(first));
    node4.start();
    cluster.nodes.push(node4);
    // Four members, all alive (the fourth stays a learner of the metadata group: 3 voters).
    let deadline = Instant::now() + Duration::from_secs(60);
    while !cluster.status().is_some_and(|s| {
        let nodes = s["nodes"].as_array().cloned().unwrap_or_default();
        nodes.len() == 4 && nodes.iter().all(|x| x["alive"] == true)
    }) {
        assert!(
            Instant::now() < deadline,
            "node 4 did not join\n{}",
            cluster.logs()
        );
        sleep(Duration::from_millis(250));
    }
    let node4_host = cluster.node(4).grpc();
    let node1_host = cluster.node(1).grpc();
    let before = describe(&cluster, "moving").expect("describe");
    assert!(!replica_nodes(&before).contains(&node4_host));
    let out = ok(&cluster.cli(&["cluster", "rebalance", "--wait", "120", "--output", "json"]));
    let plan: Value = serde_json::from_str(out.lines().next().expect("plan")).expect("json");
    assert!(
        !plan["moves"].as_array().expect("moves").is_empty(),
        "nothing to move onto the new node: {plan}"
    );
    let doc = wait_topic(&cluster, "moving", "node 4 leads a partition", |d| {
        all_led(d) && leader_hosts(d).contains(&node4_host)
    });
    let held: usize = doc["partitions"]
        .as_array()
        .expect("partitions")
        .iter()
        .filter(|p| {
            p["replicas"]
                .as_array()
                .is_some_and(|r| r.contains(&Value::from(node4_host.as_str())))
        })
        .count();
    assert_eq!(held, 2, "8 replicas over 4 nodes: 2 on node 4: {doc}");
    // A second rebalance has nothing left to do.
    let again = ok(&cluster.cli(&["cluster", "rebalance", "--dry-run", "--output", "json"]));
    let again: Value = serde_json::from_str(&again).expect("json");
    assert_eq!(again["moves"], Value::Array(vec![]), "{again}");

    // Node 1 is drained, then removed; its replicas and their data go elsewhere.
    let out = ok(&cluster.cli(&["cluster", "remove-node", "1", "--wait", "120"]));
    assert!(out.contains("node 1 removed"), "{out}");
    let doc = wait_topic(
        &cluster,
        "moving",
        "every partition led without node 1",
        |d| all_led(d) && !replica_nodes(d).contains(&node1_host),
    );
    assert!(
        !leader_hosts(&doc).contains(&cluster.node(1).grpc()),
        "{doc}"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while partition_dirs(&cluster.node(1).data_dir, "moving") > 0 && Instant::now() < deadline {
        sleep(Duration::from_millis(500));
    }
    assert_eq!(
        partition_dirs(&cluster.node(1).data_dir, "moving"),
        0,
        "node 1 kept partition data after it was drained"
    );
    sleep(Duration::from_secs(2));

    let Produced {
        written,
        acks,
        status,
        ..
    } = producer.finish();
    let acks = ack_places(&acks);
    eprintln!(
        "{written} lines written, {} acknowledged, producer exit {status}",
        acks.len()
    );
    assert!(status.success(), "producer failed");
    assert_eq!(acks.len() as u64, written, "every line is acknowledged");

    // Every acknowledged record is where its acknowledgement said, exactly once.
    cluster.node(1).kill();
    let (at, count) = stored_records(&cluster, "moving", written);
    for (line, (p, o)) in &acks {
        assert_eq!(
            at.get(&(*p, *o)).map(String::as_str),
            Some(format!("rec-{line}").as_str()),
            "acknowledged line {line} is not at {p}/{o}"
        );
    }
    let duplicates: u32 = count.values().map(|c| c - 1).sum();
    assert_eq!(duplicates, 0, "records written twice");
}

/// The concatenated `.log` segment files of a node's replica of `topic` partition 0.
fn log_bytes(data_dir: &Path, topic: &str) -> Vec<u8> {
    let parent = data_dir.join("partitions");
    let Some(dir) = std::fs::read_dir(&parent).ok().and_then(|d| {
        d.flatten().map(|e| e.path()).find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(&format!("{topic}-0-")))
        })
    }) else {
        return Vec::new();
    };
    let mut names: Vec<_> = std::fs::read_dir(&dir)
        .expect("partition dir")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    names.sort();
    names
        .iter()
        .flat_map(|p| std::fs::read(p).unwrap_or_default())
        .collect()
}

#[test]
fn a_follower_that_missed_100k_records_catches_up() {
    let _serial = serial();
    let mut cluster = Cluster::start(&["127.0.26.1", "127.0.26.2", "127.0.26.3"]);
    ok(&cluster.cli(&["topic", "create", "behind", "--replication-factor", "3"]));
    // Leadership settles on the preferred replica (the first) a few seconds after the
    // election: freeze a follower only then, so that it stays a follower.
    let doc = wait_topic(
        &cluster,
        "behind",
        "partition led by its preferred replica",
        |d| all_led(d) && d["partitions"][0]["leader"] == d["partitions"][0]["replicas"][0],
    );
    let leader = doc["partitions"][0]["leader"]
        .as_str()
        .expect("leader")
        .to_string();
    let follower = cluster
        .nodes
        .iter()
        .find(|n| n.grpc() != leader)
        .map(|n| n.id)
        .expect("a follower");
    signal(cluster.node(follower).child.as_ref().expect("running"), 19); // SIGSTOP
    let out = ok(&cluster.cli(&[
        "bench",
        "produce",
        "--topic",
        "behind",
        "--count",
        "100000",
        "--record-size",
        "100",
        "--producers",
        "2",
        "--json",
    ]));
    let result: Value = serde_json::from_str(out.trim()).expect("json");
    assert_eq!(result["acknowledged"], 100_000, "{result}");
    assert_eq!(result["failed"], 0, "{result}");
    signal(cluster.node(follower).child.as_ref().expect("running"), 18); // SIGCONT
    // Caught up: its log is byte-identical to the leader's.
    let leader_id = cluster
        .nodes
        .iter()
        .find(|n| n.grpc() == leader)
        .map(|n| n.id)
        .expect("leader node");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let hw = describe(&cluster, "behind")
            .and_then(|d| d["partitions"][0]["high_watermark"].as_u64());
        let lead = log_bytes(&cluster.node(leader_id).data_dir, "behind");
        let behind = log_bytes(&cluster.node(follower).data_dir, "behind");
        if hw >= Some(100_000) && !lead.is_empty() && lead == behind {
            eprintln!("follower {follower} caught up: {} log bytes", behind.len());
            break;
        }
        assert!(
            Instant::now() < deadline,
            "follower {follower} has {} of the leader's {} log bytes\n{}",
            behind.len(),
            lead.len(),
            cluster.logs()
        );
        sleep(Duration::from_millis(500));
    }
}
