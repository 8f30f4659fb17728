//! Consumer groups and idempotent producers over the Kafka front, with real clients
//! (confluent-kafka-python and kcat, installed by `make test`) against 3-node clusters: a
//! group of 3 over 6 partitions rebalances when a member leaves and when one is SIGKILLed;
//! a group resumes on a new coordinator after the old one's node is SIGKILLed; an
//! idempotent producer writes each record once; kcat `-G`; the AdminClient lists, describes
//! and deletes groups; and one group model: a group read half through Kafka and half through
//! `aqueduct consume --group` reads every record once.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::thread::sleep;
use std::time::{Duration, Instant};

use common::kafka::{Lines, kafka, python_json};
use common::{Cluster, committed, serial, signal};
use serde_json::Value;

fn eventually(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        sleep(Duration::from_millis(200));
    }
}

/// 3 members over 6 partitions while a producer runs: one leaves cleanly, one is SIGKILLed;
/// the survivor ends up with every partition, every acknowledged record is read, and
/// records are read again only after the last commit of the member that had them.
#[test]
fn a_kafka_group_rebalances_when_members_leave_or_die() {
    let _serial = serial();
    let hosts = ["127.0.45.1", "127.0.45.2", "127.0.45.3"];
    let cluster = Cluster::start(&hosts);
    let bootstrap = hosts.map(kafka).join(",");
    cluster.create_topic("grp", 6, 3);
    let total = 2400;
    let mut producer = Lines::spawn(&["produce-acked", &bootstrap, "grp", "2400", "120"]);
    let commit_every = 20;
    let member = |instance: Option<&str>| {
        let mut args = vec![
            "group-member".to_string(),
            bootstrap.clone(),
            "grp".into(),
            "g-rebalance".into(),
            commit_every.to_string(),
            "0".into(),
        ];
        if let Some(i) = instance {
            args.push(i.into());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Lines::spawn(&args)
    };
    // 0 survives, 1 leaves cleanly, 2 is SIGKILLed.
    let mut all = vec![member(None), member(None), member(None)];
    eventually(
        "every member has partitions",
        Duration::from_secs(60),
        || {
            all.iter().all(|m| {
                m.snapshot()
                    .iter()
                    .rev()
                    .find(|l| l.starts_with("# assigned"))
                    .is_some_and(|l| l.trim() != "# assigned")
            })
        },
    );
    eventually(
        "the members read 300 records",
        Duration::from_secs(60),
        || all.iter().map(|m| m.records().len()).sum::<usize>() >= 300,
    );
    all[2].child.kill().expect("SIGKILL a member");
    all[2].wait(Duration::from_secs(10));
    sleep(Duration::from_secs(2));
    signal(&all[1].child, 15);
    assert!(all[1].wait(Duration::from_secs(30)).success());
    let status = producer.wait(Duration::from_secs(120));
    assert!(status.success(), "producer failed: {status}");
    let acked: BTreeSet<String> = producer.snapshot().into_iter().collect();
    assert!(acked.len() > total / 2, "only {} acknowledged", acked.len());
    eventually(
        "the survivor reads every acknowledged record",
        Duration::from_secs(120),
        || {
            let seen: BTreeSet<String> =
                all.iter().flat_map(|m| m.records()).map(|r| r.2).collect();
            acked.is_subset(&seen)
        },
    );
    let last = all[0]
        .snapshot()
        .into_iter()
        .rev()
        .find(|l| l.starts_with("# assigned"))
        .unwrap_or_default();
    assert_eq!(
        last.trim(),
        "# assigned 0,1,2,3,4,5",
        "survivor's assignment"
    );
    let records: Vec<(u32, u64, String)> = all.iter().flat_map(|m| m.records()).collect();
    let distinct: BTreeSet<(u32, u64)> = records.iter().map(|r| (r.0, r.1)).collect();
    let again = records.len() - distinct.len();
    // Only the SIGKILLed member's records after its last commit are read again: at most
    // `commit_every` per partition it held (2 of 6), plus what it had fetched and printed
    // between its last commit and the kill.
    assert!(
        again <= 2 * commit_every as usize + 20,
        "{again} records read twice"
    );
    // Offsets within a partition are consecutive, without gaps.
    for p in 0..6 {
        let offsets: Vec<u64> = distinct.iter().filter(|d| d.0 == p).map(|d| d.1).collect();
        assert!(
            offsets.iter().enumerate().all(|(i, o)| *o == i as u64),
            "partition {p}: offsets not consecutive from 0"
        );
    }
    eprintln!(
        "{} acknowledged, {} read, {again} read twice",
        acked.len(),
        records.len()
    );
    // The survivor commits when idle: the committed positions are the partitions' ends, and
    // the native CLI sees them.
    let ends: BTreeMap<u64, u64> = (0..6u64)
        .map(|p| {
            let n = distinct.iter().filter(|d| u64::from(d.0) == p).count() as u64;
            (p, n)
        })
        .collect();
    eventually("commits at the ends", Duration::from_secs(30), || {
        committed(&cluster.describe_group("g-rebalance")) == ends
    });
    drop(all);
}

/// The coordinator's node SIGKILLed while a member consumes: the group carries on with the
/// new coordinator from its committed offsets.
#[test]
fn a_kafka_group_resumes_on_a_new_coordinator() {
    let _serial = serial();
    let hosts = ["127.0.46.1", "127.0.46.2", "127.0.46.3"];
    let mut cluster = Cluster::start(&hosts);
    let bootstrap = hosts.map(kafka).join(",");
    cluster.create_topic("co", 2, 3);
    let mut producer = Lines::spawn(&["produce-acked", &bootstrap, "co", "1500", "100"]);
    let commit_every = 10;
    let consumer = Lines::spawn(&[
        "group-member",
        &bootstrap,
        "co",
        "g-coordinator",
        &commit_every.to_string(),
        "0",
    ]);
    eventually("200 records read", Duration::from_secs(60), || {
        consumer.records().len() >= 200
    });
    let c = python_json(&["coordinator", &bootstrap, "g-coordinator"]);
    let node = c["coordinator"].as_u64().expect("coordinator id");
    assert!((1..=3).contains(&node), "{c}");
    cluster.node(node).kill();
    let status = producer.wait(Duration::from_secs(120));
    assert!(status.success(), "producer failed: {status}");
    let acked: BTreeSet<String> = producer.snapshot().into_iter().collect();
    eventually(
        "every acknowledged record read after the coordinator died",
        Duration::from_secs(120),
        || {
            let seen: BTreeSet<String> = consumer.records().into_iter().map(|r| r.2).collect();
            acked.is_subset(&seen)
        },
    );
    let records = consumer.records();
    let distinct: BTreeSet<(u32, u64)> = records.iter().map(|r| (r.0, r.1)).collect();
    let again = records.len() - distinct.len();
    assert!(
        again <= 2 * commit_every as usize,
        "{again} records read twice"
    );
    let c = python_json(&[
        "coordinator",
        &hosts
            .iter()
            .enumerate()
            .filter(|(i, _)| *i as u64 + 1 != node)
            .map(|(_, h)| kafka(h))
            .collect::<Vec<_>>()
            .join(","),
        "g-coordinator",
    ]);
    assert_ne!(c["coordinator"].as_u64(), Some(node), "{c}");
    eprintln!(
        "coordinator {node} killed; {} read, {again} again",
        records.len()
    );
}

/// An idempotent producer, kcat `-G`, the AdminClient's group calls, and a group read half
/// through Kafka and half natively.
#[test]
fn idempotent_producer_kcat_groups_admin_and_one_group_model() {
    let _serial = serial();
    let hosts = ["127.0.47.1", "127.0.47.2", "127.0.47.3"];
    let cluster = Cluster::start(&hosts);
    let bootstrap = hosts.map(kafka).join(",");
    cluster.create_topic("idem", 3, 3);
    let r = python_json(&["produce-idempotent", &bootstrap, "idem", "2000"]);
    assert_eq!(r["delivered"], 2000, "{r}");
    let stored = python_json(&["consume-values", &bootstrap, "idem"]);
    let stored: Vec<&str> = stored
        .as_array()
        .expect("values")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let distinct: BTreeSet<&str> = stored.iter().copied().collect();
    assert_eq!((stored.len(), distinct.len()), (2000, 2000));

    // kcat as a group member reads everything and commits on close.
    let out = common::run_with_timeout(
        {
            let mut c = std::process::Command::new("kcat");
            c.args([
                "-b",
                &bootstrap,
                "-G",
                "g-kcat",
                "-X",
                "auto.offset.reset=earliest",
                "-e",
                "-q",
                "-f",
                "%s\n",
                "idem",
            ]);
            c
        },
        Duration::from_secs(120),
    );
    assert!(
        out.status.success(),
        "kcat -G: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let read: BTreeSet<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(read.len(), 2000, "kcat -G read {} distinct", read.len());
    let offsets = committed(&cluster.describe_group("g-kcat"));
    assert_eq!(offsets.values().sum::<u64>(), 2000, "{offsets:?}");

    // The AdminClient sees the group, its offsets, and deletes it.
    let a = python_json(&["group-admin", &bootstrap, "g-kcat"]);
    assert!(
        a["listed"]
            .as_array()
            .is_some_and(|l| l.iter().any(|g| g == "g-kcat")),
        "{a}"
    );
    assert_eq!(a["state"], "ConsumerGroupState.EMPTY", "{a}");
    let sum: u64 = a["offsets"]
        .as_array()
        .expect("offsets")
        .iter()
        .map(|o| o[2].as_u64().expect("offset"))
        .sum();
    assert_eq!(sum, 2000, "{a}");
    assert!(
        !a["listed_after_delete"]
            .as_array()
            .is_some_and(|l| l.iter().any(|g| g == "g-kcat")),
        "{a}"
    );

    // Half through Kafka, half natively: every record once.
    let mut first = Lines::spawn(&["group-member", &bootstrap, "idem", "g-mix", "50", "1000"]);
    assert!(first.wait(Duration::from_secs(120)).success());
    let kafka_half: Vec<String> = first.records().into_iter().map(|r| r.2).collect();
    assert_eq!(kafka_half.len(), 1000);
    let out = cluster.cli(&[
        "consume", "idem", "--group", "g-mix", "--from", "earliest", "--end",
    ]);
    assert!(
        out.status.success(),
        "aqueduct consume --group: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let native_half: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    let mut both: Vec<&String> = kafka_half.iter().chain(&native_half).collect();
    both.sort();
    let before = both.len();
    both.dedup();
    assert_eq!(
        (before, both.len()),
        (2000, 2000),
        "kafka read {}, native read {}",
        kafka_half.len(),
        native_half.len()
    );
}
