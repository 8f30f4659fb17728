//! A Kafka-aware TCP fault proxy for the tests: it sits between clients and one node's
//! Kafka port, forwards whole frames both ways, and injects faults into Produce requests
//! (every n-th across all its connections): a response dropped after the broker wrote the
//! batch (the connection is cut, as a network failure would), or a request held back past
//! the client's request timeout and then delivered anyway (a stale retry on the wire).

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::sleep;
use std::time::Duration;

/// Which Produce requests are faulted (0: never).
#[derive(Debug, Clone, Copy)]
pub struct Faults {
    pub drop_response_every: u64,
    pub delay_request_every: u64,
    pub delay: Duration,
}

/// What a proxy did.
#[derive(Debug, Default)]
pub struct Stats {
    pub produce_requests: AtomicU64,
    pub responses_dropped: AtomicU64,
    pub requests_delayed: AtomicU64,
}

pub struct FaultProxy {
    pub addr: String,
    pub stats: Arc<Stats>,
    stop: Arc<AtomicBool>,
}

const PRODUCE: i16 = 0;

fn read_frame(s: &mut TcpStream) -> Option<Vec<u8>> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).ok()?;
    let n = i32::from_be_bytes(len);
    let mut frame = len.to_vec();
    frame.resize(4 + usize::try_from(n).ok()?, 0);
    s.read_exact(&mut frame[4..]).ok()?;
    Some(frame)
}

impl FaultProxy {
    /// Listens on `listen` and forwards every connection to `upstream`.
    pub fn start(listen: &str, upstream: &str, faults: Faults) -> Self {
        let listener = TcpListener::bind(listen).unwrap_or_else(|e| panic!("bind {listen}: {e}"));
        let stats = Arc::new(Stats::default());
        let stop = Arc::new(AtomicBool::new(false));
        let upstream = upstream.to_string();
        std::thread::spawn({
            let (stats, stop) = (Arc::clone(&stats), Arc::clone(&stop));
            move || {
                for client in listener.incoming() {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let Ok(client) = client else { continue };
                    let Ok(server) = TcpStream::connect(&upstream) else {
                        let _ = client.shutdown(Shutdown::Both);
                        continue;
                    };
                    Self::pump(client, server, faults, Arc::clone(&stats));
                }
            }
        });
        Self {
            addr: listen.to_string(),
            stats,
            stop,
        }
    }

    fn pump(client: TcpStream, server: TcpStream, faults: Faults, stats: Arc<Stats>) {
        let dropped: Arc<Mutex<HashSet<i32>>> = Arc::default();
        let (mut c_in, mut s_out) = (client.try_clone().unwrap(), server.try_clone().unwrap());
        let (mut s_in, mut c_out) = (server, client);
        // Requests: client to server, holding back the chosen ones.
        std::thread::spawn({
            let (dropped, stats) = (Arc::clone(&dropped), Arc::clone(&stats));
            move || {
                while let Some(frame) = read_frame(&mut c_in) {
                    if frame.len() >= 12 && i16::from_be_bytes([frame[4], frame[5]]) == PRODUCE {
                        let n = stats.produce_requests.fetch_add(1, Ordering::Relaxed) + 1;
                        let every = |k: u64| k > 0 && n % k == 0;
                        if every(faults.drop_response_every) {
                            let correlation =
                                i32::from_be_bytes([frame[8], frame[9], frame[10], frame[11]]);
                            dropped.lock().unwrap().insert(correlation);
                        } else if every(faults.delay_request_every) {
                            stats.requests_delayed.fetch_add(1, Ordering::Relaxed);
                            sleep(faults.delay);
                        }
                    }
                    if s_out.write_all(&frame).is_err() {
                        break;
                    }
                }
                let _ = s_out.shutdown(Shutdown::Write);
            }
        });
        // Responses: server to client, cutting the connection instead of a dropped one.
        std::thread::spawn(move || {
            while let Some(frame) = read_frame(&mut s_in) {
                let correlation = i32::from_be_bytes([frame[4], frame[5], frame[6], frame[7]]);
                if dropped.lock().unwrap().remove(&correlation) {
                    stats.responses_dropped.fetch_add(1, Ordering::Relaxed);
                    let _ = c_out.shutdown(Shutdown::Both);
                    let _ = s_in.shutdown(Shutdown::Both);
                    return;
                }
                if c_out.write_all(&frame).is_err() {
                    break;
                }
            }
            let _ = c_out.shutdown(Shutdown::Both);
        });
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(&self.addr);
    }
}
