//! What a shard counts on the request path (its storage counts live in `StorageMetrics`).

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::Rc;

use crate::metrics::{Histogram, StorageMetrics, LATENCY_BUCKETS};
use crate::protocol::wire::ErrorCode;

/// Request-path metrics of one shard.
#[derive(Debug)]
pub struct ShardMetrics {
    /// Produce request time.
    pub produce_latency: Histogram,
    /// Fetch request time.
    pub fetch_latency: Histogram,
    /// Error replies by code name.
    pub errors: RefCell<BTreeMap<&'static str, u64>>,
    /// Open connections on this shard.
    pub connections: Cell<usize>,
    /// Connections refused at accept.
    pub connections_refused: Cell<u64>,
    /// Partitions and subscription states that failed to open at start (offline).
    pub failed_at_start: Cell<u64>,
    /// The storage layer's metrics of this shard.
    pub storage: Rc<StorageMetrics>,
}

impl Default for ShardMetrics {
    fn default() -> Self {
        Self {
            produce_latency: Histogram::new(LATENCY_BUCKETS),
            fetch_latency: Histogram::new(LATENCY_BUCKETS),
            errors: RefCell::new(BTreeMap::new()),
            connections: Cell::new(0),
            connections_refused: Cell::new(0),
            failed_at_start: Cell::new(0),
            storage: Rc::new(StorageMetrics::default()),
        }
    }
}

impl ShardMetrics {
    /// Counts an error reply.
    pub fn count_error(&self, code: ErrorCode) {
        let name = code.variant_name().unwrap_or("Unknown");
        *self.errors.borrow_mut().entry(name).or_default() += 1;
    }
}
