//! The contract suite every [`MetaStore`] implementation must pass: each check here is one
//! promise made in the trait's documentation. Implementations run it from their own unit tests
//! (`memory.rs`, `rocks.rs`).

use std::collections::BTreeMap;
use std::ops::Bound;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{CF_DEFAULT, CF_RAFT, CF_STATE, KeyValue, MetaError, MetaStore, MetaWriteBatch};

/// What reopening a store from its directory brings back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reopen {
    /// Every durable write (the durable implementations).
    KeepsDurableWrites,
    /// Nothing: the store has no reopen (the memory store); the reopen check is skipped.
    LosesEverything,
}

type Opener<'a> = &'a dyn Fn(&Path) -> Box<dyn MetaStore>;
/// One check of the suite, run on a fresh directory per store it opens.
type Check = fn(Opener<'_>);

/// Runs every check against stores made by `open`, which must open (creating if needed) a store
/// in the given directory with the column families [`super::WELL_KNOWN_CFS`].
/// `open_checkpoint` opens a directory written by [`MetaStore::checkpoint`].
pub(crate) fn contract_suite(
    open: impl Fn(&Path) -> Box<dyn MetaStore>,
    open_checkpoint: impl Fn(&Path) -> Box<dyn MetaStore>,
    reopen: Reopen,
) {
    let checks: &[(&str, Check)] = &[
        ("get_after_put", get_after_put),
        ("batch_is_all_or_nothing", batch_is_all_or_nothing),
        ("batch_applies_in_order", batch_applies_in_order),
        (
            "readers_never_see_half_a_batch",
            readers_never_see_half_a_batch,
        ),
        ("delete", delete),
        ("column_families_are_separate", column_families_are_separate),
        ("scan_order_bounds_and_limits", scan_order_bounds_and_limits),
        ("scan_prefix", scan_prefix),
        ("unknown_column_family", unknown_column_family),
        ("matches_a_model", matches_a_model),
    ];
    for (name, check) in checks {
        eprintln!("meta contract: {name}");
        check(&open);
    }
    if reopen == Reopen::KeepsDurableWrites {
        eprintln!("meta contract: reopen_keeps_durable_writes");
        reopen_keeps_durable_writes(&open);
    }
    eprintln!("meta contract: checkpoint_is_a_point_in_time_copy");
    checkpoint_is_a_point_in_time_copy(&open, &open_checkpoint);
}

fn fresh(open: Opener<'_>) -> (tempfile::TempDir, Box<dyn MetaStore>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir.path().join("store"));
    (dir, store)
}

fn all(store: &dyn MetaStore, cf: &str) -> Vec<KeyValue> {
    store
        .scan(cf, Bound::Unbounded, Bound::Unbounded, usize::MAX)
        .expect("scan all")
}

fn kv(k: &[u8], v: &[u8]) -> KeyValue {
    (k.to_vec(), v.to_vec())
}

fn get_after_put(open: Opener<'_>) {
    let (_dir, store) = fresh(open);
    assert_eq!(store.get(CF_STATE, b"k").expect("get"), None);
    store.put(CF_STATE, b"k", b"v1", false).expect("put");
    assert_eq!(
        store.get(CF_STATE, b"k").expect("get"),
        Some(b"v1".to_vec())
    );
    store.put(CF_STATE, b"k", b"v2", true).expect("overwrite");
    assert_eq!(
        store.get(CF_STATE, b"k").expect("get"),
        Some(b"v2".to_vec())
    );
    // An empty value is present, not absent; an empty key is a key like any other.
    store
        .put(CF_STATE, b"empty", b"", false)
        .expect("put empty value");
    assert_eq!(
        store.get(CF_STATE, b"empty").expect("get"),
        Some(Vec::new())
    );
    store
        .put(CF_STATE, b"", b"root", false)
        .expect("put empty key");
    assert_eq!(
        store.get(CF_STATE, b"").expect("get"),
        Some(b"root".to_vec())
    );
}

fn batch_is_all_or_nothing(open: Opener<'_>) {
    let (_dir, store) = fresh(open);
    store.put(CF_STATE, b"gone", b"x", false).expect("put");

    let mut ok = MetaWriteBatch::new();
    ok.put(CF_RAFT, b"vote", b"t1")
        .put(CF_STATE, b"a", b"1")
        .put(CF_DEFAULT, b"b", b"2")
        .delete(CF_STATE, b"gone");
    store.write(ok, true).expect("write batch");
    assert_eq!(
        store.get(CF_RAFT, b"vote").expect("get"),
        Some(b"t1".to_vec())
    );
    assert_eq!(store.get(CF_STATE, b"a").expect("get"), Some(b"1".to_vec()));
    assert_eq!(
        store.get(CF_DEFAULT, b"b").expect("get"),
        Some(b"2".to_vec())
    );
    assert_eq!(store.get(CF_STATE, b"gone").expect("get"), None);

    // A batch with a bad operation at its end must leave no trace of the good ones before it.
    let mut bad = MetaWriteBatch::new();
    bad.put(CF_STATE, b"a", b"changed")
        .delete(CF_DEFAULT, b"b")
        .put(CF_RAFT, b"new", b"x")
        .put("no-such-cf", b"k", b"v");
    match store.write(bad, true) {
        Err(MetaError::UnknownColumnFamily(cf)) => assert_eq!(cf, "no-such-cf"),
        other => panic!("expected UnknownColumnFamily, got {other:?}"),
    }
    assert_eq!(store.get(CF_STATE, b"a").expect("get"), Some(b"1".to_vec()));
    assert_eq!(
        store.get(CF_DEFAULT, b"b").expect("get"),
        Some(b"2".to_vec())
    );
    assert_eq!(store.get(CF_RAFT, b"new").expect("get"), None);

    // Empty batches are valid, synced or not.
    store
        .write(MetaWriteBatch::new(), false)
        .expect("empty batch");
    store
        .write(MetaWriteBatch::new(), true)
        .expect("empty synced batch");
}

fn batch_applies_in_order(open: Opener<'_>) {
    let (_dir, store) = fresh(open);
    let mut batch = MetaWriteBatch::new();
    batch
        .put(CF_STATE, b"put-then-delete", b"x")
        .delete(CF_STATE, b"put-then-delete")
        .delete(CF_STATE, b"delete-then-put")
        .put(CF_STATE, b"delete-then-put", b"y")
        .put(CF_STATE, b"twice", b"first")
        .put(CF_STATE, b"twice", b"second");
    store.write(batch, false).expect("write");
    assert_eq!(
        all(store.as_ref(), CF_STATE),
        vec![kv(b"delete-then-put", b"y"), kv(b"twice", b"second")]
    );
}

/// Readers racing a writer must see every batch whole: all keys of a snapshot scan carry the
/// same generation number.
fn readers_never_see_half_a_batch(open: Opener<'_>) {
    const KEYS: usize = 8;
    const GENERATIONS: u32 = 300;
    let (_dir, store) = fresh(open);
    let store: Arc<dyn MetaStore> = Arc::from(store);
    let done = Arc::new(AtomicBool::new(false));
    let reader = {
        let store = Arc::clone(&store);
        let done = Arc::clone(&done);
        std::thread::spawn(move || {
            let mut scans = 0_u32;
            while !done.load(Ordering::Acquire) || scans == 0 {
                let pairs = all(store.as_ref(), CF_STATE);
                let values: Vec<&Vec<u8>> = pairs.iter().map(|(_, v)| v).collect();
                assert!(
                    pairs.is_empty()
                        || (pairs.len() == KEYS && values.windows(2).all(|w| w[0] == w[1])),
                    "scan saw a partial batch: {pairs:?}"
                );
                scans += 1;
            }
        })
    };
    for generation in 0..GENERATIONS {
        let mut batch = MetaWriteBatch::new();
        for key in 0..KEYS {
            batch.put(CF_STATE, format!("key-{key}"), generation.to_be_bytes());
        }
        batch.put(CF_RAFT, b"generation", generation.to_be_bytes());
        store.write(batch, false).expect("write");
    }
    done.store(true, Ordering::Release);
    reader.join().expect("reader thread");
}

fn delete(open: Opener<'_>) {
    let (_dir, store) = fresh(open);
    store.put(CF_STATE, b"a", b"1", false).expect("put");
    store.put(CF_STATE, b"b", b"2", false).expect("put");
    store.delete(CF_STATE, b"a", true).expect("delete");
    assert_eq!(store.get(CF_STATE, b"a").expect("get"), None);
    assert_eq!(all(store.as_ref(), CF_STATE), vec![kv(b"b", b"2")]);
    store
        .delete(CF_STATE, b"never-written", false)
        .expect("delete absent key");
    store
        .put(CF_STATE, b"a", b"again", false)
        .expect("put after delete");
    assert_eq!(
        store.get(CF_STATE, b"a").expect("get"),
        Some(b"again".to_vec())
    );
}

fn column_families_are_separate(open: Opener<'_>) {
    let (_dir, store) = fresh(open);
    let mut cfs = store.column_families();
    cfs.sort();
    assert_eq!(cfs, vec![CF_DEFAULT, CF_RAFT, CF_STATE]);
    store.put(CF_STATE, b"k", b"state", false).expect("put");
    store.put(CF_RAFT, b"k", b"raft", false).expect("put");
    assert_eq!(store.get(CF_DEFAULT, b"k").expect("get"), None);
    assert_eq!(
        store.get(CF_RAFT, b"k").expect("get"),
        Some(b"raft".to_vec())
    );
    assert_eq!(all(store.as_ref(), CF_STATE), vec![kv(b"k", b"state")]);
    assert!(all(store.as_ref(), CF_DEFAULT).is_empty());
}

fn scan_order_bounds_and_limits(open: Opener<'_>) {
    use Bound::{Excluded, Included, Unbounded};
    let (_dir, store) = fresh(open);
    // Written out of order; includes keys that sort by bytes, not by length or as text.
    let keys: &[&[u8]] = &[b"d", b"b", &[0xFF], b"a", b"c", b"", b"ba", &[0x00]];
    for key in keys {
        store.put(CF_STATE, key, key, false).expect("put");
    }
    let mut sorted: Vec<Vec<u8>> = keys.iter().map(|k| k.to_vec()).collect();
    sorted.sort();
    let scanned = |start: Bound<&[u8]>, end: Bound<&[u8]>, limit: usize| -> Vec<Vec<u8>> {
        store
            .scan(CF_STATE, start, end, limit)
            .expect("scan")
            .into_iter()
            .map(|(k, v)| {
                assert_eq!(k, v, "value does not belong to its key");
                k
            })
            .collect()
    };
    let ks = |v: &[&[u8]]| -> Vec<Vec<u8>> { v.iter().map(|k| k.to_vec()).collect() };

    assert_eq!(scanned(Unbounded, Unbounded, usize::MAX), sorted);
    assert_eq!(scanned(Unbounded, Unbounded, 3), sorted[..3].to_vec());
    assert!(scanned(Unbounded, Unbounded, 0).is_empty());
    assert_eq!(
        scanned(Included(b"b"), Excluded(b"c"), usize::MAX),
        ks(&[b"b", b"ba"])
    );
    assert_eq!(
        scanned(Excluded(b"b"), Included(b"c"), usize::MAX),
        ks(&[b"ba", b"c"])
    );
    assert_eq!(
        scanned(Included(b"b"), Included(b"c"), 2),
        ks(&[b"b", b"ba"])
    );
    assert_eq!(
        scanned(Excluded(b"bb"), Unbounded, usize::MAX),
        ks(&[b"c", b"d", &[0xFF]])
    );
    assert_eq!(
        scanned(Unbounded, Excluded(b"a"), usize::MAX),
        ks(&[b"", &[0x00]])
    );
    assert_eq!(
        scanned(Included(b"b"), Included(b"b"), usize::MAX),
        ks(&[b"b"])
    );
    // Bounds between and beyond keys.
    assert_eq!(
        scanned(Included(b"bz"), Excluded(b"cc"), usize::MAX),
        ks(&[b"c"])
    );
    assert!(scanned(Included(&[0xFF, 0x00]), Unbounded, usize::MAX).is_empty());
    // Empty ranges yield nothing rather than failing.
    assert!(scanned(Included(b"c"), Excluded(b"b"), usize::MAX).is_empty());
    assert!(scanned(Included(b"b"), Excluded(b"b"), usize::MAX).is_empty());
    assert!(scanned(Excluded(b"b"), Excluded(b"b"), usize::MAX).is_empty());
    assert!(scanned(Excluded(b"b"), Included(b"b"), usize::MAX).is_empty());
    // Deleted keys disappear from scans, including at the bounds.
    store.delete(CF_STATE, b"b", false).expect("delete");
    assert_eq!(
        scanned(Included(b"b"), Included(b"c"), usize::MAX),
        ks(&[b"ba", b"c"])
    );
}

fn scan_prefix(open: Opener<'_>) {
    let (_dir, store) = fresh(open);
    let keys: &[&[u8]] = &[
        b"topic/a",
        b"topic/b",
        b"topic",
        b"topic0",
        b"topia",
        &[1, 0xFF],
        &[1, 0xFF, 0],
        &[1, 0xFF, 0xFF],
        &[2],
        &[0xFF, 0xFF, 1],
    ];
    for key in keys {
        store.put(CF_STATE, key, b"v", false).expect("put");
    }
    let prefixed = |prefix: &[u8], limit: usize| -> Vec<Vec<u8>> {
        store
            .scan_prefix(CF_STATE, prefix, limit)
            .expect("scan_prefix")
            .into_iter()
            .map(|(k, _)| k)
            .collect()
    };
    let ks = |v: &[&[u8]]| -> Vec<Vec<u8>> { v.iter().map(|k| k.to_vec()).collect() };
    assert_eq!(
        prefixed(b"topic/", usize::MAX),
        ks(&[b"topic/a", b"topic/b"])
    );
    assert_eq!(
        prefixed(b"topic", usize::MAX),
        ks(&[b"topic", b"topic/a", b"topic/b", b"topic0"])
    );
    assert_eq!(prefixed(b"topic", 2), ks(&[b"topic", b"topic/a"]));
    assert_eq!(prefixed(b"topic", 0), Vec::<Vec<u8>>::new());
    assert!(prefixed(b"nothing", usize::MAX).is_empty());
    // Prefixes ending in 0xFF, whose range end must carry into an earlier byte.
    assert_eq!(
        prefixed(&[1, 0xFF], usize::MAX),
        ks(&[&[1, 0xFF], &[1, 0xFF, 0], &[1, 0xFF, 0xFF]])
    );
    assert_eq!(prefixed(&[0xFF, 0xFF], usize::MAX), ks(&[&[0xFF, 0xFF, 1]]));
    assert_eq!(prefixed(b"", usize::MAX).len(), keys.len());
}

fn unknown_column_family(open: Opener<'_>) {
    let (_dir, store) = fresh(open);
    let is_unknown = |result: Result<(), MetaError>| {
        assert!(
            matches!(&result, Err(MetaError::UnknownColumnFamily(cf)) if cf == "nope"),
            "expected UnknownColumnFamily(\"nope\"), got {result:?}"
        );
    };
    is_unknown(store.get("nope", b"k").map(drop));
    is_unknown(store.put("nope", b"k", b"v", false));
    is_unknown(store.delete("nope", b"k", true));
    is_unknown(
        store
            .scan("nope", Bound::Unbounded, Bound::Unbounded, 10)
            .map(drop),
    );
    // Even a scan that could return nothing must name the bad family.
    is_unknown(
        store
            .scan("nope", Bound::Unbounded, Bound::Unbounded, 0)
            .map(drop),
    );
    is_unknown(store.scan_prefix("nope", b"", 10).map(drop));
    let mut batch = MetaWriteBatch::new();
    batch.put("nope", b"k", b"v");
    is_unknown(store.write(batch, false));
}

/// Random puts, deletes and batches checked against a `BTreeMap` after every step.
fn matches_a_model(open: Opener<'_>) {
    let seed: u64 = rand::random();
    eprintln!("meta contract: matches_a_model seed {seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let (_dir, store) = fresh(open);
    let cfs = [CF_DEFAULT, CF_STATE];
    let mut model: BTreeMap<&str, BTreeMap<Vec<u8>, Vec<u8>>> =
        cfs.iter().map(|cf| (*cf, BTreeMap::new())).collect();
    let key = |rng: &mut StdRng| -> Vec<u8> {
        let len = rng.random_range(0..3);
        (0..len).map(|_| rng.random_range(0..4_u8) * 0x55).collect()
    };
    for step in 0..400 {
        let mut batch = MetaWriteBatch::new();
        for _ in 0..rng.random_range(1..4) {
            let cf = cfs[rng.random_range(0..cfs.len())];
            let k = key(&mut rng);
            let family = model.get_mut(cf).expect("model family");
            if rng.random_bool(0.7) {
                let v = vec![rng.random::<u8>(); rng.random_range(0..3)];
                batch.put(cf, k.clone(), v.clone());
                family.insert(k, v);
            } else {
                batch.delete(cf, k.clone());
                family.remove(&k);
            }
        }
        store.write(batch, rng.random_bool(0.1)).expect("write");
        for cf in cfs {
            let expected: Vec<KeyValue> = model[cf]
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            assert_eq!(
                all(store.as_ref(), cf),
                expected,
                "seed {seed}, step {step}, cf {cf}"
            );
            let start = key(&mut rng);
            let limit = rng.random_range(0..5);
            let expected: Vec<KeyValue> = model[cf]
                .range(start.clone()..)
                .take(limit)
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            let got = store
                .scan(cf, Bound::Included(&start), Bound::Unbounded, limit)
                .expect("scan");
            assert_eq!(
                got, expected,
                "seed {seed}, step {step}, cf {cf}, from {start:?}"
            );
        }
    }
}

fn reopen_keeps_durable_writes(open: Opener<'_>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("store");
    {
        let store = open(&path);
        store
            .put(CF_RAFT, b"vote", b"term-3", true)
            .expect("synced put");
        let mut batch = MetaWriteBatch::new();
        batch
            .put(CF_RAFT, b"committed", b"7")
            .put(CF_STATE, b"view", b"at-7");
        store.write(batch, true).expect("synced batch");
        store
            .put(CF_STATE, b"flushed", b"yes", false)
            .expect("unsynced put");
        store
            .delete(CF_STATE, b"view", false)
            .expect("unsynced delete");
        store.flush().expect("flush");
    }
    let store = open(&path);
    assert_eq!(
        store.get(CF_RAFT, b"vote").expect("get"),
        Some(b"term-3".to_vec())
    );
    assert_eq!(
        store.get(CF_RAFT, b"committed").expect("get"),
        Some(b"7".to_vec())
    );
    assert_eq!(
        store.get(CF_STATE, b"flushed").expect("get"),
        Some(b"yes".to_vec())
    );
    assert_eq!(store.get(CF_STATE, b"view").expect("get"), None);
    // The reopened store is writable and a second reopen sees that too.
    store
        .put(CF_DEFAULT, b"after", b"reopen", true)
        .expect("put after reopen");
    drop(store);
    let store = open(&path);
    assert_eq!(
        store.get(CF_DEFAULT, b"after").expect("get"),
        Some(b"reopen".to_vec())
    );
}

fn checkpoint_is_a_point_in_time_copy(open: Opener<'_>, open_checkpoint: Opener<'_>) {
    let (dir, store) = fresh(open);
    for i in 0..50_u32 {
        let mut batch = MetaWriteBatch::new();
        batch
            .put(CF_STATE, format!("s{i:03}"), i.to_be_bytes())
            .put(CF_RAFT, format!("r{i:03}"), b"");
        store.write(batch, false).expect("write");
    }
    store.delete(CF_STATE, b"s010", false).expect("delete");
    let snapshot: Vec<Vec<KeyValue>> = [CF_DEFAULT, CF_RAFT, CF_STATE]
        .iter()
        .map(|cf| all(store.as_ref(), cf))
        .collect();

    let checkpoint_dir = dir.path().join("checkpoint");
    store.checkpoint(&checkpoint_dir).expect("checkpoint");
    // Writes after the checkpoint must not reach it.
    store.put(CF_STATE, b"s000", b"later", true).expect("put");
    store.put(CF_DEFAULT, b"later", b"x", true).expect("put");
    // A checkpoint never overwrites an existing directory.
    assert!(
        store.checkpoint(&checkpoint_dir).is_err(),
        "checkpoint into an existing dir"
    );

    let copy = open_checkpoint(&checkpoint_dir);
    let mut cfs = copy.column_families();
    cfs.sort();
    assert_eq!(cfs, vec![CF_DEFAULT, CF_RAFT, CF_STATE]);
    let copied: Vec<Vec<KeyValue>> = [CF_DEFAULT, CF_RAFT, CF_STATE]
        .iter()
        .map(|cf| all(copy.as_ref(), cf))
        .collect();
    assert_eq!(copied, snapshot);
    // The source store is unaffected and still writable.
    assert_eq!(
        store.get(CF_STATE, b"s000").expect("get"),
        Some(b"later".to_vec())
    );
    store
        .put(CF_STATE, b"s001", b"still", false)
        .expect("put after checkpoint");
}
