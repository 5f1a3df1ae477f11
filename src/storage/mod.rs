//! Storage: partition logs on direct-I/O files and the data directory's superblock.
//! Owns every byte on disk; knows nothing of sockets or the wire protocol.

pub mod atomic_file;
pub mod checkpoint;
pub mod disk_trace;
pub mod dma;
pub mod error;
pub mod extent;
pub mod fetched;
pub mod partition_log;
pub mod power_loss;
pub mod prewrite;
pub mod probes;
pub mod producers;

pub mod segment;
pub mod shard_sync;
mod space_queue;
pub mod spare;
pub mod state_log;
pub mod superblock;
pub mod sync_health;

pub use error::StorageError;
pub use fetched::{BatchBytes, FetchedData};
pub use partition_log::{AppendTicket, LogConfig, LogStats, PartitionLog};
pub use prewrite::PrewriteConfig;
pub use probes::FailureProbes;
pub use shard_sync::ShardSync;
pub use state_log::{SnapshotSource, StateLog};
pub use sync_health::SyncHealth;

/// What one durable flush syncs (see `storage::shard_sync`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum GroupCommit {
    /// Each flush `fdatasync`s its own segment file.
    Partition,
    /// Flushes that only overwrite blocks whose allocation is committed (the prewritten stretch
    /// ahead of a partition's end) share one flush of the disk's cache per shard; other
    /// flushes `fdatasync` their own file. On ext4 and XFS; elsewhere as `partition`.
    SharedFlush,
    /// One `syncfs` of the data directory's filesystem serves every partition of a shard that
    /// wrote meanwhile; it also writes back everything else dirty on that filesystem.
    #[value(alias = "shard")]
    Syncfs,
}

impl GroupCommit {
    /// The name used on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Partition => "partition",
            Self::SharedFlush => "shared-flush",
            Self::Syncfs => "syncfs",
        }
    }
}

/// When a produce is acknowledged.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Durability {
    /// After the batch is written with O_DIRECT and `fdatasync`ed (survives power loss).
    Sync,
    /// After the O_DIRECT write completes (survives a process crash, not a power cut).
    Write,
    /// On append to memory (benchmarks only: a crash loses acknowledged data).
    None,
}

impl Durability {
    /// The name used on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sync => "sync",
            Self::Write => "write",
            Self::None => "none",
        }
    }
}
