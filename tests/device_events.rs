//! Device notifications in `aq.device-events` on a real 3-node cluster with real MQTT
//! clients (paho-mqtt through `tests/mqtt/clients.py`): online and offline with their
//! reasons (clean disconnect, socket closed, taken over by a session on another node, node
//! lost),
//! auth_failed, created / updated / deleted exactly once per change, and per-device `seq`
//! gap-free and without duplicates across a SIGKILL of the partition leader; `aqueduct
//! device subscribe` filters the stream. Commands, property set and get through the node
//! holding the device's session, recorded in `aq.device-commands`. Shadows of reported
//! properties across a SIGKILL of their keeper. Sessions of a node frozen past its peers'
//! patience are recorded lost and online again when it answers; those of a node that
//! restarted are recorded offline. Desired values in the shadow, sent when the device comes
//! online. A product's notifications forwarded to its topic across a SIGKILL of the
//! forwarder. Addresses 127.0.56.x to 127.0.59.x, 127.0.63.x and 127.0.64.x.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::thread::sleep;
use std::time::{Duration, Instant};

use common::mqtt::{connack, json_lines, mqtt_run, mqtt_spawn, ok, register};
use common::{Cluster, serial, signal};
use serde_json::Value;

const THERMO: &str = r#"{"name":"thermo","services":[{"service_id":"env","properties":[{"name":"temperature","type":"decimal","access":"R"}]}]}"#;
const EVENTS: &str = "aq.device-events";

fn creds<'a>(device: &'a str, secret: &'a str, rest: &[&'a str]) -> Vec<&'a str> {
    [&["--device", device, "--secret", secret][..], rest].concat()
}

/// Every event recorded so far, per device in log order.
fn events(cluster: &Cluster) -> BTreeMap<String, Vec<Value>> {
    by_device(cluster, EVENTS)
}

/// The JSON values of `topic` (keyed by device id), per device in log order.
fn by_device(cluster: &Cluster, topic: &str) -> BTreeMap<String, Vec<Value>> {
    let out = cluster.cli(&[
        "consume", topic, "--from", "earliest", "--end", "--output", "json",
    ]);
    let mut by_device: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    if !out.status.success() {
        return by_device;
    }
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let r: Value = serde_json::from_str(line).unwrap();
        let e: Value = serde_json::from_str(r["value"].as_str().unwrap()).unwrap();
        assert_eq!(r["key"], e["device_id"], "keyed by device id: {e}");
        by_device
            .entry(e["device_id"].as_str().unwrap().to_string())
            .or_default()
            .push(e);
    }
    by_device
}

/// `(event, reason)` of a device's events.
fn kinds(events: &[Value]) -> Vec<(String, String)> {
    events
        .iter()
        .map(|e| {
            (
                e["event"].as_str().unwrap().to_string(),
                e["reason"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// Waits until `device` has `n` events (no more arrive meanwhile: checked by the caller).
fn wait_events(cluster: &Cluster, device: &str, n: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let got = events(cluster).remove(device).unwrap_or_default();
        if got.len() >= n {
            return got;
        }
        if Instant::now() >= deadline {
            // What the read says, and what the nodes logged last.
            let out = cluster.cli(&[
                "consume", EVENTS, "--from", "earliest", "--end", "--output", "json",
            ]);
            panic!(
                "{device}: {n} events expected within 60 s, got {got:?}\nconsume: {}\n{}",
                String::from_utf8_lossy(&out.stderr),
                cluster.logs()
            );
        }
        sleep(Duration::from_millis(300));
    }
}

fn pair(event: &str, reason: &str) -> (String, String) {
    (event.to_string(), reason.to_string())
}

#[test]
fn device_notifications_are_numbered_per_device_across_a_leader_kill() {
    let _serial = serial();
    let hosts = ["127.0.56.1", "127.0.56.2", "127.0.56.3"];
    let mut cluster = Cluster::start(&hosts);
    register(
        &cluster,
        "thermo",
        THERMO,
        &[("d1", "secret-one"), ("d2", "secret-two")],
    );

    // d1: a clean session, a crashed one, a refused one, a change.
    // (Each step waits for the last one's events: reports from different nodes are
    // recorded in the order they reach the partition leader.)
    assert_eq!(connack(hosts[0], &creds("d1", "secret-one", &[])), 0);
    wait_events(&cluster, "d1", 3);
    let crash = creds(
        "d1",
        "secret-one",
        &[
            "publish",
            "--topic",
            "$oc/devices/d1/sys/messages/up",
            "--kill",
        ],
    );
    let (code, _) = mqtt_run(hosts[1], &crash);
    assert_eq!(code, Some(0));
    wait_events(&cluster, "d1", 5);
    // 3.1.1 return code 4, which paho reports as 0x86.
    assert_eq!(connack(hosts[2], &creds("d1", "wrong-secret", &[])), 0x86);
    wait_events(&cluster, "d1", 6);
    ok(cluster.cli(&["device", "update", "d1", "--tags", "site=a"]));

    // d2 connects on node 1, then (still connected there) on node 2: the first session is
    // recorded offline as taken over, and its own end later is not recorded again.
    let first = mqtt_spawn(
        hosts[0],
        &creds(
            "d2",
            "secret-two",
            &[
                "subscribe",
                "--topic",
                "$oc/devices/d2/sys/messages/down",
                "--seconds",
                "20",
            ],
        ),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while !json_lines(&first).iter().any(|l| l.get("suback").is_some()) {
        assert!(
            Instant::now() < deadline,
            "d2's first session did not connect"
        );
        sleep(Duration::from_millis(100));
    }
    assert_eq!(wait_events(&cluster, "d2", 2).len(), 2, "created, online");
    let second = mqtt_spawn(
        hosts[1],
        &creds(
            "d2",
            "secret-two",
            &[
                "subscribe",
                "--topic",
                "$oc/devices/d2/sys/messages/down",
                "--seconds",
                "5",
            ],
        ),
    );
    let d1_before = wait_events(&cluster, "d1", 7);
    assert_eq!(
        kinds(&d1_before),
        vec![
            pair("created", ""),
            pair("online", ""),
            pair("offline", "clean disconnect"),
            pair("online", ""),
            pair("offline", "socket closed"),
            pair("auth_failed", "bad credentials: wrong password"),
            pair("updated", "tags"),
        ],
        "{d1_before:?}"
    );
    // `device show` tells who is online, and where.
    let shown: Value = serde_json::from_slice(
        &ok(cluster.cli(&["device", "show", "d2", "--output", "json"])).stdout,
    )
    .unwrap();
    assert_eq!(shown["online"], true, "{shown}");
    let d2 = wait_events(&cluster, "d2", 4);
    assert_eq!(
        kinds(&d2)[..4],
        [
            pair("created", ""),
            pair("online", ""),
            pair("offline", "taken over by a new session"),
            pair("online", ""),
        ],
        "{d2:?}"
    );
    // Node 2 recorded the second session's online; the first was on node 1.
    assert_eq!(
        (d2[1]["node"].as_u64(), d2[3]["node"].as_u64()),
        (Some(1), Some(2))
    );

    // The leader of d1's partition is SIGKILLed; d1 goes on on another node.
    let leader = cluster
        .partition_leader(EVENTS, events_partition(&cluster, "d1"))
        .unwrap();
    cluster.node(leader).kill();
    let alive = (1..=3u64).find(|id| *id != leader).unwrap();
    assert_eq!(
        connack(hosts[alive as usize - 1], &creds("d1", "secret-one", &[])),
        0
    );
    wait_events(&cluster, "d1", 9);
    ok(cluster.cli(&["device", "update", "d1", "--status", "disabled"]));
    ok(cluster.cli(&["device", "update", "d1", "--status", "enabled"]));

    // Both d2 sessions end (the second first): only the second one's offline is recorded;
    // then d2 is deleted.
    for mut s in [first, second] {
        s.wait(Duration::from_secs(30));
    }
    ok(cluster.cli(&["device", "delete", "d2"]));

    let d1 = wait_events(&cluster, "d1", 11);
    assert_eq!(
        kinds(&d1)[7..],
        [
            pair("online", ""),
            pair("offline", "clean disconnect"),
            pair("updated", "status disabled"),
            pair("updated", "status enabled"),
        ],
        "{d1:?}"
    );
    // The second session ended cleanly, or went with its node when node 2 was killed.
    let d2 = wait_events(&cluster, "d2", 6);
    let second_end = if leader == 2 {
        "node lost"
    } else {
        "clean disconnect"
    };
    assert_eq!(
        kinds(&d2)[4..],
        [pair("offline", second_end), pair("deleted", "")],
        "{d2:?}"
    );
    // Nothing more arrives (no duplicate from a retried report or a resent change).
    sleep(Duration::from_secs(3));
    let all = events(&cluster);
    for (device, n) in [("d1", 11), ("d2", 6)] {
        let got = &all[device];
        assert_eq!(got.len(), n, "{device}: {got:?}");
        let seqs: Vec<u64> = got.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
        assert_eq!(
            seqs,
            (1..=n as u64).collect::<Vec<_>>(),
            "{device}: {got:?}"
        );
        assert!(
            got.iter()
                .all(|e| e["product"] == "thermo" && e["at"].as_u64() > Some(0))
        );
    }

    let shown: Value = serde_json::from_slice(
        &ok(cluster.cli(&["device", "show", "d1", "--output", "json"])).stdout,
    )
    .unwrap();
    assert_eq!(shown["online"], false, "{shown}");
    assert_eq!(shown["presence"]["seq"], 11, "{shown}");
    assert_eq!(shown["presence"]["last_event"], "updated", "{shown}");

    // `device subscribe` follows the stream, filtered.
    let out = ok(cluster.cli(&[
        "device",
        "subscribe",
        "--events",
        "online,offline",
        "--device",
        "d2",
        "--from",
        "earliest",
        "--max",
        "3",
        "--output",
        "json",
    ]));
    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let seen: Vec<(&str, u64)> = lines
        .iter()
        .map(|l| (l["event"].as_str().unwrap(), l["seq"].as_u64().unwrap()))
        .collect();
    assert_eq!(seen, vec![("online", 2), ("offline", 3), ("online", 4)]);
    let bad = cluster.cli(&["device", "subscribe", "--events", "rebooted"]);
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("unknown event"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
}

const BOILER: &str = r#"{"name":"boiler","services":[{"service_id":"env","properties":[
    {"name":"temperature","type":"decimal","access":"R"},
    {"name":"target","type":"int","min":5,"max":30,"access":"RW"}],
    "commands":[{"name":"reboot","paras":[{"name":"delay","type":"int","min":0,"max":60}]}]}]}"#;

/// A failed CLI call's stderr.
fn refused(out: std::process::Output) -> String {
    assert!(
        !out.status.success(),
        "accepted: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Commands, property set and get from the CLI (on the metadata leader) to a device whose
/// session is on another node, answered by the device (paho-mqtt); refused against the
/// model, offline and timed out; every request and outcome in `aq.device-commands`.
#[test]
fn requests_reach_a_device_on_another_node_and_are_recorded() {
    let _serial = serial();
    let hosts = ["127.0.57.1", "127.0.57.2", "127.0.57.3"];
    let cluster = Cluster::start(&hosts);
    register(&cluster, "boiler", BOILER, &[("b1", "secret-b1")]);
    // The CLI goes to the metadata leader's node; the device connects to another one.
    let leader = cluster.leader();
    let device_host = hosts[(1..=3u64).find(|id| *id != leader).unwrap() as usize - 1];
    let server = hosts[leader as usize - 1].to_string() + ":7070";
    let ask = |args: &[&str]| -> std::process::Output {
        let mut command = common::aqueduct();
        command.arg("device").args(args).args([
            "--server",
            &server,
            "--output",
            "json",
            "--timeout",
            "5",
        ]);
        common::run_with_timeout(command, Duration::from_secs(60))
    };

    // Offline: no session anywhere.
    let e = refused(ask(&[
        "command",
        "b1",
        "reboot",
        "--params",
        r#"{"delay":1}"#,
    ]));
    assert!(e.contains("offline") && e.contains("DEVICE_OFFLINE"), "{e}");

    let device = mqtt_spawn(
        device_host,
        &creds("b1", "secret-b1", &["respond", "--seconds", "30"]),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while !json_lines(&device)
        .iter()
        .any(|l| l.get("suback").is_some())
    {
        assert!(Instant::now() < deadline, "the device did not subscribe");
        sleep(Duration::from_millis(100));
    }
    let answer =
        |out: std::process::Output| -> Value { serde_json::from_slice(&ok(out).stdout).unwrap() };
    let cmd = answer(ask(&[
        "command",
        "b1",
        "reboot",
        "--params",
        r#"{"delay":5}"#,
    ]));
    assert_eq!(cmd["response"]["result_code"], 0, "{cmd}");
    assert_eq!(cmd["response"]["paras"]["echo"]["delay"], 5, "{cmd}");
    let set = answer(ask(&[
        "set-properties",
        "b1",
        "--params",
        r#"{"target":21}"#,
    ]));
    assert_eq!(set["response"]["result_desc"], "set", "{set}");
    let get = answer(ask(&["get-properties", "b1"]));
    assert_eq!(
        get["response"]["services"][0]["properties"]["temperature"], 21.5,
        "{get}"
    );
    // What the device was sent: the request id in the topic, the model's service.
    let requests: Vec<Value> = json_lines(&device)
        .into_iter()
        .filter(|l| l.get("request").is_some())
        .collect();
    assert_eq!(requests.len(), 3, "{requests:?}");
    let id = cmd["request_id"].as_str().unwrap();
    assert_eq!(
        requests[0]["request"],
        format!("$oc/devices/b1/sys/commands/request_id={id}")
    );
    assert_eq!(requests[0]["payload"]["service_id"], "env");
    assert_eq!(
        requests[1]["payload"]["services"][0]["properties"]["target"],
        21
    );

    // Checked against the model before anything is sent.
    for (args, needle) in [
        (
            vec!["command", "b1", "reboot", "--params", r#"{"delay":99}"#],
            "delay",
        ),
        (vec!["command", "b1", "explode"], "explode"),
        (
            vec!["set-properties", "b1", "--params", r#"{"temperature":3}"#],
            "read-only",
        ),
        (vec!["command", "nobody", "reboot"], "does not exist"),
    ] {
        let e = refused(ask(&args));
        assert!(e.contains(needle), "{args:?}: {e}");
    }
    assert_eq!(
        json_lines(&device)
            .iter()
            .filter(|l| l.get("request").is_some())
            .count(),
        3,
        "a refused request reached the device"
    );

    // A device that does not answer: timed out.
    let mut device = device;
    device.wait(Duration::from_secs(60));
    let mute = mqtt_spawn(
        device_host,
        &creds("b1", "secret-b1", &["respond", "--mute", "--seconds", "20"]),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while !json_lines(&mute).iter().any(|l| l.get("suback").is_some()) {
        assert!(
            Instant::now() < deadline,
            "the mute device did not subscribe"
        );
        sleep(Duration::from_millis(100));
    }
    let e = refused(ask(&["get-properties", "b1"]));
    assert!(e.contains("TIMED_OUT"), "{e}");

    // Every request and its outcome recorded.
    let out = ok(cluster.cli(&[
        "consume",
        "aq.device-commands",
        "--from",
        "earliest",
        "--end",
        "--output",
        "json",
    ]));
    let records: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let r: Value = serde_json::from_str(l).unwrap();
            assert_eq!(r["key"], "b1");
            serde_json::from_str(r["value"].as_str().unwrap()).unwrap()
        })
        .collect();
    let statuses: Vec<(&str, &str)> = records
        .iter()
        .map(|r| (r["kind"].as_str().unwrap(), r["status"].as_str().unwrap()))
        .collect();
    assert_eq!(
        statuses,
        vec![
            ("command", "sent"),
            ("command", "offline"),
            ("command", "sent"),
            ("command", "answered"),
            ("set_properties", "sent"),
            ("set_properties", "answered"),
            ("get_properties", "sent"),
            ("get_properties", "answered"),
            ("get_properties", "sent"),
            ("get_properties", "timed_out"),
        ],
        "{records:?}"
    );
    assert_eq!(records[3]["request_id"], id);
    assert_eq!(records[3]["response"]["paras"]["echo"]["delay"], 5);
}

/// The shadow of a device's reported properties in `device show`, kept by the projection
/// into `aq.device-shadows`: the latest value of each report, the same after the node
/// keeping it is SIGKILLed (rebuilt from the log) and still following new reports.
#[test]
fn shadows_follow_reports_and_survive_their_keeper() {
    let _serial = serial();
    let hosts = ["127.0.58.1", "127.0.58.2", "127.0.58.3"];
    let mut cluster = Cluster::start(&hosts);
    register(
        &cluster,
        "thermo",
        THERMO,
        &[("s1", "secret-s1"), ("s2", "secret-s2")],
    );
    let report = |host: &str, device: &str, secret: &str, payload: &str, count: &str| {
        let topic = format!("$oc/devices/{device}/sys/properties/report");
        let args = creds(
            device,
            secret,
            &[
                "publish",
                "--topic",
                &topic,
                "--payload",
                payload,
                "--count",
                count,
            ],
        );
        let (code, lines) = mqtt_run(host, &args);
        assert_eq!(code, Some(0), "{lines:?}");
    };
    let temperature = |cluster: &Cluster, device: &str| -> Option<f64> {
        let out = cluster.cli(&["device", "show", device, "--output", "json"]);
        let v: Value = serde_json::from_slice(&out.stdout).ok()?;
        v["shadow"]["reported"]["env"]["temperature"]["value"].as_f64()
    };
    let wait_for = |cluster: &Cluster, device: &str, want: f64| {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let got = temperature(cluster, device);
            if got == Some(want) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{device}'s shadow shows {got:?}, not {want}"
            );
            sleep(Duration::from_millis(300));
        }
    };
    let payload = |t: &str| {
        format!(r#"{{"services":[{{"service_id":"env","properties":{{"temperature":{t}}}}}]}}"#)
    };
    report(hosts[0], "s1", "secret-s1", &payload("{i}"), "5");
    report(hosts[1], "s2", "secret-s2", &payload("40.5"), "1");
    wait_for(&cluster, "s1", 4.0);
    wait_for(&cluster, "s2", 40.5);

    // The node keeping the shadows is SIGKILLed: the next keeper rebuilds them from the log
    // and goes on folding reports in.
    let keeper = cluster.partition_leader("aq.device-shadows", 0).unwrap();
    cluster.node(keeper).kill();
    let alive = (1..=3u64).find(|id| *id != keeper).unwrap();
    report(
        hosts[alive as usize - 1],
        "s1",
        "secret-s1",
        &payload("-3.25"),
        "1",
    );
    wait_for(&cluster, "s1", -3.25);
    assert_eq!(temperature(&cluster, "s2"), Some(40.5));
    let shown: Value = serde_json::from_slice(
        &ok(cluster.cli(&["device", "show", "s2", "--output", "json"])).stdout,
    )
    .unwrap();
    let reported = &shown["shadow"]["reported"]["env"]["temperature"];
    assert!(
        reported["at"].as_str().is_some_and(|t| t.contains('T')),
        "{shown}"
    );
    assert_eq!(shown["shadow"]["product"], "thermo");
}

/// A device that holds a session until the test ends it (or its node does).
fn hold(host: &str, device: &str, secret: &str) -> common::kafka::Lines {
    let session = mqtt_spawn(
        host,
        &creds(
            device,
            secret,
            &[
                "subscribe",
                "--topic",
                &format!("$oc/devices/{device}/sys/messages/down"),
                "--seconds",
                "600",
            ],
        ),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while !json_lines(&session)
        .iter()
        .any(|l| l.get("suback").is_some())
    {
        assert!(Instant::now() < deadline, "{device} did not connect");
        sleep(Duration::from_millis(100));
    }
    session
}

/// The partition of `aq.device-events` holding `device`'s events.
fn events_partition(cluster: &Cluster, device: &str) -> usize {
    let out = ok(cluster.cli(&[
        "consume", EVENTS, "--from", "earliest", "--end", "--output", "json",
    ]));
    let line = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|r| r["key"] == device)
        .unwrap();
    line["partition"].as_u64().unwrap() as usize
}

#[test]
fn sessions_of_a_frozen_node_come_back_and_those_of_a_restarted_one_end() {
    let _serial = serial();
    let hosts = ["127.0.59.1", "127.0.59.2", "127.0.59.3"];
    let mut cluster = Cluster::start(&hosts);
    register(&cluster, "thermo", THERMO, &[("d3", "secret-3")]);
    wait_events(&cluster, "d3", 1);
    let leader = cluster
        .partition_leader(EVENTS, events_partition(&cluster, "d3"))
        .unwrap();
    // The session is on a node that does not lead d3's partition.
    let holder = (1..=3u64).find(|id| *id != leader).unwrap();
    let session = hold(hosts[holder as usize - 1], "d3", "secret-3");
    assert_eq!(wait_events(&cluster, "d3", 2).len(), 2, "created, online");

    // Frozen (shorter than the device's keep-alive): the leader takes the session for lost;
    // once the node answers again the still connected session is online again.
    signal(cluster.node(holder).child.as_ref().unwrap(), 19);
    let lost = wait_events(&cluster, "d3", 3);
    signal(cluster.node(holder).child.as_ref().unwrap(), 18);
    assert_eq!(kinds(&lost)[2], pair("offline", "node lost"), "{lost:?}");
    let back = wait_events(&cluster, "d3", 4);
    assert_eq!(
        kinds(&back)[3],
        pair("online", "node answers again"),
        "{back:?}"
    );
    assert_eq!(back[3]["session"], back[1]["session"], "{back:?}");
    let shown: Value = serde_json::from_slice(
        &ok(cluster.cli(&["device", "show", "d3", "--output", "json"])).stdout,
    )
    .unwrap();
    assert_eq!(shown["online"], true, "{shown}");
    drop(session);
    let ended = wait_events(&cluster, "d3", 5);
    assert_eq!(kinds(&ended)[4].0, "offline", "{ended:?}");
    sleep(Duration::from_secs(2));
    assert_eq!(events(&cluster)["d3"].len(), 5);
    drop(cluster);

    // One node, which leads everything: after a SIGKILL and a restart, the session of its
    // earlier incarnation is recorded offline (nobody else could).
    let mut single = Cluster::start(&["127.0.59.10"]);
    register(&single, "thermo", THERMO, &[("d4", "secret-4")]);
    let session = hold("127.0.59.10", "d4", "secret-4");
    assert_eq!(wait_events(&single, "d4", 2).len(), 2, "created, online");
    single.node(1).kill();
    drop(session);
    single.node(1).start();
    let d4 = wait_events(&single, "d4", 3);
    assert_eq!(
        kinds(&d4),
        vec![
            pair("created", ""),
            pair("online", ""),
            pair("offline", "node restarted")
        ],
        "{d4:?}"
    );
    let shown: Value = serde_json::from_slice(
        &ok(single.cli(&["device", "show", "d4", "--output", "json"])).stdout,
    )
    .unwrap();
    assert_eq!(shown["online"], false, "{shown}");
}

/// Desired values set while the device is offline: checked against the model, in the shadow
/// on every node and after a SIGKILL of the shadows' keeper, sent to the device as a
/// property set when it comes online (on any node) and removed once it accepted them; set
/// while it is online, sent at once. A deleted device's shadow goes with it.
#[test]
fn desired_values_wait_for_the_device_and_go_once_accepted() {
    let _serial = serial();
    let hosts = ["127.0.63.1", "127.0.63.2", "127.0.63.3"];
    let mut cluster = Cluster::start(&hosts);
    register(&cluster, "boiler", BOILER, &[("b1", "secret-b1")]);
    let desired = |cluster: &Cluster| -> Value {
        let out = ok(cluster.cli(&["device", "show", "b1", "--output", "json"]));
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        v["shadow"]["desired"].clone()
    };
    let set = |cluster: &Cluster, params: &str| {
        cluster.cli(&[
            "device",
            "set-desired",
            "b1",
            "--params",
            params,
            "--output",
            "json",
        ])
    };
    // Checked against the thing model: read-only and out-of-range values are refused.
    let e = refused(set(&cluster, r#"{"temperature":3}"#));
    assert!(e.contains("read-only"), "{e}");
    let e = refused(set(&cluster, r#"{"target":99}"#));
    assert!(e.contains("target"), "{e}");
    let out: Value = serde_json::from_slice(&ok(set(&cluster, r#"{"target":21}"#)).stdout).unwrap();
    assert_eq!(out["desired"]["env"]["target"]["value"], 21, "{out}");

    // Kept by the shadows' keeper, in the log: the next keeper has it too.
    let keeper = cluster.partition_leader("aq.device-shadows", 0).unwrap();
    cluster.node(keeper).kill();
    let deadline = Instant::now() + Duration::from_secs(60);
    while desired(&cluster)["env"]["target"]["value"] != 21 {
        assert!(
            Instant::now() < deadline,
            "the desired value was lost with its keeper: {}",
            desired(&cluster)
        );
        sleep(Duration::from_millis(300));
    }

    // The device comes online on a live node: it is sent the desired value and accepts it.
    let alive: Vec<&str> = (1..=3u64)
        .filter(|id| *id != keeper)
        .map(|id| hosts[id as usize - 1])
        .collect();
    let device = mqtt_spawn(
        alive[0],
        &creds("b1", "secret-b1", &["respond", "--seconds", "120"]),
    );
    let got_set = |device: &common::kafka::Lines, target: i64| {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let sent = json_lines(device).into_iter().any(|l| {
                l["request"]
                    .as_str()
                    .is_some_and(|t| t.contains("/sys/properties/set/"))
                    && l["payload"]["services"][0]["properties"]["target"] == target
            });
            if sent {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "target={target} not sent to the device: {:?}\n{}",
                device.snapshot(),
                cluster.logs()
            );
            sleep(Duration::from_millis(100));
        }
    };
    got_set(&device, 21);
    let gone = |cluster: &Cluster| {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !desired(cluster).is_null() {
            assert!(
                Instant::now() < deadline,
                "accepted, but still desired: {}",
                desired(cluster)
            );
            sleep(Duration::from_millis(200));
        }
    };
    gone(&cluster);

    // Set while the device is online: sent at once.
    ok(set(&cluster, r#"{"target":7}"#));
    got_set(&device, 7);
    gone(&cluster);
    drop(device);

    // A deleted device's shadow goes with it (a new device of that id starts without one).
    ok(set(&cluster, r#"{"target":9}"#));
    ok(cluster.cli(&["device", "delete", "b1"]));
    ok(cluster.cli(&[
        "device",
        "create",
        "b1",
        "--product",
        "boiler",
        "--secret",
        "secret-b1",
    ]));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = ok(cluster.cli(&["device", "show", "b1", "--output", "json"]));
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        if v["shadow"].is_null() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the deleted device's shadow is still there: {v}"
        );
        sleep(Duration::from_millis(300));
    }
}

/// A product's device notifications forwarded to a topic it names: the kinds it asked for,
/// recorded after it subscribed, every one of them (repeats recognisable by seq) across a
/// SIGKILL of the forwarding node; `--off` stops them.
#[test]
fn a_products_notifications_reach_its_topic_across_a_forwarder_kill() {
    let _serial = serial();
    let hosts = ["127.0.64.1", "127.0.64.2", "127.0.64.3"];
    let mut cluster = Cluster::start(&hosts);
    register(
        &cluster,
        "thermo",
        THERMO,
        &[("n1", "secret-n1"), ("n2", "secret-n2")],
    );
    let session = |host: &str, device: &str, secret: &str| {
        let args = creds(device, secret, &["connect"]);
        let (code, lines) = mqtt_run(host, &args);
        assert_eq!(code, Some(0), "{lines:?}");
    };
    // Before the subscription: not forwarded.
    session(hosts[0], "n1", "secret-n1");
    let before = wait_events(&cluster, "n1", 3).len();

    let e = refused(cluster.cli(&[
        "product",
        "notify",
        "thermo",
        "--topic",
        "status",
        "--events",
        "online,rebooted",
    ]));
    assert!(e.contains("rebooted"), "{e}");
    let out: Value = serde_json::from_slice(
        &ok(cluster.cli(&[
            "product",
            "notify",
            "thermo",
            "--topic",
            "status",
            "--events",
            "online,offline",
            "--output",
            "json",
        ]))
        .stdout,
    )
    .unwrap();
    assert_eq!(out["notifications"]["topic"], "status", "{out}");

    // Sessions on every node, the forwarder SIGKILLed between them.
    session(hosts[1], "n1", "secret-n1");
    session(hosts[2], "n2", "secret-n2");
    ok(cluster.cli(&["device", "update", "n2", "--tags", "site=a"]));
    let wait_forwarded = |cluster: &Cluster, device: &str, n: usize| {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let got = by_device(cluster, "status")
                .remove(device)
                .unwrap_or_default();
            if got.len() >= n {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{device}: {n} notifications expected, got {got:?}\n{}",
                cluster.logs()
            );
            sleep(Duration::from_millis(300));
        }
    };
    wait_forwarded(&cluster, "n2", 2);
    let forwarder = cluster
        .partition_leader("aq.device-notify-positions", 0)
        .unwrap();
    cluster.node(forwarder).kill();
    let alive: Vec<&str> = (1..=3u64)
        .filter(|id| *id != forwarder)
        .map(|id| hosts[id as usize - 1])
        .collect();
    session(alive[0], "n1", "secret-n1");
    session(alive[1], "n2", "secret-n2");
    wait_forwarded(&cluster, "n1", 4);
    wait_forwarded(&cluster, "n2", 4);

    // Exactly the online/offline events recorded after the subscription, in order (a
    // repeat after the kill recognisable by its seq).
    let recorded = events(&cluster);
    let forwarded = by_device(&cluster, "status");
    for device in ["n1", "n2"] {
        let skip = if device == "n1" { before } else { 1 };
        let want: Vec<(u64, String)> = recorded[device]
            .iter()
            .skip(skip)
            .filter(|e| e["event"] == "online" || e["event"] == "offline")
            .map(|e| {
                (
                    e["seq"].as_u64().unwrap(),
                    e["event"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        let mut got: Vec<(u64, String)> = forwarded[device]
            .iter()
            .map(|e| {
                assert_eq!(e["product"], "thermo", "{e}");
                assert!(e["at"].as_str().is_some_and(|t| t.contains('T')), "{e}");
                (
                    e["seq"].as_u64().unwrap(),
                    e["event"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        assert!(
            got.windows(2).all(|w| w[0].0 <= w[1].0),
            "{device} out of order: {got:?}"
        );
        got.dedup();
        assert_eq!(got, want, "{device}: forwarded vs recorded");
    }

    // Off: later events stay in aq.device-events only.
    ok(cluster.cli(&["product", "notify", "thermo", "--off"]));
    let so_far = by_device(&cluster, "status")
        .values()
        .map(Vec::len)
        .sum::<usize>();
    session(alive[0], "n1", "secret-n1");
    let n1_events = recorded["n1"].len();
    wait_events(&cluster, "n1", n1_events + 2);
    sleep(Duration::from_secs(2));
    let after = by_device(&cluster, "status")
        .values()
        .map(Vec::len)
        .sum::<usize>();
    assert_eq!(after, so_far, "forwarded after --off");
}
