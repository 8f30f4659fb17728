//! The MQTT front with real clients (paho-mqtt through `tests/mqtt/clients.py`,
//! mosquitto_pub, kcat) against real clusters: device authentication with the CONNACK
//! reason of each refusal (3.1.1 and 5), topic authorization, property reports into
//! `aq.telemetry.{product}` and invalid ones into the DLQ, PUBACK only after a quorum
//! committed, telemetry across a partition leader's SIGKILL, disconnect on disable and
//! delete, session takeover, limits (packet size, slow CONNECT, connections per IP), and
//! anonymous pub/sub through the general broker (retained messages, wills) when allowed.
//! MQTT 5 properties and persistent sessions through the general broker. Addresses
//! 127.0.52.x to 127.0.55.x.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::thread::sleep;
use std::time::{Duration, Instant};

use common::mqtt::{connack, json_lines, mqtt_run, mqtt_spawn, ok};
use common::{Cluster, serial, signal};
use serde_json::Value;

const THERMO: &str = r#"{"name":"thermo","services":[{"service_id":"env","properties":[{"name":"temperature","type":"decimal","min":-40,"max":10000,"unit":"C","access":"R"}],"commands":[],"events":[]}]}"#;
const TELEMETRY: &str = "aq.telemetry.thermo";

fn report_topic(device: &str) -> String {
    format!("$oc/devices/{device}/sys/properties/report")
}

fn report(t: &str) -> String {
    format!(r#"{{"services":[{{"service_id":"env","properties":{{"temperature":{t}}}}}]}}"#)
}

/// `CMD --device DEVICE --secret SECRET` followed by `rest`: a device's client command.
fn as_device<'a>(cmd: &'a str, device: &'a str, secret: &'a str, rest: &[&'a str]) -> Vec<&'a str> {
    [&[cmd, "--device", device, "--secret", secret][..], rest].concat()
}

/// The thermo product and devices `(id, secret)`.
fn register(cluster: &Cluster, devices: &[(&str, &str)]) {
    common::mqtt::register(cluster, "thermo", THERMO, devices);
}

/// Every record of a topic, read with `aqueduct consume --end`.
fn consume(cluster: &Cluster, topic: &str) -> Vec<Value> {
    let out = ok(cluster.cli(&[
        "consume", topic, "--from", "earliest", "--end", "--output", "json",
    ]));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The reported temperatures of `device` among telemetry records.
fn temperatures(records: &[Value], device: &str) -> Vec<i64> {
    records
        .iter()
        .filter(|r| r["key"] == device)
        .map(|r| {
            let v: Value = serde_json::from_str(r["value"].as_str().unwrap()).unwrap();
            assert_eq!(v["device_id"], device);
            assert_eq!(v["product"], "thermo");
            v["payload"]["services"][0]["properties"]["temperature"]
                .as_i64()
                .unwrap()
        })
        .collect()
}

/// Publishes `count` reports (`temperature` = index + `base`) from a device; returns the
/// acknowledgement reasons.
fn publish_reports(
    host: &str,
    device: &str,
    secret: &str,
    extra: &[&str],
    count: usize,
) -> Vec<i64> {
    let topic = report_topic(device);
    let payload = report("{i}");
    let count_s = count.to_string();
    let mut args = as_device(
        "publish",
        device,
        secret,
        &[
            "--topic",
            &topic,
            "--payload",
            &payload,
            "--count",
            &count_s,
            "--window",
            "10",
        ],
    );
    args.extend_from_slice(extra);
    let (code, lines) = mqtt_run(host, &args);
    assert_eq!(code, Some(0), "publish from {device}: {lines:?}");
    lines
        .iter()
        .filter(|l| l.get("i").is_some())
        .map(|l| l["rc"].as_i64().unwrap())
        .collect()
}

fn wait_line(
    lines: &common::kafka::Lines,
    what: &str,
    within: Duration,
    f: impl Fn(&Value) -> bool,
) -> Value {
    wait_line_or(lines, what, within, &String::new, f)
}

/// [`wait_line`], with `context()` (e.g. the cluster's log tails) in the failure message.
fn wait_line_or(
    lines: &common::kafka::Lines,
    what: &str,
    within: Duration,
    context: &dyn Fn() -> String,
    f: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + within;
    loop {
        if let Some(l) = json_lines(lines).into_iter().find(|l| f(l)) {
            return l;
        }
        assert!(
            Instant::now() < deadline,
            "{what} not seen within {within:?}: {:?}\n{}",
            lines.snapshot(),
            context()
        );
        sleep(Duration::from_millis(20));
    }
}

/// Devices authenticate in both modes, each refusal with its CONNACK reason; reports land
/// in the product's telemetry topic (read natively and with kcat), invalid ones in the DLQ
/// with the reason; a device is kept to its own topics; disabling or deleting a connected
/// device disconnects it; a second connection with the same client id takes over.
#[test]
fn devices_authenticate_report_and_are_kept_to_their_topics() {
    let _serial = serial();
    let hosts = ["127.0.52.1", "127.0.52.2", "127.0.52.3"];
    let cluster = Cluster::start(&hosts);
    register(
        &cluster,
        &[
            ("d1", "secret-one"),
            ("d2", "secret-two"),
            ("d3", "secret-three"),
        ],
    );
    ok(cluster.cli(&["device", "update", "d3", "--status", "disabled"]));
    let (h1, h2, h3) = (hosts[0], hosts[1], hosts[2]);

    // Authentication: plain and signed (0: time not checked, 1: within an hour).
    for v in [&[][..], &["--v5"][..]] {
        let with = |args: &[&'static str]| -> Vec<&'static str> { [args, v].concat() };
        assert_eq!(
            connack(h2, &with(&["--device", "d1", "--secret", "secret-one"])),
            0
        );
        assert_eq!(
            connack(
                h2,
                &with(&[
                    "--device",
                    "d1",
                    "--secret",
                    "secret-one",
                    "--sign-type",
                    "1"
                ])
            ),
            0
        );
        assert_eq!(
            connack(
                h2,
                &with(&[
                    "--device",
                    "d1",
                    "--secret",
                    "secret-one",
                    "--sign-type",
                    "0",
                    "--timestamp",
                    "2020010100",
                ])
            ),
            0,
            "sign type 0 does not check the time"
        );
        // Bad password: 3.1.1 code 4, MQTT 5 0x86 (paho shows both as 134).
        assert_eq!(
            connack(h2, &with(&["--device", "d1", "--secret", "wrong"])),
            134
        );
        assert_eq!(
            connack(
                h2,
                &with(&["--device", "d1", "--secret", "wrong", "--sign-type", "1"])
            ),
            134
        );
        // A stale timestamp: 3.1.1 code 5, MQTT 5 0x87.
        assert_eq!(
            connack(
                h2,
                &with(&[
                    "--device",
                    "d1",
                    "--secret",
                    "secret-one",
                    "--sign-type",
                    "1",
                    "--timestamp",
                    "2020010100",
                ])
            ),
            135
        );
        // Unknown device: 3.1.1 code 2, MQTT 5 0x85.
        assert_eq!(
            connack(h2, &with(&["--device", "nobody", "--secret", "x"])),
            133
        );
        // No user name, anonymous clients not allowed: not authorized.
        assert_eq!(connack(h2, &with(&["--client-id", "anon"])), 135);
    }
    // Disabled: 3.1.1 code 5 (not authorized), MQTT 5 0x8A (banned).
    assert_eq!(
        connack(h3, &["--device", "d3", "--secret", "secret-three"]),
        135
    );
    assert_eq!(
        connack(h3, &["--device", "d3", "--secret", "secret-three", "--v5"]),
        138
    );

    // Reports from two nodes, 3.1.1 and 5, QoS 1: acknowledged once stored.
    assert_eq!(
        publish_reports(h2, "d1", "secret-one", &[], 20),
        vec![0; 20]
    );
    assert_eq!(
        publish_reports(h3, "d2", "secret-two", &["--v5", "--sign-type", "1"], 10),
        vec![0; 10]
    );
    let records = consume(&cluster, TELEMETRY);
    assert_eq!(temperatures(&records, "d1"), (0..20).collect::<Vec<_>>());
    assert_eq!(temperatures(&records, "d2"), (0..10).collect::<Vec<_>>());
    // A device's records share its partition (keyed by device id).
    let parts: BTreeSet<u64> = records
        .iter()
        .filter(|r| r["key"] == "d1")
        .map(|r| r["partition"].as_u64().unwrap())
        .collect();
    assert_eq!(parts.len(), 1);
    // The same records through the Kafka port.
    let kcat = common::run_with_timeout(
        {
            let mut c = std::process::Command::new("kcat");
            c.args([
                "-b",
                &format!("{h1}:9092"),
                "-C",
                "-t",
                TELEMETRY,
                "-o",
                "beginning",
                "-e",
                "-q",
                "-f",
                "%k\n",
            ]);
            c
        },
        Duration::from_secs(60),
    );
    let keys = String::from_utf8_lossy(&kcat.stdout).to_string();
    assert_eq!(
        keys.lines().filter(|k| *k == "d1").count(),
        20,
        "kcat: {keys}"
    );
    assert_eq!(
        keys.lines().filter(|k| *k == "d2").count(),
        10,
        "kcat: {keys}"
    );

    // Invalid reports go to the DLQ with the reason (MQTT 5 is told: 0x99).
    let topic = report_topic("d2");
    for (payload, want) in [
        (report("99999"), "maximum"),
        (
            r#"{"services":[{"service_id":"env","properties":{"humidity":3}}]}"#.to_string(),
            "humidity",
        ),
    ] {
        let (code, lines) = mqtt_run(
            h1,
            &as_device(
                "publish",
                "d2",
                "secret-two",
                &["--v5", "--topic", &topic, "--payload", &payload],
            ),
        );
        assert_eq!(code, Some(0), "{lines:?}");
        assert_eq!(lines[1]["rc"], 0x99, "{want}: {lines:?}");
    }
    let dlq = consume(&cluster, "aq.telemetry-dlq");
    assert_eq!(dlq.len(), 2);
    for (r, want) in dlq.iter().zip(["maximum", "humidity"]) {
        let v: Value = serde_json::from_str(r["value"].as_str().unwrap()).unwrap();
        assert_eq!(v["device_id"], "d2");
        assert!(v["reason"].as_str().unwrap().contains(want), "{v}");
    }

    // d1 is kept to its own topics. d2 listens on its own: it hears nothing of d1's.
    let listener = mqtt_spawn(
        h3,
        &as_device(
            "subscribe",
            "d2",
            "secret-two",
            &[
                "--v5",
                "--topic",
                "$oc/devices/d2/sys/#",
                "--count",
                "0",
                "--seconds",
                "8",
            ],
        ),
    );
    let suback = wait_line(&listener, "d2's SUBACK", Duration::from_secs(20), |l| {
        l.get("suback").is_some()
    });
    assert_eq!(suback["suback"], serde_json::json!([1]));
    let other = report_topic("d2");
    let (code, lines) = mqtt_run(
        h2,
        &as_device(
            "publish",
            "d1",
            "secret-one",
            &["--v5", "--topic", &other, "--payload", &report("1")],
        ),
    );
    assert_eq!(
        (code, lines[1]["rc"].as_i64()),
        (Some(0), Some(0x87)),
        "{lines:?}"
    );
    let (code, lines) = mqtt_run(
        h2,
        &as_device(
            "publish",
            "d1",
            "secret-one",
            &[
                "--topic",
                &other,
                "--payload",
                &report("1"),
                "--timeout",
                "10",
            ],
        ),
    );
    assert_eq!(
        code,
        Some(3),
        "3.1.1: disconnected, not acknowledged: {lines:?}"
    );
    assert!(
        lines.last().unwrap()["disconnected"].is_number(),
        "{lines:?}"
    );
    for (v5, want) in [(true, 0x87), (false, 0x80)] {
        let mut args = as_device(
            "subscribe",
            "d1",
            "secret-one",
            &[
                "--topic",
                "$oc/devices/d2/sys/#",
                "--count",
                "0",
                "--seconds",
                "0.2",
            ],
        );
        if v5 {
            args.push("--v5");
        }
        let (_, lines) = mqtt_run(h1, &args);
        assert_eq!(lines[0]["suback"], serde_json::json!([want]), "{lines:?}");
    }
    sleep(Duration::from_secs(1));
    let heard: Vec<Value> = json_lines(&listener)
        .into_iter()
        .filter(|l| l.get("topic").is_some())
        .collect();
    assert!(heard.is_empty(), "d2 heard {heard:?}");
    // Nothing d1 sent on d2's topic was stored.
    assert_eq!(consume(&cluster, TELEMETRY).len(), 30);

    // A second connection with the same client id takes the session over.
    let first = mqtt_spawn(
        h2,
        &as_device(
            "subscribe",
            "d1",
            "secret-one",
            &[
                "--v5",
                "--topic",
                "$oc/devices/d1/sys/messages/down",
                "--count",
                "0",
                "--seconds",
                "20",
            ],
        ),
    );
    wait_line(&first, "the first SUBACK", Duration::from_secs(20), |l| {
        l.get("suback").is_some()
    });
    assert_eq!(
        connack(h2, &["--device", "d1", "--secret", "secret-one", "--v5"]),
        0
    );
    let gone = wait_line(&first, "the takeover", Duration::from_secs(10), |l| {
        l.get("disconnected").is_some()
    });
    assert_eq!(gone["disconnected"], 0x8E, "session taken over");

    // Disabling a connected device disconnects it, on the node it is connected to.
    for (device, secret, host, change) in [
        (
            "d1",
            "secret-one",
            h3,
            &["device", "update", "d1", "--status", "disabled"][..],
        ),
        ("d2", "secret-two", h1, &["device", "delete", "d2"][..]),
    ] {
        let held = mqtt_spawn(
            host,
            &as_device(
                "subscribe",
                device,
                secret,
                &[
                    "--v5",
                    "--topic",
                    &format!("$oc/devices/{device}/sys/messages/down"),
                    "--count",
                    "0",
                    "--seconds",
                    "30",
                ],
            ),
        );
        wait_line(&held, "the SUBACK", Duration::from_secs(20), |l| {
            l.get("suback").is_some()
        });
        ok(cluster.cli(change));
        let changed = Instant::now();
        let gone = wait_line(&held, "the disconnect", Duration::from_secs(10), |l| {
            l.get("disconnected").is_some()
        });
        let after = changed.elapsed();
        assert_eq!(
            gone["disconnected"], 0x87,
            "{device}: not authorized any more"
        );
        // Within a second of the change being applied (with a margin for this machine).
        assert!(
            after < Duration::from_secs(3),
            "{device} disconnected after {after:?}"
        );
    }
    assert_eq!(
        connack(h2, &["--device", "d1", "--secret", "secret-one", "--v5"]),
        138
    );
    assert_eq!(
        connack(h2, &["--device", "d2", "--secret", "secret-two", "--v5"]),
        133
    );
}

/// Stops a node's process (SIGSTOP) or lets it go on (SIGCONT).
fn pause(cluster: &mut Cluster, id: u64, stop: bool) {
    let child = cluster.node(id).child.as_ref().unwrap();
    signal(child, if stop { 19 } else { 18 });
}

/// No PUBACK while the telemetry partition has no quorum, one as soon as it has; a
/// partition leader SIGKILLed while devices report loses nothing acknowledged.
#[test]
fn telemetry_is_acknowledged_after_a_quorum_and_survives_a_leader_kill() {
    let _serial = serial();
    let hosts = ["127.0.53.1", "127.0.53.2", "127.0.53.3"];
    let mut cluster = Cluster::start(&hosts);
    register(&cluster, &[("d1", "secret-one")]);
    let host_of = |id: u64| hosts[id as usize - 1];
    // The first report creates the topic (replication factor 3).
    assert_eq!(
        publish_reports(hosts[0], "d1", "secret-one", &[], 1),
        vec![0]
    );
    let first = consume(&cluster, TELEMETRY);
    let partition = first[0]["partition"].as_u64().unwrap() as usize;
    let leader = cluster.partition_leader(TELEMETRY, partition).unwrap();
    let followers: Vec<u64> = (1..=3).filter(|id| *id != leader).collect();

    // Both followers stopped: the report is not acknowledged until they resume.
    let topic = report_topic("d1");
    let payload = report("1000");
    let publisher = mqtt_spawn(
        host_of(leader),
        &as_device(
            "publish",
            "d1",
            "secret-one",
            &[
                "--topic",
                &topic,
                "--payload",
                &payload,
                "--timeout",
                "60",
                "--delay",
                "2",
            ],
        ),
    );
    wait_line(&publisher, "CONNACK", Duration::from_secs(20), |l| {
        l.get("connected").is_some()
    });
    for f in &followers {
        pause(&mut cluster, *f, true);
    }
    // The publish goes out 2 s after the CONNACK; give it time to reach the leader.
    sleep(Duration::from_secs(5));
    let early: Vec<Value> = json_lines(&publisher)
        .into_iter()
        .filter(|l| l.get("i").is_some())
        .collect();
    for f in &followers {
        pause(&mut cluster, *f, false);
    }
    assert!(early.is_empty(), "acknowledged without a quorum: {early:?}");
    let acked = wait_line_or(
        &publisher,
        "the PUBACK",
        Duration::from_secs(30),
        &|| cluster.logs(),
        |l| l.get("i").is_some(),
    );
    assert_eq!(acked["rc"], 0);

    // Reports from a device on a follower while the partition leader is SIGKILLed.
    let leader = cluster.partition_leader(TELEMETRY, partition).unwrap();
    let via = (1..=3).find(|id| *id != leader).unwrap();
    let payload = report("{i}");
    let publisher = mqtt_spawn(
        host_of(via),
        &as_device(
            "publish",
            "d1",
            "secret-one",
            &[
                "--topic",
                &topic,
                "--payload",
                &payload,
                "--count",
                "300",
                "--window",
                "5",
                "--timeout",
                "90",
            ],
        ),
    );
    wait_line_or(
        &publisher,
        "50 acknowledgements",
        Duration::from_secs(60),
        &|| cluster.logs(),
        |l| l["i"].as_u64().is_some_and(|i| i >= 50),
    );
    cluster.node(leader).kill();
    wait_line(
        &publisher,
        "the end of the run",
        Duration::from_secs(120),
        |l| l.get("done").is_some() || l.get("timeout").is_some(),
    );
    let acked: BTreeSet<i64> = json_lines(&publisher)
        .iter()
        .filter(|l| l["rc"] == 0 && l.get("i").is_some())
        .map(|l| l["i"].as_i64().unwrap())
        .collect();
    assert!(acked.len() >= 50, "{acked:?}");
    let stored: BTreeSet<i64> = temperatures(&consume(&cluster, TELEMETRY), "d1")
        .into_iter()
        .filter(|t| *t < 1000)
        .collect();
    let lost: Vec<&i64> = acked.difference(&stored).collect();
    assert!(lost.is_empty(), "acknowledged and lost: {lost:?}");
}

/// Raw bytes to a node's MQTT port; whether the node closed the connection within `within`.
fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    stream.set_read_timeout(Some(within)).unwrap();
    let mut b = [0u8; 64];
    let started = Instant::now();
    loop {
        match stream.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
        if started.elapsed() > within {
            return false;
        }
    }
}

/// Anonymous clients get ordinary pub/sub through the general broker (retained messages,
/// wills, QoS 2, mosquitto_pub) but not the device namespace; huge packets, slow CONNECTs
/// and too many connections from one address are cut off while a device goes on reporting.
#[test]
fn anonymous_pub_sub_and_limits_while_a_device_reports() {
    let _serial = serial();
    let host = "127.0.54.1";
    let cluster = Cluster::start_with(
        &[host],
        &[
            ("AQUEDUCT_MQTT_ALLOW_ANONYMOUS", "true"),
            ("AQUEDUCT_MQTT_CONNECT_TIMEOUT_MS", "2000"),
            ("AQUEDUCT_MQTT_MAX_CONNECTIONS_PER_IP", "40"),
        ],
    );
    register(&cluster, &[("d1", "secret-one")]);

    // Retained: a later subscriber gets the last retained message.
    let (code, _) = mqtt_run(
        host,
        &[
            "publish",
            "--client-id",
            "p1",
            "--topic",
            "plant/a/temp",
            "--payload",
            "21",
            "--retain",
        ],
    );
    assert_eq!(code, Some(0));
    let (_, lines) = mqtt_run(
        host,
        &[
            "subscribe",
            "--client-id",
            "s1",
            "--v5",
            "--topic",
            "plant/#",
            "--count",
            "1",
            "--seconds",
            "5",
        ],
    );
    assert_eq!(lines[0]["suback"], serde_json::json!([1]));
    assert_eq!(
        (lines[1]["payload"].as_str(), lines[1]["retain"].as_bool()),
        (Some("21"), Some(true))
    );
    // A will fires when its client dies without DISCONNECT.
    let wills = mqtt_spawn(
        host,
        &[
            "subscribe",
            "--client-id",
            "s2",
            "--topic",
            "wills/#",
            "--count",
            "1",
            "--seconds",
            "20",
        ],
    );
    wait_line(&wills, "the SUBACK", Duration::from_secs(20), |l| {
        l.get("suback").is_some()
    });
    let (code, _) = mqtt_run(
        host,
        &[
            "publish",
            "--client-id",
            "dying",
            "--topic",
            "plant/b",
            "--payload",
            "x",
            "--will-topic",
            "wills/dying",
            "--will-payload",
            "gone",
            "--kill",
        ],
    );
    assert_eq!(code, Some(0));
    let will = wait_line(&wills, "the will", Duration::from_secs(15), |l| {
        l.get("topic").is_some()
    });
    assert_eq!(
        (will["topic"].as_str(), will["payload"].as_str()),
        (Some("wills/dying"), Some("gone"))
    );
    // mosquitto_pub, 3.1.1 and 5, QoS 2.
    for v in ["mqttv311", "mqttv5"] {
        let out = common::run_with_timeout(
            {
                let mut c = std::process::Command::new("mosquitto_pub");
                c.args([
                    "-h", host, "-t", "plant/c", "-m", "hello", "-q", "2", "-V", v,
                ]);
                c
            },
            Duration::from_secs(30),
        );
        assert!(
            out.status.success(),
            "mosquitto_pub {v}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // The device namespace is not theirs: MQTT 5 is refused per packet, 3.1.1 disconnected.
    let (_, lines) = mqtt_run(
        host,
        &[
            "publish",
            "--client-id",
            "p2",
            "--v5",
            "--topic",
            "$oc/devices/d1/sys/messages/down",
            "--payload",
            "x",
        ],
    );
    assert_eq!(lines[1]["rc"], 0x87, "{lines:?}");
    let (_, lines) = mqtt_run(
        host,
        &[
            "subscribe",
            "--client-id",
            "s3",
            "--v5",
            "--topic",
            "plant/#",
            "--topic",
            "$oc/devices/#",
            "--count",
            "0",
            "--seconds",
            "0.2",
        ],
    );
    assert_eq!(
        lines[0]["suback"],
        serde_json::json!([1, 0x87]),
        "{lines:?}"
    );
    let (code, _) = mqtt_run(
        host,
        &[
            "publish",
            "--client-id",
            "p3",
            "--topic",
            "$oc/devices/d1/sys/messages/down",
            "--payload",
            "x",
            "--timeout",
            "5",
        ],
    );
    assert_eq!(code, Some(3), "3.1.1 disconnected");

    // A device reports all along while the limits are tried.
    let topic = report_topic("d1");
    let payload = report("{i}");
    let reporter = mqtt_spawn(
        host,
        &as_device(
            "publish",
            "d1",
            "secret-one",
            &[
                "--topic",
                &topic,
                "--payload",
                &payload,
                "--count",
                "400",
                "--window",
                "1",
                "--timeout",
                "120",
            ],
        ),
    );
    wait_line(
        &reporter,
        "the device's first ack",
        Duration::from_secs(20),
        |l| l.get("i").is_some(),
    );
    let addr = format!("{host}:1883");
    // A packet declaring the largest remaining length MQTT allows (256 MiB), and a length
    // that does not end (a 2 GiB claim needs a fifth byte): both cut off at once.
    for header in [
        &[0x30u8, 0xFF, 0xFF, 0xFF, 0x7F][..],
        &[0x10, 0xFF, 0xFF, 0xFF, 0xFF, 0x07][..],
    ] {
        let mut s = TcpStream::connect(&addr).unwrap();
        s.write_all(header).unwrap();
        assert!(
            closed_within(&mut s, Duration::from_millis(1500)),
            "{header:?} not cut off"
        );
    }
    // A CONNECT that never completes is closed at the connect deadline (2 s).
    let mut slow = TcpStream::connect(&addr).unwrap();
    slow.write_all(&[0x10, 0x20, 0x00, 0x04, b'M']).unwrap();
    let started = Instant::now();
    assert!(
        closed_within(&mut slow, Duration::from_secs(6)),
        "slow CONNECT kept open"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "closed before the deadline"
    );
    // Connections per address: past 40 (the reporter's among them, all from one loopback
    // address) new ones are closed at once, well before the 2 s connect deadline.
    let mut idle: Vec<TcpStream> = (0..45)
        .map(|_| TcpStream::connect(&addr).unwrap())
        .collect();
    sleep(Duration::from_millis(300));
    let refused = idle
        .iter_mut()
        .map(|s| closed_within(s, Duration::from_millis(5)))
        .filter(|closed| *closed)
        .count();
    assert!(
        (5..=7).contains(&refused),
        "{refused} of 45 refused with 40 allowed"
    );
    drop(idle);
    let done = wait_line(
        &reporter,
        "the reports' end",
        Duration::from_secs(150),
        |l| l.get("done").is_some() || l.get("timeout").is_some(),
    );
    assert_eq!(done["done"], 400, "the device kept reporting: {done}");
    assert_eq!(temperatures(&consume(&cluster, TELEMETRY), "d1").len(), 400);

    // Without `mqtt_allow_anonymous` (the test above's cluster) anonymous clients are
    // refused; here they are welcome but not with a will in the device namespace.
    assert_eq!(
        connack(
            host,
            &[
                "--client-id",
                "w",
                "--v5",
                "--will-topic",
                "$oc/devices/d1/sys/x"
            ]
        ),
        135
    );
}

/// MQTT 5 properties (user properties, response topic, correlation data, message expiry,
/// topic aliases) pass through the general broker, an expired retained message is not
/// delivered, and persistent sessions (3.1.1 and 5) keep QoS 1 messages while away.
#[test]
fn the_general_broker_keeps_mqtt5_properties_and_persistent_sessions() {
    let _serial = serial();
    let host = "127.0.55.1";
    let _cluster = Cluster::start_with(&[host], &[("AQUEDUCT_MQTT_ALLOW_ANONYMOUS", "true")]);
    let python = std::env::var("AQUEDUCT_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let mut command = std::process::Command::new(python);
    command
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/mqtt/features.py"
        ))
        .args([host, "1883"]);
    let out = common::run_with_timeout(command, Duration::from_secs(120));
    assert!(
        out.status.success(),
        "features.py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: Value = serde_json::from_slice(&out.stdout).unwrap();
    let messages = seen["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 3, "{seen}");
    let props = &messages[0]["props"];
    assert_eq!(
        props["UserProperty"],
        serde_json::json!([["k", "v"]]),
        "{seen}"
    );
    assert_eq!(props["ResponseTopic"], "f-reply/1");
    assert_eq!(props["CorrelationData"], "abc");
    assert!(
        props["MessageExpiryInterval"]
            .as_u64()
            .is_some_and(|s| s <= 60),
        "{seen}"
    );
    // The aliased publish arrives on the topic the alias stands for.
    assert_eq!(
        (messages[1]["topic"].as_str(), messages[2]["topic"].as_str()),
        (Some("f/alias"), Some("f/alias"))
    );
    assert_eq!(messages[2]["payload"], "a2");
    // A client that accepts topic aliases still gets each message on its own topic.
    assert_eq!(
        seen["aliased_topics"],
        serde_json::json!(["f/props", "f/alias", "f/alias"]),
        "{seen}"
    );
    assert_eq!(seen["retained_after_expiry"], serde_json::json!(["kept"]));
    // Sessions kept while the client was away, with what was published meanwhile...
    for (check, cid) in [
        ("persistent_v311", "f-persist-v311"),
        ("persistent_v5", "f-persist-v5"),
        ("clean_start_with_expiry", "f-cs"),
    ] {
        let p = &seen[check];
        assert_eq!(p["session_present"], true, "{check}: {seen}");
        assert_eq!(
            p["payloads"],
            serde_json::json!([format!("away-{cid}")]),
            "{check}: {seen}"
        );
    }
    // ...and MQTT 5 sessions that ended: with the connection (no expiry, or a DISCONNECT
    // setting it to 0), when their expiry ran out, or by a clean start.
    for check in [
        "no_expiry",
        "expired",
        "disconnect_expiry_zero",
        "clean_start_ends_it",
    ] {
        let p = &seen[check];
        assert_eq!(p["session_present"], false, "{check}: {seen}");
        assert_eq!(p["payloads"], serde_json::json!([]), "{check}: {seen}");
    }
    // MQTT 5 DISCONNECT 0x8E, session taken over.
    assert_eq!(seen["taken_over"], serde_json::json!([142]), "{seen}");
}
