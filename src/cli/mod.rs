//! The `aqueduct` command line (clap derive).
//!
//! `aqueduct serve` runs a node. The admin commands (`cluster …`, `topic …`, `product …`,
//! `device …`) talk to a running
//! cluster: every one takes `--server HOST:PORT[,HOST:PORT…]` (or `AQUEDUCT_SERVER`, default
//! `127.0.0.1:7070`) as bootstrap addresses, finds the metadata leader itself, prints text or
//! (`--output json`) JSON, and on failure exits with status 1 and one line on stderr.
//!
//! Each `serve` flag has an `AQUEDUCT_*` environment variable; clap prefers the flag when both
//! are set, and the result becomes the [`Overrides`] layer of the node configuration (see
//! `node::config`).

pub mod admin;
pub mod bench;
pub mod data;
pub mod devices;
pub mod group;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::node::config::Overrides;

/// Aqueduct: an integration platform on a replicated, segmented log.
#[derive(Debug, Parser)]
#[command(name = "aqueduct", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a node until SIGINT or SIGTERM.
    Serve(ServeArgs),
    /// Inspect and change the cluster's membership.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Create, list and describe topics.
    #[command(subcommand)]
    Topic(TopicCommand),
    /// Produce stdin to a topic, one record per line (the whole line is the value).
    Produce {
        topic: String,
        /// Key of every record (records with a key go to the partition its murmur2 hash
        /// picks, as the Java client does).
        #[arg(long, conflicts_with = "key_field")]
        key: Option<String>,
        /// Take each record's key from this field of the line, which must be a JSON object
        /// (a string field as it is, any other value as JSON text). A line without it is
        /// reported and not produced.
        #[arg(long, value_name = "FIELD")]
        key_field: Option<String>,
        /// Partition to write to [default: by key, else a partition per batch].
        #[arg(long)]
        partition: Option<u32>,
        /// `all`: acknowledged once a quorum has it on disk; `leader`: once the leader has.
        #[arg(long, value_enum, default_value_t = Acks::All)]
        acks: Acks,
        /// How long one produce request may take before it is retried (retries of an
        /// idempotent producer never write a record twice).
        #[arg(long, value_name = "MS", default_value_t = 10_000)]
        request_timeout_ms: u64,
        /// Send a partition's batch once it holds about this many bytes.
        #[arg(long, value_name = "BYTES", default_value_t = 256 << 10)]
        batch_bytes: usize,
        /// Wait this long for more records before sending a batch that is not full.
        #[arg(long, value_name = "MS", default_value_t = 5)]
        linger_ms: u64,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Look at single messages.
    #[command(subcommand)]
    Message(MessageCommand),
    /// Print records of a topic (text: the value; json: one object per record).
    Consume {
        topic: String,
        /// earliest, latest, an offset, or an RFC 3339 time.
        #[arg(long, default_value = "latest", value_parser = data::parse_from)]
        from: data::From,
        /// Only this partition [default: all].
        #[arg(long)]
        partition: Option<u32>,
        /// Stop after this many records [default: follow until interrupted].
        #[arg(long)]
        max: Option<u64>,
        /// Consume as a member of this consumer group: partitions come from the group, reading
        /// starts at the group's committed offsets (--from: where a partition without one
        /// starts), and what was printed is committed before exiting.
        #[arg(long, conflicts_with = "partition")]
        group: Option<String>,
        /// Exit once every partition is read up to the end it had when first fetched
        /// (like kcat -e).
        #[arg(long)]
        end: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Inspect consumer groups and set their offsets.
    #[command(subcommand)]
    Group(GroupCommand),
    /// Products: thing models of the devices that connect over MQTT.
    #[command(subcommand)]
    Product(devices::ProductCommand),
    /// Devices: their registration, secrets, tags and status.
    #[command(subcommand)]
    Device(devices::DeviceCommand),
    /// Load generators printing msgs/s, MB/s and latency percentiles.
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Produce fixed-size records from several producers; acknowledgement latency.
    Produce(bench::ProduceBench),
    /// Read --count records from the start of the topic (producing the missing ones first).
    Consume(bench::ConsumeBench),
    /// Produce and consume at once; latency from send to receipt.
    E2e(bench::E2eBench),
    /// Simulated MQTT devices publishing QoS 1 property reports; publish→PUBACK latency.
    Mqtt(bench::MqttBench),
    /// One MQTT publisher, many subscribers spread over the nodes; publish→delivery latency.
    MqttFanout(bench::FanoutBench),
}

#[derive(Debug, Subcommand)]
pub enum GroupCommand {
    /// Every consumer group with its state and member count.
    List(ClientArgs),
    /// A group's state, members with their partitions, and per partition the committed
    /// offset, the end offset and the lag.
    Describe {
        group: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Set a group's committed offsets (the group must have no active members).
    ResetOffsets {
        group: String,
        /// earliest, latest, or an RFC 3339 time (the first offset at or after it).
        #[arg(long, value_parser = data::parse_from)]
        to: data::From,
        /// Only this topic [default: every topic the group has offsets for].
        #[arg(long)]
        topic: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum MessageCommand {
    /// Print one message body, exactly as produced (text), or the whole message (json).
    Show {
        topic: String,
        /// The partition [default: 0, or the key's partition with --key].
        #[arg(long)]
        partition: Option<u32>,
        /// The message at this offset.
        #[arg(long, conflicts_with_all = ["time", "key"])]
        offset: Option<u64>,
        /// The first message at or after this RFC 3339 time.
        #[arg(long, conflicts_with = "key", value_parser = data::parse_time)]
        time: Option<i64>,
        /// The latest message with this key.
        #[arg(long)]
        key: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
}

/// Produce acknowledgement level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Acks {
    All,
    Leader,
}

#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Nodes, their roles and liveness, the metadata leader, and how far each node lags.
    Status(ClientArgs),
    /// Remove node N from the cluster: its partition replicas and leaderships move to the
    /// other members first (waiting for that), then a learner takes its vote where one is
    /// available.
    RemoveNode {
        /// The node's id.
        node_id: u64,
        /// How long to wait for its replicas to move, in seconds.
        #[arg(long, value_name = "SECS", default_value_t = 600)]
        wait: u64,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Spread partition replicas and preferred leaders evenly over the members (e.g. onto
    /// nodes that joined). Replicas move while producers and consumers keep running.
    Rebalance {
        /// Only print the plan.
        #[arg(long)]
        dry_run: bool,
        /// Wait until every move is done, at most this many seconds (0: do not wait).
        #[arg(long, value_name = "SECS", default_value_t = 600)]
        wait: u64,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum TopicCommand {
    /// Create a topic.
    Create {
        /// Topic name: 1–249 of A-Z a-z 0-9 . _ - (names starting with `__` or `aq.` are
        /// reserved).
        name: String,
        #[arg(long, default_value_t = 1)]
        partitions: u32,
        #[arg(long, default_value_t = 1)]
        replication_factor: u32,
        /// A topic config `key=value` (repeatable).
        #[arg(long = "config", value_name = "KEY=VALUE", value_parser = parse_key_value)]
        configs: Vec<(String, String)>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List topics with their partitions and replicas.
    List(ClientArgs),
    /// A topic's partitions with their leaders and high watermarks.
    Describe {
        name: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Change a topic's configs, or grow its partition count.
    Alter {
        name: String,
        /// Grow the topic to this many partitions (partitions are never removed).
        #[arg(long, value_name = "N")]
        partitions: Option<u32>,
        /// A config to set, `key=value` (repeatable).
        #[arg(long = "config", value_name = "KEY=VALUE", value_parser = parse_key_value)]
        configs: Vec<(String, String)>,
        /// A config to remove, back to its default (repeatable).
        #[arg(long = "delete-config", value_name = "KEY")]
        delete: Vec<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Delete a topic and all its records.
    Delete {
        name: String,
        #[command(flatten)]
        client: ClientArgs,
    },
}

fn parse_key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("expected KEY=VALUE, got {s:?}")),
    }
}

/// Output format of admin commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Text,
    Json,
}

/// Where the cluster is and how to print; shared by every admin command.
#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// Bootstrap addresses of cluster nodes' gRPC ports; the leader is found from them.
    #[arg(
        long,
        env = "AQUEDUCT_SERVER",
        value_name = "HOST:PORT[,HOST:PORT...]",
        value_delimiter = ',',
        default_value = "127.0.0.1:7070"
    )]
    pub server: Vec<String>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Output::Text)]
    pub output: Output,
    /// How long to keep trying (leader elections, unreachable nodes), in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 15)]
    pub timeout: u64,
}

/// Options of `aqueduct serve`. Unset options keep the value from the config file, or the
/// built-in default.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// TOML configuration file.
    #[arg(long, value_name = "FILE", env = "AQUEDUCT_CONFIG")]
    pub config: Option<PathBuf>,
    /// Data directory [default: ./aqueduct-data].
    #[arg(long, value_name = "DIR", env = "AQUEDUCT_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// This node's id [default: 1].
    #[arg(long, value_name = "ID", env = "AQUEDUCT_NODE_ID")]
    pub node_id: Option<u64>,
    /// Address all listeners bind to, each on its default port [default: 127.0.0.1].
    #[arg(long, value_name = "IP", env = "AQUEDUCT_LISTEN_HOST")]
    pub listen_host: Option<IpAddr>,
    /// HTTP admin listener, replacing LISTEN_HOST:7071.
    #[arg(long, value_name = "HOST:PORT", env = "AQUEDUCT_ADMIN_ADDR")]
    pub admin_addr: Option<SocketAddr>,
    /// gRPC listener (clients, CLI, Raft), replacing LISTEN_HOST:7070.
    #[arg(long, value_name = "HOST:PORT", env = "AQUEDUCT_GRPC_ADDR")]
    pub grpc_addr: Option<SocketAddr>,
    /// gRPC address other nodes reach this one at [default: the gRPC listener].
    #[arg(long, value_name = "HOST:PORT", env = "AQUEDUCT_ADVERTISE_ADDR")]
    pub advertise_addr: Option<String>,
    /// Join the cluster reachable at these gRPC addresses (only when the data directory holds
    /// no cluster yet; without it a fresh node starts a new one-node cluster).
    #[arg(
        long,
        value_name = "HOST:PORT[,HOST:PORT...]",
        env = "AQUEDUCT_JOIN",
        value_delimiter = ','
    )]
    pub join: Option<Vec<String>>,
    /// Whether producing to an unknown topic creates it [default: true].
    #[arg(long, value_name = "BOOL", env = "AQUEDUCT_AUTO_CREATE_TOPICS")]
    pub auto_create_topics: Option<bool>,
    /// segment.bytes of `__consumer_offsets` when it is created [default: 104857600].
    #[arg(
        long,
        value_name = "BYTES",
        env = "AQUEDUCT_OFFSETS_TOPIC_SEGMENT_BYTES"
    )]
    pub offsets_topic_segment_bytes: Option<u64>,
    /// How often partition leaders apply retention, in ms [default: 30000].
    #[arg(long, value_name = "MS", env = "AQUEDUCT_RETENTION_CHECK_MS")]
    pub retention_check_ms: Option<u64>,
    /// Kafka listener, replacing LISTEN_HOST:9092.
    #[arg(long, value_name = "HOST:PORT", env = "AQUEDUCT_KAFKA_ADDR")]
    pub kafka_addr: Option<SocketAddr>,
    /// The host Kafka clients are told to reach this node at [default: the Kafka listener's
    /// host].
    #[arg(long, value_name = "HOST", env = "AQUEDUCT_KAFKA_ADVERTISED_HOST")]
    pub kafka_advertised_host: Option<String>,
    /// Largest Kafka request accepted, bytes [default: 104857600].
    #[arg(long, value_name = "BYTES", env = "AQUEDUCT_KAFKA_MAX_FRAME_BYTES")]
    pub kafka_max_frame_bytes: Option<usize>,
    /// Idle Kafka connections are closed after this long, ms [default: 600000].
    #[arg(long, value_name = "MS", env = "AQUEDUCT_KAFKA_IDLE_TIMEOUT_MS")]
    pub kafka_idle_timeout_ms: Option<u64>,
    /// A Kafka client that takes longer than this to send one request is disconnected, ms
    /// [default: 30000].
    #[arg(long, value_name = "MS", env = "AQUEDUCT_KAFKA_REQUEST_TIMEOUT_MS")]
    pub kafka_request_timeout_ms: Option<u64>,
    /// MQTT listener, replacing LISTEN_HOST:1883.
    #[arg(long, value_name = "HOST:PORT", env = "AQUEDUCT_MQTT_ADDR")]
    pub mqtt_addr: Option<SocketAddr>,
    /// Largest MQTT packet accepted, bytes [default: 1048576].
    #[arg(long, value_name = "BYTES", env = "AQUEDUCT_MQTT_MAX_PACKET_BYTES")]
    pub mqtt_max_packet_bytes: Option<usize>,
    /// Most MQTT connections from one IP address [default: 10000].
    #[arg(long, value_name = "N", env = "AQUEDUCT_MQTT_MAX_CONNECTIONS_PER_IP")]
    pub mqtt_max_connections_per_ip: Option<usize>,
    /// An MQTT connection without a CONNECT by then is closed, ms [default: 10000].
    #[arg(long, value_name = "MS", env = "AQUEDUCT_MQTT_CONNECT_TIMEOUT_MS")]
    pub mqtt_connect_timeout_ms: Option<u64>,
    /// Whether MQTT clients that are not devices may connect for ordinary pub/sub
    /// [default: false].
    #[arg(long, value_name = "BOOL", env = "AQUEDUCT_MQTT_ALLOW_ANONYMOUS")]
    pub mqtt_allow_anonymous: Option<bool>,
    /// Partitions of telemetry topics created on first use [default: 6].
    #[arg(long, value_name = "N", env = "AQUEDUCT_TELEMETRY_PARTITIONS")]
    pub telemetry_partitions: Option<u32>,
    /// Replication factor of telemetry topics created on first use [default: min(3, nodes)].
    #[arg(long, value_name = "N", env = "AQUEDUCT_TELEMETRY_REPLICATION_FACTOR")]
    pub telemetry_replication_factor: Option<u16>,
    /// Log filter, e.g. `info` or `aqueduct=debug,info` [default: info].
    #[arg(long, value_name = "FILTER", env = "AQUEDUCT_LOG")]
    pub log_level: Option<String>,
}

impl ServeArgs {
    /// The flag/environment layer of the configuration.
    pub fn overrides(&self) -> Overrides {
        Overrides {
            data_dir: self.data_dir.clone(),
            node_id: self.node_id,
            listen_host: self.listen_host,
            admin_addr: self.admin_addr,
            grpc_addr: self.grpc_addr,
            advertise_addr: self.advertise_addr.clone(),
            join: self.join.clone(),
            retention_check_ms: self.retention_check_ms,
            auto_create_topics: self.auto_create_topics,
            offsets_topic_segment_bytes: self.offsets_topic_segment_bytes,
            kafka_addr: self.kafka_addr,
            kafka_advertised_host: self.kafka_advertised_host.clone(),
            kafka_max_frame_bytes: self.kafka_max_frame_bytes,
            kafka_idle_timeout_ms: self.kafka_idle_timeout_ms,
            kafka_request_timeout_ms: self.kafka_request_timeout_ms,
            mqtt_addr: self.mqtt_addr,
            mqtt_max_packet_bytes: self.mqtt_max_packet_bytes,
            mqtt_max_connections_per_ip: self.mqtt_max_connections_per_ip,
            mqtt_connect_timeout_ms: self.mqtt_connect_timeout_ms,
            mqtt_allow_anonymous: self.mqtt_allow_anonymous,
            telemetry_partitions: self.telemetry_partitions,
            telemetry_replication_factor: self.telemetry_replication_factor,
            log_level: self.log_level.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use clap::CommandFactory;

    use super::*;

    /// clap's own consistency checks (duplicate flags, bad defaults) pass.
    #[test]
    fn cli_definition_is_valid() {
        Cli::command().debug_assert();
    }

    /// Flags become overrides one to one.
    #[test]
    fn serve_flags_become_overrides() {
        let cli = Cli::try_parse_from([
            "aqueduct",
            "serve",
            "--node-id",
            "4",
            "--admin-addr",
            "127.0.0.9:7000",
            "--data-dir",
            "/d",
            "--join",
            "127.0.0.2:7070,127.0.0.3:7070",
        ])
        .unwrap();
        let Command::Serve(args) = cli.command else {
            panic!("not serve")
        };
        let overrides = args.overrides();
        assert_eq!(overrides.node_id, Some(4));
        assert_eq!(
            overrides.admin_addr,
            Some("127.0.0.9:7000".parse().unwrap())
        );
        assert_eq!(overrides.data_dir, Some(PathBuf::from("/d")));
        assert_eq!(
            overrides.join,
            Some(vec!["127.0.0.2:7070".into(), "127.0.0.3:7070".into()])
        );
    }

    /// A malformed address is rejected by the parser, not at bind time.
    #[test]
    fn bad_admin_addr_is_rejected() {
        assert!(Cli::try_parse_from(["aqueduct", "serve", "--admin-addr", "nope"]).is_err());
    }

    /// `--server` takes a comma-separated list; `--output json` parses.
    #[test]
    fn admin_commands_take_servers_and_output() {
        let cli = Cli::try_parse_from([
            "aqueduct",
            "cluster",
            "remove-node",
            "3",
            "--server",
            "127.0.0.2:7070,127.0.0.3:7070",
            "--output",
            "json",
        ])
        .unwrap();
        let Command::Cluster(ClusterCommand::RemoveNode {
            node_id, client, ..
        }) = cli.command
        else {
            panic!("not remove-node")
        };
        assert_eq!(node_id, 3);
        assert_eq!(client.server.len(), 2);
        assert_eq!(client.output, Output::Json);
    }

    #[test]
    fn topic_configs_must_be_key_value() {
        assert!(
            Cli::try_parse_from(["aqueduct", "topic", "create", "t", "--config", "novalue"])
                .is_err()
        );
        let cli = Cli::try_parse_from([
            "aqueduct",
            "topic",
            "create",
            "t",
            "--config",
            "retention.ms=1000",
        ])
        .unwrap();
        let Command::Topic(TopicCommand::Create { configs, .. }) = cli.command else {
            panic!("not topic create")
        };
        assert_eq!(configs, vec![("retention.ms".into(), "1000".into())]);
    }
}
