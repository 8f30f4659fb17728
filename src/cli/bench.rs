//! `aqueduct bench produce`: a load generator over the Rust client, for throughput and
//! latency figures (a program, never a timed test; see docs/benchmarks.md).
//!
//! Each producer task keeps `--in-flight` records outstanding (a semaphore), sends
//! `--record-size`-byte records at the maximum rate or at `--rate` records/s in total, and
//! records each acknowledgement's latency in an HDR histogram. At a fixed rate a record's
//! latency counts from when it was *due* to be sent, not from when it was sent, so a stall
//! shows in the percentiles (coordinated omission corrected). The producer batches per
//! partition (`--batch-bytes`, `--linger-ms`) and acknowledges per `--acks`; the result
//! states both.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use aqueduct_protocol::cluster as cpb;
use aqueduct_protocol::data as pb;
use bytes::Bytes;
use hdrhistogram::Histogram;
use serde_json::json;
use tokio::time::Instant;

use super::data::admin_client;
use super::{Acks, ClientArgs, Output};
use crate::client::producer::{Producer, ProducerConfig};
use crate::client::records::ProducerRecord;

/// Options of `aqueduct bench produce`.
#[derive(Debug, Clone, clap::Args)]
pub struct ProduceBench {
    /// Topic to produce to (created with --partitions and --replication-factor if missing).
    #[arg(long, default_value = "bench")]
    pub topic: String,
    #[arg(long, default_value_t = 1)]
    pub partitions: u32,
    #[arg(long, default_value_t = 1)]
    pub replication_factor: u32,
    /// Concurrent producers (each its own producer id and connections).
    #[arg(long, default_value_t = 4)]
    pub producers: usize,
    /// Bytes per record value.
    #[arg(long, default_value_t = 1024)]
    pub record_size: usize,
    /// Records each producer keeps outstanding.
    #[arg(long, default_value_t = 256)]
    pub in_flight: usize,
    /// Total records per second (0: as fast as acknowledgements allow).
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// How long to run, in seconds.
    #[arg(long, default_value_t = 10)]
    pub duration: u64,
    #[arg(long, value_enum, default_value_t = Acks::All)]
    pub acks: Acks,
    #[arg(long, default_value_t = 256 << 10)]
    pub batch_bytes: usize,
    #[arg(long, default_value_t = 5)]
    pub linger_ms: u64,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// Creates the topic unless it exists.
async fn ensure_topic(b: &ProduceBench) -> anyhow::Result<()> {
    let admin = admin_client(&b.client);
    let topics = admin
        .on_leader(|mut c| async move { c.list_topics(cpb::ListTopicsRequest {}).await })
        .await?;
    if topics.topics.iter().any(|t| t.name == b.topic) {
        return Ok(());
    }
    let request = cpb::CreateTopicRequest {
        name: b.topic.clone(),
        partitions: b.partitions,
        replication_factor: b.replication_factor,
        configs: Default::default(),
        request_id: rand::random::<u64>() | 1,
    };
    admin
        .on_leader(|mut c| {
            let request = request.clone();
            async move { c.create_topic(request).await }
        })
        .await?;
    Ok(())
}

/// `aqueduct bench produce`.
pub async fn produce(b: &ProduceBench) -> anyhow::Result<()> {
    ensure_topic(b).await?;
    let admin = admin_client(&b.client);
    let acks = match b.acks {
        Acks::All => pb::Acks::All,
        Acks::Leader => pb::Acks::Leader,
    };
    let config = ProducerConfig {
        acks,
        batch_bytes: b.batch_bytes,
        linger: Duration::from_millis(b.linger_ms),
        max_in_flight: 5,
        queue: b.in_flight.max(1),
        ..ProducerConfig::default()
    };
    let histogram = Arc::new(std::sync::Mutex::new(
        Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)
            .map_err(|e| anyhow::anyhow!("histogram: {e}"))?,
    ));
    let acked = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let value = Bytes::from(vec![b'x'; b.record_size]);
    let start = Instant::now();
    let end = start + Duration::from_secs(b.duration.max(1));
    let mut tasks = Vec::new();
    for _ in 0..b.producers.max(1) {
        let producer = Producer::new(&admin, &b.topic, config.clone()).await?;
        let permits = Arc::new(tokio::sync::Semaphore::new(b.in_flight.max(1)));
        let (histogram, acked, failed, value) = (
            Arc::clone(&histogram),
            Arc::clone(&acked),
            Arc::clone(&failed),
            value.clone(),
        );
        // Each producer's share of a fixed rate.
        let interval = (b.rate > 0)
            .then(|| Duration::from_secs_f64(b.producers.max(1) as f64 / b.rate as f64));
        tasks.push(tokio::spawn(async move {
            let mut due = Instant::now();
            while Instant::now() < end {
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
                let delivery = match producer
                    .send(ProducerRecord::value(value.clone()), None)
                    .await
                {
                    Ok(d) => d,
                    Err(_) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                };
                let (histogram, acked, failed) = (
                    Arc::clone(&histogram),
                    Arc::clone(&acked),
                    Arc::clone(&failed),
                );
                tokio::spawn(async move {
                    match delivery.await {
                        Ok(Ok(_)) => {
                            let us = sent_due.elapsed().as_micros() as u64;
                            if let Ok(mut h) = histogram.lock() {
                                let _ = h.record(us.max(1));
                            }
                            acked.fetch_add(1, Ordering::Relaxed);
                        }
                        _ => {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    drop(permit);
                });
            }
            producer.flush().await;
        }));
    }
    // Progress, once a second.
    let progress = {
        let acked = Arc::clone(&acked);
        tokio::spawn(async move {
            let mut last = 0;
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let now = acked.load(Ordering::Relaxed);
                eprint!(
                    "\r{:>4} s  {now:>10} acknowledged  {:>9} msgs/s   ",
                    start.elapsed().as_secs(),
                    now - last
                );
                last = now;
            }
        })
    };
    for t in tasks {
        let _ = t.await;
    }
    progress.abort();
    eprintln!();
    let elapsed = start.elapsed().as_secs_f64();
    let n = acked.load(Ordering::Relaxed);
    let h = histogram
        .lock()
        .map_err(|_| anyhow::anyhow!("histogram lock poisoned"))?
        .clone();
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    let result = json!({
        "system": "aqueduct",
        "topic": b.topic,
        "partitions": b.partitions,
        "replication_factor": b.replication_factor,
        "producers": b.producers,
        "record_size": b.record_size,
        "in_flight_per_producer": b.in_flight,
        "target_rate": b.rate,
        "acks": format!("{:?}", b.acks).to_lowercase(),
        "batching": format!("per partition: up to {} bytes or {} ms linger, 5 requests in flight", b.batch_bytes, b.linger_ms),
        "seconds": elapsed,
        "acknowledged": n,
        "failed": failed.load(Ordering::Relaxed),
        "msgs_per_s": n as f64 / elapsed,
        "mb_per_s": n as f64 * b.record_size as f64 / elapsed / 1e6,
        "latency_ms": {"p50": ms(0.5), "p99": ms(0.99), "p99_9": ms(0.999), "max": h.max() as f64 / 1000.0},
    });
    match b.client.output {
        Output::Json => println!("{result}"),
        Output::Text => println!(
            "aqueduct  {:>10.0} msgs/s  {:>7.1} MB/s  p50 {:.2} ms  p99 {:.2} ms  p99.9 {:.2} ms  max {:.2} ms  ({} acknowledged, {} failed, acks={})",
            result["msgs_per_s"].as_f64().unwrap_or(0.0),
            result["mb_per_s"].as_f64().unwrap_or(0.0),
            ms(0.5),
            ms(0.99),
            ms(0.999),
            h.max() as f64 / 1000.0,
            n,
            result["failed"],
            result["acks"].as_str().unwrap_or(""),
        ),
    }
    Ok(())
}
