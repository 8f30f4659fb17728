//! Shared pieces of Aqueduct's benchmark programs (`benches/*.rs`, run by `make bench`).
//!
//! Benchmarks are programs, not timed tests (DESIGN.md §8): each one runs its scenarios in one
//! process, on one machine and one disk, and reports throughput plus latency percentiles from
//! an hdrhistogram, as a table for people and as JSON for tools. This module holds the
//! reporting side ([`Row`], [`print_table`], [`to_json`]) and [`mount_of`], which says which
//! file system a benchmark directory lives on (a tmpfs would make every `fdatasync` free).

use std::path::Path;
use std::time::Duration;

use hdrhistogram::Histogram;

/// A latency histogram in nanoseconds, from 1 ns up to one hour, 3 significant digits.
pub fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000_000, 3).expect("static histogram bounds are valid")
}

/// Latency percentiles of one scenario, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Latency {
    pub samples: u64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
}

impl Latency {
    /// Summarizes a histogram recorded in nanoseconds.
    pub fn from_nanos(h: &Histogram<u64>) -> Self {
        let us = |ns: u64| ns as f64 / 1_000.0;
        Self {
            samples: h.len(),
            p50_us: us(h.value_at_quantile(0.50)),
            p99_us: us(h.value_at_quantile(0.99)),
            p999_us: us(h.value_at_quantile(0.999)),
            max_us: us(h.max()),
        }
    }
}

/// One line of a benchmark's result: a scenario and what it achieved.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// Short stable name (also the JSON key), e.g. `log_always_x8`.
    pub scenario: String,
    /// Payload bytes moved (record bytes; frame and batch headers not counted).
    pub bytes: u64,
    /// Log entries (or raw blocks) moved.
    pub entries: u64,
    /// Records moved (entries × records per entry).
    pub records: u64,
    pub elapsed: Duration,
    /// Per-operation latency; `None` where no per-operation figure makes sense.
    pub latency: Option<Latency>,
    /// Further named figures of the scenario (sync counts, mean sync time, ...).
    pub extra: Vec<(&'static str, f64)>,
}

impl Row {
    /// Payload throughput in MB/s (10^6 bytes per second).
    pub fn mb_per_s(&self) -> f64 {
        self.bytes as f64 / 1e6 / self.elapsed.as_secs_f64()
    }

    /// Entries per second.
    pub fn entries_per_s(&self) -> f64 {
        self.entries as f64 / self.elapsed.as_secs_f64()
    }

    /// Records per second.
    pub fn records_per_s(&self) -> f64 {
        self.records as f64 / self.elapsed.as_secs_f64()
    }
}

fn fmt_us(us: f64) -> String {
    if us >= 10_000.0 {
        format!("{:.1} ms", us / 1_000.0)
    } else if us >= 1_000.0 {
        format!("{:.2} ms", us / 1_000.0)
    } else {
        format!("{us:.0} µs")
    }
}

/// Prints the rows as an aligned text table on stdout.
pub fn print_table(rows: &[Row]) {
    println!(
        "{:<22} {:>10} {:>11} {:>12} {:>10} {:>10} {:>10} {:>10}",
        "scenario", "MB/s", "entries/s", "records/s", "p50", "p99", "p99.9", "max"
    );
    for r in rows {
        let (p50, p99, p999, max) = match r.latency {
            Some(l) => (
                fmt_us(l.p50_us),
                fmt_us(l.p99_us),
                fmt_us(l.p999_us),
                fmt_us(l.max_us),
            ),
            None => ("-".into(), "-".into(), "-".into(), "-".into()),
        };
        println!(
            "{:<22} {:>10.1} {:>11.0} {:>12.0} {:>10} {:>10} {:>10} {:>10}",
            r.scenario,
            r.mb_per_s(),
            r.entries_per_s(),
            r.records_per_s(),
            p50,
            p99,
            p999,
            max
        );
    }
}

/// Escapes a string for a JSON string literal.
pub fn json_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A JSON number (non-finite values, which JSON lacks, become `null`).
pub fn json_num(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.3}")
    } else {
        "null".into()
    }
}

/// The rows as a JSON array of objects (one per scenario).
pub fn to_json(rows: &[Row]) -> String {
    let items: Vec<String> = rows
        .iter()
        .map(|r| {
            let latency = match r.latency {
                Some(l) => format!(
                    "{{\"samples\":{},\"p50_us\":{},\"p99_us\":{},\"p999_us\":{},\"max_us\":{}}}",
                    l.samples,
                    json_num(l.p50_us),
                    json_num(l.p99_us),
                    json_num(l.p999_us),
                    json_num(l.max_us)
                ),
                None => "null".into(),
            };
            let extra: Vec<String> =
                r.extra.iter().map(|(k, v)| format!("{}:{}", json_str(k), json_num(*v))).collect();
            format!(
                "{{\"scenario\":{},\"bytes\":{},\"entries\":{},\"records\":{},\"seconds\":{},\
                 \"mb_per_s\":{},\"entries_per_s\":{},\"records_per_s\":{},\"latency\":{},\"extra\":{{{}}}}}",
                json_str(&r.scenario),
                r.bytes,
                r.entries,
                r.records,
                json_num(r.elapsed.as_secs_f64()),
                json_num(r.mb_per_s()),
                json_num(r.entries_per_s()),
                json_num(r.records_per_s()),
                latency,
                extra.join(",")
            )
        })
        .collect();
    format!("[{}]", items.join(","))
}

/// The mount holding `path`: (device, mount point, file-system type), read from
/// `/proc/mounts` (longest matching mount point wins). `None` off Linux or if unreadable.
pub fn mount_of(path: &Path) -> Option<(String, String, String)> {
    let path = path.canonicalize().ok()?;
    let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
    mounts
        .lines()
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            let (dev, at, ty) = (f.next()?, f.next()?, f.next()?);
            // /proc/mounts escapes spaces and the like as octal (`\040`).
            let at = at.replace("\\040", " ");
            path.starts_with(&at)
                .then(|| (dev.to_string(), at, ty.to_string()))
        })
        .max_by_key(|(_, at, _)| at.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The JSON is hand-written (no serde in this crate), so check that it is well formed.
    #[test]
    fn json_escapes_and_nulls() {
        assert_eq!(json_str("a\"b\\c\n"), "\"a\\\"b\\\\c\\u000a\"");
        assert_eq!(json_num(f64::INFINITY), "null");
        let row = Row {
            scenario: "x".into(),
            bytes: 1_000_000,
            entries: 10,
            records: 640,
            elapsed: Duration::from_secs(1),
            latency: None,
            extra: vec![("fdatasyncs", 2.0)],
        };
        let j = to_json(&[row]);
        assert!(j.starts_with("[{\"scenario\":\"x\""), "{j}");
        assert!(j.contains("\"mb_per_s\":1.000"), "{j}");
        assert!(
            j.ends_with("\"latency\":null,\"extra\":{\"fdatasyncs\":2.000}}]"),
            "{j}"
        );
    }
}
