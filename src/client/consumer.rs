//! [`Consumer`]: reads partitions, alone ([`Consumer::assign`]) or as a member of a consumer
//! group ([`Consumer::subscribe`]).
//!
//! Each assigned partition has a fetcher task that long-polls its leader and hands records to
//! [`Consumer::poll`]; the position of a partition (what a commit records) moves only past
//! records `poll` has returned, so a commit never covers a record the application has not
//! seen.
//!
//! In a group, the consumer joins through the group's coordinator (the leader of its
//! `__consumer_offsets` partition), and when it is the group leader it computes everyone's
//! assignment with the configured [`Assignor`]. A background task heartbeats; when the
//! coordinator says the group is rebalancing (or this member's generation is stale), the next
//! `poll` commits the current positions (with auto-commit), rejoins and resumes from the
//! committed offsets of the new assignment. Auto-commit also commits every
//! `auto_commit` interval; [`Consumer::commit`] commits by hand; [`Consumer::close`] commits
//! and leaves the group, so the others rebalance at once instead of after the session timeout.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicI32, AtomicI64, Ordering};
use std::time::Duration;

use aqueduct_protocol::cluster as cpb;
use aqueduct_protocol::data as pb;
use aqueduct_protocol::group as gpb;
use aqueduct_protocol::group::groups_client::GroupsClient;
use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tonic::Status;
use tonic::transport::Channel;

use super::group::{
    Assignor, PROTOCOL_TYPE, Subscription, Tp, assign, decode_assignment, decode_subscription,
    encode_assignment, encode_subscription,
};
use super::records::ConsumerRecord;
use super::router::{Fetched, Router, retriable};
use super::{AdminClient, ClientError, error_code};
use crate::broker::OFFSETS_TOPIC;
use crate::broker::groups::coordinator_partition;

/// Where a partition without a committed offset starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OffsetReset {
    Earliest,
    Latest,
    /// No reset: an offset out of range is an error `poll` returns (`OFFSET_OUT_OF_RANGE`).
    None,
}

/// How a consumer reads and takes part in its group.
#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    /// The consumer group (required for `subscribe` and commits).
    pub group: Option<String>,
    pub client_id: String,
    pub assignor: Assignor,
    pub session_timeout: Duration,
    pub rebalance_timeout: Duration,
    pub heartbeat_interval: Duration,
    /// Commit positions this often (and before a rebalance and on close); `None`: by hand.
    pub auto_commit: Option<Duration>,
    pub reset: OffsetReset,
    /// Longest long poll of one fetch.
    pub max_wait: Duration,
    pub fetch_max_bytes: u32,
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        Self {
            group: None,
            client_id: "aqueduct".to_string(),
            assignor: Assignor::Range,
            session_timeout: Duration::from_secs(10),
            rebalance_timeout: Duration::from_secs(30),
            heartbeat_interval: Duration::from_secs(3),
            auto_commit: Some(Duration::from_secs(5)),
            reset: OffsetReset::Latest,
            max_wait: Duration::from_millis(500),
            fetch_max_bytes: 1 << 20,
        }
    }
}

/// This member's identity in its group, shared with the heartbeat task.
#[derive(Debug, Default)]
struct Membership {
    member_id: std::sync::Mutex<String>,
    generation: AtomicI32,
    /// The generation the coordinator refused (rejoin when it is the current one).
    refused: AtomicI64,
}

impl Membership {
    fn member_id(&self) -> String {
        self.member_id
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn set_member_id(&self, id: &str) {
        *self.member_id.lock().unwrap_or_else(|p| p.into_inner()) = id.to_string();
    }

    fn needs_rejoin(&self) -> bool {
        let g = self.generation.load(Ordering::SeqCst);
        g <= 0 || self.refused.load(Ordering::SeqCst) == i64::from(g)
    }
}

/// The coordinator of one group: calls go to the leader of its `__consumer_offsets`
/// partition, following redirects.
pub struct Coordinator {
    router: Router,
    partition: u32,
}

impl Coordinator {
    /// Finds `group`'s coordinator (creating the offsets topic on first use).
    pub async fn locate(admin: &AdminClient, group: &str) -> Result<Self, ClientError> {
        let request = cpb::EnsureTopicRequest {
            name: OFFSETS_TOPIC.to_string(),
        };
        admin
            .on_leader(|mut c| {
                let request = request.clone();
                async move { c.ensure_topic(request).await }
            })
            .await?;
        let router = Router::new(admin, OFFSETS_TOPIC, false).await?;
        let partition = coordinator_partition(group, router.partitions());
        Ok(Self { router, partition })
    }

    /// Runs a group-service call on the coordinator, retrying through coordinator moves.
    pub async fn call<T, F, Fut>(&self, f: F) -> Result<T, ClientError>
    where
        F: Fn(GroupsClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, Status>>,
    {
        self.router
            // Joins and syncs wait for the whole group: no shorter limit per try (a node that
            // stopped answering is noticed by the connection's keep-alive).
            .on_leader(self.partition, self.router.deadline(), |ch| {
                f(GroupsClient::new(ch))
            })
            .await
            .map(|(r, _)| r)
    }

    /// Commits `offsets` for a group without members (generation -1, as Kafka's admin
    /// clients do); the coordinator refuses it while the group has members.
    pub async fn commit_inactive(
        &self,
        group: &str,
        offsets: Vec<gpb::TopicPartitionOffset>,
    ) -> Result<(), ClientError> {
        let request = gpb::OffsetCommitRequest {
            group: group.to_string(),
            generation: -1,
            member_id: String::new(),
            offsets,
        };
        self.call(|mut c| {
            let request = request.clone();
            async move { c.offset_commit(request).await }
        })
        .await?;
        Ok(())
    }
}

type FetchedMsg = (u64, Tp, Result<Fetched, ClientError>);

/// A consumer (see the module doc).
#[derive(Debug)]
pub struct Consumer {
    admin: AdminClient,
    config: ConsumerConfig,
    routers: HashMap<String, Router>,
    topics: Vec<String>,
    assignment: Vec<Tp>,
    positions: BTreeMap<Tp, u64>,
    committed: BTreeMap<Tp, u64>,
    high_watermarks: BTreeMap<Tp, u64>,
    membership: Arc<Membership>,
    heartbeat: Option<JoinHandle<()>>,
    fetchers: Vec<JoinHandle<()>>,
    epoch: u64,
    tx: mpsc::Sender<FetchedMsg>,
    rx: mpsc::Receiver<FetchedMsg>,
    last_commit: Instant,
}

impl std::fmt::Debug for Coordinator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "coordinator {}/{}", OFFSETS_TOPIC, self.partition)
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        for f in &self.fetchers {
            f.abort();
        }
        if let Some(h) = &self.heartbeat {
            h.abort();
        }
    }
}

impl Consumer {
    pub fn new(admin: &AdminClient, config: ConsumerConfig) -> Self {
        let (tx, rx) = mpsc::channel(64);
        Self {
            admin: admin.clone(),
            config,
            routers: HashMap::new(),
            topics: Vec::new(),
            assignment: Vec::new(),
            positions: BTreeMap::new(),
            committed: BTreeMap::new(),
            high_watermarks: BTreeMap::new(),
            membership: Arc::default(),
            heartbeat: None,
            fetchers: Vec::new(),
            epoch: 0,
            tx,
            rx,
            last_commit: Instant::now(),
        }
    }

    async fn router(&mut self, topic: &str) -> Result<Router, ClientError> {
        if let Some(r) = self.routers.get(topic) {
            return Ok(r.clone());
        }
        let r = Router::new(&self.admin, topic, false).await?;
        self.routers.insert(topic.to_string(), r.clone());
        Ok(r)
    }

    fn group(&self) -> Result<String, ClientError> {
        self.config
            .group
            .clone()
            .ok_or_else(|| ClientError::Refused {
                code: "INVALID_GROUP_ID".into(),
                message: "this consumer has no group".into(),
            })
    }

    /// The group's coordinator (the offsets topic is created on first use).
    async fn coordinator(&self) -> Result<Coordinator, ClientError> {
        Coordinator::locate(&self.admin, &self.group()?).await
    }

    /// Reads these partitions from these offsets (no group membership).
    pub async fn assign(&mut self, start: Vec<(Tp, u64)>) -> Result<(), ClientError> {
        self.assignment = start.iter().map(|(tp, _)| tp.clone()).collect();
        self.positions = start.into_iter().collect();
        for tp in self.assignment.clone() {
            self.router(&tp.0).await?.check_partition(tp.1)?;
        }
        self.restart_fetchers().await
    }

    /// Joins the group for these topics (the partitions come from the group's assignment at
    /// the next `poll`).
    pub async fn subscribe(&mut self, topics: Vec<String>) -> Result<(), ClientError> {
        self.group()?;
        self.topics = topics;
        self.membership.generation.store(0, Ordering::SeqCst);
        Ok(())
    }

    /// The partitions currently assigned.
    pub fn assignment(&self) -> &[Tp] {
        &self.assignment
    }

    /// Moves a partition's position (what the next commit records) back to `offset`, e.g.
    /// for records `poll` returned that the application did not process.
    pub fn rewind(&mut self, tp: &Tp, offset: u64) {
        if let Some(pos) = self.positions.get_mut(tp) {
            *pos = (*pos).min(offset);
        }
    }

    /// The high watermark each assigned partition last reported.
    pub fn high_watermarks(&self) -> &BTreeMap<Tp, u64> {
        &self.high_watermarks
    }

    /// The next offset of each assigned partition.
    pub fn positions(&self) -> &BTreeMap<Tp, u64> {
        &self.positions
    }

    pub fn member_id(&self) -> String {
        self.membership.member_id()
    }

    pub fn generation(&self) -> i32 {
        self.membership.generation.load(Ordering::SeqCst)
    }

    /// Records that arrived, waiting up to `timeout` for some.
    pub async fn poll(&mut self, timeout: Duration) -> Result<Vec<ConsumerRecord>, ClientError> {
        if !self.topics.is_empty() && self.membership.needs_rejoin() {
            self.rejoin().await?;
        }
        if let Some(every) = self.config.auto_commit
            && self.last_commit.elapsed() >= every
        {
            // A failed periodic commit is retried at the next interval.
            if let Err(e) = self.commit().await {
                tracing::warn!(error = %e, "auto-commit failed");
            }
        }
        let deadline = Instant::now() + timeout;
        loop {
            let got = match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(got)) => got,
                Ok(None) | Err(_) => return Ok(Vec::new()),
            };
            let (epoch, tp, result) = got;
            if epoch != self.epoch {
                continue;
            }
            let fetched = result?;
            self.high_watermarks
                .insert(tp.clone(), fetched.high_watermark);
            let Some(pos) = self.positions.get_mut(&tp) else {
                continue;
            };
            let records: Vec<ConsumerRecord> = fetched
                .records
                .into_iter()
                .filter(|r| r.offset >= *pos)
                .collect();
            // Past the batches returned, also where compaction left no record.
            *pos = (*pos).max(fetched.next);
            if !records.is_empty() {
                return Ok(records);
            }
            if Instant::now() >= deadline {
                return Ok(Vec::new());
            }
        }
    }

    /// Commits the positions of the assigned partitions (those that moved since the last
    /// commit).
    pub async fn commit(&mut self) -> Result<(), ClientError> {
        let group = self.group()?;
        self.last_commit = Instant::now();
        let offsets: Vec<gpb::TopicPartitionOffset> = self
            .positions
            .iter()
            .filter(|(tp, o)| self.committed.get(*tp) != Some(*o))
            .map(|((t, p), o)| gpb::TopicPartitionOffset {
                topic: t.clone(),
                partition: *p,
                offset: *o as i64,
                metadata: String::new(),
            })
            .collect();
        if offsets.is_empty() {
            return Ok(());
        }
        let (generation, member_id) = if self.topics.is_empty() {
            (-1, String::new())
        } else {
            (self.generation(), self.member_id())
        };
        let coordinator = self.coordinator().await?;
        let request = gpb::OffsetCommitRequest {
            group,
            generation,
            member_id,
            offsets: offsets.clone(),
        };
        let result = coordinator
            .call(|mut c| {
                let request = request.clone();
                async move { c.offset_commit(request).await }
            })
            .await;
        if let Err(e) = &result {
            self.note_refusal(e);
        }
        result?;
        for o in offsets {
            self.committed
                .insert((o.topic, o.partition), o.offset as u64);
        }
        Ok(())
    }

    fn note_refusal(&self, e: &ClientError) {
        match e.code() {
            Some("UNKNOWN_MEMBER_ID") => {
                self.membership.set_member_id("");
                self.membership.refused.store(
                    i64::from(self.membership.generation.load(Ordering::SeqCst)),
                    Ordering::SeqCst,
                );
            }
            Some("ILLEGAL_GENERATION" | "REBALANCE_IN_PROGRESS") => {
                self.membership.refused.store(
                    i64::from(self.membership.generation.load(Ordering::SeqCst)),
                    Ordering::SeqCst,
                );
            }
            _ => {}
        }
    }

    /// Commits (with auto-commit) and leaves the group.
    pub async fn close(mut self) -> Result<(), ClientError> {
        for f in self.fetchers.drain(..) {
            f.abort();
        }
        if let Some(h) = self.heartbeat.take() {
            h.abort();
        }
        if self.config.group.is_none() {
            return Ok(());
        }
        let committed = if self.config.auto_commit.is_some() {
            self.commit().await
        } else {
            Ok(())
        };
        if !self.topics.is_empty() && !self.member_id().is_empty() {
            let coordinator = self.coordinator().await?;
            let request = gpb::LeaveGroupRequest {
                group: self.group()?,
                member_id: self.member_id(),
            };
            let left = coordinator
                .call(|mut c| {
                    let request = request.clone();
                    async move { c.leave_group(request).await }
                })
                .await;
            if let Err(e) = left
                && e.code() != Some("UNKNOWN_MEMBER_ID")
            {
                return Err(e);
            }
        }
        committed
    }

    /// Joins (or rejoins) the group and takes up the new assignment.
    async fn rejoin(&mut self) -> Result<(), ClientError> {
        if self.generation() > 0 && self.config.auto_commit.is_some() {
            // Before giving partitions up (the generation may still be accepted).
            if let Err(e) = self.commit().await {
                tracing::debug!(error = %e, "commit before rejoining failed");
            }
        }
        for f in self.fetchers.drain(..) {
            f.abort();
        }
        self.epoch += 1;
        let group = self.group()?;
        let coordinator = self.coordinator().await?;
        let deadline = Instant::now() + self.config.rebalance_timeout * 2;
        loop {
            if Instant::now() > deadline {
                return Err(ClientError::Refused {
                    code: "REBALANCE_IN_PROGRESS".into(),
                    message: format!("could not join group {group} in time"),
                });
            }
            match self.join_and_sync(&coordinator, &group).await {
                Ok(assignment) => {
                    self.assignment = assignment;
                    break;
                }
                Err(e)
                    if matches!(
                        e.code(),
                        Some("UNKNOWN_MEMBER_ID" | "ILLEGAL_GENERATION" | "REBALANCE_IN_PROGRESS")
                    ) =>
                {
                    if e.code() == Some("UNKNOWN_MEMBER_ID") {
                        self.membership.set_member_id("");
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => return Err(e),
            }
        }
        // Start from the committed offsets (or the reset policy).
        let wanted: Vec<gpb::TopicPartition> = self
            .assignment
            .iter()
            .map(|(t, p)| gpb::TopicPartition {
                topic: t.clone(),
                partition: *p,
            })
            .collect();
        let request = gpb::OffsetFetchRequest {
            group: group.clone(),
            partitions: wanted,
        };
        let fetched = coordinator
            .call(|mut c| {
                let request = request.clone();
                async move { c.offset_fetch(request).await }
            })
            .await?;
        self.positions.clear();
        self.committed.clear();
        for o in fetched.offsets {
            let tp = (o.topic.clone(), o.partition);
            let pos = if o.offset >= 0 {
                self.committed.insert(tp.clone(), o.offset as u64);
                o.offset as u64
            } else {
                self.reset_position(&tp).await?
            };
            self.positions.insert(tp, pos);
        }
        self.last_commit = Instant::now();
        self.start_heartbeat(coordinator, group);
        tracing::info!(
            member = %self.member_id(),
            generation = self.generation(),
            assignment = ?self.assignment,
            "joined the group"
        );
        self.restart_fetchers().await
    }

    async fn reset_position(&mut self, tp: &Tp) -> Result<u64, ClientError> {
        let spec = match self.config.reset {
            OffsetReset::Earliest => pb::OffsetSpec::Earliest,
            OffsetReset::Latest => pb::OffsetSpec::Latest,
            OffsetReset::None => {
                return Err(ClientError::Refused {
                    code: "NO_OFFSET".into(),
                    message: format!(
                        "{}/{} has no committed offset and no reset policy",
                        tp.0, tp.1
                    ),
                });
            }
        };
        let router = self.router(&tp.0).await?;
        Ok(router.list_offset(tp.1, spec, 0).await?.0)
    }

    async fn join_and_sync(
        &mut self,
        coordinator: &Coordinator,
        group: &str,
    ) -> Result<Vec<Tp>, ClientError> {
        let subscription = encode_subscription(&Subscription {
            topics: self.topics.clone(),
            owned: self.assignment.clone(),
        })?;
        let request = gpb::JoinGroupRequest {
            group: group.to_string(),
            member_id: self.member_id(),
            protocol_type: PROTOCOL_TYPE.to_string(),
            protocols: vec![gpb::Protocol {
                name: self.config.assignor.name().to_string(),
                metadata: subscription.to_vec(),
            }],
            session_timeout_ms: self.config.session_timeout.as_millis() as u32,
            rebalance_timeout_ms: self.config.rebalance_timeout.as_millis() as u32,
            client_id: self.config.client_id.clone(),
        };
        let joined = coordinator
            .call(|mut c| {
                let request = request.clone();
                async move { c.join_group(request).await }
            })
            .await?;
        self.membership.set_member_id(&joined.member_id);
        self.membership
            .generation
            .store(joined.generation, Ordering::SeqCst);
        let assignments = if joined.leader == joined.member_id {
            self.leader_assign(&joined).await?
        } else {
            Vec::new()
        };
        let request = gpb::SyncGroupRequest {
            group: group.to_string(),
            generation: joined.generation,
            member_id: joined.member_id.clone(),
            assignments,
        };
        let synced = coordinator
            .call(|mut c| {
                let request = request.clone();
                async move { c.sync_group(request).await }
            })
            .await?;
        decode_assignment(Bytes::from(synced.assignment))
    }

    /// The leader's job: everyone's assignment.
    async fn leader_assign(
        &mut self,
        joined: &gpb::JoinGroupReply,
    ) -> Result<Vec<gpb::MemberAssignment>, ClientError> {
        let assignor = Assignor::from_name(&joined.protocol).unwrap_or(self.config.assignor);
        let mut members = BTreeMap::new();
        for m in &joined.members {
            members.insert(
                m.member_id.clone(),
                decode_subscription(Bytes::from(m.metadata.clone()))?,
            );
        }
        let mut counts = HashMap::new();
        let topics: std::collections::BTreeSet<String> = members
            .values()
            .flat_map(|s: &Subscription| s.topics.clone())
            .collect();
        for t in topics {
            match Router::new(&self.admin, &t, false).await {
                Ok(r) => {
                    counts.insert(t.clone(), r.partitions());
                    self.routers.insert(t, r);
                }
                // A topic that does not exist yet gets no partitions.
                Err(ClientError::UnknownTopic(_)) => {}
                Err(e) => return Err(e),
            }
        }
        let plan = assign(assignor, &members, &counts);
        plan.into_iter()
            .map(|(member_id, parts)| {
                Ok(gpb::MemberAssignment {
                    member_id,
                    assignment: encode_assignment(&parts)?.to_vec(),
                })
            })
            .collect()
    }

    fn start_heartbeat(&mut self, coordinator: Coordinator, group: String) {
        if let Some(h) = self.heartbeat.take() {
            h.abort();
        }
        let membership = Arc::clone(&self.membership);
        let every = self.config.heartbeat_interval;
        self.heartbeat = Some(tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let generation = membership.generation.load(Ordering::SeqCst);
                let request = gpb::HeartbeatRequest {
                    group: group.clone(),
                    generation,
                    member_id: membership.member_id(),
                };
                let result = coordinator
                    .router
                    .try_leader(
                        coordinator.partition,
                        super::router::ATTEMPT_TIMEOUT,
                        |ch| {
                            let request = request.clone();
                            async move { GroupsClient::new(ch).heartbeat(request).await }
                        },
                    )
                    .await;
                if let Err(status) = result {
                    match error_code(&status) {
                        Some(
                            "UNKNOWN_MEMBER_ID" | "ILLEGAL_GENERATION" | "REBALANCE_IN_PROGRESS",
                        ) => {
                            membership
                                .refused
                                .store(i64::from(generation), Ordering::SeqCst);
                        }
                        _ if retriable(&status) => {}
                        _ => tracing::warn!(error = %status.message(), "heartbeat refused"),
                    }
                }
            }
        }));
    }

    async fn restart_fetchers(&mut self) -> Result<(), ClientError> {
        for f in self.fetchers.drain(..) {
            f.abort();
        }
        self.epoch += 1;
        // Drop what the old fetchers left (their epoch no longer matches anyway).
        while self.rx.try_recv().is_ok() {}
        for tp in self.assignment.clone() {
            let Some(&start) = self.positions.get(&tp) else {
                continue;
            };
            let router = self.router(&tp.0).await?;
            let tx = self.tx.clone();
            let epoch = self.epoch;
            let max_wait = self.config.max_wait;
            let max_bytes = self.config.fetch_max_bytes;
            let reset = self.config.reset;
            self.fetchers.push(tokio::spawn(async move {
                let mut offset = start;
                loop {
                    let result = router.fetch(tp.1, offset, max_bytes, max_wait).await;
                    match &result {
                        Ok(f) => offset = offset.max(f.next),
                        Err(e)
                            if e.code() == Some("OFFSET_OUT_OF_RANGE")
                                && reset != OffsetReset::None =>
                        {
                            let spec = if reset == OffsetReset::Earliest {
                                pb::OffsetSpec::Earliest
                            } else {
                                pb::OffsetSpec::Latest
                            };
                            if let Ok((o, _)) = router.list_offset(tp.1, spec, 0).await {
                                tracing::warn!(topic = %tp.0, partition = tp.1, from = offset, to = o, "offset out of range: reset");
                                offset = o;
                                continue;
                            }
                        }
                        Err(_) => {}
                    }
                    let failed = result.is_err();
                    if tx.send((epoch, tp.clone(), result)).await.is_err() {
                        return;
                    }
                    if failed {
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
            }));
        }
        Ok(())
    }
}
