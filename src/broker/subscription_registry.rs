//! A shard's subscription state: its copy of the subscription definitions, and the
//! per-partition subscription and consumer-group state of the partitions it owns. The
//! operations on it are in `broker::subscriptions`.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;

use glommio::sync::Semaphore;

use super::metadata::SubscriptionMap;
use crate::groups::GroupOffsets;
use crate::subscription::SubscriptionPartition;

pub(super) type PartitionKey = (String, String, u32);

/// Per-shard subscription state.
pub struct SubscriptionRegistry {
    /// This shard's copy of every subscription definition.
    pub(super) definitions: RefCell<SubscriptionMap>,
    /// (topic, subscription, partition) → state, for the partitions this shard owns.
    pub(super) partitions: RefCell<HashMap<PartitionKey, Rc<SubscriptionPartition>>>,
    /// (topic, partition) → consumer-group offsets, opened on first use.
    pub(super) groups: RefCell<HashMap<(String, u32), Rc<GroupOffsets>>>,
    /// Serializes opening group-offset files (two tasks must not create the same file).
    pub(super) groups_opening: Semaphore,
    /// Where the next receive starts, so that partitions take turns.
    pub(super) rotation: Cell<usize>,
}

impl Default for SubscriptionRegistry {
    fn default() -> Self {
        Self {
            definitions: RefCell::new(SubscriptionMap::new()),
            partitions: RefCell::new(HashMap::new()),
            groups: RefCell::new(HashMap::new()),
            groups_opening: Semaphore::new(1),
            rotation: Cell::new(0),
        }
    }
}
