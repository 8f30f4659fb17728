//! The Rust client of Aqueduct, used by the CLI and the benchmarks.
//!
//! * [`AdminClient`] calls the cluster API on the metadata leader, wherever it is;
//! * [`router::Router`] knows a topic's partitions and their leaders and sends data requests
//!   to them, following redirects and retrying through leader changes;
//! * [`producer::Producer`] batches records per partition (size and linger), partitions keyed
//!   records with murmur2 as the Java Kafka client does, retries, and is idempotent: a
//!   producer id and per-partition sequence numbers let the leader recognise a retried batch,
//!   so a record is never written twice, also across a leader change;
//! * [`consumer::Consumer`] reads partitions, alone or as a member of a consumer group
//!   (range, round-robin or sticky assignment), committing automatically or by hand;
//! * [`records`] encodes and decodes Kafka RecordBatch v2, Aqueduct's native format.
//!
//! Every call returns a [`ClientError`]; a refusal carries the server's stable code.

mod admin;
pub mod consumer;
pub mod group;
pub mod producer;
pub mod router;

/// The record codec, shared with the broker.
pub use crate::broker::records;

pub use admin::AdminClient;

use tonic::Status;

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server refused the request; `code` is the stable `aq-error` code.
    #[error("{message} ({code})")]
    Refused { code: String, message: String },
    /// No server answered usefully before the deadline.
    #[error("no metadata leader reachable via {servers} within {secs} s (last error: {last})")]
    Unreachable {
        servers: String,
        secs: u64,
        last: String,
    },
    /// No leader of a partition answered before the deadline.
    #[error("no leader of {topic}/{partition} answered within {secs} s (last error: {last})")]
    NoLeader {
        topic: String,
        partition: u32,
        secs: u64,
        last: String,
    },
    #[error("invalid server address {0:?}")]
    BadAddress(String),
    #[error("unknown topic {0:?} (UNKNOWN_TOPIC_OR_PARTITION)")]
    UnknownTopic(String),
    #[error("topic {topic} has {partitions} partitions, not {} (UNKNOWN_TOPIC_OR_PARTITION)", partition + 1)]
    UnknownPartition {
        topic: String,
        partition: u32,
        partitions: u32,
    },
    /// Records could not be encoded or fetched batches decoded.
    #[error("record batch: {0}")]
    Records(String),
    /// The producer or consumer was closed, or its background task stopped.
    #[error("the client is closed")]
    Closed,
}

impl From<records::RecordsError> for ClientError {
    fn from(e: records::RecordsError) -> Self {
        ClientError::Records(e.0)
    }
}

impl ClientError {
    /// The stable code of a refusal, if this is one.
    pub fn code(&self) -> Option<&str> {
        match self {
            ClientError::Refused { code, .. } => Some(code),
            ClientError::UnknownTopic(_) | ClientError::UnknownPartition { .. } => {
                Some("UNKNOWN_TOPIC_OR_PARTITION")
            }
            _ => None,
        }
    }

    /// A refusal from a status that carries (or lacks) a stable code.
    pub(crate) fn refused(status: &Status) -> Self {
        ClientError::Refused {
            code: error_code(status).map_or_else(|| format!("{:?}", status.code()), str::to_string),
            message: status.message().to_string(),
        }
    }
}

/// The `aq-error` code of a status, if the server set one.
pub(crate) fn error_code(status: &Status) -> Option<&str> {
    status.metadata().get("aq-error")?.to_str().ok()
}

/// An error and its sources on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let c = cause.to_string();
        if !s.contains(&c) {
            s.push_str(": ");
            s.push_str(&c);
        }
        source = cause.source();
    }
    s
}
