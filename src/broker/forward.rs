//! Calls from this node to another node's gRPC services on the broker's behalf (the
//! metadata leader's cluster API, a partition leader's data service), and the broker errors
//! their refusals carry.
//!
//! Only the `aq-error` names the services themselves send are read: the broker's own names
//! ([`ErrorCode::as_str`]) and the cluster API's, which differ for a few codes.

use super::error::{BrokerError, ErrorCode, Redirect};

/// The broker error a refusal of one of our own gRPC services stands for.
pub fn from_status(status: &tonic::Status) -> BrokerError {
    let name = status
        .metadata()
        .get("aq-error")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let code = match name {
        "NOT_LEADER" => ErrorCode::NotLeader,
        "NO_LEADER" => ErrorCode::NotController,
        "LEADER_NOT_AVAILABLE" => ErrorCode::LeaderNotAvailable,
        "NOT_REPLICA" => ErrorCode::NotReplica,
        "TOPIC_EXISTS" => ErrorCode::TopicExists,
        "UNKNOWN_TOPIC" | "UNKNOWN_TOPIC_OR_PARTITION" => ErrorCode::UnknownTopicOrPartition,
        "INVALID_PARTITION" => ErrorCode::InvalidPartitions,
        "INVALID_REPLICATION_FACTOR" => ErrorCode::InvalidReplicationFactor,
        "INVALID_TOPIC_NAME" => ErrorCode::InvalidTopicName,
        "INVALID_CONFIG" => ErrorCode::InvalidConfig,
        "INVALID_REQUEST" => ErrorCode::InvalidRequest,
        "REASSIGNMENT_IN_PROGRESS" => ErrorCode::ReassignmentInProgress,
        "TRY_AGAIN" | "NOT_CAUGHT_UP" => ErrorCode::TryAgain,
        "UNKNOWN_NODE" => ErrorCode::UnknownNode,
        "CORRUPT_MESSAGE" => ErrorCode::CorruptMessage,
        "RECORD_BATCH_TOO_LARGE" => ErrorCode::RecordBatchTooLarge,
        "OFFSET_OUT_OF_RANGE" => ErrorCode::OffsetOutOfRange,
        "OUT_OF_ORDER_SEQUENCE_NUMBER" => ErrorCode::OutOfOrderSequenceNumber,
        "INVALID_PRODUCER_EPOCH" => ErrorCode::InvalidProducerEpoch,
        "UNSUPPORTED_FOR_MESSAGE_FORMAT" => ErrorCode::UnsupportedForMessageFormat,
        // No name: the call did not reach the service (connection refused, timed out).
        _ if matches!(
            status.code(),
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
        ) =>
        {
            ErrorCode::LeaderNotAvailable
        }
        _ => ErrorCode::Internal,
    };
    let mut e = BrokerError::new(code, status.message().to_string());
    let header = |k: &str| {
        status
            .metadata()
            .get(k)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    if let Some(addr) = header("aq-leader") {
        e = e.with_redirect(Redirect::Leader { node: 0, addr });
    } else if let Some(addrs) = header("aq-replicas") {
        e = e.with_redirect(Redirect::Replicas(
            addrs.split(',').map(str::to_string).collect(),
        ));
    }
    e
}

/// Runs `call` against the metadata leader's cluster API: tries `servers` (gRPC addresses) in
/// turn, follows `NOT_LEADER` redirects, and retries retriable refusals until `within`.
pub async fn on_meta_leader<T, F, Fut>(
    channels: &aqueduct_raft::network::Channels,
    servers: &[String],
    within: std::time::Duration,
    call: F,
) -> Result<T, BrokerError>
where
    F: Fn(
        aqueduct_protocol::cluster::cluster_client::ClusterClient<tonic::transport::Channel>,
    ) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let deadline = tokio::time::Instant::now() + within;
    let mut next = 0usize;
    let mut redirect: Option<String> = None;
    loop {
        let addr = match redirect.take() {
            Some(a) => a,
            None if servers.is_empty() => {
                return Err(BrokerError::new(ErrorCode::NotController, "no node to ask"));
            }
            None => {
                next += 1;
                servers[(next - 1) % servers.len()].clone()
            }
        };
        let outcome = match channels.get(&addr) {
            Ok(channel) => {
                let client =
                    aqueduct_protocol::cluster::cluster_client::ClusterClient::new(channel);
                match tokio::time::timeout_at(deadline, call(client)).await {
                    Ok(Ok(r)) => return Ok(r.into_inner()),
                    Ok(Err(status)) => from_status(&status),
                    Err(_) => BrokerError::new(
                        ErrorCode::NotController,
                        format!("no answer from {addr} in time"),
                    ),
                }
            }
            Err(e) => BrokerError::new(ErrorCode::NotController, format!("{addr}: {e}")),
        };
        if !outcome.code.retriable() || tokio::time::Instant::now() >= deadline {
            return Err(outcome);
        }
        match outcome.redirect {
            Redirect::Leader { addr, .. } => redirect = Some(addr),
            _ => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
        }
    }
}
