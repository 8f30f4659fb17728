//! `aqueduct produce`, `aqueduct consume`, `aqueduct message show` and `aqueduct topic
//! describe`: the data path from the command line, through the Rust client
//! ([`crate::client`]).
//!
//! `produce` uses the idempotent [`Producer`]: it keeps going through leader changes without
//! writing a line twice; a record that finally fails is reported on stderr, line by line, and
//! the command exits 1 at the end.

use std::collections::VecDeque;
use std::io::BufRead;
use std::time::Duration;

use aqueduct_protocol::data as pb;
use bytes::Bytes;
use serde_json::json;

use super::{ClientArgs, Output};
use crate::client::consumer::{Consumer, ConsumerConfig, OffsetReset};
use crate::client::producer::{DeliveryFuture, Producer, ProducerConfig};
use crate::client::records::{ConsumerRecord, ProducerRecord, partition_for_key};
use crate::client::router::Router;
use crate::client::{AdminClient, error_chain};

/// The admin client of the CLI's `--server` and `--timeout`.
pub fn admin_client(args: &ClientArgs) -> AdminClient {
    AdminClient::new(
        args.server.clone(),
        Duration::from_secs(args.timeout.max(1)),
    )
}

/// Where `consume` starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum From {
    Earliest,
    Latest,
    Offset(u64),
    Time(i64),
}

/// Parses `earliest`, `latest`, an offset or an RFC 3339 time.
pub fn parse_from(s: &str) -> Result<From, String> {
    match s {
        "earliest" => Ok(From::Earliest),
        "latest" => Ok(From::Latest),
        _ => {
            if let Ok(o) = s.parse::<u64>() {
                return Ok(From::Offset(o));
            }
            chrono::DateTime::parse_from_rfc3339(s)
                .map(|t| From::Time(t.timestamp_millis()))
                .map_err(|_| {
                    format!("expected earliest, latest, an offset or an RFC 3339 time, not {s:?}")
                })
        }
    }
}

/// Parses an RFC 3339 time into ms since the epoch.
pub fn parse_time(s: &str) -> Result<i64, String> {
    chrono::DateTime::parse_from_rfc3339(s)
        .map(|t| t.timestamp_millis())
        .map_err(|_| format!("expected an RFC 3339 time, not {s:?}"))
}

/// Which message `message show` prints.
#[derive(Debug, Clone)]
pub enum Pick {
    Offset(u64),
    Time(i64),
    /// The latest message with this key.
    Key(Bytes),
}

/// `aqueduct message show`.
pub async fn show(
    args: &ClientArgs,
    topic: &str,
    partition: Option<u32>,
    pick: Pick,
) -> anyhow::Result<()> {
    let router = Router::new(&admin_client(args), topic, false).await?;
    let p = match (&pick, partition) {
        (_, Some(p)) => p,
        (Pick::Key(k), None) => partition_for_key(k, router.partitions()),
        (_, None) => 0,
    };
    router.check_partition(p)?;
    let fetch = |offset| router.fetch(p, offset, 4 << 20, Duration::ZERO);
    let found: Option<ConsumerRecord> = match &pick {
        Pick::Offset(o) => fetch(*o)
            .await?
            .records
            .into_iter()
            .find(|r| r.offset == *o),
        Pick::Time(t) => {
            let (o, _) = router.list_offset(p, pb::OffsetSpec::Timestamp, *t).await?;
            fetch(o)
                .await?
                .records
                .into_iter()
                .find(|r| r.timestamp >= *t)
        }
        Pick::Key(k) => {
            // The latest record with the key: scan the partition from its start.
            let (mut offset, _) = router.list_offset(p, pb::OffsetSpec::Earliest, 0).await?;
            let mut latest = None;
            loop {
                let got = fetch(offset).await?;
                if got.next <= offset {
                    break;
                }
                offset = got.next;
                if let Some(r) = got.records.into_iter().rfind(|r| r.key.as_ref() == Some(k)) {
                    latest = Some(r);
                }
                if offset >= got.high_watermark {
                    break;
                }
            }
            latest
        }
    };
    let Some(r) = found else {
        anyhow::bail!("no such message in {topic}/{p} (NOT_FOUND)");
    };
    match args.output {
        Output::Json => println!("{}", record_json(&r)),
        Output::Text => {
            // The body exactly as produced (a newline only for a terminal).
            use std::io::{IsTerminal, Write};
            let mut out = std::io::stdout().lock();
            out.write_all(r.value.as_deref().unwrap_or_default())?;
            if out.is_terminal() {
                out.write_all(b"\n")?;
            }
            out.flush()?;
        }
    }
    Ok(())
}

/// A record as one JSON object (key, value and headers as UTF-8, lossily).
pub fn record_json(r: &ConsumerRecord) -> serde_json::Value {
    let text = |b: &Option<Bytes>| {
        b.as_deref()
            .map(|b| String::from_utf8_lossy(b).into_owned())
    };
    json!({
        "partition": r.partition,
        "offset": r.offset,
        "timestamp": r.timestamp,
        "key": text(&r.key),
        "value": text(&r.value),
        "headers": r.headers.iter().map(|(k, v)| (k.clone(), json!(text(v)))).collect::<serde_json::Map<_, _>>(),
    })
}

/// Reads stdin lines into a channel (a blocking thread: stdin has no async reader here).
fn stdin_lines() -> tokio::sync::mpsc::Receiver<std::io::Result<Vec<u8>>> {
    let (tx, rx) = tokio::sync::mpsc::channel(4096);
    std::thread::spawn(move || {
        // Lines as bytes: a value need not be UTF-8.
        let mut stdin = std::io::stdin().lock();
        loop {
            let mut line = Vec::new();
            let line = match stdin.read_until(b'\n', &mut line) {
                Ok(0) => return,
                Ok(_) => {
                    if line.last() == Some(&b'\n') {
                        line.pop();
                        if line.last() == Some(&b'\r') {
                            line.pop();
                        }
                    }
                    Ok(line)
                }
                Err(e) => Err(e),
            };
            if tx.blocking_send(line).is_err() {
                return;
            }
        }
    });
    rx
}

/// How `produce` picks each record's key.
#[derive(Debug, Clone)]
pub enum KeyFrom {
    None,
    /// The same key for every record.
    Fixed(Bytes),
    /// A field of the line, which must be a JSON object (string fields as they are, other
    /// values as JSON text).
    Field(String),
}

/// The key of `line` per `key`, or why the line cannot be produced.
fn key_of(key: &KeyFrom, line: &[u8]) -> Result<Option<Bytes>, String> {
    match key {
        KeyFrom::None => Ok(None),
        KeyFrom::Fixed(k) => Ok(Some(k.clone())),
        KeyFrom::Field(f) => {
            let v: serde_json::Value = serde_json::from_slice(line)
                .map_err(|e| format!("--key-field {f}: the line is not JSON ({e})"))?;
            match v.get(f) {
                Some(serde_json::Value::String(s)) => Ok(Some(Bytes::from(s.clone()))),
                Some(serde_json::Value::Null) | None => {
                    Err(format!("--key-field {f}: the line has no field {f:?}"))
                }
                Some(other) => Ok(Some(Bytes::from(other.to_string()))),
            }
        }
    }
}

/// `aqueduct produce`.
pub async fn produce(
    args: &ClientArgs,
    topic: &str,
    key: KeyFrom,
    partition: Option<u32>,
    config: ProducerConfig,
) -> anyhow::Result<()> {
    let producer = Producer::new(&admin_client(args), topic, config).await?;
    if let Some(p) = partition {
        producer.router().check_partition(p)?;
    }
    // Acknowledgements are reported in line order by a second task.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(u64, Result<DeliveryFuture, String>)>(65536);
    let output = args.output;
    let reporter = tokio::spawn(async move {
        let mut failed = 0u64;
        let mut out = String::new();
        let mut queue = VecDeque::new();
        while let Some(item) = rx.recv().await {
            queue.push_back(item);
            while let Ok(item) = rx.try_recv() {
                queue.push_back(item);
            }
            while let Some((line, delivery)) = queue.pop_front() {
                let outcome = match delivery {
                    Ok(fut) => match fut.await {
                        Ok(Ok(d)) => Ok(d),
                        Ok(Err(e)) => Err(error_chain(e.as_ref())),
                        Err(_) => Err("the producer stopped".to_string()),
                    },
                    Err(why) => Err(why),
                };
                match outcome {
                    Ok(d) if output == Output::Json => {
                        out.push_str(
                            &json!({"line": line, "partition": d.partition, "offset": d.offset})
                                .to_string(),
                        );
                        out.push('\n');
                    }
                    Ok(_) => {}
                    Err(why) => {
                        failed += 1;
                        eprintln!("aqueduct: error: line {line}: not produced: {why}");
                    }
                }
                if out.len() > 64 << 10 {
                    print!("{out}");
                    out.clear();
                }
            }
            print!("{out}");
            out.clear();
        }
        failed
    });
    let mut lines = stdin_lines();
    let mut line_no: u64 = 0;
    while let Some(line) = lines.recv().await {
        let line = line.map_err(|e| anyhow::anyhow!("cannot read stdin: {e}"))?;
        let item = match key_of(&key, &line) {
            Ok(k) => {
                let record = ProducerRecord {
                    key: k,
                    value: Some(Bytes::from(line)),
                    ..ProducerRecord::default()
                };
                producer
                    .send(record, partition)
                    .await
                    .map_err(|e| e.to_string())
            }
            Err(why) => Err(why),
        };
        if tx.send((line_no, item)).await.is_err() {
            break;
        }
        line_no += 1;
    }
    drop(tx);
    producer.flush().await;
    let failed = reporter.await.unwrap_or(line_no);
    if args.output == Output::Text {
        eprintln!("{} records produced to {topic}", line_no - failed);
    }
    if failed > 0 {
        anyhow::bail!("{failed} of {line_no} records were not produced");
    }
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
async fn interrupted() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
}

/// `aqueduct consume`: from given positions, or (`--group`) as a member of a consumer group
/// that commits what it printed before exiting (at `--max`, SIGINT or SIGTERM) and every few
/// seconds while it runs.
pub async fn consume(
    args: &ClientArgs,
    topic: &str,
    from: &From,
    partition: Option<u32>,
    max: Option<u64>,
    group: Option<String>,
    to_end: bool,
) -> anyhow::Result<()> {
    let output = args.output;
    let reading = Reading {
        topic,
        from,
        partition,
        max,
        group,
        to_end,
    };
    follow(args, reading, |r| {
        Some(match output {
            Output::Json => record_json(r).to_string(),
            Output::Text => {
                String::from_utf8_lossy(r.value.as_deref().unwrap_or_default()).into_owned()
            }
        })
    })
    .await
}

/// What [`follow`] reads (the options of `aqueduct consume`).
#[derive(Debug)]
pub struct Reading<'a> {
    pub topic: &'a str,
    pub from: &'a From,
    pub partition: Option<u32>,
    /// Stop after printing this many lines.
    pub max: Option<u64>,
    pub group: Option<String>,
    pub to_end: bool,
}

/// Reads a topic as `aqueduct consume` does, printing the line `line` makes of each record
/// (records it makes none of are skipped, and not counted towards `max`).
pub async fn follow(
    args: &ClientArgs,
    reading: Reading<'_>,
    line: impl Fn(&ConsumerRecord) -> Option<String>,
) -> anyhow::Result<()> {
    let Reading {
        topic,
        from,
        partition,
        max,
        group,
        to_end,
    } = reading;
    let admin = admin_client(args);
    let mut config = ConsumerConfig {
        group: group.clone(),
        client_id: "aqueduct-cli".to_string(),
        ..ConsumerConfig::default()
    };
    let mut consumer = if group.is_some() {
        config.reset = match from {
            From::Earliest => OffsetReset::Earliest,
            From::Latest => OffsetReset::Latest,
            _ => anyhow::bail!(
                "with --group, --from says where partitions without a committed offset start: \
                 earliest or latest"
            ),
        };
        let mut c = Consumer::new(&admin, config);
        // Fail early on an unknown topic.
        Router::new(&admin, topic, false).await?;
        c.subscribe(vec![topic.to_string()]).await?;
        c
    } else {
        let router = Router::new(&admin, topic, false).await?;
        let partitions: Vec<u32> = match partition {
            Some(p) => {
                router.check_partition(p)?;
                vec![p]
            }
            None => (0..router.partitions()).collect(),
        };
        let mut start = Vec::new();
        for p in partitions {
            let (spec, ts) = match from {
                From::Earliest => (pb::OffsetSpec::Earliest, 0),
                From::Latest => (pb::OffsetSpec::Latest, 0),
                From::Time(t) => (pb::OffsetSpec::Timestamp, *t),
                From::Offset(o) => {
                    start.push(((topic.to_string(), p), *o));
                    continue;
                }
            };
            let (offset, _) = router.list_offset(p, spec, ts).await?;
            start.push(((topic.to_string(), p), offset));
        }
        // Explicit positions: an offset out of range is an error, not a jump.
        config.auto_commit = None;
        config.reset = OffsetReset::None;
        let mut c = Consumer::new(&admin, config);
        c.assign(start).await?;
        c
    };
    let mut printed: u64 = 0;
    let mut generation = 0;
    // With --end: the high watermark of each partition when first seen.
    let mut ends: std::collections::BTreeMap<(String, u32), u64> = Default::default();
    let stop = interrupted();
    tokio::pin!(stop);
    let result: anyhow::Result<()> = loop {
        if max.is_some_and(|m| printed >= m) {
            break Ok(());
        }
        if to_end {
            for (tp, hw) in consumer.high_watermarks() {
                ends.entry(tp.clone()).or_insert(*hw);
            }
            let assigned = consumer.assignment();
            if !assigned.is_empty()
                && assigned.iter().all(|tp| {
                    ends.get(tp).is_some_and(|end| {
                        consumer.positions().get(tp).is_some_and(|pos| pos >= end)
                    })
                })
            {
                break Ok(());
            }
        }
        let records = tokio::select! {
            r = consumer.poll(Duration::from_secs(1)) => r,
            () = &mut stop => break Ok(()),
        };
        let records = match records {
            Ok(r) => r,
            Err(e) => break Err(e.into()),
        };
        if group.is_some() && consumer.generation() != generation {
            generation = consumer.generation();
            let parts: Vec<String> = consumer
                .assignment()
                .iter()
                .map(|(t, p)| format!("{t}/{p}"))
                .collect();
            eprintln!(
                "aqueduct: joined group {} as member {} (generation {generation}): partitions [{}]",
                group.as_deref().unwrap_or_default(),
                consumer.member_id(),
                parts.join(",")
            );
        }
        let mut out = String::new();
        for r in &records {
            if max.is_some_and(|m| printed >= m) {
                // Not printed: not committed either.
                consumer.rewind(&(r.topic.clone(), r.partition), r.offset);
                break;
            }
            if let Some(l) = line(r) {
                out.push_str(&l);
                out.push('\n');
                printed += 1;
            }
        }
        print!("{out}");
    };
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let closed = consumer.close().await;
    result?;
    closed?;
    Ok(())
}

/// `aqueduct topic describe`: the topic's metadata, and per partition the leader (the replica
/// that answers) and its high watermark.
pub async fn describe(args: &ClientArgs, topic: &str) -> anyhow::Result<()> {
    let router = Router::new(&admin_client(args), topic, false).await?;
    let mut parts = Vec::new();
    for p in 0..router.partitions() {
        let replicas = router.replicas(p);
        let answer = router.list_offset(p, pb::OffsetSpec::Latest, 0).await;
        let start = router
            .list_offset(p, pb::OffsetSpec::Earliest, 0)
            .await
            .map(|(offset, _)| offset)
            .ok();
        parts.push(match answer {
            Ok((hw, leader)) => json!({"partition": p, "replicas": replicas, "leader": leader, "high_watermark": hw, "log_start_offset": start}),
            Err(e) => json!({"partition": p, "replicas": replicas, "leader": null, "error": e.to_string()}),
        });
    }
    let doc = json!({"name": topic, "partitions": parts});
    match args.output {
        Output::Json => println!("{doc}"),
        Output::Text => {
            println!("{topic}");
            for p in &parts {
                println!(
                    "  partition {}: leader {} offsets {}..{} replicas {}",
                    p["partition"],
                    p["leader"].as_str().unwrap_or("none"),
                    p["log_start_offset"]
                        .as_u64()
                        .map_or("?".into(), |o| o.to_string()),
                    p["high_watermark"]
                        .as_u64()
                        .map_or("?".into(), |o| o.to_string()),
                    p["replicas"]
                );
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_parses_every_form() {
        assert_eq!(parse_from("earliest"), Ok(From::Earliest));
        assert_eq!(parse_from("latest"), Ok(From::Latest));
        assert_eq!(parse_from("42"), Ok(From::Offset(42)));
        assert_eq!(
            parse_from("2026-11-28T00:00:00Z"),
            Ok(From::Time(1_795_824_000_000))
        );
        assert!(parse_from("yesterday").is_err());
    }
}
