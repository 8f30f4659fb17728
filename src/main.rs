//! The `aqueduct` binary: parses the command line and runs the chosen subcommand.
//!
//! Every failure ends the process with status 1 and one line `aqueduct: error: …` on stderr;
//! `serve` ends with status 0 after a clean stop on SIGINT or SIGTERM.

use std::io::IsTerminal;
use std::process::ExitCode;

use anyhow::Context;
use aqueduct::cli::{
    Acks, BenchCommand, Cli, Command, MessageCommand, ServeArgs, admin, bench, data, devices, group,
};
use aqueduct::node::config::Config;
use aqueduct::node::{Node, ShutdownSignal};
use clap::Parser;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Serve(_)) {
        // Client commands log warnings (e.g. retries given up) to stderr; AQUEDUCT_LOG
        // changes the filter.
        let filter = std::env::var("AQUEDUCT_LOG").unwrap_or_else(|_| "warn".to_string());
        let _ = init_logging(&filter);
    }
    let result = match cli.command {
        Command::Serve(args) => serve(&args),
        Command::Cluster(cmd) => admin::cluster(&cmd),
        Command::Topic(cmd) => admin::topic(&cmd),
        Command::Produce {
            topic,
            key,
            key_field,
            partition,
            acks,
            request_timeout_ms,
            batch_bytes,
            linger_ms,
            client,
        } => runtime().and_then(|rt| {
            let acks = match acks {
                Acks::All => aqueduct_protocol::data::Acks::All,
                Acks::Leader => aqueduct_protocol::data::Acks::Leader,
            };
            let key = match (key, key_field) {
                (Some(k), _) => data::KeyFrom::Fixed(k.into_bytes().into()),
                (None, Some(f)) => data::KeyFrom::Field(f),
                (None, None) => data::KeyFrom::None,
            };
            let config = aqueduct::client::producer::ProducerConfig {
                acks,
                request_timeout: std::time::Duration::from_millis(request_timeout_ms.max(1)),
                batch_bytes: batch_bytes.max(1),
                linger: std::time::Duration::from_millis(linger_ms),
                ..Default::default()
            };
            rt.block_on(data::produce(&client, &topic, key, partition, config))
        }),
        Command::Group(cmd) => runtime().and_then(|rt| rt.block_on(group::run(&cmd))),
        Command::Product(cmd) => runtime().and_then(|rt| rt.block_on(devices::product(&cmd))),
        Command::Device(cmd) => runtime().and_then(|rt| rt.block_on(devices::device(&cmd))),
        Command::Bench(cmd) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("cannot start the async runtime")
            .and_then(|rt| {
                rt.block_on(async {
                    match cmd {
                        BenchCommand::Produce(b) => bench::produce(&b).await,
                        BenchCommand::Consume(b) => bench::consume(&b).await,
                        BenchCommand::E2e(b) => bench::e2e(&b).await,
                        BenchCommand::Mqtt(b) => bench::mqtt(&b).await,
                        BenchCommand::MqttFanout(b) => bench::fanout(&b).await,
                    }
                })
            }),
        Command::Message(MessageCommand::Show {
            topic,
            partition,
            offset,
            time,
            key,
            client,
        }) => {
            let pick = match (offset, time, key) {
                (Some(o), _, _) => Ok(data::Pick::Offset(o)),
                (_, Some(t), _) => Ok(data::Pick::Time(t)),
                (_, _, Some(k)) => Ok(data::Pick::Key(k.into_bytes().into())),
                _ => Err(anyhow::anyhow!(
                    "message show needs --offset, --time or --key"
                )),
            };
            pick.and_then(|pick| {
                runtime().and_then(|rt| rt.block_on(data::show(&client, &topic, partition, pick)))
            })
        }
        Command::Consume {
            topic,
            from,
            partition,
            max,
            group,
            end,
            client,
        } => runtime().and_then(|rt| {
            rt.block_on(data::consume(
                &client, &topic, &from, partition, max, group, end,
            ))
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("aqueduct: error: {}", one_line(&err));
            ExitCode::FAILURE
        }
    }
}

fn serve(args: &ServeArgs) -> anyhow::Result<()> {
    let config = Config::load(args.config.as_deref(), &args.overrides())?;
    init_logging(&config.log_level)?;
    aqueduct::faults::Faults::install_from_env()
        .map_err(|e| anyhow::anyhow!("AQUEDUCT_FAULTS: {e}"))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("aqueduct")
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let signal = ShutdownSignal::install()?;
        let mut node = Node::start(config).await?;
        let outcome = tokio::select! {
            received = signal.recv() => Ok(received),
            err = node.failure() => Err(err),
        };
        match outcome {
            Ok(received) => {
                tracing::info!(signal = received, "shutdown requested");
                node.stop().await?;
                Ok(())
            }
            Err(err) => {
                tracing::error!(%err, "stopping");
                node.stop().await?;
                Err(err.into())
            }
        }
    })
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// Logs go to stderr, filtered by the configured `log_level` (EnvFilter syntax).
fn init_logging(filter: &str) -> anyhow::Result<()> {
    let env_filter =
        EnvFilter::try_new(filter).with_context(|| format!("invalid log_level `{filter}`"))?;
    tracing_subscriber::fmt()
        .with_env_filter(env_filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init()
        .map_err(|err| anyhow::anyhow!("cannot install the logger: {err}"))
}

/// The error and its causes on one line, skipping causes the message already quotes.
fn one_line(err: &anyhow::Error) -> String {
    let mut line = err.to_string();
    for cause in err.chain().skip(1) {
        let cause = cause.to_string();
        if !line.contains(&cause) {
            line.push_str(": ");
            line.push_str(&cause);
        }
    }
    line.replace('\n', " ")
}
