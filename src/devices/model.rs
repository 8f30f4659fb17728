//! Thing models: what a product's devices report, accept and raise (DESIGN.md §7).
//!
//! A model is a JSON document `{name, services:[{service_id, properties, commands,
//! events}]}`. [`ThingModel::parse`] reads and checks one and names the first bad field by its
//! path (`services[0].properties[1].max`); [`Property::check`] checks one reported value
//! against its definition (the telemetry path and property set use it).

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Longest string property when the model gives no `max_length`.
pub const DEFAULT_MAX_STRING: u64 = 65_535;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ThingModel {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    pub services: Vec<Service>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Service {
    pub service_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default)]
    pub properties: Vec<Property>,
    #[serde(default)]
    pub commands: Vec<Command>,
    #[serde(default)]
    pub events: Vec<Event>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataType {
    Int,
    Long,
    Decimal,
    String,
    Bool,
    Enum,
    Datetime,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Access {
    #[default]
    R,
    W,
    RW,
}

impl Access {
    /// Devices may report it.
    pub fn readable(self) -> bool {
        matches!(self, Access::R | Access::RW)
    }

    /// The platform may set it.
    pub fn writable(self) -> bool {
        matches!(self, Access::W | Access::RW)
    }
}

/// A typed field: a property, a command parameter or response field, an event parameter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Property {
    pub name: String,
    #[serde(rename = "type")]
    pub data_type: DataType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<f64>,
    /// Strings: the longest value, in characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_length: Option<u64>,
    /// Enums: the allowed values.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    /// Properties only (R when absent); ignored on parameters.
    #[serde(default)]
    pub access: Access,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub required: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Command {
    pub name: String,
    #[serde(default)]
    pub paras: Vec<Property>,
    #[serde(default)]
    pub responses: Vec<Property>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Event {
    pub name: String,
    #[serde(default)]
    pub paras: Vec<Property>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// Why a model was refused: the field's path and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelError {
    pub path: String,
    pub problem: String,
}

impl std::fmt::Display for ModelError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.path.is_empty() || self.path == "." {
            write!(f, "thing model: {}", self.problem)
        } else {
            write!(f, "thing model field {}: {}", self.path, self.problem)
        }
    }
}

impl std::error::Error for ModelError {}

fn bad(path: impl Into<String>, problem: impl Into<String>) -> ModelError {
    ModelError {
        path: path.into(),
        problem: problem.into(),
    }
}

/// Why `name` cannot name a product, service, property, command or event
/// (`[A-Za-z0-9_-]{1,64}`; products also `.`), or `None`.
pub fn name_problem(name: &str, dots: bool) -> Option<String> {
    if name.is_empty() || name.len() > 64 {
        return Some(format!("must be 1 to 64 characters, not {}", name.len()));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-' || (dots && *c == '.')))
    {
        let allowed = if dots {
            "A-Z a-z 0-9 _ - ."
        } else {
            "A-Z a-z 0-9 _ -"
        };
        return Some(format!("{name:?} contains {c:?}; allowed are {allowed}"));
    }
    None
}

impl ThingModel {
    /// Reads and checks a model.
    pub fn parse(json: &[u8]) -> Result<Self, ModelError> {
        let de = &mut serde_json::Deserializer::from_slice(json);
        let model: ThingModel = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            // serde_json appends " at line L column C": keep it, it helps with a big file.
            bad(path, inner.to_string())
        })?;
        model.validate()?;
        Ok(model)
    }

    /// Checks names (valid, unique where they must be) and each field's constraints.
    pub fn validate(&self) -> Result<(), ModelError> {
        if let Some(p) = name_problem(&self.name, true) {
            return Err(bad("name", p));
        }
        if self.services.is_empty() {
            return Err(bad("services", "a model has at least one service"));
        }
        let mut ids = BTreeSet::new();
        for (i, s) in self.services.iter().enumerate() {
            let at = format!("services[{i}]");
            if let Some(p) = name_problem(&s.service_id, false) {
                return Err(bad(format!("{at}.service_id"), p));
            }
            if !ids.insert(&s.service_id) {
                return Err(bad(
                    format!("{at}.service_id"),
                    format!("service {:?} is defined twice", s.service_id),
                ));
            }
            fields(&format!("{at}.properties"), &s.properties)?;
            let mut names = BTreeSet::new();
            for (j, c) in s.commands.iter().enumerate() {
                let at = format!("{at}.commands[{j}]");
                if let Some(p) = name_problem(&c.name, false) {
                    return Err(bad(format!("{at}.name"), p));
                }
                if !names.insert(&c.name) {
                    return Err(bad(
                        format!("{at}.name"),
                        format!("command {:?} is defined twice", c.name),
                    ));
                }
                fields(&format!("{at}.paras"), &c.paras)?;
                fields(&format!("{at}.responses"), &c.responses)?;
            }
            let mut names = BTreeSet::new();
            for (j, e) in s.events.iter().enumerate() {
                let at = format!("{at}.events[{j}]");
                if let Some(p) = name_problem(&e.name, false) {
                    return Err(bad(format!("{at}.name"), p));
                }
                if !names.insert(&e.name) {
                    return Err(bad(
                        format!("{at}.name"),
                        format!("event {:?} is defined twice", e.name),
                    ));
                }
                fields(&format!("{at}.paras"), &e.paras)?;
            }
        }
        Ok(())
    }

    pub fn service(&self, id: &str) -> Option<&Service> {
        self.services.iter().find(|s| s.service_id == id)
    }
}

impl Service {
    pub fn property(&self, name: &str) -> Option<&Property> {
        self.properties.iter().find(|p| p.name == name)
    }

    pub fn command(&self, name: &str) -> Option<&Command> {
        self.commands.iter().find(|c| c.name == name)
    }
}

/// Checks a list of typed fields at `at`: names valid and unique, constraints consistent.
fn fields(at: &str, list: &[Property]) -> Result<(), ModelError> {
    let mut names = BTreeSet::new();
    for (k, p) in list.iter().enumerate() {
        let at = format!("{at}[{k}]");
        if let Some(problem) = name_problem(&p.name, false) {
            return Err(bad(format!("{at}.name"), problem));
        }
        if !names.insert(&p.name) {
            return Err(bad(
                format!("{at}.name"),
                format!("{:?} is defined twice", p.name),
            ));
        }
        p.validate(&at)?;
    }
    Ok(())
}

impl Property {
    fn validate(&self, at: &str) -> Result<(), ModelError> {
        let numeric = matches!(
            self.data_type,
            DataType::Int | DataType::Long | DataType::Decimal
        );
        for (field, v) in [("min", self.min), ("max", self.max)] {
            let Some(v) = v else { continue };
            if !numeric {
                return Err(bad(
                    format!("{at}.{field}"),
                    format!("only int, long and decimal take a {field}"),
                ));
            }
            if !v.is_finite() {
                return Err(bad(format!("{at}.{field}"), "must be a finite number"));
            }
            if matches!(self.data_type, DataType::Int | DataType::Long) && v.fract() != 0.0 {
                return Err(bad(
                    format!("{at}.{field}"),
                    format!("{v} is not a whole number, and the type is an integer"),
                ));
            }
            if self.data_type == DataType::Int && (v < i32::MIN as f64 || v > i32::MAX as f64) {
                return Err(bad(
                    format!("{at}.{field}"),
                    format!("{v} does not fit an int (32 bits); use long"),
                ));
            }
        }
        if let (Some(min), Some(max)) = (self.min, self.max)
            && min > max
        {
            return Err(bad(
                format!("{at}.min"),
                format!("min {min} is greater than max {max}"),
            ));
        }
        if self.max_length.is_some() && self.data_type != DataType::String {
            return Err(bad(
                format!("{at}.max_length"),
                "only string takes a max_length",
            ));
        }
        if self.max_length == Some(0) {
            return Err(bad(format!("{at}.max_length"), "must be at least 1"));
        }
        match self.data_type {
            DataType::Enum if self.values.is_empty() => {
                return Err(bad(
                    format!("{at}.values"),
                    "an enum lists its values (\"values\": [..])",
                ));
            }
            DataType::Enum => {
                let distinct: BTreeSet<_> = self.values.iter().collect();
                if distinct.len() != self.values.len() {
                    return Err(bad(format!("{at}.values"), "values repeat"));
                }
            }
            _ if !self.values.is_empty() => {
                return Err(bad(format!("{at}.values"), "only enum takes values"));
            }
            _ => {}
        }
        Ok(())
    }

    /// Why `value` is not a valid value of this field, or `None`.
    pub fn check(&self, value: &Value) -> Option<String> {
        let name = &self.name;
        let range = |v: f64| -> Option<String> {
            if let Some(min) = self.min
                && v < min
            {
                return Some(format!("{name} = {v} is below its minimum {min}"));
            }
            if let Some(max) = self.max
                && v > max
            {
                return Some(format!("{name} = {v} is above its maximum {max}"));
            }
            None
        };
        match self.data_type {
            DataType::Int | DataType::Long => {
                let Some(v) = value.as_i64() else {
                    return Some(format!("{name} must be an integer, not {value}"));
                };
                if self.data_type == DataType::Int && i32::try_from(v).is_err() {
                    return Some(format!("{name} = {v} does not fit an int (32 bits)"));
                }
                range(v as f64)
            }
            DataType::Decimal => match value.as_f64() {
                Some(v) => range(v),
                None => Some(format!("{name} must be a number, not {value}")),
            },
            DataType::String => {
                let Some(s) = value.as_str() else {
                    return Some(format!("{name} must be a string, not {value}"));
                };
                let max = self.max_length.unwrap_or(DEFAULT_MAX_STRING);
                let len = s.chars().count() as u64;
                (len > max).then(|| format!("{name} is {len} characters long, at most {max}"))
            }
            DataType::Bool => {
                (!value.is_boolean()).then(|| format!("{name} must be true or false, not {value}"))
            }
            DataType::Enum => match value.as_str() {
                Some(s) if self.values.iter().any(|v| v == s) => None,
                _ => Some(format!(
                    "{name} must be one of {:?}, not {value}",
                    self.values
                )),
            },
            DataType::Datetime => match value.as_str() {
                Some(s) if parse_datetime(s).is_some() => None,
                _ => Some(format!(
                    "{name} must be a time (yyyyMMdd'T'HHmmss'Z' or RFC 3339), not {value}"
                )),
            },
        }
    }
}

/// Milliseconds since the epoch of `yyyyMMddTHHmmssZ` (the device convention) or RFC 3339.
pub fn parse_datetime(s: &str) -> Option<i64> {
    if let Ok(t) = chrono::NaiveDateTime::parse_from_str(s, "%Y%m%dT%H%M%SZ") {
        return Some(t.and_utc().timestamp_millis());
    }
    chrono::DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.timestamp_millis())
}

#[cfg(test)]
mod tests {
    use super::*;

    const THERMO: &str = r#"{"name":"thermo","services":[{"service_id":"env","properties":[{"name":"temperature","type":"decimal","min":-40,"max":125,"unit":"C","access":"R"},{"name":"mode","type":"enum","values":["eco","boost"],"access":"RW"},{"name":"label","type":"string","max_length":8,"access":"W"}],"commands":[{"name":"reboot","paras":[{"name":"delay","type":"int","min":0,"max":60}],"responses":[{"name":"result","type":"string"}]}],"events":[]}]}"#;

    fn refused(json: &str) -> ModelError {
        ThingModel::parse(json.as_bytes()).expect_err("refused")
    }

    #[test]
    fn the_design_example_parses() {
        let m = ThingModel::parse(THERMO.as_bytes()).expect("valid");
        let env = m.service("env").expect("env");
        assert_eq!(env.property("temperature").expect("t").access, Access::R);
        assert!(env.property("mode").expect("m").access.writable());
        assert_eq!(env.command("reboot").expect("r").paras[0].max, Some(60.0));
    }

    #[test]
    fn errors_name_the_field() {
        let e = refused(&THERMO.replace(r#""type":"decimal""#, r#""type":"float""#));
        assert_eq!(e.path, "services[0].properties[0].type", "{e}");
        assert!(e.problem.contains("float"), "{e}");
        let e = refused(&THERMO.replace(r#""min":-40"#, r#""min":200"#));
        assert_eq!(e.path, "services[0].properties[0].min", "{e}");
        let e = refused(&THERMO.replace(r#""access":"R""#, r#""access":"X""#));
        assert_eq!(e.path, "services[0].properties[0].access", "{e}");
        let e = refused(&THERMO.replace(r#""values":["eco","boost"]"#, r#""values":[]"#));
        assert_eq!(e.path, "services[0].properties[1].values", "{e}");
        let e = refused(&THERMO.replace(r#""name":"mode""#, r#""name":"temperature""#));
        assert_eq!(e.path, "services[0].properties[1].name", "{e}");
        let e = refused(&THERMO.replace(r#""max":60"#, r#""max":60.5"#));
        assert_eq!(e.path, "services[0].commands[0].paras[0].max", "{e}");
        let e = refused(&THERMO.replace(r#""unit":"C""#, r#""units":"C""#));
        assert_eq!(e.path, "services[0].properties[0].units", "{e}");
        assert!(e.problem.contains("units"), "{e}");
        let e = refused(r#"{"name":"a b","services":[]}"#);
        assert_eq!(e.path, "name", "{e}");
        let e = refused(r#"{"name":"x","services":[]}"#);
        assert_eq!(e.path, "services", "{e}");
        assert!(refused("{").to_string().contains("thing model"));
    }

    #[test]
    fn values_are_checked_against_their_field() {
        let m = ThingModel::parse(THERMO.as_bytes()).expect("valid");
        let env = m.service("env").expect("env");
        let t = env.property("temperature").expect("t");
        assert_eq!(t.check(&serde_json::json!(21.5)), None);
        assert!(
            t.check(&serde_json::json!(126))
                .expect("above")
                .contains("maximum")
        );
        assert!(
            t.check(&serde_json::json!("hot"))
                .expect("type")
                .contains("number")
        );
        let mode = env.property("mode").expect("m");
        assert_eq!(mode.check(&serde_json::json!("eco")), None);
        assert!(mode.check(&serde_json::json!("turbo")).is_some());
        let label = env.property("label").expect("l");
        assert!(label.check(&serde_json::json!("123456789")).is_some());
        let delay = &env.command("reboot").expect("r").paras[0];
        assert!(delay.check(&serde_json::json!(1.5)).is_some());
        assert_eq!(delay.check(&serde_json::json!(5)), None);
        assert_eq!(
            parse_datetime("20261128T033655Z"),
            parse_datetime("2026-11-28T03:36:55Z")
        );
    }
}
