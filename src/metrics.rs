//! Metrics kept per shard without locks or atomics (plain `Cell`s owned by one executor), and
//! their rendering in the Prometheus text format.
//!
//! Each shard renders its own samples into a [`Samples`] map (metric family → sample lines);
//! the shard that serves `/metrics` merges every shard's map and writes each family's `HELP`
//! and `TYPE` once.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::fmt::Write;

/// Metric family → its sample lines (`name{labels} value`).
pub type Samples = BTreeMap<&'static str, Vec<String>>;

/// Upper bounds of latency buckets, in seconds.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 10.0,
];
/// A flush slower than this counts as slow (`corebus_slow_flushes_total`): ten times a
/// typical NVMe or virtio write + `fdatasync` of a group commit, and the stalls that make an
/// ack p99 are ten to a hundred times longer.
pub const SLOW_FLUSH_SECONDS: f64 = 0.010;

/// Upper bounds of size buckets, in bytes.
pub const SIZE_BUCKETS: &[f64] = &[
    512.0,
    4096.0,
    16_384.0,
    65_536.0,
    262_144.0,
    1_048_576.0,
    4_194_304.0,
    16_777_216.0,
    67_108_864.0,
];
/// Upper bounds of count buckets.
pub const COUNT_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 1024.0];

/// Every metric family: name, type, help.
pub const FAMILIES: &[(&str, &str, &str)] = &[
    (
        "corebus_messages_in_total",
        "counter",
        "Records appended and acknowledged.",
    ),
    (
        "corebus_bytes_in_total",
        "counter",
        "Bytes of record batches appended and acknowledged.",
    ),
    (
        "corebus_messages_out_total",
        "counter",
        "Records returned by fetches (whole batches).",
    ),
    (
        "corebus_bytes_out_total",
        "counter",
        "Bytes of record batches returned by fetches.",
    ),
    (
        "corebus_log_start_offset",
        "gauge",
        "Earliest offset stored.",
    ),
    (
        "corebus_log_end_offset",
        "gauge",
        "Next offset to be written (high watermark).",
    ),
    (
        "corebus_log_size_bytes",
        "gauge",
        "Bytes of record batches stored.",
    ),
    (
        "corebus_log_segments",
        "gauge",
        "Segment files of the partition.",
    ),
    (
        "corebus_log_pending_bytes",
        "gauge",
        "Bytes appended and waiting for a flush (queue depth).",
    ),
    (
        "corebus_log_corrupt_ranges",
        "gauge",
        "Ranges of stored data that failed their checksum and are not served.",
    ),
    (
        "corebus_produce_latency_seconds",
        "histogram",
        "Produce request time, from frame to reply.",
    ),
    (
        "corebus_fetch_latency_seconds",
        "histogram",
        "Fetch request time, from frame to reply (long polls included).",
    ),
    (
        "corebus_flush_latency_seconds",
        "histogram",
        "Flush time: direct-I/O write plus sync.",
    ),
    (
        "corebus_fdatasync_latency_seconds",
        "histogram",
        "fdatasync time of a flush.",
    ),
    (
        "corebus_flush_latency_max_seconds",
        "gauge",
        "Longest flush (write plus sync) since the broker started.",
    ),
    (
        "corebus_flush_write_latency_seconds",
        "histogram",
        "Write time of a flush (the O_DIRECT writes of its batches).",
    ),
    (
        "corebus_flush_write_latency_max_seconds",
        "gauge",
        "Longest write of a flush since the broker started.",
    ),
    (
        "corebus_fdatasync_latency_max_seconds",
        "gauge",
        "Longest sync of a flush since the broker started.",
    ),
    (
        "corebus_slow_flushes_total",
        "counter",
        "Flushes that took longer than 10 ms (write plus sync).",
    ),
    (
        "corebus_flush_bytes",
        "histogram",
        "Bytes written by one flush.",
    ),
    (
        "corebus_flush_batches",
        "histogram",
        "Record batches made durable by one flush (group commit).",
    ),
    (
        "corebus_flush_errors_total",
        "counter",
        "Flushes that failed (their batches were not acknowledged).",
    ),
    (
        "corebus_synced_flushes_total",
        "counter",
        "Durable flushes by what synced them: an fdatasync of their own file, or the shard's shared call.",
    ),
    (
        "corebus_shard_syncs_total",
        "counter",
        "Shared sync calls of the shard (disk cache flushes or syncfs), each serving every flush that waited for it.",
    ),
    (
        "corebus_open_logs",
        "gauge",
        "Partition logs open on the shard.",
    ),
    (
        "corebus_prewritten_bytes_total",
        "counter",
        "Bytes zero-filled ahead of partitions' ends so that small flushes overwrite written blocks.",
    ),
    (
        "corebus_prewrites_in_flight",
        "gauge",
        "Zero-fills ahead of partitions' ends running now.",
    ),
    (
        "corebus_prewrites_cut_short_total",
        "counter",
        "Zero-fills stopped early because a flush caught up with them (a larger --prewrite-bytes gives them more room).",
    ),
    (
        "corebus_fetch_bytes_total",
        "counter",
        "Bytes of record batches returned by fetches, by source: the in-memory tail or the disk.",
    ),
    ("corebus_connections", "gauge", "Open client connections."),
    (
        "corebus_connections_refused_total",
        "counter",
        "Connections closed at accept because of a limit.",
    ),
    (
        "corebus_offline_at_start",
        "gauge",
        "Partitions and subscription states that failed to open at start and are offline until a restart (the log says why).",
    ),
    (
        "corebus_requests_in_flight",
        "gauge",
        "Client requests being handled.",
    ),
    (
        "corebus_errors_total",
        "counter",
        "Error replies, by error code.",
    ),
    (
        "corebus_subscription_backlog",
        "gauge",
        "Events of a subscription waiting for delivery or not looked at yet.",
    ),
    (
        "corebus_subscription_locked",
        "gauge",
        "Events of a subscription locked by receivers now.",
    ),
    (
        "corebus_subscription_acked_total",
        "counter",
        "Events of a subscription acknowledged.",
    ),
    (
        "corebus_subscription_dead_lettered_total",
        "counter",
        "Events of a subscription sent to its dead-letter topic.",
    ),
    (
        "corebus_subscription_dropped_total",
        "counter",
        "Events of a subscription dropped for want of a dead-letter topic.",
    ),
    (
        "corebus_subscription_lost_total",
        "counter",
        "Offsets of a subscription lost before they were settled: removed by retention (or failing their checksum) while unsettled or before it read them.",
    ),
];

/// A histogram with fixed buckets.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    counts: RefCell<Vec<u64>>,
    sum: Cell<f64>,
    count: Cell<u64>,
}

impl Histogram {
    /// An empty histogram over `bounds` (ascending upper bounds; +Inf is added).
    pub fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: RefCell::new(vec![0; bounds.len() + 1]),
            sum: Cell::new(0.0),
            count: Cell::new(0),
        }
    }

    /// Records one value.
    pub fn observe(&self, value: f64) {
        let i = self.bounds.partition_point(|&b| b < value);
        if let Some(c) = self.counts.borrow_mut().get_mut(i) {
            *c += 1;
        }
        self.sum.set(self.sum.get() + value);
        self.count.set(self.count.get() + 1);
    }

    /// Number of values recorded.
    pub fn count(&self) -> u64 {
        self.count.get()
    }

    /// Writes the `_bucket`, `_sum` and `_count` samples.
    pub fn render(&self, family: &'static str, labels: &str, out: &mut Samples) {
        let lines = out.entry(family).or_default();
        let mut cumulative = 0;
        let counts = self.counts.borrow();
        for (i, c) in counts.iter().enumerate() {
            cumulative += c;
            let le = self
                .bounds
                .get(i)
                .map_or("+Inf".to_string(), |b| b.to_string());
            let sep = if labels.is_empty() { "" } else { "," };
            lines.push(format!(
                "{family}_bucket{{{labels}{sep}le=\"{le}\"}} {cumulative}"
            ));
        }
        lines.push(format!("{family}_sum{{{labels}}} {}", self.sum.get()));
        lines.push(format!("{family}_count{{{labels}}} {}", self.count.get()));
    }
}

/// Adds one sample line.
pub fn sample(
    out: &mut Samples,
    family: &'static str,
    labels: &str,
    value: impl std::fmt::Display,
) {
    out.entry(family)
        .or_default()
        .push(format!("{family}{{{labels}}} {value}"));
}

/// Quotes a label value.
pub fn label(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('"');
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Renders merged samples with each family's `HELP` and `TYPE` once.
pub fn render(samples: &Samples) -> String {
    let mut out = String::new();
    for (name, kind, help) in FAMILIES {
        let Some(lines) = samples.get(name) else {
            continue;
        };
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for line in lines {
            out.push_str(line);
            out.push('\n');
        }
    }
    // A family missing from FAMILIES is still exported, untyped, rather than lost.
    for (name, lines) in samples {
        if FAMILIES.iter().any(|(n, _, _)| n == name) {
            continue;
        }
        let _ = writeln!(out, "# TYPE {name} untyped");
        for line in lines {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// Merges `other` into `into`.
pub fn merge(into: &mut Samples, other: Samples) {
    for (family, mut lines) in other {
        into.entry(family).or_default().append(&mut lines);
    }
}

/// The storage layer's metrics of one shard, shared by its logs.
#[derive(Debug)]
pub struct StorageMetrics {
    /// Write plus sync time of each flush.
    pub flush_latency: Histogram,
    /// fdatasync time of each flush.
    pub fdatasync_latency: Histogram,
    /// Write time of each flush.
    pub write_latency: Histogram,
    /// The longest write of a flush, in seconds.
    pub write_latency_max: Cell<f64>,
    /// The longest flush, in seconds.
    pub flush_latency_max: Cell<f64>,
    /// The longest sync of a flush, in seconds.
    pub fdatasync_latency_max: Cell<f64>,
    /// Flushes slower than [`SLOW_FLUSH_SECONDS`].
    pub slow_flushes: Cell<u64>,
    /// Bytes per flush.
    pub flush_bytes: Histogram,
    /// Batches per flush.
    pub flush_batches: Histogram,
    /// Flushes that failed.
    pub flush_errors: Cell<u64>,
    /// Durable flushes made durable by an `fdatasync` of their own segment file.
    pub file_synced_flushes: Cell<u64>,
    /// Durable flushes made durable by the shard's shared call (see `storage::shard_sync`).
    pub shard_synced_flushes: Cell<u64>,
    /// Shared calls the shard's syncer made (each serves every flush that waited for it).
    pub shard_syncs: Cell<u64>,
    /// Partition logs open on the shard (prewriting splits its budget among them).
    pub open_logs: Cell<u64>,
    /// Bytes zero-filled ahead of partitions' ends (see `storage::prewrite`).
    pub prewritten_bytes: Cell<u64>,
    /// Zero-fills running now.
    pub prewrites_in_flight: Cell<u64>,
    /// Zero-fills stopped early because a flush caught up with them.
    pub prewrites_cut_short: Cell<u64>,
    /// Bytes fetches served from the in-memory tail.
    pub fetched_from_memory_bytes: Cell<u64>,
    /// Bytes fetches served from segment files.
    pub fetched_from_disk_bytes: Cell<u64>,
}

impl Default for StorageMetrics {
    fn default() -> Self {
        Self {
            flush_latency: Histogram::new(LATENCY_BUCKETS),
            fdatasync_latency: Histogram::new(LATENCY_BUCKETS),
            write_latency: Histogram::new(LATENCY_BUCKETS),
            write_latency_max: Cell::new(0.0),
            flush_latency_max: Cell::new(0.0),
            fdatasync_latency_max: Cell::new(0.0),
            slow_flushes: Cell::new(0),
            flush_bytes: Histogram::new(SIZE_BUCKETS),
            flush_batches: Histogram::new(COUNT_BUCKETS),
            flush_errors: Cell::new(0),
            file_synced_flushes: Cell::new(0),
            shard_synced_flushes: Cell::new(0),
            shard_syncs: Cell::new(0),
            open_logs: Cell::new(0),
            prewritten_bytes: Cell::new(0),
            prewrites_in_flight: Cell::new(0),
            prewrites_cut_short: Cell::new(0),
            fetched_from_memory_bytes: Cell::new(0),
            fetched_from_disk_bytes: Cell::new(0),
        }
    }
}

impl StorageMetrics {
    /// Records a completed flush that took `seconds` (write plus sync).
    pub fn observe_flush(&self, seconds: f64) {
        self.flush_latency.observe(seconds);
        self.flush_latency_max
            .set(self.flush_latency_max.get().max(seconds));
        if seconds > SLOW_FLUSH_SECONDS {
            self.slow_flushes.set(self.slow_flushes.get() + 1);
        }
    }

    /// Records the write of a flush that took `seconds`.
    pub fn observe_write(&self, seconds: f64) {
        self.write_latency.observe(seconds);
        self.write_latency_max
            .set(self.write_latency_max.get().max(seconds));
    }

    /// Records the sync of a flush that took `seconds`.
    pub fn observe_sync(&self, seconds: f64) {
        self.fdatasync_latency.observe(seconds);
        self.fdatasync_latency_max
            .set(self.fdatasync_latency_max.get().max(seconds));
    }

    /// Renders with the given labels.
    pub fn render(&self, labels: &str, out: &mut Samples) {
        self.flush_latency
            .render("corebus_flush_latency_seconds", labels, out);
        self.fdatasync_latency
            .render("corebus_fdatasync_latency_seconds", labels, out);
        self.write_latency
            .render("corebus_flush_write_latency_seconds", labels, out);
        for (family, value) in [
            ("corebus_flush_latency_max_seconds", &self.flush_latency_max),
            (
                "corebus_flush_write_latency_max_seconds",
                &self.write_latency_max,
            ),
            (
                "corebus_fdatasync_latency_max_seconds",
                &self.fdatasync_latency_max,
            ),
        ] {
            sample(out, family, labels, value.get());
        }
        self.flush_bytes.render("corebus_flush_bytes", labels, out);
        self.flush_batches
            .render("corebus_flush_batches", labels, out);
        for (family, value) in [
            ("corebus_flush_errors_total", &self.flush_errors),
            ("corebus_slow_flushes_total", &self.slow_flushes),
            ("corebus_shard_syncs_total", &self.shard_syncs),
            ("corebus_open_logs", &self.open_logs),
            ("corebus_prewrites_in_flight", &self.prewrites_in_flight),
            ("corebus_prewritten_bytes_total", &self.prewritten_bytes),
            (
                "corebus_prewrites_cut_short_total",
                &self.prewrites_cut_short,
            ),
        ] {
            sample(out, family, labels, value.get());
        }
        split_samples(
            out,
            "corebus_synced_flushes_total",
            labels,
            "by",
            [
                ("file", &self.file_synced_flushes),
                ("shard", &self.shard_synced_flushes),
            ],
        );
        split_samples(
            out,
            "corebus_fetch_bytes_total",
            labels,
            "source",
            [
                ("memory", &self.fetched_from_memory_bytes),
                ("disk", &self.fetched_from_disk_bytes),
            ],
        );
    }
}

/// One sample of `family` per value of the extra label `key`, after `labels`.
fn split_samples<const N: usize>(
    out: &mut Samples,
    family: &'static str,
    labels: &str,
    key: &str,
    values: [(&str, &Cell<u64>); N],
) {
    let sep = if labels.is_empty() { "" } else { "," };
    for (value, counter) in values {
        sample(
            out,
            family,
            &format!("{labels}{sep}{key}=\"{value}\""),
            counter.get(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::new(&[1.0, 10.0]);
        for v in [0.5, 5.0, 5.0, 50.0] {
            h.observe(v);
        }
        let mut out = Samples::new();
        h.render("x", "shard=\"0\"", &mut out);
        let lines = &out["x"];
        assert_eq!(lines[0], "x_bucket{shard=\"0\",le=\"1\"} 1");
        assert_eq!(lines[1], "x_bucket{shard=\"0\",le=\"10\"} 3");
        assert_eq!(lines[2], "x_bucket{shard=\"0\",le=\"+Inf\"} 4");
        assert_eq!(lines[4], "x_count{shard=\"0\"} 4");
    }
}
