//! One MQTT namespace over a real 3-node cluster, with general (non-device) clients:
//! paho-mqtt through `tests/mqtt/clients.py`, and mosquitto_pub / mosquitto_sub. A message
//! published on any node reaches the matching subscribers on every node (wildcards, QoS 0,
//! 1 and 2), once and in order; a will fires across nodes; a retained message is there for
//! a new subscriber on any node, also after a full-cluster restart (SIGKILL of every
//! node), and a cleared one stays cleared. Persistent sessions resumed on another node
//! with their subscriptions, taken over across nodes, kept across a full-cluster restart.
//! Shared subscriptions with members on every node: each message to one member of each
//! group. Addresses 127.0.62.x, 127.0.65.x and 127.0.66.x.

#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;
use std::thread::sleep;
use std::time::{Duration, Instant};

use common::kafka::Lines;
use common::mqtt::{json_lines, mqtt_run, mqtt_spawn, ok};
use common::{Cluster, run_with_timeout, serial, wait_for};
use serde_json::Value;

const HOSTS: [&str; 3] = ["127.0.62.1", "127.0.62.2", "127.0.62.3"];
const ANONYMOUS: (&str, &str) = ("AQUEDUCT_MQTT_ALLOW_ANONYMOUS", "true");

/// `mosquitto_sub` on `host`, printing `topic payload` per message (`-d`: also its
/// protocol trace, so the SUBACK can be waited for).
fn mosquitto_sub(host: &str, client_id: &str, filter: &str, qos: &str) -> Lines {
    // Line-buffered: its trace is otherwise held back while stdout is a pipe.
    let mut command = Command::new("stdbuf");
    command.args(["-oL", "mosquitto_sub"]).args([
        "-h", host, "-p", "1883", "-i", client_id, "-t", filter, "-q", qos, "-v", "-d", "-W", "120",
    ]);
    Lines::spawn_command(command)
}

fn mosquitto_pub(host: &str, args: &[&str]) {
    let mut command = Command::new("mosquitto_pub");
    command.args(["-h", host, "-p", "1883"]).args(args);
    ok(run_with_timeout(command, Duration::from_secs(30)));
}

/// The messages (`topic payload`) a mosquitto_sub printed so far.
fn mosquitto_messages(lines: &Lines, prefix: &str) -> Vec<String> {
    lines
        .snapshot()
        .into_iter()
        .filter(|l| l.starts_with(prefix))
        .collect()
}

/// The `(topic, payload)` of the messages a clients.py subscriber printed so far.
fn paho_messages(lines: &Lines) -> Vec<(String, String)> {
    json_lines(lines)
        .iter()
        .filter(|l| l.get("topic").is_some())
        .map(|l| {
            (
                l["topic"].as_str().unwrap().to_string(),
                l["payload"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn subacked(lines: &Lines) -> bool {
    json_lines(lines).iter().any(|l| l.get("suback").is_some())
}

/// What one fresh subscriber on `host` gets for `filter` within a few seconds: the
/// retained messages, with their retain flags.
fn retained(host: &str, client_id: &str, filter: &str) -> Vec<Value> {
    let (_, lines) = mqtt_run(
        host,
        &[
            "subscribe",
            "--v5",
            "--client-id",
            client_id,
            "--topic",
            filter,
            "--count",
            "0",
            "--seconds",
            "3",
        ],
    );
    lines
        .into_iter()
        .filter(|l| l.get("topic").is_some())
        .collect()
}

#[test]
fn one_mqtt_namespace_spans_the_cluster() {
    let _serial = serial();
    let mut cluster = Cluster::start_with(&HOSTS, &[ANONYMOUS]);

    // Subscribers on nodes 2 and 3, publishers on nodes 1 and 3.
    let paho = mqtt_spawn(
        HOSTS[1],
        &[
            "subscribe",
            "--v5",
            "--client-id",
            "sub-2",
            "--topic",
            "plant/+/temp",
            "--topic",
            "plant/will",
            "--qos",
            "2",
            "--count",
            "0",
            "--seconds",
            "90",
        ],
    );
    let mosquitto = mosquitto_sub(HOSTS[2], "sub-3", "plant/#", "1");
    let mosquitto_subacked = |m: &Lines| m.snapshot().iter().any(|l| l.contains("received SUBACK"));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !(subacked(&paho) && mosquitto_subacked(&mosquitto)) {
        assert!(
            Instant::now() < deadline,
            "no SUBACKs: paho {:?}, mosquitto {:?}\n{}",
            paho.snapshot(),
            mosquitto.snapshot(),
            cluster.node(2).log_tail()
        );
        sleep(Duration::from_millis(50));
    }

    mosquitto_pub(HOSTS[0], &["-q", "1", "-t", "plant/1/temp", "-m", "t1"]);
    let (code, lines) = mqtt_run(
        HOSTS[0],
        &[
            "publish",
            "--v5",
            "--client-id",
            "pub-1",
            "--topic",
            "plant/2/temp",
            "--payload",
            "t2",
            "--qos",
            "2",
        ],
    );
    assert_eq!(code, Some(0), "{lines:?}");
    mosquitto_pub(HOSTS[2], &["-q", "0", "-t", "plant/3/temp", "-m", "t3"]);
    // Not matched by node 2's filters, matched by node 3's.
    mosquitto_pub(HOSTS[0], &["-q", "1", "-t", "plant/1/humidity", "-m", "h1"]);
    // A will: the client on node 1 drops its socket without DISCONNECT.
    let (code, lines) = mqtt_run(
        HOSTS[0],
        &[
            "publish",
            "--client-id",
            "dies",
            "--topic",
            "plant/alive",
            "--payload",
            "yes",
            "--will-topic",
            "plant/will",
            "--will-payload",
            "gone",
            "--kill",
        ],
    );
    assert_eq!(code, Some(0), "{lines:?}");

    let want_paho: Vec<(String, String)> = [
        ("plant/1/temp", "t1"),
        ("plant/2/temp", "t2"),
        ("plant/3/temp", "t3"),
        ("plant/will", "gone"),
    ]
    .iter()
    .map(|(t, p)| (t.to_string(), p.to_string()))
    .collect();
    wait_for("node 2's subscriber", Duration::from_secs(30), || {
        paho_messages(&paho).len() >= want_paho.len()
    });
    let want_mosquitto = [
        "plant/1/temp t1",
        "plant/2/temp t2",
        "plant/3/temp t3",
        "plant/1/humidity h1",
    ];
    wait_for("node 3's subscriber", Duration::from_secs(30), || {
        let got = mosquitto_messages(&mosquitto, "plant/");
        want_mosquitto.iter().all(|w| got.iter().any(|g| g == w))
            && got.iter().any(|g| g == "plant/will gone")
    });
    // Nothing arrives twice (a node's own messages come to it through the log only).
    sleep(Duration::from_secs(1));
    assert_eq!(paho_messages(&paho), want_paho, "node 2, in publish order");
    let got = mosquitto_messages(&mosquitto, "plant/");
    let mut expected: Vec<&str> = want_mosquitto.to_vec();
    expected.extend(["plant/alive yes", "plant/will gone"]);
    let mut sorted = got.clone();
    sorted.sort();
    expected.sort();
    assert_eq!(sorted, expected, "node 3: {got:?}");
    // One publisher's messages keep their order everywhere.
    let temps: Vec<&String> = got.iter().filter(|l| l.contains("/temp ")).collect();
    assert_eq!(
        temps,
        ["plant/1/temp t1", "plant/2/temp t2", "plant/3/temp t3"]
    );
    drop(paho);
    drop(mosquitto);

    // Retained messages: published on node 1, there for a new subscriber on node 2; one
    // set and then cleared (an empty retained payload) is not.
    mosquitto_pub(
        HOSTS[0],
        &["-q", "1", "-r", "-t", "site/config", "-m", "v1"],
    );
    mosquitto_pub(
        HOSTS[2],
        &["-q", "1", "-r", "-t", "site/old", "-m", "stale"],
    );
    mosquitto_pub(HOSTS[2], &["-q", "1", "-r", "-t", "site/old", "-n"]);
    for (i, host) in HOSTS.iter().enumerate() {
        let got = retained(host, &format!("late-{i}"), "site/#");
        assert_eq!(got.len(), 1, "node {}: {got:?}", i + 1);
        assert_eq!(
            (got[0]["topic"].as_str(), got[0]["payload"].as_str()),
            (Some("site/config"), Some("v1"))
        );
        assert_eq!(got[0]["retain"], true);
    }

    // A full-cluster restart: every node killed, then started again.
    for node in &mut cluster.nodes {
        node.kill();
    }
    for node in &mut cluster.nodes {
        node.start();
    }
    cluster.wait_members(3, Duration::from_secs(60));
    for (i, host) in HOSTS.iter().enumerate() {
        // A node takes general clients once its retained messages are back.
        wait_for(
            "the node to take MQTT clients",
            Duration::from_secs(60),
            || {
                let (code, _) = mqtt_run(host, &["connect", "--client-id", "probe"]);
                code == Some(0)
            },
        );
        let got = retained(host, &format!("after-{i}"), "site/#");
        assert_eq!(got.len(), 1, "node {} after the restart: {got:?}", i + 1);
        assert_eq!(
            (got[0]["topic"].as_str(), got[0]["payload"].as_str()),
            (Some("site/config"), Some("v1")),
            "node {}",
            i + 1
        );
        assert_eq!(got[0]["retain"], true);
    }
    // And messages flow between nodes again.
    let paho = mqtt_spawn(
        HOSTS[2],
        &[
            "subscribe",
            "--client-id",
            "sub-again",
            "--topic",
            "again/#",
            "--count",
            "1",
            "--seconds",
            "30",
        ],
    );
    wait_for("the SUBACK", Duration::from_secs(30), || subacked(&paho));
    mosquitto_pub(HOSTS[1], &["-q", "1", "-t", "again/x", "-m", "back"]);
    wait_for(
        "a message after the restart",
        Duration::from_secs(30),
        || paho_messages(&paho) == [("again/x".to_string(), "back".to_string())],
    );
}

/// A subscriber with a persistent session and no topics of its own: what its session's
/// subscriptions deliver, for `seconds`.
fn resume(host: &str, client_id: &str, v5: bool, seconds: &str) -> Lines {
    let mut args = vec!["subscribe", "--client-id", client_id, "--persistent"];
    if v5 {
        args.push("--v5");
    }
    args.extend_from_slice(&["--count", "0", "--seconds", seconds]);
    mqtt_spawn(host, &args)
}

/// The `session_present` of a resumed subscriber's CONNACK, once it has one.
fn session_present(lines: &Lines) -> bool {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(l) = json_lines(lines)
            .iter()
            .find(|l| l.get("connected").is_some())
        {
            return l["session_present"] == true;
        }
        assert!(
            Instant::now() < deadline,
            "no CONNACK: {:?}",
            lines.snapshot()
        );
        sleep(Duration::from_millis(50));
    }
}

/// Persistent sessions (3.1.1 clean session off, MQTT 5 with an expiry interval) are the
/// cluster's: resumed on another node with their subscriptions, taken over from the node
/// holding the connection (MQTT 5: DISCONNECT 0x8E there), still there after a full-cluster
/// SIGKILL restart, and gone after a clean-session connection.
#[test]
fn persistent_sessions_move_between_nodes_and_survive_a_full_restart() {
    let _serial = serial();
    let hosts = ["127.0.65.1", "127.0.65.2", "127.0.65.3"];
    let mut cluster = Cluster::start_with(&hosts, &[ANONYMOUS]);
    for (client, v5) in [("keep-311", false), ("keep-5", true)] {
        let mut args = vec![
            "subscribe",
            "--client-id",
            client,
            "--persistent",
            "--topic",
            "fleet/+/state",
            "--qos",
            "1",
            "--count",
            "0",
            "--seconds",
            "0.5",
        ];
        if v5 {
            args.push("--v5");
        }
        let (_, lines) = mqtt_run(hosts[0], &args);
        assert!(
            lines.iter().any(|l| l["suback"] == serde_json::json!([1])),
            "{client}: {lines:?}"
        );
    }
    let delivered = |lines: &Lines, payload: &str| {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !paho_messages(lines).iter().any(|(_, p)| p == payload) {
            assert!(
                Instant::now() < deadline,
                "{payload} not delivered to a resumed session: {:?}",
                lines.snapshot()
            );
            sleep(Duration::from_millis(50));
        }
    };

    // Resumed on other nodes: their subscriptions deliver without a SUBSCRIBE.
    let s311 = resume(hosts[1], "keep-311", false, "60");
    let s5 = resume(hosts[2], "keep-5", true, "60");
    assert!(session_present(&s311), "{:?}", s311.snapshot());
    assert!(session_present(&s5), "{:?}", s5.snapshot());
    mosquitto_pub(hosts[0], &["-t", "fleet/a/state", "-m", "m1", "-q", "1"]);
    delivered(&s311, "m1");
    delivered(&s5, "m1");

    // Taken over from another node: the old connection is closed (MQTT 5: 0x8E).
    let s5_again = resume(hosts[0], "keep-5", true, "5");
    assert!(session_present(&s5_again));
    wait_for(
        "the node 3 connection closed by the takeover (0x8E)",
        Duration::from_secs(20),
        || json_lines(&s5).iter().any(|l| l["disconnected"] == 142),
    );
    drop((s311, s5, s5_again));

    // A full-cluster restart keeps them.
    for node in &mut cluster.nodes {
        node.kill();
    }
    for node in &mut cluster.nodes {
        node.start();
    }
    cluster.wait_members(3, Duration::from_secs(60));
    wait_for(
        "node 1 to take MQTT clients",
        Duration::from_secs(60),
        || mqtt_run(hosts[0], &["connect", "--client-id", "probe"]).0 == Some(0),
    );
    let s311 = resume(hosts[0], "keep-311", false, "60");
    assert!(session_present(&s311), "{:?}", s311.snapshot());
    mosquitto_pub(hosts[2], &["-t", "fleet/b/state", "-m", "m2", "-q", "1"]);
    delivered(&s311, "m2");
    drop(s311);

    // A clean session ends it for the cluster.
    let (_, lines) = mqtt_run(hosts[1], &["connect", "--client-id", "keep-311"]);
    assert_eq!(lines[0]["rc"], 0, "{lines:?}");
    let s311 = resume(hosts[2], "keep-311", false, "3");
    assert!(!session_present(&s311), "{:?}", s311.snapshot());
    mosquitto_pub(hosts[0], &["-t", "fleet/c/state", "-m", "m3", "-q", "1"]);
    sleep(Duration::from_secs(2));
    assert!(paho_messages(&s311).is_empty(), "{:?}", s311.snapshot());
}

/// The `payload`s a subscriber printed so far (paho through clients.py, or mosquitto_sub
/// printing `topic payload`), for messages on topics starting with `prefix`.
fn payloads(lines: &Lines, paho: bool, prefix: &str) -> Vec<String> {
    match paho {
        true => paho_messages(lines)
            .into_iter()
            .filter(|(t, _)| t.starts_with(prefix))
            .map(|(_, p)| p)
            .collect(),
        false => mosquitto_messages(lines, prefix)
            .into_iter()
            .filter_map(|l| l.split_once(' ').map(|(_, p)| p.to_string()))
            .collect(),
    }
}

#[test]
fn shared_subscriptions_give_each_message_to_one_member_across_the_cluster() {
    let _serial = serial();
    let hosts = ["127.0.66.1", "127.0.66.2", "127.0.66.3"];
    let cluster = Cluster::start_with(&hosts, &[ANONYMOUS]);
    let paho = |host: &str, client_id: &str, filter: &str, qos: &str| {
        mqtt_spawn(
            host,
            &[
                "subscribe",
                "--v5",
                "--client-id",
                client_id,
                "--topic",
                filter,
                "--qos",
                qos,
                "--count",
                "0",
                "--seconds",
                "120",
            ],
        )
    };
    // Group "workers": a member on each node (MQTT 5 QoS 1, 3.1.1 QoS 1, MQTT 5 QoS 2).
    let w1 = paho(hosts[0], "w-1", "$share/workers/jobs/#", "1");
    let w2 = mosquitto_sub(hosts[1], "w-2", "$share/workers/jobs/#", "1");
    let w3 = paho(hosts[2], "w-3", "$share/workers/jobs/#", "2");
    // Group "audit", same name space, another filter: its one member gets everything.
    let audit = paho(hosts[1], "a-1", "$share/audit/jobs/+", "1");
    // A plain subscription beside them gets everything too.
    let plain = mosquitto_sub(hosts[2], "plain", "jobs/#", "1");
    let mosquitto_subacked = |m: &Lines| m.snapshot().iter().any(|l| l.contains("received SUBACK"));
    wait_for("every SUBACK", Duration::from_secs(30), || {
        subacked(&w1)
            && subacked(&w3)
            && subacked(&audit)
            && mosquitto_subacked(&w2)
            && mosquitto_subacked(&plain)
    });
    // The memberships reach every node through aq.mqtt-sessions.
    sleep(Duration::from_secs(2));

    let publish = |host: &str, client_id: &str, prefix: &str, count: usize| {
        let payload = format!("{prefix}-{{i}}");
        let (code, lines) = mqtt_run(
            host,
            &[
                "publish",
                "--v5",
                "--client-id",
                client_id,
                "--topic",
                "jobs/build",
                "--payload",
                &payload,
                "--qos",
                "1",
                "--count",
                &count.to_string(),
                "--window",
                "5",
            ],
        );
        assert_eq!(code, Some(0), "{lines:?}");
        (0..count)
            .map(|i| format!("{prefix}-{i}"))
            .collect::<Vec<_>>()
    };
    let sent = publish(hosts[0], "pub-1", "job", 60);
    let workers = |members: &[(&Lines, bool)]| -> Vec<String> {
        members
            .iter()
            .flat_map(|(l, paho)| payloads(l, *paho, "jobs/"))
            .collect()
    };
    let all = [(&w1, true), (&w2, false), (&w3, true)];
    wait_for("the workers' 60 jobs", Duration::from_secs(30), || {
        workers(&all).len() >= 60
    });
    wait_for(
        "the audit and plain subscribers",
        Duration::from_secs(30),
        || {
            payloads(&audit, true, "jobs/").len() >= 60
                && payloads(&plain, false, "jobs/").len() >= 60
        },
    );
    sleep(Duration::from_secs(1));
    let mut got = workers(&all);
    got.sort();
    let mut want = sent.clone();
    want.sort();
    assert_eq!(got, want, "each job to exactly one worker");
    for (name, (l, p)) in ["w-1", "w-2", "w-3"].iter().zip(all) {
        assert!(
            !payloads(l, p, "jobs/").is_empty(),
            "{name} on its node got none: the group spans the nodes"
        );
    }
    let mut audited = payloads(&audit, true, "jobs/");
    audited.sort();
    assert_eq!(audited, want, "the audit group's one member gets every job");
    assert_eq!(payloads(&plain, false, "jobs/").len(), 60);

    // w-3 leaves: the jobs published after go to the other two, still once each.
    let rest = [(&w1, true), (&w2, false)];
    drop(w3);
    sleep(Duration::from_secs(2));
    let before = workers(&rest).len();
    let sent = publish(hosts[2], "pub-3", "late", 30);
    wait_for(
        "the remaining workers' 30 jobs",
        Duration::from_secs(30),
        || workers(&rest).len() >= before + 30,
    );
    sleep(Duration::from_secs(1));
    let got = workers(&rest);
    let mut late: Vec<String> = got[..]
        .iter()
        .filter(|p| sent.contains(p))
        .cloned()
        .collect();
    late.sort();
    let mut want = sent;
    want.sort();
    assert_eq!(late, want, "after w-3 left: {got:?}");
    drop(cluster);
}
