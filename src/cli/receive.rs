//! `corebus receive`: events of a subscription, each under a lock, and
//! `corebus ack|release|reject|renew`: settle them by lock token.

use std::io::{Read, Write};
use std::process::ExitCode;
use std::time::Duration;

use corebus::client::{ReceivedEvent, SettleAction};

use super::{parse_duration, ClientArgs};

/// Options of `corebus receive`.
#[derive(clap::Args, Debug)]
pub struct ReceiveArgs {
    /// Topic name.
    topic: String,
    /// Subscription name.
    name: String,
    /// Most events to receive.
    #[arg(long, default_value_t = 10)]
    max: u32,
    /// How long to wait for the first event when none is available.
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    wait: Duration,
    /// Output: `TOKEN DELIVERY_COUNT VALUE` lines, or one JSON object per event.
    #[arg(long, value_enum, default_value = "text")]
    format: Format,
    #[command(flatten)]
    client: ClientArgs,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    Text,
    Json,
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn to_json(e: &ReceivedEvent) -> Result<String, String> {
    let r = e
        .record()
        .map_err(|err| format!("event {}/{}: {err}", e.partition, e.offset))?;
    let headers: serde_json::Map<String, serde_json::Value> = r
        .headers()
        .map(|(k, v)| (lossy(k), serde_json::Value::String(lossy(v))))
        .collect();
    let obj = serde_json::json!({
        "lock_token": e.lock_token,
        "delivery_count": e.delivery_count,
        "locked_until": e.locked_until_ms,
        "partition": e.partition,
        "offset": e.offset,
        "id": lossy(r.id),
        "source": lossy(r.source),
        "type": lossy(r.event_type),
        "subject": lossy(r.subject),
        "time": r.timestamp_ms,
        "key": r.key.map(lossy),
        "value": lossy(r.value),
        "headers": headers,
    });
    Ok(obj.to_string())
}

/// Runs `corebus receive`.
pub async fn run_receive(args: ReceiveArgs) -> Result<ExitCode, String> {
    let client = args.client.connect().await?;
    let events = client
        .receive(&args.topic, &args.name, args.max, args.wait)
        .await
        .map_err(|e| format!("receiving from {}/{}: {e}", args.topic, args.name))?;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    for e in &events {
        let line = match args.format {
            Format::Json => to_json(e)?,
            Format::Text => {
                let value = e.record().map(|r| lossy(r.value)).unwrap_or_default();
                format!("{}\t{}\t{value}", e.lock_token, e.delivery_count)
            }
        };
        writeln!(out, "{line}").map_err(|e| format!("writing stdout: {e}"))?;
    }
    out.flush().map_err(|e| format!("writing stdout: {e}"))?;
    Ok(ExitCode::SUCCESS)
}

/// Options of `corebus ack|reject|renew`.
#[derive(clap::Args, Debug)]
pub struct SettleArgs {
    /// Topic name.
    topic: String,
    /// Subscription name.
    name: String,
    /// Lock tokens from `receive` (`-`: read them from stdin, whitespace-separated).
    #[arg(required = true)]
    tokens: Vec<String>,
    #[command(flatten)]
    client: ClientArgs,
}

/// Options of `corebus release`.
#[derive(clap::Args, Debug)]
pub struct ReleaseArgs {
    /// Deliver the events again only after this delay.
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    pub delay: Duration,
    #[command(flatten)]
    pub settle: SettleArgs,
}

/// Which settle subcommand.
#[derive(Clone, Copy, Debug)]
pub enum Verb {
    /// `ack`
    Ack,
    /// `release`
    Release(Duration),
    /// `reject`
    Reject,
    /// `renew`
    Renew,
}

fn tokens(args: &[String]) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    for t in args {
        if t == "-" {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .map_err(|e| format!("reading tokens from stdin: {e}"))?;
            out.extend(text.split_whitespace().map(str::to_string));
        } else {
            out.push(t.clone());
        }
    }
    Ok(out)
}

/// Runs `corebus ack|release|reject|renew`: one line per token, `TOKEN ok` (renew: with the
/// new lock end) or `TOKEN failed CODE: MESSAGE`. Fails if any token failed.
pub async fn run_settle(verb: Verb, args: SettleArgs) -> Result<ExitCode, String> {
    let client = args.client.connect().await?;
    let tokens = tokens(&args.tokens)?;
    let action = match verb {
        Verb::Ack => SettleAction::Ack,
        Verb::Release(delay) => SettleAction::Release(
            u32::try_from(delay.as_millis()).map_err(|_| "--delay is too long".to_string())?,
        ),
        Verb::Reject => SettleAction::Reject,
        Verb::Renew => SettleAction::Renew,
    };
    let results = client
        .settle(&args.topic, &args.name, action, &tokens)
        .await
        .map_err(|e| format!("settling on {}/{}: {e}", args.topic, args.name))?;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut failed = 0usize;
    for (token, result) in tokens.iter().zip(results) {
        let line = match result {
            Ok(Some(until)) => format!("{token}\tok\tlocked-until={until}"),
            Ok(None) => format!("{token}\tok"),
            Err(e) => {
                failed += 1;
                format!("{token}\tfailed\t{e}")
            }
        };
        writeln!(out, "{line}").map_err(|e| format!("writing stdout: {e}"))?;
    }
    out.flush().map_err(|e| format!("writing stdout: {e}"))?;
    if failed > 0 {
        eprintln!("corebus: {failed} of {} tokens failed", tokens.len());
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}
