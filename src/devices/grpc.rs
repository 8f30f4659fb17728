//! `aqueduct.devices.v1.Devices`: the device registry's admin API over gRPC, an adapter over
//! [`Registry`]. Every call is answered on the metadata leader (reads after a read index, so
//! they see every change acknowledged before them).

use aqueduct_protocol::devices as pb;
use aqueduct_protocol::devices::devices_server::Devices;
use tonic::{Request, Response, Status};

use super::commands::{self, Commands};
use super::events::{Events, Sequencer, report_from_pb};
use super::model::ThingModel;
use super::records::{
    DeviceCommand, DeviceRecord, MAX_IMPORT, Notifications, ProductRecord, Status as State,
};
use super::shadow::Shadows;
use super::{Registry, generate_secret, now_ms};
use crate::broker::{BrokerError, ErrorCode};
use crate::grpc::status;

/// The service (served by every node).
#[derive(Debug, Clone)]
pub struct DevicesService {
    registry: Registry,
    sequencer: Sequencer,
    events: Events,
    commands: Commands,
    shadows: Shadows,
}

impl DevicesService {
    pub fn new(
        registry: Registry,
        sequencer: Sequencer,
        events: Events,
        commands: Commands,
        shadows: Shadows,
    ) -> Self {
        Self {
            registry,
            sequencer,
            events,
            commands,
            shadows,
        }
    }

    pub fn into_server(self) -> pb::devices_server::DevicesServer<Self> {
        // An import of 20,000 devices is a few MiB.
        pb::devices_server::DevicesServer::new(self).max_decoding_message_size(64 << 20)
    }

    async fn current(&self) -> Result<(), Status> {
        self.registry.current().await.map_err(|e| status(&e))
    }

    fn product_pb(&self, p: ProductRecord) -> Result<pb::Product, Status> {
        let devices = self
            .registry
            .device_count(&p.name)
            .map_err(|e| status(&e))?;
        Ok(pb::Product {
            model_json: serde_json::to_string(&p.model).unwrap_or_default(),
            name: p.name,
            application: p.application,
            created_at_ms: p.created_at_ms,
            devices: devices as u64,
            notifications: p.notifications.map(|n| pb::Notifications {
                topic: n.topic,
                events: n.events,
                since_ms: n.since_ms,
            }),
        })
    }

    fn device(&self, id: &str) -> Result<DeviceRecord, Status> {
        self.registry
            .device(id)
            .map_err(|e| status(&e))?
            .ok_or_else(|| not_found(format!("device {id} does not exist")))
    }

    /// A device record from a create request (the secret generated when none is given).
    fn new_device(
        &self,
        r: pb::CreateDeviceRequest,
        at: i64,
    ) -> Result<(DeviceRecord, bool), Status> {
        let product = self
            .registry
            .product(&r.product)
            .map_err(|e| status(&e))?
            .ok_or_else(|| {
                if r.product.is_empty() {
                    invalid(format!("device {}: name its product", r.device_id))
                } else {
                    not_found(format!(
                        "device {}: product {} does not exist",
                        r.device_id, r.product
                    ))
                }
            })?;
        let state = parse_status(&r.status)?.unwrap_or_default();
        let generated = r.secret.is_empty();
        Ok((
            DeviceRecord {
                device_id: r.device_id,
                product: r.product,
                application: if r.application.is_empty() {
                    product.application
                } else {
                    r.application
                },
                secret: if generated {
                    generate_secret()
                } else {
                    r.secret
                },
                status: state,
                tags: r.tags.into_iter().collect(),
                created_at_ms: at,
                updated_at_ms: at,
                version: 0,
            },
            generated,
        ))
    }
}

fn not_found(message: String) -> Status {
    status(&BrokerError::new(ErrorCode::NotFound, message))
}

fn invalid(message: String) -> Status {
    status(&BrokerError::new(ErrorCode::InvalidConfig, message))
}

fn parse_status(s: &str) -> Result<Option<State>, Status> {
    if s.is_empty() {
        return Ok(None);
    }
    State::parse(s)
        .map(Some)
        .ok_or_else(|| invalid(format!("status {s:?}: use enabled or disabled")))
}

pub fn device_pb(d: DeviceRecord) -> pb::Device {
    pb::Device {
        device_id: d.device_id,
        product: d.product,
        application: d.application,
        status: d.status.as_str().to_string(),
        tags: d.tags.into_iter().collect(),
        created_at_ms: d.created_at_ms,
        updated_at_ms: d.updated_at_ms,
    }
}

#[tonic::async_trait]
impl Devices for DevicesService {
    async fn create_product(
        &self,
        request: Request<pb::CreateProductRequest>,
    ) -> Result<Response<pb::CreateProductReply>, Status> {
        let r = request.into_inner();
        let model =
            ThingModel::parse(r.model_json.as_bytes()).map_err(|e| invalid(e.to_string()))?;
        let name = model.name.clone();
        let product = ProductRecord {
            name: name.clone(),
            application: if r.application.is_empty() {
                aqueduct_raft::types::DEFAULT_APPLICATION.to_string()
            } else {
                r.application
            },
            model,
            created_at_ms: now_ms(),
            version: 0,
            notifications: None,
        };
        self.registry
            .propose(&DeviceCommand::CreateProduct { product })
            .await
            .map_err(|e| status(&e))?;
        let p = self
            .registry
            .product(&name)
            .map_err(|e| status(&e))?
            .ok_or_else(|| not_found(format!("product {name} was deleted meanwhile")))?;
        Ok(Response::new(pb::CreateProductReply {
            product: Some(self.product_pb(p)?),
        }))
    }

    async fn list_products(
        &self,
        _request: Request<pb::ListProductsRequest>,
    ) -> Result<Response<pb::ListProductsReply>, Status> {
        self.current().await?;
        let products = self
            .registry
            .products()
            .map_err(|e| status(&e))?
            .into_iter()
            .map(|p| self.product_pb(p))
            .collect::<Result<_, _>>()?;
        Ok(Response::new(pb::ListProductsReply { products }))
    }

    async fn get_product(
        &self,
        request: Request<pb::GetProductRequest>,
    ) -> Result<Response<pb::GetProductReply>, Status> {
        self.current().await?;
        let name = request.into_inner().name;
        let p = self
            .registry
            .product(&name)
            .map_err(|e| status(&e))?
            .ok_or_else(|| not_found(format!("product {name} does not exist")))?;
        Ok(Response::new(pb::GetProductReply {
            product: Some(self.product_pb(p)?),
        }))
    }

    async fn delete_product(
        &self,
        request: Request<pb::DeleteProductRequest>,
    ) -> Result<Response<pb::DeleteProductReply>, Status> {
        let name = request.into_inner().name;
        self.registry
            .propose(&DeviceCommand::DeleteProduct { name })
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(pb::DeleteProductReply {}))
    }

    async fn set_notifications(
        &self,
        request: Request<pb::SetNotificationsRequest>,
    ) -> Result<Response<pb::SetNotificationsReply>, Status> {
        let r = request.into_inner();
        let notifications = r.notifications.map(|n| Notifications {
            topic: n.topic,
            events: n.events,
            // Forwarded from now on (the events already recorded stay where they are).
            since_ms: now_ms(),
        });
        self.registry
            .propose(&DeviceCommand::SetNotifications {
                product: r.product.clone(),
                notifications,
            })
            .await
            .map_err(|e| status(&e))?;
        self.current().await?;
        let p = self
            .registry
            .product(&r.product)
            .map_err(|e| status(&e))?
            .ok_or_else(|| not_found(format!("product {} does not exist", r.product)))?;
        Ok(Response::new(pb::SetNotificationsReply {
            product: Some(self.product_pb(p)?),
        }))
    }

    async fn create_device(
        &self,
        request: Request<pb::CreateDeviceRequest>,
    ) -> Result<Response<pb::CreateDeviceReply>, Status> {
        self.current().await?;
        let (device, generated) = self.new_device(request.into_inner(), now_ms())?;
        let secret = if generated {
            device.secret.clone()
        } else {
            String::new()
        };
        let id = device.device_id.clone();
        self.registry
            .propose(&DeviceCommand::CreateDevices {
                devices: vec![device],
            })
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(pb::CreateDeviceReply {
            device: Some(device_pb(self.device(&id)?)),
            secret,
        }))
    }

    async fn update_device(
        &self,
        request: Request<pb::UpdateDeviceRequest>,
    ) -> Result<Response<pb::UpdateDeviceReply>, Status> {
        let r = request.into_inner();
        let status_change = match &r.status {
            Some(s) => Some(
                parse_status(s)?
                    .ok_or_else(|| invalid("status: use enabled or disabled".into()))?,
            ),
            None => None,
        };
        let id = r.device_id.clone();
        self.registry
            .propose(&DeviceCommand::UpdateDevice {
                device_id: r.device_id,
                secret: r.secret,
                status: status_change,
                tags: r.set_tags.then(|| r.tags.into_iter().collect()),
                at_ms: now_ms(),
            })
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(pb::UpdateDeviceReply {
            device: Some(device_pb(self.device(&id)?)),
        }))
    }

    async fn list_devices(
        &self,
        request: Request<pb::ListDevicesRequest>,
    ) -> Result<Response<pb::ListDevicesReply>, Status> {
        self.current().await?;
        let product = request.into_inner().product;
        let product = (!product.is_empty()).then_some(product);
        if let Some(p) = &product
            && self.registry.product(p).map_err(|e| status(&e))?.is_none()
        {
            return Err(not_found(format!("product {p} does not exist")));
        }
        let devices = self
            .registry
            .devices(product.as_deref())
            .map_err(|e| status(&e))?
            .into_iter()
            .map(device_pb)
            .collect();
        Ok(Response::new(pb::ListDevicesReply { devices }))
    }

    async fn get_device(
        &self,
        request: Request<pb::GetDeviceRequest>,
    ) -> Result<Response<pb::GetDeviceReply>, Status> {
        self.current().await?;
        let d = self.device(&request.into_inner().device_id)?;
        let presence = match self.events.presence(&d.device_id).await {
            Ok(p) => Some(p),
            Err(e) => {
                tracing::debug!(device = %d.device_id, error = %e, "device presence unknown");
                None
            }
        };
        let shadow_json = match self.shadows.shadow(&d.device_id).await {
            Ok(s) => s
                .and_then(|s| serde_json::to_string(&s).ok())
                .unwrap_or_default(),
            Err(e) => {
                tracing::debug!(device = %d.device_id, error = %e, "device shadow unknown");
                String::new()
            }
        };
        Ok(Response::new(pb::GetDeviceReply {
            device: Some(device_pb(d)),
            presence,
            shadow_json,
        }))
    }

    async fn delete_device(
        &self,
        request: Request<pb::DeleteDeviceRequest>,
    ) -> Result<Response<pb::DeleteDeviceReply>, Status> {
        let device_id = request.into_inner().device_id;
        self.registry
            .propose(&DeviceCommand::DeleteDevice {
                device_id,
                at_ms: now_ms(),
            })
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(pb::DeleteDeviceReply {}))
    }

    async fn import_devices(
        &self,
        request: Request<pb::ImportDevicesRequest>,
    ) -> Result<Response<pb::ImportDevicesReply>, Status> {
        self.current().await?;
        let requests = request.into_inner().devices;
        if requests.is_empty() || requests.len() > MAX_IMPORT {
            return Err(invalid(format!(
                "import 1 to {MAX_IMPORT} devices at once, not {}",
                requests.len()
            )));
        }
        let at = now_ms();
        let mut devices = Vec::with_capacity(requests.len());
        let mut secrets = Vec::new();
        for r in requests {
            let (d, generated) = self.new_device(r, at)?;
            if generated {
                secrets.push(pb::GeneratedSecret {
                    device_id: d.device_id.clone(),
                    secret: d.secret.clone(),
                });
            }
            devices.push(d);
        }
        let created = devices.len() as u32;
        self.registry
            .propose(&DeviceCommand::CreateDevices { devices })
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(pb::ImportDevicesReply { created, secrets }))
    }

    async fn record_events(
        &self,
        request: Request<pb::RecordEventsRequest>,
    ) -> Result<Response<pb::RecordEventsReply>, Status> {
        let r = request.into_inner();
        let reports = r
            .reports
            .into_iter()
            .map(report_from_pb)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| status(&BrokerError::new(ErrorCode::InvalidRequest, e)))?;
        let seqs = self
            .sequencer
            .sequence(r.partition, &reports)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(pb::RecordEventsReply {
            outcomes: seqs
                .into_iter()
                .map(|s| pb::EventOutcome {
                    recorded: s.is_some(),
                    seq: s.unwrap_or(0),
                })
                .collect(),
        }))
    }

    async fn send_command(
        &self,
        request: Request<pb::SendCommandRequest>,
    ) -> Result<Response<pb::SendCommandReply>, Status> {
        let r = request.into_inner();
        let kind = commands::Kind::parse(&r.kind).ok_or_else(|| {
            invalid(format!(
                "kind {:?}: use command, set_properties or get_properties",
                r.kind
            ))
        })?;
        let params = if r.params_json.trim().is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_str(&r.params_json)
                .map_err(|e| invalid(format!("the parameters are not JSON: {e}")))?
        };
        let answer = self
            .commands
            .send(commands::Request {
                device_id: r.device_id,
                kind,
                service_id: r.service_id,
                command_name: r.command_name,
                params,
                timeout: std::time::Duration::from_millis(r.timeout_ms),
            })
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(pb::SendCommandReply {
            request_id: answer.request_id,
            response_json: answer.response.to_string(),
        }))
    }

    async fn get_shadow(
        &self,
        request: Request<pb::GetShadowRequest>,
    ) -> Result<Response<pb::GetShadowReply>, Status> {
        let device_id = request.into_inner().device_id;
        if !self.shadows.leads() {
            return Err(status(&BrokerError::new(
                ErrorCode::NotLeader,
                "this node does not keep the device shadows",
            )));
        }
        let shadow = self
            .shadows
            .shadow(&device_id)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(pb::GetShadowReply {
            shadow_json: shadow
                .and_then(|s| serde_json::to_string(&s).ok())
                .unwrap_or_default(),
        }))
    }

    async fn set_desired(
        &self,
        request: Request<pb::SetDesiredRequest>,
    ) -> Result<Response<pb::SetDesiredReply>, Status> {
        let r = request.into_inner();
        let values = match serde_json::from_str(&r.params_json) {
            _ if r.params_json.trim().is_empty() => serde_json::Map::new(),
            Ok(serde_json::Value::Object(m)) => m,
            Ok(other) => {
                return Err(invalid(format!(
                    "the desired values must be a JSON object, not {other}"
                )));
            }
            Err(e) => return Err(invalid(format!("the desired values are not JSON: {e}"))),
        };
        let shadow = self
            .shadows
            .set_desired(&r.device_id, &r.service_id, values, r.clear, r.forwarded)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(pb::SetDesiredReply {
            shadow_json: serde_json::to_string(&shadow).unwrap_or_default(),
        }))
    }

    async fn get_presence(
        &self,
        request: Request<pb::PresenceRequest>,
    ) -> Result<Response<pb::Presence>, Status> {
        let r = request.into_inner();
        let p = self
            .sequencer
            .presence(r.partition, &r.device_id)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(p))
    }

    async fn deliver(
        &self,
        request: Request<pb::DeliverRequest>,
    ) -> Result<Response<pb::DeliverReply>, Status> {
        let r = request.into_inner();
        let timeout = std::time::Duration::from_millis(r.timeout_ms).min(commands::MAX_TIMEOUT);
        let outcome = self
            .commands
            .sessions()
            .deliver(
                &r.device_id,
                &r.request_id,
                r.topic,
                r.payload.into(),
                timeout,
            )
            .await;
        Ok(Response::new(commands::delivered_pb(outcome)))
    }
}
