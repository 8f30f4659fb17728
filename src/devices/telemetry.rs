//! Device topics and telemetry records (DESIGN.md §7), protocol-neutral: which topics a
//! device may publish and subscribe to, the checks of a property report against its
//! product's thing model, and the values appended to `aq.telemetry.{product}` and
//! `aq.telemetry-dlq`.
//!
//! A device lives under `$oc/devices/{device_id}/sys/`. It publishes only its own up topics
//! (`properties/report`, `messages/up`, `events/up` and the responses
//! `commands/response/request_id={id}`, `properties/set/response/request_id={id}`,
//! `properties/get/response/request_id={id}`) and subscribes only to filters inside its own
//! `$oc/devices/{device_id}/` (where wildcards cannot reach another device's topics).

use serde_json::{Value, json};

use super::model::{ThingModel, parse_datetime};

/// The prefix of every device topic.
pub const DEVICE_TOPICS: &str = "$oc/devices/";

/// The topic of a product's telemetry.
pub fn telemetry_topic(product: &str) -> String {
    format!("aq.telemetry.{product}")
}

/// Where invalid reports go, with the reason.
pub const DLQ_TOPIC: &str = "aq.telemetry-dlq";

/// What a device publishes on one of its up topics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Up {
    PropertiesReport,
    MessagesUp,
    EventsUp,
    CommandResponse { request_id: String },
    PropertiesSetResponse { request_id: String },
    PropertiesGetResponse { request_id: String },
}

impl Up {
    /// Appended to the product's telemetry topic (the responses go to the command log).
    pub fn is_telemetry(&self) -> bool {
        matches!(self, Up::PropertiesReport | Up::MessagesUp | Up::EventsUp)
    }
}

/// Why a device may not publish on `topic`, or what the topic is.
pub fn classify_publish(device_id: &str, topic: &str) -> Result<Up, String> {
    let own = format!("{DEVICE_TOPICS}{device_id}/sys/");
    let Some(rest) = topic.strip_prefix(&own) else {
        return Err(format!(
            "device {device_id} may publish only under {own}, not on {topic}"
        ));
    };
    let request = |prefix: &str| {
        rest.strip_prefix(prefix)
            .filter(|id| !id.is_empty() && !id.contains('/'))
            .map(str::to_string)
    };
    let up = match rest {
        "properties/report" => Up::PropertiesReport,
        "messages/up" => Up::MessagesUp,
        "events/up" => Up::EventsUp,
        _ => {
            if let Some(request_id) = request("commands/response/request_id=") {
                Up::CommandResponse { request_id }
            } else if let Some(request_id) = request("properties/set/response/request_id=") {
                Up::PropertiesSetResponse { request_id }
            } else if let Some(request_id) = request("properties/get/response/request_id=") {
                Up::PropertiesGetResponse { request_id }
            } else {
                return Err(format!("{topic} is not a topic a device publishes on"));
            }
        }
    };
    Ok(up)
}

/// Whether `topic` matches the subscription `filter` (MQTT 3.1.1 §4.7: `+` one level, `#`
/// this level and all below, and a filter starting with a wildcard does not match topics
/// starting with `$`). rumqttd's own `matches` refuses every `$` topic, device topics too.
pub fn topic_matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut levels = topic.split('/');
    for f in filter.split('/') {
        if f == "#" {
            return true;
        }
        match levels.next() {
            Some(_) if f == "+" => {}
            Some(t) if t == f => {}
            _ => return false,
        }
    }
    levels.next().is_none()
}

/// Whether a device may subscribe to `filter`: only inside `$oc/devices/{device_id}/`.
pub fn may_subscribe(device_id: &str, filter: &str) -> bool {
    filter
        .strip_prefix(DEVICE_TOPICS)
        .and_then(|rest| rest.strip_prefix(device_id))
        .is_some_and(|rest| rest.starts_with('/'))
}

/// Why a property report is not valid for `model`, or `None`. The payload is
/// `{"services":[{"service_id":..,"properties":{..},"event_time":..}]}`; every service and
/// property must be in the model, readable (access R or RW), and its value valid.
pub fn check_report(model: &ThingModel, payload: &[u8]) -> Option<String> {
    let doc: Value = match serde_json::from_slice(payload) {
        Ok(v) => v,
        Err(e) => return Some(format!("the report is not JSON: {e}")),
    };
    let Some(services) = doc.get("services").and_then(Value::as_array) else {
        return Some("the report has no \"services\" array".into());
    };
    if services.is_empty() {
        return Some("the report's \"services\" is empty".into());
    }
    for (i, s) in services.iter().enumerate() {
        let Some(id) = s.get("service_id").and_then(Value::as_str) else {
            return Some(format!("services[{i}] has no service_id"));
        };
        let Some(service) = model.service(id) else {
            return Some(format!("services[{i}]: service {id:?} is not in the model"));
        };
        if let Some(t) = s.get("event_time")
            && t.as_str().is_none_or(|t| parse_datetime(t).is_none())
        {
            return Some(format!(
                "services[{i}].event_time {t} is not a time (yyyyMMdd'T'HHmmss'Z')"
            ));
        }
        let Some(props) = s.get("properties").and_then(Value::as_object) else {
            return Some(format!("services[{i}] ({id}) has no \"properties\" object"));
        };
        for (name, value) in props {
            let Some(p) = service.property(name) else {
                return Some(format!("{id}.{name}: no such property in the model"));
            };
            if !p.access.readable() {
                return Some(format!(
                    "{id}.{name}: the property is write-only (access W); devices do not \
                     report it"
                ));
            }
            if let Some(problem) = p.check(value) {
                return Some(format!("{id}: {problem}"));
            }
        }
    }
    None
}

/// `ms` since the epoch as RFC 3339 in UTC, to the millisecond.
pub fn rfc3339_ms(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_default()
}

/// The value of a telemetry record: `{device_id, product, topic, received_at, payload}`, the
/// payload as JSON when it is JSON, else as text, else base64 (`payload_encoding`).
pub fn record_value(
    device_id: &str,
    product: &str,
    topic: &str,
    received_at_ms: i64,
    payload: &[u8],
) -> Value {
    let received_at = rfc3339_ms(received_at_ms);
    let mut v = json!({
        "device_id": device_id,
        "product": product,
        "topic": topic,
        "received_at": received_at,
    });
    match serde_json::from_slice::<Value>(payload) {
        Ok(p) => v["payload"] = p,
        Err(_) => match std::str::from_utf8(payload) {
            Ok(text) => {
                v["payload"] = json!(text);
                v["payload_encoding"] = json!("text");
            }
            Err(_) => {
                use base64::Engine as _;
                v["payload"] = json!(base64::engine::general_purpose::STANDARD.encode(payload));
                v["payload_encoding"] = json!("base64");
            }
        },
    }
    v
}

/// A dead-letter record: the telemetry value plus why it was refused.
pub fn dlq_value(
    device_id: &str,
    product: &str,
    topic: &str,
    received_at_ms: i64,
    payload: &[u8],
    reason: &str,
) -> Value {
    let mut v = record_value(device_id, product, topic, received_at_ms, payload);
    v["reason"] = json!(reason);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    const MODEL: &str = r#"{"name":"thermo","services":[{"service_id":"env","properties":[{"name":"temperature","type":"decimal","min":-40,"max":125,"access":"R"},{"name":"target","type":"int","access":"W"}]}]}"#;

    #[test]
    fn devices_publish_only_their_own_up_topics() {
        let up = |t: &str| classify_publish("d1", t);
        assert_eq!(
            up("$oc/devices/d1/sys/properties/report"),
            Ok(Up::PropertiesReport)
        );
        assert_eq!(up("$oc/devices/d1/sys/messages/up"), Ok(Up::MessagesUp));
        assert_eq!(
            up("$oc/devices/d1/sys/commands/response/request_id=42"),
            Ok(Up::CommandResponse {
                request_id: "42".into()
            })
        );
        for bad in [
            "$oc/devices/d2/sys/properties/report",
            "$oc/devices/d1/sys/messages/down",
            "$oc/devices/d1/sys/commands/request_id=42",
            "$oc/devices/d1/sys/commands/response/request_id=",
            "$oc/devices/d1x/sys/properties/report",
            "other/topic",
        ] {
            assert!(up(bad).is_err(), "{bad}");
        }
        assert!(may_subscribe("d1", "$oc/devices/d1/sys/commands/#"));
        assert!(may_subscribe("d1", "$oc/devices/d1/#"));
        for bad in [
            "$oc/devices/+/sys/commands/#",
            "$oc/devices/#",
            "$oc/devices/d12/sys/#",
            "$oc/devices/d1",
            "#",
        ] {
            assert!(!may_subscribe("d1", bad), "{bad}");
        }
    }

    #[test]
    fn reports_are_checked_against_the_model() {
        let model = ThingModel::parse(MODEL.as_bytes()).expect("model");
        let report = |body: &str| check_report(&model, body.as_bytes());
        assert_eq!(
            report(
                r#"{"services":[{"service_id":"env","properties":{"temperature":21.5},"event_time":"20261128T033655Z"}]}"#
            ),
            None
        );
        let cases = [
            ("not json", "not JSON"),
            (r#"{"services":[]}"#, "empty"),
            (
                r#"{"services":[{"service_id":"gps","properties":{}}]}"#,
                "not in the model",
            ),
            (
                r#"{"services":[{"service_id":"env","properties":{"humidity":3}}]}"#,
                "no such property",
            ),
            (
                r#"{"services":[{"service_id":"env","properties":{"target":3}}]}"#,
                "write-only",
            ),
            (
                r#"{"services":[{"service_id":"env","properties":{"temperature":300}}]}"#,
                "maximum",
            ),
            (
                r#"{"services":[{"service_id":"env","properties":{"temperature":"hot"}}]}"#,
                "number",
            ),
            (
                r#"{"services":[{"service_id":"env","properties":{},"event_time":"yesterday"}]}"#,
                "event_time",
            ),
        ];
        for (body, why) in cases {
            let problem = report(body).unwrap_or_else(|| panic!("accepted {body}"));
            assert!(problem.contains(why), "{body}: {problem}");
        }
    }

    #[test]
    fn record_values_keep_the_payload() {
        let v = record_value("d1", "thermo", "t", 0, br#"{"a":1}"#);
        assert_eq!(v["payload"]["a"], 1);
        assert_eq!(v["received_at"], "1970-01-01T00:00:00.000Z");
        assert!(v.get("payload_encoding").is_none());
        let v = record_value("d1", "thermo", "t", 0, b"hello");
        assert_eq!(
            (v["payload"].as_str(), v["payload_encoding"].as_str()),
            (Some("hello"), Some("text"))
        );
        let v = record_value("d1", "thermo", "t", 0, &[0xff, 0x00]);
        assert_eq!(
            (v["payload"].as_str(), v["payload_encoding"].as_str()),
            (Some("/wA="), Some("base64"))
        );
        let d = dlq_value("d1", "thermo", "t", 0, b"x", "why");
        assert_eq!(d["reason"], "why");
    }

    #[test]
    fn filters_match_as_mqtt_says() {
        let t = "$oc/devices/d1/sys/commands/request_id=7";
        assert!(topic_matches("$oc/devices/d1/sys/commands/#", t));
        assert!(topic_matches("$oc/devices/+/sys/commands/+", t));
        assert!(topic_matches("$oc/devices/d1/sys/#", t));
        assert!(
            !topic_matches("#", t),
            "wildcards first do not match $ topics"
        );
        assert!(!topic_matches("+/devices/d1/sys/commands/#", t));
        assert!(!topic_matches("$oc/devices/d1/sys/commands", t));
        assert!(!topic_matches("$oc/devices/d2/sys/commands/#", t));
        assert!(topic_matches("a/b/#", "a/b"), "# takes in the parent level");
        assert!(topic_matches("a/+/c", "a/b/c"));
        assert!(!topic_matches("a/+", "a/b/c"));
        assert!(topic_matches("#", "a/b"));
    }
}
