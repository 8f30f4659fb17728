//! Real Kafka clients against the Kafka front of a 3-node cluster: Debian's kcat (librdkafka
//! 2.0) and the PyPI `confluent-kafka` wheel (its own librdkafka), both installed by
//! `make test`. These tests exist because a Kafka front is only as good as the clients it
//! works with: metadata must name the real Raft leaders, any node must be a good bootstrap,
//! compressed batches must come back readable, records must cross between the native and the
//! Kafka protocol intact, and an acknowledged write must survive its leader being SIGKILLed.

mod common;

use std::collections::BTreeSet;
use std::io::Write;
use std::process::{Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::kafka::{Lines, kafka, python_json};
use common::{Cluster, serial};
use serde_json::Value;

/// kcat, which `make test` installs; a missing one fails the test with the reason.
fn kcat(args: &[&str], stdin: Option<&[u8]>) -> std::process::Output {
    let mut command = Command::new("kcat");
    command.args(args);
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run kcat ({e}); `make test` installs it (apt kcat)"));
    {
        let mut input = child.stdin.take().expect("stdin");
        if let Some(bytes) = stdin {
            input.write_all(bytes).expect("write kcat stdin");
        }
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if child.try_wait().expect("kcat wait").is_some() {
            return child.wait_with_output().expect("kcat output");
        }
        assert!(
            Instant::now() < deadline,
            "kcat {args:?} did not finish in 60 s"
        );
        sleep(Duration::from_millis(50));
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64
}

/// kcat `-L -J`: each partition's leader, until every partition of `topic` names one that
/// agrees with the node that really leads it.
fn kcat_leaders(cluster: &Cluster, bootstrap: &str, topic: &str, partitions: usize) -> Vec<u64> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = String::new();
    while Instant::now() < deadline {
        let out = kcat(&["-b", bootstrap, "-L", "-J", "-t", topic], None);
        last = String::from_utf8_lossy(&out.stdout).to_string();
        if let Ok(doc) = serde_json::from_slice::<Value>(&out.stdout) {
            let parts = doc["topics"][0]["partitions"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let leaders: Vec<u64> = parts.iter().filter_map(|p| p["leader"].as_u64()).collect();
            let real: Vec<Option<u64>> = (0..partitions)
                .map(|p| cluster.partition_leader(topic, p))
                .collect();
            if leaders.len() == partitions && real.iter().zip(&leaders).all(|(r, l)| *r == Some(*l))
            {
                return leaders;
            }
        }
        sleep(Duration::from_millis(300));
    }
    panic!("kcat -L never showed the real leaders of {topic}: {last}");
}

/// kcat reads every record of partition `p` from `offset` to the end, one `key|value|headers`
/// line each.
fn kcat_read(bootstrap: &str, topic: &str, p: usize, offset: &str) -> Vec<String> {
    let partition = p.to_string();
    let out = kcat(
        &[
            "-b",
            bootstrap,
            "-C",
            "-t",
            topic,
            "-p",
            &partition,
            "-o",
            offset,
            "-e",
            "-q",
            "-f",
            "%k|%s|%h\n",
        ],
        None,
    );
    assert!(
        out.status.success(),
        "kcat -C failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

/// kcat against a 3-node cluster: `-L` names the real leaders from any bootstrap node;
/// keys and headers survive produce and consume; producing through a node that does not
/// lead the partition lands; `-o s@TIMESTAMP` starts at the first record at or after it;
/// native and Kafka records are readable by the other protocol.
#[test]
fn kcat_produces_consumes_and_sees_the_real_leaders() {
    let _serial = serial();
    let hosts = ["127.0.40.1", "127.0.40.2", "127.0.40.3"];
    let cluster = Cluster::start(&hosts);
    cluster.create_topic("kc", 3, 3);
    for h in hosts {
        let leaders = kcat_leaders(&cluster, &kafka(h), "kc", 3);
        assert_eq!(leaders.len(), 3);
    }

    // Produce through a node that does not lead partition 0 (librdkafka is sent on to the
    // leader by the metadata).
    let leader = cluster.partition_leader("kc", 0).expect("leader of kc/0");
    let other = hosts[(leader as usize) % 3];
    let input = b"k1:v1\nk2:v2\nk3:v3\n";
    let out = kcat(
        &[
            "-b",
            &kafka(other),
            "-P",
            "-t",
            "kc",
            "-p",
            "0",
            "-K:",
            "-H",
            "app=aq",
            "-H",
            "n=1",
        ],
        Some(input),
    );
    assert!(
        out.status.success(),
        "kcat -P: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let read = kcat_read(&kafka(other), "kc", 0, "beginning");
    assert_eq!(
        read,
        ["k1|v1|app=aq,n=1", "k2|v2|app=aq,n=1", "k3|v3|app=aq,n=1"]
    );

    // A timestamp between two batches: reading from it starts at the second one.
    sleep(Duration::from_millis(1200));
    let between = now_ms();
    sleep(Duration::from_millis(200));
    let out = kcat(
        &["-b", &kafka(hosts[0]), "-P", "-t", "kc", "-p", "0", "-K:"],
        Some(b"k4:v4\nk5:v5\n"),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let from_ts = kcat_read(&kafka(hosts[1]), "kc", 0, &format!("s@{between}"));
    assert_eq!(from_ts, ["k4|v4|", "k5|v5|"]);

    // Kafka → native: the CLI sees kcat's keys and headers.
    let out = cluster.cli(&[
        "consume",
        "kc",
        "--partition",
        "0",
        "--from",
        "earliest",
        "--max",
        "5",
        "--output",
        "json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let native: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    assert_eq!(native.len(), 5);
    assert_eq!(native[0]["key"], "k1");
    assert_eq!(native[0]["value"], "v1");
    assert_eq!(native[0]["headers"]["app"], "aq");
    // Native → Kafka: records produced by the CLI read by kcat with their keys.
    let out = cluster.produce(&["kc", "--partition", "1", "--key", "nk"], b"n1\nn2\n");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        kcat_read(&kafka(hosts[2]), "kc", 1, "beginning"),
        ["nk|n1|", "nk|n2|"]
    );
    // Asking for a partition that does not exist is an error, and the node keeps serving.
    let out = kcat(
        &[
            "-b",
            &kafka(hosts[0]),
            "-C",
            "-t",
            "kc",
            "-p",
            "7",
            "-o",
            "beginning",
            "-e",
        ],
        None,
    );
    assert!(
        !out.status.success(),
        "partition 7 of a 3-partition topic was readable"
    );
    assert_eq!(kcat_read(&kafka(hosts[0]), "kc", 1, "beginning").len(), 2);
}

/// confluent-kafka-python: every compression codec round-trips with keys and headers, and
/// the AdminClient creates, alters, grows and deletes a topic (with Kafka's error names for
/// a duplicate topic and a bad config).
#[test]
fn confluent_kafka_codecs_and_admin() {
    let _serial = serial();
    let hosts = ["127.0.41.1", "127.0.41.2", "127.0.41.3"];
    let cluster = Cluster::start(&hosts);
    let bootstrap = hosts.map(kafka).join(",");
    cluster.create_topic("codecs", 3, 3);
    let r = python_json(&["codecs", &bootstrap, "codecs"]);
    assert_eq!(r["sent"], 1000, "{r}");
    assert_eq!(r["read"], 1000, "{r}");
    assert_eq!(r["distinct"], 1000, "{r}");
    assert_eq!(r["bad"], serde_json::json!([]), "{r}");

    let a = python_json(&["admin", &bootstrap]);
    let ids = a["cluster_ids"].as_array().expect("cluster ids");
    assert!(
        ids.len() == 1 && ids[0].as_str().is_some_and(|id| id.len() == 32),
        "one cluster id on every node: {a}"
    );
    assert_eq!(a["duplicate_create"], "TOPIC_ALREADY_EXISTS", "{a}");
    assert_eq!(a["retention_before"], "3600000", "{a}");
    assert_eq!(a["retention_after"], "7200000", "{a}");
    assert_eq!(a["bad_config"], "INVALID_CONFIG", "{a}");
    assert_eq!(a["partitions"], 4, "{a}");
    assert_eq!(a["listed_after_delete"], false, "{a}");
    assert!(!cluster.topics().contains("py-admin"));
}

/// A partition leader SIGKILLed under a running acks=all producer (confluent-kafka): every
/// record the client saw acknowledged is in the log afterwards.
#[test]
fn leader_sigkill_under_acks_all_kafka_producer_loses_nothing_acknowledged() {
    let _serial = serial();
    let hosts = ["127.0.42.1", "127.0.42.2", "127.0.42.3"];
    let mut cluster = Cluster::start(&hosts);
    let bootstrap = hosts.map(kafka).join(",");
    cluster.create_topic("acked", 1, 3);
    let leader = cluster.partition_leader("acked", 0).expect("leader");

    let total = 3000;
    let mut producer = Lines::spawn(&[
        "produce-acked",
        &bootstrap,
        "acked",
        &total.to_string(),
        "300",
    ]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while producer.snapshot().len() < 500 && Instant::now() < deadline {
        sleep(Duration::from_millis(200));
    }
    let before_kill = producer.snapshot().len();
    assert!(
        before_kill >= 500,
        "the producer got only {before_kill} acks before the kill"
    );
    cluster.node(leader).kill();
    let status = producer.wait(Duration::from_secs(180));
    let acked: BTreeSet<String> = producer.snapshot().into_iter().collect();
    assert!(status.success(), "producer failed: {status}");
    assert!(
        acked.len() > 1000,
        "only {} of {total} acknowledged",
        acked.len()
    );
    let new_leader = cluster.partition_leader("acked", 0);
    assert!(
        new_leader.is_some_and(|l| l != leader),
        "no new leader: {new_leader:?}"
    );

    let survivors = [hosts[0], hosts[1], hosts[2]]
        .iter()
        .enumerate()
        .filter(|(i, _)| *i as u64 + 1 != leader)
        .map(|(_, h)| kafka(h))
        .collect::<Vec<_>>()
        .join(",");
    let stored = python_json(&["consume-values", &survivors, "acked"]);
    let stored: BTreeSet<String> = stored
        .as_array()
        .expect("values")
        .iter()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect();
    let lost: Vec<&String> = acked.iter().filter(|v| !stored.contains(*v)).collect();
    eprintln!(
        "leader {leader} killed, {new_leader:?} took over: {} acknowledged, {} stored, {} lost",
        acked.len(),
        stored.len(),
        lost.len()
    );
    assert!(
        lost.is_empty(),
        "{} acknowledged records lost, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
}
