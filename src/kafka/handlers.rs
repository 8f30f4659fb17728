//! One handler per Kafka API, each a translation between Kafka's messages and broker calls.
//!
//! Conventions: errors are per topic or partition where the API has a place for them,
//! `throttle_time_ms` is always 0, and a topic is known by name (topic ids, where a version
//! carries them, are derived from the topic's id in the metadata log).

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::join_all;
use kafka_protocol::messages::*;
use kafka_protocol::protocol::{Encodable, HeaderVersion, StrBytes};

use super::Reply;
use super::codec::{self, Body, code, kafka_code};
use crate::broker::config::{KNOWN_KEYS, TopicConfig};
use crate::broker::groups::Coordinator;
use crate::broker::topics::{NewTopic, TopicChange, TopicInfo};
use crate::broker::{
    Acks, Broker, BrokerError, ClusterView, ErrorCode, FetchRequest as BrokerFetch, OffsetSpec,
    ProduceRequest as BrokerProduce,
};

/// Longest long poll a fetch may ask for.
const MAX_FETCH_WAIT: Duration = Duration::from_secs(30);
/// Kafka's resource types (DescribeConfigs, AlterConfigs).
const RESOURCE_TOPIC: i8 = 2;
const RESOURCE_BROKER: i8 = 4;
/// Kafka's config sources.
const SOURCE_TOPIC: i8 = 1;
const SOURCE_DEFAULT: i8 = 5;

/// The Kafka topic id of a topic: its metadata-log id in a fixed namespace.
pub fn topic_uuid(id: u64) -> uuid::Uuid {
    uuid::Uuid::from_u64_pair(0x6171_7565_6475_6374, id)
}

/// The request header's client id.
fn client_id(h: &RequestHeader) -> String {
    h.client_id
        .as_ref()
        .map(|c| c.to_string())
        .unwrap_or_default()
}

pub(super) fn s(v: &str) -> StrBytes {
    StrBytes::from_string(v.to_string())
}

pub(super) fn name(v: &str) -> TopicName {
    TopicName(s(v))
}

pub(super) fn message(e: &BrokerError) -> Option<StrBytes> {
    Some(s(&e.message))
}

/// Splits `HOST:PORT` (IPv6 hosts in brackets).
pub(super) fn host_port(addr: &str) -> Option<(String, i32)> {
    let (host, port) = addr.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    Some((host.to_string(), port.parse().ok()?))
}

/// The handlers of one connection (cheap to clone).
#[derive(Clone)]
pub(crate) struct Handlers {
    pub(super) broker: Broker,
    pub(super) coordinator: Coordinator,
    /// The client's address (group members' `host`).
    pub(super) peer: std::net::SocketAddr,
}

impl Handlers {
    pub(crate) fn new(coordinator: Coordinator, peer: std::net::SocketAddr) -> Self {
        Self {
            broker: coordinator.broker().clone(),
            coordinator,
            peer,
        }
    }

    /// Handles one decoded request.
    pub(crate) async fn handle(self, req: codec::Request) -> Reply {
        let v = req.header.request_api_version;
        let id = req.header.correlation_id;
        match req.body {
            Body::ApiVersions(_) => reply(id, v, &codec::api_versions(code::NONE)),
            Body::Metadata(r) => reply(id, v, &self.metadata(r, v).await),
            Body::Produce(r) => {
                let acks = r.acks;
                let response = self.produce(r, v).await;
                if acks == 0 {
                    Reply::None
                } else {
                    reply(id, v, &response)
                }
            }
            Body::Fetch(r) => reply(id, v, &self.fetch(r, v).await),
            Body::ListOffsets(r) => reply(id, v, &self.list_offsets(r, v)),
            Body::CreateTopics(r) => reply(id, v, &self.create_topics(r, v).await),
            Body::DeleteTopics(r) => reply(id, v, &self.delete_topics(r, v).await),
            Body::CreatePartitions(r) => reply(id, v, &self.create_partitions(r).await),
            Body::DescribeConfigs(r) => reply(id, v, &self.describe_configs(r, v)),
            Body::AlterConfigs(r) => reply(id, v, &self.alter_configs(r).await),
            Body::IncrementalAlterConfigs(r) => {
                reply(id, v, &self.incremental_alter_configs(r).await)
            }
            Body::DescribeCluster(_) => reply(id, v, &self.describe_cluster()),
            Body::FindCoordinator(r) => reply(id, v, &self.find_coordinator(r, v).await),
            Body::JoinGroup(r) => {
                let client = client_id(&req.header);
                reply(id, v, &self.join_group(r, v, client).await)
            }
            Body::SyncGroup(r) => reply(id, v, &self.sync_group(r, v).await),
            Body::Heartbeat(r) => reply(id, v, &self.heartbeat(r).await),
            Body::LeaveGroup(r) => reply(id, v, &self.leave_group(r, v).await),
            Body::OffsetCommit(r) => reply(id, v, &self.offset_commit(r).await),
            Body::OffsetFetch(r) => reply(id, v, &self.offset_fetch(r, v).await),
            Body::DescribeGroups(r) => reply(id, v, &self.describe_groups(r, v).await),
            Body::ListGroups(r) => reply(id, v, &self.list_groups(r).await),
            Body::DeleteGroups(r) => reply(id, v, &self.delete_groups(r).await),
            Body::OffsetDelete(r) => reply(id, v, &self.offset_delete(r).await),
            Body::InitProducerId(r) => reply(id, v, &self.init_producer_id(r).await),
            Body::DeleteRecords(r) => reply(id, v, &self.delete_records(r).await),
        }
    }

    // ----- Metadata, DescribeCluster -----

    fn brokers(&self, view: &ClusterView) -> Vec<(i32, String, i32)> {
        view.nodes
            .iter()
            .filter_map(|n| {
                let addr = n.listeners.get("kafka")?;
                let (host, port) = host_port(addr)?;
                Some((n.id as i32, host, port))
            })
            .collect()
    }

    async fn metadata(&self, req: MetadataRequest, version: i16) -> MetadataResponse {
        // v0: an empty list means every topic; v1+: null means every topic.
        let wanted: Option<Vec<String>> = match &req.topics {
            None => None,
            Some(ts) if ts.is_empty() && version == 0 => None,
            Some(ts) => Some(self.requested_names(ts)),
        };
        let auto = version < 4 || req.allow_auto_topic_creation;
        let mut errors: HashMap<String, BrokerError> = HashMap::new();
        if let Some(names) = &wanted {
            let missing: Vec<&String> = names
                .iter()
                .filter(|n| !n.is_empty())
                .filter(|n| matches!(self.broker.topics().topic(n), Ok(None)))
                .collect();
            let ensured = join_all(missing.iter().map(|n| async move {
                if let Some(problem) = aqueduct_raft::types::topic_name_problem(n, false) {
                    return Err(BrokerError::new(ErrorCode::InvalidTopicName, problem));
                }
                if auto && self.broker.topics().auto_create() {
                    self.broker.topics().ensure(n).await.map(|_| ())
                } else {
                    Err(BrokerError::unknown_topic(n))
                }
            }))
            .await;
            for (n, r) in missing.into_iter().zip(ensured) {
                if let Err(e) = r {
                    errors.insert(n.clone(), e);
                }
            }
        }
        let view = match self.broker.metadata(wanted.as_deref()) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(err = %e, "kafka: metadata");
                return MetadataResponse::default();
            }
        };
        let brokers = self
            .brokers(&view)
            .into_iter()
            .map(|(id, host, port)| {
                metadata_response::MetadataResponseBroker::default()
                    .with_node_id(BrokerId(id))
                    .with_host(s(&host))
                    .with_port(port)
            })
            .collect();
        let mut topics: Vec<metadata_response::MetadataResponseTopic> = view
            .topics
            .iter()
            .map(|t| {
                let partitions = t
                    .partitions
                    .iter()
                    .map(|p| {
                        let ids = |v: &[u64]| v.iter().map(|r| BrokerId(*r as i32)).collect();
                        metadata_response::MetadataResponsePartition::default()
                            .with_error_code(if p.leader.is_some() {
                                code::NONE
                            } else {
                                code::LEADER_NOT_AVAILABLE
                            })
                            .with_partition_index(p.partition as i32)
                            .with_leader_id(BrokerId(p.leader.map_or(-1, |l| l as i32)))
                            .with_leader_epoch(if version >= 7 {
                                i32::try_from(p.leader_epoch).unwrap_or(i32::MAX)
                            } else {
                                -1
                            })
                            .with_replica_nodes(ids(&p.replicas))
                            .with_isr_nodes(ids(&p.in_sync))
                    })
                    .collect();
                metadata_response::MetadataResponseTopic::default()
                    .with_name(Some(name(&t.info.record.name)))
                    .with_topic_id(if version >= 10 {
                        topic_uuid(t.info.record.id)
                    } else {
                        uuid::Uuid::nil()
                    })
                    .with_is_internal(t.internal && version >= 1)
                    .with_partitions(partitions)
            })
            .collect();
        if let Some(names) = &wanted {
            for n in names {
                if view.topics.iter().any(|t| &t.info.record.name == n) {
                    continue;
                }
                let error = match errors.get(n) {
                    Some(e) => kafka_code(e.code),
                    // Created just now and not applied here yet.
                    None if !n.is_empty() => code::LEADER_NOT_AVAILABLE,
                    None => code::INVALID_TOPIC_EXCEPTION,
                };
                topics.push(
                    metadata_response::MetadataResponseTopic::default()
                        .with_error_code(error)
                        .with_name(Some(name(n))),
                );
            }
        }
        MetadataResponse::default()
            .with_brokers(brokers)
            .with_cluster_id(view.cluster_id.as_deref().filter(|_| version >= 2).map(s))
            .with_controller_id(BrokerId(if version >= 1 {
                view.controller.map_or(-1, |c| c as i32)
            } else {
                -1
            }))
            .with_topics(topics)
    }

    /// The names a Metadata request asks for (a topic given only by id is looked up).
    fn requested_names(&self, ts: &[metadata_request::MetadataRequestTopic]) -> Vec<String> {
        ts.iter()
            .map(|t| match &t.name {
                Some(n) => n.to_string(),
                None => self.name_of(t.topic_id).unwrap_or_default(),
            })
            .collect()
    }

    /// The name of the topic with this Kafka topic id.
    fn name_of(&self, id: uuid::Uuid) -> Option<String> {
        let (_, local) = id.as_u64_pair();
        self.broker
            .topics()
            .topics()
            .ok()?
            .into_iter()
            .find(|t| t.record.id == local && topic_uuid(t.record.id) == id)
            .map(|t| t.record.name)
    }

    fn describe_cluster(&self) -> DescribeClusterResponse {
        let view = match self.broker.metadata(Some(&[])) {
            Ok(v) => v,
            Err(e) => {
                return DescribeClusterResponse::default()
                    .with_error_code(kafka_code(e.code))
                    .with_error_message(message(&e));
            }
        };
        let brokers = self
            .brokers(&view)
            .into_iter()
            .map(|(id, host, port)| {
                describe_cluster_response::DescribeClusterBroker::default()
                    .with_broker_id(BrokerId(id))
                    .with_host(s(&host))
                    .with_port(port)
            })
            .collect();
        DescribeClusterResponse::default()
            .with_cluster_id(s(view.cluster_id.as_deref().unwrap_or_default()))
            .with_controller_id(BrokerId(view.controller.map_or(-1, |c| c as i32)))
            .with_brokers(brokers)
    }

    // ----- Produce, Fetch, ListOffsets -----

    async fn produce(&self, req: ProduceRequest, version: i16) -> ProduceResponse {
        let acks = match req.acks {
            1 | 0 => Some(Acks::Leader),
            -1 => Some(Acks::All),
            _ => None,
        };
        let timeout = Duration::from_millis(req.timeout_ms.clamp(1, 300_000) as u64);
        let transactional = req.transactional_id.is_some();
        let mut responses = Vec::new();
        for t in req.topic_data {
            let topic = t.name.to_string();
            let results = join_all(t.partition_data.into_iter().map(|p| {
                let topic = topic.clone();
                async move {
                    let out = produce_response::PartitionProduceResponse::default()
                        .with_index(p.index)
                        .with_log_append_time_ms(-1);
                    let fail = |code: i16, why: &str| {
                        out.clone()
                            .with_error_code(code)
                            .with_base_offset(-1)
                            .with_error_message((version >= 8).then(|| s(why)))
                    };
                    let Some(acks) = acks else {
                        return fail(code::INVALID_REQUIRED_ACKS, "acks must be -1, 0 or 1");
                    };
                    if transactional {
                        return fail(
                            code::UNSUPPORTED_FOR_MESSAGE_FORMAT,
                            "transactions are not supported yet",
                        );
                    }
                    let Ok(partition) = u32::try_from(p.index) else {
                        return fail(code::UNKNOWN_TOPIC_OR_PARTITION, "negative partition");
                    };
                    let batch = p.records.unwrap_or_default();
                    let produced = tokio::time::timeout(
                        timeout,
                        self.broker.produce(BrokerProduce {
                            topic,
                            partition,
                            batch,
                            acks,
                        }),
                    )
                    .await;
                    match produced {
                        Ok(Ok(r)) => out
                            .with_base_offset(r.base_offset as i64)
                            .with_log_start_offset(if version >= 5 {
                                r.log_start_offset as i64
                            } else {
                                -1
                            }),
                        Ok(Err(e)) => fail(kafka_code(e.code), &e.message),
                        Err(_) => fail(
                            code::REQUEST_TIMED_OUT,
                            "the batch was not committed within the request timeout",
                        ),
                    }
                }
            }))
            .await;
            responses.push(
                produce_response::TopicProduceResponse::default()
                    .with_name(t.name)
                    .with_partition_responses(results),
            );
        }
        ProduceResponse::default().with_responses(responses)
    }

    async fn fetch(&self, req: FetchRequest, version: i16) -> FetchResponse {
        let wait = Duration::from_millis(req.max_wait_ms.max(0) as u64).min(MAX_FETCH_WAIT);
        let max_bytes = if req.max_bytes > 0 {
            req.max_bytes as usize
        } else {
            usize::MAX
        };
        let wanted: Vec<(TopicName, Vec<fetch_request::FetchPartition>)> = req
            .topics
            .into_iter()
            .map(|t| (t.topic, t.partitions))
            .collect();
        let mut results = self.fetch_once(&wanted, max_bytes, version).await;
        let total: usize = results
            .iter()
            .flat_map(|(_, ps)| ps.iter())
            .map(|p| p.records.as_ref().map_or(0, Bytes::len))
            .sum();
        let any_error = results
            .iter()
            .flat_map(|(_, ps)| ps.iter())
            .any(|p| p.error_code != code::NONE);
        if total < req.min_bytes.max(1) as usize && !wait.is_zero() && !any_error {
            // Long poll: wait until one partition has something, then read all again.
            let waits = wanted.iter().flat_map(|(t, ps)| {
                ps.iter().map(move |p| {
                    let topic = t.to_string();
                    Box::pin(async move {
                        let _ = self
                            .broker
                            .fetch(BrokerFetch {
                                topic,
                                partition: p.partition.max(0) as u32,
                                offset: p.fetch_offset.max(0) as u64,
                                max_bytes: 1,
                                max_wait: wait,
                            })
                            .await;
                    })
                })
            });
            let waits: Vec<_> = waits.collect();
            if !waits.is_empty() {
                let _ = tokio::time::timeout(wait, futures_util::future::select_all(waits)).await;
                results = self.fetch_once(&wanted, max_bytes, version).await;
            }
        }
        let responses = results
            .into_iter()
            .map(|(topic, partitions)| {
                fetch_response::FetchableTopicResponse::default()
                    .with_topic(topic)
                    .with_partitions(partitions)
            })
            .collect();
        FetchResponse::default().with_responses(responses)
    }

    /// Reads every wanted partition once without waiting, up to `max_bytes` in all (the first
    /// partition with data always gets at least its first batch).
    async fn fetch_once(
        &self,
        wanted: &[(TopicName, Vec<fetch_request::FetchPartition>)],
        max_bytes: usize,
        version: i16,
    ) -> Vec<(TopicName, Vec<fetch_response::PartitionData>)> {
        let mut used = 0usize;
        let mut out = Vec::new();
        for (topic, partitions) in wanted {
            let mut results = Vec::new();
            for p in partitions {
                let data = fetch_response::PartitionData::default()
                    .with_partition_index(p.partition)
                    .with_aborted_transactions(Some(Vec::new()))
                    .with_preferred_read_replica(BrokerId(-1));
                if used >= max_bytes {
                    // Over the response budget: nothing from this one this time.
                    results.push(
                        data.with_high_watermark(-1)
                            .with_last_stable_offset(-1)
                            .with_records(Some(Bytes::new())),
                    );
                    continue;
                }
                let (Ok(partition), Ok(offset)) =
                    (u32::try_from(p.partition), u64::try_from(p.fetch_offset))
                else {
                    results.push(
                        data.with_error_code(code::OFFSET_OUT_OF_RANGE)
                            .with_high_watermark(-1)
                            .with_last_stable_offset(-1),
                    );
                    continue;
                };
                let budget = (p.partition_max_bytes.max(1) as usize).min(max_bytes - used);
                let fetched = self
                    .broker
                    .fetch(BrokerFetch {
                        topic: topic.to_string(),
                        partition,
                        offset,
                        max_bytes: budget,
                        max_wait: Duration::ZERO,
                    })
                    .await;
                results.push(match fetched {
                    Ok(f) => {
                        used += f.batches.len();
                        data.with_high_watermark(f.high_watermark as i64)
                            .with_last_stable_offset(f.last_stable_offset as i64)
                            .with_log_start_offset(if version >= 5 {
                                f.log_start_offset as i64
                            } else {
                                -1
                            })
                            .with_records(Some(f.batches))
                    }
                    Err(e) => data
                        .with_error_code(kafka_code(e.code))
                        .with_high_watermark(-1)
                        .with_last_stable_offset(-1),
                });
            }
            out.push((topic.clone(), results));
        }
        out
    }

    fn list_offsets(&self, req: ListOffsetsRequest, version: i16) -> ListOffsetsResponse {
        let topics = req
            .topics
            .into_iter()
            .map(|t| {
                let topic = t.name.to_string();
                let partitions = t
                    .partitions
                    .into_iter()
                    .map(|p| {
                        let out = list_offsets_response::ListOffsetsPartitionResponse::default()
                            .with_partition_index(p.partition_index)
                            .with_timestamp(-1);
                        let Ok(partition) = u32::try_from(p.partition_index) else {
                            return out
                                .with_error_code(code::UNKNOWN_TOPIC_OR_PARTITION)
                                .with_offset(-1);
                        };
                        let found = match p.timestamp {
                            -2 => self
                                .broker
                                .list_offsets(&topic, partition, OffsetSpec::Earliest)
                                .map(|o| Some(o as i64)),
                            -1 => self
                                .broker
                                .list_offsets(&topic, partition, OffsetSpec::Latest)
                                .map(|o| Some(o as i64)),
                            ts if ts >= 0 => self
                                .broker
                                .offset_for_timestamp(&topic, partition, ts)
                                .map(|o| o.map(|o| o as i64)),
                            _ => Err(BrokerError::new(
                                ErrorCode::InvalidRequest,
                                "only timestamps -2 (earliest), -1 (latest) and ≥ 0 are supported",
                            )),
                        };
                        let epoch = if version >= 4 {
                            self.broker.leader_epoch(&topic, partition)
                        } else {
                            -1
                        };
                        match found {
                            Ok(Some(o)) => out.with_offset(o).with_leader_epoch(epoch),
                            // No record at or after the timestamp (Kafka's answer).
                            Ok(None) => out.with_offset(-1).with_leader_epoch(epoch),
                            Err(e) => out.with_error_code(kafka_code(e.code)).with_offset(-1),
                        }
                    })
                    .collect();
                list_offsets_response::ListOffsetsTopicResponse::default()
                    .with_name(t.name)
                    .with_partitions(partitions)
            })
            .collect();
        ListOffsetsResponse::default().with_topics(topics)
    }

    // ----- topic administration -----

    async fn create_topics(&self, req: CreateTopicsRequest, version: i16) -> CreateTopicsResponse {
        let validate_only = req.validate_only;
        let results = join_all(req.topics.into_iter().map(|t| async move {
            let out = create_topics_response::CreatableTopicResult::default()
                .with_name(t.name.clone())
                .with_num_partitions(-1)
                .with_replication_factor(-1);
            let fail = |e: BrokerError| {
                out.clone()
                    .with_error_code(kafka_code(e.code))
                    .with_error_message(message(&e))
            };
            if !t.assignments.is_empty() {
                return out
                    .clone()
                    .with_error_code(code::INVALID_REPLICA_ASSIGNMENT)
                    .with_error_message(Some(s(
                        "manual replica assignment is not supported; replicas are placed by the cluster",
                    )));
            }
            let partitions = match t.num_partitions {
                -1 => 1,
                n if n > 0 => n as u32,
                n => {
                    return fail(BrokerError::new(
                        ErrorCode::InvalidPartitions,
                        format!("{n} partitions is not possible"),
                    ));
                }
            };
            let replication_factor = match t.replication_factor {
                -1 => None,
                n if n > 0 => Some(n as u16),
                n => {
                    return fail(BrokerError::new(
                        ErrorCode::InvalidReplicationFactor,
                        format!("replication factor {n} is not possible"),
                    ));
                }
            };
            let mut new = NewTopic::new(&t.name, partitions);
            new.replication_factor = replication_factor;
            new.configs = t
                .configs
                .into_iter()
                .filter_map(|c| Some((c.name.to_string(), c.value?.to_string())))
                .collect();
            match self.broker.topics().create(new, validate_only).await {
                Ok(info) if version >= 5 => out
                    .with_topic_id(if version >= 7 {
                        topic_uuid(info.record.id)
                    } else {
                        uuid::Uuid::nil()
                    })
                    .with_num_partitions(info.record.partitions as i32)
                    .with_replication_factor(info.record.replication_factor as i16)
                    .with_configs(Some(created_configs(&info))),
                Ok(_) => out,
                Err(e) => fail(e),
            }
        }))
        .await;
        CreateTopicsResponse::default().with_topics(results)
    }

    async fn delete_topics(&self, req: DeleteTopicsRequest, version: i16) -> DeleteTopicsResponse {
        // v0–5 name topics in `topic_names`; v6 in `topics`, by name or id.
        let mut wanted: Vec<(Option<String>, uuid::Uuid)> = req
            .topic_names
            .iter()
            .map(|n| (Some(n.to_string()), uuid::Uuid::nil()))
            .collect();
        wanted.extend(
            req.topics
                .iter()
                .map(|t| (t.name.as_ref().map(|n| n.to_string()), t.topic_id)),
        );
        let results = join_all(wanted.into_iter().map(|(n, id)| async move {
            let resolved = n.clone().or_else(|| self.name_of(id));
            let out = delete_topics_response::DeletableTopicResult::default()
                .with_name(Some(name(resolved.as_deref().unwrap_or_default())))
                .with_topic_id(if version >= 6 { id } else { uuid::Uuid::nil() });
            let why = |e: &BrokerError| (version >= 5).then(|| s(&e.message));
            let Some(topic) = resolved else {
                return out
                    .with_name(None)
                    .with_error_code(code::UNKNOWN_TOPIC_ID)
                    .with_error_message((version >= 5).then(|| s("no topic has this id")));
            };
            let id = match self.broker.topics().topic(&topic) {
                Ok(Some(t)) if version >= 6 => topic_uuid(t.record.id),
                _ => id,
            };
            match self.broker.topics().delete(&topic).await {
                Ok(()) => out.with_topic_id(id),
                Err(e) => out
                    .with_error_code(kafka_code(e.code))
                    .with_error_message(why(&e)),
            }
        }))
        .await;
        DeleteTopicsResponse::default().with_responses(results)
    }

    async fn create_partitions(&self, req: CreatePartitionsRequest) -> CreatePartitionsResponse {
        let validate_only = req.validate_only;
        let results = join_all(req.topics.into_iter().map(|t| async move {
            let out = create_partitions_response::CreatePartitionsTopicResult::default()
                .with_name(t.name.clone());
            if t.assignments.is_some() {
                return out
                    .with_error_code(code::INVALID_REPLICA_ASSIGNMENT)
                    .with_error_message(Some(s(
                        "manual replica assignment is not supported; replicas are placed by the cluster",
                    )));
            }
            let change = TopicChange {
                partitions: Some(t.count.max(0) as u32),
                ..TopicChange::default()
            };
            match self.broker.topics().alter(&t.name, change, validate_only).await {
                Ok(_) => out,
                Err(e) => out
                    .with_error_code(kafka_code(e.code))
                    .with_error_message(message(&e)),
            }
        }))
        .await;
        CreatePartitionsResponse::default().with_results(results)
    }

    /// DeleteRecords: each partition's log start moves to its offset (-1: the high
    /// watermark) on its leader; the answer carries the new low watermark.
    async fn delete_records(&self, req: DeleteRecordsRequest) -> DeleteRecordsResponse {
        let timeout = Duration::from_millis(req.timeout_ms.clamp(0, 300_000) as u64);
        let topics = join_all(req.topics.into_iter().map(|t| async move {
            let topic = t.name.to_string();
            let partitions = join_all(t.partitions.into_iter().map(|p| {
                let topic = topic.clone();
                async move {
                    let out = delete_records_response::DeleteRecordsPartitionResult::default()
                        .with_partition_index(p.partition_index)
                        .with_low_watermark(-1);
                    let Ok(partition) = u32::try_from(p.partition_index) else {
                        return out.with_error_code(code::UNKNOWN_TOPIC_OR_PARTITION);
                    };
                    let before = match p.offset {
                        -1 => None,
                        o if o >= 0 => Some(o as u64),
                        _ => return out.with_error_code(code::OFFSET_OUT_OF_RANGE),
                    };
                    let call = self.broker.delete_records(&topic, partition, before);
                    match tokio::time::timeout(timeout, call).await {
                        Ok(Ok(low)) => out.with_low_watermark(low as i64),
                        Ok(Err(e)) => out.with_error_code(kafka_code(e.code)),
                        Err(_) => out.with_error_code(code::REQUEST_TIMED_OUT),
                    }
                }
            }))
            .await;
            delete_records_response::DeleteRecordsTopicResult::default()
                .with_name(t.name)
                .with_partitions(partitions)
        }))
        .await;
        DeleteRecordsResponse::default().with_topics(topics)
    }

    fn describe_configs(
        &self,
        req: DescribeConfigsRequest,
        version: i16,
    ) -> DescribeConfigsResponse {
        let results = req
            .resources
            .into_iter()
            .map(|r| {
                let out = describe_configs_response::DescribeConfigsResult::default()
                    .with_resource_type(r.resource_type)
                    .with_resource_name(r.resource_name.clone());
                match r.resource_type {
                    RESOURCE_TOPIC => match self.broker.topics().topic(&r.resource_name) {
                        Ok(Some(info)) => {
                            let keys = r.configuration_keys.as_ref();
                            let configs = config_entries(&info, version)
                                .into_iter()
                                .filter(|c| keys.is_none_or(|k| k.contains(&c.name)))
                                .collect();
                            out.with_configs(configs)
                        }
                        Ok(None) => out
                            .with_error_code(code::UNKNOWN_TOPIC_OR_PARTITION)
                            .with_error_message(Some(s("no such topic"))),
                        Err(e) => out
                            .with_error_code(kafka_code(e.code))
                            .with_error_message(message(&e)),
                    },
                    // Broker settings are not exposed as Kafka configs yet: none to list.
                    RESOURCE_BROKER => out,
                    other => out
                        .with_error_code(code::INVALID_REQUEST)
                        .with_error_message(Some(s(&format!(
                            "resource type {other} is not supported (topics: 2, brokers: 4)"
                        )))),
                }
            })
            .collect();
        DescribeConfigsResponse::default().with_results(results)
    }

    async fn alter_configs(&self, req: AlterConfigsRequest) -> AlterConfigsResponse {
        let validate_only = req.validate_only;
        let responses = join_all(req.resources.into_iter().map(|r| async move {
            let out = alter_configs_response::AlterConfigsResourceResponse::default()
                .with_resource_type(r.resource_type)
                .with_resource_name(r.resource_name.clone());
            if r.resource_type != RESOURCE_TOPIC {
                return out
                    .with_error_code(code::INVALID_REQUEST)
                    .with_error_message(Some(s("only topic configs can be altered")));
            }
            // AlterConfigs replaces the whole set: what is not named goes back to its default.
            let mut set = BTreeMap::new();
            for c in &r.configs {
                if let Some(v) = &c.value {
                    set.insert(c.name.to_string(), v.to_string());
                }
            }
            let current = match self.broker.topics().topic(&r.resource_name) {
                Ok(Some(t)) => t.record.configs,
                Ok(None) => BTreeMap::new(),
                Err(e) => {
                    return out
                        .with_error_code(kafka_code(e.code))
                        .with_error_message(message(&e));
                }
            };
            let delete = current
                .keys()
                .filter(|k| !set.contains_key(*k))
                .cloned()
                .collect();
            let change = TopicChange {
                set,
                delete,
                partitions: None,
            };
            match self
                .broker
                .topics()
                .alter(&r.resource_name, change, validate_only)
                .await
            {
                Ok(_) => out,
                Err(e) => out
                    .with_error_code(kafka_code(e.code))
                    .with_error_message(message(&e)),
            }
        }))
        .await;
        AlterConfigsResponse::default().with_responses(responses)
    }

    async fn incremental_alter_configs(
        &self,
        req: IncrementalAlterConfigsRequest,
    ) -> IncrementalAlterConfigsResponse {
        let validate_only = req.validate_only;
        let responses = join_all(req.resources.into_iter().map(|r| async move {
            let out = incremental_alter_configs_response::AlterConfigsResourceResponse::default()
                .with_resource_type(r.resource_type)
                .with_resource_name(r.resource_name.clone());
            let fail = |e: BrokerError| {
                out.clone()
                    .with_error_code(kafka_code(e.code))
                    .with_error_message(message(&e))
            };
            if r.resource_type != RESOURCE_TOPIC {
                return fail(BrokerError::new(
                    ErrorCode::InvalidRequest,
                    "only topic configs can be altered",
                ));
            }
            let current = match self.broker.topics().topic(&r.resource_name) {
                Ok(Some(t)) => t.record.configs,
                Ok(None) => return fail(BrokerError::unknown_topic(&r.resource_name)),
                Err(e) => return fail(e),
            };
            let mut change = TopicChange::default();
            for c in &r.configs {
                let key = c.name.to_string();
                let value = c.value.as_ref().map(|v| v.to_string());
                match (c.config_operation, value) {
                    (0, Some(v)) => {
                        change.set.insert(key, v);
                    }
                    (1, _) => change.delete.push(key),
                    // APPEND / SUBTRACT: only cleanup.policy is a list.
                    (op @ (2 | 3), Some(v)) if key == "cleanup.policy" => {
                        let mut items: Vec<String> = current
                            .get(&key)
                            .map_or("delete", String::as_str)
                            .split(',')
                            .map(str::to_string)
                            .collect();
                        for item in v.split(',') {
                            if op == 2 && !items.iter().any(|i| i == item) {
                                items.push(item.to_string());
                            }
                            if op == 3 {
                                items.retain(|i| i != item);
                            }
                        }
                        items.sort();
                        change.set.insert(key, items.join(","));
                    }
                    (op, _) => {
                        return fail(BrokerError::new(
                            ErrorCode::InvalidConfig,
                            format!("operation {op} on {key} is not possible"),
                        ));
                    }
                }
            }
            match self
                .broker
                .topics()
                .alter(&r.resource_name, change, validate_only)
                .await
            {
                Ok(_) => out,
                Err(e) => fail(e),
            }
        }))
        .await;
        IncrementalAlterConfigsResponse::default().with_responses(responses)
    }
}

/// Kafka's config types (DescribeConfigs v3+).
fn config_type(key: &str) -> i8 {
    match key {
        "cleanup.policy" => 7,
        "segment.bytes" => 3,
        _ => 5,
    }
}

fn config_entries(
    info: &TopicInfo,
    version: i16,
) -> Vec<describe_configs_response::DescribeConfigsResourceResult> {
    TopicConfig::from_stored(&info.record.configs)
        .entries()
        .into_iter()
        .map(|(k, v, default)| {
            describe_configs_response::DescribeConfigsResourceResult::default()
                .with_name(s(k))
                .with_value(Some(s(&v)))
                .with_config_source(if default {
                    SOURCE_DEFAULT
                } else {
                    SOURCE_TOPIC
                })
                .with_config_type(if version >= 3 { config_type(k) } else { 0 })
        })
        .collect()
}

fn created_configs(info: &TopicInfo) -> Vec<create_topics_response::CreatableTopicConfigs> {
    TopicConfig::from_stored(&info.record.configs)
        .entries()
        .into_iter()
        .filter(|(k, _, _)| KNOWN_KEYS.contains(k))
        .map(|(k, v, default)| {
            create_topics_response::CreatableTopicConfigs::default()
                .with_name(s(k))
                .with_value(Some(s(&v)))
                .with_config_source(if default {
                    SOURCE_DEFAULT
                } else {
                    SOURCE_TOPIC
                })
        })
        .collect()
}

fn reply<R: Encodable + HeaderVersion>(id: i32, version: i16, body: &R) -> Reply {
    match codec::response(id, version, body) {
        Ok(frame) => Reply::Frame(frame),
        Err(e) => {
            tracing::warn!(err = %e, "kafka: cannot encode a response; closing");
            Reply::Close(Bytes::new())
        }
    }
}
