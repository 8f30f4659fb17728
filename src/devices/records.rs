//! The products-and-devices family's metadata records, commands and apply (DESIGN.md §3:
//! the family owns them; the metadata state machine only dispatches).
//!
//! Keys under `rec/devices/`: `product/<name>` ([`ProductRecord`]), `device/<id>`
//! ([`DeviceRecord`]) and the index `by-product/<product>/<id>` (empty value) that lists a
//! product's devices and keeps a product with devices from being deleted. Every record
//! carries its owning application. `outbox/<index>/<id>` ([`OutboxEntry`]) holds each
//! device's created / updated / deleted notification, written by the change itself, until
//! the metadata leader has recorded it in `aq.device-events` and trims it
//! ([`DeviceCommand::TrimOutbox`]): every change makes exactly one notification, whichever
//! node leads when. Times in records are chosen by the proposer (apply never
//! reads the clock); `version` is the index of the entry that last changed the record.

use std::collections::BTreeMap;
use std::io;

use aqueduct_raft::family::{Family, Txn};
use aqueduct_raft::types::{MetaErrorCode, MetaResponse};
use serde::{Deserialize, Serialize};

use super::model::{ThingModel, name_problem};

/// The family's name (its commands' `family`, its keys' prefix).
pub const FAMILY: &str = "devices";

/// Most devices one import registers (one metadata entry).
pub const MAX_IMPORT: usize = 20_000;

/// Most tags on one device.
pub const MAX_TAGS: usize = 64;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProductRecord {
    pub name: String,
    pub application: String,
    pub model: ThingModel,
    pub created_at_ms: i64,
    pub version: u64,
    /// Where the product's device notifications are forwarded, if anywhere.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notifications: Option<Notifications>,
}

/// A product's subscription to its devices' notifications: the events of `aq.device-events`
/// of its devices, of the kinds named, recorded from `since_ms` on, are appended to `topic`
/// (an application topic) by the notification forwarder (`super::notify`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notifications {
    pub topic: String,
    /// Event kinds (`online`, `offline`, `created`, `updated`, `deleted`, `auth_failed`).
    pub events: Vec<String>,
    pub since_ms: i64,
}

/// The event kinds a product can subscribe to.
pub const NOTIFICATION_EVENTS: [&str; 6] = [
    "online",
    "offline",
    "created",
    "updated",
    "deleted",
    "auth_failed",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    #[default]
    Enabled,
    Disabled,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Enabled => "enabled",
            Status::Disabled => "disabled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "enabled" => Some(Status::Enabled),
            "disabled" => Some(Status::Disabled),
            _ => None,
        }
    }
}

#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRecord {
    pub device_id: String,
    pub product: String,
    pub application: String,
    /// The device's secret: its MQTT password (plain mode) or the HMAC message (signed
    /// mode), so it is kept as given. Never returned by reads.
    pub secret: String,
    pub status: Status,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    pub version: u64,
}

/// Everything but the secret (logs and panics never show it).
impl std::fmt::Debug for DeviceRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceRecord")
            .field("device_id", &self.device_id)
            .field("product", &self.product)
            .field("application", &self.application)
            .field("secret", &"<redacted>")
            .field("status", &self.status)
            .field("tags", &self.tags)
            .field("created_at_ms", &self.created_at_ms)
            .field("updated_at_ms", &self.updated_at_ms)
            .field("version", &self.version)
            .finish()
    }
}

/// A change to the family's records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceCommand {
    CreateProduct {
        product: ProductRecord,
    },
    DeleteProduct {
        name: String,
    },
    /// Registers one device or many (an import): all of them or, if any is refused, none.
    CreateDevices {
        devices: Vec<DeviceRecord>,
    },
    /// Changes what is given of one device.
    UpdateDevice {
        device_id: String,
        secret: Option<String>,
        status: Option<Status>,
        /// Replaces the device's tags.
        tags: Option<BTreeMap<String, String>>,
        at_ms: i64,
    },
    DeleteDevice {
        device_id: String,
        #[serde(default)]
        at_ms: i64,
    },
    /// Forwards a product's device notifications to a topic (`None`: no longer).
    SetNotifications {
        product: String,
        notifications: Option<Notifications>,
    },
    /// Drops the outbox entries up to and including this key (they are recorded).
    TrimOutbox {
        through: String,
    },
}

/// A device change waiting to be recorded in `aq.device-events`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxEntry {
    pub device_id: String,
    pub product: String,
    /// `created`, `updated` or `deleted`.
    pub event: String,
    /// What changed (updates).
    #[serde(default)]
    pub reason: String,
    pub at_ms: i64,
}

pub const OUTBOX_PREFIX: &str = "outbox/";

/// Outbox keys sort by the entry index that made them.
pub fn outbox_key(index: u64, device_id: &str) -> String {
    format!("{OUTBOX_PREFIX}{index:020}/{device_id}")
}

/// The metadata index an outbox key was made at.
pub fn outbox_index(key: &str) -> Option<u64> {
    key.strip_prefix(OUTBOX_PREFIX)?
        .split('/')
        .next()?
        .parse()
        .ok()
}

fn notify(
    txn: &mut Txn<'_>,
    d: &DeviceRecord,
    event: &str,
    reason: String,
    at_ms: i64,
) -> io::Result<()> {
    let entry = OutboxEntry {
        device_id: d.device_id.clone(),
        product: d.product.clone(),
        event: event.to_string(),
        reason,
        at_ms,
    };
    txn.put(&outbox_key(txn.index, &d.device_id), &entry)
}

pub fn product_key(name: &str) -> String {
    format!("product/{name}")
}

pub fn device_key(id: &str) -> String {
    format!("device/{id}")
}

pub fn by_product_prefix(product: &str) -> String {
    format!("by-product/{product}/")
}

fn by_product_key(product: &str, id: &str) -> String {
    format!("by-product/{product}/{id}")
}

/// Why `id` cannot identify a device (`[A-Za-z0-9_.:-]{1,128}`: it appears in MQTT topics
/// and client ids), or `None`.
pub fn device_id_problem(id: &str) -> Option<String> {
    if id.is_empty() || id.len() > 128 {
        return Some(format!(
            "a device id is 1 to 128 characters, not {}",
            id.len()
        ));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':')))
    {
        return Some(format!(
            "device id {id:?} contains {c:?}; allowed are A-Z a-z 0-9 _ - . :"
        ));
    }
    None
}

/// Why `secret` cannot be a device secret (8 to 128 printable ASCII characters, no spaces),
/// or `None`.
pub fn secret_problem(secret: &str) -> Option<String> {
    if secret.len() < 8 || secret.len() > 128 {
        return Some(format!(
            "a device secret is 8 to 128 characters, not {}",
            secret.len()
        ));
    }
    if !secret.bytes().all(|b| b.is_ascii_graphic()) {
        return Some("a device secret is printable ASCII without spaces".to_string());
    }
    None
}

/// Why `tags` are not valid (keys `[A-Za-z0-9_.-]{1,64}`, values up to 256 characters, at
/// most [`MAX_TAGS`]), or `None`.
pub fn tags_problem(tags: &BTreeMap<String, String>) -> Option<String> {
    if tags.len() > MAX_TAGS {
        return Some(format!("at most {MAX_TAGS} tags, not {}", tags.len()));
    }
    for (k, v) in tags {
        if k.is_empty()
            || k.len() > 64
            || !k
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
        {
            return Some(format!(
                "tag key {k:?} must be 1 to 64 of A-Z a-z 0-9 _ - ."
            ));
        }
        if v.chars().count() > 256 {
            return Some(format!("tag {k}: the value is longer than 256 characters"));
        }
    }
    None
}

/// The family's apply (registered with the metadata state machine on every node).
#[derive(Debug, Default)]
pub struct DevicesFamily;

fn reject(code: MetaErrorCode, message: impl Into<String>) -> io::Result<MetaResponse> {
    Ok(MetaResponse::Rejected {
        code,
        message: message.into(),
    })
}

impl Family for DevicesFamily {
    fn name(&self) -> &'static str {
        FAMILY
    }

    fn apply(&self, txn: &mut Txn<'_>, command: &serde_json::Value) -> io::Result<MetaResponse> {
        let command: DeviceCommand = match serde_json::from_value(command.clone()) {
            Ok(c) => c,
            Err(e) => return reject(MetaErrorCode::InvalidRequest, format!("devices: {e}")),
        };
        match command {
            DeviceCommand::CreateProduct { mut product } => {
                if let Some(p) = name_problem(&product.name, true) {
                    return reject(
                        MetaErrorCode::InvalidDefinition,
                        format!("product name {p}"),
                    );
                }
                if let Err(e) = product.model.validate() {
                    return reject(MetaErrorCode::InvalidDefinition, e.to_string());
                }
                if txn
                    .get::<ProductRecord>(&product_key(&product.name))?
                    .is_some()
                {
                    return reject(
                        MetaErrorCode::AlreadyExists,
                        format!("product {} already exists", product.name),
                    );
                }
                product.version = txn.index;
                txn.put(&product_key(&product.name), &product)?;
            }
            DeviceCommand::DeleteProduct { name } => {
                if txn.get::<ProductRecord>(&product_key(&name))?.is_none() {
                    return reject(
                        MetaErrorCode::NotFound,
                        format!("product {name} does not exist"),
                    );
                }
                let devices = txn.count(&by_product_prefix(&name), usize::MAX)?;
                if devices > 0 {
                    return reject(
                        MetaErrorCode::InUse,
                        format!(
                            "product {name} has {devices} device(s); delete them before the product"
                        ),
                    );
                }
                txn.delete(&product_key(&name));
            }
            DeviceCommand::CreateDevices { devices } => {
                if devices.is_empty() || devices.len() > MAX_IMPORT {
                    return reject(
                        MetaErrorCode::InvalidRequest,
                        format!(
                            "register 1 to {MAX_IMPORT} devices at once, not {}",
                            devices.len()
                        ),
                    );
                }
                let mut seen = std::collections::BTreeSet::new();
                let mut products: BTreeMap<String, bool> = BTreeMap::new();
                for (i, d) in devices.iter().enumerate() {
                    let which = if devices.len() > 1 {
                        format!("device {} (row {})", d.device_id, i + 1)
                    } else {
                        format!("device {}", d.device_id)
                    };
                    if let Some(p) = device_id_problem(&d.device_id) {
                        return reject(MetaErrorCode::InvalidDefinition, format!("{which}: {p}"));
                    }
                    if let Some(p) = secret_problem(&d.secret) {
                        return reject(MetaErrorCode::InvalidDefinition, format!("{which}: {p}"));
                    }
                    if let Some(p) = tags_problem(&d.tags) {
                        return reject(MetaErrorCode::InvalidDefinition, format!("{which}: {p}"));
                    }
                    if !seen.insert(d.device_id.as_str()) {
                        return reject(
                            MetaErrorCode::AlreadyExists,
                            format!("{which} appears twice"),
                        );
                    }
                    let known = match products.get(&d.product) {
                        Some(k) => *k,
                        None => {
                            let k = txn
                                .get::<ProductRecord>(&product_key(&d.product))?
                                .is_some();
                            products.insert(d.product.clone(), k);
                            k
                        }
                    };
                    if !known {
                        return reject(
                            MetaErrorCode::NotFound,
                            format!("{which}: product {} does not exist", d.product),
                        );
                    }
                    if txn
                        .get::<DeviceRecord>(&device_key(&d.device_id))?
                        .is_some()
                    {
                        return reject(
                            MetaErrorCode::AlreadyExists,
                            format!("{which} already exists"),
                        );
                    }
                }
                for mut d in devices {
                    d.version = txn.index;
                    txn.put(&by_product_key(&d.product, &d.device_id), &())?;
                    txn.put(&device_key(&d.device_id), &d)?;
                    notify(txn, &d, "created", String::new(), d.created_at_ms)?;
                }
            }
            DeviceCommand::UpdateDevice {
                device_id,
                secret,
                status,
                tags,
                at_ms,
            } => {
                let Some(mut d) = txn.get::<DeviceRecord>(&device_key(&device_id))? else {
                    return reject(
                        MetaErrorCode::NotFound,
                        format!("device {device_id} does not exist"),
                    );
                };
                let mut changed = Vec::new();
                if let Some(s) = secret {
                    if let Some(p) = secret_problem(&s) {
                        return reject(MetaErrorCode::InvalidDefinition, p);
                    }
                    d.secret = s;
                    changed.push("secret".to_string());
                }
                if let Some(t) = tags {
                    if let Some(p) = tags_problem(&t) {
                        return reject(MetaErrorCode::InvalidDefinition, p);
                    }
                    d.tags = t;
                    changed.push("tags".to_string());
                }
                if let Some(s) = status {
                    d.status = s;
                    changed.push(format!("status {}", s.as_str()));
                }
                d.updated_at_ms = at_ms;
                d.version = txn.index;
                txn.put(&device_key(&device_id), &d)?;
                notify(txn, &d, "updated", changed.join(", "), at_ms)?;
            }
            DeviceCommand::DeleteDevice { device_id, at_ms } => {
                let Some(d) = txn.get::<DeviceRecord>(&device_key(&device_id))? else {
                    return reject(
                        MetaErrorCode::NotFound,
                        format!("device {device_id} does not exist"),
                    );
                };
                txn.delete(&by_product_key(&d.product, &device_id));
                txn.delete(&device_key(&device_id));
                notify(txn, &d, "deleted", String::new(), at_ms)?;
            }
            DeviceCommand::SetNotifications {
                product,
                notifications,
            } => {
                let Some(mut p) = txn.get::<ProductRecord>(&product_key(&product))? else {
                    return reject(
                        MetaErrorCode::NotFound,
                        format!("product {product} does not exist"),
                    );
                };
                if let Some(n) = &notifications {
                    if let Some(problem) = aqueduct_raft::types::topic_name_problem(&n.topic, false)
                    {
                        return reject(
                            MetaErrorCode::InvalidDefinition,
                            format!("notification topic: {problem}"),
                        );
                    }
                    if n.events.is_empty() {
                        return reject(
                            MetaErrorCode::InvalidDefinition,
                            "name at least one event to forward",
                        );
                    }
                    if let Some(bad) = n
                        .events
                        .iter()
                        .find(|e| !NOTIFICATION_EVENTS.contains(&e.as_str()))
                    {
                        return reject(
                            MetaErrorCode::InvalidDefinition,
                            format!("event {bad:?}: use {}", NOTIFICATION_EVENTS.join(", ")),
                        );
                    }
                }
                p.notifications = notifications;
                p.version = txn.index;
                txn.put(&product_key(&product), &p)?;
            }
            DeviceCommand::TrimOutbox { through } => {
                for (key, _) in txn.scan::<OutboxEntry>(OUTBOX_PREFIX)? {
                    if key.as_str() > through.as_str() {
                        break;
                    }
                    txn.delete(&key);
                }
            }
        }
        Ok(MetaResponse::Ok)
    }
}

#[cfg(test)]
mod tests {
    use aqueduct_storage::meta::memory::MemoryMetaStore;
    use aqueduct_storage::meta::{MetaStore, MetaWriteBatch, WELL_KNOWN_CFS};

    use super::*;

    const MODEL: &str = r#"{"name":"thermo","services":[{"service_id":"env","properties":[{"name":"t","type":"decimal"}]}]}"#;

    struct Store {
        meta: MemoryMetaStore,
        index: u64,
    }

    impl Store {
        fn new() -> Self {
            Self {
                meta: MemoryMetaStore::new(WELL_KNOWN_CFS),
                index: 0,
            }
        }

        /// Applies one command as the state machine does: the batch is written unless refused.
        fn apply(&mut self, command: &DeviceCommand) -> MetaResponse {
            self.index += 1;
            let mut batch = MetaWriteBatch::new();
            let mut txn = Txn::new(self.index, FAMILY, &self.meta, &mut batch);
            let value = serde_json::to_value(command).expect("encode");
            let r = DevicesFamily.apply(&mut txn, &value).expect("apply");
            if !matches!(r, MetaResponse::Rejected { .. }) {
                self.meta.write(batch, false).expect("write");
            }
            r
        }

        fn code(&mut self, command: &DeviceCommand) -> Option<MetaErrorCode> {
            match self.apply(command) {
                MetaResponse::Rejected { code, .. } => Some(code),
                _ => None,
            }
        }

        fn view(&self) -> aqueduct_raft::family::View<'_> {
            aqueduct_raft::family::View::new(FAMILY, &self.meta)
        }
    }

    fn product(name: &str) -> DeviceCommand {
        let mut model = ThingModel::parse(MODEL.as_bytes()).expect("model");
        model.name = name.to_string();
        DeviceCommand::CreateProduct {
            product: ProductRecord {
                name: name.to_string(),
                application: "default".into(),
                model,
                created_at_ms: 1,
                version: 0,
                notifications: None,
            },
        }
    }

    fn device(id: &str, product: &str) -> DeviceRecord {
        DeviceRecord {
            device_id: id.to_string(),
            product: product.to_string(),
            application: "default".into(),
            secret: "s3cret-pass".into(),
            status: Status::Enabled,
            tags: BTreeMap::new(),
            created_at_ms: 1,
            updated_at_ms: 1,
            version: 0,
        }
    }

    fn create(devices: Vec<DeviceRecord>) -> DeviceCommand {
        DeviceCommand::CreateDevices { devices }
    }

    #[test]
    fn products_and_devices_keep_their_invariants() {
        let mut s = Store::new();
        assert_eq!(s.code(&product("thermo")), None);
        assert_eq!(
            s.code(&product("thermo")),
            Some(MetaErrorCode::AlreadyExists)
        );
        assert_eq!(s.code(&create(vec![device("d1", "thermo")])), None);
        // Unknown product, duplicate id, bad id, short secret.
        assert_eq!(
            s.code(&create(vec![device("d2", "nope")])),
            Some(MetaErrorCode::NotFound)
        );
        assert_eq!(
            s.code(&create(vec![device("d1", "thermo")])),
            Some(MetaErrorCode::AlreadyExists)
        );
        assert_eq!(
            s.code(&create(vec![device("a/b", "thermo")])),
            Some(MetaErrorCode::InvalidDefinition)
        );
        let mut short = device("d3", "thermo");
        short.secret = "short".into();
        assert_eq!(
            s.code(&create(vec![short])),
            Some(MetaErrorCode::InvalidDefinition)
        );
        // A product with devices stays.
        let delete_product = DeviceCommand::DeleteProduct {
            name: "thermo".into(),
        };
        assert_eq!(s.code(&delete_product), Some(MetaErrorCode::InUse));
        let update = DeviceCommand::UpdateDevice {
            device_id: "d1".into(),
            secret: None,
            status: Some(Status::Disabled),
            tags: Some([("site".to_string(), "a".to_string())].into()),
            at_ms: 7,
        };
        assert_eq!(s.code(&update), None);
        let d: DeviceRecord = s.view().get("device/d1").expect("read").expect("d1");
        assert_eq!(d.status, Status::Disabled);
        assert_eq!(d.tags.get("site").map(String::as_str), Some("a"));
        assert_eq!((d.updated_at_ms, d.created_at_ms), (7, 1));
        let delete = DeviceCommand::DeleteDevice {
            device_id: "d1".into(),
            at_ms: 9,
        };
        assert_eq!(s.code(&delete), None);
        assert_eq!(s.code(&delete), Some(MetaErrorCode::NotFound));
        assert_eq!(s.code(&delete_product), None);
        // Each change left one notification in the outbox, in order; refused ones none.
        let outbox: Vec<(String, OutboxEntry)> = s.view().scan(OUTBOX_PREFIX).expect("scan");
        let seen: Vec<(&str, &str, i64)> = outbox
            .iter()
            .map(|(_, e)| (e.event.as_str(), e.reason.as_str(), e.at_ms))
            .collect();
        assert_eq!(
            seen,
            vec![
                ("created", "", 1),
                ("updated", "tags, status disabled", 7),
                ("deleted", "", 9)
            ]
        );
        let indexes: Vec<u64> = outbox.iter().filter_map(|(k, _)| outbox_index(k)).collect();
        assert!(indexes.windows(2).all(|w| w[0] < w[1]), "{indexes:?}");
        // Trimmed once recorded: up to a key, then the rest.
        let trim = |through: &str| DeviceCommand::TrimOutbox {
            through: through.to_string(),
        };
        assert_eq!(s.code(&trim(&outbox[0].0)), None);
        assert_eq!(s.view().count(OUTBOX_PREFIX, usize::MAX).expect("count"), 2);
        assert_eq!(s.code(&trim(&outbox[2].0)), None);
        assert_eq!(s.view().count("", usize::MAX).expect("count"), 0);
    }

    #[test]
    fn notifications_name_a_valid_topic_and_known_events() {
        let mut s = Store::new();
        s.apply(&product("thermo"));
        let set = |topic: &str, events: &[&str]| DeviceCommand::SetNotifications {
            product: "thermo".into(),
            notifications: Some(Notifications {
                topic: topic.into(),
                events: events.iter().map(|e| e.to_string()).collect(),
                since_ms: 5,
            }),
        };
        let bad = MetaErrorCode::InvalidDefinition;
        assert_eq!(s.code(&set("aq.device-events", &["online"])), Some(bad));
        assert_eq!(s.code(&set("bad topic", &["online"])), Some(bad));
        assert_eq!(s.code(&set("status", &[])), Some(bad));
        assert_eq!(s.code(&set("status", &["online", "rebooted"])), Some(bad));
        assert_eq!(s.code(&set("status", &["online", "offline"])), None);
        let p: ProductRecord = s
            .view()
            .get("product/thermo")
            .expect("read")
            .expect("thermo");
        let n = p.notifications.expect("set");
        assert_eq!(
            (n.topic.as_str(), n.events.len(), n.since_ms),
            ("status", 2, 5)
        );
        let off = DeviceCommand::SetNotifications {
            product: "thermo".into(),
            notifications: None,
        };
        assert_eq!(s.code(&off), None);
        let p: ProductRecord = s
            .view()
            .get("product/thermo")
            .expect("read")
            .expect("thermo");
        assert_eq!(p.notifications, None);
        let missing = DeviceCommand::SetNotifications {
            product: "boiler".into(),
            notifications: None,
        };
        assert_eq!(s.code(&missing), Some(MetaErrorCode::NotFound));
    }

    #[test]
    fn an_import_registers_all_or_nothing() {
        let mut s = Store::new();
        s.apply(&product("thermo"));
        let mut many: Vec<_> = (0..500)
            .map(|i| device(&format!("bulk-{i}"), "thermo"))
            .collect();
        // One bad row (the same id twice) refuses the whole import.
        many.push(device("bulk-7", "thermo"));
        match s.apply(&create(many.clone())) {
            MetaResponse::Rejected { code, message } => {
                assert_eq!(code, MetaErrorCode::AlreadyExists);
                assert!(
                    message.contains("bulk-7") && message.contains("row 501"),
                    "{message}"
                );
            }
            other => panic!("accepted: {other:?}"),
        }
        assert_eq!(s.view().count("device/", usize::MAX).expect("count"), 0);
        many.pop();
        assert_eq!(s.code(&create(many)), None);
        assert_eq!(
            s.view()
                .count(&by_product_prefix("thermo"), usize::MAX)
                .expect("count"),
            500
        );
    }
}
