//! Broker configuration: every limit and tunable in one place, with units in the names.

use std::net::SocketAddr;
use std::path::PathBuf;

use std::rc::Rc;

use crate::metrics::StorageMetrics;
use crate::storage::{
    Durability, FailureProbes, GroupCommit, LogConfig, PrewriteConfig, ShardSync, SyncHealth,
};

/// Everything `corebus serve` needs to run.
#[derive(Clone, Debug)]
pub struct BrokerConfig {
    /// Where topics, partition logs and the superblock live.
    pub data_dir: PathBuf,
    /// The public address every shard accepts on (SO_REUSEPORT); shard `i` also accepts on
    /// port `listen.port() + 1 + i`.
    pub listen: SocketAddr,
    /// Where shard 0 serves `GET /metrics` (Prometheus text format), if anywhere.
    pub metrics_listen: Option<SocketAddr>,
    /// Number of shards (executors), each pinned to its own core when there are enough.
    pub shards: usize,
    /// The CPUs to pin shards to, one per shard; `None` spreads them over all CPUs.
    pub cpus: Option<Vec<usize>>,
    /// When produces are acknowledged.
    pub durability: Durability,
    /// Largest accepted frame; the length prefix is checked before any allocation.
    pub max_frame_bytes: usize,
    /// Most records accepted in one batch.
    pub max_batch_records: u32,
    /// Largest record batch accepted.
    pub max_batch_bytes: usize,
    /// Requests one connection may have in flight before the broker stops reading from it.
    pub max_inflight_per_connection: usize,
    /// Bytes of requests one connection may have in flight before the broker stops reading.
    pub max_buffered_bytes_per_connection: usize,
    /// Connections one shard serves at once; more are closed on accept.
    pub max_connections_per_shard: usize,
    /// Connections the broker serves at once, over all shards.
    pub max_connections: usize,
    /// A connection with no request in flight and nothing received for this long is closed.
    pub idle_timeout_ms: u64,
    /// Time a client has to send a whole frame once it started one (against slow senders);
    /// also the longest a reply may wait for the client to read it.
    pub frame_timeout_ms: u64,
    /// Most topics.
    pub max_topics: usize,
    /// Most partitions over all topics.
    pub max_partitions_total: u64,
    /// Most partitions a topic may have.
    pub max_partitions_per_topic: u32,
    /// Most bytes returned by one fetch.
    pub max_fetch_bytes: usize,
    /// Longest a fetch may wait for data.
    pub max_fetch_wait_ms: u32,
    /// Size of each shard's DMA buffer pool (glommio `io_memory`).
    pub io_memory_bytes: usize,
    /// Recent data kept in memory per partition for readers.
    pub cache_bytes_per_partition: usize,
    /// Recent data kept in memory over all partitions of a shard, at most.
    pub cache_bytes_per_shard: usize,
    /// Largest single DMA read or write.
    pub max_io_bytes: usize,
    /// Bytes a partition may have waiting for a flush before producers are held back.
    pub max_pending_bytes_per_partition: usize,
    /// A segment rolls when it would grow past this size.
    pub segment_bytes: u64,
    /// A segment rolls when its first batch is older than this.
    pub segment_ms: Option<u64>,
    /// Disk space is preallocated in steps of this size.
    pub preallocate_bytes: u64,
    /// What a durable flush syncs: its partition's file, or the shard's filesystem.
    pub group_commit: GroupCommit,
    /// Zero-filling ahead of partitions' ends for small flushes (see `storage::prewrite`).
    pub prewrite: PrewriteConfig,
    /// Bytes of log between two sparse index entries.
    pub index_interval_bytes: u64,
    /// Default retention by size per partition (topics may override).
    pub retention_bytes: Option<u64>,
    /// Default retention by age (topics may override).
    pub retention_ms: Option<u64>,
    /// How often retention is enforced.
    pub retention_check_ms: u64,
    /// How often each log's durable point and index are checkpointed.
    pub checkpoint_interval_ms: u64,
    /// Most subscriptions one topic may have.
    pub max_subscriptions_per_topic: usize,
    /// Most events one receive returns.
    pub max_receive_events: u32,
    /// About the most record bytes one receive returns (at least one event).
    pub max_receive_bytes: usize,
    /// Most lock tokens one ack, release, reject or renew may carry.
    pub max_settle_tokens: usize,
    /// A subscription stops locking new events of a partition while this many are unsettled
    /// there (bounds its memory).
    pub max_unsettled_per_partition: usize,
    /// Idempotent producers remembered per partition at most (least recently seen go).
    pub max_producers_per_partition: usize,
    /// An idempotent producer idle this long is forgotten by the partitions.
    pub producer_expiry_ms: u64,
    /// Consumer groups with committed offsets one partition may hold; a commit of a new
    /// group beyond it is refused (the offsets are kept in memory).
    pub max_groups_per_partition: usize,
    /// How often each shard looks for expired locks, ended delays and dead letters.
    pub subscription_sweep_ms: u64,
}

impl BrokerConfig {
    /// Defaults for everything but where to store data and listen.
    pub fn new(data_dir: PathBuf, listen: SocketAddr) -> Self {
        Self {
            data_dir,
            listen,
            metrics_listen: None,
            shards: 1,
            cpus: None,
            durability: Durability::Sync,
            max_frame_bytes: crate::protocol::DEFAULT_MAX_FRAME_BYTES,
            max_batch_records: 100_000,
            max_batch_bytes: crate::protocol::DEFAULT_MAX_FRAME_BYTES,
            max_inflight_per_connection: 256,
            max_buffered_bytes_per_connection: 64 << 20,
            max_connections_per_shard: 10_000,
            max_connections: 50_000,
            idle_timeout_ms: 600_000,
            frame_timeout_ms: 30_000,
            max_topics: 10_000,
            max_partitions_total: 100_000,
            max_partitions_per_topic: 10_000,
            max_fetch_bytes: 8 << 20,
            max_fetch_wait_ms: 60_000,
            io_memory_bytes: 64 << 20,
            cache_bytes_per_partition: 8 << 20,
            cache_bytes_per_shard: 128 << 20,
            max_io_bytes: 4 << 20,
            max_pending_bytes_per_partition: 64 << 20,
            segment_bytes: 1 << 30,
            segment_ms: None,
            preallocate_bytes: 32 << 20,
            group_commit: GroupCommit::SharedFlush,
            prewrite: PrewriteConfig::default(),
            index_interval_bytes: 4096,
            retention_bytes: None,
            retention_ms: None,
            retention_check_ms: 5_000,
            checkpoint_interval_ms: 1_000,
            max_subscriptions_per_topic: 100,
            max_receive_events: 1_000,
            max_receive_bytes: 4 << 20,
            max_settle_tokens: 10_000,
            max_unsettled_per_partition: 100_000,
            max_producers_per_partition: 10_000,
            producer_expiry_ms: 24 * 3600 * 1000,
            max_groups_per_partition: 10_000,
            subscription_sweep_ms: 50,
        }
    }

    /// The port shard `shard` accepts on directly.
    pub fn shard_port(&self, shard: usize) -> u16 {
        self.listen.port().wrapping_add(1 + shard as u16)
    }

    /// The storage settings each partition log uses.
    pub fn log_config(
        &self,
        shard_sync: Option<Rc<ShardSync>>,
        probes: Rc<FailureProbes>,
        sync_health: Rc<SyncHealth>,
        metrics: Rc<StorageMetrics>,
    ) -> LogConfig {
        LogConfig {
            durability: self.durability,
            max_io_bytes: self.max_io_bytes,
            cache_bytes: self.cache_bytes_per_partition,
            cache_budget_bytes: self.cache_bytes_per_shard,
            index_interval_bytes: self.index_interval_bytes,
            max_pending_bytes: self.max_pending_bytes_per_partition,
            segment_bytes: self.segment_bytes,
            segment_ms: self.segment_ms,
            preallocate_bytes: self.preallocate_bytes,
            prewrite: self.prewrite,
            retention_bytes: self.retention_bytes,
            retention_ms: self.retention_ms,
            shard_sync,
            probes,
            sync_health,
            metrics,
            max_producers: self.max_producers_per_partition,
            producer_expiry_ms: self.producer_expiry_ms,
        }
    }

    /// Checks the settings, naming the one that is wrong.
    pub fn validate(&self) -> Result<(), String> {
        if self.shards == 0 || self.shards > 256 {
            return Err(format!("--shards must be 1..=256, got {}", self.shards));
        }
        if u32::from(self.listen.port()) + 1 + self.shards as u32 > u32::from(u16::MAX) {
            return Err(format!(
                "--listen port {} leaves no room for {} shard ports above it",
                self.listen.port(),
                self.shards
            ));
        }
        if self.max_frame_bytes < 1024 || self.max_frame_bytes > (1 << 30) {
            return Err(format!(
                "--max-frame-bytes must be 1 KiB..=1 GiB, got {}",
                self.max_frame_bytes
            ));
        }
        if self.max_io_bytes < 4096 || self.max_io_bytes % 4096 != 0 {
            return Err(format!(
                "max I/O size must be a multiple of 4096, got {}",
                self.max_io_bytes
            ));
        }
        if let Some(cpus) = &self.cpus {
            if cpus.len() != self.shards {
                return Err(format!(
                    "--cpus lists {} CPUs for {} shards: give one CPU per shard",
                    cpus.len(),
                    self.shards
                ));
            }
        }
        if self.segment_bytes < 64 * 1024 || self.segment_bytes > (2 << 30) {
            return Err(format!(
                "--segment-bytes must be 64 KiB..=2 GiB (index positions are 32-bit), got {}",
                self.segment_bytes
            ));
        }
        if self.preallocate_bytes < 4096 {
            return Err(format!(
                "--preallocate-bytes must be at least 4096, got {}",
                self.preallocate_bytes
            ));
        }
        if self.max_buffered_bytes_per_connection < self.max_frame_bytes {
            return Err(format!(
                "--max-buffered-bytes-per-connection ({}) must be at least --max-frame-bytes ({})",
                self.max_buffered_bytes_per_connection, self.max_frame_bytes
            ));
        }
        if self.max_connections == 0 || self.max_connections_per_shard == 0 {
            return Err(
                "--max-connections and --max-connections-per-shard must be at least 1".into(),
            );
        }
        if self.idle_timeout_ms < 10 || self.frame_timeout_ms < 10 {
            return Err("--idle-timeout and --frame-timeout must be at least 10ms".into());
        }
        if self.max_inflight_per_connection == 0 {
            return Err("--max-inflight-per-connection must be at least 1".into());
        }
        // Zero in any of these would make every request fail (or a timer spin): refused here.
        let at_least_one = [
            ("--max-fetch-bytes", self.max_fetch_bytes as u64),
            ("--max-batch-bytes", self.max_batch_bytes as u64),
            ("--max-batch-records", u64::from(self.max_batch_records)),
            ("--max-topics", self.max_topics as u64),
            ("--max-partitions-total", self.max_partitions_total),
            (
                "--max-partitions-per-topic",
                u64::from(self.max_partitions_per_topic),
            ),
            (
                "--max-subscriptions-per-topic",
                self.max_subscriptions_per_topic as u64,
            ),
            (
                "--max-groups-per-partition",
                self.max_groups_per_partition as u64,
            ),
            (
                "--max-unsettled-per-partition",
                self.max_unsettled_per_partition as u64,
            ),
            (
                "--max-producers-per-partition",
                self.max_producers_per_partition as u64,
            ),
            ("--producer-expiry", self.producer_expiry_ms),
            (
                "max_pending_bytes_per_partition",
                self.max_pending_bytes_per_partition as u64,
            ),
            ("max_receive_events", u64::from(self.max_receive_events)),
            ("max_receive_bytes", self.max_receive_bytes as u64),
            ("max_settle_tokens", self.max_settle_tokens as u64),
            ("index_interval_bytes", self.index_interval_bytes),
            ("--checkpoint-interval (ms)", self.checkpoint_interval_ms),
            ("--retention-check-interval (ms)", self.retention_check_ms),
            (
                "--subscription-sweep-interval (ms)",
                self.subscription_sweep_ms,
            ),
        ];
        if let Some((name, _)) = at_least_one.iter().find(|(_, v)| *v == 0) {
            return Err(format!("{name} must be at least 1, got 0"));
        }
        Ok(())
    }
}
