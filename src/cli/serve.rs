//! `corebus serve`: run the broker.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use corebus::broker::{self, BrokerConfig};
use corebus::storage::Durability;

/// Options of `corebus serve`.
#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// Directory for topics, logs and the superblock (created if missing).
    #[arg(long, default_value = "./corebus-data")]
    data_dir: PathBuf,
    /// Public address; shard i also listens on port+1+i.
    #[arg(long, default_value = "127.0.0.1:7070")]
    listen: SocketAddr,
    /// Number of shards (one pinned executor each); defaults to the number of CPUs.
    #[arg(long)]
    shards: Option<usize>,
    /// Pin shards to these CPUs, one per shard (e.g. 0,1); default: spread over all CPUs.
    #[arg(long, value_delimiter = ',')]
    cpus: Option<Vec<usize>>,
    /// When produces are acknowledged.
    #[arg(long, value_enum, default_value = "sync")]
    durability: Durability,
    /// Largest accepted frame, in bytes.
    #[arg(long, default_value_t = corebus::protocol::DEFAULT_MAX_FRAME_BYTES)]
    max_frame_bytes: usize,
    /// Requests one connection may have in flight before the broker stops reading from it.
    #[arg(long, default_value_t = 256)]
    max_inflight_per_connection: usize,
    /// DMA buffer pool per shard, in MiB (glommio io_memory).
    #[arg(long, default_value_t = 64)]
    io_memory_mib: usize,
    /// Recent data kept in memory per partition for readers, in MiB.
    #[arg(long, default_value_t = 8)]
    cache_mib_per_partition: usize,
    /// Roll a segment when it would grow past this size (e.g. 1GiB).
    #[arg(long, default_value = "1GiB", value_parser = super::parse_bytes)]
    segment_bytes: u64,
    /// Roll a segment when its first batch is older than this (e.g. 7d); default: never.
    #[arg(long, value_parser = super::parse_millis)]
    segment_ms: Option<u64>,
    /// Preallocate segment files in steps of this size.
    #[arg(long, default_value = "32MiB", value_parser = super::parse_bytes)]
    preallocate_bytes: u64,
    /// Default retention by age for topics without their own (e.g. 7d); default: forever.
    #[arg(long, value_parser = super::parse_millis)]
    retention_ms: Option<u64>,
    /// Default retention by size per partition (e.g. 100GiB); default: unlimited.
    #[arg(long, value_parser = super::parse_bytes)]
    retention_bytes: Option<u64>,
    /// How often retention is enforced.
    #[arg(long, default_value = "5s", value_parser = super::parse_millis)]
    retention_check_interval: u64,
    /// How often each log checkpoints its durable point and index.
    #[arg(long, default_value = "1s", value_parser = super::parse_millis)]
    checkpoint_interval: u64,
    /// How often each shard applies expired locks and release delays and sends dead letters.
    #[arg(long, default_value = "50ms", value_parser = super::parse_millis)]
    subscription_sweep_interval: u64,
    /// Most subscriptions one topic may have.
    #[arg(long, default_value_t = 100)]
    max_subscriptions_per_topic: usize,
    /// A subscription locks no new events of a partition while this many are unsettled there.
    #[arg(long, default_value_t = 100_000)]
    max_unsettled_per_partition: usize,
}

/// Runs the broker until SIGTERM or SIGINT.
pub fn run(args: ServeArgs) -> Result<ExitCode, String> {
    let mut config = BrokerConfig::new(args.data_dir, args.listen);
    config.shards = args
        .shards
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, usize::from));
    config.cpus = args.cpus;
    if let Some(cpus) = &config.cpus {
        if args.shards.is_none() {
            config.shards = cpus.len();
        }
    }
    config.durability = args.durability;
    config.max_frame_bytes = args.max_frame_bytes;
    config.max_inflight_per_connection = args.max_inflight_per_connection;
    config.io_memory_bytes = args.io_memory_mib << 20;
    config.cache_bytes_per_partition = args.cache_mib_per_partition << 20;
    config.segment_bytes = args.segment_bytes;
    config.segment_ms = args.segment_ms;
    config.preallocate_bytes = args.preallocate_bytes;
    config.retention_ms = args.retention_ms;
    config.retention_bytes = args.retention_bytes;
    config.retention_check_ms = args.retention_check_interval;
    config.checkpoint_interval_ms = args.checkpoint_interval;
    config.subscription_sweep_ms = args.subscription_sweep_interval;
    config.max_subscriptions_per_topic = args.max_subscriptions_per_topic;
    config.max_unsettled_per_partition = args.max_unsettled_per_partition.max(1);
    broker::run(config)?;
    Ok(ExitCode::SUCCESS)
}
