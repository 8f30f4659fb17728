//! The idempotent producer under injected faults, with real processes (one node each, faults
//! from `AQUEDUCT_FAULTS`, see `src/faults.rs`) and the real CLI producer:
//!
//! * every fourth acknowledged reply is dropped after the batch was written: the producer
//!   retries, the leader recognises each retry, and the log holds every line exactly once, at
//!   the offset the producer reported;
//! * every fifth batch is held for 1.5 s before it reaches Raft while the producer's request
//!   timeout is 0.4 s: retries race the in-flight original, and again every line is in the log
//!   exactly once;
//! * raw requests: a gap in the sequence is refused `OUT_OF_ORDER_SEQUENCE_NUMBER`, an older
//!   epoch after a newer one `INVALID_PRODUCER_EPOCH`, a repeated batch is answered with its
//!   original offsets, and nothing is written by any of them.
//!
//! The third fault of the issue, the partition leader SIGKILLed while batches are
//! uncommitted, is `tests/partitions.rs::acked_records_survive_partition_leader_kills_and_replicas_agree`, which
//! asserts no duplicates.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::Cluster;
use serde_json::Value;

const LINES: usize = 2000;

/// The whole log of the cluster's first node.
fn full_log(cluster: &Cluster) -> String {
    std::fs::read_to_string(&cluster.nodes[0].log).unwrap_or_default()
}

/// Produces `LINES` lines to a 3-partition topic with `extra` producer flags and checks that
/// each is in the log exactly once, at its acknowledged offset.
fn produce_exactly_once(cluster: &Cluster, topic: &str, extra: &[&str]) {
    let out = cluster.cli(&["topic", "create", topic, "--partitions", "3"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let input: String = (0..LINES).map(|i| format!("line-{i}\n")).collect();
    // Small batches: many requests, so the faults fire often.
    let mut args = vec![topic, "--output", "json", "--batch-bytes", "2000"];
    args.extend_from_slice(extra);
    let out = cluster.produce(&args, input.as_bytes());
    assert!(
        out.status.success(),
        "produce failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        cluster.logs()
    );
    let mut acked: BTreeMap<(u64, u64), usize> = BTreeMap::new();
    for l in String::from_utf8(out.stdout).unwrap().lines() {
        let v: Value = serde_json::from_str(l).unwrap();
        acked.insert(
            (
                v["partition"].as_u64().unwrap(),
                v["offset"].as_u64().unwrap(),
            ),
            v["line"].as_u64().unwrap() as usize,
        );
    }
    assert_eq!(
        acked.len(),
        LINES,
        "every line acknowledged at its own offset"
    );

    // The log: exactly the lines, once each, where the acknowledgements said.
    let out = cluster.cli(&["topic", "describe", topic, "--output", "json"]);
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    let total: u64 = doc["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["high_watermark"].as_u64().unwrap())
        .sum();
    assert_eq!(total, LINES as u64, "the log holds a record more than once");
    let (stored, _) = common::stored_records(cluster, topic, LINES as u64);
    for (at, value) in &stored {
        let line = acked.get(at).unwrap();
        assert_eq!(*value, format!("line-{line}"), "wrong record at {at:?}");
    }
    assert_eq!(stored.len(), LINES);
}

#[test]
fn dropped_replies_are_retried_without_duplicates() {
    let _serial = common::serial();
    let cluster = Cluster::start_with(
        &["127.0.21.1"],
        &[("AQUEDUCT_FAULTS", "produce-reply-drop-every=4")],
    );
    produce_exactly_once(&cluster, "payments", &[]);
    let dropped = full_log(&cluster)
        .matches("dropping an acknowledged produce reply")
        .count();
    assert!(dropped > 0, "the fault never fired");
    eprintln!("{dropped} replies dropped after the write");
}

#[test]
fn retries_racing_the_in_flight_original_write_once() {
    let _serial = common::serial();
    let cluster = Cluster::start_with(
        &["127.0.22.1"],
        &[(
            "AQUEDUCT_FAULTS",
            "produce-delay-every=5,produce-delay-ms=1500",
        )],
    );
    produce_exactly_once(&cluster, "payments", &["--request-timeout-ms", "400"]);
    let held = full_log(&cluster)
        .matches("holding an idempotent batch")
        .count();
    assert!(held > 0, "the fault never fired");
    eprintln!("{held} batches held past the request timeout");
}

#[test]
fn sequence_gaps_and_stale_epochs_are_refused() {
    use aqueduct::client::records::{ProducerRecord, Sequence, encode_batch};
    use aqueduct_protocol::cluster as cpb;
    use aqueduct_protocol::data as pb;

    let _serial = common::serial();
    let cluster = Cluster::start(&["127.0.23.1"]);
    let out = cluster.cli(&["topic", "create", "ledger"]);
    assert!(out.status.success());
    let addr = format!("http://{}", cluster.nodes[0].grpc());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut admin = cpb::cluster_client::ClusterClient::connect(addr.clone())
            .await
            .unwrap();
        let id = admin
            .init_producer_id(cpb::InitProducerIdRequest {})
            .await
            .unwrap()
            .into_inner();
        let other = admin
            .init_producer_id(cpb::InitProducerIdRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_ne!(id.producer_id, other.producer_id, "producer ids are unique");
        let mut data = pb::data_client::DataClient::connect(addr).await.unwrap();
        // The new partition elects its leader first.
        let latest = pb::ListOffsetsRequest {
            topic: "ledger".into(),
            partition: 0,
            spec: pb::OffsetSpec::Latest as i32,
            timestamp_ms: 0,
        };
        for _ in 0..100 {
            if data.list_offsets(latest.clone()).await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let batch = |epoch: i16, first_seq: i32, n: usize| {
            let records: Vec<ProducerRecord> = (0..n)
                .map(|i| ProducerRecord::value(format!("r{i}")))
                .collect();
            let seq = Sequence {
                producer_id: id.producer_id,
                epoch,
                first_seq,
            };
            pb::ProduceRequest {
                topic: "ledger".into(),
                partition: 0,
                batch: encode_batch(&records, Some(seq)).unwrap().to_vec(),
                acks: pb::Acks::All as i32,
            }
        };
        let code = |s: &tonic::Status| {
            s.metadata()
                .get("aq-error")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string()
        };
        // Starting anywhere but 0 is a gap.
        let e = data.produce(batch(0, 3, 2)).await.unwrap_err();
        assert_eq!(code(&e), "OUT_OF_ORDER_SEQUENCE_NUMBER", "{e:?}");
        let first = data.produce(batch(0, 0, 3)).await.unwrap().into_inner();
        assert_eq!(
            (first.base_offset, first.last_offset, first.duplicate),
            (0, 2, false)
        );
        // The same batch again: its original offsets, nothing written.
        let again = data.produce(batch(0, 0, 3)).await.unwrap().into_inner();
        assert_eq!(
            (again.base_offset, again.last_offset, again.duplicate),
            (0, 2, true)
        );
        // A gap after it.
        let e = data.produce(batch(0, 5, 1)).await.unwrap_err();
        assert_eq!(code(&e), "OUT_OF_ORDER_SEQUENCE_NUMBER");
        // A new epoch starts at 0; then the old epoch is fenced.
        let bumped = data.produce(batch(1, 0, 1)).await.unwrap().into_inner();
        assert_eq!(bumped.base_offset, 3);
        let e = data.produce(batch(0, 3, 1)).await.unwrap_err();
        assert_eq!(code(&e), "INVALID_PRODUCER_EPOCH");
        let end = data.list_offsets(latest).await.unwrap().into_inner();
        assert_eq!(end.offset, 4, "only the two accepted batches were written");
    });
    // The CLI reports a refused record as one line with its code.
    let big = format!("{}\n", "x".repeat(1_100_000));
    let out = cluster.produce(&["ledger"], big.as_bytes());
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("RECORD_BATCH_TOO_LARGE"), "{err}");
}
