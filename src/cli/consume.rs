//! `corebus consume`: print a topic's messages, one per line. With `--group`, start where the
//! consumer group left off and commit its offsets as messages are printed.

use std::io::Write;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use corebus::client::{Client, ClientError};
use corebus::record::{BatchIter, Decompressor, Record};
use futures::future::join_all;

use super::{parse_duration, ClientArgs};

/// Bytes asked per fetch.
const FETCH_MAX_BYTES: u32 = 1 << 20;

/// Options of `corebus consume`.
#[derive(clap::Args, Debug)]
pub struct ConsumeArgs {
    /// Topic to read.
    topic: String,
    /// Read only this partition (default: all).
    #[arg(long)]
    partition: Option<u32>,
    /// Where to start: earliest, latest, or an offset.
    #[arg(long, default_value = "earliest")]
    from: String,
    /// Stop after this many messages.
    #[arg(long)]
    count: Option<u64>,
    /// Stop after this long without a new message.
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    idle_timeout: Duration,
    /// Output: raw values, or one JSON object per message.
    #[arg(long, value_enum, default_value = "raw")]
    format: Format,
    /// Consumer group: resume from its committed offsets (partitions without one start at
    /// --from) and commit after each printed batch.
    #[arg(long)]
    group: Option<String>,
    #[command(flatten)]
    client: ClientArgs,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    Raw,
    Json,
}

enum Start {
    Earliest,
    Latest,
    Offset(u64),
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn to_json(partition: u32, offset: u64, r: &Record<'_>) -> String {
    let headers: serde_json::Map<String, serde_json::Value> = r
        .headers()
        .map(|(k, v)| (lossy(k), serde_json::Value::String(lossy(v))))
        .collect();
    let mut obj = serde_json::json!({
        "partition": partition,
        "offset": offset,
        "key": r.key.map(lossy),
        "value": lossy(r.value),
        "timestamp": r.timestamp_ms,
        "headers": headers,
    });
    for (name, value) in [
        ("id", r.id),
        ("source", r.source),
        ("type", r.event_type),
        ("subject", r.subject),
    ] {
        if !value.is_empty() {
            obj[name] = serde_json::Value::String(lossy(value));
        }
    }
    obj.to_string()
}

/// The first offset to read in one partition.
async fn start_offset(
    client: &Client,
    topic: &str,
    partition: u32,
    start: &Start,
) -> Result<u64, String> {
    let probe = match start {
        Start::Earliest => 0,
        Start::Latest => u64::MAX,
        Start::Offset(o) => *o,
    };
    match client.fetch(topic, partition, probe, 1, 0).await {
        Ok(_) => Ok(probe),
        Err(ClientError::OffsetOutOfRange {
            log_start_offset,
            high_watermark,
            ..
        }) => Ok(match start {
            Start::Earliest => log_start_offset,
            Start::Latest => high_watermark,
            Start::Offset(o) => {
                return Err(format!(
                    "offset {o} is out of range for {topic}/{partition}: [{log_start_offset}, {high_watermark})"
                ))
            }
        }),
        Err(e) => Err(format!("{topic}/{partition}: {e}")),
    }
}

/// Runs `corebus consume`.
pub async fn run(args: ConsumeArgs) -> Result<ExitCode, String> {
    let client = args.client.connect().await?;
    let start = match args.from.as_str() {
        "earliest" => Start::Earliest,
        "latest" => Start::Latest,
        n => Start::Offset(
            n.parse()
                .map_err(|_| format!("--from must be earliest, latest or an offset, got '{n}'"))?,
        ),
    };
    let count = client
        .partition_count(&args.topic)
        .await
        .map_err(|e| format!("topic '{}': {e}", args.topic))?;
    let partitions: Vec<u32> = match args.partition {
        Some(p) if p < count => vec![p],
        Some(p) => {
            return Err(format!(
                "topic '{}' has {count} partitions; {p} does not exist",
                args.topic
            ))
        }
        None => (0..count).collect(),
    };
    let committed: std::collections::HashMap<u32, u64> = match &args.group {
        Some(group) => client
            .fetch_offsets(group, &args.topic, &partitions)
            .await
            .map_err(|e| format!("reading offsets of group '{group}': {e}"))?
            .into_iter()
            .map(|(p, r)| {
                r.map(|o| o.map(|o| (p, o)))
                    .map_err(|e| format!("offset of group '{group}' on {}/{p}: {e}", args.topic))
            })
            .collect::<Result<Vec<_>, String>>()?
            .into_iter()
            .flatten()
            .collect(),
        None => std::collections::HashMap::new(),
    };
    let mut next = Vec::with_capacity(partitions.len());
    for &p in &partitions {
        let offset = match committed.get(&p) {
            // A committed offset outside the log (retention moved on) resumes at its nearest end.
            Some(&o) => match start_offset(&client, &args.topic, p, &Start::Offset(o)).await {
                Ok(o) => o,
                Err(_) => {
                    let earliest = start_offset(&client, &args.topic, p, &Start::Earliest).await?;
                    let latest = start_offset(&client, &args.topic, p, &Start::Latest).await?;
                    o.clamp(earliest, latest.max(earliest))
                }
            },
            None => start_offset(&client, &args.topic, p, &start).await?,
        };
        next.push(offset);
    }
    let mut committed_next = next.clone();
    let limit = args.count.unwrap_or(u64::MAX);
    let mut printed = 0u64;
    let mut last_message = Instant::now();
    let poll_ms = args.idle_timeout.as_millis().clamp(1, 500) as u32;
    let stdout = std::io::stdout();
    let mut decompressor = Decompressor::new();
    while printed < limit {
        let fetches = partitions
            .iter()
            .zip(&next)
            .map(|(&p, &offset)| client.fetch(&args.topic, p, offset, FETCH_MAX_BYTES, poll_ms));
        let results = join_all(fetches).await;
        let mut out = stdout.lock();
        let mut got_any = false;
        for (i, result) in results.into_iter().enumerate() {
            let partition = partitions[i];
            let fetched = result.map_err(|e| format!("{}/{partition}: {e}", args.topic))?;
            for batch in BatchIter::new(&fetched.batches) {
                let batch =
                    batch.map_err(|e| format!("{}/{partition}: bad batch: {e}", args.topic))?;
                let base = batch.header().base_offset();
                let records = batch
                    .records(&mut decompressor)
                    .map_err(|e| format!("{}/{partition}: bad batch: {e}", args.topic))?;
                for record in records {
                    let record = record.map_err(|e| format!("{}/{partition}: {e}", args.topic))?;
                    let offset = base + u64::from(record.offset_delta);
                    if offset < next[i] || printed >= limit {
                        continue;
                    }
                    let line = match args.format {
                        Format::Raw => lossy(record.value),
                        Format::Json => to_json(partition, offset, &record),
                    };
                    writeln!(out, "{line}").map_err(|e| format!("writing stdout: {e}"))?;
                    printed += 1;
                    got_any = true;
                    next[i] = offset + 1;
                }
            }
        }
        out.flush().map_err(|e| format!("writing stdout: {e}"))?;
        drop(out);
        if let Some(group) = &args.group {
            // Commit only after the messages are written out: at-least-once.
            let moved: Vec<(u32, u64)> = partitions
                .iter()
                .zip(next.iter().zip(&committed_next))
                .filter(|(_, (n, c))| n != c)
                .map(|(&p, (&n, _))| (p, n))
                .collect();
            if !moved.is_empty() {
                let results = client
                    .commit_offsets(group, &args.topic, &moved)
                    .await
                    .map_err(|e| format!("committing offsets of group '{group}': {e}"))?;
                for (p, r) in results {
                    r.map_err(|e| {
                        format!("committing {}/{p} for group '{group}': {e}", args.topic)
                    })?;
                }
                committed_next.clone_from(&next);
            }
        }
        if got_any {
            last_message = Instant::now();
        } else if last_message.elapsed() >= args.idle_timeout {
            break;
        }
    }
    Ok(ExitCode::SUCCESS)
}
