//! `corebus serve`: run the broker. Settings come from the defaults, then the TOML file given
//! with `--config`, then the command line: each later source overrides the earlier ones.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use corebus::broker::{self, BrokerConfig};
use corebus::storage::{Durability, GroupCommit};

use super::config_file;
use super::{parse_bytes, parse_millis};

/// Options of `corebus serve`. Every one may also be set in the `--config` file under the
/// same name with `_` for `-` (see `corebus config example`).
#[derive(clap::Args, Debug, Default)]
pub struct ServeArgs {
    /// TOML file with settings; flags given here override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Directory for topics, logs and the superblock [default: ./corebus-data].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Public address; shard i also listens on port+1+i [default: 127.0.0.1:7070].
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9464).
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// Number of shards, one pinned executor each [default: number of CPUs].
    #[arg(long)]
    shards: Option<usize>,
    /// Pin shards to these CPUs, one per shard (e.g. 0,1).
    #[arg(long, value_delimiter = ',')]
    cpus: Option<Vec<usize>>,
    /// When produces are acknowledged [default: sync].
    #[arg(long, value_enum)]
    durability: Option<Durability>,
    /// Largest accepted frame [default: 16MiB].
    #[arg(long, value_parser = parse_bytes)]
    max_frame_bytes: Option<u64>,
    /// Largest record batch accepted [default: 16MiB].
    #[arg(long, value_parser = parse_bytes)]
    max_batch_bytes: Option<u64>,
    /// Most records in one batch [default: 100000].
    #[arg(long)]
    max_batch_records: Option<u32>,
    /// Requests one connection may have in flight before the broker stops reading [default: 256].
    #[arg(long)]
    max_inflight_per_connection: Option<usize>,
    /// Bytes of requests one connection may have in flight [default: 64MiB].
    #[arg(long, value_parser = parse_bytes)]
    max_buffered_bytes_per_connection: Option<u64>,
    /// Connections one shard serves at once; more are closed on accept [default: 10000].
    #[arg(long)]
    max_connections_per_shard: Option<usize>,
    /// Connections the broker serves at once, over all shards [default: 50000].
    #[arg(long)]
    max_connections: Option<usize>,
    /// Close connections idle this long [default: 10m].
    #[arg(long, value_parser = parse_millis)]
    idle_timeout: Option<u64>,
    /// Time a client has to send a whole frame, and to take a reply [default: 30s].
    #[arg(long, value_parser = parse_millis)]
    frame_timeout: Option<u64>,
    /// Most topics [default: 10000].
    #[arg(long)]
    max_topics: Option<usize>,
    /// Most partitions over all topics [default: 100000].
    #[arg(long)]
    max_partitions_total: Option<u64>,
    /// Most partitions in one topic [default: 10000].
    #[arg(long)]
    max_partitions_per_topic: Option<u32>,
    /// DMA buffer pool per shard (glommio io_memory) [default: 64MiB].
    #[arg(long, value_parser = parse_bytes)]
    io_memory: Option<u64>,
    /// Recent data kept in memory per partition for readers [default: 8MiB].
    #[arg(long, value_parser = parse_bytes)]
    cache_bytes_per_partition: Option<u64>,
    /// Recent data kept in memory over all of a shard's partitions, at most [default: 128MiB].
    #[arg(long, value_parser = parse_bytes)]
    cache_bytes_per_shard: Option<u64>,
    /// Roll a segment when it would grow past this size [default: 1GiB].
    #[arg(long, value_parser = parse_bytes)]
    segment_bytes: Option<u64>,
    /// Roll a segment when its first batch is older than this [default: never].
    #[arg(long, value_parser = parse_millis)]
    segment_age: Option<u64>,
    /// Preallocate segment files in steps of this size [default: 32MiB].
    #[arg(long, value_parser = parse_bytes)]
    preallocate_bytes: Option<u64>,
    /// What a durable flush syncs: `shared-flush` (flushes that only overwrite prewritten,
    /// committed blocks share one disk cache flush per shard; others fdatasync their file;
    /// ext4 and XFS), `partition` (each flush fdatasyncs its file) or `syncfs` (one syncfs of
    /// the data disk serves all of a shard's partitions; for a disk given to corebus)
    /// [default: shared-flush].
    #[arg(long, value_enum)]
    group_commit: Option<GroupCommit>,
    /// Zero-fill this far ahead of a partition's end so that small flushes overwrite written
    /// blocks (cheaper fdatasync); 0 turns it off [default: 8MiB].
    #[arg(long, value_parser = parse_bytes)]
    prewrite_bytes: Option<u64>,
    /// Most bytes all of a shard's partitions keep zero-filled ahead together [default: 256MiB].
    #[arg(long, value_parser = parse_bytes)]
    prewrite_budget_bytes: Option<u64>,
    /// Partitions whose flushes write at least this much do not zero-fill ahead [default: 512KiB].
    #[arg(long, value_parser = parse_bytes)]
    prewrite_max_flush_bytes: Option<u64>,
    /// Default retention by age for topics without their own [default: forever].
    #[arg(long, value_parser = parse_millis)]
    retention_ms: Option<u64>,
    /// Default retention by size per partition [default: unlimited].
    #[arg(long, value_parser = parse_bytes)]
    retention_bytes: Option<u64>,
    /// How often retention is enforced [default: 5s].
    #[arg(long, value_parser = parse_millis)]
    retention_check_interval: Option<u64>,
    /// How often each log checkpoints its durable point and index [default: 1s].
    #[arg(long, value_parser = parse_millis)]
    checkpoint_interval: Option<u64>,
    /// Most bytes one fetch returns [default: 8MiB].
    #[arg(long, value_parser = parse_bytes)]
    max_fetch_bytes: Option<u64>,
    /// Longest a fetch may wait for data [default: 60s].
    #[arg(long, value_parser = parse_millis)]
    max_fetch_wait: Option<u64>,
    /// How often each shard applies expired locks and release delays and sends dead letters [default: 50ms].
    #[arg(long, value_parser = parse_millis)]
    subscription_sweep_interval: Option<u64>,
    /// Most subscriptions one topic may have [default: 100].
    #[arg(long)]
    max_subscriptions_per_topic: Option<usize>,
    /// A subscription locks no new events of a partition while this many are unsettled there [default: 100000].
    #[arg(long)]
    max_unsettled_per_partition: Option<usize>,
    /// Consumer groups with committed offsets one partition may hold [default: 10000].
    #[arg(long)]
    max_groups_per_partition: Option<usize>,
    /// Idempotent producers each partition remembers at most; the least recently seen go [default: 10000].
    #[arg(long)]
    max_producers_per_partition: Option<usize>,
    /// A partition forgets an idempotent producer idle this long [default: 1d].
    #[arg(long, value_parser = parse_millis)]
    producer_expiry: Option<u64>,
}

impl ServeArgs {
    /// Writes every setting given on the command line into `config`.
    fn apply(&self, config: &mut BrokerConfig) {
        macro_rules! set {
            ($field:ident => $($target:ident).+) => {
                if let Some(v) = self.$field.clone() {
                    config.$($target).+ = v.into();
                }
            };
            ($field:ident => $target:ident as $ty:ty) => {
                if let Some(v) = self.$field {
                    config.$target = v as $ty;
                }
            };
        }
        set!(data_dir => data_dir);
        set!(listen => listen);
        set!(shards => shards);
        set!(durability => durability);
        set!(max_frame_bytes => max_frame_bytes as usize);
        set!(max_batch_bytes => max_batch_bytes as usize);
        set!(max_batch_records => max_batch_records);
        set!(max_inflight_per_connection => max_inflight_per_connection);
        set!(max_buffered_bytes_per_connection => max_buffered_bytes_per_connection as usize);
        set!(max_connections_per_shard => max_connections_per_shard);
        set!(max_connections => max_connections);
        set!(idle_timeout => idle_timeout_ms);
        set!(frame_timeout => frame_timeout_ms);
        set!(max_topics => max_topics);
        set!(max_partitions_total => max_partitions_total);
        set!(max_partitions_per_topic => max_partitions_per_topic);
        set!(io_memory => io_memory_bytes as usize);
        set!(cache_bytes_per_partition => cache_bytes_per_partition as usize);
        set!(cache_bytes_per_shard => cache_bytes_per_shard as usize);
        set!(segment_bytes => segment_bytes);
        set!(preallocate_bytes => preallocate_bytes);
        set!(group_commit => group_commit);
        set!(prewrite_bytes => prewrite.ahead_bytes);
        set!(prewrite_budget_bytes => prewrite.shard_budget_bytes);
        set!(prewrite_max_flush_bytes => prewrite.max_flush_bytes);
        set!(retention_check_interval => retention_check_ms);
        set!(checkpoint_interval => checkpoint_interval_ms);
        set!(max_fetch_bytes => max_fetch_bytes as usize);
        set!(max_fetch_wait => max_fetch_wait_ms as u32);
        set!(subscription_sweep_interval => subscription_sweep_ms);
        set!(max_subscriptions_per_topic => max_subscriptions_per_topic);
        set!(max_unsettled_per_partition => max_unsettled_per_partition);
        set!(max_groups_per_partition => max_groups_per_partition);
        set!(max_producers_per_partition => max_producers_per_partition);
        set!(producer_expiry => producer_expiry_ms);
        if self.metrics_listen.is_some() {
            config.metrics_listen = self.metrics_listen;
        }
        if self.cpus.is_some() {
            config.cpus = self.cpus.clone();
        }
        if self.segment_age.is_some() {
            config.segment_ms = self.segment_age;
        }
        if self.retention_ms.is_some() {
            config.retention_ms = self.retention_ms;
        }
        if self.retention_bytes.is_some() {
            config.retention_bytes = self.retention_bytes;
        }
    }
}

/// The full configuration: defaults, then the file, then the flags.
pub fn resolve(args: &ServeArgs) -> Result<BrokerConfig, String> {
    let mut config = BrokerConfig::new(
        PathBuf::from("./corebus-data"),
        SocketAddr::from(([127, 0, 0, 1], 7070)),
    );
    config.shards = std::thread::available_parallelism().map_or(1, usize::from);
    let mut shards_set = false;
    if let Some(path) = &args.config {
        shards_set = config_file::apply(path, &mut config)?;
    }
    args.apply(&mut config);
    shards_set |= args.shards.is_some();
    if let Some(cpus) = &config.cpus {
        if !shards_set {
            config.shards = cpus.len();
        }
    }
    config.validate()?;
    Ok(config)
}

/// Runs the broker until SIGTERM or SIGINT.
pub fn run(args: ServeArgs) -> Result<ExitCode, String> {
    let config = resolve(&args)?;
    broker::run(config)?;
    Ok(ExitCode::SUCCESS)
}
