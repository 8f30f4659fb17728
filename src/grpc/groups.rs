//! The gRPC `Groups` service (`aqueduct.group.v1`, see `protocol/proto/aqueduct/group.proto`):
//! a thin adapter over the broker's group coordinator ([`crate::broker::groups`]).

use std::time::Duration;

use aqueduct_protocol::group as pb;
use aqueduct_protocol::group::groups_server::{Groups, GroupsServer};
use bytes::Bytes;
use tonic::{Request, Response, Status};

use super::status;
use crate::broker::groups::{
    CommitOffset, CommittedOffset, Coordinator, JoinOutcome, JoinRequest, MemberRef, Protocol,
    SyncRequest,
};

/// The service over a node's coordinator.
#[derive(Debug, Clone)]
pub struct GroupService {
    coordinator: Coordinator,
}

impl GroupService {
    pub fn new(coordinator: Coordinator) -> Self {
        Self { coordinator }
    }

    pub fn into_server(self) -> GroupsServer<Self> {
        GroupsServer::new(self)
    }
}

fn peer_host<T>(request: &Request<T>) -> String {
    request
        .remote_addr()
        .map(|a| a.ip().to_string())
        .unwrap_or_default()
}

fn member(member_id: &str, generation: i32) -> MemberRef {
    MemberRef {
        member_id: member_id.to_string(),
        generation,
        instance_id: None,
    }
}

fn offsets_pb(offsets: Vec<CommittedOffset>) -> Vec<pb::TopicPartitionOffset> {
    offsets
        .into_iter()
        .map(|o| pb::TopicPartitionOffset {
            topic: o.topic,
            partition: o.partition,
            offset: o.offset,
            metadata: o.metadata,
        })
        .collect()
}

#[tonic::async_trait]
impl Groups for GroupService {
    async fn join_group(
        &self,
        request: Request<pb::JoinGroupRequest>,
    ) -> Result<Response<pb::JoinGroupReply>, Status> {
        let host = peer_host(&request);
        let req = request.into_inner();
        let outcome = self
            .coordinator
            .join(JoinRequest {
                group: req.group,
                member_id: req.member_id,
                instance_id: None,
                protocol_type: req.protocol_type,
                protocols: req
                    .protocols
                    .into_iter()
                    .map(|p| Protocol {
                        name: p.name,
                        metadata: Bytes::from(p.metadata),
                    })
                    .collect(),
                session_timeout: Duration::from_millis(u64::from(req.session_timeout_ms)),
                rebalance_timeout: Duration::from_millis(u64::from(req.rebalance_timeout_ms)),
                client_id: req.client_id,
                host,
                require_member_id: false,
            })
            .await
            .map_err(|e| status(&e))?;
        let JoinOutcome::Joined(j) = outcome else {
            return Err(Status::internal("the coordinator asked for a member id"));
        };
        Ok(Response::new(pb::JoinGroupReply {
            generation: j.generation,
            protocol: j.protocol,
            leader: j.leader,
            member_id: j.member_id,
            members: j
                .members
                .into_iter()
                .map(|m| pb::JoinedMember {
                    member_id: m.member_id,
                    metadata: m.metadata.to_vec(),
                })
                .collect(),
        }))
    }

    async fn sync_group(
        &self,
        request: Request<pb::SyncGroupRequest>,
    ) -> Result<Response<pb::SyncGroupReply>, Status> {
        let req = request.into_inner();
        let synced = self
            .coordinator
            .sync(SyncRequest {
                member: member(&req.member_id, req.generation),
                group: req.group,
                protocol_type: None,
                protocol: None,
                assignments: req
                    .assignments
                    .into_iter()
                    .map(|a| (a.member_id, Bytes::from(a.assignment)))
                    .collect(),
            })
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(pb::SyncGroupReply {
            assignment: synced.assignment.to_vec(),
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatReply>, Status> {
        let req = request.into_inner();
        self.coordinator
            .heartbeat(&req.group, &member(&req.member_id, req.generation))
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(pb::HeartbeatReply {}))
    }

    async fn leave_group(
        &self,
        request: Request<pb::LeaveGroupRequest>,
    ) -> Result<Response<pb::LeaveGroupReply>, Status> {
        let req = request.into_inner();
        let answers = self
            .coordinator
            .leave(&req.group, &[(req.member_id, None)])
            .await
            .map_err(|e| status(&e))?;
        if let Some(Err(e)) = answers.into_iter().next() {
            return Err(status(&e));
        }
        Ok(Response::new(pb::LeaveGroupReply {}))
    }

    async fn offset_commit(
        &self,
        request: Request<pb::OffsetCommitRequest>,
    ) -> Result<Response<pb::OffsetCommitReply>, Status> {
        let req = request.into_inner();
        let offsets: Vec<CommitOffset> = req
            .offsets
            .into_iter()
            .map(|o| CommitOffset {
                topic: o.topic,
                partition: o.partition,
                offset: o.offset,
                metadata: o.metadata,
            })
            .collect();
        self.coordinator
            .commit(
                &req.group,
                &member(&req.member_id, req.generation),
                &offsets,
            )
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(pb::OffsetCommitReply {}))
    }

    async fn offset_fetch(
        &self,
        request: Request<pb::OffsetFetchRequest>,
    ) -> Result<Response<pb::OffsetFetchReply>, Status> {
        let req = request.into_inner();
        let wanted: Vec<(String, u32)> = req
            .partitions
            .into_iter()
            .map(|tp| (tp.topic, tp.partition))
            .collect();
        let offsets = self
            .coordinator
            .offsets(&req.group, (!wanted.is_empty()).then_some(&wanted[..]))
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(pb::OffsetFetchReply {
            offsets: offsets_pb(offsets),
        }))
    }

    async fn describe_group(
        &self,
        request: Request<pb::DescribeGroupRequest>,
    ) -> Result<Response<pb::DescribeGroupReply>, Status> {
        let req = request.into_inner();
        let d = self
            .coordinator
            .describe(&req.group)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(pb::DescribeGroupReply {
            group: d.group,
            state: d.state.to_string(),
            protocol_type: d.protocol_type,
            protocol: d.protocol,
            generation: d.generation,
            members: d
                .members
                .into_iter()
                .map(|m| pb::GroupMember {
                    member_id: m.member_id,
                    client_id: m.client_id,
                    host: m.host,
                    assignment: m.assignment.to_vec(),
                })
                .collect(),
            offsets: offsets_pb(d.offsets),
        }))
    }

    async fn list_groups(
        &self,
        _request: Request<pb::ListGroupsRequest>,
    ) -> Result<Response<pb::ListGroupsReply>, Status> {
        let groups = self
            .coordinator
            .list()
            .await
            .map_err(|e| status(&e))?
            .into_iter()
            .map(|g| pb::GroupListing {
                group: g.group,
                state: g.state.to_string(),
                protocol_type: g.protocol_type,
                members: g.members,
            })
            .collect();
        Ok(Response::new(pb::ListGroupsReply { groups }))
    }
}
