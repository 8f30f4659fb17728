//! `aqueduct bench mqtt-fanout`: one publisher, N subscribers to one topic (rumqttc, one
//! connection each, anonymous general MQTT clients), the subscribers spread round robin over
//! the `--addr` list (the nodes of a cluster: each message crosses from the publisher's node
//! to every other through the log) and the publisher on the first. The publisher sends
//! `--rate` messages a second for `--duration` seconds; every subscriber counts what it gets
//! and the publish→delivery latency (the payload carries its send time; publisher and
//! subscribers share this process's clock). The same run against any MQTT broker (mosquitto)
//! gives the peer's figures, so `benches/mqtt-fanout.sh` compares the two as a ratio.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::json;
use tokio::time::Instant;

use super::{Stats, percentiles, print, text_latency};
use crate::cli::Output;

#[derive(Debug, Clone, clap::Args)]
pub struct FanoutBench {
    /// The broker's MQTT addresses, HOST:PORT,HOST:PORT,… (subscribers go round robin over
    /// them, the publisher to the first).
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1:1883")]
    pub addr: Vec<String>,
    /// Subscribers, one connection each.
    #[arg(long, default_value_t = 1000)]
    pub subscribers: usize,
    /// Messages per second from the publisher.
    #[arg(long, default_value_t = 50)]
    pub rate: u64,
    /// Seconds of publishing once every subscriber has its SUBACK.
    #[arg(long, default_value_t = 10)]
    pub duration: u64,
    /// Payload bytes (at least 16: the send time and a sequence number).
    #[arg(long, default_value_t = 64)]
    pub payload: usize,
    /// QoS of the publish and of the subscriptions (0 or 1).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=1))]
    pub qos: u8,
    #[arg(long, default_value = "bench/fanout")]
    pub topic: String,
    /// A label for the result.
    #[arg(long, default_value = "aqueduct")]
    pub system: String,
    /// Print the result as one JSON object.
    #[arg(long)]
    pub json: bool,
}

fn host_port(addr: &str) -> anyhow::Result<(String, u16)> {
    addr.rsplit_once(':')
        .and_then(|(h, p)| Some((h.to_string(), p.parse::<u16>().ok()?)))
        .ok_or_else(|| anyhow::anyhow!("--addr {addr}: not HOST:PORT"))
}

fn options(id: String, addr: &str) -> anyhow::Result<MqttOptions> {
    let (host, port) = host_port(addr)?;
    let mut o = MqttOptions::new(id, host, port);
    o.set_keep_alive(Duration::from_secs(60));
    o.set_max_packet_size(1 << 20, 1 << 20);
    Ok(o)
}

/// `aqueduct bench mqtt-fanout`.
pub async fn fanout(b: &FanoutBench) -> anyhow::Result<()> {
    anyhow::ensure!(!b.addr.is_empty(), "--addr names no broker");
    anyhow::ensure!(b.rate > 0, "--rate must be at least 1");
    let qos = if b.qos == 0 {
        QoS::AtMostOnce
    } else {
        QoS::AtLeastOnce
    };
    let epoch = std::time::Instant::now();
    let stats = Stats::new();
    let subscribed = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    // Deliveries of messages sent while measuring (sequence numbers from 1 on).
    let mut tasks = Vec::new();
    let started = Instant::now();
    for i in 0..b.subscribers {
        let addr = &b.addr[i % b.addr.len()];
        let id = format!("fanout-sub-{i}");
        let (client, mut eventloop) = AsyncClient::new(options(id.clone(), addr)?, 64);
        let (stats, subscribed, errors) = (
            Arc::clone(&stats),
            Arc::clone(&subscribed),
            Arc::clone(&errors),
        );
        let topic = b.topic.clone();
        tasks.push(tokio::spawn(async move {
            let mut up = false;
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        if client.subscribe(topic.as_str(), qos).await.is_err() {
                            return;
                        }
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) if !up => {
                        up = true;
                        subscribed.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        if p.payload.len() >= 16 {
                            let sent_ns =
                                u64::from_be_bytes(p.payload[..8].try_into().expect("8 bytes"));
                            let seq = u64::from_be_bytes(p.payload[8..16].try_into().expect("8"));
                            if seq > 0 {
                                let now_ns = epoch.elapsed().as_nanos() as u64;
                                stats.record_us(now_ns.saturating_sub(sent_ns) / 1000);
                            }
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(subscriber = %id, error = %e, "fan-out bench connection");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
        }));
        if i % 100 == 99 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while (subscribed.load(Ordering::Relaxed) as usize) < b.subscribers && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let up = subscribed.load(Ordering::Relaxed) as usize;
    let connect_secs = started.elapsed().as_secs_f64();
    anyhow::ensure!(
        up == b.subscribers,
        "only {up} of {} subscribers had their SUBACK within 120 s",
        b.subscribers
    );

    // The publisher, on the first address.
    let (publisher, mut eventloop) =
        AsyncClient::new(options("fanout-pub".into(), &b.addr[0])?, 1024);
    let publisher_loop = tokio::spawn(async move {
        loop {
            if let Err(e) = eventloop.poll().await {
                tracing::debug!(error = %e, "fan-out bench publisher");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    });
    // A subscription's first deliveries may trail its SUBACK on a cluster (each node learns
    // of it from its own rumqttd at once, but give the publisher's connection a moment).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let payload_len = b.payload.max(16);
    let total = b.rate * b.duration;
    let every = Duration::from_nanos(1_000_000_000 / b.rate);
    let t0 = Instant::now();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    for seq in 1..=total {
        tick.tick().await;
        let mut payload = vec![0u8; payload_len];
        payload[..8].copy_from_slice(&(epoch.elapsed().as_nanos() as u64).to_be_bytes());
        payload[8..16].copy_from_slice(&seq.to_be_bytes());
        publisher
            .publish(b.topic.as_str(), qos, false, payload)
            .await
            .map_err(|e| anyhow::anyhow!("publish: {e}"))?;
    }
    let send_secs = t0.elapsed().as_secs_f64();
    // Let the last ones arrive: until nothing new comes for 2 s (at most 30 s).
    let expected = total * b.subscribers as u64;
    let drain_until = Instant::now() + Duration::from_secs(30);
    let mut last = stats.done.load(Ordering::Relaxed);
    let mut quiet_since = Instant::now();
    while Instant::now() < drain_until && last < expected {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = stats.done.load(Ordering::Relaxed);
        if now != last {
            last = now;
            quiet_since = Instant::now();
        } else if quiet_since.elapsed() > Duration::from_secs(2) {
            break;
        }
    }
    let delivered = stats.done.load(Ordering::Relaxed);
    let secs = t0.elapsed().as_secs_f64();
    publisher_loop.abort();
    for t in tasks {
        t.abort();
    }
    let latency = percentiles(&stats.snapshot());
    let result = json!({
        "system": b.system,
        "nodes": b.addr.len(),
        "subscribers": b.subscribers,
        "qos": b.qos,
        "payload": payload_len,
        "rate": b.rate,
        "published": total,
        "publish_seconds": send_secs,
        "expected": expected,
        "delivered": delivered,
        "delivered_ratio": delivered as f64 / expected.max(1) as f64,
        "deliveries_per_s": delivered as f64 / send_secs.max(1e-9),
        "seconds": secs,
        "subscribe_seconds": connect_secs,
        "connection_errors": errors.load(Ordering::Relaxed),
        "latency_ms": latency,
    });
    let text = format!(
        "{}: 1 publisher → {} subscribers over {} address(es), QoS {}, {} msgs/s: {delivered} of {expected} delivered ({:.0} deliveries/s)\n  publish→delivery {}",
        b.system,
        b.subscribers,
        b.addr.len(),
        b.qos,
        b.rate,
        delivered as f64 / send_secs.max(1e-9),
        text_latency(&result["latency_ms"]),
    );
    print(
        if b.json { Output::Json } else { Output::Text },
        &result,
        text,
    );
    Ok(())
}
