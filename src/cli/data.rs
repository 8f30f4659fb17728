//! `aqueduct produce`, `aqueduct consume` and `aqueduct topic describe`: the data path from
//! the command line, over the gRPC data service.
//!
//! [`Router`] knows each partition's replicas (from the metadata leader) and remembers its
//! leader: a request goes to the cached leader, follows `NOT_LEADER` redirects, and on
//! `UNAVAILABLE` or a broken connection tries the next replica after a pause, until its
//! deadline. So `produce` keeps going through leader changes; a batch that finally fails is
//! reported on stderr, record by record, and the command exits 1 at the end.
//!
//! Batches are Kafka RecordBatch v2, built and decoded with the `kafka-protocol` crate.

use std::collections::HashMap;
use std::io::BufRead;
use std::time::Duration;

use anyhow::Context;
use aqueduct_protocol::cluster as cpb;
use aqueduct_protocol::data as pb;
use aqueduct_protocol::data::data_client::DataClient;
use bytes::{Bytes, BytesMut};
use kafka_protocol::records::{
    Compression, Record, RecordBatchDecoder, RecordBatchEncoder, RecordEncodeOptions, TimestampType,
};
use serde_json::json;
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

use super::{ClientArgs, Output};
use crate::client::{AdminClient, error_chain};

/// How long one batch (or fetch) keeps retrying through leader changes.
const REQUEST_DEADLINE: Duration = Duration::from_secs(30);
/// Most records `produce` puts in one batch.
const MAX_BATCH_RECORDS: usize = 500;
/// Most bytes `produce` puts in one batch (below the broker's 1 MiB limit).
const MAX_BATCH_BYTES: usize = 512 << 10;

/// A topic's partitions, their replicas' addresses and their last known leaders.
#[derive(Debug)]
pub struct Router {
    topic: String,
    replicas: Vec<Vec<String>>,
    leaders: HashMap<u32, String>,
    channels: HashMap<String, Channel>,
}

fn error_code(status: &Status) -> Option<&str> {
    status.metadata().get("aq-error")?.to_str().ok()
}

impl Router {
    /// Looks the topic up through the metadata leader; with `create`, an unknown topic is
    /// created if the cluster auto-creates topics.
    pub async fn new(args: &ClientArgs, topic: &str, create: bool) -> anyhow::Result<Self> {
        let admin = AdminClient::new(
            args.server.clone(),
            Duration::from_secs(args.timeout.max(1)),
        );
        let topics = if create {
            let request = cpb::EnsureTopicRequest {
                name: topic.to_string(),
            };
            let reply = admin
                .on_leader(|mut c| {
                    let request = request.clone();
                    async move { c.ensure_topic(request).await }
                })
                .await
                .with_context(|| format!("cannot use topic {topic}"))?;
            cpb::ListTopicsReply {
                topics: reply.topic.into_iter().collect(),
            }
        } else {
            admin
                .on_leader(|mut c| async move { c.list_topics(cpb::ListTopicsRequest {}).await })
                .await
                .context("cannot read the topic list")?
        };
        let status = admin
            .on_leader(|mut c| async move { c.status(cpb::StatusRequest {}).await })
            .await
            .context("cannot read the cluster members")?;
        let addrs: HashMap<u64, String> = status
            .nodes
            .iter()
            .map(|n| (n.node_id, n.addr.clone()))
            .collect();
        let t = topics
            .topics
            .into_iter()
            .find(|t| t.name == topic)
            .ok_or_else(|| {
                anyhow::anyhow!("unknown topic {topic:?} (UNKNOWN_TOPIC_OR_PARTITION)")
            })?;
        let mut replicas = vec![Vec::new(); t.partitions as usize];
        for a in t.assignment {
            if let Some(slot) = replicas.get_mut(a.partition as usize) {
                *slot = a
                    .replicas
                    .iter()
                    .filter_map(|id| addrs.get(id).cloned())
                    .collect();
            }
        }
        Ok(Self {
            topic: topic.to_string(),
            replicas,
            leaders: HashMap::new(),
            channels: HashMap::new(),
        })
    }

    pub fn partitions(&self) -> u32 {
        self.replicas.len() as u32
    }

    fn client(&mut self, addr: &str) -> anyhow::Result<DataClient<Channel>> {
        if let Some(c) = self.channels.get(addr) {
            return Ok(DataClient::new(c.clone()).max_decoding_message_size(16 << 20));
        }
        let channel = Endpoint::from_shared(format!("http://{addr}"))
            .with_context(|| format!("invalid address {addr:?}"))?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .connect_lazy();
        self.channels.insert(addr.to_string(), channel.clone());
        Ok(DataClient::new(channel).max_decoding_message_size(16 << 20))
    }

    /// ListOffsets on the leader of `partition`: the offset and the leader's address.
    pub async fn list_offset(
        &mut self,
        topic: &str,
        partition: u32,
        spec: pb::OffsetSpec,
        timestamp_ms: i64,
    ) -> anyhow::Result<(u64, String)> {
        let (reply, leader) = self
            .on_leader(partition, |mut c| {
                let request = pb::ListOffsetsRequest {
                    topic: topic.to_string(),
                    partition,
                    spec: spec as i32,
                    timestamp_ms,
                };
                async move { c.list_offsets(request).await }
            })
            .await?;
        Ok((reply.offset, leader))
    }

    /// Runs `call` against the leader of `partition`; returns the reply and the address that
    /// answered.
    pub async fn on_leader<T, F, Fut>(
        &mut self,
        partition: u32,
        call: F,
    ) -> anyhow::Result<(T, String)>
    where
        F: Fn(DataClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let replicas = self
            .replicas
            .get(partition as usize)
            .cloned()
            .filter(|r| !r.is_empty())
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "topic {} has no partition {partition} (UNKNOWN_TOPIC_OR_PARTITION)",
                    self.topic
                )
            })?;
        let deadline = Instant::now() + REQUEST_DEADLINE;
        let mut next = 0usize;
        let mut last = String::new();
        while Instant::now() < deadline {
            let addr = match self.leaders.get(&partition) {
                Some(a) => a.clone(),
                None => {
                    next += 1;
                    replicas[(next - 1) % replicas.len()].clone()
                }
            };
            let client = self.client(&addr)?;
            match tokio::time::timeout_at(deadline, call(client)).await {
                Ok(Ok(r)) => {
                    self.leaders.insert(partition, addr.clone());
                    return Ok((r.into_inner(), addr));
                }
                Ok(Err(status)) => {
                    last = format!("{addr}: {}", status.message());
                    self.leaders.remove(&partition);
                    match error_code(&status) {
                        Some("NOT_LEADER") => {
                            if let Some(l) = status
                                .metadata()
                                .get("aq-leader")
                                .and_then(|v| v.to_str().ok())
                            {
                                self.leaders.insert(partition, l.to_string());
                                tokio::time::sleep(Duration::from_millis(10)).await;
                                continue;
                            }
                        }
                        // A replica whose metadata lags the leader's may not know the partition
                        // (or not host it yet): the metadata leader said it exists, so wait.
                        Some("NOT_REPLICA" | "UNKNOWN_TOPIC_OR_PARTITION") => {}
                        _ if status.code() == Code::Unavailable
                            || status.code() == Code::Unknown
                            || status.code() == Code::Cancelled
                            || status.code() == Code::DeadlineExceeded => {}
                        Some(code) => {
                            anyhow::bail!("{} ({code})", status.message());
                        }
                        None => anyhow::bail!("{addr}: {}", status.message()),
                    }
                }
                Err(_) => break,
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        anyhow::bail!(
            "no leader of {}/{partition} answered within {} s (last error: {last})",
            self.topic,
            REQUEST_DEADLINE.as_secs()
        )
    }
}

/// Kafka's murmur2 (as the Java client's `Utils.murmur2`), for key-hash partitioning.
pub fn murmur2(data: &[u8]) -> u32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let len = data.len();
    let mut h: u32 = SEED ^ (len as u32);
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let rest = chunks.remainder();
    if rest.len() >= 3 {
        h ^= u32::from(rest[2]) << 16;
    }
    if rest.len() >= 2 {
        h ^= u32::from(rest[1]) << 8;
    }
    if !rest.is_empty() {
        h ^= u32::from(rest[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h
}

/// The partition of a keyed record, as the Java client computes it.
pub fn partition_for_key(key: &[u8], partitions: u32) -> u32 {
    (murmur2(key) & 0x7fff_ffff) % partitions.max(1)
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Encodes records (key, value) as one RecordBatch v2.
pub fn encode_batch(records: &[(Option<Bytes>, Bytes)]) -> anyhow::Result<Vec<u8>> {
    let ts = now_ms();
    let records: Vec<Record> = records
        .iter()
        .enumerate()
        .map(|(i, (key, value))| Record {
            transactional: false,
            control: false,
            delete_horizon: false,
            partition_leader_epoch: -1,
            producer_id: -1,
            producer_epoch: -1,
            timestamp_type: TimestampType::Creation,
            offset: i as i64,
            // No producer id: the batch's base sequence is -1 (NO_SEQUENCE), and each record's
            // sequence is base + delta, which is how the encoder keeps them in one batch.
            sequence: i as i32 - 1,
            timestamp: ts,
            key: key.clone(),
            value: Some(value.clone()),
            headers: Default::default(),
        })
        .collect();
    let mut buf = BytesMut::new();
    RecordBatchEncoder::encode(
        &mut buf,
        &records,
        &RecordEncodeOptions {
            version: 2,
            compression: Compression::None,
        },
    )
    .map_err(|e| anyhow::anyhow!("cannot encode a record batch: {e}"))?;
    Ok(buf.to_vec())
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

/// The records of `partition` from `offset` on, fetched in one request (possibly none).
async fn fetch_records(
    router: &mut Router,
    topic: &str,
    partition: u32,
    offset: u64,
) -> anyhow::Result<(Vec<Record>, u64)> {
    let (reply, _) = router
        .on_leader(partition, |mut c| {
            let request = pb::FetchRequest {
                topic: topic.to_string(),
                partition,
                offset,
                max_bytes: 4 << 20,
                max_wait_ms: 0,
            };
            async move { c.fetch(request).await }
        })
        .await?;
    let mut buf = Bytes::from(reply.batches);
    let sets = RecordBatchDecoder::decode_all(&mut buf)
        .map_err(|e| anyhow::anyhow!("cannot decode fetched batches: {e}"))?;
    let records = sets
        .into_iter()
        .flat_map(|s| s.records)
        .filter(|r| r.offset as u64 >= offset)
        .collect();
    Ok((records, reply.high_watermark))
}

/// `aqueduct message show`.
pub async fn show(
    args: &ClientArgs,
    topic: &str,
    partition: Option<u32>,
    pick: Pick,
) -> anyhow::Result<()> {
    let mut router = Router::new(args, topic, false).await?;
    let p = match (&pick, partition) {
        (_, Some(p)) => p,
        (Pick::Key(k), None) => partition_for_key(k, router.partitions()),
        (_, None) => 0,
    };
    if p >= router.partitions() {
        anyhow::bail!(
            "topic {topic} has {} partitions, not {} (UNKNOWN_TOPIC_OR_PARTITION)",
            router.partitions(),
            p + 1
        );
    }
    let found = match &pick {
        Pick::Offset(o) => fetch_records(&mut router, topic, p, *o)
            .await?
            .0
            .into_iter()
            .find(|r| r.offset as u64 == *o),
        Pick::Time(t) => {
            let (o, _) = router
                .list_offset(topic, p, pb::OffsetSpec::Timestamp, *t)
                .await?;
            fetch_records(&mut router, topic, p, o)
                .await?
                .0
                .into_iter()
                .find(|r| r.timestamp >= *t)
        }
        Pick::Key(k) => {
            // The latest record with the key: scan the partition from its start.
            let (mut offset, _) = router
                .list_offset(topic, p, pb::OffsetSpec::Earliest, 0)
                .await?;
            let mut latest = None;
            loop {
                let (records, hw) = fetch_records(&mut router, topic, p, offset).await?;
                let Some(last) = records.last() else { break };
                offset = last.offset as u64 + 1;
                if let Some(r) = records
                    .into_iter()
                    .filter(|r| r.key.as_ref() == Some(k))
                    .last()
                {
                    latest = Some(r);
                }
                if offset >= hw {
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
        Output::Json => println!(
            "{}",
            json!({
                "partition": p,
                "offset": r.offset,
                "timestamp": r.timestamp,
                "key": r.key.as_deref().map(String::from_utf8_lossy),
                "value": r.value.as_deref().map(String::from_utf8_lossy),
                "headers": r.headers.iter().map(|(k, v)| (k.to_string(), json!(v.as_deref().map(String::from_utf8_lossy)))).collect::<serde_json::Map<_, _>>(),
            })
        ),
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

/// `aqueduct produce`.
pub async fn produce(
    args: &ClientArgs,
    topic: &str,
    key: Option<&str>,
    partition: Option<u32>,
    acks: pb::Acks,
) -> anyhow::Result<()> {
    let mut router = Router::new(args, topic, true).await?;
    let partitions = router.partitions();
    if let Some(p) = partition
        && p >= partitions
    {
        anyhow::bail!(
            "topic {topic} has {partitions} partitions, not {} (UNKNOWN_TOPIC_OR_PARTITION)",
            p + 1
        );
    }
    let key = key.map(|k| Bytes::copy_from_slice(k.as_bytes()));
    let target = |round: u32| -> u32 {
        match (partition, &key) {
            (Some(p), _) => p,
            (None, Some(k)) => partition_for_key(k, partitions),
            (None, None) => round % partitions.max(1),
        }
    };
    let mut lines = stdin_lines();
    let mut line_no: u64 = 0;
    let mut failed: u64 = 0;
    let mut round = 0u32;
    let mut done = false;
    let mut carry: Option<Bytes> = None;
    while !done {
        // One batch: the first line waits, the rest is whatever is already there, up to
        // the record and byte limits (a line that would overflow waits for the next batch).
        let mut batch: Vec<(u64, Bytes)> = Vec::new();
        let mut bytes = 0usize;
        let first = match carry.take() {
            Some(line) => Some(line),
            None => match lines.recv().await {
                Some(line) => Some(Bytes::from(line.context("cannot read stdin")?)),
                None => None,
            },
        };
        let Some(first) = first else { break };
        bytes += first.len();
        batch.push((line_no, first));
        line_no += 1;
        while batch.len() < MAX_BATCH_RECORDS {
            match lines.try_recv() {
                Ok(line) => {
                    let line = Bytes::from(line.context("cannot read stdin")?);
                    if bytes + line.len() > MAX_BATCH_BYTES {
                        carry = Some(line);
                        break;
                    }
                    bytes += line.len();
                    batch.push((line_no, line));
                    line_no += 1;
                }
                Err(tokio::sync::mpsc::error::TryRecvError::Empty) => break,
                Err(tokio::sync::mpsc::error::TryRecvError::Disconnected) => {
                    done = carry.is_none();
                    break;
                }
            }
        }
        let p = target(round);
        round = round.wrapping_add(1);
        let records: Vec<(Option<Bytes>, Bytes)> = batch
            .iter()
            .map(|(_, v)| (key.clone(), v.clone()))
            .collect();
        let encoded = encode_batch(&records)?;
        let result = router
            .on_leader(p, |mut c| {
                let request = pb::ProduceRequest {
                    topic: topic.to_string(),
                    partition: p,
                    batch: encoded.clone(),
                    acks: acks as i32,
                };
                async move { c.produce(request).await }
            })
            .await;
        match result {
            Ok((reply, _)) => {
                if args.output == Output::Json {
                    let mut out = String::new();
                    for (i, (n, _)) in batch.iter().enumerate() {
                        out.push_str(
                            &json!({"line": n, "partition": p, "offset": reply.base_offset + i as u64})
                                .to_string(),
                        );
                        out.push('\n');
                    }
                    print!("{out}");
                }
            }
            Err(e) => {
                failed += batch.len() as u64;
                let why = error_chain(e.as_ref());
                for (n, _) in &batch {
                    eprintln!("aqueduct: error: line {n}: not produced: {why}");
                }
            }
        }
    }
    if args.output == Output::Text {
        eprintln!("{} records produced to {topic}", line_no - failed);
    }
    if failed > 0 {
        anyhow::bail!("{failed} of {line_no} records were not produced");
    }
    Ok(())
}

/// `aqueduct consume`.
pub async fn consume(
    args: &ClientArgs,
    topic: &str,
    from: &From,
    partition: Option<u32>,
    max: Option<u64>,
) -> anyhow::Result<()> {
    let mut router = Router::new(args, topic, false).await?;
    let partitions: Vec<u32> = match partition {
        Some(p) if p < router.partitions() => vec![p],
        Some(p) => anyhow::bail!(
            "topic {topic} has {} partitions, not {} (UNKNOWN_TOPIC_OR_PARTITION)",
            router.partitions(),
            p + 1
        ),
        None => (0..router.partitions()).collect(),
    };
    let mut positions = Vec::new();
    for &p in &partitions {
        let (spec, ts) = match from {
            From::Earliest => (pb::OffsetSpec::Earliest, 0),
            From::Latest => (pb::OffsetSpec::Latest, 0),
            From::Time(t) => (pb::OffsetSpec::Timestamp, *t),
            From::Offset(o) => {
                positions.push((p, *o));
                continue;
            }
        };
        let (offset, _) = router.list_offset(topic, p, spec, ts).await?;
        positions.push((p, offset));
    }
    let wait_ms = if positions.len() > 1 { 200 } else { 1000 };
    let mut printed: u64 = 0;
    loop {
        for (p, offset) in positions.iter_mut() {
            if max.is_some_and(|m| printed >= m) {
                return Ok(());
            }
            let (reply, _) = router
                .on_leader(*p, |mut c| {
                    let request = pb::FetchRequest {
                        topic: topic.to_string(),
                        partition: *p,
                        offset: *offset,
                        max_bytes: 1 << 20,
                        max_wait_ms: wait_ms,
                    };
                    async move { c.fetch(request).await }
                })
                .await?;
            let mut buf = Bytes::from(reply.batches);
            let sets = RecordBatchDecoder::decode_all(&mut buf)
                .map_err(|e| anyhow::anyhow!("cannot decode fetched batches: {e}"))?;
            let mut out = String::new();
            for set in sets {
                for r in set.records {
                    let o = r.offset as u64;
                    if o < *offset {
                        continue;
                    }
                    if max.is_some_and(|m| printed >= m) {
                        break;
                    }
                    let value = r.value.as_deref().map(String::from_utf8_lossy);
                    match args.output {
                        Output::Json => {
                            let key = r.key.as_deref().map(String::from_utf8_lossy);
                            out.push_str(
                                &json!({"partition": p, "offset": o, "timestamp": r.timestamp, "key": key, "value": value})
                                    .to_string(),
                            );
                        }
                        Output::Text => out.push_str(value.as_deref().unwrap_or("")),
                    }
                    out.push('\n');
                    printed += 1;
                    *offset = o + 1;
                }
            }
            print!("{out}");
        }
    }
}

/// `aqueduct topic describe`: the topic's metadata, and per partition the leader (the replica
/// that answers) and its high watermark.
pub async fn describe(args: &ClientArgs, topic: &str) -> anyhow::Result<()> {
    let mut router = Router::new(args, topic, false).await?;
    let mut parts = Vec::new();
    for p in 0..router.partitions() {
        let replicas = router.replicas[p as usize].clone();
        let answer = router
            .list_offset(topic, p, pb::OffsetSpec::Latest, 0)
            .await;
        let start = router
            .list_offset(topic, p, pb::OffsetSpec::Earliest, 0)
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

    /// Values from the Java client's `Utils.murmur2` (its unit tests and known partitions).
    #[test]
    fn murmur2_matches_kafka() {
        assert_eq!(murmur2(b"21") as i32, -973932308);
        assert_eq!(murmur2(b"foobar") as i32, -790332482);
        assert_eq!(murmur2(b"a-little-bit-long-string") as i32, -985981536);
        assert_eq!(murmur2(b"a-little-bit-longer-string") as i32, -1486304829);
        assert_eq!(
            murmur2(b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8") as i32,
            -58897971
        );
        assert_eq!(murmur2(b"abc") as i32, 479470107);
    }

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

    #[test]
    fn batches_round_trip_through_kafka_protocol() {
        let b = encode_batch(&[
            (Some(Bytes::from_static(b"k")), Bytes::from_static(b"v1")),
            (None, Bytes::from_static(b"v2")),
        ])
        .unwrap_or_default();
        assert!(crate::data::batch_problem(&b).is_none());
        let mut buf = Bytes::from(b);
        let sets = RecordBatchDecoder::decode_all(&mut buf).unwrap_or_default();
        let values: Vec<_> = sets
            .iter()
            .flat_map(|s| s.records.iter().map(|r| r.value.clone()))
            .collect();
        assert_eq!(
            values,
            vec![
                Some(Bytes::from_static(b"v1")),
                Some(Bytes::from_static(b"v2"))
            ]
        );
    }
}
