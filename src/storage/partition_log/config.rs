//! A partition log's tunables.

use std::rc::Rc;

use crate::metrics::StorageMetrics;
use crate::storage::prewrite::PrewriteConfig;
use crate::storage::probes::FailureProbes;
use crate::storage::shard_sync::ShardSync;
use crate::storage::sync_health::SyncHealth;
use crate::storage::Durability;

/// Tunables of a partition log.
#[derive(Clone, Debug)]
pub struct LogConfig {
    /// When appends are acknowledged.
    pub durability: Durability,
    /// Largest single DMA read or write (glommio issue #633).
    pub max_io_bytes: usize,
    /// Recent batches kept in memory per partition for readers.
    pub cache_bytes: usize,
    /// Recent batches kept in memory over all the logs of a shard, at most: with many
    /// partitions each keeps `cache_budget_bytes / logs` (but no more than `cache_bytes`).
    pub cache_budget_bytes: usize,
    /// Bytes of log between two sparse index entries.
    pub index_interval_bytes: u64,
    /// Bytes that may wait for a flush before appenders are held back.
    pub max_pending_bytes: usize,
    /// A segment rolls when it would grow past this size.
    pub segment_bytes: u64,
    /// A segment rolls when its first batch is older than this.
    pub segment_ms: Option<u64>,
    /// Disk space is preallocated in steps of this size.
    pub preallocate_bytes: u64,
    /// Zero-filling ahead of the end for small flushes (see `storage::prewrite`).
    pub prewrite: PrewriteConfig,
    /// Oldest segments are deleted while the log is larger than this.
    pub retention_bytes: Option<u64>,
    /// Segments whose newest record is older than this are deleted.
    pub retention_ms: Option<u64>,
    /// The shard's syncer when flushes share one `syncfs` (`GroupCommit::Shard`); `None`:
    /// each flush `fdatasync`s its segment.
    pub shard_sync: Option<Rc<ShardSync>>,
    /// Fault injection for tests (empty in production).
    pub probes: Rc<FailureProbes>,
    /// The shard's record of a failed sync: once set, every log of the shard is read-only.
    pub sync_health: Rc<SyncHealth>,
    /// The shard's storage metrics.
    pub metrics: Rc<StorageMetrics>,
    /// Idempotent producers remembered per partition at most (least recently seen go).
    pub max_producers: usize,
    /// An idempotent producer idle this long is forgotten.
    pub producer_expiry_ms: u64,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            durability: Durability::Sync,
            max_io_bytes: 4 << 20,
            cache_bytes: 8 << 20,
            cache_budget_bytes: 128 << 20,
            index_interval_bytes: 4096,
            max_pending_bytes: 64 << 20,
            segment_bytes: 1 << 30,
            segment_ms: None,
            preallocate_bytes: 32 << 20,
            prewrite: PrewriteConfig::default(),
            retention_bytes: None,
            retention_ms: None,
            shard_sync: None,
            probes: Rc::new(FailureProbes::default()),
            sync_health: Rc::new(SyncHealth::default()),
            metrics: Rc::new(StorageMetrics::default()),
            max_producers: 10_000,
            producer_expiry_ms: 24 * 3600 * 1000,
        }
    }
}
