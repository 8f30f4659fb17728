//! The log against a plain model (a map of index → entry) over random appends, reads by
//! index, offset and time, truncations, purges (also past the end), rolls, retention and
//! reopens, on the real file system with tiny segments so every path crosses segment bounds.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use proptest::prelude::*;

use super::{assert_contiguous, expected_payload};
use crate::entry::{Entry, EntryKind};
use crate::fs::StdFs;
use crate::log::{LogOptions, PartitionLog, RetentionPolicy};
use crate::metrics::StorageMetrics;
use crate::{FlushPolicy, LogError, batch};

#[derive(Debug, Clone)]
enum Op {
    Append(Vec<(bool, u32, u16, i64)>),
    Read {
        from_back: u64,
        count: u64,
        max_bytes: usize,
    },
    ReadOffset {
        from_back: u64,
        max_bytes: usize,
    },
    Time(i64),
    Truncate(u64),
    Purge(u64),
    Roll,
    RetainBytes(u64),
    RetainAge(i64),
    /// Retention below an offset this far back from the log end.
    RetainBelow(u64),
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => prop::collection::vec((prop::bool::weighted(0.8), 1u32..6, 0u16..400, 0i64..50), 1..5).prop_map(Op::Append),
        3 => (0u64..40, 1u64..20, 1usize..3000).prop_map(|(from_back, count, max_bytes)| Op::Read { from_back, count, max_bytes }),
        2 => (0u64..60, 1usize..3000).prop_map(|(from_back, max_bytes)| Op::ReadOffset { from_back, max_bytes }),
        2 => (0i64..2000).prop_map(Op::Time),
        1 => (0u64..10).prop_map(Op::Truncate),
        1 => (0u64..40).prop_map(Op::Purge),
        1 => Just(Op::Roll),
        1 => (500u64..6000).prop_map(Op::RetainBytes),
        1 => (0i64..1500).prop_map(Op::RetainAge),
        1 => (0u64..60).prop_map(Op::RetainBelow),
        1 => Just(Op::Reopen),
    ]
}

#[derive(Debug, Clone)]
struct ModelEntry {
    payload: Bytes,
    kind: EntryKind,
    term: u64,
    base_offset: u64,
    count: u32,
    max_ts: i64,
}

#[derive(Debug, Default)]
struct Model {
    entries: BTreeMap<u64, ModelEntry>,
    start: u64,
    next: u64,
    next_offset: u64,
    clock: i64,
}

impl Model {
    fn check_entry(&self, got: &crate::StoredEntry) {
        let m = self
            .entries
            .get(&got.entry.index)
            .unwrap_or_else(|| panic!("log returned unknown index {}", got.entry.index));
        assert_eq!(got.entry.kind, m.kind);
        assert_eq!(got.entry.term, m.term);
        assert_eq!(
            got.base_offset, m.base_offset,
            "offset of index {}",
            got.entry.index
        );
        assert_eq!(got.offset_count, m.count);
        assert_eq!(
            got.entry.payload, m.payload,
            "payload of index {}",
            got.entry.index
        );
        if m.kind == EntryKind::Data {
            assert_eq!(got.max_timestamp, m.max_ts);
        }
    }
}

fn opts() -> LogOptions {
    LogOptions {
        segment_bytes: 2048,
        segment_age: None,
        index_interval_bytes: 300,
        max_entry_bytes: 1 << 16,
        flush: FlushPolicy::Always,
    }
}

fn open(dir: &Path) -> PartitionLog {
    PartitionLog::open(
        Arc::new(StdFs),
        dir,
        opts(),
        Arc::new(StorageMetrics::default()),
    )
    .expect("open")
}

fn run(ops: Vec<Op>) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut log = open(tmp.path());
    let mut m = Model::default();
    for op in ops {
        match op {
            Op::Append(specs) => {
                let mut batch_entries = Vec::new();
                for (i, (is_data, count, body_len, ts_step)) in specs.into_iter().enumerate() {
                    let index = m.next + i as u64;
                    m.clock += ts_step;
                    let e = if is_data {
                        Entry::data(
                            index,
                            3,
                            1,
                            batch::build(count, m.clock, &vec![index as u8; body_len as usize]),
                        )
                    } else {
                        Entry::control(
                            index,
                            3,
                            1,
                            EntryKind::Blank,
                            Bytes::from(vec![7u8; body_len as usize % 50]),
                        )
                    };
                    batch_entries.push((e, m.clock));
                }
                let raw: Vec<Entry> = batch_entries.iter().map(|(e, _)| e.clone()).collect();
                log.append_durable(&raw).expect("append");
                for (e, ts) in batch_entries {
                    let count = if e.kind == EntryKind::Data {
                        batch::inspect(&e.payload).expect("batch").offset_count
                    } else {
                        0
                    };
                    let max_ts = if e.kind == EntryKind::Data { ts } else { -1 };
                    let payload = expected_payload(&e, m.next_offset);
                    m.entries.insert(
                        e.index,
                        ModelEntry {
                            payload,
                            kind: e.kind,
                            term: e.term,
                            base_offset: m.next_offset,
                            count,
                            max_ts,
                        },
                    );
                    m.next = e.index + 1;
                    m.next_offset += u64::from(count);
                }
            }
            Op::Read {
                from_back,
                count,
                max_bytes,
            } => {
                let from = m.next.saturating_sub(from_back).max(m.start);
                let got = log.read(from, from + count, max_bytes).expect("read");
                let want = (from + count).min(m.next).saturating_sub(from);
                if want > 0 {
                    assert!(
                        !got.is_empty(),
                        "read of a non-empty range returned nothing"
                    );
                    assert_eq!(got[0].entry.index, from);
                }
                assert!(got.len() as u64 <= want);
                let bytes: usize = got
                    .iter()
                    .map(|e| crate::entry::frame_size(e.entry.payload.len()))
                    .sum();
                assert!(
                    got.len() <= 1 || bytes <= max_bytes,
                    "read exceeded max_bytes"
                );
                assert_contiguous(&got);
                got.iter().for_each(|e| m.check_entry(e));
                if m.start > 0 && from_back > m.next {
                    assert!(matches!(
                        log.read(m.start - 1, m.start, 100),
                        Err(LogError::Purged { .. })
                    ));
                }
            }
            Op::ReadOffset {
                from_back,
                max_bytes,
            } => {
                let start_offset = m
                    .entries
                    .range(m.start..)
                    .next()
                    .map_or(m.next_offset, |(_, e)| e.base_offset);
                assert_eq!(log.start_offset().expect("start offset"), start_offset);
                let offset = m.next_offset.saturating_sub(from_back).max(start_offset);
                let got = log.read_offsets(offset, max_bytes).expect("read offsets");
                let want: Vec<_> = m
                    .entries
                    .range(m.start..)
                    .filter(|(_, e)| {
                        e.kind == EntryKind::Data && e.base_offset + u64::from(e.count) > offset
                    })
                    .collect();
                match (got.first(), want.first()) {
                    (Some(g), Some((i, _))) => assert_eq!(g.entry.index, **i),
                    (None, None) => {}
                    (g, w) => panic!("read_offsets({offset}): got {g:?}, model {w:?}"),
                }
                for (g, (i, _)) in got.iter().zip(want.iter()) {
                    assert_eq!(g.entry.index, **i);
                    m.check_entry(g);
                }
                if offset > 0 && offset - 1 < start_offset {
                    assert!(matches!(
                        log.read_offsets(offset - 1, 10),
                        Err(LogError::OffsetOutOfRange { .. })
                    ));
                }
            }
            Op::Time(ts) => {
                let got = log.entry_for_timestamp(ts).expect("time lookup");
                let want = m
                    .entries
                    .range(m.start..)
                    .find(|(_, e)| e.kind == EntryKind::Data && e.max_ts >= ts);
                assert_eq!(
                    got.as_ref().map(|e| e.entry.index),
                    want.map(|(i, _)| *i),
                    "time lookup {ts}"
                );
                if let Some(g) = got {
                    m.check_entry(&g);
                }
            }
            Op::Truncate(back) => {
                let index = m.next.saturating_sub(back + 1);
                if index + 1 < m.start {
                    assert!(log.truncate_after(index).is_err());
                    continue;
                }
                log.truncate_after(index).expect("truncate");
                if index + 1 < m.next {
                    let first_gone = m.entries.get(&(index + 1)).map(|e| e.base_offset);
                    m.entries.retain(|&i, _| i <= index);
                    m.next = index + 1;
                    if let Some(off) = first_gone {
                        m.next_offset = off;
                    }
                }
            }
            Op::Purge(rel) => {
                let index = (m.start + rel).min(m.next + 5);
                log.purge_upto(index).expect("purge");
                if index >= m.start {
                    m.start = index + 1;
                    m.next = m.next.max(m.start);
                    m.entries.retain(|&i, _| i >= m.start);
                }
            }
            Op::Roll => log.roll().expect("roll"),
            Op::RetainBytes(max) => {
                let policy = RetentionPolicy {
                    max_bytes: Some(max),
                    max_age: None,
                    ..RetentionPolicy::default()
                };
                apply_retention(&log, &mut m, &policy, 0);
            }
            Op::RetainAge(age) => {
                let policy = RetentionPolicy {
                    max_age: Some(std::time::Duration::from_millis(age as u64)),
                    max_bytes: None,
                    ..RetentionPolicy::default()
                };
                let now = m.clock;
                apply_retention(&log, &mut m, &policy, now);
            }
            Op::RetainBelow(from_back) => {
                let below = log.next_offset().saturating_sub(from_back);
                let start = log.start_offset().expect("start offset");
                let policy = RetentionPolicy {
                    below_offset: Some(below),
                    ..RetentionPolicy::default()
                };
                apply_retention(&log, &mut m, &policy, 0);
                assert!(
                    log.start_offset().expect("start offset") <= start.max(below),
                    "retention below offset {below} deleted records at or above it"
                );
            }
            Op::Reopen => {
                drop(log);
                log = open(tmp.path());
            }
        }
        // Invariants after every step.
        assert_eq!(log.next_index(), m.next);
        assert_eq!(log.next_offset(), m.next_offset);
        let first = (m.start < m.next).then_some(m.start);
        assert_eq!(log.first_index(), first);
        assert_eq!(log.last_index(), (m.start < m.next).then(|| m.next - 1));
    }
    // Everything still there, in one pass.
    let all = log.read(m.start, u64::MAX, usize::MAX).expect("read all");
    assert_eq!(all.len() as u64, m.next - m.start);
    assert_contiguous(&all);
    all.iter().for_each(|e| m.check_entry(e));
}

fn apply_retention(log: &PartitionLog, m: &mut Model, policy: &RetentionPolicy, now: i64) {
    let last_before = log.last_index();
    let point = log.enforce_retention(policy, now).expect("retention");
    if let Some(p) = point {
        assert!(Some(p) <= last_before, "retention went past the end");
        assert!(p >= m.start);
        m.start = p + 1;
        m.entries.retain(|&i, _| i >= m.start);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, .. ProptestConfig::default() })]

    #[test]
    fn log_matches_model(ops in prop::collection::vec(op(), 1..120)) {
        run(ops);
    }
}

#[test]
fn purge_beyond_the_end_continues_after_it() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let log = open(tmp.path());
    log.append_durable(&[Entry::data(0, 1, 1, batch::build(3, 10, b"a"))])
        .expect("append");
    log.purge_upto(9).expect("purge");
    assert_eq!(log.first_index(), None);
    assert_eq!(log.next_index(), 10);
    assert_eq!(log.next_offset(), 3);
    assert!(matches!(
        log.append_durable(&[Entry::data(5, 1, 1, batch::build(1, 10, b"b"))]),
        Err(LogError::NonContiguous {
            expected: 10,
            got: 5
        })
    ));
    drop(log);
    let log = open(tmp.path());
    assert_eq!(log.next_index(), 10);
    log.append_durable(&[Entry::data(10, 1, 1, batch::build(1, 10, b"b"))])
        .expect("append after purge");
    let got = log.read(10, 11, 1 << 20).expect("read");
    assert_eq!(got[0].base_offset, 3);
}

#[test]
fn invalid_batches_and_gaps_are_rejected_without_effect() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let log = open(tmp.path());
    let good = Entry::data(0, 1, 1, batch::build(1, 1, b"x"));
    let bad = Entry::data(1, 1, 1, Bytes::from_static(b"not a batch"));
    assert!(matches!(
        log.append_durable(&[good.clone(), bad]),
        Err(LogError::InvalidBatch { index: 1, .. })
    ));
    assert_eq!(log.next_index(), 0, "a rejected append wrote something");
    let huge = Entry::data(0, 1, 1, batch::build(1, 1, &vec![0u8; 1 << 17]));
    assert!(matches!(
        log.append_durable(&[huge]),
        Err(LogError::EntryTooLarge { .. })
    ));
    log.append_durable(&[good])
        .expect("good append still works");
    assert_eq!(log.next_index(), 1);
}
