//! Node configuration: what a node listens on, where it keeps its data, how loudly it logs.
//!
//! Four layers, each overriding the one before it:
//!
//! 1. the defaults built into the binary ([`Config::default`]);
//! 2. a TOML file (`--config FILE` or `AQUEDUCT_CONFIG`), which may set any subset of the keys;
//!    an unknown key is an error, so a typo never goes unnoticed;
//! 3. environment variables (`AQUEDUCT_DATA_DIR`, `AQUEDUCT_NODE_ID`, `AQUEDUCT_LISTEN_HOST`,
//!    `AQUEDUCT_ADMIN_ADDR`, `AQUEDUCT_GRPC_ADDR`, `AQUEDUCT_ADVERTISE_ADDR`, `AQUEDUCT_JOIN`,
//!    `AQUEDUCT_LOG`);
//! 4. command-line flags.
//!
//! Layers 3 and 4 arrive together as [`Overrides`]: the CLI (clap) already prefers a flag over
//! its environment variable. [`Config::load`] applies the layers in that order.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The configuration file could not be read.
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The configuration file is not valid TOML or does not match the schema.
    #[error("config file {}: {message} (line {line}, column {column})", path.display())]
    Parse {
        path: PathBuf,
        message: String,
        line: usize,
        column: usize,
    },
}

/// A node's configuration after all layers have been applied.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Directory holding everything the node stores (metadata store in `meta/`).
    pub data_dir: PathBuf,
    /// This node's id in the cluster.
    pub node_id: u64,
    /// Address every listener binds to, with its own port.
    pub listen_host: IpAddr,
    /// HTTP admin port (health, metrics).
    pub admin_port: u16,
    /// Full admin listener address; when set it replaces `listen_host:admin_port`.
    pub admin_addr: Option<SocketAddr>,
    /// gRPC port (native clients, admin CLI, Raft traffic).
    pub grpc_port: u16,
    /// Full gRPC listener address; when set it replaces `listen_host:grpc_port`.
    pub grpc_addr: Option<SocketAddr>,
    /// The gRPC address other nodes and clients use to reach this node, recorded in the
    /// cluster membership. Defaults to the gRPC listener address (which then must not be
    /// `0.0.0.0`).
    pub advertise_addr: Option<String>,
    /// Bootstrap addresses (`HOST:PORT` of cluster members' gRPC) to join when this node's data
    /// directory holds no cluster yet. Empty: a fresh node starts a new one-node cluster.
    pub join: Vec<String>,
    /// Whether producing to an unknown topic creates it (1 partition, replication factor
    /// min(3, nodes)).
    pub auto_create_topics: bool,
    /// How often partition leaders apply their topics' retention policies, milliseconds.
    pub retention_check_ms: u64,
    /// `segment.bytes` of the consumer groups' topic `__consumer_offsets` when it is created
    /// (Kafka's `offsets.topic.segment.bytes`); compaction reaches sealed segments only.
    pub offsets_topic_segment_bytes: u64,
    /// Metadata Raft heartbeat interval, milliseconds.
    pub raft_heartbeat_ms: u64,
    /// Metadata Raft election timeout (lower bound; the upper bound is twice it), and how long
    /// a peer may leave node pings unanswered before it counts as dead (which starts elections
    /// in the partition groups it led), milliseconds.
    pub raft_election_timeout_ms: u64,
    /// Kafka wire-protocol port.
    pub kafka_port: u16,
    /// Full Kafka listener address; when set it replaces `listen_host:kafka_port`.
    pub kafka_addr: Option<SocketAddr>,
    /// The host Kafka clients are told to reach this node at [default: the Kafka listener's
    /// host].
    pub kafka_advertised_host: Option<String>,
    /// Largest Kafka request frame accepted, bytes (Kafka's `socket.request.max.bytes`).
    pub kafka_max_frame_bytes: usize,
    /// A Kafka connection with no request in flight that sends nothing for this long is
    /// closed, milliseconds (Kafka's `connections.max.idle.ms`).
    pub kafka_idle_timeout_ms: u64,
    /// Longest a Kafka client may take to send one request once it started, milliseconds.
    pub kafka_request_timeout_ms: u64,
    /// MQTT port (devices, and general MQTT clients when `mqtt_allow_anonymous`).
    pub mqtt_port: u16,
    /// Full MQTT listener address; when set it replaces `listen_host:mqtt_port`.
    pub mqtt_addr: Option<SocketAddr>,
    /// Largest MQTT packet accepted (its remaining length), bytes; a larger one is refused
    /// from its fixed header, before it is read.
    pub mqtt_max_packet_bytes: usize,
    /// Most MQTT connections from one IP address.
    pub mqtt_max_connections_per_ip: usize,
    /// An MQTT connection that has not sent its CONNECT by then is closed, milliseconds.
    pub mqtt_connect_timeout_ms: u64,
    /// Whether MQTT clients that are not registered devices may connect for ordinary
    /// pub/sub outside the device topics (off: only devices connect).
    pub mqtt_allow_anonymous: bool,
    /// Partitions of each `aq.telemetry.{product}` topic created on first use.
    pub telemetry_partitions: u32,
    /// Replication factor of telemetry topics created on first use [default: min(3, nodes)].
    pub telemetry_replication_factor: Option<u16>,
    /// API gateway data-plane port. Not opened yet.
    pub gateway_port: u16,
    /// Log filter in `tracing_subscriber::EnvFilter` syntax, e.g. `info` or
    /// `aqueduct=debug,info`.
    pub log_level: String,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("./aqueduct-data"),
            node_id: 1,
            listen_host: IpAddr::V4(Ipv4Addr::LOCALHOST),
            admin_port: 7071,
            admin_addr: None,
            grpc_port: 7070,
            grpc_addr: None,
            advertise_addr: None,
            join: Vec::new(),
            auto_create_topics: true,
            retention_check_ms: 30_000,
            offsets_topic_segment_bytes: 100 << 20,
            raft_heartbeat_ms: 100,
            raft_election_timeout_ms: 600,
            kafka_port: 9092,
            kafka_addr: None,
            kafka_advertised_host: None,
            kafka_max_frame_bytes: 100 << 20,
            kafka_idle_timeout_ms: 600_000,
            kafka_request_timeout_ms: 30_000,
            mqtt_port: 1883,
            mqtt_addr: None,
            mqtt_max_packet_bytes: 1 << 20,
            mqtt_max_connections_per_ip: 10_000,
            mqtt_connect_timeout_ms: 10_000,
            mqtt_allow_anonymous: false,
            telemetry_partitions: 6,
            telemetry_replication_factor: None,
            gateway_port: 8080,
            log_level: "info".to_owned(),
        }
    }
}

/// Values from the environment and the command line; each one set replaces the file's value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overrides {
    pub data_dir: Option<PathBuf>,
    pub node_id: Option<u64>,
    pub listen_host: Option<IpAddr>,
    pub admin_addr: Option<SocketAddr>,
    pub grpc_addr: Option<SocketAddr>,
    pub advertise_addr: Option<String>,
    pub join: Option<Vec<String>>,
    pub retention_check_ms: Option<u64>,
    pub offsets_topic_segment_bytes: Option<u64>,
    pub auto_create_topics: Option<bool>,
    pub kafka_addr: Option<SocketAddr>,
    pub kafka_advertised_host: Option<String>,
    pub kafka_max_frame_bytes: Option<usize>,
    pub kafka_idle_timeout_ms: Option<u64>,
    pub kafka_request_timeout_ms: Option<u64>,
    pub mqtt_addr: Option<SocketAddr>,
    pub mqtt_max_packet_bytes: Option<usize>,
    pub mqtt_max_connections_per_ip: Option<usize>,
    pub mqtt_connect_timeout_ms: Option<u64>,
    pub mqtt_allow_anonymous: Option<bool>,
    pub telemetry_partitions: Option<u32>,
    pub telemetry_replication_factor: Option<u16>,
    pub log_level: Option<String>,
}

impl Config {
    /// Builds the configuration: defaults, then `file` (if any), then `overrides`.
    pub fn load(file: Option<&Path>, overrides: &Overrides) -> Result<Self, ConfigError> {
        let mut config = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_owned(),
                    source,
                })?;
                Self::from_toml(&text, path)?
            }
            None => Self::default(),
        };
        config.apply(overrides);
        Ok(config)
    }

    /// Parses a TOML document; keys it leaves out keep their defaults. `origin` names the
    /// document in errors.
    pub fn from_toml(text: &str, origin: &Path) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|err| {
            let offset = err.span().map_or(0, |span| span.start);
            let (line, column) = line_and_column(text, offset);
            ConfigError::Parse {
                path: origin.to_owned(),
                message: err.message().trim().to_owned(),
                line,
                column,
            }
        })
    }

    /// Replaces every value that `overrides` sets.
    pub fn apply(&mut self, overrides: &Overrides) {
        if let Some(data_dir) = &overrides.data_dir {
            self.data_dir.clone_from(data_dir);
        }
        if let Some(node_id) = overrides.node_id {
            self.node_id = node_id;
        }
        if let Some(listen_host) = overrides.listen_host {
            self.listen_host = listen_host;
        }
        if let Some(admin_addr) = overrides.admin_addr {
            self.admin_addr = Some(admin_addr);
        }
        if let Some(grpc_addr) = overrides.grpc_addr {
            self.grpc_addr = Some(grpc_addr);
        }
        if let Some(advertise) = &overrides.advertise_addr {
            self.advertise_addr = Some(advertise.clone());
        }
        if let Some(join) = &overrides.join {
            self.join.clone_from(join);
        }
        if let Some(ms) = overrides.retention_check_ms {
            self.retention_check_ms = ms;
        }
        if let Some(on) = overrides.auto_create_topics {
            self.auto_create_topics = on;
        }
        if let Some(bytes) = overrides.offsets_topic_segment_bytes {
            self.offsets_topic_segment_bytes = bytes;
        }
        if let Some(addr) = overrides.kafka_addr {
            self.kafka_addr = Some(addr);
        }
        if let Some(host) = &overrides.kafka_advertised_host {
            self.kafka_advertised_host = Some(host.clone());
        }
        if let Some(bytes) = overrides.kafka_max_frame_bytes {
            self.kafka_max_frame_bytes = bytes;
        }
        if let Some(ms) = overrides.kafka_idle_timeout_ms {
            self.kafka_idle_timeout_ms = ms;
        }
        if let Some(ms) = overrides.kafka_request_timeout_ms {
            self.kafka_request_timeout_ms = ms;
        }
        if let Some(addr) = overrides.mqtt_addr {
            self.mqtt_addr = Some(addr);
        }
        if let Some(bytes) = overrides.mqtt_max_packet_bytes {
            self.mqtt_max_packet_bytes = bytes;
        }
        if let Some(n) = overrides.mqtt_max_connections_per_ip {
            self.mqtt_max_connections_per_ip = n;
        }
        if let Some(ms) = overrides.mqtt_connect_timeout_ms {
            self.mqtt_connect_timeout_ms = ms;
        }
        if let Some(on) = overrides.mqtt_allow_anonymous {
            self.mqtt_allow_anonymous = on;
        }
        if let Some(n) = overrides.telemetry_partitions {
            self.telemetry_partitions = n;
        }
        if let Some(rf) = overrides.telemetry_replication_factor {
            self.telemetry_replication_factor = Some(rf);
        }
        if let Some(log_level) = &overrides.log_level {
            self.log_level.clone_from(log_level);
        }
    }

    /// The address the HTTP admin server binds to.
    pub fn admin_listen_addr(&self) -> SocketAddr {
        self.admin_addr
            .unwrap_or(SocketAddr::new(self.listen_host, self.admin_port))
    }

    /// The address the gRPC server binds to.
    pub fn grpc_listen_addr(&self) -> SocketAddr {
        self.grpc_addr
            .unwrap_or(SocketAddr::new(self.listen_host, self.grpc_port))
    }

    /// The address the Kafka listener binds to.
    pub fn kafka_listen_addr(&self) -> SocketAddr {
        self.kafka_addr
            .unwrap_or(SocketAddr::new(self.listen_host, self.kafka_port))
    }

    /// The address the MQTT listener binds to.
    pub fn mqtt_listen_addr(&self) -> SocketAddr {
        self.mqtt_addr
            .unwrap_or(SocketAddr::new(self.listen_host, self.mqtt_port))
    }

    /// Where the metadata group's Raft log lives.
    pub fn meta_log_dir(&self) -> PathBuf {
        self.data_dir.join("raft").join("meta")
    }

    /// Where the metadata store lives.
    pub fn meta_dir(&self) -> PathBuf {
        self.data_dir.join("meta")
    }
}

/// 1-based line and column of byte `offset` in `text`.
fn line_and_column(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before
        .rsplit('\n')
        .next()
        .map_or(0, |last| last.chars().count())
        + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn origin() -> &'static Path {
        Path::new("test.toml")
    }

    /// The defaults are the ports and paths DESIGN.md §6 and the README promise.
    #[test]
    fn defaults_match_the_documented_ports() {
        let config = Config::default();
        assert_eq!(config.data_dir, PathBuf::from("./aqueduct-data"));
        assert_eq!(config.node_id, 1);
        assert_eq!(
            config.admin_listen_addr(),
            "127.0.0.1:7071".parse().unwrap()
        );
        assert_eq!(
            (
                config.grpc_port,
                config.kafka_port,
                config.mqtt_port,
                config.gateway_port
            ),
            (7070, 9092, 1883, 8080)
        );
        assert_eq!(config.log_level, "info");
    }

    /// A file sets only what it names; the rest keeps the defaults.
    #[test]
    fn file_overrides_only_the_keys_it_names() {
        let config = Config::from_toml("node_id = 3\nadmin_port = 9000\n", origin()).unwrap();
        assert_eq!(config.node_id, 3);
        assert_eq!(
            config.admin_listen_addr(),
            "127.0.0.1:9000".parse().unwrap()
        );
        assert_eq!(config.kafka_port, 9092);
        assert_eq!(config.data_dir, PathBuf::from("./aqueduct-data"));
    }

    /// An empty file is the default configuration.
    #[test]
    fn empty_file_is_the_default() {
        assert_eq!(Config::from_toml("", origin()).unwrap(), Config::default());
    }

    /// A typo in a key must not be silently ignored; the error names the key and the place.
    #[test]
    fn unknown_key_is_an_error_naming_key_and_line() {
        let err = Config::from_toml("node_id = 2\nadmin_prot = 1\n", origin()).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("unknown field `admin_prot`"), "{text}");
        assert!(text.contains("line 2, column 1"), "{text}");
        assert!(text.contains("test.toml"), "{text}");
        assert!(!text.contains('\n'), "one line expected: {text}");
    }

    /// A value of the wrong type is reported with its key's line.
    #[test]
    fn wrong_type_is_an_error() {
        let err = Config::from_toml("node_id = \"one\"\n", origin()).unwrap_err();
        assert!(matches!(err, ConfigError::Parse { line: 1, .. }), "{err}");
    }

    /// Overrides (env and flags) beat the file; unset overrides leave the file's values.
    #[test]
    fn overrides_beat_the_file() {
        let mut config = Config::from_toml(
            "node_id = 3\ndata_dir = \"/from/file\"\nlog_level = \"warn\"\n",
            origin(),
        )
        .unwrap();
        config.apply(&Overrides {
            node_id: Some(9),
            admin_addr: Some("127.0.0.5:1234".parse().unwrap()),
            ..Overrides::default()
        });
        assert_eq!(config.node_id, 9);
        assert_eq!(config.data_dir, PathBuf::from("/from/file"));
        assert_eq!(config.log_level, "warn");
        assert_eq!(
            config.admin_listen_addr(),
            "127.0.0.5:1234".parse().unwrap()
        );
    }

    /// `listen_host` moves the admin listener unless a full admin address is given.
    #[test]
    fn listen_host_applies_to_admin_port() {
        let mut config = Config::default();
        config.apply(&Overrides {
            listen_host: Some("0.0.0.0".parse().unwrap()),
            ..Overrides::default()
        });
        assert_eq!(config.admin_listen_addr(), "0.0.0.0:7071".parse().unwrap());
        assert_eq!(config.grpc_listen_addr(), "0.0.0.0:7070".parse().unwrap());
    }

    /// A missing file is reported with its path.
    #[test]
    fn missing_file_is_reported_with_its_path() {
        let err = Config::load(
            Some(Path::new("/nonexistent/aq.toml")),
            &Overrides::default(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/aq.toml"), "{err}");
    }

    #[test]
    fn line_and_column_are_one_based() {
        assert_eq!(line_and_column("abc", 0), (1, 1));
        assert_eq!(line_and_column("ab\ncd", 4), (2, 2));
    }
}
