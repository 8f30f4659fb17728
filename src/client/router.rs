//! [`Router`]: sends data requests to partition leaders.
//!
//! It knows each partition's replicas (from the metadata leader) and remembers its leader: a
//! request goes to the cached leader, follows `NOT_LEADER` redirects, and on `UNAVAILABLE`, a
//! broken connection or no answer in time tries another replica after a pause, until its
//! deadline. A node that failed that way is passed over for [`SUSPECT_FOR`] when a replica is
//! picked at random, and HTTP/2 keep-alive pings close a connection to a node that stopped
//! answering (a frozen process keeps its TCP connections open) within
//! [`KEEP_ALIVE_INTERVAL`] + [`KEEP_ALIVE_TIMEOUT`], failing the requests on it at once.
//! Clones share the leader cache and the connections (one HTTP/2 channel per node).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aqueduct_protocol::cluster as cpb;
use aqueduct_protocol::data as pb;
use aqueduct_protocol::data::data_client::DataClient;
use bytes::Bytes;
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

use super::records::{ConsumerRecord, batches_end, decode_batches};
use super::{AdminClient, ClientError, error_code};

/// How long one request keeps retrying through leader changes, by default.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(30);

/// How long one attempt of a request waits for its answer, by default.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a node that did not answer is passed over when a replica is picked at random.
pub const SUSPECT_FOR: Duration = Duration::from_secs(5);

/// HTTP/2 keep-alive: a ping this often on every data connection...
pub const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(1);
/// ...and the connection is closed when one is not answered within this.
pub const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(2);

/// Largest reply the data client decodes.
const MAX_REPLY_BYTES: usize = 16 << 20;

#[derive(Debug, Default)]
struct Shared {
    leaders: HashMap<u32, String>,
    channels: HashMap<String, Channel>,
    /// Nodes that last failed to answer, and when.
    suspects: HashMap<String, Instant>,
}

/// A topic's partitions, their replicas' addresses and their last known leaders.
#[derive(Debug, Clone)]
pub struct Router {
    topic: String,
    replicas: Arc<Vec<Vec<String>>>,
    shared: Arc<Mutex<Shared>>,
    deadline: Duration,
}

/// Whether a refusal means "try again, maybe elsewhere".
pub(crate) fn retriable(status: &Status) -> bool {
    match error_code(status) {
        Some(
            "NOT_LEADER"
            | "NOT_REPLICA"
            | "UNKNOWN_TOPIC_OR_PARTITION"
            | "LEADER_NOT_AVAILABLE"
            | "NOT_COORDINATOR"
            | "COORDINATOR_LOAD_IN_PROGRESS"
            | "COORDINATOR_NOT_AVAILABLE",
        ) => true,
        Some(_) => false,
        None => matches!(
            status.code(),
            Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded
        ),
    }
}

/// What one fetch returned.
#[derive(Debug, Clone, Default)]
pub struct Fetched {
    /// Records at or after the requested offset.
    pub records: Vec<ConsumerRecord>,
    /// Where the next fetch starts: past the last batch returned (batches may hold fewer
    /// records than offsets once compacted).
    pub next: u64,
    pub high_watermark: u64,
}

/// A data-service client on `channel`.
pub fn data_client(channel: Channel) -> DataClient<Channel> {
    DataClient::new(channel)
        .max_decoding_message_size(MAX_REPLY_BYTES)
        .max_encoding_message_size(MAX_REPLY_BYTES)
}

impl Router {
    /// Looks the topic up through the metadata leader; with `create`, an unknown topic is
    /// created if the cluster auto-creates topics.
    pub async fn new(admin: &AdminClient, topic: &str, create: bool) -> Result<Self, ClientError> {
        let topics = if create {
            let request = cpb::EnsureTopicRequest {
                name: topic.to_string(),
            };
            let reply = admin
                .on_leader(|mut c| {
                    let request = request.clone();
                    async move { c.ensure_topic(request).await }
                })
                .await?;
            reply.topic.into_iter().collect()
        } else {
            admin
                .on_leader(|mut c| async move { c.list_topics(cpb::ListTopicsRequest {}).await })
                .await?
                .topics
        };
        let status = admin
            .on_leader(|mut c| async move { c.status(cpb::StatusRequest {}).await })
            .await?;
        let addrs: HashMap<u64, String> = status
            .nodes
            .iter()
            .map(|n| (n.node_id, n.addr.clone()))
            .collect();
        let t = topics
            .into_iter()
            .find(|t| t.name == topic)
            .ok_or_else(|| ClientError::UnknownTopic(topic.to_string()))?;
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
            replicas: Arc::new(replicas),
            shared: Arc::default(),
            deadline: REQUEST_DEADLINE,
        })
    }

    /// How long one request keeps retrying.
    pub fn deadline(&self) -> Duration {
        self.deadline
    }

    /// With another retry deadline per request.
    pub fn with_deadline(mut self, deadline: Duration) -> Self {
        self.deadline = deadline;
        self
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    pub fn partitions(&self) -> u32 {
        self.replicas.len() as u32
    }

    /// The replicas' addresses of `partition`.
    pub fn replicas(&self, partition: u32) -> Vec<String> {
        self.replicas
            .get(partition as usize)
            .cloned()
            .unwrap_or_default()
    }

    /// `Err` unless the topic has `partition`.
    pub fn check_partition(&self, partition: u32) -> Result<(), ClientError> {
        if partition < self.partitions() {
            Ok(())
        } else {
            Err(ClientError::UnknownPartition {
                topic: self.topic.clone(),
                partition,
                partitions: self.partitions(),
            })
        }
    }

    fn channel(&self, addr: &str) -> Result<Channel, ClientError> {
        let mut shared = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        let channel = match shared.channels.get(addr) {
            Some(c) => c.clone(),
            None => {
                let channel = Endpoint::from_shared(format!("http://{addr}"))
                    .map_err(|_| ClientError::BadAddress(addr.to_string()))?
                    .connect_timeout(Duration::from_secs(2))
                    .tcp_nodelay(true)
                    .http2_keep_alive_interval(KEEP_ALIVE_INTERVAL)
                    .keep_alive_timeout(KEEP_ALIVE_TIMEOUT)
                    .keep_alive_while_idle(true)
                    .connect_lazy();
                shared.channels.insert(addr.to_string(), channel.clone());
                channel
            }
        };
        Ok(channel)
    }

    fn cached_leader(&self, partition: u32) -> Option<String> {
        let shared = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        shared.leaders.get(&partition).cloned()
    }

    fn set_leader(&self, partition: u32, addr: Option<String>) {
        let mut shared = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        match addr {
            Some(a) => shared.leaders.insert(partition, a),
            None => shared.leaders.remove(&partition),
        };
    }

    /// Where a request for `partition` goes when no leader is cached: a replica picked at
    /// random (spreading first tries), passing over those that failed lately.
    fn pick_replica(&self, replicas: &[String]) -> String {
        let shared = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let fresh: Vec<&String> = replicas
            .iter()
            .filter(|a| {
                shared
                    .suspects
                    .get(*a)
                    .is_none_or(|t| now.duration_since(*t) >= SUSPECT_FOR)
            })
            .collect();
        let from: Vec<&String> = if fresh.is_empty() {
            replicas.iter().collect()
        } else {
            fresh
        };
        from[rand::random_range(0..from.len())].clone()
    }

    fn suspect(&self, addr: &str, failed: bool) {
        let mut shared = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        if failed {
            shared.suspects.insert(addr.to_string(), Instant::now());
        } else if !shared.suspects.is_empty() {
            shared.suspects.remove(addr);
        }
    }

    /// Runs `call` against the leader of `partition` once, waiting `within` for the answer:
    /// the reply, or the refusal/failure as it came (after which the next try goes where the
    /// refusal points, or elsewhere). Producers use this to decide themselves what a failure
    /// means for their batches.
    pub async fn try_leader<T, F, Fut>(
        &self,
        partition: u32,
        within: Duration,
        call: F,
    ) -> Result<T, Status>
    where
        F: Fn(Channel) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let replicas = self.replicas(partition);
        if replicas.is_empty() {
            return Err(Status::not_found(format!(
                "topic {} has no partition {partition}",
                self.topic
            )));
        }
        let addr = self
            .cached_leader(partition)
            .unwrap_or_else(|| self.pick_replica(&replicas));
        let client = self
            .channel(&addr)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let result = match tokio::time::timeout(within, call(client)).await {
            Ok(r) => r,
            Err(_) => Err(Status::deadline_exceeded(format!(
                "{addr} did not answer within {} ms",
                within.as_millis()
            ))),
        };
        match result {
            Ok(r) => {
                self.suspect(&addr, false);
                self.set_leader(partition, Some(addr));
                Ok(r.into_inner())
            }
            Err(status) => {
                let leader = matches!(error_code(&status), Some("NOT_LEADER" | "NOT_COORDINATOR"))
                    .then(|| {
                        status
                            .metadata()
                            .get("aq-leader")
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_string)
                    })
                    .flatten();
                // No answer at all (as opposed to a refusal): try the others first next time.
                let silent = error_code(&status).is_none()
                    && matches!(
                        status.code(),
                        Code::Unavailable
                            | Code::DeadlineExceeded
                            | Code::Cancelled
                            | Code::Unknown
                    );
                self.suspect(&addr, silent);
                self.set_leader(partition, leader);
                Err(status)
            }
        }
    }

    /// Runs `call` against the leader of `partition`, each try waiting `within` for its
    /// answer, retrying through leader changes until the deadline; returns the reply and the
    /// address that answered.
    pub async fn on_leader<T, F, Fut>(
        &self,
        partition: u32,
        within: Duration,
        call: F,
    ) -> Result<(T, String), ClientError>
    where
        F: Fn(Channel) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, Status>>,
    {
        self.check_partition(partition)?;
        let deadline = Instant::now() + self.deadline;
        let mut last = String::new();
        while Instant::now() < deadline {
            let before = self.cached_leader(partition);
            let within = within.min(deadline.saturating_duration_since(Instant::now()));
            match self.try_leader(partition, within, &call).await {
                Ok(r) => {
                    let addr = self.cached_leader(partition).unwrap_or_default();
                    return Ok((r, addr));
                }
                Err(status) => {
                    last = format!(
                        "{}: {}",
                        before.as_deref().unwrap_or("a replica"),
                        status.message()
                    );
                    if !retriable(&status) {
                        return Err(ClientError::refused(&status));
                    }
                    if self.cached_leader(partition).is_some() {
                        // Redirected: go there at once.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Err(ClientError::NoLeader {
            topic: self.topic.clone(),
            partition,
            secs: self.deadline.as_secs(),
            last,
        })
    }

    /// ListOffsets on the leader of `partition`: the offset and the leader's address.
    pub async fn list_offset(
        &self,
        partition: u32,
        spec: pb::OffsetSpec,
        timestamp_ms: i64,
    ) -> Result<(u64, String), ClientError> {
        let topic = self.topic.clone();
        let (reply, leader) = self
            .on_leader(partition, ATTEMPT_TIMEOUT, |ch| {
                let mut c = data_client(ch);
                let request = pb::ListOffsetsRequest {
                    topic: topic.clone(),
                    partition,
                    spec: spec as i32,
                    timestamp_ms,
                };
                async move { c.list_offsets(request).await }
            })
            .await?;
        Ok((reply.offset, leader))
    }

    /// The records of `partition` from `offset` on, in one fetch (waiting up to `max_wait`
    /// when there are none yet).
    pub async fn fetch(
        &self,
        partition: u32,
        offset: u64,
        max_bytes: u32,
        max_wait: Duration,
    ) -> Result<Fetched, ClientError> {
        let topic = self.topic.clone();
        let (reply, _) = self
            .on_leader(partition, max_wait + ATTEMPT_TIMEOUT, |ch| {
                let mut c = data_client(ch);
                let request = pb::FetchRequest {
                    topic: topic.clone(),
                    partition,
                    offset,
                    max_bytes,
                    max_wait_ms: max_wait.as_millis() as u32,
                };
                async move { c.fetch(request).await }
            })
            .await?;
        let next = batches_end(&reply.batches).map_or(offset, |e| e.max(offset));
        let mut records =
            decode_batches(Bytes::from(reply.batches), &self.topic, partition, offset)?;
        // A record claiming an offset past its batches is not believed.
        records.retain(|r| r.offset < next);
        Ok(Fetched {
            next,
            records,
            high_watermark: reply.high_watermark,
        })
    }
}
