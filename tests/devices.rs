//! The device registry on a real 3-node cluster through the real CLI (`aqueduct product …`,
//! `aqueduct device …`), talking to a follower so every call goes through the leader
//! redirect: thing-model validation naming the bad field, generated secrets shown once and
//! never again, updates, refusals with their stable codes, a 10,000-device CSV import that
//! is all or nothing, and the registry surviving a SIGKILL of the metadata leader with every
//! node converging to the same state. Addresses 127.0.51.x.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{Cluster, aqueduct, run_with_timeout, serial, stderr_line};
use serde_json::Value;

const THERMO: &str = r#"{"name":"thermo","services":[{"service_id":"env","properties":[{"name":"temperature","type":"decimal","min":-40,"max":125,"unit":"C","access":"R"}],"commands":[{"name":"reboot","paras":[{"name":"delay","type":"int","min":0,"max":60}],"responses":[{"name":"result","type":"string"}]}],"events":[]}]}"#;

/// `aqueduct ARGS --server SERVER` (one node only).
fn cli_at(server: &str, args: &[&str]) -> std::process::Output {
    let mut command = aqueduct();
    command.args(args).arg("--server").arg(server);
    run_with_timeout(command, Duration::from_secs(60))
}

fn ok_json(out: &std::process::Output) -> Value {
    assert!(
        out.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn refused(out: &std::process::Output, code: &str) -> String {
    assert!(
        !out.status.success(),
        "accepted: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let line = stderr_line(out);
    assert!(line.contains(code), "expected {code}: {line}");
    line
}

#[test]
fn products_and_devices_through_a_follower_survive_a_leader_kill() {
    let _serial = serial();
    let mut cluster = Cluster::start(&["127.0.51.1", "127.0.51.2", "127.0.51.3"]);
    let leader = cluster.leader();
    let follower = cluster
        .nodes
        .iter()
        .find(|n| n.id != leader)
        .unwrap()
        .grpc();
    let cli = |args: &[&str]| cli_at(&follower, args);
    let dir = cluster.dir.path().to_path_buf();

    // A bad model is refused with the field's path; nothing is created.
    let bad = dir.join("bad.json");
    std::fs::write(&bad, THERMO.replace(r#""min":-40"#, r#""min":400"#)).unwrap();
    let line = refused(
        &cli(&["product", "create", "--file", bad.to_str().unwrap()]),
        "INVALID_CONFIG",
    );
    assert!(line.contains("services[0].properties[0].min"), "{line}");
    let products = ok_json(&cli(&["product", "list", "--output", "json"]));
    assert_eq!(products, serde_json::json!([]));

    let model = dir.join("thermo.json");
    std::fs::write(&model, THERMO).unwrap();
    let p = ok_json(&cli(&[
        "product",
        "create",
        "--file",
        model.to_str().unwrap(),
        "--output",
        "json",
    ]));
    assert_eq!(p["name"], "thermo");
    assert_eq!(p["application"], "default");
    assert_eq!(p["model"]["services"][0]["properties"][0]["max"], 125.0);
    refused(
        &cli(&["product", "create", "--file", model.to_str().unwrap()]),
        "ALREADY_EXISTS",
    );

    // A generated secret is printed once; reads never show it.
    let d1 = ok_json(&cli(&[
        "device",
        "create",
        "d1",
        "--product",
        "thermo",
        "--output",
        "json",
    ]));
    let secret = d1["secret"].as_str().unwrap();
    assert_eq!(secret.len(), 32, "{d1}");
    assert!(secret.bytes().all(|b| b.is_ascii_hexdigit()));
    let shown = ok_json(&cli(&["device", "show", "d1", "--output", "json"]));
    assert_eq!(shown["status"], "enabled");
    assert!(shown.get("secret").is_none(), "{shown}");
    let text = cli(&["device", "show", "d1"]);
    assert!(!String::from_utf8_lossy(&text.stdout).contains(secret));

    let d2 = ok_json(&cli(&[
        "device",
        "create",
        "d2",
        "--product",
        "thermo",
        "--secret",
        "given-secret-2",
        "--tags",
        "site=a,floor=2",
        "--output",
        "json",
    ]));
    assert!(
        d2.get("secret").is_none(),
        "a given secret is not echoed: {d2}"
    );
    assert_eq!(d2["tags"], serde_json::json!({"site": "a", "floor": "2"}));
    refused(
        &cli(&["device", "create", "d3", "--product", "nope"]),
        "NOT_FOUND",
    );
    refused(
        &cli(&["device", "create", "bad/id", "--product", "thermo"]),
        "INVALID_CONFIG",
    );
    refused(
        &cli(&[
            "device",
            "create",
            "d3",
            "--product",
            "thermo",
            "--secret",
            "short",
        ]),
        "INVALID_CONFIG",
    );
    let updated = ok_json(&cli(&[
        "device", "update", "d2", "--status", "disabled", "--tags", "x=1", "--output", "json",
    ]));
    assert_eq!(updated["status"], "disabled");
    assert_eq!(updated["tags"], serde_json::json!({"x": "1"}));
    refused(&cli(&["product", "delete", "thermo"]), "IN_USE");

    // 10,000 devices in one call; rows without a secret get one, printed once.
    let csv = dir.join("devices.csv");
    let mut rows = String::from("device_id,product,secret,tags\n");
    for i in 0..10_000 {
        let secret = if i % 2 == 0 {
            format!("secret-{i:06}")
        } else {
            String::new()
        };
        rows.push_str(&format!("bulk-{i},thermo,{secret},n={i};k=v\n"));
    }
    std::fs::write(&csv, &rows).unwrap();
    let imported = ok_json(&cli(&[
        "device",
        "import",
        "--file",
        csv.to_str().unwrap(),
        "--output",
        "json",
        "--timeout",
        "60",
    ]));
    assert_eq!(imported["created"], 10_000);
    assert_eq!(imported["secrets"].as_array().unwrap().len(), 5_000);
    // One clash refuses the whole file, naming the device.
    let again = dir.join("again.csv");
    std::fs::write(&again, "device_id,product\nnew-1,thermo\nbulk-42,thermo\n").unwrap();
    let line = refused(
        &cli(&["device", "import", "--file", again.to_str().unwrap()]),
        "ALREADY_EXISTS",
    );
    assert!(line.contains("bulk-42") && line.contains("row 2"), "{line}");
    refused(&cli(&["device", "show", "new-1"]), "NOT_FOUND");
    let unknown_column = dir.join("columns.csv");
    std::fs::write(&unknown_column, "device_id,product,colour\nx,thermo,red\n").unwrap();
    let line = refused(
        &cli(&[
            "device",
            "import",
            "--file",
            unknown_column.to_str().unwrap(),
        ]),
        "colour",
    );
    assert!(line.contains("unknown column"), "{line}");

    // The metadata leader dies: the new one has every record, and the old one catches up.
    cluster.node(leader).kill();
    let listed = ok_json(&cluster.cli(&[
        "device",
        "list",
        "--product",
        "thermo",
        "--output",
        "json",
        "--timeout",
        "60",
    ]));
    assert_eq!(listed.as_array().unwrap().len(), 10_002);
    let p = ok_json(&cluster.cli(&["product", "show", "thermo", "--output", "json"]));
    assert_eq!(p["devices"], 10_002);
    let bulk = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["device_id"] == "bulk-7")
        .unwrap();
    assert_eq!(bulk["tags"], serde_json::json!({"n": "7", "k": "v"}));
    cluster.node(leader).start();
    cluster.wait_converged(Duration::from_secs(60));

    // Deleting: a device, then (once it has none) the product.
    let out = cluster.cli(&["device", "delete", "d1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    refused(&cluster.cli(&["device", "delete", "d1"]), "NOT_FOUND");
    refused(&cluster.cli(&["device", "show", "d1"]), "NOT_FOUND");
    refused(&cluster.cli(&["product", "delete", "thermo"]), "IN_USE");
}
