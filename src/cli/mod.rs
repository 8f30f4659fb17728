//! The `aqueduct` command line (clap derive).
//!
//! `aqueduct serve` runs a node; `aqueduct --version` prints the version. Each `serve` flag has
//! an `AQUEDUCT_*` environment variable; clap prefers the flag when both are set, and the
//! result becomes the [`Overrides`] layer of the node configuration (see `node::config`).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

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
    /// Address all listeners bind to [default: 127.0.0.1].
    #[arg(long, value_name = "IP", env = "AQUEDUCT_LISTEN_HOST")]
    pub listen_host: Option<IpAddr>,
    /// HTTP admin listener, replacing LISTEN_HOST:7071.
    #[arg(long, value_name = "HOST:PORT", env = "AQUEDUCT_ADMIN_ADDR")]
    pub admin_addr: Option<SocketAddr>,
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
        ])
        .unwrap();
        let Command::Serve(args) = cli.command;
        let overrides = args.overrides();
        assert_eq!(overrides.node_id, Some(4));
        assert_eq!(
            overrides.admin_addr,
            Some("127.0.0.9:7000".parse().unwrap())
        );
        assert_eq!(overrides.data_dir, Some(PathBuf::from("/d")));
    }

    /// A malformed address is rejected by the parser, not at bind time.
    #[test]
    fn bad_admin_addr_is_rejected() {
        assert!(Cli::try_parse_from(["aqueduct", "serve", "--admin-addr", "nope"]).is_err());
    }
}
