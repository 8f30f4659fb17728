//! The native gRPC services on the gRPC port, thin adapters over the broker API
//! ([`crate::broker`]): each turns its request into a broker call and a [`BrokerError`] into
//! a status with the stable `aq-error` name (and `aq-leader` / `aq-replicas` redirects).

pub mod data;
pub mod groups;

use tonic::metadata::MetadataValue;
use tonic::{Code, Status};

use crate::broker::{BrokerError, ErrorCode, Redirect};

/// The gRPC status code of a broker error: `UNAVAILABLE` for what a client simply retries.
fn grpc_code(code: ErrorCode) -> Code {
    match code {
        ErrorCode::NotLeader
        | ErrorCode::NotReplica
        | ErrorCode::OutOfOrderSequenceNumber
        | ErrorCode::InvalidProducerEpoch
        | ErrorCode::ReassignmentInProgress
        | ErrorCode::NotCoordinator
        | ErrorCode::UnknownMemberId
        | ErrorCode::IllegalGeneration
        | ErrorCode::RebalanceInProgress
        | ErrorCode::NonEmptyGroup
        | ErrorCode::FencedInstanceId
        | ErrorCode::GroupSubscribedToTopic
        | ErrorCode::PolicyViolation
        | ErrorCode::InUse
        | ErrorCode::DeviceOffline => Code::FailedPrecondition,
        ErrorCode::TimedOut => Code::DeadlineExceeded,
        ErrorCode::LeaderNotAvailable
        | ErrorCode::NotController
        | ErrorCode::TryAgain
        | ErrorCode::CoordinatorLoadInProgress
        | ErrorCode::CoordinatorNotAvailable => Code::Unavailable,
        ErrorCode::UnknownTopicOrPartition
        | ErrorCode::UnknownNode
        | ErrorCode::GroupIdNotFound
        | ErrorCode::NotFound => Code::NotFound,
        ErrorCode::TopicExists | ErrorCode::AlreadyExists => Code::AlreadyExists,
        ErrorCode::CorruptMessage
        | ErrorCode::RecordBatchTooLarge
        | ErrorCode::InvalidTopicName
        | ErrorCode::InvalidPartitions
        | ErrorCode::InvalidReplicationFactor
        | ErrorCode::InvalidConfig
        | ErrorCode::InvalidRequest
        | ErrorCode::UnsupportedForMessageFormat
        | ErrorCode::InconsistentGroupProtocol
        | ErrorCode::InvalidSessionTimeout
        | ErrorCode::InvalidGroupId => Code::InvalidArgument,
        ErrorCode::OffsetOutOfRange => Code::OutOfRange,
        ErrorCode::Internal => Code::Internal,
    }
}

/// A broker error as a gRPC status; `name` is the `aq-error` name this service uses for it.
pub fn status_named(e: &BrokerError, name: &'static str) -> Status {
    let mut status = Status::new(grpc_code(e.code), e.message.clone());
    let md = status.metadata_mut();
    md.insert("aq-error", MetadataValue::from_static(name));
    match &e.redirect {
        Redirect::None => {}
        Redirect::Leader { addr, .. } => {
            if let Ok(v) = addr.parse() {
                md.insert("aq-leader", v);
            }
        }
        Redirect::Replicas(addrs) => {
            if let Ok(v) = addrs.join(",").parse() {
                md.insert("aq-replicas", v);
            }
        }
    }
    status
}

/// A broker error as a gRPC status with the broker's own `aq-error` name.
pub fn status(e: &BrokerError) -> Status {
    status_named(e, e.code.as_str())
}
