//! The data service (`aqueduct.data.v1.Data`, see `protocol/proto/aqueduct/data.proto`):
//! produce, fetch and list offsets, each one call of the broker API on the partition leader.
//! Refusals carry the broker's stable `aq-error` name.

use std::time::Duration;

use aqueduct_protocol::data as pb;
use aqueduct_protocol::data::data_server::{Data, DataServer};
use bytes::Bytes;
use tonic::{Request, Response, Status};

use super::status;
use crate::broker::{self, Broker};

/// Largest request the data service decodes at all: larger than a batch may be, so that an
/// oversized batch reaches the broker and gets its typed refusal; still bounded.
const MAX_REQUEST_BYTES: usize = 16 << 20;

/// The data service of one node.
#[derive(Debug, Clone)]
pub struct DataService {
    broker: Broker,
}

impl DataService {
    pub fn new(broker: Broker) -> Self {
        Self { broker }
    }

    pub fn into_server(self) -> DataServer<Self> {
        DataServer::new(self).max_decoding_message_size(MAX_REQUEST_BYTES)
    }
}

#[tonic::async_trait]
impl Data for DataService {
    async fn produce(
        &self,
        request: Request<pb::ProduceRequest>,
    ) -> Result<Response<pb::ProduceReply>, Status> {
        let req = request.into_inner();
        let acks = match pb::Acks::try_from(req.acks).unwrap_or(pb::Acks::All) {
            pb::Acks::All => broker::Acks::All,
            pb::Acks::Leader => broker::Acks::Leader,
        };
        let produced = self
            .broker
            .produce(broker::ProduceRequest {
                topic: req.topic,
                partition: req.partition,
                batch: Bytes::from(req.batch),
                acks,
            })
            .await
            .map_err(|e| status(&e))?;
        if crate::faults::Faults::drop_reply() {
            tracing::warn!("injected fault: dropping an acknowledged produce reply");
            return Err(Status::unavailable("injected fault: reply dropped"));
        }
        Ok(Response::new(pb::ProduceReply {
            base_offset: produced.base_offset,
            last_offset: produced.last_offset,
            duplicate: produced.duplicate,
        }))
    }

    async fn fetch(
        &self,
        request: Request<pb::FetchRequest>,
    ) -> Result<Response<pb::FetchReply>, Status> {
        let req = request.into_inner();
        let fetched = self
            .broker
            .fetch(broker::FetchRequest {
                topic: req.topic,
                partition: req.partition,
                offset: req.offset,
                max_bytes: req.max_bytes as usize,
                max_wait: Duration::from_millis(u64::from(req.max_wait_ms)),
            })
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(pb::FetchReply {
            batches: fetched.batches.to_vec(),
            high_watermark: fetched.high_watermark,
            log_start_offset: fetched.log_start_offset,
        }))
    }

    async fn list_offsets(
        &self,
        request: Request<pb::ListOffsetsRequest>,
    ) -> Result<Response<pb::ListOffsetsReply>, Status> {
        let req = request.into_inner();
        let spec = match pb::OffsetSpec::try_from(req.spec).unwrap_or(pb::OffsetSpec::Latest) {
            pb::OffsetSpec::Earliest => broker::OffsetSpec::Earliest,
            pb::OffsetSpec::Latest => broker::OffsetSpec::Latest,
            pb::OffsetSpec::Timestamp => broker::OffsetSpec::Timestamp(req.timestamp_ms),
        };
        let offset = self
            .broker
            .list_offsets(&req.topic, req.partition, spec)
            .map_err(|e| status(&e))?;
        Ok(Response::new(pb::ListOffsetsReply { offset }))
    }
}
