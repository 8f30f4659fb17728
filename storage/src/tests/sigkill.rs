//! SIGKILL of a real writer process. The page cache survives SIGKILL, so this cannot show a
//! missing fsync (the crash-point test does that); it shows that a process killed mid-write
//! leaves a log that recovers with every acknowledged entry, repeatedly.
//!
//! The test re-runs its own test binary as the writer (`AQ_SIGKILL_WRITER_DIR` set): the
//! writer appends with `FlushPolicy::Always` from 4 threads and prints each acknowledged
//! index; the parent kills it at a random moment, checks, and starts the next round on the
//! same directory.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;

use super::assert_contiguous;
use crate::batch;
use crate::entry::Entry;
use crate::fs::StdFs;
use crate::log::{LogOptions, PartitionLog};
use crate::metrics::StorageMetrics;

const ENV_DIR: &str = "AQ_SIGKILL_WRITER_DIR";

fn opts() -> LogOptions {
    LogOptions {
        segment_bytes: 256 << 10,
        index_interval_bytes: 4096,
        ..LogOptions::default()
    }
}

fn open(dir: &Path) -> PartitionLog {
    PartitionLog::open(
        Arc::new(StdFs),
        dir,
        opts(),
        Arc::new(StorageMetrics::default()),
    )
    .expect("open log")
}

/// Payload of index `i`: its content is a function of the index, so the parent can check it.
fn body(i: u64) -> Vec<u8> {
    let len = 200 + (i * 7919 % 3000) as usize;
    (0..len).map(|k| (i as usize + k) as u8).collect()
}

/// The writer side: runs only when re-executed by the test below.
#[test]
fn sigkill_writer_process() {
    let Ok(dir) = std::env::var(ENV_DIR) else {
        return;
    };
    let log = Arc::new(open(Path::new(&dir)));
    let order = Arc::new(Mutex::new(()));
    let out = Arc::new(Mutex::new(std::io::stdout()));
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let (log, order, out) = (Arc::clone(&log), Arc::clone(&order), Arc::clone(&out));
            std::thread::spawn(move || {
                loop {
                    let (tx, rx) = std::sync::mpsc::sync_channel(1);
                    let index = {
                        let _g = order.lock().expect("order");
                        let i = log.next_index();
                        let e = Entry::data(i, 1, 1, batch::build(1, i as i64, &body(i)));
                        log.append(
                            &[e],
                            Some(Box::new(move |r| {
                                let _ = tx.send(r);
                            })),
                        )
                        .expect("append");
                        i
                    };
                    rx.recv().expect("callback").expect("durable");
                    let mut o = out.lock().expect("stdout");
                    let _ = writeln!(o, "acked {index}");
                    let _ = o.flush();
                }
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
}

#[test]
fn sigkill_of_a_writer_loses_no_acknowledged_entry() {
    if std::env::var(ENV_DIR).is_ok() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let exe = std::env::current_exe().expect("test binary");
    let rounds: usize = std::env::var("AQ_SIGKILL_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let mut rng = rand::rng();
    let mut max_acked_total = 0u64;
    for round in 0..rounds {
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "tests::sigkill::sigkill_writer_process",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(ENV_DIR, tmp.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn writer");
        let stdout = child.stdout.take().expect("stdout");
        let acked = Arc::new(Mutex::new(Vec::new()));
        let reader = {
            let acked = Arc::clone(&acked);
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    if let Some(i) = line
                        .strip_prefix("acked ")
                        .and_then(|s| s.parse::<u64>().ok())
                    {
                        acked.lock().expect("acked").push(i);
                    }
                }
            })
        };
        // Let it write for a while (until some acks arrived), then kill it mid-flight.
        let deadline = Instant::now() + Duration::from_secs(20);
        let want = rng.random_range(50..400);
        while acked.lock().expect("acked").len() < want && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(rng.random_range(0..30)));
        child.kill().expect("SIGKILL");
        let _ = child.wait();
        let _ = reader.join();
        let acked = acked.lock().expect("acked").clone();
        assert!(
            !acked.is_empty(),
            "round {round}: writer acknowledged nothing"
        );

        let log = open(tmp.path());
        let next = log.next_index();
        let max = *acked.iter().max().unwrap_or(&0);
        assert!(
            next > max,
            "round {round}: acknowledged index {max} lost (log ends before {next})"
        );
        let all = log.read(0, next, usize::MAX).expect("read back");
        assert_eq!(all.len() as u64, next);
        assert_contiguous(&all);
        for e in &all {
            assert_eq!(
                &e.entry.payload[batch::BATCH_HEADER_LEN..],
                &body(e.entry.index)[..],
                "index {} damaged",
                e.entry.index
            );
        }
        max_acked_total = max_acked_total.max(max);
    }
    assert!(max_acked_total > 0);
}
