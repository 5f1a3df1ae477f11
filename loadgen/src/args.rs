//! Command-line options of corebus-loadgen.

use std::time::Duration;

use corebus::record::Codec;
use corebus::storage::{Durability, GroupCommit};
use corebus::units::parse_duration;

use crate::payload::PayloadKind;

/// Options of a produce/consume run.
#[derive(clap::Args, Debug, Clone, serde::Serialize)]
pub struct Args {
    /// Broker to load; without it an embedded broker is started.
    #[arg(long, conflicts_with = "embedded")]
    pub addr: Option<String>,
    /// Start a broker in this process on a temporary data dir (the default without --addr).
    #[arg(long)]
    pub embedded: bool,
    /// Data directory of the embedded broker (default: a fresh directory under $TMPDIR, or the
    /// current directory if $TMPDIR is tmpfs); removed afterwards.
    #[arg(long)]
    pub data_dir: Option<std::path::PathBuf>,
    /// Topic (created if missing).
    #[arg(long)]
    pub topic: Option<String>,
    /// Partitions of the topic when it is created.
    #[arg(long, default_value_t = 4)]
    pub partitions: u32,
    /// Producer tasks.
    #[arg(long, default_value_t = 1)]
    pub producers: u32,
    /// Consumer tasks (0: produce only).
    #[arg(long, default_value_t = 1)]
    pub consumers: u32,
    /// Bytes per message value.
    #[arg(long, default_value_t = 1024)]
    pub message_size: usize,
    /// Bytes per produced batch.
    #[arg(long, default_value_t = 1 << 20)]
    pub batch_bytes: usize,
    /// Produce requests in flight per producer (closed loop).
    #[arg(long, default_value_t = 4)]
    pub in_flight: usize,
    /// Measured time.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    #[serde(serialize_with = "ser_duration")]
    pub duration: Duration,
    /// Time before measuring starts (its messages are still verified).
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    #[serde(serialize_with = "ser_duration")]
    pub warmup: Duration,
    /// Open loop: this many messages per second in total, latency measured from each
    /// message's intended send time (coordinated-omission correct). Default: closed loop.
    #[arg(long)]
    pub rate: Option<u64>,
    /// Open loop: a message due is held up to this long so that the messages due meanwhile
    /// go in the same batch, as a producer's linger does (0: send at once). Its wait counts in
    /// the latency; it bounds requests to about 1/linger per second per producer.
    #[arg(long, default_value = "100us", value_parser = parse_duration)]
    #[serde(serialize_with = "ser_duration_us")]
    pub linger: Duration,
    /// Durability of the embedded broker.
    #[arg(long, value_enum, default_value = "sync")]
    #[serde(serialize_with = "ser_durability")]
    pub durability: Durability,
    /// In-memory tail of the embedded broker's partitions, in bytes (per partition and per
    /// shard): large enough to hold a whole `--catch-up` run, it measures consuming from memory.
    #[arg(long, value_parser = corebus::units::parse_bytes)]
    pub broker_cache_bytes: Option<u64>,
    /// Group commit of the embedded broker (default: the broker's, `shared-flush`).
    #[arg(long, value_enum)]
    #[serde(serialize_with = "ser_group_commit")]
    pub broker_group_commit: Option<GroupCommit>,
    /// CPU for the load generator.
    #[arg(long)]
    pub cpu: Option<usize>,
    /// CPU for the embedded broker.
    #[arg(long)]
    pub broker_cpu: Option<usize>,
    /// How long the generator's core keeps polling for work before it sleeps. Its wake-ups
    /// added 0.1-1.2 ms to the measured open-loop ack p50 on the development VM. Default:
    /// 10ms when the generator has a core of its own (`--cpu`, and not the embedded broker's
    /// `--broker-cpu`), else 0.
    #[arg(long, value_parser = parse_duration)]
    #[serde(serialize_with = "ser_opt_duration_us")]
    pub spin: Option<Duration>,
    /// Consumers start only after the producers finished and read the whole backlog: most of
    /// it from disk (older than the in-memory tail); consume rates are over that catch-up.
    #[arg(long)]
    pub catch_up: bool,
    /// Write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
    /// Codec of the batches the producers send: none, lz4 or zstd.
    #[arg(long, default_value = "none", value_parser = parse_codec)]
    pub compression: String,
    /// Idempotent producers (`InitProducer`, numbered batches); `off` sends plain batches.
    #[arg(long, default_value = "on", value_parser = parse_on_off, action = clap::ArgAction::Set)]
    pub idempotence: bool,
    /// What the messages hold: `random` (a checkable pattern that does not compress) or
    /// `json` (JSON events generated from a fixed seed, about as compressible as real ones).
    #[arg(long, value_enum, default_value = "random")]
    #[serde(serialize_with = "ser_payload")]
    pub payload: PayloadKind,
}

fn ser_payload<S: serde::Serializer>(p: &PayloadKind, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(match p {
        PayloadKind::Random => "random",
        PayloadKind::Json => "json",
    })
}

fn parse_codec(s: &str) -> Result<String, String> {
    s.parse::<Codec>().map(|c| c.name().to_string())
}

fn parse_on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" => Ok(true),
        "off" => Ok(false),
        other => Err(format!("expected on or off, got '{other}'")),
    }
}

fn ser_duration<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{}ms", d.as_millis()))
}

fn ser_duration_us<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{}us", d.as_micros()))
}

fn ser_opt_duration_us<S: serde::Serializer>(
    d: &Option<Duration>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => ser_duration_us(d, s),
        None => s.serialize_none(),
    }
}

fn ser_group_commit<S: serde::Serializer>(
    g: &Option<GroupCommit>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match g {
        Some(g) => s.serialize_str(g.as_str()),
        None => s.serialize_none(),
    }
}

fn ser_durability<S: serde::Serializer>(d: &Durability, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(d.as_str())
}

/// The generator's default `--spin` when it has a core of its own.
const OWN_CORE_SPIN: Duration = Duration::from_millis(10);

impl Args {
    /// The codec of `--compression`.
    pub fn codec(&self) -> Codec {
        self.compression.parse().unwrap_or_default()
    }

    /// The `--spin` to use: as given, else [`OWN_CORE_SPIN`] when the generator is pinned to a
    /// core that the embedded broker does not use, else none (polling would take the core
    /// from whatever shares it).
    pub fn resolved_spin(&self) -> Duration {
        self.spin.unwrap_or(match self.cpu {
            Some(cpu) if !self.embedded || self.broker_cpu != Some(cpu) => OWN_CORE_SPIN,
            _ => Duration::ZERO,
        })
    }

    /// Checks the options.
    pub fn validate(&self) -> Result<(), String> {
        if self.message_size < crate::payload::HEADER_BYTES {
            return Err(format!(
                "--message-size must be at least {}",
                crate::payload::HEADER_BYTES
            ));
        }
        if self.payload == PayloadKind::Json && self.message_size < crate::payload::MIN_JSON_BYTES {
            return Err(format!(
                "--payload json needs --message-size of at least {}",
                crate::payload::MIN_JSON_BYTES
            ));
        }
        if self.producers == 0 || self.partitions == 0 || self.in_flight == 0 {
            return Err("--producers, --partitions and --in-flight must be at least 1".into());
        }
        if self.batch_bytes < self.message_size {
            return Err("--batch-bytes must hold at least one message".into());
        }
        if self.rate == Some(0) {
            return Err("--rate must be positive".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    fn spin_of(argv: &[&str], embedded: bool) -> Duration {
        let mut args = Cli::parse_from(std::iter::once("loadgen").chain(argv.iter().copied())).args;
        args.embedded = embedded;
        args.resolved_spin()
    }

    #[test]
    fn the_generator_polls_only_on_a_core_of_its_own_unless_told() {
        assert_eq!(spin_of(&[], true), Duration::ZERO);
        assert_eq!(
            spin_of(&["--cpu", "1", "--broker-cpu", "0"], true),
            OWN_CORE_SPIN
        );
        assert_eq!(
            spin_of(&["--cpu", "0", "--broker-cpu", "0"], true),
            Duration::ZERO
        );
        assert_eq!(spin_of(&["--cpu", "1"], false), OWN_CORE_SPIN);
        let explicit = ["--cpu", "1", "--spin", "250us"];
        assert_eq!(spin_of(&explicit, false), Duration::from_micros(250));
        assert_eq!(
            spin_of(&["--spin", "0s", "--cpu", "1"], false),
            Duration::ZERO
        );
    }
}
