//! Kafka clients for the tests: the Python with confluent-kafka that `make test` prepares
//! (`AQUEDUCT_TEST_PYTHON`, else `python3`) running `tests/kafka/clients.py`.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::sleep;
use std::time::{Duration, Instant};

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

/// A running `clients.py` subcommand whose stdout lines a thread collects.
pub struct Lines {
    pub child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Lines {
    pub fn spawn(args: &[&str]) -> Self {
        let mut child = python(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python3");
        let stdout = child.stdout.take().expect("stdout");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&lines);
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                sink.lock().expect("lines").push(line);
            }
        });
        Self {
            child,
            lines,
            reader: Some(reader),
        }
    }

    pub fn snapshot(&self) -> Vec<String> {
        self.lines.lock().expect("lines").clone()
    }

    /// The records printed (`partition offset value` lines, not `#` notes).
    pub fn records(&self) -> Vec<(u32, u64, String)> {
        self.snapshot()
            .iter()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let mut it = l.splitn(3, ' ');
                Some((
                    it.next()?.parse().ok()?,
                    it.next()?.parse().ok()?,
                    it.next()?.to_string(),
                ))
            })
            .collect()
    }

    pub fn wait(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                if let Some(r) = self.reader.take() {
                    r.join().expect("reader");
                }
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "child did not exit in {within:?}"
            );
            sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Lines {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
