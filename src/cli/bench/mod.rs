//! `aqueduct bench produce | consume | e2e`: load generators for throughput and latency
//! figures (programs, never timed tests; see docs/benchmarks.md).
//!
//! One engine drives every system through the [`Driver`] trait, so each side gets the same
//! load: `--producers` publishers, each keeping `--in-flight` records outstanding (a
//! semaphore), `--record-size`-byte values, optional keys, at the maximum rate or at `--rate`
//! records/s in total, for `--duration` seconds or `--count` records. Latencies go into HDR
//! histograms. At a fixed rate a record's latency counts from when it was *due* to be sent,
//! not from when it was sent, so a stall shows in the percentiles (coordinated omission
//! corrected). Drivers: Aqueduct (the Rust client) and, built with the `nats` feature, NATS
//! JetStream (async-nats). Each result states how that system batches.

mod fanout;
#[cfg(feature = "kafka-bench")]
mod kafka;
mod mqtt;
mod native;
#[cfg(feature = "nats")]
mod nats;

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::future::BoxFuture;
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use tokio::time::Instant;

use super::{Acks, ClientArgs, Output};

pub use fanout::{FanoutBench, fanout};
pub use mqtt::{MqttBench, mqtt};

/// Resolves once the system acknowledged the record.
pub type AckFuture = BoxFuture<'static, anyhow::Result<()>>;

/// A system under test.
pub trait Driver: Send + Sync {
    /// The system's name in results.
    fn system(&self) -> String;
    /// How this system's producers batch and when they are acknowledged.
    fn batching(&self) -> String;
    /// Creates the topic (or stream) unless it exists.
    fn prepare(&self) -> BoxFuture<'_, anyhow::Result<()>>;
    /// How many records the topic holds.
    fn stored(&self) -> BoxFuture<'_, anyhow::Result<u64>>;
    /// A new producer, with its own connection(s).
    fn publisher(&self) -> BoxFuture<'_, anyhow::Result<Box<dyn Publisher>>>;
    /// A consumer with its `share` of the topic. Split: reading its partitions from the
    /// beginning (`from_start`) or only records produced after this call returns. Group: a
    /// member of the group, resuming from the group's committed offsets.
    fn subscriber(
        &self,
        share: Share,
        from_start: bool,
    ) -> BoxFuture<'_, anyhow::Result<Box<dyn Subscriber>>>;
    /// Commits `group`'s offset on every partition of the topic: the log start
    /// (`from_start`) or the end. The group must have no members.
    fn seed_group(&self, group: String, from_start: bool) -> BoxFuture<'_, anyhow::Result<()>>;
}

/// How the consumers of a run share the topic.
#[derive(Debug, Clone)]
pub enum Share {
    /// Consumer `index` of `of`, assigned partitions `index, index + of, …` by the bench.
    Split { index: usize, of: usize },
    /// A member of this consumer group (subscribe; the group coordinator assigns).
    Group(String),
}

pub trait Publisher: Send + Sync {
    /// Hands one record to the client, waiting while its buffers are full.
    fn send(&self, key: Option<Bytes>, value: Bytes) -> BoxFuture<'_, anyhow::Result<AckFuture>>;
    /// Waits until everything sent is acknowledged or failed.
    fn flush(&self) -> BoxFuture<'_, ()>;
}

pub trait Subscriber: Send {
    /// The values of the records that arrived, waiting up to `wait` for some.
    fn poll(&mut self, wait: Duration) -> BoxFuture<'_, anyhow::Result<Vec<Bytes>>>;
    /// How many partitions it reads now (a group member's share changes on a rebalance).
    fn assigned(&self) -> usize;
    /// Leaves the group (if any) and lets go of its connections.
    fn close(self: Box<Self>) -> BoxFuture<'static, ()>;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum System {
    /// Aqueduct, through its Rust client.
    Aqueduct,
    /// NATS JetStream, through async-nats (needs a build with `--features nats`).
    Nats,
    /// Aqueduct's Kafka port, through librdkafka (needs a build with `--features kafka-bench`).
    Kafka,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum KeyDist {
    /// Each record a key drawn uniformly from `--keys` keys.
    Random,
    /// Keys 0, 1, 2, … in turn, per producer.
    Sequential,
}

/// Which system, where, and the topic the load goes to.
#[derive(Debug, Clone, clap::Args)]
pub struct Target {
    #[arg(long, value_enum, default_value_t = System::Aqueduct)]
    pub system: System,
    /// NATS server URL(s), comma-separated, for `--system nats`.
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// Kafka bootstrap servers, comma-separated, for `--system kafka`.
    #[arg(long, default_value = "127.0.0.1:9092")]
    pub kafka_bootstrap: String,
    /// Topic (a JetStream stream of the same name for NATS), created if missing.
    #[arg(long, default_value = "bench")]
    pub topic: String,
    #[arg(long, default_value_t = 1)]
    pub partitions: u32,
    /// Replicas of each partition (JetStream: the stream's replicas).
    #[arg(long, default_value_t = 1)]
    pub replication_factor: u32,
    /// Print the result as one JSON object (same as --output json).
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub client: ClientArgs,
}

impl Target {
    fn output(&self) -> Output {
        if self.json {
            Output::Json
        } else {
            self.client.output
        }
    }
}

/// The producing side of a load.
#[derive(Debug, Clone, clap::Args)]
pub struct Load {
    /// Concurrent producers (each its own connections).
    #[arg(long, default_value_t = 4)]
    pub producers: usize,
    /// Bytes per record value.
    #[arg(long, default_value_t = 1024)]
    pub record_size: usize,
    /// Records each producer keeps outstanding (sent, not yet acknowledged).
    #[arg(long, default_value_t = 256)]
    pub in_flight: usize,
    /// Total records per second (0: as fast as acknowledgements allow).
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// How long to produce, in seconds (unless --count is given).
    #[arg(long, default_value_t = 10)]
    pub duration: u64,
    /// Produce this many records in total instead of running for --duration.
    #[arg(long)]
    pub count: Option<u64>,
    /// Distinct record keys (0: records without keys). NATS publishes a key as a subject
    /// token: `<topic>.<key>`.
    #[arg(long, default_value_t = 0)]
    pub keys: u64,
    #[arg(long, value_enum, default_value_t = KeyDist::Random)]
    pub key_dist: KeyDist,
    /// Aqueduct: what a produce waits for (all: the quorum fsynced it).
    #[arg(long, value_enum, default_value_t = Acks::All)]
    pub acks: Acks,
    /// Aqueduct: send a partition's batch once it holds about this many bytes.
    #[arg(long, default_value_t = 256 << 10)]
    pub batch_bytes: usize,
    /// Aqueduct: longest wait for a batch to fill.
    #[arg(long, default_value_t = 5)]
    pub linger_ms: u64,
}

/// `aqueduct bench produce`.
#[derive(Debug, Clone, clap::Args)]
pub struct ProduceBench {
    #[command(flatten)]
    pub target: Target,
    #[command(flatten)]
    pub load: Load,
}

/// `aqueduct bench consume` (reads `--count` records from the start of the topic, producing
/// the missing ones first, not measured) and `aqueduct bench e2e` (producers and consumers at
/// once; latency from when a record was due to be sent to when a consumer got it).
#[derive(Debug, Clone, clap::Args)]
pub struct ConsumeBench {
    #[command(flatten)]
    pub target: Target,
    #[command(flatten)]
    pub load: Load,
    /// Concurrent consumers sharing the topic's partitions (JetStream: one shared pull
    /// consumer).
    #[arg(long, default_value_t = 1)]
    pub consumers: usize,
    /// The consumers join this consumer group (subscribe, committing every 5 s) instead of
    /// each being assigned its share of the partitions. Its offsets are set to the start
    /// (consume) or the end (e2e) first, so the group must have no members; measuring
    /// starts once every member has its assignment. Aqueduct and Kafka only.
    #[arg(long)]
    pub group: Option<String>,
}

/// `aqueduct bench e2e` takes the same options as `consume`.
pub type E2eBench = ConsumeBench;

fn driver(target: &Target, load: &Load) -> anyhow::Result<Arc<dyn Driver>> {
    match target.system {
        System::Aqueduct => Ok(Arc::new(native::Native::new(target, load))),
        #[cfg(feature = "nats")]
        System::Nats => Ok(Arc::new(nats::Nats::new(target, load))),
        #[cfg(not(feature = "nats"))]
        System::Nats => anyhow::bail!(
            "this aqueduct was built without the NATS driver: build it with `--features nats` \
             (benches/compare.sh does)"
        ),
        #[cfg(feature = "kafka-bench")]
        System::Kafka => Ok(Arc::new(kafka::Kafka::new(target, load))),
        #[cfg(not(feature = "kafka-bench"))]
        System::Kafka => anyhow::bail!(
            "this aqueduct was built without the Kafka-client driver: build it with \
             `--features kafka-bench` (benches/compare.sh does)"
        ),
    }
}

/// Microsecond latencies, 1 µs to 10 min.
fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

/// What a run counted, shared by its tasks.
struct Stats {
    latency: std::sync::Mutex<Histogram<u64>>,
    done: AtomicU64,
    failed: AtomicU64,
}

impl Stats {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            latency: std::sync::Mutex::new(histogram()),
            done: AtomicU64::new(0),
            failed: AtomicU64::new(0),
        })
    }

    fn record(&self, since: Instant, n: u64) {
        let us = since.elapsed().as_micros() as u64;
        if let Ok(mut h) = self.latency.lock() {
            let _ = h.record_n(us.max(1), n);
        }
        self.done.fetch_add(n, Ordering::Relaxed);
    }

    /// One operation that took `us` microseconds (measured elsewhere).
    fn record_us(&self, us: u64) {
        if let Ok(mut h) = self.latency.lock() {
            let _ = h.record(us.max(1));
        }
        self.done.fetch_add(1, Ordering::Relaxed);
    }

    fn snapshot(&self) -> Histogram<u64> {
        self.latency
            .lock()
            .map(|h| h.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }
}

fn percentiles(h: &Histogram<u64>) -> Value {
    let ms = |v: u64| v as f64 / 1000.0;
    json!({
        "p50": ms(h.value_at_quantile(0.5)),
        "p99": ms(h.value_at_quantile(0.99)),
        "p99_9": ms(h.value_at_quantile(0.999)),
        "max": ms(h.max()),
    })
}

/// A progress bar on stderr, redrawn every second until aborted.
fn progress(label: &'static str, count: Arc<Stats>, total: Option<u64>, secs: u64) -> Progress {
    let start = Instant::now();
    Progress(tokio::spawn(async move {
        let mut last = 0;
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let now = count.done.load(Ordering::Relaxed);
            let elapsed = start.elapsed().as_secs();
            let fraction = match total {
                Some(t) if t > 0 => now as f64 / t as f64,
                _ => elapsed as f64 / secs.max(1) as f64,
            }
            .clamp(0.0, 1.0);
            let filled = (fraction * 30.0) as usize;
            eprint!(
                "\r{label:<9} [{}{}] {:>3}% {elapsed:>4} s {now:>11} {:>9} msgs/s ",
                "#".repeat(filled),
                ".".repeat(30 - filled),
                (fraction * 100.0) as u32,
                now - last
            );
            let _ = std::io::stderr().flush();
            last = now;
        }
    }))
}

struct Progress(tokio::task::JoinHandle<()>);

impl Drop for Progress {
    fn drop(&mut self) {
        self.0.abort();
        eprintln!();
    }
}

/// Nanoseconds since `epoch` written into the first 8 bytes of an e2e record's value.
fn stamped(value: &Bytes, epoch: Instant, due: Instant) -> Bytes {
    let mut v = BytesMut::from(&value[..]);
    let ns = due.saturating_duration_since(epoch).as_nanos() as u64;
    v[..8].copy_from_slice(&ns.to_le_bytes());
    v.freeze()
}

fn stamp_of(value: &[u8], epoch: Instant) -> Option<Instant> {
    let ns = u64::from_le_bytes(value.get(..8)?.try_into().ok()?);
    Some(epoch + Duration::from_nanos(ns))
}

/// Runs `load` against `driver`: every producer task with its in-flight permits, rate and
/// share of the count; acknowledgement latencies go to `stats`. With `epoch`, each value
/// carries its due time (for end-to-end latency). Returns the producing time.
async fn produce_load(
    driver: &Arc<dyn Driver>,
    load: &Load,
    count: Option<u64>,
    stats: &Arc<Stats>,
    epoch: Option<Instant>,
) -> anyhow::Result<Duration> {
    let producers = load.producers.max(1);
    let value = Bytes::from(vec![b'x'; load.record_size]);
    let mut publishers = Vec::new();
    for _ in 0..producers {
        publishers.push(Arc::<dyn Publisher>::from(driver.publisher().await?));
    }
    let start = Instant::now();
    let end = start + Duration::from_secs(load.duration.max(1));
    // Each producer's share of a fixed rate.
    let interval =
        (load.rate > 0).then(|| Duration::from_secs_f64(producers as f64 / load.rate as f64));
    let mut tasks = Vec::new();
    for (i, publisher) in publishers.into_iter().enumerate() {
        let budget =
            count.map(|c| c / producers as u64 + u64::from((i as u64) < c % producers as u64));
        let in_flight = load.in_flight.clamp(1, u32::MAX as usize) as u32;
        let permits = Arc::new(tokio::sync::Semaphore::new(in_flight as usize));
        let (stats, value) = (Arc::clone(stats), value.clone());
        let (keys, key_dist) = (load.keys, load.key_dist);
        tasks.push(tokio::spawn(async move {
            let mut due = Instant::now();
            let mut sent: u64 = 0;
            loop {
                match budget {
                    Some(b) if sent >= b => break,
                    None if Instant::now() >= end => break,
                    _ => {}
                }
                if interval.is_some() {
                    tokio::time::sleep_until(due).await;
                } else {
                    due = Instant::now();
                }
                let Ok(permit) = Arc::clone(&permits).acquire_owned().await else {
                    break;
                };
                let sent_due = due;
                if let Some(i) = interval {
                    due += i;
                }
                let key = (keys > 0).then(|| {
                    let k = match key_dist {
                        KeyDist::Random => rand::random::<u64>() % keys,
                        KeyDist::Sequential => sent % keys,
                    };
                    Bytes::from(format!("k{k}"))
                });
                let value = match epoch {
                    Some(epoch) => stamped(&value, epoch, sent_due),
                    None => value.clone(),
                };
                sent += 1;
                let ack = match publisher.send(key, value).await {
                    Ok(ack) => ack,
                    Err(e) => {
                        tracing::debug!(error = %e, "send failed");
                        stats.failed.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                };
                let stats = Arc::clone(&stats);
                tokio::spawn(async move {
                    match ack.await {
                        Ok(()) => stats.record(sent_due, 1),
                        Err(e) => {
                            tracing::debug!(error = %e, "not acknowledged");
                            stats.failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    drop(permit);
                });
            }
            publisher.flush().await;
            // Every acknowledgement recorded: all permits are back.
            let _ = permits.acquire_many(in_flight).await;
        }));
    }
    for t in tasks {
        t.await?;
    }
    Ok(start.elapsed())
}

fn load_json(target: &Target, load: &Load, driver: &Arc<dyn Driver>) -> Value {
    json!({
        "system": driver.system(),
        "topic": target.topic,
        "partitions": target.partitions,
        "replication_factor": target.replication_factor,
        "producers": load.producers,
        "record_size": load.record_size,
        "in_flight_per_producer": load.in_flight,
        "target_rate": load.rate,
        "keys": load.keys,
        "batching": driver.batching(),
    })
}

/// Adds the run's length and its rate of `n` records to `result`.
fn add_rate(result: &mut Value, n: u64, secs: f64, record_size: usize) {
    result["seconds"] = json!(secs);
    result["msgs_per_s"] = json!(n as f64 / secs);
    result["mb_per_s"] = json!(n as f64 * record_size as f64 / secs / 1e6);
}

/// The text line of a result: system, mode, rate, the latency under `latency`, and `tail`.
fn text_line(result: &Value, mode: &str, latency: &str, tail: &str) -> String {
    format!(
        "{:<9} {mode:<7} {:>10.0} msgs/s {:>7.1} MB/s  {}  ({tail})",
        result["system"].as_str().unwrap_or(""),
        result["msgs_per_s"].as_f64().unwrap_or(0.0),
        result["mb_per_s"].as_f64().unwrap_or(0.0),
        text_latency(&result[latency]),
    )
}

/// `n` consumers of the driver, each with its share of the topic, and how many records
/// they read while joining `group` (counted in the total, not in the measured rate).
async fn subscribers(
    driver: &Arc<dyn Driver>,
    n: usize,
    from_start: bool,
    group: Option<&str>,
    partitions: u32,
) -> anyhow::Result<(Vec<Box<dyn Subscriber>>, u64)> {
    let mut all = Vec::new();
    let Some(group) = group else {
        for index in 0..n {
            all.push(
                driver
                    .subscriber(Share::Split { index, of: n }, from_start)
                    .await?,
            );
        }
        return Ok((all, 0));
    };
    driver.seed_group(group.to_string(), from_start).await?;
    for _ in 0..n {
        all.push(
            driver
                .subscriber(Share::Group(group.to_string()), from_start)
                .await?,
        );
    }
    // Members join as they poll, and a join waits for every member to rejoin: poll them all
    // at once until every partition is assigned and every member has its share.
    let partitions = partitions.max(1) as usize;
    let settled = |all: &[Box<dyn Subscriber>]| {
        let shares: Vec<usize> = all.iter().map(|s| s.assigned()).collect();
        shares.iter().sum::<usize>() == partitions
            && shares.iter().filter(|s| **s > 0).count() == n.min(partitions)
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut warm = 0u64;
    while !settled(&all) {
        anyhow::ensure!(
            Instant::now() < deadline,
            "group {group}: its {n} members did not all get an assignment within 60 s"
        );
        let polls = all.iter_mut().map(|s| s.poll(Duration::from_millis(50)));
        for values in futures_util::future::join_all(polls).await {
            warm += values?.len() as u64;
        }
    }
    Ok((all, warm))
}

fn print(output: Output, result: &Value, text: String) {
    match output {
        Output::Json => println!("{result}"),
        Output::Text => println!("{text}"),
    }
}

fn text_latency(l: &Value) -> String {
    format!(
        "p50 {:.2} ms  p99 {:.2} ms  p99.9 {:.2} ms  max {:.2} ms",
        l["p50"].as_f64().unwrap_or(0.0),
        l["p99"].as_f64().unwrap_or(0.0),
        l["p99_9"].as_f64().unwrap_or(0.0),
        l["max"].as_f64().unwrap_or(0.0),
    )
}

/// `aqueduct bench produce`.
pub async fn produce(b: &ProduceBench) -> anyhow::Result<()> {
    let driver = driver(&b.target, &b.load)?;
    driver.prepare().await?;
    let stats = Stats::new();
    let elapsed = {
        let _bar = progress("produce", Arc::clone(&stats), b.load.count, b.load.duration);
        produce_load(&driver, &b.load, b.load.count, &stats, None).await?
    };
    let n = stats.done.load(Ordering::Relaxed);
    let mut result = load_json(&b.target, &b.load, &driver);
    add_rate(&mut result, n, elapsed.as_secs_f64(), b.load.record_size);
    result["acknowledged"] = json!(n);
    result["failed"] = json!(stats.failed.load(Ordering::Relaxed));
    result["latency_ms"] = percentiles(&stats.snapshot());
    let tail = format!(
        "{n} acknowledged, {} failed; {}",
        result["failed"],
        driver.batching()
    );
    let text = text_line(&result, "produce", "latency_ms", &tail);
    print(b.target.output(), &result, text);
    Ok(())
}

/// Stops consumers once they have `target` records between them, or after `idle` without
/// one.
async fn consume_load(
    subscribers: Vec<Box<dyn Subscriber>>,
    stats: &Arc<Stats>,
    target: impl Fn() -> Option<u64> + Send + Sync + 'static,
    epoch: Option<Instant>,
    already: u64,
) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let target = Arc::new(target);
    let received = Arc::new(AtomicU64::new(already));
    let idle = Duration::from_secs(10);
    let mut tasks = Vec::new();
    for mut sub in subscribers {
        let (stats, target, received) = (
            Arc::clone(stats),
            Arc::clone(&target),
            Arc::clone(&received),
        );
        tasks.push(tokio::spawn(async move {
            let mut last_record = Instant::now();
            let result = async {
                loop {
                    if let Some(t) = target()
                        && received.load(Ordering::Relaxed) >= t
                    {
                        return Ok::<(), anyhow::Error>(());
                    }
                    if last_record.elapsed() >= idle {
                        return Ok(());
                    }
                    let asked = Instant::now();
                    let values = sub.poll(Duration::from_millis(200)).await?;
                    if values.is_empty() {
                        continue;
                    }
                    last_record = Instant::now();
                    received.fetch_add(values.len() as u64, Ordering::Relaxed);
                    match epoch {
                        // End to end: from when each record was due to be sent.
                        Some(epoch) => {
                            for v in &values {
                                match stamp_of(v, epoch) {
                                    Some(due) => stats.record(due, 1),
                                    None => {
                                        stats.failed.fetch_add(1, Ordering::Relaxed);
                                    }
                                }
                            }
                        }
                        // Consume only: how long each poll that brought records took.
                        None => stats.record(asked, values.len() as u64),
                    }
                }
            }
            .await;
            // The run ends when the last consumer has its records, not once it has left.
            let finished = Instant::now();
            sub.close().await;
            result.map(|()| finished)
        }));
    }
    let mut end = start;
    for t in tasks {
        end = end.max(t.await??);
    }
    Ok(end - start)
}

/// `aqueduct bench consume`.
pub async fn consume(b: &ConsumeBench) -> anyhow::Result<()> {
    let driver = driver(&b.target, &b.load)?;
    driver.prepare().await?;
    let count = b.load.count.unwrap_or(1_000_000);
    let stored = driver.stored().await?;
    if stored < count {
        let fill = Stats::new();
        eprintln!("filling {}: {} records", b.target.topic, count - stored);
        let _bar = progress("fill", Arc::clone(&fill), Some(count - stored), 0);
        produce_load(&driver, &b.load, Some(count - stored), &fill, None).await?;
    }
    let consumers = b.consumers.max(1);
    let group = b.group.as_deref();
    let (subs, warm) = subscribers(&driver, consumers, true, group, b.target.partitions).await?;
    let stats = Stats::new();
    let elapsed = {
        let _bar = progress(
            "consume",
            Arc::clone(&stats),
            Some(count - warm.min(count)),
            0,
        );
        consume_load(subs, &stats, move || Some(count), None, warm).await?
    };
    // The rate counts what was read after every member had its share.
    let n = stats.done.load(Ordering::Relaxed);
    let consumed = warm + n;
    let mut result = load_json(&b.target, &b.load, &driver);
    add_rate(&mut result, n, elapsed.as_secs_f64(), b.load.record_size);
    result["consumers"] = json!(consumers);
    result["group"] = json!(group);
    result["consumed"] = json!(consumed);
    result["consumed_while_joining"] = json!(warm);
    result["poll_latency_ms"] = percentiles(&stats.snapshot());
    let how = match group {
        Some(g) => format!("in group {g}, {warm} read while joining"),
        None => "each its share of the partitions".to_string(),
    };
    let tail = format!("poll latency; {consumed} of {count} records, {consumers} consumers {how}");
    let text = text_line(&result, "consume", "poll_latency_ms", &tail);
    print(b.target.output(), &result, text);
    if consumed < count {
        anyhow::bail!("consumed {consumed} of {count} records (nothing arrived for 10 s)");
    }
    Ok(())
}

/// `aqueduct bench e2e`.
pub async fn e2e(b: &E2eBench) -> anyhow::Result<()> {
    anyhow::ensure!(
        b.load.record_size >= 8,
        "--record-size must be at least 8: each value carries its send time"
    );
    let driver = driver(&b.target, &b.load)?;
    driver.prepare().await?;
    let consumers = b.consumers.max(1);
    let group = b.group.as_deref();
    let (subs, warm) = subscribers(&driver, consumers, false, group, b.target.partitions).await?;
    let epoch = Instant::now();
    let produced = Stats::new();
    let e2e = Stats::new();
    // Consumers stop once they have every acknowledged record (known when producers end).
    let expected = Arc::new(AtomicU64::new(u64::MAX));
    let consuming = {
        let (e2e, expected) = (Arc::clone(&e2e), Arc::clone(&expected));
        tokio::spawn(async move {
            consume_load(
                subs,
                &e2e,
                move || Some(expected.load(Ordering::Relaxed)),
                Some(epoch),
                warm,
            )
            .await
        })
    };
    let elapsed = {
        let _bar = progress("e2e", Arc::clone(&e2e), b.load.count, b.load.duration);
        let elapsed = produce_load(&driver, &b.load, b.load.count, &produced, Some(epoch)).await?;
        expected.store(produced.done.load(Ordering::Relaxed), Ordering::Relaxed);
        consuming.await??;
        elapsed
    };
    let acked = produced.done.load(Ordering::Relaxed);
    let consumed = e2e.done.load(Ordering::Relaxed);
    let mut result = load_json(&b.target, &b.load, &driver);
    add_rate(
        &mut result,
        acked,
        elapsed.as_secs_f64(),
        b.load.record_size,
    );
    result["consumers"] = json!(consumers);
    result["group"] = json!(group);
    result["acknowledged"] = json!(acked);
    result["consumed"] = json!(consumed);
    result["ack_latency_ms"] = percentiles(&produced.snapshot());
    result["e2e_latency_ms"] = percentiles(&e2e.snapshot());
    let tail = format!("end to end; {acked} acknowledged, {consumed} consumed");
    let text = text_line(&result, "e2e", "e2e_latency_ms", &tail);
    print(b.target.output(), &result, text);
    if consumed < acked {
        anyhow::bail!("consumed {consumed} of {acked} acknowledged records");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_round_trip() {
        let epoch = Instant::now();
        let due = epoch + Duration::from_micros(1234);
        let v = stamped(&Bytes::from(vec![b'x'; 16]), epoch, due);
        assert_eq!(v.len(), 16);
        assert_eq!(&v[8..], b"xxxxxxxx");
        assert_eq!(stamp_of(&v, epoch), Some(due));
        assert_eq!(stamp_of(b"short", epoch), None);
    }
}
