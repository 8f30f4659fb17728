//! [`Producer`]: batching, partitioning, retries and idempotence.
//!
//! Records go to a partition (given, by murmur2 of the key as the Java client does, or, for
//! records without a key, a sticky partition that changes once a batch's worth has gone to
//! it). Each partition has a sender task that collects records into a batch until
//! `batch_bytes` is reached or `linger` has passed since the first, and keeps up to
//! `max_in_flight` batches outstanding, in order.
//!
//! Idempotence (on by default): the producer gets a producer id from the metadata leader and
//! numbers each partition's records from 0. The leader writes a batch only if it is the
//! producer's next one, and answers a retried batch that is already written with its original
//! offsets, so retries after a lost reply, a timeout or a leader change never write a record
//! twice. When a batch fails, the sender lets what is in flight finish and then resends the
//! failed batches one at a time, in order, until each succeeds or its delivery deadline
//! passes. A batch that finally fails leaves a gap in the sequence; the partition then moves
//! to a fresh producer id, so the batches after it are not refused forever.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use aqueduct_protocol::cluster as cpb;
use aqueduct_protocol::data as pb;
use aqueduct_storage::batch::add_seq;
use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::FuturesOrdered;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::time::Instant;
use tonic::Status;

use super::records::{ProducerRecord, Sequence, encode_batch, partition_for_key};
use super::router::Router;
use super::{AdminClient, ClientError, error_code};

/// Largest batch the producer builds (the broker's limit is 1 MiB).
const MAX_BATCH_BYTES: usize = 1000 << 10;

/// How a producer batches and retries.
#[derive(Debug, Clone)]
pub struct ProducerConfig {
    pub acks: pb::Acks,
    /// Wait this long for more records before sending a batch that is not full.
    pub linger: Duration,
    /// Send a batch once it holds about this many bytes.
    pub batch_bytes: usize,
    /// Most records in one batch.
    pub batch_records: usize,
    /// Batches outstanding per partition.
    pub max_in_flight: usize,
    /// Producer id and sequence numbers, so retries never duplicate.
    pub idempotent: bool,
    /// How long one produce request may take before it is retried.
    pub request_timeout: Duration,
    /// How long a record may take, retries included, before it fails.
    pub delivery_timeout: Duration,
    /// Records queued per partition before `send` waits.
    pub queue: usize,
}

impl Default for ProducerConfig {
    fn default() -> Self {
        Self {
            acks: pb::Acks::All,
            linger: Duration::from_millis(5),
            batch_bytes: 256 << 10,
            batch_records: 10_000,
            max_in_flight: 5,
            idempotent: true,
            request_timeout: Duration::from_secs(10),
            delivery_timeout: Duration::from_secs(60),
            queue: 10_000,
        }
    }
}

/// Where a record was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    pub partition: u32,
    pub offset: u64,
}

/// Resolves when the record is acknowledged (or finally fails).
pub type DeliveryFuture = oneshot::Receiver<Result<Delivery, Arc<ClientError>>>;

struct Queued {
    record: ProducerRecord,
    done: oneshot::Sender<Result<Delivery, Arc<ClientError>>>,
}

struct Batch {
    records: Vec<ProducerRecord>,
    done: Vec<oneshot::Sender<Result<Delivery, Arc<ClientError>>>>,
    seq: Option<Sequence>,
    encoded: Bytes,
    deadline: Instant,
    attempts: u32,
}

/// Producer ids for partitions that need a fresh one.
#[derive(Debug, Clone)]
struct Ids {
    admin: AdminClient,
}

impl Ids {
    async fn next(&self) -> Result<(i64, i16), ClientError> {
        let r = self
            .admin
            .on_leader(
                |mut c| async move { c.init_producer_id(cpb::InitProducerIdRequest {}).await },
            )
            .await?;
        Ok((r.producer_id, r.producer_epoch as i16))
    }
}

/// Counts records not yet resolved, for `flush`.
#[derive(Debug, Default)]
struct Outstanding {
    count: AtomicU64,
    idle: Notify,
}

/// A producer to one topic (cheap to clone: clones share everything).
#[derive(Debug, Clone)]
pub struct Producer {
    router: Router,
    senders: Arc<Vec<mpsc::Sender<Queued>>>,
    outstanding: Arc<Outstanding>,
    sticky: Arc<(AtomicU32, AtomicU64)>,
    batch_bytes: usize,
}

impl Producer {
    /// A producer to `topic` (created if the cluster auto-creates topics).
    pub async fn new(
        admin: &AdminClient,
        topic: &str,
        config: ProducerConfig,
    ) -> Result<Self, ClientError> {
        let router = Router::new(admin, topic, true).await?;
        let ids = Ids {
            admin: admin.clone(),
        };
        let identity = if config.idempotent {
            Some(ids.next().await?)
        } else {
            None
        };
        let outstanding = Arc::new(Outstanding::default());
        let mut senders = Vec::new();
        for p in 0..router.partitions() {
            let (tx, rx) = mpsc::channel(config.queue.max(1));
            senders.push(tx);
            let sender = PartitionSender {
                partition: p,
                router: router.clone(),
                config: config.clone(),
                ids: ids.clone(),
                identity,
                next_seq: 0,
                outstanding: Arc::clone(&outstanding),
                carry: None,
                hold: false,
            };
            tokio::spawn(sender.run(rx));
        }
        Ok(Self {
            batch_bytes: config.batch_bytes,
            router,
            senders: Arc::new(senders),
            outstanding,
            sticky: Arc::new((AtomicU32::new(rand::random()), AtomicU64::new(0))),
        })
    }

    pub fn partitions(&self) -> u32 {
        self.router.partitions()
    }

    pub fn router(&self) -> &Router {
        &self.router
    }

    /// The partition a record goes to.
    pub fn partition_for(&self, record: &ProducerRecord, partition: Option<u32>) -> u32 {
        let n = self.partitions().max(1);
        if let Some(p) = partition {
            return p;
        }
        if let Some(k) = &record.key {
            return partition_for_key(k, n);
        }
        // Sticky: stay on a partition for about one batch, then move on.
        let (current, bytes) = &*self.sticky;
        let sent = bytes.fetch_add(record.size() as u64, Ordering::Relaxed);
        if sent >= self.batch_bytes as u64 {
            bytes.store(0, Ordering::Relaxed);
            current.fetch_add(1, Ordering::Relaxed);
        }
        current.load(Ordering::Relaxed) % n
    }

    /// Queues a record (waiting while the partition's queue is full); the returned future
    /// resolves once it is acknowledged.
    pub async fn send(
        &self,
        record: ProducerRecord,
        partition: Option<u32>,
    ) -> Result<DeliveryFuture, ClientError> {
        let p = self.partition_for(&record, partition);
        self.router.check_partition(p)?;
        let (done, rx) = oneshot::channel();
        self.outstanding.count.fetch_add(1, Ordering::SeqCst);
        let sent = self.senders[p as usize].send(Queued { record, done }).await;
        if sent.is_err() {
            self.resolved(1);
            return Err(ClientError::Closed);
        }
        Ok(rx)
    }

    fn resolved(&self, n: u64) {
        resolved(&self.outstanding, n);
    }

    /// Waits until every record sent so far is acknowledged or failed.
    pub async fn flush(&self) {
        loop {
            let idle = self.outstanding.idle.notified();
            if self.outstanding.count.load(Ordering::SeqCst) == 0 {
                return;
            }
            idle.await;
        }
    }
}

fn resolved(outstanding: &Outstanding, n: u64) {
    if outstanding.count.fetch_sub(n, Ordering::SeqCst) == n {
        outstanding.idle.notify_waiters();
    }
}

/// What to do with a batch whose request failed.
enum Failure {
    /// Send it again (in order, after what is in flight).
    Retry,
    /// Fail its records with this error.
    Fatal(ClientError),
}

fn classify(status: &Status, earlier_failed: bool, attempts: u32) -> Failure {
    match error_code(status) {
        Some(
            "NOT_LEADER" | "NOT_REPLICA" | "UNKNOWN_TOPIC_OR_PARTITION" | "LEADER_NOT_AVAILABLE",
        ) => Failure::Retry,
        // Its predecessor is being retried, or overtook it on the way (pipelined requests
        // travel on separate HTTP/2 streams): it follows, a few times at most.
        Some("OUT_OF_ORDER_SEQUENCE_NUMBER") if earlier_failed || attempts < 3 => Failure::Retry,
        Some(_) => Failure::Fatal(ClientError::refused(status)),
        None => match status.code() {
            tonic::Code::Unavailable
            | tonic::Code::Unknown
            | tonic::Code::Cancelled
            | tonic::Code::DeadlineExceeded => Failure::Retry,
            _ => Failure::Fatal(ClientError::refused(status)),
        },
    }
}

type InFlight = std::pin::Pin<
    Box<dyn std::future::Future<Output = (Batch, Result<pb::ProduceReply, Status>)> + Send>,
>;

struct PartitionSender {
    partition: u32,
    router: Router,
    config: ProducerConfig,
    ids: Ids,
    identity: Option<(i64, i16)>,
    next_seq: i32,
    outstanding: Arc<Outstanding>,
    /// A record that did not fit the last batch: it starts the next.
    carry: Option<Queued>,
    /// Set after a switch to a new producer id, until nothing sent before it is in flight.
    hold: bool,
}

impl PartitionSender {
    async fn run(mut self, mut rx: mpsc::Receiver<Queued>) {
        let mut inflight: FuturesOrdered<InFlight> = FuturesOrdered::new();
        let mut retry: VecDeque<Batch> = VecDeque::new();
        let mut retrying = false;
        let mut closed = false;
        loop {
            if closed && inflight.is_empty() && retry.is_empty() && self.carry.is_none() {
                return;
            }
            // Failed batches go again one at a time, in order, once nothing is in flight.
            if inflight.is_empty()
                && let Some(mut b) = retry.pop_front()
            {
                let pause = Duration::from_millis((50 * u64::from(b.attempts)).min(1000));
                tokio::time::sleep(pause).await;
                b.attempts += 1;
                inflight.push_back(self.request(b));
                retrying = true;
                continue;
            }
            // Nothing new while a retry is under way: a batch must not fall out of the
            // leader's window of recent batches while its retry is still unanswered.
            let room = retry.is_empty() && !retrying && inflight.len() < self.config.max_in_flight;
            if room && let Some(first) = self.carry.take() {
                let (batch, gone) = self.collect(first, &mut rx).await;
                closed |= gone;
                if let Some(batch) = batch {
                    inflight.push_back(self.request(batch));
                }
                continue;
            }
            tokio::select! {
                biased;
                Some((batch, result)) = inflight.next(), if !inflight.is_empty() => {
                    if batch.attempts > 0 {
                        retrying = false;
                    }
                    self.completed(batch, result, &mut retry).await;
                }
                first = rx.recv(), if room && !closed => {
                    let Some(first) = first else {
                        closed = true;
                        continue;
                    };
                    let (batch, gone) = self.collect(first, &mut rx).await;
                    closed |= gone;
                    if let Some(batch) = batch {
                        inflight.push_back(self.request(batch));
                    }
                }
            }
        }
    }

    /// A batch from `first` and what else arrives within the linger time.
    async fn collect(
        &mut self,
        first: Queued,
        rx: &mut mpsc::Receiver<Queued>,
    ) -> (Option<Batch>, bool) {
        let linger_end = Instant::now() + self.config.linger;
        let limit = self.config.batch_bytes.min(MAX_BATCH_BYTES);
        let mut bytes = first.record.size();
        let mut records = vec![first.record];
        let mut done = vec![first.done];
        let mut closed = false;
        while bytes < limit && records.len() < self.config.batch_records {
            let next = match rx.try_recv() {
                Ok(q) => Some(q),
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    closed = true;
                    None
                }
                Err(mpsc::error::TryRecvError::Empty) => {
                    match tokio::time::timeout_at(linger_end, rx.recv()).await {
                        Ok(Some(q)) => Some(q),
                        Ok(None) => {
                            closed = true;
                            None
                        }
                        Err(_) => None,
                    }
                }
            };
            let Some(q) = next else { break };
            if bytes + q.record.size() > MAX_BATCH_BYTES {
                // Too big to join: it starts the next batch.
                self.carry = Some(q);
                break;
            }
            bytes += q.record.size();
            records.push(q.record);
            done.push(q.done);
        }
        (self.seal(records, done), closed)
    }

    /// Numbers and encodes a batch; on an encoding failure its records fail.
    fn seal(
        &mut self,
        records: Vec<ProducerRecord>,
        done: Vec<oneshot::Sender<Result<Delivery, Arc<ClientError>>>>,
    ) -> Option<Batch> {
        let mut batch = Batch {
            records,
            done,
            seq: None,
            encoded: Bytes::new(),
            deadline: Instant::now() + self.config.delivery_timeout,
            attempts: 0,
        };
        match self.number(&mut batch) {
            Ok(()) => Some(batch),
            Err(e) => {
                self.fail(batch, e);
                None
            }
        }
    }

    /// Gives a batch the next sequence numbers and encodes it.
    fn number(&mut self, batch: &mut Batch) -> Result<(), ClientError> {
        batch.seq = self.identity.map(|(producer_id, epoch)| Sequence {
            producer_id,
            epoch,
            first_seq: self.next_seq,
        });
        batch.encoded = encode_batch(&batch.records, batch.seq)?;
        if self.identity.is_some() {
            self.next_seq = add_seq(self.next_seq, batch.records.len() as i32);
        }
        Ok(())
    }

    fn request(&self, batch: Batch) -> InFlight {
        let router = self.router.clone();
        let partition = self.partition;
        let acks = self.config.acks;
        let timeout = self.config.request_timeout;
        Box::pin(async move {
            let request = pb::ProduceRequest {
                topic: router.topic().to_string(),
                partition,
                batch: batch.encoded.to_vec(),
                acks: acks as i32,
            };
            let result = router
                .try_leader(partition, timeout, |ch| {
                    let mut c = super::router::data_client(ch);
                    let request = request.clone();
                    async move { c.produce(request).await }
                })
                .await;
            (batch, result)
        })
    }

    async fn completed(
        &mut self,
        mut batch: Batch,
        result: Result<pb::ProduceReply, Status>,
        retry: &mut VecDeque<Batch>,
    ) {
        let status = match result {
            Ok(reply) => {
                let n = batch.done.len() as u64;
                for (i, done) in batch.done.into_iter().enumerate() {
                    let _ = done.send(Ok(Delivery {
                        partition: self.partition,
                        offset: reply.base_offset + i as u64,
                    }));
                }
                resolved(&self.outstanding, n);
                return;
            }
            Err(status) => status,
        };
        let stale = batch.seq.map(|s| s.producer_id) != self.identity.map(|i| i.0);
        let failure = if Instant::now() >= batch.deadline {
            Failure::Fatal(ClientError::NoLeader {
                topic: self.router.topic().to_string(),
                partition: self.partition,
                secs: self.config.delivery_timeout.as_secs(),
                last: status.message().to_string(),
            })
        } else if stale {
            Failure::Retry
        } else {
            classify(&status, !retry.is_empty(), batch.attempts)
        };
        tracing::debug!(
            partition = self.partition,
            seq = ?batch.seq,
            attempts = batch.attempts,
            code = ?error_code(&status),
            message = status.message(),
            "produce request failed"
        );
        // A batch numbered under a producer id given up after an earlier failure is renumbered
        // only once the leader has said it was not written (out of order); after any other
        // failure it may have been written, so it goes again as it is, and the leader answers
        // "duplicate" or "out of order".
        let not_written = error_code(&status) == Some("OUT_OF_ORDER_SEQUENCE_NUMBER");
        match failure {
            Failure::Retry if stale && not_written => match self.number(&mut batch) {
                Ok(()) => retry.push_back(batch),
                Err(e) => self.fail(batch, e),
            },
            // A batch that was already a retry goes first again: it precedes everything
            // waiting (retries are sent one at a time, oldest first).
            Failure::Retry if batch.attempts > 0 => retry.push_front(batch),
            Failure::Retry => retry.push_back(batch),
            Failure::Fatal(e) => {
                tracing::debug!(partition = self.partition, error = %e, "batch failed");
                let was_current = !stale;
                self.fail(batch, e);
                if was_current && self.identity.is_some() {
                    // Its sequence numbers left a gap: what follows continues under a new id
                    // (batches waiting in `retry` came before it and keep theirs).
                    match self.ids.next().await {
                        Ok(id) => {
                            self.identity = Some(id);
                            self.next_seq = 0;
                            // Nothing new until every batch still out under the old id is
                            // back (and renumbered behind the ones before it).
                            self.hold = true;
                        }
                        Err(e) => tracing::warn!(error = %e, "cannot get a new producer id"),
                    }
                }
            }
        }
    }

    fn fail(&self, batch: Batch, e: ClientError) {
        let e = Arc::new(e);
        let n = batch.done.len() as u64;
        for d in batch.done {
            let _ = d.send(Err(Arc::clone(&e)));
        }
        resolved(&self.outstanding, n);
    }
}
