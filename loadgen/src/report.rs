//! The summary table and the JSON report.

use std::time::Duration;

use crate::args::Args;
use crate::host::{self, CpuShare};
use crate::stats::{percentiles, Stats};

/// Steal above this share of a CPU (percent) makes the run's figures suspect: the summary
/// says so.
const STEAL_WARNING_PCT: f64 = 5.0;

/// The outcome of a run.
pub struct Report {
    /// The JSON document (also the source of the table).
    pub json: serde_json::Value,
    /// Errors and verification failures.
    pub errors: u64,
}

/// What the broker says about the run (its stats request): the topic's bytes on disk and
/// its flushes, over every shard, since the broker started (the warmup included).
#[derive(Debug, Default)]
pub struct BrokerFigures {
    /// Bytes the topic's partitions store.
    pub disk_bytes: u64,
    /// Flushes (group commits) completed.
    pub flushes: u64,
    /// Of those, the ones slower than 10 ms.
    pub slow_flushes: u64,
    /// The longest flush, in microseconds.
    pub flush_max_us: u64,
    /// The longest sync of a flush, in microseconds.
    pub sync_max_us: u64,
    /// The longest write of a flush, in microseconds.
    pub write_max_us: u64,
}

impl BrokerFigures {
    /// The figures of `stats` for `topic`.
    pub fn of(stats: &corebus::client::Stats, topic: &str) -> Self {
        let shards = &stats.shards;
        Self {
            disk_bytes: stats
                .partitions
                .iter()
                .filter(|p| p.topic == topic)
                .map(|p| p.size_bytes)
                .sum(),
            flushes: shards.iter().map(|s| s.flushes).sum(),
            slow_flushes: shards.iter().map(|s| s.slow_flushes).sum(),
            flush_max_us: shards.iter().map(|s| s.flush_max_us).max().unwrap_or(0),
            sync_max_us: shards.iter().map(|s| s.sync_max_us).max().unwrap_or(0),
            write_max_us: shards.iter().map(|s| s.write_max_us).max().unwrap_or(0),
        }
    }
}

fn latency_json(h: &hdrhistogram::Histogram<u64>) -> serde_json::Value {
    let mut obj = serde_json::Map::new();
    for (name, v) in percentiles(h) {
        obj.insert(name.into(), serde_json::json!(v));
    }
    serde_json::Value::Object(obj)
}

/// Builds the report from the stats of a run: production measured over `measured`,
/// consumption over `consume_window`. A catch-up reads the warmup's messages in its window
/// too, so its consume figures count every message read. `host_cpu` is where each CPU's time
/// went from the end of the warmup to the end of the run.
pub fn build(
    args: &Args,
    stats: &Stats,
    measured: Duration,
    consume_window: Duration,
    extra_errors: u64,
    host_cpu: &[CpuShare],
    broker: &BrokerFigures,
) -> Report {
    let secs = measured.as_secs_f64().max(1e-9);
    let consume_secs = consume_window.as_secs_f64().max(1e-9);
    let errors = stats.errors.get() + extra_errors;
    let (consumed, consumed_bytes) = if args.catch_up {
        (stats.consumed_total.get(), stats.consumed_total_bytes.get())
    } else {
        (stats.consumed.get(), stats.consumed_bytes.get())
    };
    let json = serde_json::json!({
        "config": args,
        "produce": {
            "messages": stats.produced.get(),
            "bytes": stats.produced_bytes.get(),
            "msgs_per_sec": stats.produced.get() as f64 / secs,
            "mb_per_sec": stats.produced_bytes.get() as f64 / 1e6 / secs,
            "wire_bytes": stats.produced_wire_bytes.get(),
            "wire_mb_per_sec": stats.produced_wire_bytes.get() as f64 / 1e6 / secs,
            "ack_latency_us": latency_json(&stats.ack_latency.borrow()),
        },
        "consume": {
            "messages": consumed,
            "msgs_per_sec": consumed as f64 / consume_secs,
            "mb_per_sec": consumed_bytes as f64 / 1e6 / consume_secs,
        },
        "e2e_latency_us": latency_json(&stats.e2e_latency.borrow()),
        "send_lag_us": latency_json(&stats.send_lag.borrow()),
        "host": {
            "cpus": host_cpu,
            "max_steal_pct": host::max_steal(host_cpu),
        },
        "broker": {
            "flushes": broker.flushes,
            "slow_flushes": broker.slow_flushes,
            "flush_max_ms": broker.flush_max_us as f64 / 1000.0,
            "sync_max_ms": broker.sync_max_us as f64 / 1000.0,
            "write_max_ms": broker.write_max_us as f64 / 1000.0,
        },
        "disk": {
            "bytes": broker.disk_bytes,
            "payload_bytes": stats.acked_total.get() * args.message_size as u64,
        },
        "errors": errors,
    });
    Report { json, errors }
}

fn row(name: &str, h: &hdrhistogram::Histogram<u64>) -> String {
    let ms = |us: u64| format!("{:.3}", us as f64 / 1000.0);
    let p = percentiles(h);
    format!(
        "{name:<22} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
        ms(p[0].1),
        ms(p[1].1),
        ms(p[2].1),
        ms(p[3].1),
        ms(p[4].1),
        ms(p[5].1)
    )
}

/// Prints the summary table on stdout.
pub fn print(report: &Report, stats: &Stats) {
    let j = &report.json;
    let f = |v: &serde_json::Value| v.as_f64().unwrap_or(0.0);
    println!();
    println!(
        "{:<22} {:>14} {:>14} {:>12}",
        "", "messages", "msgs/s", "MB/s"
    );
    println!(
        "{:<22} {:>14} {:>14.0} {:>12.1}",
        "produce (acked)",
        j["produce"]["messages"],
        f(&j["produce"]["msgs_per_sec"]),
        f(&j["produce"]["mb_per_sec"])
    );
    println!(
        "{:<22} {:>14} {:>14.0} {:>12.1}",
        "consume",
        j["consume"]["messages"],
        f(&j["consume"]["msgs_per_sec"]),
        f(&j["consume"]["mb_per_sec"])
    );
    println!(
        "{:<22} {:>14} {:>14} {:>12.1}",
        "produce on the wire",
        j["produce"]["wire_bytes"],
        "",
        f(&j["produce"]["wire_mb_per_sec"])
    );
    let (disk, payload) = (f(&j["disk"]["bytes"]), f(&j["disk"]["payload_bytes"]));
    println!(
        "on disk: {:.1} MB for {:.1} MB of payload acknowledged ({:.2} bytes per payload byte)",
        disk / 1e6,
        payload / 1e6,
        disk / payload.max(1.0)
    );
    let b = &j["broker"];
    println!(
        "broker flushes since it started: {} ({} over 10 ms); longest flush {:.1} ms, longest \
         write {:.1} ms, longest sync {:.1} ms",
        b["flushes"],
        b["slow_flushes"],
        f(&b["flush_max_ms"]),
        f(&b["write_max_ms"]),
        f(&b["sync_max_ms"])
    );
    println!();
    println!(
        "{:<22} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "latency (ms)", "p50", "p90", "p99", "p99.9", "p99.99", "max"
    );
    println!("{}", row("publish -> ack", &stats.ack_latency.borrow()));
    println!("{}", row("end to end", &stats.e2e_latency.borrow()));
    if !stats.send_lag.borrow().is_empty() {
        println!("{}", row("generator send lag", &stats.send_lag.borrow()));
    }
    println!();
    println!(
        "verified: {} acknowledged, {} consumed, errors {}",
        stats.acked_total.get(),
        stats.consumed_total.get(),
        report.errors
    );
    for e in stats.error_samples.borrow().iter() {
        println!("  error: {e}");
    }
    print_host(&j["host"]);
}

/// One line on where the machine's CPU time went, and a warning when the hypervisor took a
/// share large enough to spoil comparisons.
fn print_host(host: &serde_json::Value) {
    let Some(cpus) = host["cpus"].as_array().filter(|c| !c.is_empty()) else {
        return;
    };
    let f = |v: &serde_json::Value| v.as_f64().unwrap_or(0.0);
    let parts: Vec<String> = cpus
        .iter()
        .map(|c| {
            format!(
                "cpu{} busy {:.0}% iowait {:.0}% steal {:.0}%",
                c["cpu"],
                f(&c["busy_pct"]),
                f(&c["iowait_pct"]),
                f(&c["steal_pct"])
            )
        })
        .collect();
    println!("host CPU after the warmup: {}", parts.join(" | "));
    let steal = f(&host["max_steal_pct"]);
    if steal >= STEAL_WARNING_PCT {
        println!(
            "warning: the hypervisor took {steal:.0}% of a CPU (steal) during this run: its \
             figures are not comparable with a run on quiet cores"
        );
    }
}
