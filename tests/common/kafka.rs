//! Kafka clients for the tests: the Python with confluent-kafka that `make test` prepares
//! (`AQUEDUCT_TEST_PYTHON`, else `python3`) running `tests/kafka/clients.py`.

use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use super::run_with_timeout;

const CLIENTS_PY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/kafka/clients.py");

/// A node's Kafka address (the default port on its own host).
pub fn kafka(host: &str) -> String {
    format!("{host}:9092")
}

/// `clients.py ARGS` as a command to run.
pub fn python(args: &[&str]) -> Command {
    let python = std::env::var("AQUEDUCT_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let mut command = Command::new(python);
    command.arg(CLIENTS_PY).args(args);
    command
}

/// Runs a `clients.py` subcommand to completion; its stdout as JSON.
pub fn python_json(args: &[&str]) -> Value {
    let out = run_with_timeout(python(args), Duration::from_secs(180));
    assert!(
        out.status.success(),
        "clients.py {args:?} failed (is confluent-kafka installed? `make test` installs it): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "clients.py {args:?}: not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}
