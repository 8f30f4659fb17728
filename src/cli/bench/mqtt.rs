//! `aqueduct bench mqtt`: N simulated devices (rumqttc, one connection each) publishing QoS 1
//! property reports, each keeping `--in-flight` unacknowledged; msgs/s and publish→PUBACK
//! latency. The same load runs against Aqueduct's MQTT front (devices `{prefix}{i}` in the
//! plain mode: user name = client id = device id, password = `--secret`) or against any MQTT
//! broker (`--anonymous`: no credentials, e.g. mosquitto), so `benches/mqtt.sh` can compare
//! the two in one run. `--idle` only connects the devices and holds them, for the memory
//! per idle connection.
//!
//! Latency counts from when rumqttc wrote the PUBLISH (its `Outgoing::Publish` event) to the
//! PUBACK; Aqueduct sends the PUBACK only once a quorum has the record.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
use serde_json::json;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use super::{Stats, percentiles, print, text_latency};
use crate::cli::Output;

#[derive(Debug, Clone, clap::Args)]
pub struct MqttBench {
    /// The MQTT broker, HOST:PORT.
    #[arg(long, default_value = "127.0.0.1:1883")]
    pub addr: String,
    /// Simulated devices, one connection each.
    #[arg(long, default_value_t = 1000)]
    pub devices: usize,
    /// Device ids are PREFIX0, PREFIX1, … (registered beforehand on Aqueduct).
    #[arg(long, default_value = "bench-")]
    pub prefix: String,
    /// The devices' secret (plain mode).
    #[arg(long, default_value = "bench-secret")]
    pub secret: String,
    /// Connect without credentials (a broker that is not Aqueduct).
    #[arg(long)]
    pub anonymous: bool,
    /// Unacknowledged publishes per device.
    #[arg(long, default_value_t = 1)]
    pub in_flight: usize,
    /// Seconds of load after every device is connected.
    #[arg(long, default_value_t = 10)]
    pub duration: u64,
    /// Only connect the devices and hold them idle this many seconds.
    #[arg(long)]
    pub idle: Option<u64>,
    /// A label for the result.
    #[arg(long, default_value = "aqueduct")]
    pub system: String,
    /// Print the result as one JSON object.
    #[arg(long)]
    pub json: bool,
}

const REPORT: &[u8] = br#"{"services":[{"service_id":"env","properties":{"temperature":21.5}}]}"#;

/// `aqueduct bench mqtt`.
pub async fn mqtt(b: &MqttBench) -> anyhow::Result<()> {
    let (host, port) = b
        .addr
        .rsplit_once(':')
        .and_then(|(h, p)| Some((h.to_string(), p.parse::<u16>().ok()?)))
        .ok_or_else(|| anyhow::anyhow!("--addr {}: not HOST:PORT", b.addr))?;
    let stats = Stats::new();
    let connected = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let measuring = Arc::new(tokio::sync::Notify::new());
    let go = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    let started = Instant::now();
    for i in 0..b.devices {
        let id = format!("{}{i}", b.prefix);
        let mut options = MqttOptions::new(id.clone(), host.clone(), port);
        options.set_keep_alive(Duration::from_secs(60));
        options.set_inflight(b.in_flight.clamp(1, u16::MAX as usize) as u16);
        if !b.anonymous {
            options.set_credentials(id.clone(), b.secret.clone());
        }
        let (client, mut eventloop) = AsyncClient::new(options, b.in_flight.max(1) * 2);
        let topic = format!("$oc/devices/{id}/sys/properties/report");
        let (stats, connected, errors, go) = (
            Arc::clone(&stats),
            Arc::clone(&connected),
            Arc::clone(&errors),
            Arc::clone(&go),
        );
        let measuring = Arc::clone(&measuring);
        let window = Arc::new(Semaphore::new(b.in_flight.max(1)));
        let idle = b.idle.is_some();
        tasks.push(tokio::spawn(async move {
            let publisher = {
                let (client, window, go) = (client.clone(), Arc::clone(&window), go.clone());
                tokio::spawn(async move {
                    if idle {
                        return;
                    }
                    measuring.notified().await;
                    while go.load(Ordering::Relaxed) {
                        let Ok(permit) = window.acquire().await else {
                            return;
                        };
                        permit.forget();
                        if client
                            .publish(topic.as_str(), QoS::AtLeastOnce, false, REPORT)
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                })
            };
            let mut sent: HashMap<u16, Instant> = HashMap::new();
            let mut up = false;
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) if !up => {
                        up = true;
                        connected.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                        sent.insert(pkid, Instant::now());
                    }
                    Ok(Event::Incoming(Packet::PubAck(ack))) => {
                        if let Some(at) = sent.remove(&ack.pkid)
                            && go.load(Ordering::Relaxed)
                        {
                            stats.record(at, 1);
                        }
                        window.add_permits(1);
                    }
                    Ok(Event::Outgoing(Outgoing::Disconnect)) => break,
                    Ok(_) => {}
                    Err(e) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(device = %id, error = %e, "MQTT bench connection");
                        if !go.load(Ordering::Relaxed) && up {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
            publisher.abort();
        }));
        // Stagger the connects a little, as devices coming up do.
        if i % 100 == 99 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    // Everyone connected (or 60 s passed).
    let deadline = Instant::now() + Duration::from_secs(60);
    while (connected.load(Ordering::Relaxed) as usize) < b.devices && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let up = connected.load(Ordering::Relaxed);
    let connect_secs = started.elapsed().as_secs_f64();
    if let Some(hold) = b.idle {
        let result = json!({"system": b.system, "devices": b.devices, "connected": up,
            "connect_seconds": connect_secs});
        print(
            if b.json { Output::Json } else { Output::Text },
            &result,
            format!(
                "{}: {up}/{} devices connected in {connect_secs:.1} s; holding them idle {hold} s",
                b.system, b.devices
            ),
        );
        std::io::Write::flush(&mut std::io::stdout())?;
        tokio::time::sleep(Duration::from_secs(hold)).await;
        for t in tasks {
            t.abort();
        }
        return Ok(());
    }
    anyhow::ensure!(
        up as usize == b.devices,
        "only {up} of {} devices connected within 60 s",
        b.devices
    );
    go.store(true, Ordering::Relaxed);
    let t0 = Instant::now();
    measuring.notify_waiters();
    tokio::time::sleep(Duration::from_secs(b.duration)).await;
    let n = stats.done.load(Ordering::Relaxed);
    let secs = t0.elapsed().as_secs_f64();
    go.store(false, Ordering::Relaxed);
    for t in tasks {
        t.abort();
    }
    let latency = percentiles(&stats.snapshot());
    let result = json!({
        "system": b.system,
        "devices": b.devices,
        "in_flight_per_device": b.in_flight,
        "qos": 1,
        "record_size": REPORT.len(),
        "acknowledged": n,
        "seconds": secs,
        "msgs_per_s": n as f64 / secs,
        "connect_seconds": connect_secs,
        "connection_errors": errors.load(Ordering::Relaxed),
        "latency_ms": latency,
    });
    let text = format!(
        "{}: {} devices, QoS 1, {} in flight each: {:.0} msgs/s ({n} acknowledged in {secs:.1} s)\n  publish→PUBACK {}",
        b.system,
        b.devices,
        b.in_flight,
        n as f64 / secs,
        text_latency(&result["latency_ms"]),
    );
    print(
        if b.json { Output::Json } else { Output::Text },
        &result,
        text,
    );
    Ok(())
}
