//! Idempotent-producer state of one partition, derived from its replicated log.
//!
//! Every replica applies the same batches in the same order, so every replica derives the same
//! table: per producer id, its epoch and the sequence ranges and offsets of its last
//! [`KEPT_BATCHES`] batches (Kafka keeps 5, the most a Kafka producer has in flight per
//! partition). The table travels in the partition's snapshot, so retention does not forget
//! it. The partition leader checks each idempotent batch against this table plus the batches
//! it has proposed but not yet applied (see `src/partitions.rs`): a retry of a batch already
//! written is answered with the original offsets instead of being written twice.

use std::collections::{BTreeMap, VecDeque};

use aqueduct_storage::batch::{ProducerInfo, add_seq};
use serde::{Deserialize, Serialize};

/// How many recent batches per producer are remembered for duplicate detection.
pub const KEPT_BATCHES: usize = 5;

/// One written batch of a producer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WrittenBatch {
    pub first_seq: i32,
    pub last_seq: i32,
    pub base_offset: u64,
    pub last_offset: u64,
}

/// What the log holds of one producer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProducerEntry {
    pub epoch: i16,
    /// Oldest first, at most [`KEPT_BATCHES`].
    pub batches: VecDeque<WrittenBatch>,
}

impl ProducerEntry {
    /// The last sequence number written under the current epoch.
    pub fn last_seq(&self) -> Option<i32> {
        self.batches.back().map(|b| b.last_seq)
    }
}

/// Producer state by producer id.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProducerTable {
    producers: BTreeMap<i64, ProducerEntry>,
}

/// The verdict on an idempotent batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeqCheck {
    /// The next batch of this producer: write it.
    Append,
    /// Already written at these offsets: answer with them, write nothing.
    Duplicate { base_offset: u64, last_offset: u64 },
    /// A gap or a batch from the past that is no longer remembered.
    OutOfOrder { expected: i32 },
    /// An epoch older than the producer's current one: a zombie producer.
    Fenced { current: i16 },
}

/// Checks a batch against what is known of its producer (`None`: nothing).
pub fn check(entry: Option<&ProducerEntry>, batch: &ProducerInfo) -> SeqCheck {
    let Some(entry) = entry else {
        return if batch.first_seq == 0 {
            SeqCheck::Append
        } else {
            SeqCheck::OutOfOrder { expected: 0 }
        };
    };
    if batch.epoch < entry.epoch {
        return SeqCheck::Fenced {
            current: entry.epoch,
        };
    }
    if batch.epoch > entry.epoch {
        // A bumped epoch starts its sequence again.
        return if batch.first_seq == 0 {
            SeqCheck::Append
        } else {
            SeqCheck::OutOfOrder { expected: 0 }
        };
    }
    if let Some(w) = entry
        .batches
        .iter()
        .find(|w| w.first_seq == batch.first_seq && w.last_seq == batch.last_seq)
    {
        return SeqCheck::Duplicate {
            base_offset: w.base_offset,
            last_offset: w.last_offset,
        };
    }
    let expected = entry.last_seq().map_or(0, |s| add_seq(s, 1));
    if batch.first_seq == expected {
        SeqCheck::Append
    } else {
        SeqCheck::OutOfOrder { expected }
    }
}

impl ProducerTable {
    pub fn get(&self, producer_id: i64) -> Option<&ProducerEntry> {
        self.producers.get(&producer_id)
    }

    pub fn len(&self) -> usize {
        self.producers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.producers.is_empty()
    }

    /// Records a batch that was written (applied) at `base_offset..=last_offset`.
    pub fn record(&mut self, batch: &ProducerInfo, base_offset: u64, last_offset: u64) {
        let entry = self.producers.entry(batch.producer_id).or_default();
        record_into(entry, batch, base_offset, last_offset);
    }
}

/// Adds a written batch to `entry` (a new epoch forgets the old epoch's batches).
pub fn record_into(
    entry: &mut ProducerEntry,
    batch: &ProducerInfo,
    base_offset: u64,
    last_offset: u64,
) {
    // Applying a batch again (after a snapshot that already reflects it) changes nothing, so
    // every replica ends with the same table whatever snapshot it started from.
    if entry
        .batches
        .back()
        .is_some_and(|w| base_offset <= w.last_offset)
    {
        return;
    }
    if batch.epoch != entry.epoch {
        entry.epoch = batch.epoch;
        entry.batches.clear();
    }
    entry.batches.push_back(WrittenBatch {
        first_seq: batch.first_seq,
        last_seq: batch.last_seq,
        base_offset,
        last_offset,
    });
    while entry.batches.len() > KEPT_BATCHES {
        entry.batches.pop_front();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(epoch: i16, first: i32, last: i32) -> ProducerInfo {
        ProducerInfo {
            producer_id: 9,
            epoch,
            first_seq: first,
            last_seq: last,
        }
    }

    #[test]
    fn sequences_are_checked_like_kafka() {
        let mut t = ProducerTable::default();
        assert_eq!(
            check(t.get(9), &b(0, 3, 4)),
            SeqCheck::OutOfOrder { expected: 0 }
        );
        assert_eq!(check(t.get(9), &b(0, 0, 4)), SeqCheck::Append);
        t.record(&b(0, 0, 4), 100, 104);
        // The retry of the written batch is a duplicate with its offsets.
        assert_eq!(
            check(t.get(9), &b(0, 0, 4)),
            SeqCheck::Duplicate {
                base_offset: 100,
                last_offset: 104
            }
        );
        assert_eq!(check(t.get(9), &b(0, 5, 9)), SeqCheck::Append);
        assert_eq!(
            check(t.get(9), &b(0, 6, 9)),
            SeqCheck::OutOfOrder { expected: 5 }
        );
        assert_eq!(
            check(t.get(9), &b(0, 7, 9)),
            SeqCheck::OutOfOrder { expected: 5 }
        );
        // An older epoch is fenced; a newer one starts at 0.
        t.record(&b(1, 0, 0), 105, 105);
        assert_eq!(
            check(t.get(9), &b(0, 5, 9)),
            SeqCheck::Fenced { current: 1 }
        );
        assert_eq!(
            check(t.get(9), &b(2, 1, 1)),
            SeqCheck::OutOfOrder { expected: 0 }
        );
        assert_eq!(check(t.get(9), &b(2, 0, 1)), SeqCheck::Append);
        assert_eq!(t.get(9).map(|e| e.batches.len()), Some(1));
    }

    #[test]
    fn only_the_last_five_batches_are_remembered() {
        let mut t = ProducerTable::default();
        for i in 0..7 {
            t.record(&b(0, i, i), i as u64, i as u64);
        }
        assert_eq!(t.get(9).map(|e| e.batches.len()), Some(KEPT_BATCHES));
        assert_eq!(
            check(t.get(9), &b(0, 6, 6)),
            SeqCheck::Duplicate {
                base_offset: 6,
                last_offset: 6
            }
        );
        // Forgotten: too old to tell, so out of order rather than written again.
        assert_eq!(
            check(t.get(9), &b(0, 1, 1)),
            SeqCheck::OutOfOrder { expected: 7 }
        );
    }

    #[test]
    fn applying_a_batch_again_changes_nothing() {
        let mut t = ProducerTable::default();
        t.record(&b(0, 0, 4), 100, 104);
        t.record(&b(0, 5, 9), 105, 109);
        let before = t.clone();
        t.record(&b(0, 0, 4), 100, 104);
        t.record(&b(0, 5, 9), 105, 109);
        assert_eq!(t, before);
    }

    #[test]
    fn sequences_wrap_after_i32_max() {
        let mut t = ProducerTable::default();
        t.record(&b(0, 0, 0), 0, 0);
        let mut e = t.get(9).cloned().unwrap_or_default();
        record_into(&mut e, &b(0, i32::MAX - 1, i32::MAX), 1, 2);
        assert_eq!(check(Some(&e), &b(0, 0, 3)), SeqCheck::Append);
    }
}
