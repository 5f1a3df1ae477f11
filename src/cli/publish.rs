//! `corebus publish`: each stdin line becomes one message (a CloudEvent: each gets a fresh
//! `id`, and the `--type`, `--subject`, `--source` and `--header` given).

use std::io::{BufRead, Write};
use std::process::ExitCode;
use std::rc::Rc;

use corebus::client::{Producer, ProducerOptions};
use corebus::clock::now_ms;
use corebus::placement::fnv1a_64;
use corebus::record::{Codec, RecordWriter};
use corebus::subscription::Nonces;
use futures::channel::oneshot;
use glommio::channels::local_channel;

use super::ClientArgs;

/// Lines read from stdin per blocking read at most.
const LINES_PER_READ: usize = 4096;

/// Options of `corebus publish`.
#[derive(clap::Args, Debug)]
pub struct PublishArgs {
    /// Topic to publish to.
    topic: String,
    /// Message key (also picks the partition by hash).
    #[arg(long)]
    key: Option<String>,
    /// Publish every message to this partition.
    #[arg(long)]
    partition: Option<u32>,
    /// Print `LINE PARTITION OFFSET` (0-based stdin line) for each acknowledged message.
    #[arg(long)]
    print_acks: bool,
    /// Records per batch at most.
    #[arg(long, default_value_t = 1000)]
    batch_records: u32,
    /// CloudEvents `type` of every message.
    #[arg(long = "type")]
    event_type: Option<String>,
    /// CloudEvents `subject` of every message.
    #[arg(long)]
    subject: Option<String>,
    /// CloudEvents `source` of every message.
    #[arg(long)]
    source: Option<String>,
    /// A header (CloudEvents extension attribute) of every message: KEY=VALUE; repeatable.
    #[arg(long = "header")]
    headers: Vec<String>,
    /// Codec of the batches sent: none, lz4 or zstd.
    #[arg(long, default_value = "none")]
    compression: Codec,
    /// Idempotent publishing: batches are numbered, and resent after a lost connection or a
    /// broker restart without being written twice. `off`: a resend may write a batch twice.
    #[arg(long, default_value = "on", value_parser = parse_on_off, action = clap::ArgAction::Set)]
    idempotence: bool,
    /// How long a batch is resent after failures that may pass (a lost connection, a broker
    /// restarting); 0: never.
    #[arg(long, default_value = "2m", value_parser = super::parse_millis)]
    delivery_timeout: u64,
    #[command(flatten)]
    client: ClientArgs,
}

/// Parses `on` / `off`.
pub fn parse_on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" => Ok(true),
        "off" => Ok(false),
        other => Err(format!("expected on or off, got '{other}'")),
    }
}

/// Reads whatever whole lines stdin has (at least one, or none at end of input), off the
/// executor so that acknowledgements keep flowing while stdin blocks.
async fn read_lines(mut lock: StdinReader) -> (StdinReader, Result<Vec<String>, String>) {
    glommio::executor()
        .spawn_blocking(move || {
            let mut lines = Vec::new();
            loop {
                let mut line = String::new();
                match lock.read_line(&mut line) {
                    Ok(0) => break,
                    Ok(_) => {
                        if line.ends_with('\n') {
                            line.pop();
                            if line.ends_with('\r') {
                                line.pop();
                            }
                        }
                        lines.push(line);
                    }
                    Err(e) => return (lock, Err(format!("reading stdin: {e}"))),
                }
                if lines.len() >= LINES_PER_READ || lock.buffer().is_empty() {
                    break;
                }
            }
            (lock, Ok(lines))
        })
        .await
}

/// Stdin with a buffer we can look into (to take only the lines already there).
type StdinReader = std::io::BufReader<std::io::Stdin>;

type AckReceiver = oneshot::Receiver<Result<u64, corebus::client::ClientError>>;

/// Longest CloudEvents attribute accepted (the record layout stores it with a u16 length).
const MAX_ATTRIBUTE_BYTES: usize = u16::MAX as usize;

/// A random (version 4) UUID: the CloudEvents `id` of a published message.
fn new_id(random: &mut Nonces) -> String {
    let (a, b) = (random.next_u64(), random.next_u64());
    let a = (a & !0xf000) | 0x4000; // version 4
    let b = (b & !(0xc << 60)) | (0x8 << 60); // RFC 4122 variant
    format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xffff,
        b >> 48,
        b & 0xffff_ffff_ffff
    )
}

/// Runs `corebus publish`.
pub async fn run(args: PublishArgs) -> Result<ExitCode, String> {
    let mut headers = Vec::with_capacity(args.headers.len());
    for h in &args.headers {
        let Some((k, v)) = h.split_once('=') else {
            return Err(format!("--header '{h}': expected KEY=VALUE"));
        };
        if k.is_empty() || k.len() > MAX_ATTRIBUTE_BYTES {
            return Err(format!(
                "--header '{h}': the key must be 1..={MAX_ATTRIBUTE_BYTES} bytes"
            ));
        }
        headers.push((k.as_bytes(), v.as_bytes()));
    }
    for (what, value) in [
        ("--type", &args.event_type),
        ("--subject", &args.subject),
        ("--source", &args.source),
    ] {
        if value
            .as_ref()
            .is_some_and(|v| v.len() > MAX_ATTRIBUTE_BYTES)
        {
            return Err(format!("{what} is longer than {MAX_ATTRIBUTE_BYTES} bytes"));
        }
    }
    let mut random = Nonces::new(u64::from(std::process::id()));
    let client = args.client.connect().await?;
    let partitions = client
        .partition_count(&args.topic)
        .await
        .map_err(|e| format!("topic '{}': {e}", args.topic))?;
    if partitions == 0 {
        return Err(format!("topic '{}' does not exist", args.topic));
    }
    if let Some(p) = args.partition {
        if p >= partitions {
            return Err(format!(
                "topic '{}' has {partitions} partitions; {p} does not exist",
                args.topic
            ));
        }
    }
    let options = ProducerOptions {
        batch_max_records: args.batch_records.max(1),
        compression: args.compression,
        idempotence: args.idempotence,
        delivery_timeout: std::time::Duration::from_millis(args.delivery_timeout),
        ..ProducerOptions::default()
    };
    let mut producer = Producer::new(Rc::clone(&client), &args.topic, options);
    let (to_printer, acks) = local_channel::new_bounded::<(u64, u32, AckReceiver)>(1 << 16);
    let print = args.print_acks;
    // Set on the first refused message: publishing stops instead of failing line after line.
    let broken = Rc::new(std::cell::Cell::new(false));
    let printer_broken = Rc::clone(&broken);
    let printer = glommio::spawn_local(async move {
        let mut failed = 0u64;
        let stdout = std::io::stdout();
        while let Some((line, partition, ack)) = acks.recv().await {
            match ack.await {
                Ok(Ok(offset)) if print => {
                    let mut out = stdout.lock();
                    let _ = writeln!(out, "{line} {partition} {offset}");
                    let _ = out.flush();
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    failed += 1;
                    printer_broken.set(true);
                    eprintln!("corebus: line {line} not acknowledged: {e}");
                }
                Err(_) => {
                    failed += 1;
                    printer_broken.set(true);
                    eprintln!("corebus: line {line} not acknowledged: request dropped");
                }
            }
        }
        failed
    });
    let key_partition = args
        .key
        .as_ref()
        .map(|k| (fnv1a_64(k.as_bytes()) % u64::from(partitions)) as u32);
    let mut line_no = 0u64;
    let mut stdin = StdinReader::with_capacity(1 << 16, std::io::stdin());
    while !broken.get() {
        let (reader, lines) = read_lines(stdin).await;
        stdin = reader;
        let lines = lines?;
        if lines.is_empty() {
            break;
        }
        for value in &lines {
            let partition = args
                .partition
                .or(key_partition)
                .unwrap_or((line_no % u64::from(partitions)) as u32);
            let id = new_id(&mut random);
            let record = RecordWriter {
                timestamp_ms: now_ms(),
                key: args.key.as_deref().map(str::as_bytes),
                value: value.as_bytes(),
                id: &id,
                source: args.source.as_deref().unwrap_or_default(),
                event_type: args.event_type.as_deref().unwrap_or_default(),
                subject: args.subject.as_deref().unwrap_or_default(),
                headers: &headers,
            };
            let ack = producer.send(partition, &record).await;
            if to_printer.send((line_no, partition, ack)).await.is_err() {
                return Err("acknowledgement printer stopped".into());
            }
            line_no += 1;
        }
        producer.flush().await;
    }
    producer.flush().await;
    drop(to_printer);
    let failed = printer.await;
    if failed > 0 {
        eprintln!(
            "corebus: {failed} of the {line_no} messages sent were not acknowledged; publishing stopped at the first"
        );
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}
