//! A shard's metrics and figures: what it counts on the request path, and how it reports
//! them, as Prometheus samples (`/metrics`) or as a `Stats` reply (`corebus stats`).

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::Rc;

use super::shard::Shard;
use crate::metrics::{label, sample, Histogram, Samples, StorageMetrics, LATENCY_BUCKETS};
use crate::protocol::wire::ErrorCode;

/// Request-path metrics of one shard.
#[derive(Debug)]
pub struct ShardMetrics {
    /// Produce request time.
    pub produce_latency: Histogram,
    /// Fetch request time.
    pub fetch_latency: Histogram,
    /// Error replies by code name.
    pub errors: RefCell<BTreeMap<&'static str, u64>>,
    /// Open connections on this shard.
    pub connections: Cell<usize>,
    /// Connections refused at accept.
    pub connections_refused: Cell<u64>,
    /// Partitions and subscription states that failed to open at start (offline).
    pub failed_at_start: Cell<u64>,
    /// The storage layer's metrics of this shard.
    pub storage: Rc<StorageMetrics>,
}

impl Default for ShardMetrics {
    fn default() -> Self {
        Self {
            produce_latency: Histogram::new(LATENCY_BUCKETS),
            fetch_latency: Histogram::new(LATENCY_BUCKETS),
            errors: RefCell::new(BTreeMap::new()),
            connections: Cell::new(0),
            connections_refused: Cell::new(0),
            failed_at_start: Cell::new(0),
            storage: Rc::new(StorageMetrics::default()),
        }
    }
}

impl ShardMetrics {
    /// Counts an error reply.
    pub fn count_error(&self, code: ErrorCode) {
        let name = code.variant_name().unwrap_or("Unknown");
        *self.errors.borrow_mut().entry(name).or_default() += 1;
    }
}

/// One partition's figures, as `corebus stats` shows them.
#[derive(Clone, Debug, Default)]
pub struct PartitionFigures {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: u32,
    /// Owning shard.
    pub shard: u32,
    /// Earliest stored offset.
    pub log_start_offset: u64,
    /// Next offset to be written.
    pub high_watermark: u64,
    /// Bytes stored.
    pub size_bytes: u64,
    /// Segment files.
    pub segments: u32,
    /// Records acknowledged since start.
    pub messages_in: u64,
    /// Bytes acknowledged since start.
    pub bytes_in: u64,
    /// Records fetched since start.
    pub messages_out: u64,
    /// Bytes fetched since start.
    pub bytes_out: u64,
}

/// One shard's figures.
#[derive(Clone, Debug, Default)]
pub struct ShardFigures {
    /// Shard index.
    pub shard: u32,
    /// Open connections.
    pub connections: u32,
    /// Requests being handled.
    pub requests_in_flight: u32,
    /// Its partitions.
    pub partitions: Vec<PartitionFigures>,
}

impl Shard {
    /// This shard's figures.
    pub fn figures(&self) -> ShardFigures {
        let mut partitions: Vec<PartitionFigures> = self
            .logs_by_name()
            .into_iter()
            .map(|((topic, partition), log)| {
                let s = log.stats();
                PartitionFigures {
                    topic,
                    partition,
                    shard: self.id as u32,
                    log_start_offset: s.log_start_offset,
                    high_watermark: s.high_watermark,
                    size_bytes: s.bytes,
                    segments: s.segments as u32,
                    messages_in: s.messages_in,
                    bytes_in: s.bytes_in,
                    messages_out: s.messages_out,
                    bytes_out: s.bytes_out,
                }
            })
            .collect();
        partitions.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
        ShardFigures {
            shard: self.id as u32,
            connections: self.metrics.connections.get() as u32,
            requests_in_flight: self.requests_in_flight() as u32,
            partitions,
        }
    }

    /// This shard's Prometheus samples.
    pub fn samples(&self) -> Samples {
        let mut out = Samples::new();
        let shard = format!("shard=\"{}\"", self.id);
        for ((topic, partition), log) in self.logs_by_name() {
            let s = log.stats();
            let labels = format!("{shard},topic={},partition=\"{partition}\"", label(&topic));
            sample(
                &mut out,
                "corebus_messages_in_total",
                &labels,
                s.messages_in,
            );
            sample(&mut out, "corebus_bytes_in_total", &labels, s.bytes_in);
            sample(
                &mut out,
                "corebus_messages_out_total",
                &labels,
                s.messages_out,
            );
            sample(&mut out, "corebus_bytes_out_total", &labels, s.bytes_out);
            sample(
                &mut out,
                "corebus_log_start_offset",
                &labels,
                s.log_start_offset,
            );
            sample(
                &mut out,
                "corebus_log_end_offset",
                &labels,
                s.high_watermark,
            );
            sample(&mut out, "corebus_log_size_bytes", &labels, s.bytes);
            sample(&mut out, "corebus_log_segments", &labels, s.segments);
            sample(
                &mut out,
                "corebus_log_pending_bytes",
                &labels,
                s.pending_bytes,
            );
            sample(
                &mut out,
                "corebus_log_corrupt_ranges",
                &labels,
                s.corrupt_ranges,
            );
        }
        let m = &self.metrics;
        m.produce_latency
            .render("corebus_produce_latency_seconds", &shard, &mut out);
        m.fetch_latency
            .render("corebus_fetch_latency_seconds", &shard, &mut out);
        m.storage.render(&shard, &mut out);
        sample(&mut out, "corebus_connections", &shard, m.connections.get());
        sample(
            &mut out,
            "corebus_connections_refused_total",
            &shard,
            m.connections_refused.get(),
        );
        sample(
            &mut out,
            "corebus_offline_at_start",
            &shard,
            m.failed_at_start.get(),
        );
        sample(
            &mut out,
            "corebus_requests_in_flight",
            &shard,
            self.requests_in_flight(),
        );
        for topic in self.topics().keys() {
            for (name, _) in self.subscriptions_of(topic) {
                let f = self.stats_local(topic, &name);
                let labels = format!(
                    "{shard},topic={},subscription={}",
                    label(topic),
                    label(&name)
                );
                sample(&mut out, "corebus_subscription_backlog", &labels, f.backlog);
                sample(&mut out, "corebus_subscription_locked", &labels, f.locked);
                sample(
                    &mut out,
                    "corebus_subscription_acked_total",
                    &labels,
                    f.acked,
                );
                sample(
                    &mut out,
                    "corebus_subscription_dead_lettered_total",
                    &labels,
                    f.dead_lettered,
                );
                sample(
                    &mut out,
                    "corebus_subscription_dropped_total",
                    &labels,
                    f.dropped,
                );
                sample(&mut out, "corebus_subscription_lost_total", &labels, f.lost);
            }
        }
        for (code, n) in m.errors.borrow().iter() {
            sample(
                &mut out,
                "corebus_errors_total",
                &format!("{shard},code=\"{code}\""),
                n,
            );
        }
        out
    }
}

impl Shard {
    /// Every shard's samples (this one's and the others', over the mesh), merged.
    pub async fn all_samples(&self) -> Samples {
        let mut merged = self.samples();
        for other in (0..self.count).filter(|&s| s != self.id) {
            let (reply, rx) = futures::channel::oneshot::channel();
            if self
                .send_to(other, super::mesh::ShardMessage::Samples { reply })
                .await
                .is_ok()
            {
                if let Ok(samples) = rx.await {
                    crate::metrics::merge(&mut merged, samples);
                }
            }
        }
        merged
    }

    /// Every shard's figures, in shard order.
    pub async fn all_figures(&self) -> Vec<ShardFigures> {
        let mut all = Vec::with_capacity(self.count);
        for s in 0..self.count {
            if s == self.id {
                all.push(self.figures());
                continue;
            }
            let (reply, rx) = futures::channel::oneshot::channel();
            if self
                .send_to(s, super::mesh::ShardMessage::Figures { reply })
                .await
                .is_ok()
            {
                if let Ok(figures) = rx.await {
                    all.push(figures);
                }
            }
        }
        all
    }
}
