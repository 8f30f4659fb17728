//! The Raft log store over the fault file system: random appends (acknowledged through
//! openraft's `IOFlushed`), truncations, purges and votes, a crash at a seeded file-system
//! operation, then recovery. Checks: every entry whose `IOFlushed` fired `Ok` (and that no
//! completed truncation removed and no attempted purge covered) reads back with the same log id
//! and payload; the log has no holes and never starts after `last_purged + 1`; the last saved
//! vote is the one read back. `AQ_RAFT_CRASH_CASES` (default 1000), `AQ_RAFT_CRASH_SEED`.
//!
//! Votes and purge marks live in the metadata store; here that is the in-memory store, whose
//! synced writes are durable by construction, so the vote check guards the store's own logic
//! (the RocksDB store's sync is covered by its contract suite).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use aqueduct_storage::fault::FaultFs;
use aqueduct_storage::meta::memory::MemoryMetaStore;
use aqueduct_storage::meta::{MetaStore, WELL_KNOWN_CFS};
use aqueduct_storage::metrics::StorageMetrics;
use aqueduct_storage::{FlushPolicy, LogOptions, PartitionLog};
use openraft::entry::RaftEntry;
use openraft::impls::leader_id_adv::LeaderId;
use openraft::storage::{IOFlushed, RaftLogReader, RaftLogStorage};
use openraft::type_config::TypeConfigExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::oneshot;

use crate::log_store::SegmentedLogStore;
use crate::types::{Entry, GroupCommand, GroupTypeConfig, LogId, MetaCommand, Vote};

fn open(fs: &FaultFs, meta: &Arc<dyn MetaStore>) -> std::io::Result<SegmentedLogStore> {
    let log = PartitionLog::open(
        Arc::new(fs.clone()),
        Path::new("/node/meta-log"),
        LogOptions {
            segment_bytes: 1024,
            index_interval_bytes: 128,
            flush: FlushPolicy::Manual,
            ..LogOptions::default()
        },
        Arc::new(StorageMetrics::default()),
    )
    .map_err(std::io::Error::other)?;
    Ok(SegmentedLogStore::new(
        Arc::new(log),
        Arc::clone(meta),
        "meta",
    ))
}

/// Where an append's `IOFlushed` reports.
type FlushReceiver = oneshot::Receiver<Result<(), std::io::Error>>;

#[derive(Debug, Default)]
struct History {
    /// Index → (log id, entry) acknowledged by `IOFlushed`.
    acked: BTreeMap<u64, Entry>,
    purge_attempted: Option<u64>,
    truncate_attempted: Option<u64>,
    vote: Option<Vote>,
}

async fn workload(seed: u64, fs: &FaultFs, meta: &Arc<dyn MetaStore>, h: &mut History) {
    let mut rng = StdRng::seed_from_u64(seed);
    let Ok(mut store) = open(fs, meta) else {
        return;
    };
    let mut term = 1u64;
    let mut pending: Vec<(Vec<Entry>, FlushReceiver)> = Vec::new();
    for _ in 0..rng.random_range(5..40) {
        let next = store.log().next_index();
        let ok = match rng.random_range(0..100u32) {
            0..=54 => {
                let n = rng.random_range(1..4u64);
                let entries: Vec<Entry> = (0..n)
                    .map(|i| {
                        let id = LogId::new(LeaderId { term, node_id: 1 }, next + i);
                        if rng.random_bool(0.7) {
                            Entry::new_normal(
                                id,
                                GroupCommand::Meta(MetaCommand::RemoveNode {
                                    node_id: rng.random_range(0..1000),
                                }),
                            )
                        } else {
                            Entry::new_blank(id)
                        }
                    })
                    .collect();
                let (tx, rx) = GroupTypeConfig::oneshot();
                let r = store.append(entries.clone(), IOFlushed::signal(tx)).await;
                pending.push((entries, rx));
                r.is_ok()
            }
            55..=74 => store.log().flush().is_ok(),
            75..=84 => {
                let Some(first) = store.log().first_index() else {
                    continue;
                };
                let keep = next.saturating_sub(rng.random_range(1..4)).max(first);
                let Ok(Some(e)) = store
                    .try_get_log_entries(keep..keep + 1)
                    .await
                    .map(|v| v.into_iter().next())
                else {
                    continue;
                };
                term += 1;
                h.truncate_attempted = Some(keep);
                let r = store.truncate_after(Some(e.log_id)).await;
                if r.is_ok() {
                    h.acked.retain(|&i, _| i <= keep);
                    // Appends still waiting for their flush lost these entries too.
                    for (entries, _) in pending.iter_mut() {
                        entries.retain(|e| e.log_id.index <= keep);
                    }
                    h.truncate_attempted = None;
                }
                r.is_ok()
            }
            85..=91 => {
                let Some(first) = store.log().first_index() else {
                    continue;
                };
                let upto = first + rng.random_range(0..3);
                if upto >= next {
                    continue;
                }
                let Ok(Some(e)) = store
                    .try_get_log_entries(upto..upto + 1)
                    .await
                    .map(|v| v.into_iter().next())
                else {
                    continue;
                };
                h.purge_attempted = Some(h.purge_attempted.map_or(upto, |p| p.max(upto)));
                store.purge(e.log_id).await.is_ok()
            }
            _ => {
                term += 1;
                let v = Vote::new(term, rng.random_range(1..4));
                let r = store.save_vote(&v).await;
                if r.is_ok() {
                    h.vote = Some(v);
                }
                r.is_ok()
            }
        };
        // Record what IOFlushed acknowledged so far.
        pending.retain_mut(|(entries, rx)| match rx.try_recv() {
            Ok(Ok(())) => {
                for e in entries.iter() {
                    if h.truncate_attempted.is_none_or(|t| e.log_id.index <= t) {
                        h.acked.insert(e.log_id.index, e.clone());
                    }
                }
                false
            }
            Ok(Err(_)) | Err(oneshot::error::TryRecvError::Closed) => false,
            Err(oneshot::error::TryRecvError::Empty) => true,
        });
        if !ok {
            break;
        }
    }
}

async fn check(image: &FaultFs, meta: &Arc<dyn MetaStore>, h: &History) -> Result<(), String> {
    let mut store = open(image, meta).map_err(|e| format!("reopen: {e}"))?;
    let state = store
        .get_log_state()
        .await
        .map_err(|e| format!("log state: {e}"))?;
    let entries = store
        .try_get_log_entries(..)
        .await
        .map_err(|e| format!("read: {e}"))?;
    for w in entries.windows(2) {
        if w[1].log_id.index != w[0].log_id.index + 1 {
            return Err(format!("hole after index {}", w[0].log_id.index));
        }
    }
    if let (Some(purged), Some(first)) = (state.last_purged_log_id, entries.first())
        && first.log_id.index > purged.index + 1
    {
        return Err(format!(
            "log starts at {} after last purged {}",
            first.log_id.index, purged.index
        ));
    }
    if state.last_log_id
        != entries
            .last()
            .map(|e| e.log_id)
            .or(state.last_purged_log_id)
    {
        return Err("get_log_state disagrees with the entries".into());
    }
    for (i, acked) in &h.acked {
        if h.purge_attempted.is_some_and(|p| *i <= p)
            || h.truncate_attempted.is_some_and(|t| *i > t)
        {
            continue;
        }
        match entries.iter().find(|e| e.log_id.index == *i) {
            Some(e) if e.log_id == acked.log_id && e.payload == acked.payload => {}
            Some(_) => {
                return Err(format!(
                    "index {i} holds another entry than the acknowledged one"
                ));
            }
            None => return Err(format!("acknowledged index {i} lost")),
        }
    }
    let vote = store
        .read_vote()
        .await
        .map_err(|e| format!("read vote: {e}"))?;
    if vote != h.vote {
        return Err(format!("vote {vote:?}, saved {:?}", h.vote));
    }
    Ok(())
}

#[tokio::test]
async fn seeded_crash_points_lose_no_flushed_entry_or_vote() {
    let cases: u64 = std::env::var("AQ_RAFT_CRASH_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let base: u64 = std::env::var("AQ_RAFT_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| rand::rng().random());
    eprintln!(
        "raft log crash points: {cases} cases from base seed {base} (AQ_RAFT_CRASH_SEED replays)"
    );
    let mut failures = Vec::new();
    for case in 0..cases {
        let seed = base.wrapping_add(case);
        let mut rng = StdRng::seed_from_u64(seed ^ 0x5bd1_e995);
        let dry = FaultFs::new();
        let dry_meta: Arc<dyn MetaStore> = Arc::new(MemoryMetaStore::new(WELL_KNOWN_CFS));
        workload(seed, &dry, &dry_meta, &mut History::default()).await;
        let total = dry.op_count().max(1);

        let fs = FaultFs::new();
        let meta: Arc<dyn MetaStore> = Arc::new(MemoryMetaStore::new(WELL_KNOWN_CFS));
        fs.crash_after(rng.random_range(1..=total + 1));
        let mut h = History::default();
        workload(seed, &fs, &meta, &mut h).await;
        fs.crash_now();
        let image = fs.crash_image(rng.random());
        if let Err(why) = check(&image, &meta, &h).await {
            failures.push(format!("seed {seed}: {why}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {cases} crash points failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
