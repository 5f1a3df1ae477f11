//! `corebus stats`: a human-readable summary of the broker's figures: throughput per topic
//! (measured over an interval), disk use, shards.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use super::{parse_duration, ClientArgs};

/// Options of `corebus stats`.
#[derive(clap::Args, Debug)]
pub struct StatsArgs {
    /// Interval over which throughput is measured.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    interval: Duration,
    #[command(flatten)]
    client: ClientArgs,
}

#[derive(Default)]
struct TopicTotals {
    partitions: u32,
    messages_in: u64,
    bytes_in: u64,
    messages_out: u64,
    bytes_out: u64,
    size_bytes: u64,
    segments: u32,
    messages_stored: u64,
}

fn totals(stats: &corebus::client::Stats) -> BTreeMap<String, TopicTotals> {
    let mut by_topic: BTreeMap<String, TopicTotals> = BTreeMap::new();
    for p in &stats.partitions {
        let t = by_topic.entry(p.topic.clone()).or_default();
        t.partitions += 1;
        t.messages_in += p.messages_in;
        t.bytes_in += p.bytes_in;
        t.messages_out += p.messages_out;
        t.bytes_out += p.bytes_out;
        t.size_bytes += p.size_bytes;
        t.segments += p.segments;
        t.messages_stored += p.high_watermark - p.log_start_offset;
    }
    by_topic
}

fn mib(bytes: f64) -> String {
    format!("{:.1}", bytes / (1024.0 * 1024.0))
}

/// Runs `corebus stats`.
pub async fn run(args: StatsArgs) -> Result<ExitCode, String> {
    let client = args.client.connect().await?;
    let first = client.stats().await.map_err(|e| e.to_string())?;
    let started = Instant::now();
    glommio::timer::sleep(args.interval).await;
    let second = client.stats().await.map_err(|e| e.to_string())?;
    let secs = started.elapsed().as_secs_f64().max(1e-9);
    let (before, after) = (totals(&first), totals(&second));
    println!(
        "{:<24} {:>5} {:>12} {:>10} {:>12} {:>10} {:>12} {:>10} {:>9}",
        "TOPIC",
        "PARTS",
        "IN msg/s",
        "IN MiB/s",
        "OUT msg/s",
        "OUT MiB/s",
        "STORED msgs",
        "DISK MiB",
        "SEGMENTS"
    );
    for (topic, now) in &after {
        let was = before.get(topic);
        let rate =
            |now: u64, was: Option<u64>| (now.saturating_sub(was.unwrap_or(now))) as f64 / secs;
        println!(
            "{:<24} {:>5} {:>12.0} {:>10} {:>12.0} {:>10} {:>12} {:>10} {:>9}",
            topic,
            now.partitions,
            rate(now.messages_in, was.map(|w| w.messages_in)),
            mib(rate(now.bytes_in, was.map(|w| w.bytes_in))),
            rate(now.messages_out, was.map(|w| w.messages_out)),
            mib(rate(now.bytes_out, was.map(|w| w.bytes_out))),
            now.messages_stored,
            mib(now.size_bytes as f64),
            now.segments
        );
    }
    println!();
    println!(
        "{:<6} {:>12} {:>18} {:>10} {:>14} {:>14} {:>13}",
        "SHARD",
        "CONNECTIONS",
        "REQUESTS IN FLIGHT",
        "FLUSHES",
        "OVER 10 MS",
        "MAX FLUSH MS",
        "MAX SYNC MS"
    );
    for s in &second.shards {
        println!(
            "{:<6} {:>12} {:>18} {:>10} {:>14} {:>14.1} {:>13.1}",
            s.shard,
            s.connections,
            s.requests_in_flight,
            s.flushes,
            s.slow_flushes,
            s.flush_max_us as f64 / 1000.0,
            s.sync_max_us as f64 / 1000.0
        );
    }
    Ok(ExitCode::SUCCESS)
}
