//! A node's lifecycle: start, serve, stop.
//!
//! [`Node::start`] creates the data directory, opens the metadata store at `<data_dir>/meta`
//! (its RocksDB lock makes a data directory belong to one process at a time), checks or records
//! which node the directory belongs to, opens the metadata group's Raft log at
//! `<data_dir>/raft/meta`, starts the metadata Raft, the gRPC server (Raft transport and the
//! cluster admin API) and the HTTP admin server, then bootstraps (DESIGN.md §5):
//!
//! * a data directory with Raft state rejoins the cluster recorded there;
//! * a fresh one without `--join` initializes a new one-node cluster;
//! * a fresh one with `--join` asks the cluster (any member; it finds the leader) to add it,
//!   as a learner first and then as a voter where needed, retrying until it is a member.
//!
//! The choice between the last two is recorded (`bootstrap` key) before it is acted on, so a
//! node killed halfway resumes the same path. [`Node::stop`] shuts Raft down, closes the
//! listeners, flushes the metadata store and logs `stopped`. [`ShutdownSignal`] turns
//! SIGINT/SIGTERM into that stop.
//!
//! Invariants: a data directory is only ever used by the node whose id it recorded first; a
//! node that initialized a cluster never joins another one and vice versa; a node that
//! returned from `stop` without error has every metadata write durable.
//!
//! Configuration and its precedence rules are in [`config`].

pub mod config;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aqueduct_raft::liveness::Liveness;
use aqueduct_raft::log_store::SegmentedLogStore;
use aqueduct_raft::network::{Channels, GrpcNetworkFactory, MetaRaft, RaftTransportService};
use aqueduct_raft::state_machine::MetaStateMachine;
use aqueduct_storage::fs::StdFs;
use aqueduct_storage::meta::{self, MetaError, MetaStore};
use aqueduct_storage::metrics::StorageMetrics;
use aqueduct_storage::{LogOptions, PartitionLog};
use openraft::BasicNode;
use openraft::error::{InitializeError, RaftError};
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::admin::{AdminError, AdminServer, AdminState};
use crate::broker::Broker;
use crate::broker::controller::Controller;
use crate::broker::partitions::{PartitionSettings, Partitions};
use crate::broker::topics::TopicSettings;
use crate::client::{AdminClient, ClientError, error_chain};
use crate::cluster::ClusterService;
use crate::grpc::data::DataService;
use config::Config;

/// Key (in [`meta::CF_DEFAULT`]) of the id of the node that owns the data directory, stored as
/// a big-endian `u64`.
pub const NODE_ID_KEY: &[u8] = b"node_id";

/// Key (in [`meta::CF_DEFAULT`]) of how this node entered a cluster: `init` (it started a new
/// one) or `join` (it asked an existing one to add it).
pub const BOOTSTRAP_KEY: &[u8] = b"bootstrap";

/// The metadata group's name on the Raft transport.
pub const META_GROUP: &str = "meta";

/// How many streams a peer may reset before the gRPC server accepts them, per connection.
/// The port serves the cluster's own nodes and its operators, not the public: it allows the
/// burst a resumed peer sends, and still bounds a client that resets without end.
const PENDING_RESET_STREAMS: usize = 4096;

/// Why a node could not start or stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("cannot create data directory {}: {source}", path.display())]
    CreateDataDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "data directory {} is in use by another aqueduct process (lock on {} is held)",
        data_dir.display(),
        meta_dir.join("LOCK").display()
    )]
    DataDirInUse {
        data_dir: PathBuf,
        meta_dir: PathBuf,
    },
    #[error("cannot open metadata store at {}: {source}", path.display())]
    OpenMeta {
        path: PathBuf,
        #[source]
        source: MetaError,
    },
    #[error(
        "data directory {} belongs to node {recorded}, but this node is configured as node \
         {configured}",
        data_dir.display()
    )]
    NodeIdMismatch {
        data_dir: PathBuf,
        recorded: u64,
        configured: u64,
    },
    #[error("metadata store at {} holds a malformed node id record ({len} bytes)", path.display())]
    MalformedNodeId { path: PathBuf, len: usize },
    #[error("metadata store at {}: {source}", path.display())]
    Meta {
        path: PathBuf,
        #[source]
        source: MetaError,
    },
    #[error(transparent)]
    Admin(#[from] AdminError),
    #[error("cannot open the metadata Raft log at {}: {source}", path.display())]
    OpenLog {
        path: PathBuf,
        #[source]
        source: aqueduct_storage::LogError,
    },
    #[error("cannot start the metadata Raft: {0}")]
    Raft(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("the cluster refused this node: {0}")]
    JoinRefused(String),
    #[error("cannot listen for gRPC on {addr}: {source}")]
    BindGrpc {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen for Kafka clients on {addr}: {source}")]
    BindKafka {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen for MQTT clients on {addr}: {source}")]
    BindMqtt {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the gRPC listener {0} is not an address other nodes can reach; set --advertise-addr")]
    NoAdvertiseAddr(SocketAddr),
    #[error(
        "data directory {} belongs to a node that {recorded} a cluster; {hint}",
        data_dir.display()
    )]
    BootstrapMismatch {
        data_dir: PathBuf,
        recorded: &'static str,
        hint: &'static str,
    },
    #[error("cannot install signal handlers: {0}")]
    Signals(#[source] std::io::Error),
}

/// A running node.
#[derive(Debug)]
pub struct Node {
    config: Config,
    meta: Arc<dyn MetaStore>,
    storage_metrics: Arc<StorageMetrics>,
    admin_addr: SocketAddr,
    grpc_addr: SocketAddr,
    raft: MetaRaft,
    stop_admin: oneshot::Sender<()>,
    admin: JoinHandle<()>,
    stop_grpc: oneshot::Sender<()>,
    grpc: JoinHandle<()>,
    joiner: Option<JoinHandle<()>>,
    failed: Option<oneshot::Receiver<NodeError>>,
    partitions: Partitions,
    partition_manager: JoinHandle<()>,
    coordinator: JoinHandle<()>,
    /// Names the cluster (ends once it has an id).
    naming: JoinHandle<()>,
    /// Records the device registry's notifications while this node leads the metadata.
    outbox: JoinHandle<()>,
    /// Records offline for sessions on nodes that stopped answering.
    sweep: JoinHandle<()>,
    /// The device shadow projection (working while this node leads its partition).
    shadow_projection: JoinHandle<()>,
    notifier: JoinHandle<()>,
    kafka_addr: SocketAddr,
    kafka: JoinHandle<()>,
    stop_kafka: oneshot::Sender<()>,
    mqtt_addr: SocketAddr,
    mqtt: JoinHandle<()>,
    stop_mqtt: oneshot::Sender<()>,
    broker: Broker,
}

/// How a node enters its cluster, as recorded in its data directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Bootstrap {
    Init,
    Join,
}

impl Node {
    /// Starts a node; on return the admin server accepts connections.
    pub async fn start(config: Config) -> Result<Self, NodeError> {
        let started = Instant::now();
        std::fs::create_dir_all(&config.data_dir).map_err(|source| NodeError::CreateDataDir {
            path: config.data_dir.clone(),
            source,
        })?;
        let meta = open_meta_store(&config)?;
        claim_data_dir(meta.as_ref(), &config)?;

        let storage_metrics = Arc::new(StorageMetrics::default());

        // The gRPC listener first: a port in use fails the start before anything else runs.
        let grpc_listen = config.grpc_listen_addr();
        let listener = tokio::net::TcpListener::bind(grpc_listen)
            .await
            .map_err(|source| NodeError::BindGrpc {
                addr: grpc_listen,
                source,
            })?;
        let grpc_addr = listener
            .local_addr()
            .map_err(|source| NodeError::BindGrpc {
                addr: grpc_listen,
                source,
            })?;
        let advertise = match &config.advertise_addr {
            Some(a) => a.clone(),
            None if grpc_addr.ip().is_unspecified() => {
                return Err(NodeError::NoAdvertiseAddr(grpc_addr));
            }
            None => grpc_addr.to_string(),
        };

        let log_dir = config.meta_log_dir();
        let log = PartitionLog::open(
            Arc::new(StdFs),
            &log_dir,
            LogOptions::default(),
            Arc::clone(&storage_metrics),
        )
        .map_err(|source| NodeError::OpenLog {
            path: log_dir.clone(),
            source,
        })?;
        let store = SegmentedLogStore::new(Arc::new(log), Arc::clone(&meta), META_GROUP)
            .with_synced_commits();
        // Every resource family's records, dispatched by the state machine (DESIGN.md §3).
        let sm = MetaStateMachine::new(Arc::clone(&meta))
            .with_family(Arc::new(crate::devices::DevicesFamily));
        let raft_config = openraft::Config {
            cluster_name: "aqueduct".into(),
            heartbeat_interval: config.raft_heartbeat_ms,
            election_timeout_min: config.raft_election_timeout_ms,
            election_timeout_max: config.raft_election_timeout_ms * 2,
            ..openraft::Config::default()
        }
        .validate()
        .map_err(|e| NodeError::Raft(Box::new(e)))?;
        // One connection per peer, shared by the metadata group and every partition group.
        let channels = Channels::default();
        let network = GrpcNetworkFactory::new(META_GROUP, channels.clone());
        let raft = MetaRaft::new(
            config.node_id,
            Arc::new(raft_config),
            network,
            store,
            sm.clone(),
        )
        .await
        .map_err(|e| NodeError::Raft(Box::new(e)))?;

        let transport = RaftTransportService::default();
        let transport_handle = transport.clone();
        let partitions = Partitions::new(
            PartitionSettings {
                node_id: config.node_id,
                data_dir: config.data_dir.clone(),
                heartbeat_ms: config.raft_heartbeat_ms,
                retention_check: Duration::from_millis(config.retention_check_ms.max(10)),
            },
            Arc::clone(&meta),
            Arc::clone(&storage_metrics),
            channels.clone(),
            transport.clone(),
            sm.clone(),
        );
        // Node liveness (one ping per peer) drives the partition groups' elections, and the
        // pings carry the leader directory.
        transport_handle.set_node_id(config.node_id);
        let liveness = Liveness::with_directory(
            config.node_id,
            channels.clone(),
            Duration::from_millis(config.raft_election_timeout_ms),
            transport.directory().clone(),
        );
        let broker = Broker::new(
            partitions.clone(),
            Controller::new(config.node_id, raft.clone(), sm),
            channels,
            liveness.clone(),
            TopicSettings {
                auto_create: config.auto_create_topics,
                offsets_segment_bytes: config.offsets_topic_segment_bytes,
            },
        );
        // The Kafka listener: a port in use fails the start too.
        let kafka_listen = config.kafka_listen_addr();
        let kafka_host = config
            .kafka_advertised_host
            .clone()
            .unwrap_or_else(|| kafka_listen.ip().to_string());
        let coordinator = crate::broker::groups::Coordinator::new(broker.clone());
        let kafka_front = crate::kafka::KafkaFront::bind(
            kafka_listen,
            coordinator.clone(),
            crate::kafka::KafkaSettings {
                max_frame_bytes: config.kafka_max_frame_bytes,
                idle_timeout: Duration::from_millis(config.kafka_idle_timeout_ms),
                request_timeout: Duration::from_millis(config.kafka_request_timeout_ms),
                max_in_flight: 64,
            },
        )
        .await
        .map_err(|source| NodeError::BindKafka {
            addr: kafka_listen,
            source,
        })?;
        let kafka_addr = kafka_front
            .local_addr()
            .map_err(|source| NodeError::BindKafka {
                addr: kafka_listen,
                source,
            })?;
        let kafka_advertised = if kafka_host.contains(':') {
            format!("[{kafka_host}]:{}", kafka_addr.port())
        } else {
            format!("{kafka_host}:{}", kafka_addr.port())
        };
        broker.set_listeners([("kafka".to_string(), kafka_advertised.clone())].into());
        let (stop_kafka, kafka_stopped) = oneshot::channel::<()>();
        let kafka = tokio::spawn(kafka_front.serve(async {
            let _ = kafka_stopped.await;
        }));
        // The MQTT front: devices, and general clients when allowed.
        let mqtt_listen = config.mqtt_listen_addr();
        let bind_mqtt = |source| NodeError::BindMqtt {
            addr: mqtt_listen,
            source,
        };
        let mqtt_listener = tokio::net::TcpListener::bind(mqtt_listen)
            .await
            .map_err(bind_mqtt)?;
        let mqtt_addr = mqtt_listener.local_addr().map_err(bind_mqtt)?;
        // Device notifications: numbered on the partition leaders, reported from here.
        let sequencer = crate::devices::events::Sequencer::new(broker.clone());
        let events = crate::devices::events::Events::new(
            broker.clone(),
            sequencer.clone(),
            config.telemetry_partitions,
            config.telemetry_replication_factor,
        );
        let events_for_grpc = events.clone();
        let outbox = tokio::spawn(
            events
                .clone()
                .follow_outbox(crate::devices::Registry::new(broker.controller().clone())),
        );
        let sweep = tokio::spawn(sequencer.clone().sweep());
        // Requests to devices: written to sessions here, or asked of the node holding one.
        let device_sessions = crate::devices::commands::Sessions::default();
        let commands = crate::devices::commands::Commands::new(
            crate::devices::Registry::new(broker.controller().clone()),
            broker.clone(),
            device_sessions.clone(),
            config.telemetry_partitions,
            config.telemetry_replication_factor,
        );
        let shadows = crate::devices::shadow::Shadows::new(
            broker.clone(),
            commands.clone(),
            config.telemetry_replication_factor,
        );
        let shadow_projection = tokio::spawn(shadows.clone().run());
        let notifier = tokio::spawn(
            crate::devices::notify::Notifier::new(
                broker.clone(),
                crate::devices::Registry::new(broker.controller().clone()),
                config.telemetry_replication_factor,
            )
            .run(),
        );
        let mqtt_front = crate::mqtt::MqttFront::new(
            crate::devices::Registry::new(broker.controller().clone()),
            crate::mqtt::sink::Sink::new(
                broker.clone(),
                config.telemetry_partitions,
                config.telemetry_replication_factor,
            ),
            events,
            device_sessions,
            crate::mqtt::MqttSettings {
                max_packet_bytes: config.mqtt_max_packet_bytes,
                max_connections_per_ip: config.mqtt_max_connections_per_ip,
                connect_timeout: Duration::from_millis(config.mqtt_connect_timeout_ms),
                allow_anonymous: config.mqtt_allow_anonymous,
            },
            (
                config.telemetry_partitions,
                config.telemetry_replication_factor,
            ),
        )
        .map_err(bind_mqtt)?;
        let (stop_mqtt, mqtt_stopped) = oneshot::channel::<()>();
        let mqtt = tokio::spawn(mqtt_front.serve(mqtt_listener, async {
            let _ = mqtt_stopped.await;
        }));
        let data = DataService::new(broker.clone());
        let coordinator_task = tokio::spawn(coordinator.clone().run());
        let naming = tokio::spawn(name_cluster(broker.controller().clone()));
        let cluster = ClusterService::new(advertise.clone(), broker.topics().clone());
        let (stop_grpc, grpc_stopped) = oneshot::channel::<()>();
        let devices = crate::devices::grpc::DevicesService::new(
            crate::devices::Registry::new(broker.controller().clone()),
            sequencer,
            events_for_grpc,
            commands,
            shadows,
        );
        let grpc = tokio::spawn(async move {
            let incoming =
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
            let served = tonic::transport::Server::builder()
                // A node resumed after a pause times out its calls all at once and resets
                // their streams, many per connection (every Raft group shares it); past h2's
                // default of 20 such resets the connection is refused (GOAWAY) and the calls
                // on it fail until the peer reconnects.
                .http2_max_pending_accept_reset_streams(Some(PENDING_RESET_STREAMS))
                .add_service(transport.into_server())
                .add_service(cluster.into_server())
                .add_service(data.into_server())
                .add_service(
                    crate::grpc::groups::GroupService::new(coordinator.clone()).into_server(),
                )
                .add_service(devices.into_server())
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = grpc_stopped.await;
                })
                .await;
            if let Err(err) = served {
                tracing::error!(err = %error_chain(&err), "gRPC server failed");
            }
        });

        let members = {
            let sm = partitions.metadata().clone();
            move || {
                sm.nodes()
                    .map(|ns| ns.into_iter().map(|n| (n.node_id, n.addr)).collect())
                    .unwrap_or_default()
            }
        };
        let partition_manager = tokio::spawn({
            let (partitions, raft) = (partitions.clone(), raft.clone());
            async move {
                tokio::select! {
                    _ = partitions.clone().run(raft.clone()) => {}
                    _ = partitions.supervise(raft, liveness.clone()) => {}
                    _ = liveness.run(members) => {}
                }
            }
        });
        let (fail, failed) = oneshot::channel();
        let joiner = bootstrap(
            &config,
            meta.as_ref(),
            &raft,
            &transport_handle,
            &advertise,
            fail,
        )
        .await?;

        let state = AdminState::new(config.node_id, Arc::clone(&storage_metrics), started);
        let admin = AdminServer::bind(config.admin_listen_addr(), state).await?;
        let admin_addr = admin.local_addr();
        let (stop_admin, stopped) = oneshot::channel();
        let admin = tokio::spawn(admin.serve(async {
            // A dropped sender means the node is gone: stop as well.
            let _ = stopped.await;
        }));

        tracing::info!(
            node_id = config.node_id,
            data_dir = %config.data_dir.display(),
            admin = %admin_addr,
            grpc = %grpc_addr,
            advertise = %advertise,
            kafka = %kafka_addr,
            mqtt = %mqtt_addr,
            kafka_advertised = %kafka_advertised,
            version = crate::admin::VERSION,
            "started"
        );
        Ok(Self {
            config,
            meta,
            storage_metrics,
            admin_addr,
            grpc_addr,
            raft,
            stop_admin,
            admin,
            stop_grpc,
            grpc,
            joiner,
            failed: Some(failed),
            partitions,
            partition_manager,
            coordinator: coordinator_task,
            naming,
            outbox,
            sweep,
            shadow_projection,
            notifier,
            kafka_addr,
            kafka,
            stop_kafka,
            mqtt_addr,
            mqtt,
            stop_mqtt,
            broker,
        })
    }

    /// Resolves when the node cannot go on (the cluster refused to let it join); pending
    /// forever otherwise. The caller then stops the node and reports the error.
    pub async fn failure(&mut self) -> NodeError {
        if let Some(rx) = self.failed.as_mut()
            && let Ok(err) = rx.await
        {
            self.failed = None;
            return err;
        }
        self.failed = None;
        std::future::pending().await
    }

    /// The address the gRPC server listens on.
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    /// The metadata group's Raft handle.
    pub fn raft(&self) -> &MetaRaft {
        &self.raft
    }

    /// The address the HTTP admin server listens on.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// The node-wide storage counters, shared by every log the node opens.
    pub fn storage_metrics(&self) -> &Arc<StorageMetrics> {
        &self.storage_metrics
    }

    /// This node's broker (what the fronts call).
    pub fn broker(&self) -> &Broker {
        &self.broker
    }

    /// The address the Kafka listener listens on.
    pub fn kafka_addr(&self) -> SocketAddr {
        self.kafka_addr
    }

    /// The address the MQTT listener listens on.
    pub fn mqtt_addr(&self) -> SocketAddr {
        self.mqtt_addr
    }

    /// The metadata store.
    pub fn meta(&self) -> &Arc<dyn MetaStore> {
        &self.meta
    }

    /// Stops the admin server, flushes the metadata store and logs `stopped`.
    pub async fn stop(self) -> Result<(), NodeError> {
        tracing::info!("stopping");
        if let Some(joiner) = &self.joiner {
            joiner.abort();
        }
        self.partition_manager.abort();
        self.coordinator.abort();
        self.naming.abort();
        self.outbox.abort();
        self.sweep.abort();
        self.shadow_projection.abort();
        self.notifier.abort();
        let _ = self.stop_kafka.send(());
        self.kafka.abort();
        let _ = self.stop_mqtt.send(());
        self.mqtt.abort();
        self.partitions.shutdown().await;
        if let Err(err) = self.raft.shutdown().await {
            tracing::warn!(%err, "metadata Raft did not shut down cleanly");
        }
        let _ = self.stop_grpc.send(());
        let _ = self.stop_admin.send(());
        if let Err(err) = self.admin.await {
            tracing::warn!(%err, "admin server task failed");
        }
        if tokio::time::timeout(Duration::from_secs(5), self.grpc)
            .await
            .is_err()
        {
            tracing::warn!("gRPC server did not stop within 5 s");
        }
        self.meta.flush().map_err(|source| NodeError::Meta {
            path: self.config.meta_dir(),
            source,
        })?;
        drop(self.meta);
        tracing::info!(node_id = self.config.node_id, "stopped");
        Ok(())
    }
}

#[cfg(feature = "rocksdb")]
fn open_meta_store(config: &Config) -> Result<Arc<dyn MetaStore>, NodeError> {
    let path = config.meta_dir();
    match meta::rocks::RocksMetaStore::open(&path, meta::WELL_KNOWN_CFS) {
        Ok(store) => Ok(Arc::new(store)),
        Err(MetaError::Backend(message)) if is_lock_error(&message) => {
            Err(NodeError::DataDirInUse {
                data_dir: config.data_dir.clone(),
                meta_dir: path,
            })
        }
        Err(source) => Err(NodeError::OpenMeta { path, source }),
    }
}

/// Without RocksDB the node keeps its metadata in memory: fine for tests of higher layers,
/// useless for anything that must survive a restart.
#[cfg(not(feature = "rocksdb"))]
fn open_meta_store(_config: &Config) -> Result<Arc<dyn MetaStore>, NodeError> {
    tracing::warn!("built without the `rocksdb` feature: metadata is kept in memory only");
    Ok(Arc::new(meta::memory::MemoryMetaStore::new(
        meta::WELL_KNOWN_CFS,
    )))
}

/// Whether a RocksDB open error means another process (or this one) holds the `LOCK` file.
/// RocksDB words it "While lock file: …/LOCK: Resource temporarily unavailable" when another
/// process holds it, and "lock hold by current process, …" for a second open within one process.
#[cfg(feature = "rocksdb")]
fn is_lock_error(message: &str) -> bool {
    let message = message.to_ascii_lowercase();
    message.contains("while lock file") || message.contains("lock hold by current process")
}

/// Reads the recorded bootstrap path, records `want` when there is none, and returns it.
fn record_bootstrap(
    meta: &dyn MetaStore,
    config: &Config,
    want: Bootstrap,
) -> Result<Bootstrap, NodeError> {
    let meta_error = |source| NodeError::Meta {
        path: config.meta_dir(),
        source,
    };
    match meta
        .get(meta::CF_DEFAULT, BOOTSTRAP_KEY)
        .map_err(meta_error)?
        .as_deref()
    {
        Some(b"init") => Ok(Bootstrap::Init),
        Some(b"join") => Ok(Bootstrap::Join),
        Some(_) | None => {
            let value: &[u8] = match want {
                Bootstrap::Init => b"init",
                Bootstrap::Join => b"join",
            };
            meta.put(meta::CF_DEFAULT, BOOTSTRAP_KEY, value, true)
                .map_err(meta_error)?;
            Ok(want)
        }
    }
}

/// Enters the cluster as DESIGN.md §5 says (see the module doc). Returns the task that keeps
/// asking to join, if one was started.
async fn bootstrap(
    config: &Config,
    meta: &dyn MetaStore,
    raft: &MetaRaft,
    transport: &RaftTransportService,
    advertise: &str,
    fail: oneshot::Sender<NodeError>,
) -> Result<Option<JoinHandle<()>>, NodeError> {
    let initialized = raft
        .is_initialized()
        .await
        .map_err(|e| NodeError::Raft(Box::new(e)))?;
    let serve_raft = || transport.add_group(META_GROUP, Arc::new(raft.clone()));
    if initialized {
        serve_raft();
        if !config.join.is_empty() {
            tracing::info!("data directory holds cluster state; rejoining it and ignoring --join");
        }
        return Ok(None);
    }
    let want = if config.join.is_empty() {
        Bootstrap::Init
    } else {
        Bootstrap::Join
    };
    let recorded = record_bootstrap(meta, config, want)?;
    if (recorded, want) != (Bootstrap::Join, Bootstrap::Join) {
        serve_raft();
    }
    match (recorded, want) {
        (Bootstrap::Init, Bootstrap::Init) => {
            tracing::info!(
                node_id = config.node_id,
                "initializing a new one-node cluster"
            );
            let members = BTreeMap::from([(
                config.node_id,
                BasicNode {
                    addr: advertise.to_string(),
                },
            )]);
            match raft.initialize(members).await {
                Ok(()) => {}
                // Already initialized by an earlier, interrupted start: nothing to do.
                Err(RaftError::APIError(InitializeError::NotAllowed(_))) => {}
                Err(e) => return Err(NodeError::Raft(Box::new(e))),
            }
            Ok(None)
        }
        (Bootstrap::Join, Bootstrap::Join) => Ok(Some(spawn_joiner(
            config,
            advertise,
            raft.clone(),
            transport.clone(),
            fail,
        ))),
        (Bootstrap::Join, Bootstrap::Init) => {
            // Asked to join before but not yet a member: the cluster may already list this
            // node as a learner and will contact it; wait for that.
            tracing::warn!(
                "this node asked to join a cluster but has not received its state yet; waiting \
                 to be contacted (start with --join to ask again)"
            );
            Ok(None)
        }
        (Bootstrap::Init, Bootstrap::Join) => Err(NodeError::BootstrapMismatch {
            data_dir: config.data_dir.clone(),
            recorded: "initialized",
            hint: "it cannot join another one; start it without --join or use an empty data \
                   directory",
        }),
    }
}

/// Gives the cluster its id once: whichever node leads the metadata group while the cluster
/// has none proposes a random one (the first applied wins, see `MetaCommand::InitCluster`).
async fn name_cluster(controller: crate::broker::controller::Controller) {
    loop {
        match controller.state().cluster_id() {
            Ok(Some(_)) => return,
            Ok(None) if controller.leads() => {
                let id = uuid::Uuid::from_bytes(rand::random()).simple().to_string();
                if let Err(e) = controller
                    .propose(aqueduct_raft::types::MetaCommand::InitCluster { id })
                    .await
                {
                    tracing::debug!(err = %e, "naming the cluster; will retry");
                }
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(err = %e, "reading the cluster id"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Asks the cluster to add this node until it answers, then logs the role it got. A refusal
/// that retrying cannot change (id or address taken, a voter rejoining without its data,
/// a malformed address) is sent to `fail`, which stops the node.
fn spawn_joiner(
    config: &Config,
    advertise: &str,
    raft: MetaRaft,
    transport: RaftTransportService,
    fail: oneshot::Sender<NodeError>,
) -> JoinHandle<()> {
    let client = AdminClient::new(config.join.clone(), Duration::from_secs(30));
    let node_id = config.node_id;
    let addr = advertise.to_string();
    let servers = config.join.join(",");
    tokio::spawn(async move {
        let mut pause = Duration::from_millis(200);
        // Before this node accepts any Raft traffic: would the cluster take it? A voter that
        // lost its data directory must not be handed a log (and a vote) by replication.
        let had_state = raft.is_initialized().await.unwrap_or(false);
        let mut checked = false;
        loop {
            tracing::info!(node_id, via = %servers, "asking the cluster to add this node");
            let has_state = if checked {
                raft.is_initialized().await.unwrap_or(false)
            } else {
                had_state
            };
            let request = aqueduct_protocol::cluster::JoinRequest {
                node_id,
                addr: addr.clone(),
                has_state,
                dry_run: !checked,
            };
            match client
                .on_leader(|mut c| {
                    let request = request.clone();
                    async move { c.join(request).await }
                })
                .await
            {
                Ok(_) if !checked => {
                    checked = true;
                    transport.add_group(META_GROUP, Arc::new(raft.clone()));
                    continue;
                }
                Ok(reply) => {
                    tracing::info!(node_id, role = %reply.role, "joined the cluster");
                    return;
                }
                Err(e @ ClientError::BadAddress(_)) => {
                    let _ = fail.send(NodeError::JoinRefused(e.to_string()));
                    return;
                }
                Err(e)
                    if matches!(
                        e.code(),
                        Some("NODE_ID_IN_USE" | "REJOIN_WITHOUT_STATE" | "INVALID_NODE")
                    ) =>
                {
                    let _ = fail.send(NodeError::JoinRefused(e.to_string()));
                    return;
                }
                Err(e) => tracing::warn!(err = %e, "joining failed; retrying"),
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(5));
        }
    })
}

/// Records this node's id in a fresh data directory, or checks it against the recorded one.
fn claim_data_dir(meta: &dyn MetaStore, config: &Config) -> Result<(), NodeError> {
    let meta_error = |source| NodeError::Meta {
        path: config.meta_dir(),
        source,
    };
    match meta
        .get(meta::CF_DEFAULT, NODE_ID_KEY)
        .map_err(meta_error)?
    {
        Some(bytes) => {
            let recorded = <[u8; 8]>::try_from(bytes.as_slice())
                .map(u64::from_be_bytes)
                .map_err(|_| NodeError::MalformedNodeId {
                    path: config.meta_dir(),
                    len: bytes.len(),
                })?;
            if recorded != config.node_id {
                return Err(NodeError::NodeIdMismatch {
                    data_dir: config.data_dir.clone(),
                    recorded,
                    configured: config.node_id,
                });
            }
            Ok(())
        }
        None => meta
            .put(
                meta::CF_DEFAULT,
                NODE_ID_KEY,
                &config.node_id.to_be_bytes(),
                true,
            )
            .map_err(meta_error),
    }
}

/// SIGINT and SIGTERM, installed up front so that a signal arriving while the node starts is
/// not lost (nor handled by the default action, which would kill the process).
#[derive(Debug)]
pub struct ShutdownSignal {
    interrupt: Signal,
    terminate: Signal,
}

impl ShutdownSignal {
    /// Installs the handlers; must be called inside a Tokio runtime.
    pub fn install() -> Result<Self, NodeError> {
        Ok(Self {
            interrupt: signal(SignalKind::interrupt()).map_err(NodeError::Signals)?,
            terminate: signal(SignalKind::terminate()).map_err(NodeError::Signals)?,
        })
    }

    /// Waits for the first SIGINT or SIGTERM and returns its name.
    pub async fn recv(mut self) -> &'static str {
        tokio::select! {
            _ = self.interrupt.recv() => "SIGINT",
            _ = self.terminate.recv() => "SIGTERM",
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use aqueduct_storage::meta::memory::MemoryMetaStore;

    use super::*;

    fn config(node_id: u64) -> Config {
        Config {
            node_id,
            data_dir: PathBuf::from("/data"),
            ..Config::default()
        }
    }

    /// The first node to use a data directory owns it; another id is refused with both ids named.
    #[test]
    fn data_dir_stays_with_its_first_node() {
        let store = MemoryMetaStore::new(meta::WELL_KNOWN_CFS);
        claim_data_dir(&store, &config(3)).unwrap();
        claim_data_dir(&store, &config(3)).unwrap();
        let err = claim_data_dir(&store, &config(4)).unwrap_err();
        assert!(
            matches!(
                err,
                NodeError::NodeIdMismatch {
                    recorded: 3,
                    configured: 4,
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(
            store.get(meta::CF_DEFAULT, NODE_ID_KEY).unwrap(),
            Some(3u64.to_be_bytes().to_vec())
        );
    }

    #[test]
    fn malformed_node_id_record_is_reported() {
        let store = MemoryMetaStore::new(meta::WELL_KNOWN_CFS);
        store
            .put(meta::CF_DEFAULT, NODE_ID_KEY, b"x", true)
            .unwrap();
        assert!(matches!(
            claim_data_dir(&store, &config(1)),
            Err(NodeError::MalformedNodeId { len: 1, .. })
        ));
    }

    /// Both wordings RocksDB uses for a held lock are recognised, and nothing else is.
    #[cfg(feature = "rocksdb")]
    #[test]
    fn lock_errors_are_recognised() {
        assert!(is_lock_error(
            "IO error: While lock file: /d/meta/LOCK: Resource temporarily unavailable"
        ));
        assert!(is_lock_error(
            "IO error: lock hold by current process, acquire time 1 acquiring thread 2: \
             /d/meta/LOCK: No locks available"
        ));
        assert!(!is_lock_error("IO error: No space left on device"));
    }

    /// A second node on the same data directory fails with a message naming the directory.
    #[cfg(feature = "rocksdb")]
    #[tokio::test]
    async fn second_node_on_same_data_dir_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config {
            data_dir: dir.path().to_owned(),
            admin_addr: Some("127.0.0.1:0".parse().unwrap()),
            grpc_addr: Some("127.0.0.1:0".parse().unwrap()),
            ..Config::default()
        };
        let node = Node::start(config.clone()).await.unwrap();
        let err = Node::start(config).await.unwrap_err();
        assert!(matches!(err, NodeError::DataDirInUse { .. }), "{err}");
        assert!(
            err.to_string()
                .contains("in use by another aqueduct process")
        );
        node.stop().await.unwrap();
    }
}
