//! Replicated partitions with real processes: three nodes on 127.0.x.y, a topic with
//! replication factor 3, the real CLI producing and consuming.
//!
//! * `aqueduct produce --acks all` runs while the partition leader is SIGKILLed and restarted
//!   repeatedly: afterwards every acknowledged record is at its acknowledged offset, offsets
//!   are contiguous, no record is in the log twice (the producer is idempotent), all three
//!   replicas hold byte-identical logs, and a full-cluster restart keeps every record;
//! * a Kafka batch is fetched back byte for byte apart from base offset and leader epoch, and
//!   each replica's data directory grows by 0.8–1.5× the produced bytes (records are stored
//!   once: the Raft log is the partition log).
//!
//! `AQ_PARTITION_KILLS` sets the number of leader kills (default 3).

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::thread::sleep;
use std::time::{Duration, Instant};

use common::{Cluster, LineProducer, Produced, aqueduct, serial, signal, wait_for};
use serde_json::Value;

fn wait_partition_leader(cluster: &Cluster, topic: &str, not: Option<u64>) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Some(l) = cluster.partition_leader(topic, 0)
            && Some(l) != not
        {
            return l;
        }
        sleep(Duration::from_millis(200));
    }
    panic!(
        "no partition leader (other than {not:?})\n{}",
        cluster.logs()
    );
}

/// Every record of partition 0, from the start, as (offset, value).
fn consume_all(cluster: &Cluster, topic: &str, expected: usize) -> Vec<(u64, String)> {
    let max = expected.to_string();
    consume_json(
        cluster,
        &[
            "consume",
            topic,
            "--from",
            "earliest",
            "--partition",
            "0",
            "--max",
            &max,
        ],
    )
}

/// `consume ARGS --output json`, as (offset, value) per record.
fn consume_json(cluster: &Cluster, args: &[&str]) -> Vec<(u64, String)> {
    let mut all = args.to_vec();
    all.extend(["--output", "json"]);
    let out = cluster.cli(&all);
    assert!(
        out.status.success(),
        "consume failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (
                v["offset"].as_u64().unwrap(),
                v["value"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn high_watermark(cluster: &Cluster, topic: &str) -> u64 {
    let out = cluster.cli(&["topic", "describe", topic, "--output", "json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    doc["partitions"][0]["high_watermark"].as_u64().unwrap()
}

/// Stops every node once `view` of their data directories agrees (followers catch up a
/// moment after the leader commits): compares after stopping, and if they differ, restarts
/// them for a while and compares again (a few rounds at most; the caller asserts).
fn stop_when_replicas_agree<T: PartialEq>(cluster: &mut Cluster, view: impl Fn(&Path) -> T) {
    for round in 0..5 {
        sleep(Duration::from_secs(2));
        for node in &mut cluster.nodes {
            node.kill();
        }
        let first = view(&cluster.nodes[0].data_dir);
        if cluster.nodes[1..]
            .iter()
            .all(|n| view(&n.data_dir) == first)
            || round == 4
        {
            return;
        }
        for node in &mut cluster.nodes {
            node.start();
        }
        cluster.wait_members(3, Duration::from_secs(60));
    }
}

/// The concatenated `.log` segment files of a replica.
fn log_bytes(data_dir: &Path, topic: &str) -> Vec<u8> {
    let dir = partition_dir(data_dir, topic);
    let mut names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    names.sort();
    names
        .iter()
        .flat_map(|p| std::fs::read(p).unwrap())
        .collect()
}

/// The directory of partition 0 of `topic` (`<topic>-0-<topic id>`).
fn partition_dir(data_dir: &Path, topic: &str) -> std::path::PathBuf {
    let parent = data_dir.join("partitions");
    let prefix = format!("{topic}-0-");
    std::fs::read_dir(&parent)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(&prefix))
        })
        .unwrap_or_else(|| panic!("no {prefix}* under {}", parent.display()))
}

/// Total length of the files under `dir` (apparent sizes).
fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let meta = e.metadata().unwrap();
            total += if meta.is_dir() {
                dir_bytes(&e.path())
            } else {
                meta.len()
            };
        }
    }
    total
}

#[test]
fn acked_records_survive_partition_leader_kills_and_replicas_agree() {
    let _serial = serial();
    let kills: usize = std::env::var("AQ_PARTITION_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let mut cluster = Cluster::start(&["127.0.7.1", "127.0.7.2", "127.0.7.3"]);
    let out = cluster.cli(&["topic", "create", "events", "--replication-factor", "3"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_partition_leader(&cluster, "events", None);

    // The producer: lines from a writer thread, acknowledgements on its stdout.
    let producer = LineProducer::start(&cluster, &["events", "--acks", "all", "--partition", "0"]);

    for round in 0..kills {
        sleep(Duration::from_millis(1500));
        let leader = wait_partition_leader(&cluster, "events", None);
        eprintln!("round {round}: SIGKILL partition leader node {leader}");
        cluster.node(leader).kill();
        let next = wait_partition_leader(&cluster, "events", Some(leader));
        eprintln!("round {round}: node {next} leads the partition");
        sleep(Duration::from_millis(1000));
        cluster.node(leader).start();
        cluster.wait_members(3, Duration::from_secs(60));
    }
    sleep(Duration::from_millis(1000));
    let Produced {
        written,
        acks,
        status,
        stderr,
    } = producer.finish();
    let acks: BTreeMap<u64, u64> = acks
        .iter()
        .map(|(line, v)| (*line, v["offset"].as_u64().unwrap()))
        .collect();
    eprintln!(
        "{written} records written, {} acknowledged, producer exit {status}",
        acks.len()
    );
    assert!(
        acks.len() as u64 * 10 >= written * 9,
        "too few records acknowledged ({} of {written}): {stderr}",
        acks.len()
    );

    let (hw, records) = check_acknowledged_once(&mut cluster, "events", &acks);

    // A full-cluster restart keeps every committed record.
    for node in &mut cluster.nodes {
        node.start();
    }
    cluster.wait_members(3, Duration::from_secs(60));
    wait_partition_leader(&cluster, "events", None);
    let after = consume_all(&cluster, "events", hw as usize);
    assert_eq!(after, records, "records changed across the restart");
}

/// Checks partition 0 of `topic` against a [`LineProducer`]'s acknowledgements (line →
/// offset): offsets are contiguous, every acknowledged line is at its offset, no line is
/// stored twice (the producer is idempotent), and once caught up every replica holds a
/// byte-identical log (the cluster is stopped for that). Returns the high watermark and the
/// records.
fn check_acknowledged_once(
    cluster: &mut Cluster,
    topic: &str,
    acks: &BTreeMap<u64, u64>,
) -> (u64, Vec<(u64, String)>) {
    let hw = high_watermark(cluster, topic);
    let records = consume_all(cluster, topic, hw as usize);
    assert_eq!(
        records.len() as u64,
        hw,
        "consumed fewer records than the high watermark"
    );
    for (i, (offset, _)) in records.iter().enumerate() {
        assert_eq!(*offset, i as u64, "offsets are not contiguous");
    }
    for (line, offset) in acks {
        assert_eq!(
            records[*offset as usize].1,
            format!("rec-{line}"),
            "acknowledged line {line} is not at its offset {offset}"
        );
    }
    let mut seen: HashMap<&str, u32> = HashMap::new();
    for (_, v) in &records {
        *seen.entry(v.as_str()).or_default() += 1;
    }
    let duplicates: u32 = seen.values().map(|c| c - 1).sum();
    eprintln!("{hw} records in the log, {duplicates} duplicates");
    // A batch retried across a leader change (the old leader may have written it before it
    // died) is recognised, never written twice.
    assert_eq!(duplicates, 0, "idempotent retries wrote records twice");

    stop_when_replicas_agree(cluster, |dir| log_bytes(dir, topic));
    let reference = log_bytes(&cluster.nodes[0].data_dir, topic);
    for node in &cluster.nodes[1..] {
        assert!(
            log_bytes(&node.data_dir, topic) == reference,
            "node {}'s log differs from node 1's",
            node.id
        );
    }
    (hw, records)
}

/// A partition leader that freezes (SIGSTOP: its connections stay open, nothing answers) is
/// replaced, and a running producer carries on with the new leader while the old one is
/// still frozen: every record written is acknowledged, exactly once, before it thaws.
#[test]
fn a_frozen_partition_leader_is_replaced_and_the_producer_carries_on() {
    let _serial = serial();
    let mut cluster = Cluster::start(&["127.0.28.1", "127.0.28.2", "127.0.28.3"]);
    let out = cluster.cli(&["topic", "create", "events", "--replication-factor", "3"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_partition_leader(&cluster, "events", None);
    let producer = LineProducer::start(&cluster, &["events", "--acks", "all", "--partition", "0"]);
    sleep(Duration::from_millis(1500));
    let frozen = wait_partition_leader(&cluster, "events", None);
    eprintln!("SIGSTOP partition leader node {frozen}");
    signal(cluster.node(frozen).child.as_ref().unwrap(), 19);
    let next = wait_partition_leader(&cluster, "events", Some(frozen));
    eprintln!("node {next} leads the partition");
    sleep(Duration::from_millis(3000));
    // Still frozen: the producer must get everything acknowledged without it.
    let Produced {
        written,
        acks,
        status,
        stderr,
    } = producer.finish();
    eprintln!("{written} records written, {} acknowledged", acks.len());
    assert!(status.success(), "producer failed: {stderr}");
    assert_eq!(
        acks.len() as u64,
        written,
        "not every record was acknowledged: {stderr}"
    );
    signal(cluster.node(frozen).child.as_ref().unwrap(), 18);
    // Thawed, the old leader learns it was replaced (its first heartbeat is refused).
    wait_for(
        "the thawed node to give up leadership",
        Duration::from_secs(30),
        || {
            cluster
                .partition_leader("events", 0)
                .is_some_and(|l| l != frozen)
        },
    );
    let acks: BTreeMap<u64, u64> = acks
        .iter()
        .map(|(line, v)| (*line, v["offset"].as_u64().unwrap()))
        .collect();
    let (hw, _) = check_acknowledged_once(&mut cluster, "events", &acks);
    assert_eq!(hw, written, "the log holds records nobody wrote");
}

#[test]
fn batches_come_back_byte_for_byte_and_are_stored_once() {
    let _serial = serial();
    let cluster = Cluster::start(&["127.0.8.1", "127.0.8.2", "127.0.8.3"]);
    let out = cluster.cli(&["topic", "create", "bulk", "--replication-factor", "3"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let leader = wait_partition_leader(&cluster, "bulk", None);
    let leader_addr = cluster
        .nodes
        .iter()
        .find(|n| n.id == leader)
        .unwrap()
        .grpc();

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        use aqueduct_protocol::data as pb;
        let mut client = pb::data_client::DataClient::connect(format!("http://{leader_addr}"))
            .await
            .unwrap();
        use aqueduct::client::records::{ProducerRecord, encode_batch};
        let batch = encode_batch(
            &[
                ProducerRecord::value("first value").with_key("k1"),
                ProducerRecord::value("second value"),
            ],
            None,
        )
        .unwrap()
        .to_vec();
        let reply = client
            .produce(pb::ProduceRequest {
                topic: "bulk".into(),
                partition: 0,
                batch: batch.clone(),
                acks: pb::Acks::All as i32,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!((reply.base_offset, reply.last_offset), (0, 1));
        let fetched = client
            .fetch(pb::FetchRequest {
                topic: "bulk".into(),
                partition: 0,
                offset: 0,
                max_bytes: 1 << 20,
                max_wait_ms: 0,
            })
            .await
            .unwrap()
            .into_inner();
        let got = fetched.batches;
        assert_eq!(got.len(), batch.len());
        // Base offset (0..8) and partition leader epoch (12..16) are the log's; the rest is
        // what the producer sent.
        assert_eq!(&got[8..12], &batch[8..12]);
        assert_eq!(&got[16..], &batch[16..]);
        assert_eq!(i64::from_be_bytes(got[..8].try_into().unwrap()), 0);

        // A corrupt batch is refused before it reaches the log, and nothing changes.
        let mut bad = batch.clone();
        let last = bad.len() - 1;
        bad[last] ^= 0xff;
        let err = client
            .produce(pb::ProduceRequest {
                topic: "bulk".into(),
                partition: 0,
                batch: bad,
                acks: pb::Acks::All as i32,
            })
            .await
            .unwrap_err();
        assert_eq!(
            err.metadata().get("aq-error").unwrap().to_str().unwrap(),
            "CORRUPT_MESSAGE"
        );
    });

    // ~8 MB of 1 KiB records through the CLI: every replica's data directory grows by
    // 0.8–1.5× that (one copy of each record, plus indexes and metadata).
    let before: Vec<u64> = cluster
        .nodes
        .iter()
        .map(|n| dir_bytes(&n.data_dir))
        .collect();
    let value = "x".repeat(1000);
    let lines = 8000;
    let input = format!("{value}\n").repeat(lines);
    let out = cluster.produce(&["bulk", "--acks", "all"], input.as_bytes());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let produced = (lines * value.len()) as f64;
    sleep(Duration::from_secs(2));
    for (node, before) in cluster.nodes.iter().zip(before) {
        let grown = dir_bytes(&node.data_dir).saturating_sub(before) as f64;
        let ratio = grown / produced;
        eprintln!(
            "node {}: data directory grew {grown} bytes, {ratio:.3}× produced",
            node.id
        );
        assert!(
            (0.8..=1.5).contains(&ratio),
            "node {} grew {ratio:.3}× the produced bytes",
            node.id
        );
    }
}

/// Produces `n` lines of `size` bytes through the CLI (acks=all), in chunks of `chunk`.
fn produce_lines(cluster: &Cluster, topic: &str, n: usize, size: usize, chunk: usize) {
    let mut producer = cluster.producer(&[topic, "--acks", "all", "--partition", "0"]);
    {
        let mut stdin = producer.stdin.take().unwrap();
        for i in 0..n {
            writeln!(stdin, "{i:08}{}", "r".repeat(size.saturating_sub(8))).unwrap();
            if i % chunk == chunk - 1 {
                stdin.flush().unwrap();
                sleep(Duration::from_millis(30));
            }
        }
    }
    let out = producer.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn describe(cluster: &Cluster, topic: &str) -> Value {
    let out = cluster.cli(&["topic", "describe", topic, "--output", "json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Every entry of a stopped replica's partition log: (first index, entries as comparable
/// tuples).
/// An entry as compared between replicas: index, term, base offset, whether it holds records,
/// payload.
type EntryView = (u64, u64, u64, bool, Vec<u8>);

fn replica_entries(data_dir: &Path, topic: &str) -> (Option<u64>, Vec<EntryView>) {
    use aqueduct_storage::fs::StdFs;
    use aqueduct_storage::metrics::StorageMetrics;
    use aqueduct_storage::{LogOptions, PartitionLog};
    let log = PartitionLog::open(
        Arc::new(StdFs),
        &partition_dir(data_dir, topic),
        LogOptions::default(),
        Arc::new(StorageMetrics::default()),
    )
    .unwrap();
    let first = log.first_index();
    let entries = match first {
        Some(f) => log
            .read(f, log.next_index(), usize::MAX)
            .unwrap()
            .into_iter()
            .map(|e| {
                (
                    e.entry.index,
                    e.entry.term,
                    e.base_offset,
                    e.entry.kind == aqueduct_storage::EntryKind::Data,
                    e.entry.payload.to_vec(),
                )
            })
            .collect(),
        None => Vec::new(),
    };
    (first, entries)
}

#[test]
fn follower_down_across_a_retention_purge_comes_back_identical() {
    let _serial = serial();
    let mut cluster = Cluster::start_with(
        &["127.0.9.1", "127.0.9.2", "127.0.9.3"],
        &[("AQUEDUCT_RETENTION_CHECK_MS", "300")],
    );
    let out = cluster.cli(&[
        "topic",
        "create",
        "retained",
        "--replication-factor",
        "3",
        "--config",
        "segment.bytes=65536",
        "--config",
        "retention.bytes=262144",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let leader = wait_partition_leader(&cluster, "retained", None);
    produce_lines(&cluster, "retained", 100, 1000, 20);

    // A follower goes down; the others take 1 MB more, roll segments and purge the start.
    let follower = cluster
        .nodes
        .iter()
        .map(|n| n.id)
        .find(|id| *id != leader)
        .unwrap();
    cluster.node(follower).kill();
    produce_lines(&cluster, "retained", 1000, 1000, 20);
    let deadline = Instant::now() + Duration::from_secs(30);
    let start = loop {
        let d = describe(&cluster, "retained");
        let start = d["partitions"][0]["log_start_offset"].as_u64().unwrap_or(0);
        if start > 100 {
            break start;
        }
        assert!(Instant::now() < deadline, "retention never purged: {d}");
        sleep(Duration::from_millis(300));
    };
    eprintln!("log start moved to offset {start} while node {follower} was down");

    // It comes back behind the purge point, gets the snapshot, and then every later entry.
    cluster.node(follower).start();
    cluster.wait_members(3, Duration::from_secs(60));
    produce_lines(&cluster, "retained", 50, 1000, 10);
    let hw = describe(&cluster, "retained")["partitions"][0]["high_watermark"]
        .as_u64()
        .unwrap();
    stop_when_replicas_agree(&mut cluster, |dir| replica_entries(dir, "retained"));
    let log = std::fs::read_to_string(&cluster.node(follower).log).unwrap();
    assert!(
        log.contains("snapshot past the local log's end"),
        "node {follower} did not catch up through a snapshot"
    );
    let reference = replica_entries(&cluster.nodes[0].data_dir, "retained");
    assert!(reference.0.is_some_and(|f| f > 0), "nothing was purged");
    for node in &cluster.nodes[1..] {
        let got = replica_entries(&node.data_dir, "retained");
        assert_eq!(got.0, reference.0, "node {} starts elsewhere", node.id);
        assert!(
            got.1 == reference.1,
            "node {}'s log differs from node 1's after the retention point",
            node.id
        );
    }
    // The last batch ends at the high watermark (entries after it hold no records).
    let last = reference.1.iter().rev().find(|e| e.3).unwrap();
    let count = aqueduct_storage::batch::inspect(&last.4)
        .unwrap()
        .offset_count;
    assert_eq!(last.2 + u64::from(count), hw);
}

/// The partition directories of `topic` on a node.
fn partition_dirs(data_dir: &Path, topic: &str) -> Vec<String> {
    std::fs::read_dir(data_dir.join("partitions"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().to_string())
                .filter(|n| n.starts_with(&format!("{topic}-")))
                .collect()
        })
        .unwrap_or_default()
}

/// Topic lifecycle: producing auto-creates a topic, configs are altered (bad ones refused),
/// deletion removes every replica (also on a node that was down at the time), and a topic
/// created again under the same name starts empty.
#[test]
fn topics_auto_create_alter_delete_and_recreate() {
    let _serial = serial();
    let mut cluster = Cluster::start(&["127.0.10.1", "127.0.10.2", "127.0.10.3"]);

    let out = cluster.produce(&["auto", "--output", "json"], b"a\nb\nc\n");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 3);
    let out = cluster.cli(&["topic", "list", "--output", "json"]);
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    let auto = &doc["topics"][0];
    assert_eq!(auto["name"], "auto");
    assert_eq!(auto["partitions"], 1);
    assert_eq!(
        auto["replication_factor"], 3,
        "auto-create uses min(3, nodes)"
    );
    let values: Vec<String> = consume_all(&cluster, "auto", 3)
        .into_iter()
        .map(|r| r.1)
        .collect();
    assert_eq!(values, ["a", "b", "c"]);

    let out = cluster.cli(&["topic", "alter", "auto", "--config", "bogus=1"]);
    assert!(!out.status.success());
    assert!(common::stderr_line(&out).contains("INVALID_CONFIG"));
    let out = cluster.cli(&["topic", "alter", "auto", "--config", "retention.bytes=x"]);
    assert!(common::stderr_line(&out).contains("INVALID_CONFIG"));
    let out = cluster.cli(&[
        "topic",
        "alter",
        "auto",
        "--config",
        "retention.ms=3600000",
        "--output",
        "json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["configs"]["retention.ms"], "3600000");

    // Node 3 is down while the topic is deleted; it cleans up when it comes back.
    cluster.node(3).kill();
    let out = cluster.cli(&["topic", "delete", "auto"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!cluster.topics().contains("auto"));
    for id in [1, 2] {
        let dir = cluster.node(id).data_dir.clone();
        wait_for("replica removal", Duration::from_secs(20), || {
            partition_dirs(&dir, "auto").is_empty()
        });
    }
    let dir3 = cluster.node(3).data_dir.clone();
    assert_eq!(partition_dirs(&dir3, "auto").len(), 1);
    cluster.node(3).start();
    cluster.wait_members(3, Duration::from_secs(60));
    wait_for(
        "cleanup on the returning node",
        Duration::from_secs(20),
        || partition_dirs(&dir3, "auto").is_empty(),
    );
    let out = cluster.cli(&["consume", "auto", "--from", "earliest", "--max", "1"]);
    assert!(common::stderr_line(&out).contains("UNKNOWN_TOPIC_OR_PARTITION"));

    // The same name again is a new, empty topic.
    let out = cluster.cli(&["topic", "create", "auto", "--replication-factor", "3"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_partition_leader(&cluster, "auto", None);
    produce_lines(&cluster, "auto", 1, 10, 1);
    let records = consume_all(&cluster, "auto", 1);
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].0, 0);
    assert!(records[0].1.starts_with("00000000"));

    // Leaders end up on their preferred replicas: three partitions, three different leaders.
    let out = cluster.cli(&[
        "topic",
        "create",
        "balanced",
        "--partitions",
        "3",
        "--replication-factor",
        "3",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for("one leader per node", Duration::from_secs(60), || {
        let d = describe(&cluster, "balanced");
        let leaders: std::collections::BTreeSet<String> = d["partitions"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|p| p["leader"].as_str().map(str::to_string))
            .collect();
        leaders.len() == 3
    });
}

/// The CLI's other paths on one node: `--acks leader` offsets, `--key` partitioning (murmur2,
/// as the Java client), `consume --from latest` waiting for new records (long poll), and
/// `--from` an RFC 3339 time.
#[test]
fn produce_and_consume_options() {
    let _serial = serial();
    let cluster = Cluster::start(&["127.0.11.1"]);
    let out = cluster.cli(&["topic", "create", "opts", "--partitions", "4"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Keyed records all land in the partition the key hashes to.
    let produce = |args: &[&str], input: &str| -> Vec<Value> {
        let mut all = args.to_vec();
        all.extend(["--output", "json"]);
        let out = cluster.produce(&all, input.as_bytes());
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let acks = produce(
        &["opts", "--key", "customer-42", "--acks", "leader"],
        "a\nb\nc\n",
    );
    let expected = aqueduct::client::records::partition_for_key(b"customer-42", 4);
    assert_eq!(acks.len(), 3);
    for (i, a) in acks.iter().enumerate() {
        assert_eq!(a["partition"], expected);
        assert_eq!(a["offset"], i as u64);
        assert_eq!(a["line"], i as u64);
    }

    // `--from latest` sees only what is produced after it started, and its fetch waits for
    // it (long poll).
    let before = produce(&["opts", "--partition", "1"], "before\n")[0]["offset"]
        .as_u64()
        .unwrap();
    let mut consumer = aqueduct()
        .args([
            "consume",
            "opts",
            "--partition",
            "1",
            "--from",
            "latest",
            "--max",
            "1",
            "--output",
            "json",
            "--server",
        ])
        .arg(cluster.servers())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    sleep(Duration::from_secs(2));
    assert!(
        consumer.try_wait().unwrap().is_none(),
        "consume ended without a record"
    );
    produce(&["opts", "--partition", "1"], "after\n");
    let deadline = Instant::now() + Duration::from_secs(30);
    while consumer.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "consume --from latest never returned"
        );
        sleep(Duration::from_millis(100));
    }
    let out = consumer.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (v["offset"].as_u64(), v["value"].as_str()),
        (Some(before + 1), Some("after"))
    );

    // `--from TIME` starts at the first record at or after it.
    let t = chrono_now_rfc3339();
    sleep(Duration::from_millis(50));
    produce(&["opts", "--partition", "1"], "after-t\n");
    let out = cluster.cli(&[
        "consume",
        "opts",
        "--partition",
        "1",
        "--from",
        &t,
        "--max",
        "1",
        "--output",
        "json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["value"], "after-t");

    // `message show` prints one body exactly as produced: by offset, by key (the latest with
    // that key), by time; bytes need not be UTF-8.
    let show = |args: &[&str]| -> Vec<u8> {
        let mut all = vec!["message", "show", "opts"];
        all.extend_from_slice(args);
        let out = cluster.cli(&all);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    };
    let keyed = expected.to_string();
    assert_eq!(show(&["--partition", &keyed, "--offset", "1"]), b"b");
    assert_eq!(show(&["--key", "customer-42"]), b"c");
    assert_eq!(show(&["--partition", "1", "--time", &t]), b"after-t");
    let out = cluster.produce(&["opts", "--partition", "3"], b"\xff\xfe raw \x00 bytes\n");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        show(&["--partition", "3", "--offset", "0"]),
        b"\xff\xfe raw \x00 bytes"
    );
    let json: Value = serde_json::from_slice(&show(&[
        "--partition",
        &keyed,
        "--offset",
        "0",
        "--output",
        "json",
    ]))
    .unwrap();
    assert_eq!(
        (json["key"].as_str(), json["value"].as_str()),
        (Some("customer-42"), Some("a"))
    );
    let out = cluster.cli(&[
        "message",
        "show",
        "opts",
        "--partition",
        "3",
        "--offset",
        "7",
    ]);
    assert!(!out.status.success());
    common::stderr_line(&out);

    // Bad input: an offset past the end, and a record too large for one batch, fail with one
    // line each and a stable code; the records around the large one are still produced.
    let out = cluster.cli(&[
        "consume",
        "opts",
        "--partition",
        "1",
        "--from",
        "999999",
        "--max",
        "1",
    ]);
    assert!(!out.status.success());
    assert!(common::stderr_line(&out).contains("OFFSET_OUT_OF_RANGE"));
    let mut child = cluster.producer(&["opts", "--partition", "2", "--output", "json"]);
    {
        let mut stdin = child.stdin.take().unwrap();
        writeln!(stdin, "small-1").unwrap();
        stdin.flush().unwrap();
        sleep(Duration::from_millis(500));
        writeln!(stdin, "{}", "L".repeat(1_200_000)).unwrap();
        stdin.flush().unwrap();
        sleep(Duration::from_millis(500));
        writeln!(stdin, "small-2").unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let errors: Vec<&str> = stderr.lines().filter(|l| l.contains("line ")).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(
        errors[0].contains("line 1:") && errors[0].contains("RECORD_BATCH_TOO_LARGE"),
        "{stderr}"
    );
    let acked: Vec<u64> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["line"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(acked, [0, 2]);
}

fn chrono_now_rfc3339() -> String {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// With auto-create off, producing to an unknown topic fails with one line and a stable code,
/// and creates nothing.
#[test]
fn unknown_topic_is_refused_when_auto_create_is_off() {
    let _serial = serial();
    let cluster = Cluster::start_with(&["127.0.12.1"], &[("AQUEDUCT_AUTO_CREATE_TOPICS", "false")]);
    let out = cluster.produce(&["nowhere"], b"x\n");
    assert_eq!(out.status.code(), Some(1));
    assert!(common::stderr_line(&out).contains("UNKNOWN_TOPIC"));
    assert!(cluster.topics().is_empty());
}

/// A compacted topic on three replicas: keyed updates over many small segments are compacted
/// to the latest value per key on every replica, byte for byte alike, with every surviving
/// record at the offset it was acknowledged at; `message show --key` still finds the latest
/// value, and a full restart keeps the compacted log.
#[test]
fn compaction_keeps_the_latest_value_per_key_on_every_replica() {
    let _serial = serial();
    let mut cluster = Cluster::start_with(
        &["127.0.12.1", "127.0.12.2", "127.0.12.3"],
        &[("AQUEDUCT_RETENTION_CHECK_MS", "300")],
    );
    let out = cluster.cli(&[
        "topic",
        "create",
        "shadows",
        "--replication-factor",
        "3",
        "--config",
        "cleanup.policy=compact",
        "--config",
        "segment.bytes=65536",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pad = "x".repeat(300);
    let mut input = String::new();
    for i in 0..2000 {
        input.push_str(&format!(
            "{{\"id\":\"dev-{}\",\"seq\":{i},\"pad\":\"{pad}\"}}\n",
            i % 20
        ));
    }
    let out = cluster.produce(
        &[
            "shadows",
            "--key-field",
            "id",
            "--output",
            "json",
            "--batch-bytes",
            "16384",
        ],
        input.as_bytes(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = input.lines().collect();
    // offset -> line produced there.
    let acked: BTreeMap<u64, usize> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (
                v["offset"].as_u64().unwrap(),
                v["line"].as_u64().unwrap() as usize,
            )
        })
        .collect();
    assert_eq!(acked.len(), 2000);
    let hw = high_watermark(&cluster, "shadows");
    assert_eq!(hw, 2000);

    // Compaction runs once segments are sealed.
    wait_for("compaction", Duration::from_secs(60), || {
        cluster.nodes.iter().all(|n| {
            std::fs::read_to_string(&n.log)
                .unwrap_or_default()
                .contains("compacted")
        })
    });
    sleep(Duration::from_secs(2));
    let remaining = consume_from_show(&cluster);
    eprintln!(
        "{} of 2000 records remain after compaction",
        remaining.len()
    );
    assert!(remaining.len() < 1000, "compaction removed too little");
    // Every surviving record is the one acknowledged at its offset, in offset order.
    let mut last = None;
    for (offset, value) in &remaining {
        assert_eq!(value, lines[acked[offset]], "record at {offset} changed");
        assert!(last < Some(*offset));
        last = Some(*offset);
    }
    // The latest value of every key survives.
    for k in 0..20 {
        let latest = (0..2000).rev().find(|i| i % 20 == k).unwrap();
        let offset = acked
            .iter()
            .find(|(_, l)| **l == latest)
            .map(|(o, _)| *o)
            .unwrap();
        assert!(
            remaining.iter().any(|(o, _)| *o == offset),
            "the latest value of dev-{k} is gone"
        );
    }
    let out = cluster.cli(&["message", "show", "shadows", "--key", "dev-7"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), lines[1987]);

    // Replicas compacted alike; a full restart keeps it.
    stop_when_replicas_agree(&mut cluster, |dir| log_bytes(dir, "shadows"));
    let reference = log_bytes(&cluster.nodes[0].data_dir, "shadows");
    for node in &cluster.nodes[1..] {
        assert!(
            log_bytes(&node.data_dir, "shadows") == reference,
            "node {}'s compacted log differs from node 1's:\n{}\n{}",
            node.id,
            segment_listing(&cluster.nodes[0].data_dir, "shadows"),
            segment_listing(&node.data_dir, "shadows")
        );
    }
    for node in &mut cluster.nodes {
        node.start();
    }
    cluster.wait_members(3, Duration::from_secs(60));
    wait_partition_leader(&cluster, "shadows", None);
    // Compaction may have gone on meanwhile (the replicas sealed more): what is left is a
    // subset of what was there, and still holds the latest value of every key.
    let after = consume_from_show(&cluster);
    assert!(
        after.iter().all(|r| remaining.contains(r)),
        "records came back or changed"
    );
    for k in 0..20 {
        let latest = 1980 + k;
        assert!(
            after.iter().any(|(o, _)| acked[o] == latest),
            "the latest value of dev-{k} is gone after the restart"
        );
    }
}

/// Every record of partition 0 of `shadows` (offset, value), read to the end.
fn consume_from_show(cluster: &Cluster) -> Vec<(u64, String)> {
    consume_json(
        cluster,
        &[
            "consume",
            "shadows",
            "--from",
            "earliest",
            "--partition",
            "0",
            "--end",
        ],
    )
}

/// `name size` of every file of partition 0 of `topic`, for failure messages.
fn segment_listing(data_dir: &Path, topic: &str) -> String {
    let mut names: Vec<String> = std::fs::read_dir(partition_dir(data_dir, topic))
        .unwrap()
        .flatten()
        .map(|e| {
            format!(
                "{} {}",
                e.file_name().to_string_lossy(),
                e.metadata().map_or(0, |m| m.len())
            )
        })
        .collect();
    names.sort();
    names.join(", ")
}
