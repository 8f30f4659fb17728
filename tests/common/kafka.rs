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
        Self::spawn_command(python(args))
    }

    /// Any command whose stdout lines are to be collected.
    pub fn spawn_command(mut command: Command) -> Self {
        let mut child = command
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

/// A raw Kafka connection for the checks a client library hides (error codes of the group
/// protocol): one request at a time, encoded and decoded with `kafka-protocol`.
pub struct Wire {
    stream: std::net::TcpStream,
    correlation: i32,
}

impl Wire {
    /// Connects, retrying for up to 30 s while the port comes up.
    pub fn connect(addr: &str) -> Self {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match std::net::TcpStream::connect(addr) {
                Ok(stream) => {
                    stream
                        .set_read_timeout(Some(Duration::from_secs(60)))
                        .expect("read timeout");
                    return Self {
                        stream,
                        correlation: 0,
                    };
                }
                Err(e) if Instant::now() >= deadline => panic!("cannot connect to {addr}: {e}"),
                Err(_) => sleep(Duration::from_millis(100)),
            }
        }
    }

    /// Sends `req` as `key` version `version` and reads its response.
    pub fn call<Q, R>(&mut self, key: kafka_protocol::messages::ApiKey, version: i16, req: &Q) -> R
    where
        Q: kafka_protocol::protocol::Encodable + kafka_protocol::protocol::HeaderVersion,
        R: kafka_protocol::protocol::Decodable + kafka_protocol::protocol::HeaderVersion,
    {
        use kafka_protocol::messages::{RequestHeader, ResponseHeader};
        use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};
        use std::io::{Read, Write};
        self.correlation += 1;
        let header = RequestHeader::default()
            .with_request_api_key(key as i16)
            .with_request_api_version(version)
            .with_correlation_id(self.correlation)
            .with_client_id(Some(StrBytes::from_static_str("wire-test")));
        let mut body = bytes::BytesMut::new();
        header
            .encode(&mut body, Q::header_version(version))
            .expect("encode header");
        req.encode(&mut body, version).expect("encode request");
        let mut frame = (body.len() as i32).to_be_bytes().to_vec();
        frame.extend_from_slice(&body);
        self.stream.write_all(&frame).expect("send request");
        let mut len = [0u8; 4];
        self.stream.read_exact(&mut len).expect("response length");
        let mut buf = vec![0u8; i32::from_be_bytes(len) as usize];
        self.stream.read_exact(&mut buf).expect("response");
        let mut buf = bytes::Bytes::from(buf);
        let h = ResponseHeader::decode(&mut buf, R::header_version(version)).expect("header");
        assert_eq!(h.correlation_id, self.correlation, "correlation id");
        R::decode(&mut buf, version).expect("decode response")
    }
}
