//! MQTT clients for the tests: `tests/mqtt/clients.py` (paho-mqtt, in the Python that
//! `make test` prepares), and raw sockets for what no well-behaved client sends.

use std::process::{Command, Output};
use std::time::Duration;

use serde_json::Value;

use super::kafka::Lines;
use super::{Cluster, run_with_timeout};

const CLIENTS_PY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/mqtt/clients.py");

/// `clients.py ARGS` against `host`'s MQTT port.
pub fn mqtt_py(host: &str, args: &[&str]) -> Command {
    let python = std::env::var("AQUEDUCT_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let mut command = Command::new(python);
    command.arg(CLIENTS_PY).args(args).args(["--host", host]);
    command
}

/// Runs a `clients.py` subcommand to its end: its exit code and JSON lines.
pub fn mqtt_run(host: &str, args: &[&str]) -> (Option<i32>, Vec<Value>) {
    let out = run_with_timeout(mqtt_py(host, args), Duration::from_secs(120));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("ModuleNotFoundError"),
        "paho-mqtt is missing (`make test` installs it): {stderr}"
    );
    let lines = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("clients.py {args:?}: not JSON ({e}): {l}\n{stderr}"))
        })
        .collect();
    (out.status.code(), lines)
}

/// The CONNACK reason of one connection attempt (3.1.1 return codes as paho maps them to
/// MQTT 5 reasons: 2 → 0x85, 4 → 0x86, 5 → 0x87).
pub fn connack(host: &str, args: &[&str]) -> i64 {
    let mut all = vec!["connect"];
    all.extend_from_slice(args);
    let (_, lines) = mqtt_run(host, &all);
    lines
        .first()
        .and_then(|l| l["rc"].as_i64())
        .unwrap_or_else(|| panic!("no CONNACK for {args:?}: {lines:?}"))
}

/// A `clients.py` subcommand left running, its lines collected.
pub fn mqtt_spawn(host: &str, args: &[&str]) -> Lines {
    Lines::spawn_command(mqtt_py(host, args))
}

/// The JSON lines a running client printed so far.
pub fn json_lines(lines: &Lines) -> Vec<Value> {
    lines
        .snapshot()
        .iter()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// `out`, once it is known to have succeeded (the test fails with its stderr otherwise).
pub fn ok(out: Output) -> Output {
    assert!(
        out.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Creates the product whose thing model is `model` (named `product` in it) and the
/// devices `(id, secret)` of it, through the CLI.
pub fn register(cluster: &Cluster, product: &str, model: &str, devices: &[(&str, &str)]) {
    let file = cluster.dir.path().join(format!("{product}.json"));
    std::fs::write(&file, model).unwrap();
    ok(cluster.cli(&["product", "create", "--file", file.to_str().unwrap()]));
    for (id, secret) in devices {
        ok(cluster.cli(&[
            "device",
            "create",
            id,
            "--product",
            product,
            "--secret",
            secret,
        ]));
    }
}
