//! Bad input on the Kafka port: malformed frames, oversized length prefixes, unknown APIs
//! and versions, and slow-loris connections. Each costs at most its own connection; the node
//! keeps serving everyone else, and memory tracks bytes received, not bytes declared.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::thread::sleep;
use std::time::{Duration, Instant};

use common::{NodeProc, serial};

const HOST: &str = "127.0.43.1";

fn connect() -> TcpStream {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match TcpStream::connect((HOST, 9092)) {
            Ok(s) => {
                s.set_read_timeout(Some(Duration::from_secs(10)))
                    .expect("timeout");
                return s;
            }
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                sleep(Duration::from_millis(100));
            }
            Err(e) => panic!("cannot connect to the Kafka port: {e}"),
        }
    }
}

/// A request frame: length, api key, version, correlation id, client id "t", body.
fn request(api_key: i16, version: i16, correlation_id: i32, body: &[u8]) -> Vec<u8> {
    let mut inner = Vec::new();
    inner.extend_from_slice(&api_key.to_be_bytes());
    inner.extend_from_slice(&version.to_be_bytes());
    inner.extend_from_slice(&correlation_id.to_be_bytes());
    inner.extend_from_slice(&1i16.to_be_bytes());
    inner.push(b't');
    inner.extend_from_slice(body);
    let mut frame = (inner.len() as i32).to_be_bytes().to_vec();
    frame.extend(inner);
    frame
}

/// Reads one response frame.
fn response(s: &mut TcpStream) -> Option<Vec<u8>> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).ok()?;
    let mut body = vec![0u8; i32::from_be_bytes(len) as usize];
    s.read_exact(&mut body).ok()?;
    Some(body)
}

/// Whether the server closed the connection (EOF or reset) within the read timeout.
fn closed(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 64];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) => {
                return !matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                );
            }
        }
    }
}

/// ApiVersions v0 on a fresh connection: answered with error 0 and the Produce key listed.
fn api_versions_work() {
    let mut s = connect();
    s.write_all(&request(18, 0, 42, &[])).expect("write");
    let r = response(&mut s).expect("ApiVersions answered");
    assert_eq!(&r[0..4], &42i32.to_be_bytes());
    assert_eq!(&r[4..6], &0i16.to_be_bytes(), "error code");
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

#[test]
fn bad_input_costs_only_its_own_connection() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut node = NodeProc::new(1, HOST, dir.path(), None);
    node.env = vec![
        ("AQUEDUCT_KAFKA_IDLE_TIMEOUT_MS".into(), "3000".into()),
        ("AQUEDUCT_KAFKA_REQUEST_TIMEOUT_MS".into(), "5000".into()),
        ("AQUEDUCT_KAFKA_MAX_FRAME_BYTES".into(), "104857600".into()),
    ];
    node.start();
    api_versions_work();

    // ApiVersions at a version from the future: UNSUPPORTED_VERSION with the versions served,
    // and the connection stays open for the client's retry at one it can use (KIP-511).
    let mut s = connect();
    s.write_all(&request(18, 99, 5, &[])).expect("write");
    let r = response(&mut s).expect("answered");
    assert_eq!(&r[0..4], &5i32.to_be_bytes());
    assert_eq!(&r[4..6], &35i16.to_be_bytes());
    s.write_all(&request(18, 0, 6, &[])).expect("write");
    let r = response(&mut s).expect("the retry is answered on the same connection");
    assert_eq!(
        (&r[0..4], &r[4..6]),
        (&6i32.to_be_bytes()[..], &0i16.to_be_bytes()[..])
    );

    // An unknown API key and an unsupported version: UNSUPPORTED_VERSION, then closed.
    for (key, version) in [(1000i16, 0i16), (1, 99)] {
        let mut s = connect();
        s.write_all(&request(key, version, 7, &[])).expect("write");
        let r = response(&mut s).expect("answered");
        assert_eq!(&r[0..4], &7i32.to_be_bytes());
        assert_eq!(
            &r[4..6],
            &35i16.to_be_bytes(),
            "UNSUPPORTED_VERSION for {key} v{version}"
        );
        assert!(closed(&mut s));
    }

    // Malformed bodies: a Metadata v1 whose topic array claims 2^31-1 entries, and garbage
    // after a valid header. Each closes its own connection.
    for body in [vec![0x7f, 0xff, 0xff, 0xff], vec![0xde, 0xad]] {
        let mut s = connect();
        s.write_all(&request(3, 1, 9, &body)).expect("write");
        assert!(
            closed(&mut s),
            "malformed Metadata left the connection open"
        );
    }
    // A frame shorter than any request header, and a negative length.
    for prefix in [3i32.to_be_bytes(), (-1i32).to_be_bytes()] {
        let mut s = connect();
        s.write_all(&prefix).expect("write");
        s.write_all(&[0, 0, 0]).expect("write");
        assert!(closed(&mut s));
    }
    api_versions_work();

    // 100 connections declaring 2 GiB frames are refused from the four length bytes; 100 more
    // declaring 90 MiB (under the limit) trickle bytes. Memory grows by what they sent only,
    // and the trickling ones are closed at the request deadline.
    let pid = node.child.as_ref().expect("running").id();
    let before = rss_kib(pid);
    let mut huge: Vec<TcpStream> = (0..100)
        .map(|_| {
            let mut s = connect();
            s.write_all(&i32::MAX.to_be_bytes()).expect("write");
            s
        })
        .collect();
    for s in &mut huge {
        assert!(closed(s), "a 2 GiB frame was not refused");
    }
    let mut slow: Vec<TcpStream> = (0..100)
        .map(|_| {
            let s = connect();
            s.set_read_timeout(Some(Duration::from_millis(50)))
                .expect("timeout");
            s
        })
        .collect();
    for s in &mut slow {
        s.write_all(&(90i32 << 20).to_be_bytes()).expect("write");
    }
    let started = Instant::now();
    let mut peak = before;
    let mut open = slow.len();
    while started.elapsed() < Duration::from_secs(15) && open > 0 {
        open = 0;
        for s in &mut slow {
            if s.write_all(&[0u8; 16]).is_ok() {
                open += 1;
            }
        }
        peak = peak.max(rss_kib(pid));
        api_versions_work();
        sleep(Duration::from_millis(200));
    }
    let grown_mib = (peak.saturating_sub(before)) / 1024;
    assert!(
        grown_mib <= 64,
        "RSS grew by {grown_mib} MiB under 200 hostile connections"
    );
    assert_eq!(
        open, 0,
        "trickling connections outlived the 5 s request deadline"
    );
    assert!(
        started.elapsed() >= Duration::from_secs(4),
        "trickling connections closed before their deadline ({:?})",
        started.elapsed()
    );

    // An idle connection is closed after the idle deadline; the node still serves.
    let mut idle = connect();
    idle.set_read_timeout(Some(Duration::from_secs(8)))
        .expect("timeout");
    let t = Instant::now();
    assert!(closed(&mut idle), "idle connection not closed");
    assert!(
        t.elapsed() >= Duration::from_secs(2),
        "closed too early: {:?}",
        t.elapsed()
    );
    api_versions_work();
    assert!(node.running(), "the node died\n{}", node.log_tail());
}
