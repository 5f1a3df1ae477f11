//! How a shard reports its figures and metrics: as Prometheus samples (`/metrics`) or as a
//! `Stats` reply (`corebus stats`), its own or every shard's over the mesh.

use super::figures::{PartitionFigures, ShardFigures};
use super::shard::Shard;
use crate::metrics::{label, sample, Samples};

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
        let storage = &self.metrics.storage;
        let micros = |seconds: f64| (seconds * 1e6) as u64;
        ShardFigures {
            shard: self.id as u32,
            connections: self.metrics.connections.get() as u32,
            requests_in_flight: self.requests_in_flight() as u32,
            flushes: storage.flush_latency.count(),
            slow_flushes: storage.slow_flushes.get(),
            flush_max_us: micros(storage.flush_latency_max.get()),
            sync_max_us: micros(storage.fdatasync_latency_max.get()),
            write_max_us: micros(storage.write_latency_max.get()),
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
                .send_to(other, super::messages::ShardMessage::Samples { reply })
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
                .send_to(s, super::messages::ShardMessage::Figures { reply })
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
