//! The admin client: calls the cluster API on the metadata leader, wherever it is.
//!
//! [`AdminClient`] starts from bootstrap addresses (`--server`, `AQUEDUCT_SERVER`). It tries
//! them in turn; a node that is not the leader answers `NOT_LEADER` with the leader's address
//! and the client goes there; while no leader is known (`NO_LEADER`) or a node cannot be
//! reached it waits briefly and tries again, until its deadline (status `UNAVAILABLE` always
//! means "retry"). Any other refusal ends the call with the server's stable code and message.
//! Writes are safe to retry: the server recognises a repeated topic creation by its request id
//! and a repeated node removal by the removed node's tombstone.

use std::future::Future;
use std::time::Duration;

use aqueduct_protocol::cluster::cluster_client::ClusterClient;
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Response, Status};

use super::{ClientError, error_chain, error_code};

/// A client of the cluster admin API.
#[derive(Debug, Clone)]
pub struct AdminClient {
    servers: Vec<String>,
    timeout: Duration,
}

/// Shortest bound on one node's answer before the next node is tried; an attempt may take
/// up to half the whole timeout when that is longer (calls are safe to repeat: creates carry
/// a request id, the rest are idempotent).
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);

impl AdminClient {
    /// `servers` are `HOST:PORT` bootstrap addresses; `timeout` bounds each call, retries
    /// included.
    pub fn new(servers: Vec<String>, timeout: Duration) -> Self {
        Self { servers, timeout }
    }

    /// A connection to one node's cluster API.
    pub async fn connect(addr: &str) -> Result<ClusterClient<Channel>, ClientError> {
        Ok(ClusterClient::new(Self::channel(addr).await?))
    }

    /// A channel to one node (any of its gRPC services).
    pub async fn channel(addr: &str) -> Result<Channel, ClientError> {
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|_| ClientError::BadAddress(addr.to_string()))?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true);
        endpoint
            .connect()
            .await
            .map_err(|e| ClientError::Unreachable {
                servers: addr.to_string(),
                secs: 2,
                last: error_chain(&e),
            })
    }

    /// Runs `call` against the metadata leader's cluster API (see the module doc).
    pub async fn on_leader<T, F, Fut>(&self, call: F) -> Result<T, ClientError>
    where
        F: Fn(ClusterClient<Channel>) -> Fut,
        Fut: Future<Output = Result<Response<T>, Status>>,
    {
        self.on_leader_channel(|ch| call(ClusterClient::new(ch)))
            .await
    }

    /// Runs `call` on a channel to the metadata leader, for any service answered there (the
    /// device registry's, …), with the same redirects and retries.
    pub async fn on_leader_channel<T, F, Fut>(&self, call: F) -> Result<T, ClientError>
    where
        F: Fn(Channel) -> Fut,
        Fut: Future<Output = Result<Response<T>, Status>>,
    {
        let deadline = Instant::now() + self.timeout;
        let mut leader: Option<String> = None;
        let mut next = 0usize;
        let mut last: String;
        let mut redirects = 0u64;
        loop {
            let addr = match leader.take() {
                Some(a) => a,
                None => {
                    let a = self.servers[next % self.servers.len()].clone();
                    next += 1;
                    a
                }
            };
            // One node may accept connections and never answer (paused, overloaded): give
            // each attempt a bound of its own so the others get their turn.
            let attempt = deadline.min(Instant::now() + ATTEMPT_TIMEOUT.max(self.timeout / 2));
            let outcome = match Self::channel(&addr).await {
                Ok(client) => match tokio::time::timeout_at(attempt, call(client)).await {
                    Ok(r) => r,
                    Err(_) => Err(Status::deadline_exceeded("call timed out")),
                },
                Err(ClientError::BadAddress(a)) => return Err(ClientError::BadAddress(a)),
                Err(e) => Err(Status::unavailable(e.to_string())),
            };
            match outcome {
                Ok(r) => return Ok(r.into_inner()),
                Err(status) => {
                    last = format!("{addr}: {}", status.message());
                    let code = error_code(&status);
                    if code == Some("NOT_LEADER") {
                        leader = status
                            .metadata()
                            .get("aq-leader")
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_string);
                        if leader.is_some() {
                            // Nodes with stale views could bounce us around: back off a
                            // little more after each consecutive redirect.
                            redirects += 1;
                            let pause = Duration::from_millis(20 * redirects.min(10));
                            if Instant::now() + pause >= deadline {
                                break;
                            }
                            tokio::time::sleep(pause).await;
                            continue;
                        }
                    } else if status.code() == Code::Unavailable
                        || (code.is_none()
                            && matches!(
                                status.code(),
                                Code::DeadlineExceeded | Code::Cancelled | Code::Unknown
                            ))
                    {
                        // Retryable: no leader yet, a learner catching up, a membership change
                        // under way, or the connection broke.
                    } else {
                        return Err(ClientError::Refused {
                            code: code
                                .map_or_else(|| format!("{:?}", status.code()), str::to_string),
                            message: status.message().to_string(),
                        });
                    }
                }
            }
            redirects = 0;
            // No answer and no redirect: pause before the next try.
            let pause = Instant::now() + Duration::from_millis(200);
            if pause >= deadline {
                break;
            }
            tokio::time::sleep_until(pause).await;
        }
        Err(ClientError::Unreachable {
            servers: self.servers.join(","),
            secs: self.timeout.as_secs(),
            last,
        })
    }
}
