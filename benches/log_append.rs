//! Storage benchmark: append to and read from one `PartitionLog`, against the raw disk.
//!
//! Every scenario runs in this one process, in one directory on one disk, so the ratios compare
//! like with like (DESIGN.md §8). A log entry is one Kafka RecordBatch v2 of 64 records of
//! 1 KiB (64 KiB of record bytes); a raw block is 64 KiB.
//!
//! * `raw_write_fdatasync`: one writer, `write` + `fdatasync` per 64 KiB block (the disk's
//!   durable-append limit for one outstanding write).
//! * `raw_write_stream`: `write` of the same bytes, one `fdatasync` at the end (the disk's
//!   streaming limit; latency is per `write`, the final sync is counted in the throughput).
//! * `log_{always,interval}_x{1,8}`: 1 or 8 appenders on one log, each with one batch in
//!   flight. An appender takes a shared lock, reads `next_index`, calls `append` and releases
//!   the lock (index assignment must be serialized), then waits for its callback. Latency is
//!   from the `append` call to the callback: after the group `fdatasync` (`Always`) or right
//!   after the write (`Interval(100ms)`). Closed loop, so no coordinated-omission correction.
//! * `log_read` / `log_read_offsets`: the `always x8` log read back from the page cache with
//!   `read` / `read_offsets` in 1 MiB chunks; latency is per call.
//!
//! Knobs: `AQ_BENCH_MB` (MiB per scenario, default 256), `AQ_BENCH_QUICK=1` or `--quick`
//! (8 MiB, for smoke runs), `AQ_BENCH_JSON=1` or `--json` (JSON on stdout instead of the
//! table), `AQ_BENCH_DIR` (parent of the scratch directory; default the working directory,
//! refused if it is a tmpfs). Run: `cargo bench -p aqueduct-benches --bench log_append`.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex, mpsc};
use std::time::{Duration, Instant};

use aqueduct_benches::{
    Latency, Row, json_num, json_str, latency_histogram, mount_of, print_table, to_json,
};
use aqueduct_storage::fs::StdFs;
use aqueduct_storage::metrics::StorageMetrics;
use aqueduct_storage::{Entry, FlushPolicy, LogError, LogOptions, PartitionLog, batch};
use bytes::Bytes;
use hdrhistogram::Histogram;

const RECORD_BYTES: usize = 1024;
const RECORDS_PER_BATCH: usize = 64;
const BATCH_BODY: usize = RECORD_BYTES * RECORDS_PER_BATCH;
const READ_CHUNK: usize = 1 << 20;
const INTERVAL: Duration = Duration::from_millis(100);
/// Goals from the storage design: `always x8` against the two raw baselines, and reads.
const GOAL_VS_FDATASYNC: f64 = 1.0;
const GOAL_VS_STREAM: f64 = 0.6;
const GOAL_READ_GB_S: f64 = 1.0;

#[derive(Debug)]
struct Config {
    mib: u64,
    json: bool,
    parent: PathBuf,
}

impl Config {
    fn from_env_and_args() -> Self {
        let args: Vec<String> = std::env::args().skip(1).collect();
        let flag = |name: &str, env: &str| {
            args.iter().any(|a| a == name)
                || std::env::var(env).is_ok_and(|v| !v.is_empty() && v != "0")
        };
        let quick = flag("--quick", "AQ_BENCH_QUICK");
        let mib = match std::env::var("AQ_BENCH_MB") {
            Ok(v) => v
                .parse()
                .expect("AQ_BENCH_MB must be a whole number of MiB"),
            Err(_) if quick => 8,
            Err(_) => 256,
        };
        let parent = match std::env::var_os("AQ_BENCH_DIR") {
            Some(d) => PathBuf::from(d),
            None => std::env::current_dir().expect("the working directory is readable"),
        };
        Self {
            mib: mib.max(1),
            json: flag("--json", "AQ_BENCH_JSON"),
            parent,
        }
    }

    /// 64 KiB units per scenario.
    fn blocks(&self) -> u64 {
        self.mib * (1 << 20) / BATCH_BODY as u64
    }
}

fn progress(msg: &str) {
    eprintln!("[log_append] {msg}");
}

/// Deterministic, incompressible-looking filler (xorshift), so no layer can shortcut zeros.
fn filler(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn record(h: &mut Histogram<u64>, d: Duration) {
    h.saturating_record((d.as_nanos() as u64).max(1));
}

fn raw_fdatasync_per_block(dir: &Path, blocks: u64, block: &[u8]) -> Row {
    let mut f = File::create(dir.join("raw-fdatasync.bin")).expect("create raw file");
    let mut h = latency_histogram();
    let start = Instant::now();
    for _ in 0..blocks {
        let t0 = Instant::now();
        f.write_all(block).expect("raw write");
        f.sync_data().expect("raw fdatasync");
        record(&mut h, t0.elapsed());
    }
    let elapsed = start.elapsed();
    Row {
        scenario: "raw_write_fdatasync".into(),
        bytes: blocks * block.len() as u64,
        entries: blocks,
        records: blocks * RECORDS_PER_BATCH as u64,
        elapsed,
        latency: Some(Latency::from_nanos(&h)),
        extra: vec![("fdatasyncs", blocks as f64)],
    }
}

fn raw_stream(dir: &Path, blocks: u64, block: &[u8]) -> Row {
    let mut f = File::create(dir.join("raw-stream.bin")).expect("create raw file");
    let mut h = latency_histogram();
    let start = Instant::now();
    for _ in 0..blocks {
        let t0 = Instant::now();
        f.write_all(block).expect("raw write");
        record(&mut h, t0.elapsed());
    }
    let t_sync = Instant::now();
    f.sync_data().expect("raw fdatasync");
    let final_sync = t_sync.elapsed();
    let elapsed = start.elapsed();
    Row {
        scenario: "raw_write_stream".into(),
        bytes: blocks * block.len() as u64,
        entries: blocks,
        records: blocks * RECORDS_PER_BATCH as u64,
        elapsed,
        latency: Some(Latency::from_nanos(&h)),
        extra: vec![("final_fdatasync_ms", final_sync.as_secs_f64() * 1e3)],
    }
}

/// `appenders` threads append `blocks` batches in total to a fresh log in `dir`; returns the
/// row and the still-open log.
fn log_append(
    name: &str,
    dir: &Path,
    policy: FlushPolicy,
    appenders: usize,
    blocks: u64,
    batch: &Bytes,
) -> (Row, PartitionLog, Arc<StorageMetrics>) {
    let metrics = Arc::new(StorageMetrics::default());
    let opts = LogOptions {
        flush: policy,
        ..Default::default()
    };
    let log =
        PartitionLog::open(Arc::new(StdFs), dir, opts, Arc::clone(&metrics)).expect("open log");
    // Serializes "read next_index, append" so every appender holds the right index.
    let order = Mutex::new(0u64);
    let start_line = Barrier::new(appenders + 1);
    let failures = AtomicU64::new(0);
    let (start, hists) = std::thread::scope(|s| {
        let workers: Vec<_> = (0..appenders)
            .map(|_| {
                let (log, order, start_line, failures) = (&log, &order, &start_line, &failures);
                s.spawn(move || {
                    let mut h = latency_histogram();
                    let (tx, rx) = mpsc::sync_channel::<(Result<(), LogError>, Instant)>(1);
                    start_line.wait();
                    loop {
                        let t0 = {
                            let mut claimed = order.lock().expect("append order lock");
                            if *claimed >= blocks {
                                break;
                            }
                            *claimed += 1;
                            let entry = Entry::data(log.next_index(), 1, 1, batch.clone());
                            let tx = tx.clone();
                            let t0 = Instant::now();
                            log.append(
                                &[entry],
                                Some(Box::new(move |r| {
                                    let _ = tx.send((r, Instant::now()));
                                })),
                            )
                            .expect("append");
                            t0
                        };
                        let (r, t1) = rx.recv().expect("the durability callback fires");
                        if let Err(e) = r {
                            failures.fetch_add(1, Ordering::Relaxed);
                            progress(&format!("{name}: append failed: {e}"));
                            break;
                        }
                        record(&mut h, t1.duration_since(t0));
                    }
                    h
                })
            })
            .collect();
        start_line.wait();
        let start = Instant::now();
        let hists: Vec<_> = workers
            .into_iter()
            .map(|w| w.join().expect("appender thread"))
            .collect();
        (start, hists)
    });
    let elapsed = start.elapsed();
    assert_eq!(
        failures.load(Ordering::Relaxed),
        0,
        "{name}: appends failed"
    );
    assert_eq!(
        log.next_index(),
        blocks,
        "{name}: every batch appended once"
    );
    let mut h = latency_histogram();
    for part in &hists {
        h.add(part).expect("histograms share bounds");
    }
    let fsyncs = StorageMetrics::get(&metrics.fsyncs);
    let fsync_us = StorageMetrics::get(&metrics.fsync_micros);
    let waiters = StorageMetrics::get(&metrics.group_commit_waiters);
    let mut extra = vec![("fdatasyncs", fsyncs as f64)];
    if fsyncs > 0 {
        extra.push(("mean_fdatasync_us", fsync_us as f64 / fsyncs as f64));
        if waiters > 0 {
            extra.push(("appends_per_fdatasync", waiters as f64 / fsyncs as f64));
        }
    }
    let row = Row {
        scenario: name.into(),
        bytes: blocks * BATCH_BODY as u64,
        entries: blocks,
        records: blocks * RECORDS_PER_BATCH as u64,
        elapsed,
        latency: Some(Latency::from_nanos(&h)),
        extra,
    };
    (row, log, metrics)
}

/// Reads the whole log with `read` (by index) in 1 MiB chunks.
fn read_by_index(log: &PartitionLog, expect_entries: u64) -> Row {
    let mut h = latency_histogram();
    let (mut bytes, mut entries, mut records) = (0u64, 0u64, 0u64);
    let mut from = log.first_index().expect("log is not empty");
    let end = log.next_index();
    let start = Instant::now();
    while from < end {
        let t0 = Instant::now();
        let chunk = log.read(from, end, READ_CHUNK).expect("read");
        record(&mut h, t0.elapsed());
        let last = chunk
            .last()
            .expect("a read below next_index returns an entry");
        from = last.entry.index + 1;
        entries += chunk.len() as u64;
        for e in &chunk {
            bytes += e.entry.payload.len() as u64;
            records += u64::from(e.offset_count);
        }
    }
    let elapsed = start.elapsed();
    assert_eq!(entries, expect_entries, "read returns every entry once");
    Row {
        scenario: "log_read".into(),
        bytes,
        entries,
        records,
        elapsed,
        latency: Some(Latency::from_nanos(&h)),
        extra: vec![("calls", h.len() as f64)],
    }
}

/// Reads the whole log with `read_offsets` (by record offset) in 1 MiB chunks.
fn read_by_offset(log: &PartitionLog, expect_entries: u64) -> Row {
    let mut h = latency_histogram();
    let (mut bytes, mut entries, mut records) = (0u64, 0u64, 0u64);
    let mut offset = log.start_offset().expect("start offset");
    let start = Instant::now();
    loop {
        let t0 = Instant::now();
        let chunk = log.read_offsets(offset, READ_CHUNK).expect("read_offsets");
        record(&mut h, t0.elapsed());
        let Some(last) = chunk.last() else { break };
        offset = last.next_offset();
        entries += chunk.len() as u64;
        for e in &chunk {
            bytes += e.entry.payload.len() as u64;
            records += u64::from(e.offset_count);
        }
    }
    let elapsed = start.elapsed();
    assert_eq!(
        entries, expect_entries,
        "read_offsets returns every entry once"
    );
    assert_eq!(
        offset,
        log.next_offset(),
        "read_offsets reaches the log-end offset"
    );
    Row {
        scenario: "log_read_offsets".into(),
        bytes,
        entries,
        records,
        elapsed,
        latency: Some(Latency::from_nanos(&h)),
        extra: vec![("calls", h.len() as f64)],
    }
}

fn close_and_remove(name: &str, log: PartitionLog, dir: &Path) {
    let t0 = Instant::now();
    log.close().expect("close log");
    progress(&format!(
        "{name}: close (final sync) took {:.1} ms",
        t0.elapsed().as_secs_f64() * 1e3
    ));
    std::fs::remove_dir_all(dir).expect("remove scenario directory");
}

fn find<'a>(rows: &'a [Row], name: &str) -> &'a Row {
    rows.iter()
        .find(|r| r.scenario == name)
        .expect("scenario ran")
}

fn main() {
    let cfg = Config::from_env_and_args();
    let mount = mount_of(&cfg.parent);
    if let Some((_, _, fs_type)) = &mount
        && matches!(fs_type.as_str(), "tmpfs" | "ramfs")
    {
        eprintln!(
            "[log_append] {} is on {fs_type}: fdatasync would be free there; set AQ_BENCH_DIR to a directory on a real disk",
            cfg.parent.display()
        );
        std::process::exit(2);
    }
    let scratch = tempfile::Builder::new()
        .prefix("aq-bench-log-append-")
        .tempdir_in(&cfg.parent)
        .expect("create the scratch directory");
    let root = scratch.path();
    let (dev, mount_point, fs_type) = mount.unwrap_or_else(|| ("?".into(), "?".into(), "?".into()));
    progress(&format!(
        "{} MiB per scenario in {} (device {dev}, {fs_type} mounted at {mount_point}), {} CPUs",
        cfg.mib,
        root.display(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    ));

    let body = filler(BATCH_BODY);
    let batch = Bytes::from(batch::build(
        RECORDS_PER_BATCH as u32,
        1_700_000_000_000,
        &body,
    ));
    let blocks = cfg.blocks();
    let mut rows = Vec::new();

    progress("raw_write_fdatasync ...");
    rows.push(raw_fdatasync_per_block(root, blocks, &body));
    std::fs::remove_file(root.join("raw-fdatasync.bin")).expect("remove raw file");
    progress("raw_write_stream ...");
    rows.push(raw_stream(root, blocks, &body));
    std::fs::remove_file(root.join("raw-stream.bin")).expect("remove raw file");

    let scenarios = [
        ("log_always_x1", FlushPolicy::Always, 1),
        ("log_always_x8", FlushPolicy::Always, 8),
        ("log_interval100ms_x1", FlushPolicy::Interval(INTERVAL), 1),
        ("log_interval100ms_x8", FlushPolicy::Interval(INTERVAL), 8),
    ];
    for (name, policy, appenders) in scenarios {
        progress(&format!("{name} ..."));
        let dir = root.join(name);
        let (row, log, _) = log_append(name, &dir, policy, appenders, blocks, &batch);
        rows.push(row);
        if name == "log_always_x8" {
            progress("log_read, log_read_offsets (page cache) ...");
            rows.push(read_by_index(&log, blocks));
            rows.push(read_by_offset(&log, blocks));
        }
        close_and_remove(name, log, &dir);
    }

    let x8 = find(&rows, "log_always_x8").mb_per_s();
    let vs_fdatasync = x8 / find(&rows, "raw_write_fdatasync").mb_per_s();
    let vs_stream = x8 / find(&rows, "raw_write_stream").mb_per_s();
    let read_gb_s = find(&rows, "log_read").mb_per_s() / 1e3;
    let read_offsets_gb_s = find(&rows, "log_read_offsets").mb_per_s() / 1e3;
    let verdict = |ok: bool| if ok { "met" } else { "MISSED" };

    if cfg.json {
        println!(
            "{{\"bench\":\"log_append\",\"mib_per_scenario\":{},\"dir\":{},\"device\":{},\"fs_type\":{},\
             \"rows\":{},\"ratios\":{{\"always_x8_vs_raw_fdatasync\":{},\"always_x8_vs_raw_stream\":{},\
             \"read_gb_per_s\":{},\"read_offsets_gb_per_s\":{}}},\"goals\":{{\"always_x8_vs_raw_fdatasync\":{},\
             \"always_x8_vs_raw_stream\":{},\"read_gb_per_s\":{}}}}}",
            cfg.mib,
            json_str(&root.display().to_string()),
            json_str(&dev),
            json_str(&fs_type),
            to_json(&rows),
            json_num(vs_fdatasync),
            json_num(vs_stream),
            json_num(read_gb_s),
            json_num(read_offsets_gb_s),
            json_num(GOAL_VS_FDATASYNC),
            json_num(GOAL_VS_STREAM),
            json_num(GOAL_READ_GB_S),
        );
    } else {
        println!();
        println!(
            "log_append: {} MiB per scenario; entry = RecordBatch v2 of {RECORDS_PER_BATCH} x {RECORD_BYTES} B records; \
             {fs_type} on {dev}",
            cfg.mib
        );
        print_table(&rows);
        println!();
        for r in &rows {
            if !r.extra.is_empty() {
                let notes: Vec<String> =
                    r.extra.iter().map(|(k, v)| format!("{k}={v:.1}")).collect();
                println!("  {:<22} {}", r.scenario, notes.join(" "));
            }
        }
        println!();
        println!(
            "always x8 / raw write+fdatasync = {vs_fdatasync:.2}x (goal >= {GOAL_VS_FDATASYNC:.1}x: {})",
            verdict(vs_fdatasync >= GOAL_VS_FDATASYNC)
        );
        println!(
            "always x8 / raw streaming write = {vs_stream:.2}x (goal >= {GOAL_VS_STREAM:.1}x: {})",
            verdict(vs_stream >= GOAL_VS_STREAM)
        );
        println!(
            "read = {read_gb_s:.2} GB/s, read_offsets = {read_offsets_gb_s:.2} GB/s (goal >= {GOAL_READ_GB_S:.1} GB/s: {})",
            verdict(read_gb_s >= GOAL_READ_GB_S && read_offsets_gb_s >= GOAL_READ_GB_S)
        );
    }
}
