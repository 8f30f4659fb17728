//! Topic administration: create, delete, alter configs, add partitions, and the auto-create
//! of DESIGN.md §5b, callable on any node.
//!
//! The work is done by the metadata leader (validation, replica placement on the members it
//! hears from, one metadata command). On any other node the call is forwarded to the leader
//! over the cluster API (`aqueduct.cluster.v1.Cluster`), whose handler runs the leader's
//! path of this same module, and redirects are followed until [`FORWARD_TIMEOUT`].

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use aqueduct_protocol::cluster as pb;
use aqueduct_protocol::cluster::cluster_client::ClusterClient;
use aqueduct_raft::network::Channels;
use aqueduct_raft::state_machine::TopicRecord;
use aqueduct_raft::types::{DEFAULT_APPLICATION, MetaCommand, SYSTEM_TOPIC_PREFIX};
use tokio::time::Instant;

use super::config::TopicConfig;
use super::controller::{Controller, LIVENESS_TIMEOUT};
use super::error::{BrokerError, BrokerResult, ErrorCode, Redirect};
use super::{OFFSETS_PARTITIONS, OFFSETS_TOPIC};

/// Longest a forwarded admin call keeps following redirects and retrying.
pub const FORWARD_TIMEOUT: Duration = Duration::from_secs(10);

/// Spreads `partitions × rf` replicas over `nodes` (sorted ids): partition p starts at node
/// `(p + first) mod n` and takes the next `rf` nodes, so replicas and preferred leaders are
/// balanced.
pub fn assign_replicas(nodes: &[u64], partitions: u32, rf: usize) -> Vec<Vec<u64>> {
    assign_from(nodes, 0, partitions, rf)
}

fn assign_from(nodes: &[u64], first: u32, count: u32, rf: usize) -> Vec<Vec<u64>> {
    (first as usize..(first + count) as usize)
        .map(|p| (0..rf).map(|r| nodes[(p + r) % nodes.len()]).collect())
        .collect()
}

/// A topic as the broker reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicInfo {
    pub record: TopicRecord,
    /// Each partition's replicas, the first the preferred leader (a partition whose
    /// assignment is not recorded is left out).
    pub assignment: Vec<(u32, Vec<u64>)>,
}

/// What a new topic should be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewTopic {
    pub name: String,
    pub partitions: u32,
    /// `None`: the cluster default, min(3, available nodes).
    pub replication_factor: Option<u16>,
    pub configs: BTreeMap<String, String>,
    /// The caller's id for the request (0: none); a repeat after success is not an error.
    pub request_id: u64,
    pub application: String,
}

impl NewTopic {
    pub fn new(name: &str, partitions: u32) -> Self {
        Self {
            name: name.to_string(),
            partitions,
            replication_factor: None,
            configs: BTreeMap::new(),
            request_id: 0,
            application: DEFAULT_APPLICATION.to_string(),
        }
    }
}

/// A change to a topic.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TopicChange {
    pub set: BTreeMap<String, String>,
    pub delete: Vec<String>,
    /// Grow to this many partitions.
    pub partitions: Option<u32>,
}

/// Topic administration on this node (cheap to clone).
#[derive(Debug, Clone)]
pub struct TopicAdmin {
    controller: Controller,
    channels: Channels,
    settings: Arc<TopicSettings>,
}

/// Cluster-wide topic defaults.
#[derive(Debug, Clone)]
pub struct TopicSettings {
    /// Whether unknown topics are created on first use (DESIGN.md §5b).
    pub auto_create: bool,
    /// `segment.bytes` of `__consumer_offsets` when it is created.
    pub offsets_segment_bytes: u64,
}

impl Default for TopicSettings {
    fn default() -> Self {
        Self {
            auto_create: true,
            offsets_segment_bytes: 100 << 20,
        }
    }
}

impl TopicAdmin {
    pub fn new(controller: Controller, channels: Channels, settings: TopicSettings) -> Self {
        Self {
            controller,
            channels,
            settings: Arc::new(settings),
        }
    }

    pub fn controller(&self) -> &Controller {
        &self.controller
    }

    pub fn auto_create(&self) -> bool {
        self.settings.auto_create
    }

    /// The topic as applied on this node, with its assignment.
    pub fn topic(&self, name: &str) -> BrokerResult<Option<TopicInfo>> {
        let sm = self.controller.state();
        let Some(record) = sm
            .topic(name)
            .map_err(|e| BrokerError::internal("read topic", e))?
        else {
            return Ok(None);
        };
        self.info(record).map(Some)
    }

    /// Every topic as applied on this node.
    pub fn topics(&self) -> BrokerResult<Vec<TopicInfo>> {
        let records = self
            .controller
            .state()
            .topics()
            .map_err(|e| BrokerError::internal("read topics", e))?;
        records.into_iter().map(|r| self.info(r)).collect()
    }

    fn info(&self, record: TopicRecord) -> BrokerResult<TopicInfo> {
        let sm = self.controller.state();
        let mut assignment = Vec::new();
        for p in 0..record.partitions {
            if let Some(replicas) = sm
                .replicas(&record.name, p)
                .map_err(|e| BrokerError::internal("read assignment", e))?
            {
                assignment.push((p, replicas));
            }
        }
        Ok(TopicInfo { record, assignment })
    }

    fn require_topic(&self, name: &str) -> BrokerResult<TopicInfo> {
        self.topic(name)?
            .ok_or_else(|| BrokerError::unknown_topic(name))
    }

    // ----- the metadata leader's side -----

    /// Creates a topic on the metadata leader; `system` allows the reserved names.
    pub async fn create_on_leader(
        &self,
        req: NewTopic,
        system: bool,
        validate_only: bool,
    ) -> BrokerResult<TopicInfo> {
        if let Some(problem) = aqueduct_raft::types::topic_name_problem(&req.name, system) {
            return Err(BrokerError::new(ErrorCode::InvalidTopicName, problem));
        }
        let m = self.controller.require_leader()?;
        let members = m.membership_config.membership().nodes().count();
        let nodes = self.controller.placeable_nodes(&m);
        let rf = match req.replication_factor {
            Some(rf) => usize::from(rf),
            None => nodes.len().clamp(1, 3),
        };
        if let Some(problem) = aqueduct_raft::types::topic_shape_problem(req.partitions, rf as u64)
        {
            return Err(BrokerError::new(ErrorCode::InvalidPartitions, problem));
        }
        TopicConfig::check(&req.configs)?;
        if rf == 0 || rf > nodes.len() {
            return Err(BrokerError::new(
                ErrorCode::InvalidReplicationFactor,
                format!(
                    "replication factor {rf} is not possible with {} available node(s) \
                     ({members} member(s), the others not heard from for {} s)",
                    nodes.len(),
                    LIVENESS_TIMEOUT.as_secs()
                ),
            ));
        }
        if validate_only {
            if self.topic(&req.name)?.is_some() {
                return Err(BrokerError::new(
                    ErrorCode::TopicExists,
                    format!("topic {} already exists", req.name),
                ));
            }
            let record = TopicRecord {
                name: req.name,
                partitions: req.partitions,
                replication_factor: rf as u16,
                configs: req.configs,
                request_id: req.request_id,
                id: 0,
                application: req.application,
            };
            let assignment = assign_replicas(&nodes, record.partitions, rf)
                .into_iter()
                .enumerate()
                .map(|(p, r)| (p as u32, r))
                .collect();
            return Ok(TopicInfo { record, assignment });
        }
        let application = if req.application.is_empty() {
            DEFAULT_APPLICATION.to_string()
        } else {
            req.application
        };
        self.controller
            .propose(MetaCommand::CreateTopic {
                name: req.name.clone(),
                partitions: req.partitions,
                replication_factor: rf as u16,
                configs: req.configs,
                assignment: assign_replicas(&nodes, req.partitions, rf),
                request_id: req.request_id,
                application,
            })
            .await?;
        self.topic(&req.name)?
            .ok_or_else(|| BrokerError::internal("read topic", "created topic is missing"))
    }

    /// Deletes a topic on the metadata leader.
    pub async fn delete_on_leader(&self, name: &str) -> BrokerResult<()> {
        if let Some(problem) = aqueduct_raft::types::topic_name_problem(name, false) {
            return Err(BrokerError::new(ErrorCode::InvalidTopicName, problem));
        }
        self.controller.require_leader()?;
        self.controller
            .propose(MetaCommand::DeleteTopic {
                name: name.to_string(),
            })
            .await
    }

    /// Alters a topic's configs and (when asked) grows its partition count, on the metadata
    /// leader.
    pub async fn alter_on_leader(
        &self,
        name: &str,
        change: TopicChange,
        validate_only: bool,
    ) -> BrokerResult<TopicInfo> {
        TopicConfig::check(&change.set)?;
        for k in &change.delete {
            TopicConfig::check_key(k)?;
        }
        let m = self.controller.require_leader()?;
        let topic = self.require_topic(name)?;
        let grow = match change.partitions {
            Some(n) if n < topic.record.partitions => {
                return Err(BrokerError::new(
                    ErrorCode::InvalidPartitions,
                    format!(
                        "topic {name} has {} partitions; partitions cannot be removed",
                        topic.record.partitions
                    ),
                ));
            }
            Some(n) if n > topic.record.partitions => {
                if let Some(problem) = aqueduct_raft::types::topic_shape_problem(
                    n,
                    u64::from(topic.record.replication_factor),
                ) {
                    return Err(BrokerError::new(ErrorCode::InvalidPartitions, problem));
                }
                Some(n)
            }
            Some(n) if !validate_only && change.set.is_empty() && change.delete.is_empty() => {
                return Err(BrokerError::new(
                    ErrorCode::InvalidPartitions,
                    format!("topic {name} already has {n} partitions"),
                ));
            }
            _ => None,
        };
        let assignment = match grow {
            Some(n) => {
                let nodes = self.controller.placeable_nodes(&m);
                let rf = usize::from(topic.record.replication_factor);
                if rf > nodes.len() {
                    return Err(BrokerError::new(
                        ErrorCode::InvalidReplicationFactor,
                        format!(
                            "replication factor {rf} is not possible with {} available node(s)",
                            nodes.len()
                        ),
                    ));
                }
                let have = topic.record.partitions;
                assign_from(&nodes, have, n - have, rf)
            }
            None => Vec::new(),
        };
        if validate_only {
            return Ok(topic);
        }
        if !change.set.is_empty() || !change.delete.is_empty() {
            self.controller
                .propose(MetaCommand::AlterTopicConfigs {
                    name: name.to_string(),
                    set: change.set,
                    delete: change.delete,
                })
                .await?;
        }
        if !assignment.is_empty() {
            self.controller
                .propose(MetaCommand::AddPartitions {
                    name: name.to_string(),
                    assignment,
                })
                .await?;
        }
        self.require_topic(name)
    }

    /// The topic, created first when it does not exist and auto-create is on (or it is the
    /// consumer groups' topic), on the metadata leader; also says whether it was created.
    pub async fn ensure_on_leader(&self, name: &str) -> BrokerResult<(TopicInfo, bool)> {
        self.controller.require_leader()?;
        if let Some(t) = self.topic(name)? {
            return Ok((t, false));
        }
        // The consumer groups' topic is created on first use, whatever auto-create says
        // (as Kafka does), with its fixed partition count; retention never deletes from it.
        let system = name == OFFSETS_TOPIC;
        if !self.settings.auto_create && !system {
            return Err(BrokerError::new(
                ErrorCode::UnknownTopicOrPartition,
                format!("topic {name} does not exist (auto-create is off)"),
            ));
        }
        let mut req = NewTopic::new(name, 1);
        if system {
            req.partitions = OFFSETS_PARTITIONS;
            req.configs = [
                ("cleanup.policy".to_string(), "compact".to_string()),
                // Kafka's offsets.topic.segment.bytes.
                (
                    "segment.bytes".to_string(),
                    self.settings.offsets_segment_bytes.to_string(),
                ),
            ]
            .into();
        }
        tracing::info!(topic = %name, "auto-creating topic");
        match self.create_on_leader(req, system, false).await {
            Ok(t) => Ok((t, true)),
            // Created by someone else meanwhile.
            Err(e) if e.code == ErrorCode::TopicExists => Err(BrokerError::new(
                ErrorCode::TryAgain,
                "topic was just created; retry",
            )),
            Err(e) => Err(e),
        }
    }

    // ----- any node: done here on the leader, forwarded elsewhere -----

    /// Runs `local` when this node leads the metadata group, else `remote` against the
    /// leader's cluster API, following redirects and retrying retriable refusals until
    /// [`FORWARD_TIMEOUT`].
    async fn routed<T, L, LF, R, RF>(&self, local: L, remote: R) -> BrokerResult<T>
    where
        L: Fn() -> LF,
        LF: Future<Output = BrokerResult<T>>,
        R: Fn(ClusterClient<tonic::transport::Channel>) -> RF,
        RF: Future<Output = Result<T, tonic::Status>>,
    {
        let deadline = Instant::now() + FORWARD_TIMEOUT;
        let mut redirect: Option<String> = None;
        loop {
            let outcome = if self.controller.leads() {
                local().await
            } else {
                let addr = redirect
                    .take()
                    .or_else(|| self.controller.leader().map(|l| l.1));
                match addr {
                    None => Err(super::controller::not_controller(None)),
                    Some(addr) => match self.channels.get(&addr) {
                        Ok(channel) => {
                            let call = remote(ClusterClient::new(channel));
                            match tokio::time::timeout_at(deadline, call).await {
                                Ok(Ok(v)) => Ok(v),
                                Ok(Err(status)) => Err(super::forward::from_status(&status)),
                                Err(_) => Err(BrokerError::new(
                                    ErrorCode::NotController,
                                    "the metadata leader did not answer in time",
                                )),
                            }
                        }
                        Err(e) => Err(BrokerError::new(
                            ErrorCode::NotController,
                            format!("cannot reach the metadata leader at {addr}: {e}"),
                        )),
                    },
                }
            };
            match outcome {
                Err(e) if e.code.retriable() && Instant::now() < deadline => {
                    if let Redirect::Leader { addr, .. } = &e.redirect {
                        redirect = Some(addr.clone());
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                other => return other,
            }
        }
    }

    /// Creates a topic (from any node).
    pub async fn create(&self, req: NewTopic, validate_only: bool) -> BrokerResult<TopicInfo> {
        self.create_routed(req, false, validate_only).await
    }

    /// Creates a topic on the metadata leader, from any node; `system` allows the reserved
    /// `aq.` names (the leader honours it for those only).
    async fn create_routed(
        &self,
        req: NewTopic,
        system: bool,
        validate_only: bool,
    ) -> BrokerResult<TopicInfo> {
        let local = || self.create_on_leader(req.clone(), system, validate_only);
        let remote = |mut c: ClusterClient<tonic::transport::Channel>| {
            let request = pb::CreateTopicRequest {
                name: req.name.clone(),
                partitions: req.partitions,
                replication_factor: req.replication_factor.map_or(0, u32::from),
                configs: req.configs.clone().into_iter().collect(),
                request_id: req.request_id,
                application: req.application.clone(),
                validate_only,
                system,
            };
            let admin = self.clone();
            async move {
                let reply = c.create_topic(request).await?.into_inner();
                admin.from_pb(reply.topic.unwrap_or_default())
            }
        };
        self.routed(local, remote).await
    }

    /// Deletes a topic (from any node).
    pub async fn delete(&self, name: &str) -> BrokerResult<()> {
        let local = || self.delete_on_leader(name);
        let remote = |mut c: ClusterClient<tonic::transport::Channel>| {
            let request = pb::DeleteTopicRequest {
                name: name.to_string(),
            };
            async move { c.delete_topic(request).await.map(|_| ()) }
        };
        self.routed(local, remote).await
    }

    /// Alters a topic (from any node).
    pub async fn alter(
        &self,
        name: &str,
        change: TopicChange,
        validate_only: bool,
    ) -> BrokerResult<TopicInfo> {
        let local = || self.alter_on_leader(name, change.clone(), validate_only);
        let remote = |mut c: ClusterClient<tonic::transport::Channel>| {
            let request = pb::AlterTopicRequest {
                name: name.to_string(),
                set: change.set.clone().into_iter().collect(),
                delete: change.delete.clone(),
                partitions: change.partitions.unwrap_or(0),
                validate_only,
            };
            let admin = self.clone();
            async move {
                let reply = c.alter_topic(request).await?.into_inner();
                admin.from_pb(reply.topic.unwrap_or_default())
            }
        };
        self.routed(local, remote).await
    }

    /// The topic, auto-created when the cluster does that (from any node).
    pub async fn ensure(&self, name: &str) -> BrokerResult<TopicInfo> {
        if let Some(t) = self.topic(name)? {
            return Ok(t);
        }
        let local = || async { self.ensure_on_leader(name).await.map(|t| t.0) };
        let remote = |mut c: ClusterClient<tonic::transport::Channel>| {
            let request = pb::EnsureTopicRequest {
                name: name.to_string(),
            };
            let admin = self.clone();
            async move {
                let reply = c.ensure_topic(request).await?.into_inner();
                admin.from_pb(reply.topic.unwrap_or_default())
            }
        };
        self.routed(local, remote).await
    }

    /// A reserved `aq.` system topic (telemetry, device events), created on first use with
    /// the shape given (`None`: the cluster's default replication), from any node.
    pub async fn ensure_system(
        &self,
        name: &str,
        partitions: u32,
        replication_factor: Option<u16>,
    ) -> BrokerResult<TopicInfo> {
        self.ensure_system_with(name, partitions, replication_factor, &[])
            .await
    }

    /// [`Self::ensure_system`] with topic configs (e.g. `cleanup.policy=compact`) for the
    /// topic it creates.
    pub async fn ensure_system_with(
        &self,
        name: &str,
        partitions: u32,
        replication_factor: Option<u16>,
        configs: &[(&str, &str)],
    ) -> BrokerResult<TopicInfo> {
        if !name.starts_with(SYSTEM_TOPIC_PREFIX) {
            return Err(BrokerError::new(
                ErrorCode::InvalidTopicName,
                format!("{name} is not a system topic (they start with {SYSTEM_TOPIC_PREFIX})"),
            ));
        }
        if let Some(t) = self.topic(name)? {
            return Ok(t);
        }
        let mut req = NewTopic::new(name, partitions);
        req.replication_factor = replication_factor;
        req.configs = configs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        tracing::info!(topic = %name, partitions, "creating a system topic on first use");
        match self.create_routed(req, true, false).await {
            // Created meanwhile by another node's first use: wait until it is applied here.
            Err(e) if e.code == ErrorCode::TopicExists => {
                let deadline = Instant::now() + FORWARD_TIMEOUT;
                loop {
                    if let Some(t) = self.topic(name)? {
                        return Ok(t);
                    }
                    if Instant::now() >= deadline {
                        return Err(e);
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            other => other,
        }
    }

    /// A topic as the cluster API sends it, back in the broker's terms.
    #[allow(clippy::wrong_self_convention)]
    fn from_pb(&self, t: pb::Topic) -> Result<TopicInfo, tonic::Status> {
        Ok(TopicInfo {
            record: TopicRecord {
                name: t.name,
                partitions: t.partitions,
                replication_factor: t.replication_factor as u16,
                configs: t.configs.into_iter().collect(),
                request_id: 0,
                id: t.id,
                application: t.application,
            },
            assignment: t
                .assignment
                .into_iter()
                .map(|a| (a.partition, a.replicas))
                .collect(),
        })
    }
}

/// A topic in the cluster API's terms.
pub fn topic_to_pb(t: TopicInfo) -> pb::Topic {
    pb::Topic {
        name: t.record.name,
        partitions: t.record.partitions,
        replication_factor: u32::from(t.record.replication_factor),
        configs: t.record.configs.into_iter().collect(),
        assignment: t
            .assignment
            .into_iter()
            .map(|(partition, replicas)| pb::PartitionAssignment {
                partition,
                replicas,
            })
            .collect(),
        application: t.record.application,
        id: t.record.id,
    }
}
