//! Device integration: products (thing models) and devices, owned by this room.
//!
//! * [`model`]: thing models, their validation (errors name the field) and value checks.
//! * [`records`]: the family's metadata records, commands and apply ([`DevicesFamily`],
//!   registered with the metadata state machine on every node; DESIGN.md §3).
//! * [`commands`]: commands, property set and get, delivered through the node holding the
//!   device's session and recorded in `aq.device-commands`.
//! * [`events`]: device notifications in `aq.device-events`, numbered per device by the
//!   leader of the device's partition.
//! * [`shadow`]: each device's latest reported property values, a projection of the
//!   telemetry topics kept in the compacted `aq.device-shadows`, and its desired values.
//! * [`notify`]: a product's device notifications forwarded to an application topic.
//! * [`Registry`]: the broker-side API of the family — reads of the applied records on this
//!   node and changes proposed on the metadata leader; [`grpc`] serves it as
//!   `aqueduct.devices.v1.Devices`, the CLI's `product` and `device` commands call that.
//!
//! Invariants: a device's product exists; a product with devices is not deleted; secrets are
//! returned only once, by the create that generated them.

pub mod auth;
pub mod commands;
pub mod events;
pub mod grpc;
pub mod model;
pub mod notify;
pub mod records;
pub mod shadow;
pub mod telemetry;

use std::collections::BTreeMap;

use aqueduct_raft::types::MetaCommand;

use crate::broker::controller::Controller;
use crate::broker::{BrokerError, BrokerResult};
pub use records::{DeviceCommand, DeviceRecord, DevicesFamily, ProductRecord, Status};
use records::{FAMILY, by_product_prefix, device_key, product_key};

/// The device registry on one node (cheap to clone).
#[derive(Debug, Clone)]
pub struct Registry {
    controller: Controller,
}

fn read_error(e: std::io::Error) -> BrokerError {
    BrokerError::internal("read the device registry", e)
}

impl Registry {
    pub fn new(controller: Controller) -> Self {
        Self { controller }
    }

    pub fn controller(&self) -> &Controller {
        &self.controller
    }

    pub fn product(&self, name: &str) -> BrokerResult<Option<ProductRecord>> {
        self.controller
            .state()
            .family(FAMILY)
            .get(&product_key(name))
            .map_err(read_error)
    }

    pub fn products(&self) -> BrokerResult<Vec<ProductRecord>> {
        Ok(self
            .controller
            .state()
            .family(FAMILY)
            .scan::<ProductRecord>("product/")
            .map_err(read_error)?
            .into_iter()
            .map(|(_, p)| p)
            .collect())
    }

    /// How many devices `product` has.
    pub fn device_count(&self, product: &str) -> BrokerResult<usize> {
        self.controller
            .state()
            .family(FAMILY)
            .count(&by_product_prefix(product), usize::MAX)
            .map_err(read_error)
    }

    pub fn device(&self, id: &str) -> BrokerResult<Option<DeviceRecord>> {
        self.controller
            .state()
            .family(FAMILY)
            .get(&device_key(id))
            .map_err(read_error)
    }

    /// Every device, or `product`'s, by id.
    pub fn devices(&self, product: Option<&str>) -> BrokerResult<Vec<DeviceRecord>> {
        let view = self.controller.state().family(FAMILY);
        match product {
            None => Ok(view
                .scan::<DeviceRecord>("device/")
                .map_err(read_error)?
                .into_iter()
                .map(|(_, d)| d)
                .collect()),
            Some(p) => {
                let prefix = by_product_prefix(p);
                let mut out = Vec::new();
                for (k, ()) in view.scan::<()>(&prefix).map_err(read_error)? {
                    if let Some(d) = self.device(&k[prefix.len()..])? {
                        out.push(d);
                    }
                }
                Ok(out)
            }
        }
    }

    /// The first `limit` notifications waiting in the outbox, oldest first.
    pub fn outbox(&self, limit: usize) -> BrokerResult<Vec<(String, records::OutboxEntry)>> {
        let mut all = self
            .controller
            .state()
            .family(FAMILY)
            .scan::<records::OutboxEntry>(records::OUTBOX_PREFIX)
            .map_err(read_error)?;
        all.truncate(limit);
        Ok(all)
    }

    /// Proposes a change on the metadata leader (elsewhere: `NOT_LEADER` with its address)
    /// and waits until it is applied here.
    pub async fn propose(&self, command: &DeviceCommand) -> BrokerResult<()> {
        let command = serde_json::to_value(command)
            .map_err(|e| BrokerError::internal("encode a devices command", e))?;
        self.controller
            .propose(MetaCommand::Family {
                family: FAMILY.to_string(),
                command,
            })
            .await
    }

    /// Ok when this node leads the metadata group and has applied everything committed
    /// before the call (reads after it are current).
    pub async fn current(&self) -> BrokerResult<()> {
        self.controller.require_leader()?;
        self.controller.linearizable().await
    }
}

/// A new random device secret: 32 lowercase hex characters (128 bits).
pub fn generate_secret() -> String {
    let bytes: [u8; 16] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `k=v,k2=v2` as tags (an empty string: none).
pub fn parse_tags(s: &str) -> Result<BTreeMap<String, String>, String> {
    let mut tags = BTreeMap::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let Some((k, v)) = part.split_once('=') else {
            return Err(format!("tag {part:?} is not key=value"));
        };
        tags.insert(k.trim().to_string(), v.trim().to_string());
    }
    Ok(tags)
}

/// Milliseconds since the Unix epoch, now (proposers stamp records with it).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
