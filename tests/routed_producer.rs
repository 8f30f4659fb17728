//! The broker's routed producer on a 3-node cluster run in this process: a write accepted
//! on a node that does not lead the partition is forwarded to the leader and lands exactly
//! once; after the leader stops, the same producer's next write reaches the new leader. This
//! is what MQTT, the gateway and data tasks will rely on (they accept writes on any node).

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use aqueduct::broker::records::{ProducerRecord, decode_batches};
use aqueduct::broker::routed::{Partitioning, RoutedProducer};
use aqueduct::broker::topics::NewTopic;
use aqueduct::broker::{Broker, FetchRequest, OffsetSpec};
use aqueduct::node::Node;
use aqueduct::node::config::Config;

fn config(id: u64, host: &str, dir: &std::path::Path, join: Option<&str>) -> Config {
    let ip: IpAddr = host.parse().expect("ip");
    Config {
        data_dir: dir.join(format!("n{id}")),
        node_id: id,
        listen_host: ip,
        join: join.map(|j| vec![j.to_string()]).unwrap_or_default(),
        ..Config::default()
    }
}

async fn eventually<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The node id that leads `topic`/0, as the first broker's metadata reports it.
fn leader(broker: &Broker, topic: &str) -> Option<u64> {
    let view = broker.metadata(Some(&[topic.to_string()])).ok()?;
    view.topics.first()?.partitions.first()?.leader
}

async fn values(broker: &Broker, topic: &str) -> Vec<String> {
    let end = broker
        .list_offsets(topic, 0, OffsetSpec::Latest)
        .expect("high watermark");
    let fetched = broker
        .fetch(FetchRequest {
            topic: topic.into(),
            partition: 0,
            offset: 0,
            max_bytes: 1 << 20,
            max_wait: Duration::ZERO,
        })
        .await
        .expect("fetch");
    let records = decode_batches(fetched.batches, topic, 0, 0).expect("decode");
    assert!(records.iter().all(|r| r.offset < end));
    records
        .into_iter()
        .filter_map(|r| r.value.map(|v| String::from_utf8_lossy(&v).to_string()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_on_a_non_leader_are_forwarded_and_follow_a_new_leader() {
    let dir = tempfile::tempdir().expect("tempdir");
    let hosts = ["127.0.44.1", "127.0.44.2", "127.0.44.3"];
    let first = SocketAddr::new(hosts[0].parse().expect("ip"), 7070).to_string();
    let mut nodes = vec![
        Node::start(config(1, hosts[0], dir.path(), None))
            .await
            .expect("n1"),
    ];
    for (i, h) in hosts.iter().enumerate().skip(1) {
        let node = Node::start(config(i as u64 + 1, h, dir.path(), Some(&first)))
            .await
            .expect("node");
        nodes.push(node);
    }
    let b1 = nodes[0].broker().clone();
    eventually("three members", || {
        let view = b1.metadata(Some(&[])).ok()?;
        (view.nodes.len() == 3 && view.nodes.iter().all(|n| n.alive)).then_some(())
    })
    .await;
    let mut topic = NewTopic::new("routed", 1);
    topic.replication_factor = Some(3);
    let deadline = Instant::now() + Duration::from_secs(30);
    while let Err(e) = b1.topics().create(topic.clone(), false).await {
        assert!(Instant::now() < deadline, "create: {e}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let led_by = eventually("a leader", || leader(&b1, "routed")).await;
    let other = (0..3)
        .find(|i| *i as u64 + 1 != led_by)
        .expect("a follower");
    let producer = RoutedProducer::new(nodes[other].broker().clone());
    assert!(!nodes[other].broker().leads("routed", 0));

    for i in 0..5 {
        let (p, produced) = producer
            .send(
                "routed",
                Partitioning::Partition(0),
                vec![ProducerRecord::value(format!("v{i}"))],
            )
            .await
            .expect("routed send");
        assert_eq!((p, produced.base_offset), (0, i));
        assert!(!produced.duplicate);
    }
    let on_leader = nodes[(led_by - 1) as usize].broker().clone();
    assert_eq!(
        values(&on_leader, "routed").await,
        ["v0", "v1", "v2", "v3", "v4"]
    );

    // The leader goes away; the next write reaches whoever leads now, exactly once.
    let stopped = nodes.remove((led_by - 1) as usize);
    stopped.stop().await.expect("stop");
    let survivor = nodes
        .iter()
        .find(|n| n.broker().node_id() != led_by)
        .expect("survivor")
        .broker()
        .clone();
    let (_, produced) = producer
        .send(
            "routed",
            Partitioning::Partition(0),
            vec![ProducerRecord::value("after")],
        )
        .await
        .expect("send after the leader stopped");
    assert_eq!(produced.base_offset, 5);
    let new_leader = eventually("a new leader", || {
        leader(&survivor, "routed").filter(|l| *l != led_by)
    })
    .await;
    let on_new = nodes
        .iter()
        .find(|n| n.broker().node_id() == new_leader)
        .expect("new leader")
        .broker()
        .clone();
    assert_eq!(
        values(&on_new, "routed").await,
        ["v0", "v1", "v2", "v3", "v4", "after"]
    );
    for n in nodes {
        n.stop().await.expect("stop");
    }
}
