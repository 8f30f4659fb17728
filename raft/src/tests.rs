//! openraft's own storage test suite against the real thing: the segmented log on disk (temp
//! dir, `StdFs`, `FlushPolicy::Always`) and the RocksDB metadata store.

use std::sync::Arc;

use aqueduct_storage::fs::StdFs;
use aqueduct_storage::meta::WELL_KNOWN_CFS;
use aqueduct_storage::meta::rocks::RocksMetaStore;
use aqueduct_storage::metrics::StorageMetrics;
use aqueduct_storage::{LogOptions, PartitionLog};
use openraft::StorageError;
use openraft::testing::log::{StoreBuilder, Suite};
use openraft::type_config::TypeConfigExt;
use tempfile::TempDir;

use crate::log_store::SegmentedLogStore;
use crate::state_machine::MetaStateMachine;
use crate::types::GroupTypeConfig;

struct OnDisk;

impl StoreBuilder<GroupTypeConfig, SegmentedLogStore, MetaStateMachine, TempDir> for OnDisk {
    async fn build(
        &self,
    ) -> Result<(TempDir, SegmentedLogStore, MetaStateMachine), StorageError<GroupTypeConfig>> {
        let dir =
            TempDir::new().map_err(|e| StorageError::read(GroupTypeConfig::err_from_error(&e)))?;
        let log = PartitionLog::open(
            Arc::new(StdFs),
            &dir.path().join("log"),
            LogOptions {
                segment_bytes: 4096,
                ..LogOptions::default()
            },
            Arc::new(StorageMetrics::default()),
        )
        .map_err(|e| StorageError::read(GroupTypeConfig::err_from_error(&e)))?;
        let meta = RocksMetaStore::open(&dir.path().join("meta"), WELL_KNOWN_CFS)
            .map_err(|e| StorageError::read(GroupTypeConfig::err_from_error(&e)))?;
        let meta: Arc<dyn aqueduct_storage::meta::MetaStore> = Arc::new(meta);
        let store = SegmentedLogStore::new(Arc::new(log), Arc::clone(&meta), "meta");
        Ok((dir, store, MetaStateMachine::new(meta)))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openraft_storage_suite_on_segmented_log_and_rocksdb()
-> Result<(), StorageError<GroupTypeConfig>> {
    Suite::test_all(OnDisk).await
}
