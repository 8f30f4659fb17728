//! A node's lifecycle: start, serve, stop.
//!
//! [`Node::start`] creates the data directory, opens the metadata store at `<data_dir>/meta`
//! (its RocksDB lock makes a data directory belong to one process at a time), checks or records
//! which node the directory belongs to, and starts the HTTP admin server. [`Node::stop`] closes
//! the listeners, flushes the metadata store and logs `stopped`. [`ShutdownSignal`] turns
//! SIGINT/SIGTERM into that stop.
//!
//! Invariants: a data directory is only ever used by the node whose id it recorded first; a
//! node that returned from `stop` without error has every metadata write durable.
//!
//! Configuration and its precedence rules are in [`config`].

pub mod config;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use aqueduct_storage::meta::{self, MetaError, MetaStore};
use aqueduct_storage::metrics::StorageMetrics;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::admin::{AdminError, AdminServer, AdminState};
use config::Config;

/// Key (in [`meta::CF_DEFAULT`]) of the id of the node that owns the data directory, stored as
/// a big-endian `u64`.
pub const NODE_ID_KEY: &[u8] = b"node_id";

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
    stop_admin: oneshot::Sender<()>,
    admin: JoinHandle<()>,
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
            version = crate::admin::VERSION,
            "started"
        );
        Ok(Self {
            config,
            meta,
            storage_metrics,
            admin_addr,
            stop_admin,
            admin,
        })
    }

    /// The address the HTTP admin server listens on.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// The node-wide storage counters, shared by every log the node opens.
    pub fn storage_metrics(&self) -> &Arc<StorageMetrics> {
        &self.storage_metrics
    }

    /// The metadata store.
    pub fn meta(&self) -> &Arc<dyn MetaStore> {
        &self.meta
    }

    /// Stops the admin server, flushes the metadata store and logs `stopped`.
    pub async fn stop(self) -> Result<(), NodeError> {
        tracing::info!("stopping");
        let _ = self.stop_admin.send(());
        if let Err(err) = self.admin.await {
            tracing::warn!(%err, "admin server task failed");
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
