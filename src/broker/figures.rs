//! Figures a shard reports about itself (`corebus stats`): per partition, per shard and per
//! subscription.

/// One partition's figures, as `corebus stats` shows them.
#[derive(Clone, Debug, Default)]
pub struct PartitionFigures {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: u32,
    /// Owning shard.
    pub shard: u32,
    /// Earliest stored offset.
    pub log_start_offset: u64,
    /// Next offset to be written.
    pub high_watermark: u64,
    /// Bytes stored.
    pub size_bytes: u64,
    /// Segment files.
    pub segments: u32,
    /// Records acknowledged since start.
    pub messages_in: u64,
    /// Bytes acknowledged since start.
    pub bytes_in: u64,
    /// Records fetched since start.
    pub messages_out: u64,
    /// Bytes fetched since start.
    pub bytes_out: u64,
}

/// One shard's figures.
#[derive(Clone, Debug, Default)]
pub struct ShardFigures {
    /// Shard index.
    pub shard: u32,
    /// Open connections.
    pub connections: u32,
    /// Requests being handled.
    pub requests_in_flight: u32,
    /// Flushes completed since start.
    pub flushes: u64,
    /// Of those, the ones slower than 10 ms.
    pub slow_flushes: u64,
    /// The longest flush, in microseconds.
    pub flush_max_us: u64,
    /// The longest sync of a flush, in microseconds.
    pub sync_max_us: u64,
    /// The longest write of a flush, in microseconds.
    pub write_max_us: u64,
    /// Its partitions.
    pub partitions: Vec<PartitionFigures>,
}

/// A subscription's figures, summed over partitions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SubscriptionFigures {
    /// Events locked now.
    pub locked: u64,
    /// Events waiting for delivery, and events not looked at yet.
    pub backlog: u64,
    /// Events acknowledged.
    pub acked: u64,
    /// Events appended to the dead-letter topic.
    pub dead_lettered: u64,
    /// Events dropped for want of a dead-letter topic.
    pub dropped: u64,
    /// Offsets lost before they were settled (retention, or a corrupt range).
    pub lost: u64,
}

impl std::ops::AddAssign for SubscriptionFigures {
    fn add_assign(&mut self, o: Self) {
        self.locked += o.locked;
        self.backlog += o.backlog;
        self.acked += o.acked;
        self.dead_lettered += o.dead_lettered;
        self.dropped += o.dropped;
        self.lost += o.lost;
    }
}
