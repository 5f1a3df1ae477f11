//! The Rust client library: connections, shard-aware routing, produce, fetch, topics,
//! subscriptions (receive and settle) and consumer-group offsets.
//!
//! Runs on a glommio executor (the CLI and the load generator start one). With shard-aware
//! routing on (the default) each partition's requests go straight to the port of the shard
//! that owns it, as the metadata reply says; with it off every request goes to the bootstrap
//! address and the broker forwards it.

mod client;
mod connection;
mod producer;
pub mod requests;
mod subscriptions;

pub use crate::subscription::partition::SettleAction;
pub use client::{
    fetch_on, fetch_result, produce_on, produce_result, Client, ClientOptions, Fetched, Metadata,
    PartitionInfo, PartitionStats, ShardStats, Stats,
};
pub use connection::{Connection, Reply};
pub use producer::{Producer, ProducerOptions};
pub use subscriptions::{ReceivedEvent, SettleResult, SubscriptionInfo, SubscriptionStats};

use crate::protocol::message::ApiError;

/// Why a client call failed.
#[derive(Debug, Clone)]
pub enum ClientError {
    /// Connecting or socket I/O failed.
    Io(String),
    /// The connection closed before the reply.
    Closed(String),
    /// The broker answered with an error.
    Api(ApiError),
    /// The reply was not what the protocol says.
    Protocol(String),
    /// A fetch asked for an offset outside the partition's stored range.
    OffsetOutOfRange {
        /// The offset asked for.
        requested: u64,
        /// Earliest stored offset.
        log_start_offset: u64,
        /// Next offset to be written.
        high_watermark: u64,
    },
}

impl ClientError {
    /// The broker's error, if that is what this is.
    pub fn api(&self) -> Option<&ApiError> {
        match self {
            Self::Api(e) => Some(e),
            _ => None,
        }
    }
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Io(e) | Self::Closed(e) | Self::Protocol(e) => f.write_str(e),
            Self::Api(e) => write!(f, "broker error {e}"),
            Self::OffsetOutOfRange {
                requested,
                log_start_offset,
                high_watermark,
            } => write!(
                f,
                "offset {requested} is out of range: the partition holds [{log_start_offset}, {high_watermark})"
            ),
        }
    }
}

impl std::error::Error for ClientError {}

impl From<ApiError> for ClientError {
    fn from(e: ApiError) -> Self {
        Self::Api(e)
    }
}
