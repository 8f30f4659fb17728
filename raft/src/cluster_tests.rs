//! Three metadata Raft nodes in one process, each with its own segmented log and RocksDB on
//! disk, talking real gRPC over 127.0.0.x: replication, leader loss and re-election, and a
//! restarted node catching up from its own data directory. (Multi-process cluster tests of the
//! `aqueduct` binary come with the node wiring.)

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use aqueduct_storage::fs::StdFs;
use aqueduct_storage::meta::rocks::RocksMetaStore;
use aqueduct_storage::meta::{MetaStore, WELL_KNOWN_CFS};
use aqueduct_storage::metrics::StorageMetrics;
use aqueduct_storage::{LogOptions, PartitionLog};
use openraft::impls::BasicNode;
use openraft::{Config, Raft};
use tempfile::TempDir;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::log_store::SegmentedLogStore;
use crate::network::{Channels, GrpcNetworkFactory, MetaRaft, RaftTransportService};
use crate::state_machine::MetaStateMachine;
use crate::types::{GroupCommand, MetaCommand};

const WAIT: Option<Duration> = Some(Duration::from_secs(20));

struct TestNode {
    id: u64,
    raft: MetaRaft,
    sm: MetaStateMachine,
    stop: Option<oneshot::Sender<()>>,
    server: JoinHandle<()>,
}

impl TestNode {
    async fn start(id: u64, addr: SocketAddr, dir: &Path) -> TestNode {
        let log = PartitionLog::open(
            Arc::new(StdFs),
            &dir.join("log"),
            LogOptions::default(),
            Arc::new(StorageMetrics::default()),
        )
        .expect("open log");
        let meta: Arc<dyn MetaStore> = Arc::new(
            RocksMetaStore::open(&dir.join("meta"), WELL_KNOWN_CFS).expect("open metadata store"),
        );
        let store = SegmentedLogStore::new(Arc::new(log), Arc::clone(&meta), "meta");
        let sm = MetaStateMachine::new(meta);
        let config = Config {
            heartbeat_interval: 100,
            election_timeout_min: 400,
            election_timeout_max: 800,
            ..Config::default()
        }
        .validate()
        .expect("raft config");
        let network = GrpcNetworkFactory::new("meta", Channels::default());
        let raft = Raft::new(id, Arc::new(config), network, store, sm.clone())
            .await
            .expect("raft");
        let service = RaftTransportService::default();
        service.add_group("meta", Arc::new(raft.clone()));
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(service.into_server())
                .serve_with_shutdown(addr, async {
                    let _ = stopped.await;
                })
                .await;
        });
        TestNode {
            id,
            raft,
            sm,
            stop: Some(stop),
            server,
        }
    }

    async fn stop(mut self) {
        let _ = self.raft.shutdown().await;
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let _ = self.server.await;
    }
}

/// A free port on `host`.
fn free_addr(host: &str) -> SocketAddr {
    let l = std::net::TcpListener::bind((host, 0)).expect("bind");
    l.local_addr().expect("addr")
}

async fn leader_of(nodes: &[&TestNode]) -> u64 {
    let m = nodes[0]
        .raft
        .wait(WAIT)
        .metrics(|m| m.current_leader.is_some(), "a leader")
        .await
        .expect("no leader elected");
    m.current_leader.expect("leader")
}

/// Writes through whichever node leads, retrying while leadership settles (a new leader
/// refuses writes until its lease is confirmed), as a client would.
async fn write(nodes: &[Option<TestNode>], cmd: MetaCommand) -> u64 {
    for _ in 0..200 {
        for node in nodes.iter().flatten() {
            if node.raft.current_leader().await == Some(node.id)
                && let Ok(r) = node
                    .raft
                    .client_write(GroupCommand::Meta(cmd.clone()))
                    .await
            {
                return r.log_id.index;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no leader accepted {cmd}");
}

/// Every live node applied up to `last` and holds the same `records` records.
async fn assert_converged(nodes: &[Option<TestNode>], last: u64, records: usize) {
    for node in nodes.iter().flatten() {
        node.raft
            .wait(WAIT)
            .applied_index_at_least(Some(last), "replicated")
            .await
            .expect("applied");
    }
    let live: Vec<&TestNode> = nodes.iter().flatten().collect();
    let reference = live[0].sm.records().expect("records");
    assert_eq!(reference.len(), records);
    for node in &live {
        assert_eq!(
            node.sm.records().expect("records"),
            reference,
            "node {} diverges",
            node.id
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_replicate_fail_over_and_catch_up() {
    let dirs: Vec<TempDir> = (0..3).map(|_| TempDir::new().expect("tempdir")).collect();
    let addrs: Vec<SocketAddr> = (1..=3)
        .map(|i| free_addr(&format!("127.0.0.{}", 10 + i)))
        .collect();
    let mut nodes = Vec::new();
    for i in 0..3 {
        nodes.push(Some(
            TestNode::start(i as u64 + 1, addrs[i], dirs[i].path()).await,
        ));
    }
    let members: BTreeMap<u64, BasicNode> = (0..3)
        .map(|i| {
            (
                i as u64 + 1,
                BasicNode {
                    addr: addrs[i].to_string(),
                },
            )
        })
        .collect();
    nodes[0]
        .as_ref()
        .expect("node")
        .raft
        .initialize(members)
        .await
        .expect("initialize");

    let live: Vec<&TestNode> = nodes.iter().flatten().collect();
    let leader = leader_of(&live).await;
    let mut last = 0;
    for n in 0..20u64 {
        last = write(
            &nodes,
            MetaCommand::RegisterNode {
                node_id: n,
                addr: format!("10.0.0.{n}:7070"),
            },
        )
        .await;
    }
    assert_converged(&nodes, last, 20).await;

    // Lose the leader: the other two elect a new one and keep accepting writes.
    let old = nodes[(leader - 1) as usize].take().expect("leader");
    old.stop().await;
    let live: Vec<&TestNode> = nodes.iter().flatten().collect();
    let new_leader = live[0]
        .raft
        .wait(WAIT)
        .metrics(
            |m| m.current_leader.is_some_and(|l| l != leader),
            "a new leader",
        )
        .await
        .expect("no new leader")
        .current_leader;
    assert!(new_leader.is_some_and(|l| l != leader));
    let created = MetaCommand::CreateTopic {
        name: "orders".into(),
        partitions: 3,
        replication_factor: 3,
        configs: BTreeMap::new(),
        assignment: vec![vec![1, 2, 3], vec![2, 3, 1], vec![3, 1, 2]],
        request_id: 7,
        application: crate::types::default_application(),
    };
    last = write(&nodes, created).await;

    // The old leader restarts from its own data directory and catches up.
    let i = (leader - 1) as usize;
    nodes[i] = Some(TestNode::start(leader, addrs[i], dirs[i].path()).await);
    // 20 nodes (the members 1–3 among them), the topic and its 3 assignments.
    assert_converged(&nodes, last, 24).await;
    for node in nodes.iter().flatten() {
        assert!(node.sm.topic("orders").expect("read").is_some());
    }
    for node in nodes.into_iter().flatten() {
        node.stop().await;
    }
}
