//! The Raft transport over gRPC (`aqueduct.raft.v1.RaftTransport`, see
//! `protocol/proto/aqueduct/raft.proto`).
//!
//! Client side: [`GrpcNetworkFactory`] gives openraft one [`GrpcNetwork`] per peer; every call
//! carries the group name and the openraft request serialized as MessagePack (record batches
//! travel as raw bytes). Connections are lazy
//! (`connect_lazy`) and reused per peer address, so all groups between two nodes share one
//! HTTP/2 connection. Server side: [`RaftTransportService`] routes each request to the group's
//! [`GroupEndpoint`] (its `Raft`, whatever its state machine) and sends back openraft's
//! `Result` serialized the same way (a remote `Fatal` reaches
//! the caller as a network error, so openraft retries with backoff).

use std::collections::HashMap;
use std::io::Cursor;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use aqueduct_protocol::raft::raft_transport_client::RaftTransportClient;
use aqueduct_protocol::raft::raft_transport_server::{RaftTransport, RaftTransportServer};
use aqueduct_protocol::raft::{PingReply, PingRequest, RaftReply, RaftRequest};
use openraft::error::{
    NetworkError, RPCError, RaftError, ReplicationClosed, StreamingError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetworkFactory, v2::RaftNetworkV2};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest,
    TransferLeaderResponse, VoteRequest, VoteResponse,
};
use openraft::{Raft, Snapshot, SnapshotMeta};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tonic::transport::{Channel, Endpoint};

use crate::state_machine::MetaStateMachine;
use crate::types::{GroupTypeConfig, Vote};

/// The metadata group's Raft handle.
pub type MetaRaft = Raft<GroupTypeConfig, MetaStateMachine>;

type FullSnapshot = Snapshot<
    openraft::impls::leader_id_adv::LeaderId<u64, u64>,
    u64,
    openraft::impls::BasicNode,
    Cursor<Vec<u8>>,
>;

/// What the transport needs of a group's Raft, whatever its state machine.
#[tonic::async_trait]
pub trait GroupEndpoint: Send + Sync + 'static {
    async fn append_entries(
        &self,
        req: AppendEntriesRequest<GroupTypeConfig>,
    ) -> Result<AppendEntriesResponse<GroupTypeConfig>, RaftError<GroupTypeConfig>>;
    async fn vote(
        &self,
        req: VoteRequest<GroupTypeConfig>,
    ) -> Result<VoteResponse<GroupTypeConfig>, RaftError<GroupTypeConfig>>;
    async fn install_full_snapshot(
        &self,
        vote: Vote,
        snapshot: FullSnapshot,
    ) -> Result<SnapshotResponse<GroupTypeConfig>, openraft::error::Fatal<GroupTypeConfig>>;
    async fn transfer_leader(
        &self,
        req: TransferLeaderRequest<GroupTypeConfig>,
    ) -> Result<TransferLeaderResponse<GroupTypeConfig>, openraft::error::Fatal<GroupTypeConfig>>;
}

#[tonic::async_trait]
impl<SM> GroupEndpoint for Raft<GroupTypeConfig, SM>
where
    SM: openraft::storage::RaftStateMachine<GroupTypeConfig, SnapshotData = Cursor<Vec<u8>>>,
{
    async fn append_entries(
        &self,
        req: AppendEntriesRequest<GroupTypeConfig>,
    ) -> Result<AppendEntriesResponse<GroupTypeConfig>, RaftError<GroupTypeConfig>> {
        Raft::append_entries(self, req).await
    }
    async fn vote(
        &self,
        req: VoteRequest<GroupTypeConfig>,
    ) -> Result<VoteResponse<GroupTypeConfig>, RaftError<GroupTypeConfig>> {
        Raft::vote(self, req).await
    }
    async fn install_full_snapshot(
        &self,
        vote: Vote,
        snapshot: FullSnapshot,
    ) -> Result<SnapshotResponse<GroupTypeConfig>, openraft::error::Fatal<GroupTypeConfig>> {
        Raft::install_full_snapshot(self, vote, snapshot).await
    }
    async fn transfer_leader(
        &self,
        req: TransferLeaderRequest<GroupTypeConfig>,
    ) -> Result<TransferLeaderResponse<GroupTypeConfig>, openraft::error::Fatal<GroupTypeConfig>>
    {
        Raft::handle_transfer_leader(self, req).await
    }
}

type Meta = SnapshotMeta<
    openraft::impls::leader_id_adv::LeaderId<u64, u64>,
    u64,
    openraft::impls::BasicNode,
>;

/// A full snapshot in one message (the metadata state is small).
#[derive(Serialize, Deserialize)]
struct SnapshotTransfer {
    vote: Vote,
    meta: Meta,
    data: Vec<u8>,
}

/// One gRPC channel per peer address, shared by every group and every openraft client.
#[derive(Debug, Clone, Default)]
pub struct Channels {
    by_addr: Arc<RwLock<HashMap<String, Channel>>>,
}

impl Channels {
    pub fn get(&self, addr: &str) -> Result<Channel, tonic::transport::Error> {
        if let Some(c) = self.by_addr.read().ok().and_then(|m| m.get(addr).cloned()) {
            return Ok(c);
        }
        let channel = Endpoint::from_shared(format!("http://{addr}"))?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .connect_lazy();
        if let Ok(mut m) = self.by_addr.write() {
            m.insert(addr.to_string(), channel.clone());
        }
        Ok(channel)
    }
}

/// One node-to-node call under a deadline kept on both sides: the request carries it as
/// `grpc-timeout` (the server stops working on it), and a local timer ends the wait. The header
/// alone only times the call once it is on the wire; a call still waiting for its channel (a
/// reconnect to a peer that was paused, a stream the peer's connection refuses) would wait
/// without limit.
pub async fn call_within<M, T, F>(
    limit: Duration,
    message: M,
    call: impl FnOnce(tonic::Request<M>) -> F,
) -> Result<T, tonic::Status>
where
    F: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let mut request = tonic::Request::new(message);
    request.set_timeout(limit);
    match tokio::time::timeout(limit, call(request)).await {
        Ok(reply) => reply.map(tonic::Response::into_inner),
        Err(_) => Err(tonic::Status::deadline_exceeded(format!(
            "no answer within {} ms",
            limit.as_millis()
        ))),
    }
}

/// openraft's network factory for one group.
#[derive(Debug, Clone)]
pub struct GrpcNetworkFactory {
    group: String,
    channels: Channels,
}

impl GrpcNetworkFactory {
    pub fn new(group: impl Into<String>, channels: Channels) -> Self {
        Self {
            group: group.into(),
            channels,
        }
    }
}

impl RaftNetworkFactory<GroupTypeConfig> for GrpcNetworkFactory {
    type Network = GrpcNetwork;

    async fn new_client(&mut self, target: u64, node: &openraft::impls::BasicNode) -> GrpcNetwork {
        GrpcNetwork {
            target,
            group: self.group.clone(),
            client: self
                .channels
                .get(&node.addr)
                .map(RaftTransportClient::new)
                .map_err(|e| e.to_string()),
        }
    }
}

/// openraft's client for one peer.
#[derive(Debug)]
pub struct GrpcNetwork {
    target: u64,
    group: String,
    client: Result<RaftTransportClient<Channel>, String>,
}

fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, rmp_serde::encode::Error> {
    rmp_serde::to_vec_named(v)
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, rmp_serde::decode::Error> {
    rmp_serde::from_slice(bytes)
}

impl GrpcNetwork {
    /// Sends one request and decodes the serialized `Result<Resp, Err>` it answers with.
    async fn call<Req: Serialize, Resp: DeserializeOwned, E: DeserializeOwned>(
        &mut self,
        which: Rpc,
        req: &Req,
        timeout: Duration,
    ) -> Result<Result<Resp, E>, RPCError<GroupTypeConfig>> {
        let client = match &mut self.client {
            Ok(c) => c,
            Err(e) => {
                return Err(RPCError::Unreachable(Unreachable::from_string(format!(
                    "node {}: {e}",
                    self.target
                ))));
            }
        };
        let payload = encode(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let request = RaftRequest {
            group: self.group.clone(),
            payload,
        };
        // openraft derives vote and transfer timeouts from the election timeout, which
        // partition groups set to their (long) leader lease: an unanswered request must not
        // linger that long.
        let cap = match which {
            Rpc::Snapshot => MAX_SNAPSHOT_WAIT,
            Rpc::Append => MAX_APPEND_WAIT,
            Rpc::Vote | Rpc::TransferLeader => MAX_VOTE_WAIT,
        };
        let reply = call_within(timeout.min(cap), request, |r| async move {
            match which {
                Rpc::Append => client.append_entries(r).await,
                Rpc::Vote => client.vote(r).await,
                Rpc::Snapshot => client.install_snapshot(r).await,
                Rpc::TransferLeader => client.transfer_leader(r).await,
            }
        })
        .await;
        let reply = match reply {
            Ok(r) => r,
            Err(status) if status.code() == tonic::Code::Unavailable => {
                return Err(RPCError::Unreachable(Unreachable::from_string(
                    status.message(),
                )));
            }
            Err(status) => {
                return Err(RPCError::Network(NetworkError::from_string(
                    status.to_string(),
                )));
            }
        };
        if !reply.error.is_empty() {
            return Err(RPCError::Network(NetworkError::from_string(reply.error)));
        }
        decode(&reply.payload).map_err(|e| RPCError::Network(NetworkError::new(&e)))
    }
}

/// The longest a vote or leadership transfer request waits for its answer.
const MAX_VOTE_WAIT: Duration = Duration::from_secs(2);
/// The longest an append request waits for its answer.
const MAX_APPEND_WAIT: Duration = Duration::from_secs(10);
/// The longest a snapshot transfer waits for its answer.
const MAX_SNAPSHOT_WAIT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy)]
enum Rpc {
    Append,
    Vote,
    Snapshot,
    TransferLeader,
}

impl RaftNetworkV2<GroupTypeConfig> for GrpcNetwork {
    type SnapshotData = Cursor<Vec<u8>>;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<GroupTypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<GroupTypeConfig>, RPCError<GroupTypeConfig>> {
        let r: Result<_, RaftError<GroupTypeConfig>> =
            self.call(Rpc::Append, &rpc, option.hard_ttl()).await?;
        r.map_err(|e| RPCError::Network(NetworkError::new(&e)))
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<GroupTypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<GroupTypeConfig>, RPCError<GroupTypeConfig>> {
        let r: Result<_, RaftError<GroupTypeConfig>> =
            self.call(Rpc::Vote, &rpc, option.hard_ttl()).await?;
        r.map_err(|e| RPCError::Network(NetworkError::new(&e)))
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot<
            openraft::impls::leader_id_adv::LeaderId<u64, u64>,
            u64,
            openraft::impls::BasicNode,
            Cursor<Vec<u8>>,
        >,
        _cancel: impl std::future::Future<Output = ReplicationClosed> + Send + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<GroupTypeConfig>, StreamingError<GroupTypeConfig>> {
        let transfer = SnapshotTransfer {
            vote,
            meta: snapshot.meta,
            data: snapshot.snapshot.into_inner(),
        };
        let r: Result<SnapshotResponse<GroupTypeConfig>, openraft::error::Fatal<GroupTypeConfig>> =
            match self.call(Rpc::Snapshot, &transfer, option.hard_ttl()).await {
                Ok(r) => r,
                Err(RPCError::Unreachable(u)) => return Err(StreamingError::Unreachable(u)),
                Err(e) => return Err(StreamingError::Network(NetworkError::new(&e))),
            };
        r.map_err(|e| StreamingError::Network(NetworkError::new(&e)))
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<GroupTypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<GroupTypeConfig>, RPCError<GroupTypeConfig>> {
        let r: Result<_, openraft::error::Fatal<GroupTypeConfig>> = self
            .call(Rpc::TransferLeader, &req, option.hard_ttl())
            .await?;
        r.map_err(|e| RPCError::Network(NetworkError::new(&e)))
    }
}

/// The server side: routes requests to the local `Raft` of their group, and answers pings.
#[derive(Debug, Clone, Default)]
pub struct RaftTransportService {
    groups: Arc<RwLock<HashMap<String, Arc<dyn GroupEndpoint>>>>,
    node_id: Arc<std::sync::atomic::AtomicU64>,
    /// What pings answer besides the node id (leaderships, listeners).
    directory: crate::directory::Directory,
}

impl std::fmt::Debug for dyn GroupEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GroupEndpoint")
    }
}

impl RaftTransportService {
    /// The node id pings answer with, once this node knows it.
    pub fn set_node_id(&self, id: u64) {
        self.node_id.store(id, std::sync::atomic::Ordering::Relaxed);
    }

    /// The directory whose publication pings answer with.
    pub fn directory(&self) -> &crate::directory::Directory {
        &self.directory
    }

    /// Serves `raft` as group `group` from now on.
    pub fn add_group(&self, group: impl Into<String>, raft: Arc<dyn GroupEndpoint>) {
        if let Ok(mut g) = self.groups.write() {
            g.insert(group.into(), raft);
        }
    }

    /// Stops serving a group.
    pub fn remove_group(&self, group: &str) {
        if let Ok(mut g) = self.groups.write() {
            g.remove(group);
        }
    }

    /// The tonic service to mount on the node's gRPC server.
    pub fn into_server(self) -> RaftTransportServer<Self> {
        RaftTransportServer::new(self).max_decoding_message_size(64 << 20)
    }

    fn raft(&self, group: &str) -> Option<Arc<dyn GroupEndpoint>> {
        self.groups.read().ok()?.get(group).cloned()
    }

    async fn handle<Req, Resp, E, F, Fut>(
        &self,
        request: tonic::Request<RaftRequest>,
        f: F,
    ) -> Result<tonic::Response<RaftReply>, tonic::Status>
    where
        Req: DeserializeOwned,
        Resp: Serialize,
        E: Serialize,
        F: FnOnce(Arc<dyn GroupEndpoint>, Req) -> Fut,
        Fut: std::future::Future<Output = Result<Resp, E>>,
    {
        let req = request.into_inner();
        let reply = |payload: Vec<u8>, error: String| {
            Ok(tonic::Response::new(RaftReply { payload, error }))
        };
        let Some(raft) = self.raft(&req.group) else {
            return reply(Vec::new(), format!("unknown raft group {:?}", req.group));
        };
        let parsed: Req = match decode(&req.payload) {
            Ok(p) => p,
            Err(e) => return reply(Vec::new(), format!("malformed request: {e}")),
        };
        let result = f(raft, parsed).await;
        match encode(&result) {
            Ok(payload) => reply(payload, String::new()),
            Err(e) => reply(Vec::new(), format!("cannot encode response: {e}")),
        }
    }
}

#[tonic::async_trait]
impl RaftTransport for RaftTransportService {
    async fn append_entries(
        &self,
        request: tonic::Request<RaftRequest>,
    ) -> Result<tonic::Response<RaftReply>, tonic::Status> {
        self.handle(
            request,
            |raft, req: AppendEntriesRequest<GroupTypeConfig>| async move {
                raft.append_entries(req).await
            },
        )
        .await
    }

    async fn vote(
        &self,
        request: tonic::Request<RaftRequest>,
    ) -> Result<tonic::Response<RaftReply>, tonic::Status> {
        self.handle(
            request,
            |raft, req: VoteRequest<GroupTypeConfig>| async move { raft.vote(req).await },
        )
        .await
    }

    async fn install_snapshot(
        &self,
        request: tonic::Request<RaftRequest>,
    ) -> Result<tonic::Response<RaftReply>, tonic::Status> {
        self.handle(request, |raft, t: SnapshotTransfer| async move {
            raft.install_full_snapshot(
                t.vote,
                Snapshot {
                    meta: t.meta,
                    snapshot: Cursor::new(t.data),
                },
            )
            .await
        })
        .await
    }

    async fn transfer_leader(
        &self,
        request: tonic::Request<RaftRequest>,
    ) -> Result<tonic::Response<RaftReply>, tonic::Status> {
        self.handle(
            request,
            |raft, req: TransferLeaderRequest<GroupTypeConfig>| async move {
                raft.transfer_leader(req).await
            },
        )
        .await
    }

    async fn ping(
        &self,
        request: tonic::Request<PingRequest>,
    ) -> Result<tonic::Response<PingReply>, tonic::Status> {
        let (version, claims, listeners) =
            self.directory.answer(request.get_ref().leaderships_version);
        Ok(tonic::Response::new(PingReply {
            node_id: self.node_id.load(std::sync::atomic::Ordering::Relaxed),
            leaderships_version: version,
            leaderships_included: claims.is_some(),
            leaderships: claims
                .map(|c| {
                    c.iter()
                        .map(|c| aqueduct_protocol::raft::Leadership {
                            topic: c.topic.clone(),
                            partition: c.partition,
                            term: c.term,
                        })
                        .collect()
                })
                .unwrap_or_default(),
            listeners: listeners.into_iter().collect(),
            incarnation: self.directory.incarnation(),
        }))
    }
}
