//! Prometheus exposition of the node's figures.
//!
//! The storage crate counts with plain atomics ([`StorageMetrics`]) and knows nothing of
//! Prometheus; [`StorageCollector`] reads those atomics at scrape time, so a scrape always sees
//! current values and the storage hot path pays nothing for the export. Every storage figure is
//! exported as `aqueduct_storage_*`; counters get the OpenMetrics `_total` suffix from the
//! encoder.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Instant;

use aqueduct_storage::metrics::StorageMetrics;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

/// The version reported by `/health` and `aqueduct_build_info`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// How one storage atomic is exported.
enum Export {
    /// Monotonic count, exported as is.
    Counter,
    /// Monotonic count of microseconds, exported as seconds.
    MicrosAsSeconds,
    /// Value that goes up and down.
    Gauge,
}

/// One exported storage figure.
struct StorageFigure {
    /// Name without the `_total` suffix, which the encoder adds to counters.
    name: &'static str,
    help: &'static str,
    export: Export,
    value: fn(&StorageMetrics) -> &AtomicU64,
}

const STORAGE_FIGURES: &[StorageFigure] = &[
    StorageFigure {
        name: "aqueduct_storage_appended_entries",
        help: "Entries appended to partition logs (data and control)",
        export: Export::Counter,
        value: |m| &m.appended_entries,
    },
    StorageFigure {
        name: "aqueduct_storage_appended_bytes",
        help: "Bytes written to segment files for appended entries, framing included",
        export: Export::Counter,
        value: |m| &m.appended_bytes,
    },
    StorageFigure {
        name: "aqueduct_storage_fsyncs",
        help: "fsync/fdatasync calls on segment, index and directory files",
        export: Export::Counter,
        value: |m| &m.fsyncs,
    },
    StorageFigure {
        name: "aqueduct_storage_fsync_seconds",
        help: "Time spent in fsync/fdatasync calls",
        export: Export::MicrosAsSeconds,
        value: |m| &m.fsync_micros,
    },
    StorageFigure {
        name: "aqueduct_storage_group_commit_waiters",
        help: "Append callbacks completed by a group sync",
        export: Export::Counter,
        value: |m| &m.group_commit_waiters,
    },
    StorageFigure {
        name: "aqueduct_storage_read_bytes",
        help: "Bytes returned by partition log reads",
        export: Export::Counter,
        value: |m| &m.read_bytes,
    },
    StorageFigure {
        name: "aqueduct_storage_segments_rolled",
        help: "Segments sealed and replaced by a new one",
        export: Export::Counter,
        value: |m| &m.segments_rolled,
    },
    StorageFigure {
        name: "aqueduct_storage_segments_deleted",
        help: "Segments deleted by retention or purge",
        export: Export::Counter,
        value: |m| &m.segments_deleted,
    },
    StorageFigure {
        name: "aqueduct_storage_recovery_truncated_bytes",
        help: "Bytes cut off torn or corrupt segment tails during recovery",
        export: Export::Counter,
        value: |m| &m.recovery_truncated_bytes,
    },
    StorageFigure {
        name: "aqueduct_storage_open_segments",
        help: "Segments currently open across all partition logs",
        export: Export::Gauge,
        value: |m| &m.open_segments,
    },
];

/// Exports the node-wide [`StorageMetrics`], read at scrape time.
#[derive(Debug)]
pub struct StorageCollector {
    metrics: Arc<StorageMetrics>,
}

impl StorageCollector {
    pub fn new(metrics: Arc<StorageMetrics>) -> Self {
        Self { metrics }
    }
}

impl Collector for StorageCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for figure in STORAGE_FIGURES {
            let raw = StorageMetrics::get((figure.value)(&self.metrics));
            match figure.export {
                Export::Counter => encode(&mut encoder, figure, &ConstCounter::new(raw))?,
                Export::MicrosAsSeconds => {
                    #[allow(clippy::cast_precision_loss)] // exact up to 2^53 µs (285 years)
                    let seconds = raw as f64 / 1e6;
                    encode(&mut encoder, figure, &ConstCounter::new(seconds))?;
                }
                Export::Gauge => encode(&mut encoder, figure, &ConstGauge::new(raw))?,
            }
        }
        Ok(())
    }
}

fn encode(
    encoder: &mut DescriptorEncoder,
    figure: &StorageFigure,
    metric: &impl EncodeMetric,
) -> Result<(), std::fmt::Error> {
    let metric_encoder =
        encoder.encode_descriptor(figure.name, figure.help, None, metric.metric_type())?;
    metric.encode(metric_encoder)
}

/// Exports `aqueduct_process_uptime_seconds`, measured from the collector's creation.
#[derive(Debug)]
pub struct UptimeCollector {
    started: Instant,
}

impl UptimeCollector {
    pub fn new(started: Instant) -> Self {
        Self { started }
    }
}

impl Collector for UptimeCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let uptime = ConstGauge::new(self.started.elapsed().as_secs_f64());
        let metric_encoder = encoder.encode_descriptor(
            "aqueduct_process_uptime_seconds",
            "Seconds since this node started",
            None,
            uptime.metric_type(),
        )?;
        uptime.encode(metric_encoder)
    }
}

/// The registry behind `/metrics`: build info, uptime and the storage figures.
pub fn registry(storage: Arc<StorageMetrics>, started: Instant) -> Registry {
    let mut registry = Registry::default();
    registry.register(
        "aqueduct_build",
        "Build information",
        Info::new(vec![("version", VERSION)]),
    );
    registry.register_collector(Box::new(UptimeCollector::new(started)));
    registry.register_collector(Box::new(StorageCollector::new(storage)));
    registry
}

/// Renders `registry` in the OpenMetrics text format.
pub fn render(registry: &Registry) -> Result<String, std::fmt::Error> {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry)?;
    Ok(text)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::atomic::Ordering;

    use super::*;

    /// A scrape reads the atomics as they are now, not as they were at registration.
    #[test]
    fn scrape_reads_current_values() {
        let storage = Arc::new(StorageMetrics::default());
        let registry = registry(Arc::clone(&storage), Instant::now());
        storage.fsyncs.store(7, Ordering::Relaxed);
        storage.appended_bytes.store(4096, Ordering::Relaxed);
        storage.open_segments.store(3, Ordering::Relaxed);
        storage.fsync_micros.store(1_500_000, Ordering::Relaxed);
        let text = render(&registry).unwrap();
        assert!(text.contains("aqueduct_storage_fsyncs_total 7\n"), "{text}");
        assert!(
            text.contains("aqueduct_storage_appended_bytes_total 4096\n"),
            "{text}"
        );
        assert!(
            text.contains("aqueduct_storage_open_segments 3\n"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE aqueduct_storage_open_segments gauge\n"),
            "{text}"
        );
        assert!(
            text.contains("aqueduct_storage_fsync_seconds_total 1.5\n"),
            "{text}"
        );
    }

    /// Every storage field is exported once, and build info and uptime are present.
    #[test]
    fn every_figure_is_exported() {
        let registry = registry(Arc::new(StorageMetrics::default()), Instant::now());
        let text = render(&registry).unwrap();
        for figure in STORAGE_FIGURES {
            let type_line = format!("# TYPE {} ", figure.name);
            assert_eq!(text.matches(&type_line).count(), 1, "{}", figure.name);
        }
        assert!(text.contains(&format!("aqueduct_build_info{{version=\"{VERSION}\"}} 1\n")));
        assert!(text.contains("aqueduct_process_uptime_seconds "), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
