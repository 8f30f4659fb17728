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

use common::kafka::{Lines, Wire, kafka, python_json};
use common::proxy::{FaultProxy, Faults, Stats};
use common::{Cluster, committed, serial, signal};
use kafka_protocol::messages as kp;
use kafka_protocol::protocol::StrBytes;
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

/// Consumer-protocol subscription metadata (version 0) for one topic.
fn subscription(topic: &str) -> bytes::Bytes {
    let mut m = vec![0u8, 0, 0, 0, 0, 1];
    m.extend_from_slice(&(topic.len() as i16).to_be_bytes());
    m.extend_from_slice(topic.as_bytes());
    m.extend_from_slice(&(-1i32).to_be_bytes());
    bytes::Bytes::from(m)
}

fn join_request(
    group: &str,
    member: &str,
    protocol_type: &str,
    session_ms: i32,
    rebalance_ms: i32,
) -> kp::JoinGroupRequest {
    kp::JoinGroupRequest::default()
        .with_group_id(kp::GroupId(StrBytes::from_string(group.into())))
        .with_member_id(StrBytes::from_string(member.into()))
        .with_protocol_type(StrBytes::from_string(protocol_type.into()))
        .with_session_timeout_ms(session_ms)
        .with_rebalance_timeout_ms(rebalance_ms)
        .with_protocols(vec![
            kp::join_group_request::JoinGroupRequestProtocol::default()
                .with_name(StrBytes::from_static_str("range"))
                .with_metadata(subscription("fence")),
        ])
}

fn join(w: &mut Wire, req: &kp::JoinGroupRequest) -> kp::JoinGroupResponse {
    w.call(kp::ApiKey::JoinGroup, 7, req)
}

/// Joins as a new member: learns its member id (MEMBER_ID_REQUIRED), then joins with it,
/// waiting out a coordinator that is still loading.
fn join_new(
    w: &mut Wire,
    group: &str,
    session_ms: i32,
    rebalance_ms: i32,
) -> kp::JoinGroupResponse {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = join(
            w,
            &join_request(group, "", "consumer", session_ms, rebalance_ms),
        );
        match r.error_code {
            MEMBER_ID_REQUIRED => {
                let id = r.member_id.to_string();
                return join(
                    w,
                    &join_request(group, &id, "consumer", session_ms, rebalance_ms),
                );
            }
            // As a client does: find the coordinator (this creates `__consumer_offsets`).
            14..=16 if Instant::now() < deadline => {
                let _: kp::FindCoordinatorResponse = w.call(
                    kp::ApiKey::FindCoordinator,
                    3,
                    &kp::FindCoordinatorRequest::default()
                        .with_key(StrBytes::from_string(group.into())),
                );
                sleep(Duration::from_millis(200));
            }
            code => panic!("JoinGroup answered {code}, not MEMBER_ID_REQUIRED"),
        }
    }
}

fn heartbeat(w: &mut Wire, group: &str, member: &str, generation: i32) -> i16 {
    let r: kp::HeartbeatResponse = w.call(
        kp::ApiKey::Heartbeat,
        4,
        &kp::HeartbeatRequest::default()
            .with_group_id(kp::GroupId(StrBytes::from_string(group.into())))
            .with_member_id(StrBytes::from_string(member.into()))
            .with_generation_id(generation),
    );
    r.error_code
}

fn sync(w: &mut Wire, group: &str, member: &str, generation: i32) -> i16 {
    let r: kp::SyncGroupResponse = w.call(
        kp::ApiKey::SyncGroup,
        5,
        &kp::SyncGroupRequest::default()
            .with_group_id(kp::GroupId(StrBytes::from_string(group.into())))
            .with_member_id(StrBytes::from_string(member.into()))
            .with_generation_id(generation)
            .with_protocol_type(Some(StrBytes::from_static_str("consumer")))
            .with_protocol_name(Some(StrBytes::from_static_str("range")))
            .with_assignments(vec![
                kp::sync_group_request::SyncGroupRequestAssignment::default()
                    .with_member_id(StrBytes::from_string(member.into()))
                    .with_assignment(bytes::Bytes::from_static(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0])),
            ]),
    );
    r.error_code
}

fn commit(w: &mut Wire, group: &str, member: &str, generation: i32, offset: i64) -> i16 {
    let r: kp::OffsetCommitResponse = w.call(
        kp::ApiKey::OffsetCommit,
        7,
        &kp::OffsetCommitRequest::default()
            .with_group_id(kp::GroupId(StrBytes::from_string(group.into())))
            .with_member_id(StrBytes::from_string(member.into()))
            .with_generation_id_or_member_epoch(generation)
            .with_topics(vec![
                kp::offset_commit_request::OffsetCommitRequestTopic::default()
                    .with_name(kp::TopicName(StrBytes::from_static_str("fence")))
                    .with_partitions(vec![
                        kp::offset_commit_request::OffsetCommitRequestPartition::default()
                            .with_partition_index(0)
                            .with_committed_offset(offset),
                    ]),
            ]),
    );
    r.topics[0].partitions[0].error_code
}

fn group_state(w: &mut Wire, group: &str) -> (String, usize) {
    let r: kp::DescribeGroupsResponse = w.call(
        kp::ApiKey::DescribeGroups,
        5,
        &kp::DescribeGroupsRequest::default()
            .with_groups(vec![kp::GroupId(StrBytes::from_string(group.into()))]),
    );
    let g = &r.groups[0];
    (g.group_state.to_string(), g.members.len())
}

const NONE: i16 = 0;
const ILLEGAL_GENERATION: i16 = 22;
const INCONSISTENT_GROUP_PROTOCOL: i16 = 23;
const UNKNOWN_MEMBER_ID: i16 = 25;
const REBALANCE_IN_PROGRESS: i16 = 27;
const MEMBER_ID_REQUIRED: i16 = 79;

/// The group protocol's error codes at the moments Kafka gives them, on the wire: a stale
/// generation is ILLEGAL_GENERATION, a stranger UNKNOWN_MEMBER_ID, a member of a group that
/// is rebalancing REBALANCE_IN_PROGRESS, another protocol type INCONSISTENT_GROUP_PROTOCOL; a
/// member that does not rejoin within the rebalance timeout is dropped from the new
/// generation, and one that stops heartbeating leaves after its session timeout.
#[test]
fn the_group_protocol_fences_generations_and_times_members_out() {
    let _serial = serial();
    let hosts = ["127.0.48.1"];
    let cluster = Cluster::start(&hosts);
    cluster.create_topic("fence", 1, 1);
    let addr = kafka(hosts[0]);
    let g = "g-fence";
    let mut a = Wire::connect(&addr);
    let joined = join_new(&mut a, g, 6000, 3000);
    assert_eq!(joined.error_code, NONE, "first join");
    let a_id = joined.member_id.to_string();
    let generation = joined.generation_id;
    assert_eq!(joined.leader.to_string(), a_id, "the only member leads");
    assert_eq!(sync(&mut a, g, &a_id, generation), NONE);
    assert_eq!(heartbeat(&mut a, g, &a_id, generation), NONE);
    assert_eq!(
        heartbeat(&mut a, g, &a_id, generation - 1),
        ILLEGAL_GENERATION
    );
    assert_eq!(
        heartbeat(&mut a, g, "stranger", generation),
        UNKNOWN_MEMBER_ID
    );
    assert_eq!(commit(&mut a, g, &a_id, generation, 0), NONE);
    assert_eq!(
        commit(&mut a, g, &a_id, generation + 5, 0),
        ILLEGAL_GENERATION
    );
    assert_eq!(
        commit(&mut a, g, "stranger", generation, 0),
        UNKNOWN_MEMBER_ID
    );
    let other = join(&mut a, &join_request(g, "", "connect", 6000, 3000));
    assert_eq!(other.error_code, INCONSISTENT_GROUP_PROTOCOL);

    // B joins: the group rebalances, A is told so by its heartbeat, and A does not rejoin.
    let joiner = std::thread::spawn({
        let addr = addr.clone();
        move || {
            let mut b = Wire::connect(&addr);
            let started = Instant::now();
            let r = join_new(&mut b, g, 2000, 3000);
            (b, r, started.elapsed())
        }
    });
    eventually(
        "REBALANCE_IN_PROGRESS on A's heartbeat",
        Duration::from_secs(10),
        || heartbeat(&mut a, g, &a_id, generation) == REBALANCE_IN_PROGRESS,
    );
    let (mut b, b_joined, waited) = joiner.join().expect("joiner");
    assert_eq!(b_joined.error_code, NONE, "B's join");
    let b_id = b_joined.member_id.to_string();
    assert!(b_joined.generation_id > generation);
    assert_eq!(b_joined.leader.to_string(), b_id, "A was dropped, B leads");
    assert_eq!(b_joined.members.len(), 1, "only B in the new generation");
    // The join completes when A's rebalance timeout (3 s) runs out, not before.
    assert!(
        waited >= Duration::from_millis(2500) && waited < Duration::from_secs(20),
        "B's join took {waited:?}"
    );
    assert_eq!(heartbeat(&mut a, g, &a_id, generation), UNKNOWN_MEMBER_ID);
    assert_eq!(sync(&mut b, g, &b_id, b_joined.generation_id), NONE);
    assert_eq!(
        commit(&mut b, g, &b_id, generation, 1),
        ILLEGAL_GENERATION,
        "a commit of the old generation"
    );
    assert_eq!(commit(&mut b, g, &b_id, b_joined.generation_id, 1), NONE);

    // B goes silent: after its session timeout (2 s) the group is empty.
    let silent = Instant::now();
    eventually("B expired", Duration::from_secs(15), || {
        group_state(&mut a, g) == ("Empty".to_string(), 0)
    });
    assert!(
        silent.elapsed() >= Duration::from_millis(1500),
        "B expired after {:?}, before its session timeout",
        silent.elapsed()
    );
    assert_eq!(
        heartbeat(&mut b, g, &b_id, b_joined.generation_id),
        UNKNOWN_MEMBER_ID
    );
    let offsets = committed(&cluster.describe_group(g));
    assert_eq!(offsets.get(&0), Some(&1), "{offsets:?}");
}

/// The AdminClient alters a group's offsets (seen by `aqueduct group describe`), deletes
/// records (a compacted topic refuses, an offset past the end is out of range), and a
/// position set by `aqueduct group reset-offsets` is where a Kafka member resumes.
#[test]
fn admin_offsets_delete_records_and_reset_offsets_over_kafka() {
    let _serial = serial();
    let hosts = ["127.0.49.1", "127.0.49.2", "127.0.49.3"];
    let cluster = Cluster::start(&hosts);
    let bootstrap = hosts.map(kafka).join(",");
    cluster.create_topic("adm", 2, 3);
    let r = python_json(&["produce-idempotent", &bootstrap, "adm", "400"]);
    assert_eq!(r["delivered"], 400, "{r}");
    let ends = python_json(&["delete-records", &bootstrap, "adm", "0:0,1:0"]);
    let end = |p: &str| ends["watermarks"][p][1].as_i64().expect("high watermark");
    let (end0, end1) = (end("0"), end("1"));
    assert_eq!(end0 + end1, 400, "{ends}");

    // The first group call creates `__consumer_offsets` (50 partitions, RF 3) and waits for
    // its coordinator; the native describe waits for that with retries, so the AdminClient's
    // single request below does not race 150 elections on two cores.
    cluster.describe_group("g-adm");
    // Offsets set through the AdminClient are the group's, natively too.
    let a = python_json(&["alter-offsets", &bootstrap, "g-adm", "adm", "0:10,1:20"]);
    assert_eq!(a["listed"], serde_json::json!([[0, 10], [1, 20]]), "{a}");
    let offsets = committed(&cluster.describe_group("g-adm"));
    assert_eq!(offsets, BTreeMap::from([(0, 10), (1, 20)]));

    // Records of partition 0 before 50 are deleted: its low watermark is 50 everywhere.
    let d = python_json(&["delete-records", &bootstrap, "adm", "0:50"]);
    assert_eq!(d["deleted"]["0"], 50, "{d}");
    assert_eq!(d["watermarks"]["0"], serde_json::json!([50, end0]), "{d}");
    let past = python_json(&[
        "delete-records",
        &bootstrap,
        "adm",
        &format!("1:{}", end1 + 5),
    ]);
    assert_eq!(past["deleted"]["1"], "OFFSET_OUT_OF_RANGE", "{past}");
    let out = cluster.cli(&[
        "topic",
        "create",
        "adm-compact",
        "--partitions",
        "1",
        "--replication-factor",
        "3",
        "--config",
        "cleanup.policy=compact",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let compacted = python_json(&["delete-records", &bootstrap, "adm-compact", "0:-1"]);
    assert_eq!(compacted["deleted"]["0"], "POLICY_VIOLATION", "{compacted}");

    // Reset to earliest: partition 0 resumes at its new log start, partition 1 at 0.
    let out = cluster.cli(&["group", "reset-offsets", "g-adm", "--to", "earliest"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        committed(&cluster.describe_group("g-adm")),
        BTreeMap::from([(0, 50), (1, 0)])
    );
    let total = (end0 - 50 + end1) as usize;
    let mut member = Lines::spawn(&[
        "group-member",
        &bootstrap,
        "adm",
        "g-adm",
        "50",
        &total.to_string(),
    ]);
    assert!(member.wait(Duration::from_secs(120)).success());
    let records = member.records();
    let first = |p: u32| records.iter().filter(|r| r.0 == p).map(|r| r.1).min();
    assert_eq!((first(0), first(1)), (Some(50), Some(0)));
    let distinct: BTreeSet<(u32, u64)> = records.iter().map(|r| (r.0, r.1)).collect();
    assert_eq!((records.len(), distinct.len()), (total, total));
}

/// An idempotent confluent-kafka producer behind fault proxies (one per node, which each
/// node advertises as its Kafka address): some responses are dropped after the broker wrote
/// the batch, some requests are held past the client's request timeout and delivered late.
/// Every record is stored exactly once, and each partition holds its records in the order
/// they were produced, at consecutive offsets.
#[test]
fn an_idempotent_kafka_producer_behind_a_fault_proxy_writes_each_record_once() {
    let _serial = serial();
    let hosts = ["127.0.50.1", "127.0.50.2", "127.0.50.3"];
    let proxies = ["127.0.50.11", "127.0.50.12", "127.0.50.13"];
    let cluster = Cluster::start_each(&hosts, |i| {
        vec![(
            "AQUEDUCT_KAFKA_ADVERTISED_HOST".to_string(),
            proxies[i].to_string(),
        )]
    });
    cluster.create_topic("faulty", 3, 3);
    let faults = Faults {
        drop_response_every: 7,
        delay_request_every: 11,
        delay: Duration::from_millis(2500),
    };
    let running: Vec<FaultProxy> = hosts
        .iter()
        .zip(proxies)
        .map(|(h, p)| FaultProxy::start(&kafka(p), &kafka(h), faults))
        .collect();
    let through = proxies.map(kafka).join(",");
    let count = 3000;
    let r = python_json(&[
        "produce-idempotent",
        &through,
        "faulty",
        &count.to_string(),
        r#"{"request.timeout.ms": 1500, "linger.ms": 2, "batch.num.messages": 20, "retry.backoff.ms": 50,
            "message.timeout.ms": 170000}"#,
    ]);
    assert_eq!(r["delivered"], count, "{r}");
    let sum = |f: fn(&Stats) -> &std::sync::atomic::AtomicU64| -> u64 {
        running
            .iter()
            .map(|p| f(&p.stats).load(std::sync::atomic::Ordering::Relaxed))
            .sum()
    };
    let (requests, dropped, delayed) = (
        sum(|s| &s.produce_requests),
        sum(|s| &s.responses_dropped),
        sum(|s| &s.requests_delayed),
    );
    eprintln!("{requests} produce requests, {dropped} responses dropped, {delayed} delayed");
    assert!(
        dropped >= 3 && delayed >= 2,
        "too few faults: {dropped} dropped, {delayed} delayed"
    );
    // Read back through the proxies (the addresses the nodes advertise; only produce
    // requests are faulted).
    let records = python_json(&["consume-records", &through, "faulty"]);
    let mut by_partition: BTreeMap<u64, Vec<(u64, u64)>> = BTreeMap::new();
    for r in records.as_array().expect("records") {
        let value: u64 = r[2].as_str().expect("value").parse().expect("number");
        by_partition
            .entry(r[0].as_u64().expect("partition"))
            .or_default()
            .push((r[1].as_u64().expect("offset"), value));
    }
    let mut all = BTreeSet::new();
    for (p, rs) in &by_partition {
        for (i, w) in rs.windows(2).enumerate() {
            assert_eq!(
                w[1].0,
                w[0].0 + 1,
                "partition {p}: offsets not consecutive at {i}"
            );
            assert!(
                w[1].1 > w[0].1,
                "partition {p}: {} after {} (duplicate or reordered)",
                w[1].1,
                w[0].1
            );
        }
        all.extend(rs.iter().map(|r| r.1));
    }
    let stored: usize = by_partition.values().map(Vec::len).sum();
    assert_eq!(
        (stored, all.len()),
        (count, count),
        "stored {stored}, distinct {}",
        all.len()
    );
}
