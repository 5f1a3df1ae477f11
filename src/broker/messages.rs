//! Messages between shards. Every cross-shard interaction is one of these variants, carried
//! by glommio's channel mesh; replies come back on a oneshot channel inside the message.

use bytes::Bytes;
use futures::channel::oneshot;

use super::figures::{ShardFigures, SubscriptionFigures};
use super::metadata::TopicConfig;
use crate::protocol::message::ApiError;
use crate::storage::FetchedData;
use crate::subscription::partition::SettleAction;
use crate::subscription::{Delivered, LockToken, SubscriptionConfig};

/// The result of producing to one partition: its id and the offsets of the first and last
/// records appended, or why nothing was appended.
pub type PartitionOutcome = (u32, Result<(u64, u64), ApiError>);

/// Per-partition committed offsets (`None`: nothing committed), or why not readable.
pub type OffsetsOutcome = Vec<(u32, Result<Option<u64>, ApiError>)>;

/// A change to the topic list.
#[derive(Clone, Debug)]
pub enum TopicChange {
    /// A topic was created.
    Created {
        /// Topic name.
        name: String,
        /// Its settings.
        config: TopicConfig,
    },
    /// A topic was deleted, with its data and subscriptions.
    Deleted {
        /// Topic name.
        name: String,
    },
    /// A subscription was created on a topic.
    SubscriptionCreated {
        /// Topic name.
        topic: String,
        /// Subscription name.
        name: String,
        /// Its definition.
        config: SubscriptionConfig,
    },
    /// A subscription was deleted, with its state.
    SubscriptionDeleted {
        /// Topic name.
        topic: String,
        /// Subscription name.
        name: String,
    },
}

/// A request from one shard to another.
pub enum ShardMessage {
    /// Append batches to partitions the receiver owns.
    Produce {
        /// Topic name.
        topic: String,
        /// (partition, concatenated batches), each partition owned by the receiver.
        parts: Vec<(u32, Bytes)>,
        /// Where the per-partition outcomes go.
        reply: oneshot::Sender<Vec<PartitionOutcome>>,
    },
    /// Read from a partition the receiver owns.
    Fetch {
        /// Topic name.
        topic: String,
        /// Partition id.
        partition: u32,
        /// First offset wanted.
        offset: u64,
        /// Soft limit on bytes returned.
        max_bytes: u32,
        /// Long-poll time.
        max_wait_ms: u32,
        /// Where the data goes.
        reply: oneshot::Sender<Result<FetchedData, ApiError>>,
    },
    /// Ask shard 0 to create or delete a topic broker-wide.
    ChangeTopic {
        /// The change.
        change: TopicChange,
        /// Its outcome.
        reply: oneshot::Sender<Result<(), ApiError>>,
    },
    /// Ask shard 0 for an idempotent producer identity (see `Shard::init_producer`).
    InitProducer {
        /// The identity to move to its next epoch; `None`: a new one.
        previous: Option<(u64, u16)>,
        /// The identity, or why not.
        reply: oneshot::Sender<Result<(u64, u16), ApiError>>,
    },
    /// Collect this shard's Prometheus samples.
    Samples {
        /// Where they go.
        reply: oneshot::Sender<crate::metrics::Samples>,
    },
    /// Collect this shard's figures for `corebus stats`.
    Figures {
        /// Where they go.
        reply: oneshot::Sender<ShardFigures>,
    },
    /// From shard 0: apply a saved topic change to this shard's state.
    ApplyTopic {
        /// The change.
        change: TopicChange,
        /// Its outcome on this shard.
        reply: oneshot::Sender<Result<(), ApiError>>,
    },
    /// Lock up to `max_events` events of a subscription on partitions the receiver owns,
    /// without waiting.
    Receive {
        /// Topic name.
        topic: String,
        /// Subscription name.
        subscription: String,
        /// Partitions to look at, each owned by the receiver.
        partitions: Vec<u32>,
        /// Most events to lock.
        max_events: usize,
        /// About the most record bytes to return.
        max_bytes: usize,
        /// The locked events, durable.
        reply: oneshot::Sender<Result<Vec<Delivered>, ApiError>>,
    },
    /// Wait until one of the partitions has an event to deliver (true) or `wait_ms` passes
    /// (false). Ends early when the asker hangs up.
    WaitDeliverable {
        /// Topic name.
        topic: String,
        /// Subscription name.
        subscription: String,
        /// Partitions to watch, each owned by the receiver.
        partitions: Vec<u32>,
        /// Longest wait.
        wait_ms: u64,
        /// The answer.
        reply: oneshot::Sender<bool>,
    },
    /// Ack, release, reject or renew events of partitions the receiver owns.
    Settle {
        /// Topic name.
        topic: String,
        /// Subscription name.
        subscription: String,
        /// What to do.
        action: SettleAction,
        /// (position in the request, token).
        tokens: Vec<(usize, LockToken)>,
        /// One outcome per token.
        reply: oneshot::Sender<Vec<(usize, SettleOutcome)>>,
    },
    /// The figures of a subscription over the partitions the receiver owns.
    SubscriptionStats {
        /// Topic name.
        topic: String,
        /// Subscription name.
        subscription: String,
        /// The sums.
        reply: oneshot::Sender<SubscriptionFigures>,
    },
    /// Commit consumer-group offsets of partitions the receiver owns.
    CommitOffsets {
        /// Consumer group.
        group: String,
        /// Topic name.
        topic: String,
        /// (partition, next offset).
        offsets: Vec<(u32, u64)>,
        /// Per-partition outcome.
        reply: oneshot::Sender<Vec<(u32, Result<(), ApiError>)>>,
    },
    /// A sync on the data device failed on shard `from`: the receiver's logs turn read-only
    /// too (see `storage::sync_health`).
    DeviceFailed {
        /// The shard that saw the failure.
        from: usize,
        /// What failed.
        what: String,
    },
    /// Read consumer-group offsets of partitions the receiver owns.
    FetchOffsets {
        /// Consumer group.
        group: String,
        /// Topic name.
        topic: String,
        /// Partitions.
        partitions: Vec<u32>,
        /// Per-partition committed offset (`None`: nothing committed).
        reply: oneshot::Sender<OffsetsOutcome>,
    },
}

/// The outcome of settling one token: the lock's new end for a renew.
pub type SettleOutcome = Result<Option<i64>, ApiError>;
