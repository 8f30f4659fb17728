//! [`TopicConfig`]: a topic's settings, typed. Validated once when a topic is created or
//! altered ([`TopicConfig::check`]), stored in the metadata log as Kafka-named strings, and
//! read back with [`TopicConfig::from_stored`] wherever a setting is interpreted (segment
//! size and age when a replica's log opens, retention and compaction on the leader,
//! DescribeConfigs on the Kafka front).

use std::collections::BTreeMap;
use std::time::Duration;

use aqueduct_storage::{LogOptions, RetentionPolicy};

use super::error::{BrokerError, BrokerResult, ErrorCode};

/// Kafka's default `retention.ms`: 7 days.
pub const DEFAULT_RETENTION_MS: i64 = 7 * 24 * 3600 * 1000;

/// The config keys a topic takes (Kafka's names).
pub const KNOWN_KEYS: [&str; 5] = [
    "cleanup.policy",
    "retention.ms",
    "retention.bytes",
    "segment.bytes",
    "segment.ms",
];

/// What `cleanup.policy` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CleanupPolicy {
    /// Whole sealed segments leave by retention (time, size).
    pub delete: bool,
    /// Sealed segments keep the latest record per key.
    pub compact: bool,
}

impl CleanupPolicy {
    pub fn as_str(self) -> &'static str {
        match (self.delete, self.compact) {
            (true, true) => "compact,delete",
            (false, true) => "compact",
            _ => "delete",
        }
    }
}

/// One topic's settings; `None` means the default.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TopicConfig {
    /// `retention.ms`: -1 keeps forever; default 7 days.
    pub retention_ms: Option<i64>,
    /// `retention.bytes`: -1 (default) is unlimited.
    pub retention_bytes: Option<i64>,
    /// `segment.bytes` (≥ 64 KiB; applies when a replica's log is next opened).
    pub segment_bytes: Option<u64>,
    /// `segment.ms` (≥ 1 s; applies when a replica's log is next opened).
    pub segment_ms: Option<u64>,
    /// `cleanup.policy`: `delete` (default), `compact` or both.
    pub cleanup: Option<CleanupPolicy>,
}

/// Why `value` is not acceptable for `key`, or `None`.
pub fn config_problem(key: &str, value: &str) -> Option<String> {
    let int = value.parse::<i64>();
    match key {
        "retention.ms" | "retention.bytes" => match int {
            Ok(v) if v >= -1 => None,
            _ => Some(format!("{key} must be an integer ≥ -1, not {value:?}")),
        },
        // Lower bounds keep a topic from turning every entry into a segment of its own.
        "segment.bytes" => match int {
            Ok(v) if v >= 65_536 => None,
            _ => Some(format!(
                "segment.bytes must be an integer ≥ 65536, not {value:?}"
            )),
        },
        "segment.ms" => match int {
            Ok(v) if v >= 1_000 => None,
            _ => Some(format!(
                "segment.ms must be an integer ≥ 1000, not {value:?}"
            )),
        },
        "cleanup.policy" => parse_cleanup(value).is_none().then(|| {
            format!("cleanup.policy must be delete, compact or compact,delete, not {value:?}")
        }),
        _ => Some(format!(
            "unknown topic config {key:?} (known: {})",
            KNOWN_KEYS.join(", ")
        )),
    }
}

fn parse_cleanup(value: &str) -> Option<CleanupPolicy> {
    match value {
        "delete" => Some(CleanupPolicy {
            delete: true,
            compact: false,
        }),
        "compact" => Some(CleanupPolicy {
            delete: false,
            compact: true,
        }),
        "compact,delete" | "delete,compact" => Some(CleanupPolicy {
            delete: true,
            compact: true,
        }),
        _ => None,
    }
}

impl TopicConfig {
    /// Checks every key and value; the first bad one is the error.
    pub fn check<'a>(
        configs: impl IntoIterator<Item = (&'a String, &'a String)>,
    ) -> BrokerResult<()> {
        for (k, v) in configs {
            if let Some(problem) = config_problem(k, v) {
                return Err(BrokerError::new(ErrorCode::InvalidConfig, problem));
            }
        }
        Ok(())
    }

    /// Checks that `key` is a config a topic takes (for removing it).
    pub fn check_key(key: &str) -> BrokerResult<()> {
        if KNOWN_KEYS.contains(&key) {
            Ok(())
        } else {
            Err(BrokerError::new(
                ErrorCode::InvalidConfig,
                format!("unknown topic config {key:?}"),
            ))
        }
    }

    /// The settings a stored (already checked) config map holds; anything unreadable is the
    /// default.
    pub fn from_stored(configs: &BTreeMap<String, String>) -> Self {
        let int = |k: &str| configs.get(k).and_then(|v| v.parse::<i64>().ok());
        Self {
            retention_ms: int("retention.ms").filter(|v| *v >= -1),
            retention_bytes: int("retention.bytes").filter(|v| *v >= -1),
            segment_bytes: int("segment.bytes").filter(|v| *v > 0).map(|v| v as u64),
            segment_ms: int("segment.ms").filter(|v| *v > 0).map(|v| v as u64),
            cleanup: configs.get("cleanup.policy").and_then(|v| parse_cleanup(v)),
        }
    }

    pub fn cleanup(&self) -> CleanupPolicy {
        self.cleanup.unwrap_or(CleanupPolicy {
            delete: true,
            compact: false,
        })
    }

    /// The segment settings of the topic's logs.
    pub fn log_options(&self) -> LogOptions {
        let d = LogOptions::default();
        LogOptions {
            segment_bytes: self.segment_bytes.unwrap_or(d.segment_bytes),
            segment_age: self.segment_ms.map(Duration::from_millis).or(d.segment_age),
            ..d
        }
    }

    /// The retention policy (time and size; -1 is unlimited).
    pub fn retention_policy(&self) -> RetentionPolicy {
        let ms = self.retention_ms.unwrap_or(DEFAULT_RETENTION_MS);
        RetentionPolicy {
            max_age: (ms >= 0).then(|| Duration::from_millis(ms as u64)),
            max_bytes: self.retention_bytes.filter(|b| *b >= 0).map(|b| b as u64),
            below_offset: None,
        }
    }

    /// Every known setting with its effective value and whether it is the default
    /// (DescribeConfigs).
    pub fn entries(&self) -> Vec<(&'static str, String, bool)> {
        let d = LogOptions::default();
        vec![
            (
                "cleanup.policy",
                self.cleanup().as_str().to_string(),
                self.cleanup.is_none(),
            ),
            (
                "retention.ms",
                self.retention_ms
                    .unwrap_or(DEFAULT_RETENTION_MS)
                    .to_string(),
                self.retention_ms.is_none(),
            ),
            (
                "retention.bytes",
                self.retention_bytes.unwrap_or(-1).to_string(),
                self.retention_bytes.is_none(),
            ),
            (
                "segment.bytes",
                self.segment_bytes.unwrap_or(d.segment_bytes).to_string(),
                self.segment_bytes.is_none(),
            ),
            (
                "segment.ms",
                self.segment_ms
                    .or(d.segment_age.map(|a| a.as_millis() as u64))
                    .map_or_else(|| (7 * 24 * 3600 * 1000u64).to_string(), |v| v.to_string()),
                self.segment_ms.is_none(),
            ),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn configs_are_checked_and_read_back_typed() {
        let good = map(&[
            ("retention.ms", "-1"),
            ("segment.bytes", "65536"),
            ("cleanup.policy", "delete,compact"),
        ]);
        assert!(TopicConfig::check(&good).is_ok());
        let c = TopicConfig::from_stored(&good);
        assert_eq!(c.retention_policy().max_age, None);
        assert_eq!(c.log_options().segment_bytes, 65_536);
        assert!(c.cleanup().delete && c.cleanup().compact);
        for bad in [
            ("retention.ms", "-2"),
            ("segment.bytes", "100"),
            ("segment.ms", "x"),
            ("cleanup.policy", "none"),
            ("no.such.key", "1"),
        ] {
            let e = TopicConfig::check(&map(&[bad])).expect_err("refused");
            assert_eq!(e.code, ErrorCode::InvalidConfig, "{bad:?}");
        }
        let d = TopicConfig::default();
        assert_eq!(
            d.retention_policy().max_age,
            Some(Duration::from_millis(DEFAULT_RETENTION_MS as u64))
        );
        assert!(d.entries().iter().all(|(_, _, default)| *default));
    }
}
