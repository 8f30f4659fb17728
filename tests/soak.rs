//! Soak (issue 7), run by `make soak` (ignored by `make test`): for `AQ_SOAK_SECS` seconds
//! (default 600) an idempotent producer writes to a 4-partition, RF=3 topic while the cluster
//! goes through a loop of faults and membership changes:
//!
//! 1. SIGKILL a node, restart it;
//! 2. SIGSTOP a node for 3 s, then SIGCONT;
//! 3. a new node joins and `cluster rebalance` moves replicas onto it;
//! 4. SIGKILL a node, restart it;
//! 5. SIGSTOP a node;
//! 6. `cluster remove-node` drains the newest node and removes it.
//!
//! Then every acknowledged record is looked up. The report gives the cycles, the records
//! acknowledged, lost (acknowledged, not stored), duplicated (stored twice), at the wrong
//! offset (stored elsewhere than acknowledged), and the operations that failed; lost,
//! duplicates and wrong offsets must be 0. Nodes on 127.0.29.x.

mod common;

use std::thread::sleep;
use std::time::{Duration, Instant};

use common::{
    Cluster, LineProducer, NodeProc, Produced, ack_places, serial, signal, stored_records,
};
use serde_json::Value;

const HOST: &str = "127.0.29";

/// A small deterministic generator (the seed is printed, so a run can be repeated).
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 33) % n as u64) as usize
    }
}

fn all_alive(cluster: &Cluster, n: usize) -> bool {
    cluster.status().is_some_and(|s| {
        let nodes = s["nodes"].as_array().cloned().unwrap_or_default();
        nodes.len() == n && nodes.iter().all(|x| x["alive"] == true)
    })
}

fn wait(what: &str, within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        sleep(Duration::from_millis(250));
    }
    eprintln!("soak: gave up waiting: {what}");
    false
}

fn all_led(cluster: &Cluster) -> bool {
    let out = cluster.cli(&[
        "topic",
        "describe",
        "soak",
        "--output",
        "json",
        "--timeout",
        "3",
    ]);
    out.status.success()
        && serde_json::from_slice::<Value>(&out.stdout).is_ok_and(|d| {
            d["partitions"]
                .as_array()
                .is_some_and(|ps| ps.iter().all(|p| p["leader"].is_string()))
        })
}

#[test]
#[ignore = "long; run with `make soak`"]
fn soak() {
    let _serial = serial();
    let secs: u64 = std::env::var("AQ_SOAK_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(600);
    let seed = std::env::var("AQ_SOAK_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        });
    eprintln!("soak: {secs} s, seed {seed}");
    let mut rng = Rng(seed);
    let mut cluster = Cluster::start(&[
        &format!("{HOST}.1"),
        &format!("{HOST}.2"),
        &format!("{HOST}.3"),
    ]);
    let out = cluster.cli(&[
        "topic",
        "create",
        "soak",
        "--partitions",
        "4",
        "--replication-factor",
        "3",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(wait("partitions led", Duration::from_secs(60), || all_led(
        &cluster
    )));
    let producer = LineProducer::start(&cluster, &["soak", "--acks", "all"]);

    let started = Instant::now();
    let mut cycles = 0u64;
    let mut failed_ops = 0u64;
    let mut next_id = 4u64;
    // The ids of the nodes in the cluster.
    let mut members: Vec<u64> = vec![1, 2, 3];
    let mut step = 0usize;
    while started.elapsed() < Duration::from_secs(secs) {
        sleep(Duration::from_secs(2));
        let n = members.len();
        let victim = members[rng.below(n)];
        let ok = match step % 6 {
            0 | 3 => {
                eprintln!("soak: cycle {cycles}: SIGKILL node {victim}");
                cluster.node(victim).kill();
                sleep(Duration::from_secs(2));
                cluster.node(victim).start();
                wait("all members alive", Duration::from_secs(60), || {
                    all_alive(&cluster, n)
                })
            }
            1 | 4 => {
                eprintln!("soak: cycle {cycles}: SIGSTOP node {victim} for 3 s");
                let child = cluster.node(victim).child.as_ref().expect("running");
                signal(child, 19);
                sleep(Duration::from_secs(3));
                let child = cluster.node(victim).child.as_ref().expect("running");
                signal(child, 18);
                wait("all members alive", Duration::from_secs(60), || {
                    all_alive(&cluster, n)
                })
            }
            2 => {
                let id = next_id;
                next_id += 1;
                eprintln!("soak: cycle {cycles}: node {id} joins; rebalance");
                let first = cluster.node(members[0]).grpc();
                let mut node =
                    NodeProc::new(id, &format!("{HOST}.{id}"), cluster.dir.path(), Some(first));
                node.start();
                cluster.nodes.push(node);
                members.push(id);
                wait("the new node is alive", Duration::from_secs(60), || {
                    all_alive(&cluster, n + 1)
                }) && cluster
                    .cli(&["cluster", "rebalance", "--wait", "120"])
                    .status
                    .success()
            }
            _ => {
                let id = *members.last().expect("members");
                eprintln!("soak: cycle {cycles}: remove-node {id}");
                let removed = cluster
                    .cli(&["cluster", "remove-node", &id.to_string(), "--wait", "120"])
                    .status
                    .success();
                if removed {
                    cluster.node(id).kill();
                    members.retain(|m| *m != id);
                }
                removed
            }
        };
        if !ok {
            failed_ops += 1;
            eprintln!("soak: cycle {cycles}: the operation failed");
        }
        step += 1;
        cycles += 1;
    }
    sleep(Duration::from_secs(2));
    let Produced {
        written,
        acks,
        status,
        stderr,
    } = producer.finish();
    assert!(wait(
        "partitions led",
        Duration::from_secs(120),
        || all_led(&cluster)
    ));

    let acks = ack_places(&acks);
    let (at, count) = stored_records(&cluster, "soak", written);
    let (mut lost, mut misplaced) = (0u64, 0u64);
    for (line, place) in &acks {
        let value = format!("rec-{line}");
        match at.get(place) {
            Some(v) if *v == value => {}
            _ if count.contains_key(&value) => misplaced += 1,
            _ => lost += 1,
        }
    }
    let duplicates: u32 = count.values().map(|c| c - 1).sum();
    eprintln!(
        "soak report: {cycles} cycles in {} s (seed {seed}); {written} records written, {} \
         acknowledged, producer exit {status}; lost {lost}, duplicates {duplicates}, at the \
         wrong offset {misplaced}; {failed_ops} operations failed",
        started.elapsed().as_secs(),
        acks.len(),
    );
    if !status.success() {
        eprintln!("soak: producer stderr: {stderr}");
    }
    assert_eq!(lost, 0, "acknowledged records lost");
    assert_eq!(duplicates, 0, "records stored twice");
    assert_eq!(misplaced, 0, "records at another offset than acknowledged");
}
