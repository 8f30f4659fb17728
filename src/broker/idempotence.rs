//! The partition leader's check of idempotent batches (producer id + sequence numbers).
//!
//! The replicated producer table ([`aqueduct_raft::producers`]) says what the *applied* log
//! holds of each producer. A leader also has batches it proposed that are not applied yet, so
//! it checks a batch against the table *and* those pending batches, under one lock per
//! partition, and proposes it only when it is the producer's next batch:
//!
//! * the retry of an applied batch is answered with the original offsets (nothing written);
//! * the retry of a pending batch (the client timed out while the original was in flight)
//!   waits for the original and answers with its offsets;
//! * a gap is refused `OUT_OF_ORDER_SEQUENCE_NUMBER`, an older epoch `INVALID_PRODUCER_EPOCH`.
//!
//! A new leader first waits until it has applied an entry of its own term: then everything
//! earlier terms left in its log (which it commits) is in the table, so a batch the old
//! leader wrote but never acknowledged is recognised when the client retries it. Every write
//! is conditional on the leader it was checked under (`with_leader`), so the pending list can
//! never outlive its leadership unnoticed.

use std::time::Duration;

use aqueduct_raft::producers::{self, SeqCheck};
use aqueduct_raft::types::{GroupCommand, GroupResponse};
use aqueduct_storage::batch::{ProducerInfo, add_seq};
use bytes::Bytes;
use openraft::impls::ProgressResponder;
use tokio::sync::watch;

use super::partitions::Replica;

/// Longest wait for a new leader to apply its first entry before it checks sequences.
const CATCH_UP_WAIT: Duration = Duration::from_secs(10);
/// How long a batch that arrives ahead of its predecessor waits for it (pipelined requests
/// travel on separate HTTP/2 streams and may overtake each other) before it is refused.
const REORDER_WAIT: Duration = Duration::from_millis(200);

/// The outcome of a proposed batch: its offsets, or why it failed (retriable).
pub type WriteOutcome = Option<Result<(u64, u64), String>>;

#[derive(Debug)]
struct Pending {
    info: ProducerInfo,
    outcome: watch::Receiver<WriteOutcome>,
}

#[derive(Debug, Default)]
struct GateState {
    /// The leadership the pending list belongs to.
    leader: Option<openraft::impls::leader_id_adv::LeaderId<u64, u64>>,
    pending: Vec<Pending>,
}

/// One partition's gate for idempotent batches (see the module doc).
#[derive(Debug, Default)]
pub struct ProducerGate {
    state: tokio::sync::Mutex<GateState>,
    /// Woken whenever a batch is proposed.
    proposed: tokio::sync::Notify,
}

/// What the gate did with a batch.
#[derive(Debug)]
pub enum Admitted {
    /// Proposed: the receiver resolves when it is applied (or fails).
    Proposed(watch::Receiver<WriteOutcome>),
    /// Already written at these offsets.
    Duplicate { base_offset: u64, last_offset: u64 },
    /// The same batch is in flight: the receiver resolves with the original's outcome.
    InFlight(watch::Receiver<WriteOutcome>),
}

/// Why the gate refused a batch.
#[derive(Debug, thiserror::Error)]
pub enum GateError {
    #[error("not the leader")]
    NotLeader,
    #[error("the new leader has not applied its first entry yet; retry")]
    NotReady,
    #[error("out-of-order sequence number {got} for producer {producer_id}; expected {expected}")]
    OutOfOrder {
        producer_id: i64,
        got: i32,
        expected: i32,
    },
    #[error("producer {producer_id} epoch {got} is fenced by epoch {current}")]
    Fenced {
        producer_id: i64,
        got: i16,
        current: i16,
    },
    #[error("raft stopped: {0}")]
    Raft(String),
}

/// Waits until a proposed batch's outcome is known.
pub async fn outcome(mut rx: watch::Receiver<WriteOutcome>) -> Result<(u64, u64), String> {
    loop {
        if let Some(o) = rx.borrow_and_update().clone() {
            return o;
        }
        if rx.changed().await.is_err() {
            return Err("the write was abandoned".into());
        }
    }
}

impl Replica {
    /// Checks an idempotent batch (`info` read from its header) and proposes it when it is
    /// the producer's next one. See the module doc.
    pub async fn admit_idempotent(
        &self,
        batch: Bytes,
        info: ProducerInfo,
    ) -> Result<Admitted, GateError> {
        let give_up = tokio::time::Instant::now() + REORDER_WAIT;
        loop {
            let proposed = self.gate.proposed.notified();
            match self.admit_once(&batch, info).await {
                // Ahead of its predecessor: wait for the next proposal, then look again.
                Err(GateError::OutOfOrder { expected, got, .. })
                    if expected < got && tokio::time::Instant::now() < give_up =>
                {
                    let _ = tokio::time::timeout_at(give_up, proposed).await;
                }
                other => return other,
            }
        }
    }

    async fn admit_once(&self, batch: &Bytes, info: ProducerInfo) -> Result<Admitted, GateError> {
        let mut gate = self.gate.state.lock().await;
        let leader = self.raft.as_leader().map_err(|_| GateError::NotLeader)?;
        let leader_id = leader.to_committed_leader_id();
        if gate.leader != Some(leader_id) {
            let caught_up = self
                .sm
                .wait_applied_term(leader_id.term, CATCH_UP_WAIT)
                .await;
            if !caught_up {
                return Err(GateError::NotReady);
            }
            gate.pending.clear();
            gate.leader = Some(leader_id);
        }
        // Batches with a known outcome are applied (in the table) or failed.
        gate.pending.retain(|p| p.outcome.borrow().is_none());
        let applied = self.sm.producer(info.producer_id);
        let mine = gate
            .pending
            .iter()
            .filter(|p| p.info.producer_id == info.producer_id);
        if let Some(p) = mine.clone().find(|p| {
            p.info.epoch == info.epoch
                && p.info.first_seq == info.first_seq
                && p.info.last_seq == info.last_seq
        }) {
            return Ok(Admitted::InFlight(p.outcome.clone()));
        }
        let verdict = match (
            producers::check(applied.as_ref(), &info),
            mine.clone().next_back(),
        ) {
            (verdict @ SeqCheck::Duplicate { .. }, _) | (verdict, None) => verdict,
            // After a pending batch: it decides what comes next.
            (_, Some(p)) => {
                if info.epoch < p.info.epoch {
                    SeqCheck::Fenced {
                        current: p.info.epoch,
                    }
                } else {
                    let expected = if info.epoch > p.info.epoch {
                        0
                    } else {
                        add_seq(p.info.last_seq, 1)
                    };
                    if info.first_seq == expected {
                        SeqCheck::Append
                    } else {
                        SeqCheck::OutOfOrder { expected }
                    }
                }
            }
        };
        match verdict {
            SeqCheck::Append => {}
            SeqCheck::OutOfOrder { expected } => {
                return Err(GateError::OutOfOrder {
                    producer_id: info.producer_id,
                    got: info.first_seq,
                    expected,
                });
            }
            SeqCheck::Fenced { current } => {
                return Err(GateError::Fenced {
                    producer_id: info.producer_id,
                    got: info.epoch,
                    current,
                });
            }
            SeqCheck::Duplicate {
                base_offset,
                last_offset,
            } => {
                return Ok(Admitted::Duplicate {
                    base_offset,
                    last_offset,
                });
            }
        }
        if let Some(delay) = crate::faults::Faults::produce_delay() {
            tracing::warn!(?delay, "injected fault: holding an idempotent batch");
            tokio::time::sleep(delay).await;
        }
        let (responder, rx) = ProgressResponder::complete_only();
        self.raft
            .write(GroupCommand::Records(batch.clone()))
            .with_leader(leader_id)
            .responder(responder)
            .await
            .map_err(|e| GateError::Raft(e.to_string()))?;
        let (tx, outcome_rx) = watch::channel(None);
        tokio::spawn(async move {
            let outcome = match rx.await {
                Ok(Ok(r)) => match r.response().clone() {
                    GroupResponse::Appended {
                        base_offset,
                        last_offset,
                    } => Ok((base_offset, last_offset)),
                    other => Err(other.to_string()),
                },
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err("raft dropped the write".to_string()),
            };
            tx.send_replace(Some(outcome));
        });
        gate.pending.push(Pending {
            info,
            outcome: outcome_rx.clone(),
        });
        self.gate.proposed.notify_waiters();
        Ok(Admitted::Proposed(outcome_rx))
    }
}
