//! corebus: a thread-per-core pub/sub message broker on io_uring.
//!
//! Layers, each in its own module and each knowing only the ones below it:
//! - [`clock`], [`names`], [`placement`]: the wall clock, the rules for names, and the hash
//!   that places partitions on shards.
//! - [`record`]: the record-batch byte layout (CRC32C'd batches of records).
//! - [`protocol`]: length-prefixed FlatBuffers frames (schema/corebus.fbs).
//! - [`storage`]: partition logs on direct-I/O files with group commit and recovery.
//! - [`broker`]: shards, the shard mesh, the network front and request handlers.
//! - [`client`]: the shard-aware Rust client used by the CLI and the load generator.
//! - [`subscription`]: event subscriptions: filters, locks, delivery state.
//! - [`groups`]: consumer-group offsets of a partition.

#![warn(missing_docs)]

pub mod broker;
pub mod client;
pub mod clock;
pub mod groups;
pub mod metrics;
pub mod names;
pub mod placement;
pub mod protocol;
pub mod record;
pub mod runtime;
pub mod storage;
pub mod subscription;
pub mod units;
