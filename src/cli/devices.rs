//! `aqueduct product …` and `aqueduct device …`: the device registry's admin commands, calls
//! of `aqueduct.devices.v1.Devices` on the metadata leader.

use std::collections::BTreeMap;
use std::path::PathBuf;

use aqueduct_protocol::devices as pb;
use aqueduct_protocol::devices::devices_client::DevicesClient;
use clap::Subcommand;
use serde_json::{Value, json};
use tonic::transport::Channel;

use super::data::admin_client;
use super::{ClientArgs, Output};
use crate::client::router::Router;
use crate::devices::events::{DeviceEvent, EVENTS_TOPIC, EventKind};
use crate::devices::parse_tags;

fn parse_event(s: &str) -> Result<EventKind, String> {
    EventKind::parse(s).ok_or_else(|| {
        let all: Vec<&str> = EventKind::ALL.iter().map(|k| k.as_str()).collect();
        format!("unknown event {s:?}: one of {}", all.join(", "))
    })
}

/// A request to a device, made once (it is not repeated on failure: a command may not be
/// idempotent) on the first node that accepts the connection.
async fn ask_device(client: &ClientArgs, request: pb::SendCommandRequest) -> anyhow::Result<()> {
    let wait =
        std::time::Duration::from_millis(request.timeout_ms) + std::time::Duration::from_secs(10);
    let mut last = None;
    for addr in &client.server {
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
            .connect_timeout(std::time::Duration::from_secs(3));
        let channel = match endpoint.connect().await {
            Ok(c) => c,
            Err(e) => {
                last = Some(anyhow::anyhow!("{addr}: {e}"));
                continue;
            }
        };
        let mut call = tonic::Request::new(request.clone());
        call.set_timeout(wait);
        let reply = DevicesClient::new(channel)
            .send_command(call)
            .await
            .map_err(|s| {
                let name = s
                    .metadata()
                    .get("aq-error")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("ERROR")
                    .to_string();
                anyhow::anyhow!("{} ({name})", s.message())
            })?
            .into_inner();
        let response: Value = serde_json::from_str(&reply.response_json).unwrap_or(Value::Null);
        match client.output {
            Output::Json => println!(
                "{}",
                json!({"request_id": reply.request_id, "response": response})
            ),
            Output::Text => println!("{response}"),
        }
        return Ok(());
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("no server given")))
}

fn device_request(
    client: &ClientArgs,
    device_id: &str,
    kind: &str,
    service: &Option<String>,
    command_name: &str,
    params: &str,
) -> pb::SendCommandRequest {
    pb::SendCommandRequest {
        device_id: device_id.to_string(),
        kind: kind.to_string(),
        service_id: service.clone().unwrap_or_default(),
        command_name: command_name.to_string(),
        params_json: params.to_string(),
        timeout_ms: client.timeout.saturating_mul(1000),
    }
}

/// `device subscribe`: the events of `aq.device-events` that match, one line each.
async fn subscribe(
    client: &ClientArgs,
    events: &[EventKind],
    product: Option<&str>,
    device: Option<&str>,
    from: &super::data::From,
    max: Option<u64>,
) -> anyhow::Result<()> {
    let admin = admin_client(client);
    let mut waiting = false;
    while let Err(e) = Router::new(&admin, EVENTS_TOPIC, false).await {
        if !waiting {
            eprintln!("aqueduct: waiting for the first device event ({e})");
            waiting = true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    let output = client.output;
    let reading = super::data::Reading {
        topic: EVENTS_TOPIC,
        from,
        partition: None,
        max,
        group: None,
        to_end: false,
    };
    super::data::follow(client, reading, |r| {
        let e: DeviceEvent = serde_json::from_slice(r.value.as_deref()?).ok()?;
        let wanted = (events.is_empty() || events.contains(&e.event))
            && product.is_none_or(|p| p == e.product)
            && device.is_none_or(|d| d == e.device_id);
        if !wanted {
            return None;
        }
        Some(match output {
            Output::Json => json!({
                "device_id": e.device_id,
                "product": e.product,
                "event": e.event.as_str(),
                "seq": e.seq,
                "at": time(e.at as i64),
                "reason": e.reason,
                "node": e.node,
            })
            .to_string(),
            Output::Text => format!(
                "{} {} {} seq={} node={}{}",
                time(e.at as i64),
                e.device_id,
                e.event.as_str(),
                e.seq,
                e.node,
                if e.reason.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", e.reason)
                }
            ),
        })
    })
    .await
}

#[derive(Debug, Subcommand)]
pub enum ProductCommand {
    /// Register a product from its thing model (JSON; its `name` names the product).
    Create {
        #[arg(long, value_name = "MODEL.json")]
        file: PathBuf,
        /// The owning integration application.
        #[arg(long, default_value = "default")]
        application: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Every product with its device count.
    List(ClientArgs),
    /// One product and its thing model.
    Show {
        name: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Delete a product (refused while it has devices).
    Delete {
        name: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Forward the product's device notifications (events of aq.device-events recorded from
    /// now on) to a topic of your application, or stop (--off).
    Notify {
        name: String,
        /// The topic the notifications are appended to (created if it does not exist).
        #[arg(long, required_unless_present = "off", conflicts_with = "off")]
        topic: Option<String>,
        /// The events to forward.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "online,offline,created,updated,deleted,auth_failed"
        )]
        events: Vec<String>,
        /// Stop forwarding.
        #[arg(long)]
        off: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum DeviceCommand {
    /// Register a device; without --secret one is generated and printed once.
    Create {
        device_id: String,
        #[arg(long)]
        product: String,
        /// 8 to 128 printable characters.
        #[arg(long)]
        secret: Option<String>,
        /// k=v,k2=v2
        #[arg(long, default_value = "")]
        tags: String,
        #[arg(long, value_parser = ["enabled", "disabled"], default_value = "enabled")]
        status: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Change a device's secret, tags (replaced as a whole) or status. A device disabled or
    /// deleted while connected is disconnected.
    Update {
        device_id: String,
        #[arg(long)]
        secret: Option<String>,
        /// k=v,k2=v2 (an empty value removes every tag).
        #[arg(long)]
        tags: Option<String>,
        #[arg(long, value_parser = ["enabled", "disabled"])]
        status: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Every device, or one product's.
    List {
        #[arg(long)]
        product: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// One device (never its secret).
    Show {
        device_id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    Delete {
        device_id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Follow device notifications (`aq.device-events`): online, offline, created, updated,
    /// deleted, auth_failed, each with its per-device seq. Waits for the topic if no event
    /// was recorded yet.
    Subscribe {
        /// Which events, comma-separated [default: all].
        #[arg(long, value_delimiter = ',', value_parser = parse_event)]
        events: Vec<EventKind>,
        /// Only this product's devices.
        #[arg(long)]
        product: Option<String>,
        /// Only this device.
        #[arg(long)]
        device: Option<String>,
        /// earliest, latest, an offset, or an RFC 3339 time.
        #[arg(long, default_value = "latest", value_parser = super::data::parse_from)]
        from: super::data::From,
        /// Stop after this many events [default: follow until interrupted].
        #[arg(long)]
        max: Option<u64>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Send a command (from the product's thing model) to a device and print its response.
    /// The parameters are checked against the model; --timeout is how long to wait for the
    /// device's answer.
    Command {
        device_id: String,
        command: String,
        /// The command's parameters, a JSON object.
        #[arg(long, default_value = "{}")]
        params: String,
        /// The model's service [default: the one with this command].
        #[arg(long)]
        service: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Set writable (W or RW) properties of a device; prints its response.
    SetProperties {
        device_id: String,
        /// The properties and their values, a JSON object.
        #[arg(long)]
        params: String,
        #[arg(long)]
        service: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Set desired values of writable properties in a device's shadow: sent to the device
    /// (as a property set) now if it is online, else when it next comes online, and removed
    /// from the shadow once it accepts them. --clear withdraws them all.
    SetDesired {
        device_id: String,
        /// The properties and their desired values, a JSON object.
        #[arg(long, required_unless_present = "clear", conflicts_with = "clear")]
        params: Option<String>,
        /// Withdraw every desired value of the device.
        #[arg(long)]
        clear: bool,
        #[arg(long)]
        service: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Ask a device for its properties' current values; prints its response.
    GetProperties {
        device_id: String,
        #[arg(long)]
        service: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Register many devices in one call, all or none, from a CSV file with a header row:
    /// `device_id,product` and optionally `secret`, `tags` (k=v;k2=v2), `status`. Prints the
    /// secrets generated for rows without one (once).
    Import {
        #[arg(long, value_name = "devices.csv")]
        file: PathBuf,
        #[command(flatten)]
        client: ClientArgs,
    },
}

async fn call<T, F, Fut>(client: &ClientArgs, f: F) -> anyhow::Result<T>
where
    F: Fn(DevicesClient<Channel>) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let admin = admin_client(client);
    Ok(admin
        .on_leader_channel(|ch| {
            f(DevicesClient::new(ch)
                .max_decoding_message_size(64 << 20)
                .max_encoding_message_size(64 << 20))
        })
        .await?)
}

fn time(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_default()
}

fn product_json(p: &pb::Product) -> Value {
    json!({
        "name": p.name,
        "application": p.application,
        "devices": p.devices,
        "created_at": time(p.created_at_ms),
        "model": serde_json::from_str::<Value>(&p.model_json).unwrap_or(Value::Null),
        "notifications": p.notifications.as_ref().map(|n| json!({
            "topic": n.topic,
            "events": n.events,
            "since": time(n.since_ms),
        })),
    })
}

fn device_json(d: &pb::Device) -> Value {
    json!({
        "device_id": d.device_id,
        "product": d.product,
        "application": d.application,
        "status": d.status,
        "tags": d.tags.iter().collect::<BTreeMap<_, _>>(),
        "created_at": time(d.created_at_ms),
        "updated_at": time(d.updated_at_ms),
    })
}

/// A shadow's reported and desired values, one line each.
fn print_shadow(shadow: &Value) {
    for (label, part) in [("reported:   ", "reported"), ("desired:    ", "desired")] {
        for (service, props) in shadow[part].as_object().into_iter().flatten() {
            for (name, r) in props.as_object().into_iter().flatten() {
                println!(
                    "  {label} {service}.{name} = {} (at {})",
                    r["value"],
                    r["at"].as_str().unwrap_or_default()
                );
            }
        }
    }
}

fn presence_json(p: &pb::Presence) -> Value {
    json!({
        "online": p.online,
        "node": (p.online).then_some(p.node),
        "last_event": (p.seq > 0).then(|| p.last_event.clone()),
        "seq": p.seq,
        "last_event_at": (p.seq > 0).then(|| time(p.last_at_ms as i64)),
    })
}

fn tags_text(tags: &std::collections::HashMap<String, String>) -> String {
    let sorted: BTreeMap<_, _> = tags.iter().collect();
    sorted
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn print_device(output: Output, d: &pb::Device, secret: Option<&str>) {
    match output {
        Output::Json => {
            let mut v = device_json(d);
            if let Some(s) = secret {
                v["secret"] = json!(s);
            }
            println!("{v}");
        }
        Output::Text => {
            println!("device {}", d.device_id);
            println!("  product:     {}", d.product);
            println!("  application: {}", d.application);
            println!("  status:      {}", d.status);
            println!("  tags:        {}", tags_text(&d.tags));
            println!("  created:     {}", time(d.created_at_ms));
            println!("  updated:     {}", time(d.updated_at_ms));
            if let Some(s) = secret {
                println!("  secret:      {s}  (generated; shown only now)");
            }
        }
    }
}

pub async fn product(cmd: &ProductCommand) -> anyhow::Result<()> {
    match cmd {
        ProductCommand::Create {
            file,
            application,
            client,
        } => {
            let model_json = std::fs::read_to_string(file)
                .map_err(|e| anyhow::anyhow!("read {}: {e}", file.display()))?;
            let request = pb::CreateProductRequest {
                model_json,
                application: application.clone(),
            };
            let reply = call(client, |mut c| {
                let request = request.clone();
                async move { c.create_product(request).await }
            })
            .await?;
            let p = reply.product.unwrap_or_default();
            match client.output {
                Output::Json => println!("{}", product_json(&p)),
                Output::Text => println!("created product {}", p.name),
            }
        }
        ProductCommand::List(client) => {
            let reply = call(client, |mut c| async move {
                c.list_products(pb::ListProductsRequest {}).await
            })
            .await?;
            match client.output {
                Output::Json => println!(
                    "{}",
                    Value::Array(reply.products.iter().map(product_json).collect())
                ),
                Output::Text => {
                    println!("{:<32} {:<16} {:>8}", "PRODUCT", "APPLICATION", "DEVICES");
                    for p in &reply.products {
                        println!("{:<32} {:<16} {:>8}", p.name, p.application, p.devices);
                    }
                }
            }
        }
        ProductCommand::Show { name, client } => {
            let request = pb::GetProductRequest { name: name.clone() };
            let reply = call(client, |mut c| {
                let request = request.clone();
                async move { c.get_product(request).await }
            })
            .await?;
            let p = reply.product.unwrap_or_default();
            let v = product_json(&p);
            match client.output {
                Output::Json => println!("{v}"),
                Output::Text => {
                    println!("product {}", p.name);
                    println!("  application: {}", p.application);
                    println!("  devices:     {}", p.devices);
                    println!("  created:     {}", time(p.created_at_ms));
                    if let Some(n) = &p.notifications {
                        println!(
                            "  notifications: {} to topic {} (since {})",
                            n.events.join(","),
                            n.topic,
                            time(n.since_ms)
                        );
                    }
                    println!(
                        "  model:\n{}",
                        serde_json::to_string_pretty(&v["model"]).unwrap_or_default()
                    );
                }
            }
        }
        ProductCommand::Notify {
            name,
            topic,
            events,
            off,
            client,
        } => {
            let request = pb::SetNotificationsRequest {
                product: name.clone(),
                notifications: (!off).then(|| pb::Notifications {
                    topic: topic.clone().unwrap_or_default(),
                    events: events.clone(),
                    since_ms: 0,
                }),
            };
            let reply = call(client, |mut c| {
                let request = request.clone();
                async move { c.set_notifications(request).await }
            })
            .await?;
            let p = reply.product.unwrap_or_default();
            match client.output {
                Output::Json => println!("{}", product_json(&p)),
                Output::Text => match &p.notifications {
                    Some(n) => println!(
                        "product {name}: {} notifications go to topic {}",
                        n.events.join(","),
                        n.topic
                    ),
                    None => println!("product {name}: notifications are not forwarded"),
                },
            }
        }
        ProductCommand::Delete { name, client } => {
            let request = pb::DeleteProductRequest { name: name.clone() };
            call(client, |mut c| {
                let request = request.clone();
                async move { c.delete_product(request).await }
            })
            .await?;
            match client.output {
                Output::Json => println!("{}", json!({"deleted": name})),
                Output::Text => println!("deleted product {name}"),
            }
        }
    }
    Ok(())
}

pub async fn device(cmd: &DeviceCommand) -> anyhow::Result<()> {
    match cmd {
        DeviceCommand::Create {
            device_id,
            product,
            secret,
            tags,
            status,
            client,
        } => {
            let request = pb::CreateDeviceRequest {
                device_id: device_id.clone(),
                product: product.clone(),
                secret: secret.clone().unwrap_or_default(),
                tags: parse_tags(tags)
                    .map_err(anyhow::Error::msg)?
                    .into_iter()
                    .collect(),
                status: status.clone(),
                application: String::new(),
            };
            let reply = call(client, |mut c| {
                let request = request.clone();
                async move { c.create_device(request).await }
            })
            .await?;
            let d = reply.device.unwrap_or_default();
            let generated = (!reply.secret.is_empty()).then_some(reply.secret.as_str());
            print_device(client.output, &d, generated);
        }
        DeviceCommand::Update {
            device_id,
            secret,
            tags,
            status,
            client,
        } => {
            let request = pb::UpdateDeviceRequest {
                device_id: device_id.clone(),
                secret: secret.clone(),
                status: status.clone(),
                set_tags: tags.is_some(),
                tags: match tags {
                    Some(t) => parse_tags(t)
                        .map_err(anyhow::Error::msg)?
                        .into_iter()
                        .collect(),
                    None => Default::default(),
                },
            };
            let reply = call(client, |mut c| {
                let request = request.clone();
                async move { c.update_device(request).await }
            })
            .await?;
            print_device(client.output, &reply.device.unwrap_or_default(), None);
        }
        DeviceCommand::List { product, client } => {
            let request = pb::ListDevicesRequest {
                product: product.clone().unwrap_or_default(),
            };
            let reply = call(client, |mut c| {
                let request = request.clone();
                async move { c.list_devices(request).await }
            })
            .await?;
            match client.output {
                Output::Json => println!(
                    "{}",
                    Value::Array(reply.devices.iter().map(device_json).collect())
                ),
                Output::Text => {
                    println!("{:<40} {:<24} {:<9} TAGS", "DEVICE", "PRODUCT", "STATUS");
                    for d in &reply.devices {
                        println!(
                            "{:<40} {:<24} {:<9} {}",
                            d.device_id,
                            d.product,
                            d.status,
                            tags_text(&d.tags)
                        );
                    }
                }
            }
        }
        DeviceCommand::Show { device_id, client } => {
            let request = pb::GetDeviceRequest {
                device_id: device_id.clone(),
            };
            let reply = call(client, |mut c| {
                let request = request.clone();
                async move { c.get_device(request).await }
            })
            .await?;
            let d = reply.device.unwrap_or_default();
            match client.output {
                Output::Json => {
                    let mut v = device_json(&d);
                    v["online"] = reply
                        .presence
                        .as_ref()
                        .map_or(Value::Null, |p| json!(p.online));
                    v["presence"] = reply.presence.as_ref().map_or(Value::Null, presence_json);
                    v["shadow"] = serde_json::from_str(&reply.shadow_json).unwrap_or(Value::Null);
                    println!("{v}");
                }
                Output::Text => {
                    print_device(client.output, &d, None);
                    match &reply.presence {
                        Some(p) if p.online => println!("  online:      yes (node {})", p.node),
                        Some(_) => println!("  online:      no"),
                        None => println!("  online:      unknown (no leader for its events)"),
                    }
                    if let Ok(shadow) = serde_json::from_str::<Value>(&reply.shadow_json) {
                        print_shadow(&shadow);
                    }
                    if let Some(p) = reply.presence.as_ref().filter(|p| p.seq > 0) {
                        println!(
                            "  last event:  {} seq={} {}",
                            p.last_event,
                            p.seq,
                            time(p.last_at_ms as i64)
                        );
                    }
                }
            }
        }
        DeviceCommand::Delete { device_id, client } => {
            let request = pb::DeleteDeviceRequest {
                device_id: device_id.clone(),
            };
            call(client, |mut c| {
                let request = request.clone();
                async move { c.delete_device(request).await }
            })
            .await?;
            match client.output {
                Output::Json => println!("{}", json!({"deleted": device_id})),
                Output::Text => println!("deleted device {device_id}"),
            }
        }
        DeviceCommand::Command {
            device_id,
            command,
            params,
            service,
            client,
        } => {
            let request = device_request(client, device_id, "command", service, command, params);
            ask_device(client, request).await?;
        }
        DeviceCommand::SetProperties {
            device_id,
            params,
            service,
            client,
        } => {
            let request = device_request(client, device_id, "set_properties", service, "", params);
            ask_device(client, request).await?;
        }
        DeviceCommand::SetDesired {
            device_id,
            params,
            clear,
            service,
            client,
        } => {
            let request = pb::SetDesiredRequest {
                device_id: device_id.clone(),
                service_id: service.clone().unwrap_or_default(),
                params_json: params.clone().unwrap_or_default(),
                forwarded: false,
                clear: *clear,
            };
            let reply = call(client, |mut c| {
                let request = request.clone();
                async move { c.set_desired(request).await }
            })
            .await?;
            let shadow: Value = serde_json::from_str(&reply.shadow_json).unwrap_or(Value::Null);
            match client.output {
                Output::Json => println!(
                    "{}",
                    json!({"device_id": device_id, "desired": shadow["desired"]})
                ),
                Output::Text => {
                    println!(
                        "desired values of {device_id} kept until the device accepts them \
                         (sent now if it is online, else when it connects)"
                    );
                    print_shadow(&json!({"desired": shadow["desired"]}));
                }
            }
        }
        DeviceCommand::GetProperties {
            device_id,
            service,
            client,
        } => {
            let request = device_request(client, device_id, "get_properties", service, "", "");
            ask_device(client, request).await?;
        }
        DeviceCommand::Subscribe {
            events,
            product,
            device,
            from,
            max,
            client,
        } => {
            subscribe(
                client,
                events,
                product.as_deref(),
                device.as_deref(),
                from,
                *max,
            )
            .await?;
        }
        DeviceCommand::Import { file, client } => {
            let devices = read_csv(file)?;
            let request = pb::ImportDevicesRequest { devices };
            let reply = call(client, |mut c| {
                let request = request.clone();
                async move { c.import_devices(request).await }
            })
            .await?;
            match client.output {
                Output::Json => println!(
                    "{}",
                    json!({
                        "created": reply.created,
                        "secrets": reply.secrets.iter()
                            .map(|s| json!({"device_id": s.device_id, "secret": s.secret}))
                            .collect::<Vec<_>>(),
                    })
                ),
                Output::Text => {
                    println!("imported {} devices", reply.created);
                    if !reply.secrets.is_empty() {
                        println!("generated secrets (shown only now):");
                        println!("device_id,secret");
                        for s in &reply.secrets {
                            println!("{},{}", s.device_id, s.secret);
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

/// The rows of an import file (see `device import --help`); errors name the line.
fn read_csv(file: &PathBuf) -> anyhow::Result<Vec<pb::CreateDeviceRequest>> {
    let mut reader = csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .from_path(file)
        .map_err(|e| anyhow::anyhow!("read {}: {e}", file.display()))?;
    let headers = reader
        .headers()
        .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?
        .clone();
    let column = |name: &str| headers.iter().position(|h| h == name);
    let (Some(id), Some(product)) = (column("device_id"), column("product")) else {
        anyhow::bail!(
            "{}: the header row must name the columns device_id and product (and optionally \
             secret, tags, status)",
            file.display()
        );
    };
    let known = ["device_id", "product", "secret", "tags", "status"];
    if let Some(h) = headers.iter().find(|h| !known.contains(h)) {
        anyhow::bail!(
            "{}: unknown column {h:?} (known: {known:?})",
            file.display()
        );
    }
    let (secret, tags, status) = (column("secret"), column("tags"), column("status"));
    let mut out = Vec::new();
    for (i, row) in reader.records().enumerate() {
        let line = i + 2;
        let row = row.map_err(|e| anyhow::anyhow!("{} line {line}: {e}", file.display()))?;
        let field = |c: Option<usize>| c.and_then(|c| row.get(c)).unwrap_or("").to_string();
        let tag_text = field(tags).replace(';', ",");
        let parsed = parse_tags(&tag_text)
            .map_err(|e| anyhow::anyhow!("{} line {line}: {e}", file.display()))?;
        let status = field(status);
        if !matches!(status.as_str(), "" | "enabled" | "disabled") {
            anyhow::bail!(
                "{} line {line}: status {status:?}: use enabled or disabled",
                file.display()
            );
        }
        out.push(pb::CreateDeviceRequest {
            device_id: field(Some(id)),
            product: field(Some(product)),
            secret: field(secret),
            tags: parsed.into_iter().collect(),
            status,
            application: String::new(),
        });
    }
    if out.is_empty() {
        anyhow::bail!("{}: no devices (only a header row)", file.display());
    }
    Ok(out)
}
