//! Helpers shared by the multi-process tests: node processes on their own 127.0.x.y
//! addresses with the default ports, a cluster of them, and the real CLI against it.

#![allow(dead_code, clippy::unwrap_used)]

pub mod kafka;
pub mod mqtt;
pub mod proxy;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::thread::sleep;
use std::time::{Duration, Instant};

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_aqueduct");

/// Cluster tests run one at a time: they start several nodes each, on a 2-core machine.
pub static SERIAL: Mutex<()> = Mutex::new(());

pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// `aqueduct` with no `AQUEDUCT_*` variables inherited from the caller's environment.
pub fn aqueduct() -> Command {
    let mut command = Command::new(BIN);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("AQUEDUCT_") {
            command.env_remove(key);
        }
    }
    command
}

/// One node: its loopback host, data directory and (while running) process.
pub struct NodeProc {
    pub id: u64,
    pub host: String,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    pub join: Option<String>,
    pub env: Vec<(String, String)>,
    pub child: Option<Child>,
}

impl NodeProc {
    pub fn new(id: u64, host: &str, root: &Path, join: Option<String>) -> Self {
        Self {
            id,
            host: host.to_string(),
            data_dir: root.join(format!("node{id}")),
            log: root.join(format!("node{id}.log")),
            join,
            env: Vec::new(),
            child: None,
        }
    }

    pub fn grpc(&self) -> String {
        format!("{}:7070", self.host)
    }

    /// Starts (or restarts) the process with the same command line as the first time.
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "node {} already running", self.id);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut command = aqueduct();
        command
            .arg("serve")
            .arg("--node-id")
            .arg(self.id.to_string())
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--listen-host")
            .arg(&self.host)
            .env("AQUEDUCT_LOG", "info,openraft=warn")
            .stdout(Stdio::null())
            .stderr(log);
        if let Some(join) = &self.join {
            command.arg("--join").arg(join);
        }
        command.envs(self.env.iter().map(|(k, v)| (k, v)));
        self.child = Some(command.spawn().unwrap());
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits up to `within` for the process to exit on its own.
    pub fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Some(status) = self.child.as_mut()?.try_wait().unwrap() {
                self.child = None;
                return Some(status);
            }
            sleep(Duration::from_millis(100));
        }
        None
    }

    pub fn running(&mut self) -> bool {
        match &mut self.child {
            Some(c) => c.try_wait().unwrap().is_none(),
            None => false,
        }
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A cluster of node processes under one temporary directory.
pub struct Cluster {
    pub nodes: Vec<NodeProc>,
    pub dir: tempfile::TempDir,
}

impl Cluster {
    /// Node 1 on `hosts[0]` initializes; the others join it, in order.
    pub fn start(hosts: &[&str]) -> Self {
        Self::start_with(hosts, &[])
    }

    /// [`Cluster::start`] with extra environment variables for every node.
    pub fn start_with(hosts: &[&str], env: &[(&str, &str)]) -> Self {
        Self::start_each(hosts, |_| {
            env.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        })
    }

    /// [`Cluster::start`] with environment variables per node (`env(0)` for the first).
    pub fn start_each(hosts: &[&str], env: impl Fn(usize) -> Vec<(String, String)>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let first = format!("{}:7070", hosts[0]);
        let mut nodes = Vec::new();
        for (i, host) in hosts.iter().enumerate() {
            let join = (i > 0).then(|| first.clone());
            let mut node = NodeProc::new(i as u64 + 1, host, dir.path(), join);
            node.env = env(i);
            node.start();
            nodes.push(node);
        }
        let cluster = Self { nodes, dir };
        cluster.wait_members(hosts.len(), Duration::from_secs(60));
        cluster
    }

    pub fn servers(&self) -> String {
        self.nodes
            .iter()
            .map(NodeProc::grpc)
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn node(&mut self, id: u64) -> &mut NodeProc {
        self.nodes.iter_mut().find(|n| n.id == id).unwrap()
    }

    /// `aqueduct ARGS --server <all nodes>`.
    pub fn cli(&self, args: &[&str]) -> Output {
        let mut command = aqueduct();
        command.args(args).arg("--server").arg(self.servers());
        run_with_timeout(command, CLI_TIMEOUT)
    }

    /// `aqueduct produce ARGS --server <all nodes>` with stdin, stdout and stderr piped.
    pub fn producer(&self, args: &[&str]) -> Child {
        aqueduct()
            .arg("produce")
            .args(args)
            .arg("--server")
            .arg(self.servers())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    /// [`Cluster::producer`] fed `input` whole, run to completion.
    pub fn produce(&self, args: &[&str], input: &[u8]) -> Output {
        let mut child = self.producer(args);
        {
            use std::io::Write;
            let mut stdin = child.stdin.take().unwrap();
            stdin.write_all(input).unwrap();
        }
        child.wait_with_output().unwrap()
    }

    /// `topic create NAME --partitions P --replication-factor R`, which must succeed.
    pub fn create_topic(&self, name: &str, partitions: u32, replication_factor: u16) {
        let out = self.cli(&[
            "topic",
            "create",
            name,
            "--partitions",
            &partitions.to_string(),
            "--replication-factor",
            &replication_factor.to_string(),
        ]);
        assert!(
            out.status.success(),
            "topic create {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `group describe GROUP --output json`, which must succeed.
    pub fn describe_group(&self, group: &str) -> Value {
        let out = self.cli(&["group", "describe", group, "--output", "json"]);
        assert!(
            out.status.success(),
            "group describe failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// `cluster status --output json`, if it succeeds.
    pub fn status(&self) -> Option<Value> {
        let out = self.cli(&["cluster", "status", "--output", "json", "--timeout", "5"]);
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    /// Waits until the leader reports `n` members, all alive, all voters (n ≤ 3).
    pub fn wait_members(&self, n: usize, within: Duration) -> Value {
        let deadline = Instant::now() + within;
        let mut last = None;
        while Instant::now() < deadline {
            if let Some(s) = self.status() {
                let nodes = s["nodes"].as_array().cloned().unwrap_or_default();
                if nodes.len() == n
                    && nodes
                        .iter()
                        .all(|x| x["alive"] == true && x["role"] == "voter")
                {
                    return s;
                }
                last = Some(s);
            }
            sleep(Duration::from_millis(250));
        }
        panic!(
            "cluster did not reach {n} live voters within {within:?}; last status {last:?}\n{}",
            self.logs()
        );
    }

    /// Waits until every member reports the same applied index and state checksum, and
    /// returns that status.
    pub fn wait_converged(&self, within: Duration) -> Value {
        let deadline = Instant::now() + within;
        let mut last = None;
        while Instant::now() < deadline {
            if let Some(s) = self.status() {
                let nodes = s["nodes"].as_array().cloned().unwrap_or_default();
                let applied: BTreeSet<String> = nodes
                    .iter()
                    .map(|n| format!("{}/{}", n["applied_index"], n["state_checksum"]))
                    .collect();
                if nodes.len() == self.nodes.len()
                    && applied.len() == 1
                    && nodes.iter().all(|n| n["state_checksum"].is_string())
                {
                    return s;
                }
                last = Some(s);
            }
            sleep(Duration::from_millis(250));
        }
        panic!(
            "nodes did not converge within {within:?}; last status {last:?}\n{}",
            self.logs()
        );
    }

    pub fn leader(&self) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Some(s) = self.status()
                && let Some(id) = s["leader_id"].as_u64()
            {
                return id;
            }
            sleep(Duration::from_millis(200));
        }
        panic!("no metadata leader within 30 s\n{}", self.logs());
    }

    /// The partition's leader as `topic describe` reports it (a node id).
    pub fn partition_leader(&self, topic: &str, partition: usize) -> Option<u64> {
        let out = self.cli(&["topic", "describe", topic, "--output", "json"]);
        if !out.status.success() {
            return None;
        }
        let doc: Value = serde_json::from_slice(&out.stdout).ok()?;
        let addr = doc["partitions"][partition]["leader"].as_str()?.to_string();
        self.nodes.iter().find(|n| n.grpc() == addr).map(|n| n.id)
    }

    pub fn topics(&self) -> BTreeSet<String> {
        let out = self.cli(&["topic", "list", "--output", "json"]);
        assert!(
            out.status.success(),
            "topic list failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
        doc["topics"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["name"].as_str().unwrap().to_string())
            .collect()
    }

    pub fn logs(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("--- node {} log tail ---\n{}", n.id, n.log_tail()))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// Longest a CLI call may take before the test fails (instead of hanging, e.g. a `consume
/// --max N` waiting for a record that was lost).
pub const CLI_TIMEOUT: Duration = Duration::from_secs(120);

/// Runs `command` to completion, killing it and failing the test after `within`.
pub fn run_with_timeout(mut command: Command, within: Duration) -> Output {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Drain both pipes while waiting, so a chatty child cannot block on a full pipe.
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut b = Vec::new();
        std::io::Read::read_to_end(&mut stdout, &mut b).unwrap();
        b
    });
    let err = std::thread::spawn(move || {
        let mut b = Vec::new();
        std::io::Read::read_to_end(&mut stderr, &mut b).unwrap();
        b
    });
    let deadline = Instant::now() + within;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            let (out, err) = (out.join().unwrap(), err.join().unwrap());
            panic!(
                "{command:?} did not finish within {within:?}; it printed:\n{}\n{}",
                String::from_utf8_lossy(&out),
                String::from_utf8_lossy(&err)
            );
        }
        sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

pub fn stderr_line(out: &Output) -> String {
    let text = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(text.lines().count(), 1, "one stderr line expected: {text}");
    text
}

/// The committed offset of each partition in a `group describe --output json` answer.
pub fn committed(d: &Value) -> std::collections::BTreeMap<u64, u64> {
    d["offsets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| {
            (
                o["partition"].as_u64().unwrap(),
                o["committed"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// Sends signal `sig` to a child process (with kill(1): the tests deny `unsafe`).
#[allow(dead_code)]
pub fn signal(child: &Child, sig: i32) {
    let status = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(status.success(), "kill -{sig} failed");
}

/// `aqueduct produce ARGS --output json` fed `rec-0`, `rec-1`, … (20 lines every 20 ms) by a
/// writer thread until [`LineProducer::finish`]; a reader thread collects each
/// acknowledgement (`{"line","partition","offset"}`) by line number.
pub struct LineProducer {
    child: Child,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    writer: std::thread::JoinHandle<u64>,
    reader: std::thread::JoinHandle<std::collections::BTreeMap<u64, Value>>,
}

/// What a [`LineProducer`] wrote and had acknowledged, and how its process ended.
pub struct Produced {
    pub written: u64,
    pub acks: std::collections::BTreeMap<u64, Value>,
    pub status: std::process::ExitStatus,
    pub stderr: String,
}

impl LineProducer {
    pub fn start(cluster: &Cluster, args: &[&str]) -> Self {
        use std::io::{BufRead, Write};
        use std::sync::atomic::Ordering;
        let mut all = args.to_vec();
        all.extend(["--output", "json"]);
        let mut child = cluster.producer(&all);
        let mut stdin = child.stdin.take().unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writer = {
            let stop = std::sync::Arc::clone(&stop);
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    for _ in 0..20 {
                        writeln!(stdin, "rec-{n}").unwrap();
                        n += 1;
                    }
                    stdin.flush().unwrap();
                    sleep(Duration::from_millis(20));
                }
                n
            })
        };
        let stdout = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            let mut acks = std::collections::BTreeMap::new();
            for line in std::io::BufReader::new(stdout).lines() {
                let v: Value = serde_json::from_str(&line.unwrap()).unwrap();
                acks.insert(v["line"].as_u64().unwrap(), v);
            }
            acks
        });
        Self {
            child,
            stop,
            writer,
            reader,
        }
    }

    /// Stops writing, closes the producer's input and waits for it to finish.
    pub fn finish(mut self) -> Produced {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let written = self.writer.join().unwrap();
        let status = self.child.wait().unwrap();
        let acks = self.reader.join().unwrap();
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut self.child.stderr.take().unwrap(), &mut stderr).unwrap();
        Produced {
            written,
            acks,
            status,
            stderr,
        }
    }
}

/// Where a [`LineProducer`]'s acknowledgements put each line: line → (partition, offset).
#[allow(dead_code)]
pub fn ack_places(
    acks: &std::collections::BTreeMap<u64, Value>,
) -> std::collections::BTreeMap<u64, (u64, u64)> {
    acks.iter()
        .map(|(line, v)| {
            let p = v["partition"].as_u64().expect("partition");
            (*line, (p, v["offset"].as_u64().expect("offset")))
        })
        .collect()
}

/// Every record of `topic` from the earliest offsets (at most `max`): the values by
/// (partition, offset), and how many times each value is stored.
#[allow(dead_code)]
pub fn stored_records(
    cluster: &Cluster,
    topic: &str,
    max: u64,
) -> (
    std::collections::BTreeMap<(u64, u64), String>,
    std::collections::BTreeMap<String, u32>,
) {
    let max = max.to_string();
    let out = cluster.cli(&[
        "consume",
        topic,
        "--from",
        "earliest",
        "--max",
        &max,
        "--output",
        "json",
        "--timeout",
        "120",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut at = std::collections::BTreeMap::new();
    let mut count: std::collections::BTreeMap<String, u32> = std::collections::BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let v: Value = serde_json::from_str(line).expect("json");
        let value = v["value"].as_str().expect("value").to_string();
        *count.entry(value.clone()).or_default() += 1;
        let place = (
            v["partition"].as_u64().expect("partition"),
            v["offset"].as_u64().expect("offset"),
        );
        at.insert(place, value);
    }
    (at, count)
}

/// Polls `cond` until it holds; fails the test naming `what` after `within`.
#[allow(dead_code)]
pub fn wait_for(what: &str, within: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        sleep(Duration::from_millis(50));
    }
}
