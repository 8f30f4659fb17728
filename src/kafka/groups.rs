//! The Kafka group APIs (FindCoordinator, JoinGroup, SyncGroup, Heartbeat, LeaveGroup,
//! OffsetCommit, OffsetFetch, DescribeGroups, ListGroups, DeleteGroups, OffsetDelete) and
//! InitProducerId, over the broker's group coordinator ([`crate::broker::groups`]) and
//! producer ids. One group model: a group joined here is the same group the native gRPC
//! clients see, with the same committed offsets.

use std::time::Duration;

use bytes::Bytes;
use kafka_protocol::messages::*;
use kafka_protocol::protocol::StrBytes;

use super::codec::{code, kafka_code};
use super::handlers::{Handlers, host_port, message, name, s};
use crate::broker::groups::{
    CommitOffset, JoinOutcome, JoinRequest, MemberRef, Protocol, SyncRequest,
};
use crate::broker::{BrokerError, BrokerResult, ErrorCode};

/// A duration from a client's milliseconds (negative: none).
fn millis(ms: i32) -> Duration {
    Duration::from_millis(ms.max(0) as u64)
}

fn opt(v: &Option<StrBytes>) -> Option<String> {
    v.as_ref().map(|x| x.to_string())
}

fn err_code<T>(r: &BrokerResult<T>) -> i16 {
    r.as_ref().err().map_or(code::NONE, |e| kafka_code(e.code))
}

/// One topic's committed offsets: (partition, offset, metadata) each.
type TopicOffsets = (String, Vec<(i32, i64, String)>);

/// Longest a producer id request waits for the metadata leader.
const INIT_PRODUCER_ID_WAIT: Duration = Duration::from_secs(10);

impl Handlers {
    // ----- FindCoordinator -----

    /// The coordinator of one group key: node id, host, port.
    async fn coordinator_of(&self, key: &str, key_type: i8) -> BrokerResult<(i32, String, i32)> {
        if key_type != 0 {
            return Err(BrokerError::new(
                ErrorCode::InvalidRequest,
                "only group coordinators (key type 0) are served: transactions are not supported",
            ));
        }
        let node = self.coordinator.find(key).await?;
        let view = self.broker.metadata(Some(&[]))?;
        view.nodes
            .iter()
            .find(|n| n.id == node)
            .and_then(|n| n.listeners.get("kafka"))
            .and_then(|a| host_port(a))
            .map(|(host, port)| (node as i32, host, port))
            .ok_or_else(|| {
                BrokerError::new(
                    ErrorCode::CoordinatorNotAvailable,
                    format!("the Kafka address of node {node} is not known yet; retry"),
                )
            })
    }

    pub(super) async fn find_coordinator(
        &self,
        req: FindCoordinatorRequest,
        version: i16,
    ) -> FindCoordinatorResponse {
        if version >= 4 {
            let mut coordinators = Vec::new();
            for key in &req.coordinator_keys {
                let found = self.coordinator_of(key, req.key_type).await;
                let c = find_coordinator_response::Coordinator::default()
                    .with_key(key.clone())
                    .with_error_code(err_code(&found));
                coordinators.push(match found {
                    Ok((node, host, port)) => c
                        .with_node_id(BrokerId(node))
                        .with_host(s(&host))
                        .with_port(port),
                    Err(e) => c
                        .with_node_id(BrokerId(-1))
                        .with_port(-1)
                        .with_error_message(message(&e)),
                });
            }
            return FindCoordinatorResponse::default().with_coordinators(coordinators);
        }
        let found = self.coordinator_of(&req.key, req.key_type).await;
        let r = FindCoordinatorResponse::default().with_error_code(err_code(&found));
        match found {
            Ok((node, host, port)) => r
                .with_node_id(BrokerId(node))
                .with_host(s(&host))
                .with_port(port),
            Err(e) => r
                .with_node_id(BrokerId(-1))
                .with_port(-1)
                .with_error_message((version >= 1).then(|| s(&e.message))),
        }
    }

    // ----- JoinGroup, SyncGroup, Heartbeat, LeaveGroup -----

    pub(super) async fn join_group(
        &self,
        req: JoinGroupRequest,
        version: i16,
        client_id: String,
    ) -> JoinGroupResponse {
        let session = millis(req.session_timeout_ms);
        let rebalance = if version >= 1 {
            millis(req.rebalance_timeout_ms)
        } else {
            session
        };
        let outcome = self
            .coordinator
            .join(JoinRequest {
                group: req.group_id.to_string(),
                member_id: req.member_id.to_string(),
                instance_id: opt(&req.group_instance_id),
                protocol_type: req.protocol_type.to_string(),
                protocols: req
                    .protocols
                    .iter()
                    .map(|p| Protocol {
                        name: p.name.to_string(),
                        metadata: p.metadata.clone(),
                    })
                    .collect(),
                session_timeout: session,
                rebalance_timeout: rebalance,
                client_id,
                host: self.peer.ip().to_string(),
                require_member_id: version >= 4,
            })
            .await;
        // Before v7 the protocol name is not nullable.
        let none_or_empty = || (version < 7).then(|| s(""));
        let failed = |error: i16, member: StrBytes| {
            JoinGroupResponse::default()
                .with_error_code(error)
                .with_generation_id(-1)
                .with_protocol_name(none_or_empty())
                .with_member_id(member)
        };
        match outcome {
            Ok(JoinOutcome::Joined(j)) => JoinGroupResponse::default()
                .with_generation_id(j.generation)
                .with_protocol_type((version >= 7).then(|| s(&j.protocol_type)))
                .with_protocol_name(Some(s(&j.protocol)))
                .with_leader(s(&j.leader))
                .with_member_id(s(&j.member_id))
                .with_members(
                    j.members
                        .into_iter()
                        .map(|m| {
                            join_group_response::JoinGroupResponseMember::default()
                                .with_member_id(s(&m.member_id))
                                .with_group_instance_id(if version >= 5 {
                                    m.instance_id.as_deref().map(s)
                                } else {
                                    None
                                })
                                .with_metadata(m.metadata)
                        })
                        .collect(),
                ),
            Ok(JoinOutcome::MemberIdRequired(id)) => failed(code::MEMBER_ID_REQUIRED, s(&id)),
            Err(e) => failed(kafka_code(e.code), req.member_id.clone()),
        }
    }

    pub(super) async fn sync_group(
        &self,
        req: SyncGroupRequest,
        version: i16,
    ) -> SyncGroupResponse {
        let synced = self
            .coordinator
            .sync(SyncRequest {
                group: req.group_id.to_string(),
                member: MemberRef {
                    member_id: req.member_id.to_string(),
                    generation: req.generation_id,
                    instance_id: opt(&req.group_instance_id),
                },
                protocol_type: opt(&req.protocol_type),
                protocol: opt(&req.protocol_name),
                assignments: req
                    .assignments
                    .iter()
                    .map(|a| (a.member_id.to_string(), a.assignment.clone()))
                    .collect(),
            })
            .await;
        match synced {
            Ok(x) => SyncGroupResponse::default()
                .with_protocol_type((version >= 5).then(|| s(&x.protocol_type)))
                .with_protocol_name((version >= 5).then(|| s(&x.protocol)))
                .with_assignment(x.assignment),
            Err(e) => SyncGroupResponse::default()
                .with_error_code(kafka_code(e.code))
                .with_assignment(Bytes::new()),
        }
    }

    pub(super) async fn heartbeat(&self, req: HeartbeatRequest) -> HeartbeatResponse {
        let r = self
            .coordinator
            .heartbeat(
                &req.group_id,
                &MemberRef {
                    member_id: req.member_id.to_string(),
                    generation: req.generation_id,
                    instance_id: opt(&req.group_instance_id),
                },
            )
            .await;
        HeartbeatResponse::default().with_error_code(err_code(&r))
    }

    pub(super) async fn leave_group(
        &self,
        req: LeaveGroupRequest,
        version: i16,
    ) -> LeaveGroupResponse {
        let members: Vec<(String, Option<String>)> = if version >= 3 {
            req.members
                .iter()
                .map(|m| (m.member_id.to_string(), opt(&m.group_instance_id)))
                .collect()
        } else {
            vec![(req.member_id.to_string(), None)]
        };
        match self.coordinator.leave(&req.group_id, &members).await {
            Err(e) => LeaveGroupResponse::default().with_error_code(kafka_code(e.code)),
            Ok(answers) if version >= 3 => LeaveGroupResponse::default().with_members(
                members
                    .iter()
                    .zip(&answers)
                    .map(|((id, instance), r)| {
                        leave_group_response::MemberResponse::default()
                            .with_member_id(s(id))
                            .with_group_instance_id(instance.as_deref().map(s))
                            .with_error_code(err_code(r))
                    })
                    .collect(),
            ),
            Ok(answers) => LeaveGroupResponse::default()
                .with_error_code(answers.first().map_or(code::NONE, err_code)),
        }
    }

    // ----- Offsets -----

    pub(super) async fn offset_commit(&self, req: OffsetCommitRequest) -> OffsetCommitResponse {
        let mut offsets = Vec::new();
        let mut unknown: Vec<(String, i32)> = Vec::new();
        for t in &req.topics {
            let partitions = match self.broker.topics().topic(&t.name) {
                Ok(Some(info)) => info.record.partitions,
                _ => 0,
            };
            for p in &t.partitions {
                if p.partition_index < 0 || p.partition_index as u32 >= partitions {
                    unknown.push((t.name.to_string(), p.partition_index));
                    continue;
                }
                offsets.push(CommitOffset {
                    topic: t.name.to_string(),
                    partition: p.partition_index as u32,
                    offset: p.committed_offset,
                    metadata: opt(&p.committed_metadata).unwrap_or_default(),
                });
            }
        }
        let who = MemberRef {
            member_id: req.member_id.to_string(),
            generation: req.generation_id_or_member_epoch,
            instance_id: opt(&req.group_instance_id),
        };
        let committed = if offsets.is_empty() {
            Ok(())
        } else {
            self.coordinator.commit(&req.group_id, &who, &offsets).await
        };
        // A commit from outside an active group: Kafka answers UNKNOWN_MEMBER_ID.
        let error = match &committed {
            Err(e) if e.code == ErrorCode::NonEmptyGroup => code::UNKNOWN_MEMBER_ID,
            r => err_code(r),
        };
        OffsetCommitResponse::default().with_topics(
            req.topics
                .iter()
                .map(|t| {
                    offset_commit_response::OffsetCommitResponseTopic::default()
                        .with_name(t.name.clone())
                        .with_partitions(
                            t.partitions
                                .iter()
                                .map(|p| {
                                    let bad = unknown
                                        .iter()
                                        .any(|u| *u.0 == **t.name && u.1 == p.partition_index);
                                    offset_commit_response::OffsetCommitResponsePartition::default()
                                        .with_partition_index(p.partition_index)
                                        .with_error_code(if bad {
                                            code::UNKNOWN_TOPIC_OR_PARTITION
                                        } else {
                                            error
                                        })
                                })
                                .collect(),
                        )
                })
                .collect(),
        )
    }

    /// One group's committed offsets for the topics asked (`None`: all), as Kafka lays them
    /// out: topic → partitions.
    async fn fetch_group_offsets(
        &self,
        group: &str,
        topics: Option<Vec<(String, Vec<i32>)>>,
    ) -> BrokerResult<Vec<TopicOffsets>> {
        let wanted: Option<Vec<(String, u32)>> = topics.as_ref().map(|ts| {
            ts.iter()
                .flat_map(|(t, ps)| {
                    ps.iter()
                        .filter(|p| **p >= 0)
                        .map(move |p| (t.clone(), *p as u32))
                })
                .collect()
        });
        let offsets = self.coordinator.offsets(group, wanted.as_deref()).await?;
        let mut out: Vec<TopicOffsets> = Vec::new();
        for o in offsets {
            let entry = (o.partition as i32, o.offset, o.metadata);
            match out.last_mut() {
                Some((t, ps)) if *t == o.topic => ps.push(entry),
                _ => out.push((o.topic, vec![entry])),
            }
        }
        // Negative partitions asked for are answered as unknown.
        if let Some(ts) = topics {
            for (t, ps) in ts {
                for p in ps.into_iter().filter(|p| *p < 0) {
                    match out.iter_mut().find(|(n, _)| *n == t) {
                        Some((_, list)) => list.push((p, -1, String::new())),
                        None => out.push((t.clone(), vec![(p, -1, String::new())])),
                    }
                }
            }
        }
        Ok(out)
    }

    pub(super) async fn offset_fetch(
        &self,
        req: OffsetFetchRequest,
        version: i16,
    ) -> OffsetFetchResponse {
        if version >= 8 {
            let mut groups = Vec::new();
            for g in &req.groups {
                let topics = g.topics.as_ref().map(|ts| {
                    ts.iter()
                        .map(|t| (t.name.to_string(), t.partition_indexes.clone()))
                        .collect()
                });
                let r = self.fetch_group_offsets(&g.group_id, topics).await;
                let group = offset_fetch_response::OffsetFetchResponseGroup::default()
                    .with_group_id(g.group_id.clone())
                    .with_error_code(err_code(&r));
                groups.push(group.with_topics(
                    r.unwrap_or_default()
                        .into_iter()
                        .map(|(t, ps)| {
                            offset_fetch_response::OffsetFetchResponseTopics::default()
                                .with_name(name(&t))
                                .with_partitions(
                                    ps.into_iter()
                                        .map(|(p, off, meta)| {
                                            offset_fetch_response::OffsetFetchResponsePartitions::default()
                                                .with_partition_index(p)
                                                .with_committed_offset(off)
                                                .with_committed_leader_epoch(-1)
                                                .with_metadata(Some(s(&meta)))
                                        })
                                        .collect(),
                                )
                        })
                        .collect(),
                ));
            }
            return OffsetFetchResponse::default().with_groups(groups);
        }
        let topics = req.topics.as_ref().map(|ts| {
            ts.iter()
                .map(|t| (t.name.to_string(), t.partition_indexes.clone()))
                .collect::<Vec<_>>()
        });
        let r = self
            .fetch_group_offsets(&req.group_id, topics.clone())
            .await;
        let error = err_code(&r);
        let rows = match r {
            Ok(rows) => rows,
            // Before v2 the error goes in every partition asked for.
            Err(_) => topics
                .unwrap_or_default()
                .into_iter()
                .map(|(t, ps)| (t, ps.into_iter().map(|p| (p, -1, String::new())).collect()))
                .collect(),
        };
        let partition_error = if version < 2 { error } else { code::NONE };
        OffsetFetchResponse::default()
            .with_error_code(if version >= 2 { error } else { code::NONE })
            .with_topics(
                rows.into_iter()
                    .map(|(t, ps)| {
                        offset_fetch_response::OffsetFetchResponseTopic::default()
                            .with_name(name(&t))
                            .with_partitions(
                                ps.into_iter()
                                    .map(|(p, off, meta)| {
                                        offset_fetch_response::OffsetFetchResponsePartition::default()
                                            .with_partition_index(p)
                                            .with_committed_offset(off)
                                            .with_committed_leader_epoch(-1)
                                            .with_metadata(Some(s(&meta)))
                                            .with_error_code(if p < 0 {
                                                code::UNKNOWN_TOPIC_OR_PARTITION
                                            } else {
                                                partition_error
                                            })
                                    })
                                    .collect(),
                            )
                    })
                    .collect(),
            )
    }

    // ----- Group administration -----

    pub(super) async fn describe_groups(
        &self,
        req: DescribeGroupsRequest,
        version: i16,
    ) -> DescribeGroupsResponse {
        let mut groups = Vec::new();
        for g in &req.groups {
            let described =
                describe_groups_response::DescribedGroup::default().with_group_id(g.clone());
            groups.push(match self.coordinator.describe(g).await {
                Ok(d) => described
                    .with_group_state(s(d.state))
                    .with_protocol_type(s(&d.protocol_type))
                    .with_protocol_data(s(&d.protocol))
                    .with_members(
                        d.members
                            .into_iter()
                            .map(|m| {
                                describe_groups_response::DescribedGroupMember::default()
                                    .with_member_id(s(&m.member_id))
                                    .with_group_instance_id(if version >= 4 {
                                        m.instance_id.as_deref().map(s)
                                    } else {
                                        None
                                    })
                                    .with_client_id(s(&m.client_id))
                                    .with_client_host(s(&format!("/{}", m.host)))
                                    .with_member_metadata(m.metadata)
                                    .with_member_assignment(m.assignment)
                            })
                            .collect(),
                    ),
                Err(e) => described
                    .with_error_code(kafka_code(e.code))
                    .with_group_state(s("Dead")),
            });
        }
        DescribeGroupsResponse::default().with_groups(groups)
    }

    pub(super) async fn list_groups(&self, req: ListGroupsRequest) -> ListGroupsResponse {
        let wanted: Vec<String> = req
            .states_filter
            .iter()
            .map(|x| x.to_ascii_lowercase())
            .collect();
        match self.coordinator.list().await {
            Ok(groups) => ListGroupsResponse::default().with_groups(
                groups
                    .into_iter()
                    .filter(|g| wanted.is_empty() || wanted.contains(&g.state.to_ascii_lowercase()))
                    .map(|g| {
                        list_groups_response::ListedGroup::default()
                            .with_group_id(GroupId(s(&g.group)))
                            .with_protocol_type(s(&g.protocol_type))
                            .with_group_state(s(g.state))
                    })
                    .collect(),
            ),
            Err(e) => ListGroupsResponse::default().with_error_code(kafka_code(e.code)),
        }
    }

    pub(super) async fn delete_groups(&self, req: DeleteGroupsRequest) -> DeleteGroupsResponse {
        let mut results = Vec::new();
        for g in &req.groups_names {
            let r = self.coordinator.delete(g).await;
            results.push(
                delete_groups_response::DeletableGroupResult::default()
                    .with_group_id(g.clone())
                    .with_error_code(err_code(&r)),
            );
        }
        DeleteGroupsResponse::default().with_results(results)
    }

    pub(super) async fn offset_delete(&self, req: OffsetDeleteRequest) -> OffsetDeleteResponse {
        let partitions: Vec<(String, u32)> = req
            .topics
            .iter()
            .flat_map(|t| {
                t.partitions
                    .iter()
                    .map(move |p| (t.name.to_string(), p.partition_index.max(0) as u32))
            })
            .collect();
        match self
            .coordinator
            .delete_offsets(&req.group_id, &partitions)
            .await
        {
            Err(e) => OffsetDeleteResponse::default().with_error_code(kafka_code(e.code)),
            Ok(answers) => {
                let mut answers = answers.into_iter();
                OffsetDeleteResponse::default().with_topics(
                    req.topics
                        .iter()
                        .map(|t| {
                            offset_delete_response::OffsetDeleteResponseTopic::default()
                                .with_name(t.name.clone())
                                .with_partitions(
                                    t.partitions
                                        .iter()
                                        .map(|p| {
                                            let r = answers.next().unwrap_or(Ok(()));
                                            offset_delete_response::OffsetDeleteResponsePartition::default()
                                                .with_partition_index(p.partition_index)
                                                .with_error_code(err_code(&r))
                                        })
                                        .collect(),
                                )
                        })
                        .collect(),
                )
            }
        }
    }

    // ----- InitProducerId -----

    /// A new idempotent producer id, epoch 0. As in Kafka, an idempotent (non-transactional)
    /// producer asking again, with its old id and epoch, gets a new id; the old one's
    /// sequence state stays with the partitions and lapses.
    pub(super) async fn init_producer_id(
        &self,
        req: InitProducerIdRequest,
    ) -> InitProducerIdResponse {
        if req.transactional_id.is_some() {
            return InitProducerIdResponse::default()
                .with_error_code(code::TRANSACTIONAL_ID_AUTHORIZATION_FAILED)
                .with_producer_id(ProducerId(-1))
                .with_producer_epoch(-1);
        }
        match self.broker.init_producer_id(INIT_PRODUCER_ID_WAIT).await {
            Ok(id) => InitProducerIdResponse::default()
                .with_producer_id(ProducerId(id))
                .with_producer_epoch(0),
            Err(e) => InitProducerIdResponse::default()
                .with_error_code(match e.code {
                    // The metadata leader is moving: a retriable code the clients know.
                    ErrorCode::NotController | ErrorCode::NotLeader | ErrorCode::TryAgain => {
                        code::COORDINATOR_NOT_AVAILABLE
                    }
                    other => kafka_code(other),
                })
                .with_producer_id(ProducerId(-1))
                .with_producer_epoch(-1),
        }
    }
}
