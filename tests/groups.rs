//! Consumer groups with real processes: one node on 127.0.20.1, the real CLI as producer and
//! as group members.
//!
//! * three `consume --group` processes share a six-partition topic, two partitions each,
//!   while records keep arriving; one member is frozen (SIGSTOP), the group's committed
//!   offsets are read, and it is SIGKILLed: its partitions move to the others, and the records
//!   delivered twice are exactly those it printed at or after its last commit;
//! * the members that stop cleanly commit what they printed; the committed offsets survive
//!   compaction of `__consumer_offsets` and a restart of the cluster; `group list`, `group describe` and `group reset-offsets` work and
//!   refuse what they must;
//! * on three nodes, the group's coordinator (the leader of its `__consumer_offsets`
//!   partition) is SIGKILLed: the new one serves the same committed offsets.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Child, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use common::{Cluster, aqueduct, committed, signal};
use serde_json::Value;

/// A child process killed when dropped (a failing test leaves no consumer behind to join the
/// next run's group).
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl std::ops::Deref for Proc {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Proc {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

/// A `consume --group` process writing its stdout and stderr to files.
fn member(cluster: &Cluster, dir: &Path, name: &str) -> Proc {
    let child = aqueduct()
        .args([
            "consume", "orders", "--group", "billing", "--from", "earliest", "--output", "json",
            "--server",
        ])
        .arg(cluster.servers())
        .stdout(std::fs::File::create(dir.join(format!("{name}.out"))).unwrap())
        .stderr(std::fs::File::create(dir.join(format!("{name}.err"))).unwrap())
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    Proc(child)
}

/// (partition, offset) of every record a member printed.
fn printed(dir: &Path, name: &str) -> Vec<(u64, u64)> {
    let text = std::fs::read_to_string(dir.join(format!("{name}.out"))).unwrap_or_default();
    text.lines()
        .filter(|l| l.ends_with('}'))
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (
                v["partition"].as_u64().unwrap(),
                v["offset"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// The partitions of a member's latest assignment, from its stderr.
fn assigned(dir: &Path, name: &str) -> Vec<u64> {
    let text = std::fs::read_to_string(dir.join(format!("{name}.err"))).unwrap_or_default();
    let Some(line) = text.lines().rfind(|l| l.contains("joined group")) else {
        return Vec::new();
    };
    let list = line.rsplit('[').next().unwrap().trim_end_matches(']');
    list.split(',')
        .filter(|s| !s.is_empty())
        .map(|tp| tp.rsplit('/').next().unwrap().parse().unwrap())
        .collect()
}

/// Commits `offsets` of topic `orders` for `group` from outside the group, `times` times.
fn commit_repeatedly(cluster: &Cluster, group: &str, offsets: &BTreeMap<u64, u64>, times: usize) {
    use aqueduct_protocol::group as gpb;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let addr = format!("http://{}", cluster.nodes[0].grpc());
        let mut c = gpb::groups_client::GroupsClient::connect(addr)
            .await
            .unwrap();
        for _ in 0..times {
            let request = gpb::OffsetCommitRequest {
                group: group.to_string(),
                generation: -1,
                member_id: String::new(),
                offsets: offsets
                    .iter()
                    .map(|(p, o)| gpb::TopicPartitionOffset {
                        topic: "orders".into(),
                        partition: *p as u32,
                        offset: *o as i64,
                        metadata: "x".repeat(64),
                    })
                    .collect(),
            };
            c.offset_commit(request).await.unwrap();
        }
    });
}

/// Produces `n` keyed records (the keys spread them over the partitions).
fn produce(cluster: &Cluster, from: usize, n: usize) {
    let input: String = (from..from + n)
        .map(|i| format!("{{\"id\":\"k{i}\",\"n\":{i}}}\n"))
        .collect();
    let out = cluster.produce(&["orders", "--key-field", "id"], input.as_bytes());
    assert!(
        out.status.success(),
        "produce failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Waits for `done`; on a timeout, fails with the members' stderr from `dir`.
fn wait_for(dir: &Path, what: &str, within: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if done() {
            return;
        }
        sleep(Duration::from_millis(250));
    }
    let mut errs = String::new();
    for m in ["a", "b", "c", "d"] {
        if let Ok(t) = std::fs::read_to_string(dir.join(format!("{m}.err"))) {
            errs.push_str(&format!("--- member {m} stderr ---\n{t}\n"));
        }
    }
    panic!("{what} did not happen within {within:?}\n{errs}");
}

#[test]
fn group_members_share_partitions_and_a_killed_members_partitions_move() {
    let _serial = common::serial();
    let mut cluster = Cluster::start_with(
        &["127.0.20.1"],
        &[
            // Small segments of __consumer_offsets, checked often: compaction runs here.
            ("AQUEDUCT_OFFSETS_TOPIC_SEGMENT_BYTES", "65536"),
            ("AQUEDUCT_RETENTION_CHECK_MS", "300"),
        ],
    );
    let out = cluster.cli(&["topic", "create", "orders", "--partitions", "6"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    produce(&cluster, 0, 600);
    let dir = tempfile::tempdir().unwrap();
    let mut members: BTreeMap<&str, Proc> = ["a", "b", "c"]
        .into_iter()
        .map(|m| (m, member(&cluster, dir.path(), m)))
        .collect();

    // Three members, two partitions each, every partition owned once.
    wait_for(
        dir.path(),
        "a stable group of three",
        Duration::from_secs(60),
        || {
            let d = cluster.describe_group("billing");
            let sizes: Vec<usize> = d["members"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m["partitions"].as_array().unwrap().len())
                .collect();
            d["state"] == "Stable" && sizes == vec![2, 2, 2]
        },
    );
    wait_for(
        dir.path(),
        "every member's assignment",
        Duration::from_secs(30),
        || {
            ["a", "b", "c"]
                .iter()
                .all(|m| assigned(dir.path(), m).len() == 2)
        },
    );
    let owned: BTreeSet<u64> = ["a", "b", "c"]
        .iter()
        .flat_map(|m| assigned(dir.path(), m))
        .collect();
    assert_eq!(owned, (0..6).collect(), "every partition is owned once");
    let total =
        |dir: &Path| -> usize { ["a", "b", "c"].iter().map(|m| printed(dir, m).len()).sum() };
    wait_for(
        dir.path(),
        "the first 600 records consumed",
        Duration::from_secs(60),
        || total(dir.path()) >= 600,
    );

    // Auto-commit covers them; then more records, and b is frozen between auto-commits.
    wait_for(
        dir.path(),
        "the first 600 records committed",
        Duration::from_secs(30),
        || {
            committed(&cluster.describe_group("billing"))
                .values()
                .sum::<u64>()
                == 600
        },
    );
    produce(&cluster, 600, 300);
    sleep(Duration::from_millis(1500));
    let victim = "b";
    let victim_parts = assigned(dir.path(), victim);
    signal(&members[victim], 19); // SIGSTOP
    sleep(Duration::from_millis(300));
    let at_kill = committed(&cluster.describe_group("billing"));
    members.get_mut(victim).unwrap().kill().unwrap();
    members.get_mut(victim).unwrap().wait().unwrap();
    let victim_printed = printed(dir.path(), victim);
    eprintln!(
        "{victim} owned {victim_parts:?}, printed {} records; committed at the kill: {at_kill:?}",
        victim_printed.len()
    );

    // Its partitions move to the two others once its session expires.
    produce(&cluster, 900, 300);
    wait_for(
        dir.path(),
        "a stable group of two",
        Duration::from_secs(60),
        || {
            let d = cluster.describe_group("billing");
            d["state"] == "Stable" && d["members"].as_array().unwrap().len() == 2
        },
    );
    let survivors = ["a", "c"];
    wait_for(
        dir.path(),
        "every record consumed",
        Duration::from_secs(60),
        || {
            let seen: BTreeSet<(u64, u64)> = ["a", "b", "c"]
                .iter()
                .flat_map(|m| printed(dir.path(), m))
                .collect();
            seen.len() == 1200
        },
    );
    wait_for(
        dir.path(),
        "the survivors owning every partition",
        Duration::from_secs(30),
        || {
            let owned: BTreeSet<u64> = survivors
                .iter()
                .flat_map(|m| assigned(dir.path(), m))
                .collect();
            owned == (0..6).collect()
        },
    );

    // Delivered twice: exactly what the victim printed at or after its last commit.
    let mut count: BTreeMap<(u64, u64), u32> = BTreeMap::new();
    for m in ["a", "b", "c"] {
        for r in printed(dir.path(), m) {
            *count.entry(r).or_default() += 1;
        }
    }
    let twice: BTreeSet<(u64, u64)> = count
        .iter()
        .filter(|(_, c)| **c > 1)
        .map(|(r, _)| *r)
        .collect();
    assert!(
        count.values().all(|c| *c <= 2),
        "a record was delivered three times"
    );
    let expected: BTreeSet<(u64, u64)> = victim_printed
        .iter()
        .filter(|(p, o)| *o >= at_kill.get(p).copied().unwrap_or(0))
        .copied()
        .collect();
    eprintln!("{} records delivered twice", twice.len());
    assert_eq!(
        twice, expected,
        "records delivered twice must be exactly those after the victim's last commit"
    );

    // Clean stops commit what was printed and leave the group.
    for m in survivors {
        signal(&members[m], 15); // SIGTERM
        let status = members.get_mut(m).unwrap().wait().unwrap();
        assert!(status.success(), "member {m} exited with {status}");
    }
    let d = cluster.describe_group("billing");
    assert_eq!(d["state"], "Empty", "{d}");
    let ends: BTreeMap<u64, u64> = d["offsets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| (o["partition"].as_u64().unwrap(), o["end"].as_u64().unwrap()))
        .collect();
    assert_eq!(committed(&d), ends, "everything printed is committed");

    // Many more commits of the same offsets fill several segments of the group's offsets
    // partition; compaction keeps only the latest per key, and the offsets stay.
    let final_offsets = committed(&d);
    commit_repeatedly(&cluster, "billing", &final_offsets, 400);
    wait_for(
        dir.path(),
        "__consumer_offsets compacted",
        Duration::from_secs(60),
        || {
            std::fs::read_to_string(&cluster.nodes[0].log)
                .unwrap_or_default()
                .lines()
                .any(|l| {
                    l.contains("compacted")
                        && l.contains("__consumer_offsets")
                        && !l.contains("records_removed=0")
                })
        },
    );
    assert_eq!(committed(&cluster.describe_group("billing")), final_offsets);

    // Committed offsets survive a restart of the cluster.
    cluster.nodes[0].kill();
    cluster.nodes[0].start();
    cluster.wait_members(1, Duration::from_secs(60));
    let after = cluster.describe_group("billing");
    assert_eq!(
        committed(&after),
        committed(&d),
        "offsets changed across the restart"
    );
    let list = cluster.cli(&["group", "list"]);
    assert!(String::from_utf8_lossy(&list.stdout).contains("billing"));

    // A new member starts at the committed offsets: only the new record.
    produce(&cluster, 1200, 1);
    let out = cluster.cli(&[
        "consume", "orders", "--group", "billing", "--max", "1", "--output", "json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["value"], "{\"id\":\"k1200\",\"n\":1200}");

    // Reset to the earliest offsets; a reset refuses while members are active.
    let out = cluster.cli(&[
        "group",
        "reset-offsets",
        "billing",
        "--to",
        "earliest",
        "--output",
        "json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        committed(&cluster.describe_group("billing"))
            .values()
            .all(|o| *o == 0)
    );
    let active = member(&cluster, dir.path(), "d");
    wait_for(dir.path(), "a new member", Duration::from_secs(30), || {
        cluster.describe_group("billing")["members"]
            .as_array()
            .unwrap()
            .len()
            == 1
    });
    let out = cluster.cli(&["group", "reset-offsets", "billing", "--to", "latest"]);
    assert!(!out.status.success());
    assert!(
        common::stderr_line(&out).contains("NON_EMPTY_GROUP"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for(
        dir.path(),
        "the reset group re-read from the start",
        Duration::from_secs(60),
        || printed(dir.path(), "d").len() >= 1201,
    );
    let mut active = active;
    signal(&active, 15);
    assert!(active.wait().unwrap().success());

    // Bad input: one line and a stable code.
    let out = cluster.cli(&["consume", "orders", "--group", "billing", "--from", "5"]);
    assert!(!out.status.success());
    assert!(common::stderr_line(&out).contains("earliest or latest"));
    let out = cluster.cli(&["consume", "nosuch", "--group", "billing", "--max", "1"]);
    assert!(!out.status.success());
    assert!(common::stderr_line(&out).contains("UNKNOWN_TOPIC_OR_PARTITION"));
}

/// The leader of a group's `__consumer_offsets` partition (its coordinator) is SIGKILLed: the
/// new leader reads the partition back and serves the same committed offsets, and a member
/// resumes right after them.
#[test]
fn a_new_coordinator_rebuilds_the_committed_offsets() {
    let _serial = common::serial();
    let mut cluster = Cluster::start(&["127.0.24.1", "127.0.24.2", "127.0.24.3"]);
    cluster.create_topic("events", 2, 3);
    let input: String = (0..100).map(|i| format!("{{\"id\":\"k{i}\"}}\n")).collect();
    let out = cluster.produce(&["events", "--key-field", "id"], input.as_bytes());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = cluster.cli(&[
        "consume", "events", "--group", "audit", "--from", "earliest", "--max", "60",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let before = committed(&cluster.describe_group("audit"));
    assert_eq!(before.values().sum::<u64>(), 60, "{before:?}");

    // Which node coordinates the group: the leader of its offsets partition.
    let out = cluster.cli(&[
        "topic",
        "describe",
        "__consumer_offsets",
        "--output",
        "json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    let p = aqueduct::broker::groups::coordinator_partition("audit", 50) as usize;
    let leader_addr = doc["partitions"][p]["leader"].as_str().unwrap().to_string();
    let coordinator = cluster
        .nodes
        .iter()
        .find(|n| n.grpc() == leader_addr)
        .unwrap()
        .id;
    eprintln!("group audit is coordinated by node {coordinator} (partition {p})");
    cluster.node(coordinator).kill();

    // The new coordinator has the same offsets; a member resumes after them.
    let deadline = Instant::now() + Duration::from_secs(60);
    let after = loop {
        let out = cluster.cli(&[
            "group",
            "describe",
            "audit",
            "--output",
            "json",
            "--timeout",
            "5",
        ]);
        if out.status.success() {
            let d: Value = serde_json::from_slice(&out.stdout).unwrap();
            break committed(&d);
        }
        assert!(Instant::now() < deadline, "no coordinator after the kill");
        sleep(Duration::from_millis(500));
    };
    assert_eq!(after, before, "the new coordinator lost committed offsets");
    let out = cluster.cli(&[
        "consume", "events", "--group", "audit", "--max", "40", "--output", "json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rest: Vec<(u64, u64)> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (
                v["partition"].as_u64().unwrap(),
                v["offset"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(rest.len(), 40);
    for (p, o) in &rest {
        assert!(
            *o >= before[p],
            "record {p}/{o} was before the committed offset"
        );
    }
    cluster.node(coordinator).start();
}
