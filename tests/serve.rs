//! `aqueduct serve` as a user runs it: the real binary, a temporary data directory and its own
//! admin address. These tests exist to pin the operator-facing contract: the admin endpoints
//! answer, SIGTERM and SIGINT stop the node with status 0, a data directory serves one node at a
//! time, and configuration mistakes fail with one clear line.
//!
//! Every test picks its own 127.0.0.x address and a port the kernel just handed out, and its own
//! temporary directory, so the tests run in parallel.

#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU8, Ordering};
use std::thread::sleep;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_aqueduct");
const START_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// A free admin address on a loopback IP of its own (127.0.0.2 and up): the kernel picks the
/// port, and we release it just before the node binds it.
fn free_admin_addr() -> SocketAddr {
    static NEXT: AtomicU8 = AtomicU8::new(0);
    let host = 2 + NEXT.fetch_add(1, Ordering::Relaxed) % 250;
    let listener = TcpListener::bind(format!("127.0.0.{host}:0"))
        .or_else(|_| TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    listener.local_addr().unwrap()
}

/// `aqueduct` with no `AQUEDUCT_*` variables inherited from the caller's environment.
fn aqueduct() -> Command {
    let mut command = Command::new(BIN);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("AQUEDUCT_") {
            command.env_remove(key);
        }
    }
    command.env("AQUEDUCT_LOG", "info");
    command
}

/// A node process; killed on drop if a test fails before stopping it.
struct Served {
    child: Child,
    admin: SocketAddr,
}

impl Served {
    /// Starts `aqueduct serve` on `data_dir` with `extra` arguments and waits for `/health`.
    fn start(data_dir: &Path, extra: &[&str]) -> Self {
        Self::start_with(aqueduct(), data_dir, extra)
    }

    fn start_with(mut command: Command, data_dir: &Path, extra: &[&str]) -> Self {
        let admin = free_admin_addr();
        let child = command
            .arg("serve")
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--admin-addr")
            .arg(admin.to_string())
            .arg("--grpc-addr")
            .arg(format!("{}:0", admin.ip()))
            .arg("--kafka-addr")
            .arg(format!("{}:0", admin.ip()))
            .arg("--mqtt-addr")
            .arg(format!("{}:0", admin.ip()))
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut served = Self { child, admin };
        served.wait_healthy();
        served
    }

    fn wait_healthy(&mut self) {
        let deadline = Instant::now() + START_TIMEOUT;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("node exited during start with {status}: {}", self.stderr());
            }
            if http_get(self.admin, "/health").is_ok() {
                return;
            }
            sleep(Duration::from_millis(50));
        }
        panic!("node did not answer /health within {START_TIMEOUT:?}");
    }

    fn signal(&self, signal: libc::c_int) {
        let pid = libc::pid_t::try_from(self.child.id()).unwrap();
        #[allow(unsafe_code)]
        // SAFETY: kill(2) takes plain integers; `pid` is our own child, not yet reaped.
        let rc = unsafe { libc::kill(pid, signal) };
        assert_eq!(rc, 0, "kill failed: {}", std::io::Error::last_os_error());
    }

    /// Waits for the process to exit (at most `STOP_TIMEOUT`).
    fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "node did not exit within {STOP_TIMEOUT:?}"
            );
            sleep(Duration::from_millis(20));
        }
    }

    /// Everything the process wrote to stderr; call only once it has exited.
    fn stderr(&mut self) -> String {
        let mut text = String::new();
        if let Some(mut stderr) = self.child.stderr.take() {
            stderr.read_to_string(&mut text).unwrap();
        }
        text
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A response: status code and body.
#[derive(Debug)]
struct Reply {
    status: u16,
    head: String,
    body: String,
}

/// A minimal HTTP/1.1 request over a fresh connection (`Connection: close`).
fn http_request(addr: SocketAddr, method: &str, path: &str) -> std::io::Result<Reply> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = String::new();
    stream.read_to_string(&mut raw)?;
    let (head, body) = raw.split_once("\r\n\r\n").ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("no header end: {raw}"),
        )
    })?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, head.to_owned()))?;
    Ok(Reply {
        status,
        head: head.to_owned(),
        body: body.to_owned(),
    })
}

fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<Reply> {
    http_request(addr, "GET", path)
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|err| panic!("not JSON ({err}): {text}"))
}

/// Runs `aqueduct` to completion with `args`.
fn run(mut command: Command, args: &[&str]) -> Output {
    command.args(args).output().unwrap()
}

/// The admin endpoints answer as documented, and SIGTERM stops the node cleanly.
#[test]
fn health_and_metrics_answer_then_sigterm_stops_with_status_0() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = Served::start(dir.path(), &["--node-id", "7"]);

    let health = http_get(node.admin, "/health").unwrap();
    assert_eq!(health.status, 200, "{health:?}");
    assert!(
        health
            .head
            .to_ascii_lowercase()
            .contains("content-type: application/json")
    );
    assert_eq!(
        json(&health.body),
        serde_json::json!({"status": "ok", "node_id": 7, "version": env!("CARGO_PKG_VERSION")})
    );

    let metrics = http_get(node.admin, "/metrics").unwrap();
    assert_eq!(metrics.status, 200, "{metrics:?}");
    for name in [
        "aqueduct_storage_fsyncs_total ",
        "aqueduct_storage_appended_bytes_total ",
        "aqueduct_storage_open_segments ",
        "aqueduct_build_info{",
        "aqueduct_process_uptime_seconds ",
    ] {
        assert!(
            metrics.body.contains(name),
            "{name} missing from:\n{}",
            metrics.body
        );
    }

    let missing = http_get(node.admin, "/nope").unwrap();
    assert_eq!(missing.status, 404);
    let problem = json(&missing.body);
    assert_eq!(problem["type"], "about:blank");
    assert_eq!(problem["title"], "Not Found");
    assert_eq!(problem["status"], 404);

    let wrong_method = http_request(node.admin, "DELETE", "/health").unwrap();
    assert_eq!(wrong_method.status, 405);

    node.signal(libc::SIGTERM);
    let status = node.wait_exit();
    let stderr = node.stderr();
    assert_eq!(status.code(), Some(0), "stderr:\n{stderr}");
    assert!(stderr.contains("stopped"), "stderr:\n{stderr}");
    // The node is gone, so is its listener.
    assert!(http_get(node.admin, "/health").is_err());
}

/// Ctrl-C in a terminal is a clean stop too.
#[test]
fn sigint_stops_with_status_0() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = Served::start(dir.path(), &[]);
    node.signal(libc::SIGINT);
    let status = node.wait_exit();
    let stderr = node.stderr();
    assert_eq!(status.code(), Some(0), "stderr:\n{stderr}");
    assert!(stderr.contains("stopped"), "stderr:\n{stderr}");
}

/// A stopped node's data directory opens again (the lock is released, the node id is kept).
#[test]
fn restart_on_same_data_dir_works() {
    let dir = tempfile::tempdir().unwrap();
    let mut first = Served::start(dir.path(), &["--node-id", "3"]);
    first.signal(libc::SIGTERM);
    assert_eq!(first.wait_exit().code(), Some(0));
    let second = Served::start(dir.path(), &["--node-id", "3"]);
    let health = http_get(second.admin, "/health").unwrap();
    assert_eq!(json(&health.body)["node_id"], 3);
}

#[test]
fn version_flag_prints_the_version() {
    let output = run(aqueduct(), &["--version"]);
    assert!(output.status.success());
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert_eq!(
        stdout.trim(),
        format!("aqueduct {}", env!("CARGO_PKG_VERSION"))
    );
}

/// Two processes on one data directory would corrupt it; the second must refuse with one
/// clear line and a non-zero status, and leave the first running.
#[cfg(feature = "rocksdb")]
#[test]
fn second_instance_on_same_data_dir_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let first = Served::start(dir.path(), &[]);

    let second_admin = free_admin_addr().to_string();
    let data_dir = dir.path().to_str().unwrap();
    let output = run(
        aqueduct(),
        &[
            "serve",
            "--data-dir",
            data_dir,
            "--admin-addr",
            &second_admin,
        ],
    );
    assert!(!output.status.success());
    let stderr = String::from_utf8(output.stderr).unwrap();
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line expected:\n{stderr}");
    assert!(
        lines[0].starts_with("aqueduct: error: data directory")
            && lines[0].contains("in use by another aqueduct process")
            && lines[0].contains(data_dir),
        "{stderr}"
    );

    assert_eq!(http_get(first.admin, "/health").unwrap().status, 200);
}

/// A data directory belongs to the node id it was first used with.
#[cfg(feature = "rocksdb")]
#[test]
fn other_node_id_on_used_data_dir_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut first = Served::start(dir.path(), &["--node-id", "1"]);
    first.signal(libc::SIGTERM);
    assert_eq!(first.wait_exit().code(), Some(0));

    let admin = free_admin_addr().to_string();
    let data_dir = dir.path().to_str().unwrap();
    let output = run(
        aqueduct(),
        &[
            "serve",
            "--data-dir",
            data_dir,
            "--admin-addr",
            &admin,
            "--node-id",
            "2",
        ],
    );
    assert!(!output.status.success());
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(
        stderr.contains("belongs to node 1, but this node is configured as node 2"),
        "{stderr}"
    );
}

/// A misspelt key must not be ignored: the error names the file, the key and the line.
#[test]
fn unknown_toml_key_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("aqueduct.toml");
    std::fs::write(&config, "node_id = 2\nadmin_prot = 7000\n").unwrap();
    let output = run(aqueduct(), &["serve", "--config", config.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8(output.stderr).unwrap();
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line expected:\n{stderr}");
    assert!(
        lines[0].starts_with("aqueduct: error: config file"),
        "{stderr}"
    );
    assert!(lines[0].contains("unknown field `admin_prot`"), "{stderr}");
    assert!(lines[0].contains("line 2"), "{stderr}");
}

/// Precedence: a flag beats its environment variable, which beats the config file.
#[test]
fn flag_beats_env_beats_file() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("aqueduct.toml");
    std::fs::write(&config, "node_id = 3\n").unwrap();

    let with_env = |node_id: &str| {
        let mut command = aqueduct();
        command
            .env("AQUEDUCT_CONFIG", &config)
            .env("AQUEDUCT_NODE_ID", node_id);
        command
    };

    let file_only = Served::start_with(
        {
            let mut command = aqueduct();
            command.env("AQUEDUCT_CONFIG", &config);
            command
        },
        &dir.path().join("file"),
        &[],
    );
    assert_eq!(
        json(&http_get(file_only.admin, "/health").unwrap().body)["node_id"],
        3
    );

    let env = Served::start_with(with_env("5"), &dir.path().join("env"), &[]);
    assert_eq!(
        json(&http_get(env.admin, "/health").unwrap().body)["node_id"],
        5
    );

    let flag = Served::start_with(with_env("5"), &dir.path().join("flag"), &["--node-id", "9"]);
    assert_eq!(
        json(&http_get(flag.admin, "/health").unwrap().body)["node_id"],
        9
    );
}
