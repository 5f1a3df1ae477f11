//! One subscription on one partition, as its owning shard runs it: the delivery state, its
//! durable state log, and reading events from the partition log to lock, redeliver or
//! dead-letter them.
//!
//! Owned by the shard that owns the partition (`Rc`/`RefCell`). Every decision about the
//! state is made synchronously inside one borrow (after any read of the log has completed),
//! so two receivers on the same shard can never lock the same event. Dead-letter appends go
//! through the broker's produce path, which lives above this module: the broker takes the
//! queued dead letters ([`SubscriptionPartition::take_dead_letters`]) and reports back
//! ([`SubscriptionPartition::settle_dead_letter`]).

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::rc::{Rc, Weak};
use std::time::Duration;

use futures::channel::oneshot;

use super::state::{Lease, LockError, Offer, Op, SubState};
use super::{DeadLetter, LockToken, Nonces, SubscriptionConfig};
use crate::clock::now_ms;
use crate::record::compression::with_shard_decompressor;
use crate::record::{Batch, BatchHeader};
use crate::storage::{
    disk_trace, Durability, PartitionLog, SnapshotSource, StateLog, StorageError, SyncHealth,
};

/// Bytes of log read per scan step.
const SCAN_BYTES: usize = 256 * 1024;
/// Scan steps one receive may take over events that do not match before it answers.
const MAX_SCAN_STEPS: usize = 16;

/// Limits of one subscription partition.
#[derive(Clone, Debug)]
pub struct PartitionLimits {
    /// New events are not locked while this many are unsettled (bounds memory when receivers
    /// neither ack nor let events expire).
    pub max_unsettled: usize,
    /// How state records are made durable.
    pub durability: Durability,
    /// The shard's record of failed syncs on the data device.
    pub sync_health: Rc<SyncHealth>,
}

/// An event locked for a receiver.
#[derive(Clone, Debug)]
pub struct Delivered {
    /// The token that settles this delivery.
    pub token: LockToken,
    /// Deliveries so far, this one included.
    pub delivery_count: u32,
    /// When the lock ends (ms since the epoch).
    pub locked_until_ms: i64,
    /// The record, length prefix included, as stored.
    pub record: Vec<u8>,
}

/// What a settle did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Settled {
    /// Recorded; durable once the state log reaches this sequence number.
    Recorded {
        /// State-log sequence number to wait for.
        seq: u64,
        /// The lock's new end (renew).
        locked_until_ms: Option<i64>,
    },
    /// To be dead-lettered by the caller.
    DeadLetter(DeadLetter),
}

/// What to do with a locked event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SettleAction {
    /// Done.
    Ack,
    /// Deliver again after the delay (ms).
    Release(u32),
    /// Dead-letter now.
    Reject,
    /// Extend the lock.
    Renew,
}

/// A subscription on one partition.
pub struct SubscriptionPartition {
    /// Topic name.
    pub topic: String,
    /// Subscription name.
    pub name: String,
    /// Partition id.
    pub partition: u32,
    /// The definition.
    pub config: Rc<SubscriptionConfig>,
    limits: PartitionLimits,
    log: Rc<PartitionLog>,
    store: Rc<StateLog>,
    state: RefCell<SubState>,
    nonces: RefCell<Nonces>,
    /// Receivers waiting for a release or an expiry.
    waiters: RefCell<Vec<oneshot::Sender<()>>>,
    /// Events found due for dead-lettering, waiting for the broker.
    dead_letters: RefCell<Vec<DeadLetter>>,
    /// Set while the broker works through `dead_letters`.
    pub dead_lettering: Cell<bool>,
    /// After a failed dead-letter append, not tried again before this time.
    pub dead_letter_retry_ms: Cell<i64>,
    closed: Cell<bool>,
}

/// The state file of subscription `name` in the partition directory `dir`.
pub fn state_path(dir: &Path, name: &str) -> PathBuf {
    dir.join("subscriptions").join(format!("{name}.state"))
}

impl SnapshotSource for SubscriptionPartition {
    fn snapshot(&self) -> Vec<Vec<u8>> {
        self.state
            .borrow()
            .snapshot()
            .iter()
            .map(Op::encode)
            .collect()
    }
}

/// Walks the records of fetched batches (already checked by the log) as
/// `(offset, record bytes, record)`.
fn for_each_record(
    batches: &[u8],
    mut f: impl FnMut(u64, &[u8], &crate::record::Record<'_>) -> bool,
) -> Result<(), StorageError> {
    let mut rest = batches;
    while !rest.is_empty() {
        let batch = Batch::trusted(rest).map_err(|e| StorageError::Corrupt(e.to_string()))?;
        rest = &rest[batch.as_bytes().len()..];
        let base = BatchHeader::parse(batch.as_bytes())
            .map_err(|e| StorageError::Corrupt(e.to_string()))?
            .base_offset();
        // A compressed batch is decompressed into the shard's one reused buffer.
        let done = with_shard_decompressor(|d| -> Result<bool, StorageError> {
            let mut records = batch
                .records(d)
                .map_err(|e| StorageError::Corrupt(e.to_string()))?;
            while let Some(item) = records.next_with_bytes() {
                let (bytes, record) = item.map_err(|e| StorageError::Corrupt(e.to_string()))?;
                if !f(base + u64::from(record.offset_delta), bytes, &record) {
                    return Ok(true);
                }
            }
            Ok(false)
        })?;
        if done {
            return Ok(());
        }
    }
    Ok(())
}

impl SubscriptionPartition {
    /// Opens the subscription's state in the partition directory `dir` (the log's), or
    /// creates it at the configured start position.
    pub async fn open(
        dir: &Path,
        topic: &str,
        name: &str,
        partition: u32,
        config: Rc<SubscriptionConfig>,
        log: Rc<PartitionLog>,
        limits: PartitionLimits,
    ) -> Result<Rc<Self>, StorageError> {
        let path = state_path(dir, name);
        let health = || Rc::clone(&limits.sync_health);
        let (store, state) = match StateLog::open(&path, limits.durability, health()).await? {
            Some((store, records)) => {
                let state = SubState::replay(records.iter().map(Vec::as_slice))
                    .map_err(|e| StorageError::Corrupt(format!("{}: {e}", path.display())))?;
                (store, state)
            }
            None => {
                let start = match config.start {
                    super::StartPosition::Earliest => log.log_start_offset(),
                    super::StartPosition::Latest => log.high_watermark(),
                };
                let state = SubState::new(start);
                let records = state.snapshot().iter().map(Op::encode).collect();
                // `subscriptions/` alone: never the partition's directory, if it is gone.
                if let Some(subs) = path.parent().map(Path::to_path_buf) {
                    glommio::executor()
                        .spawn_blocking(move || disk_trace::create_dir_durable(&subs))
                        .await
                        .map_err(|e| {
                            StorageError::io(format!("creating {}", path.display()), &e)
                        })?;
                }
                (
                    StateLog::create(&path, records, limits.durability, health()).await?,
                    state,
                )
            }
        };
        let salt = crate::placement::fnv1a_64(format!("{topic}/{partition}/{name}").as_bytes());
        let sp = Rc::new(Self {
            topic: topic.to_string(),
            name: name.to_string(),
            partition,
            config,
            limits,
            log,
            store: Rc::clone(&store),
            state: RefCell::new(state),
            nonces: RefCell::new(Nonces::new(salt)),
            waiters: RefCell::new(Vec::new()),
            dead_letters: RefCell::new(Vec::new()),
            dead_lettering: Cell::new(false),
            dead_letter_retry_ms: Cell::new(0),
            closed: Cell::new(false),
        });
        let weak: Weak<dyn SnapshotSource> =
            Rc::downgrade(&(Rc::clone(&sp) as Rc<dyn SnapshotSource>));
        store.set_snapshot_source(weak);
        Ok(sp)
    }

    /// True once the subscription or its topic was deleted.
    pub fn is_closed(&self) -> bool {
        self.closed.get()
    }

    /// Stops the subscription and deletes its state file; waiting receivers wake up.
    pub async fn remove(&self) {
        self.closed.set(true);
        self.notify();
        self.store.remove().await;
    }

    /// Stops the subscription (its topic is going away with its files).
    pub fn close(&self) {
        self.closed.set(true);
        self.notify();
    }

    fn notify(&self) {
        for tx in self.waiters.borrow_mut().drain(..) {
            let _ = tx.send(());
        }
    }

    fn append(&self, op: &Op) -> u64 {
        self.store.append(&op.encode())
    }

    /// Gives up offsets `from..to` that can no longer be read (`why`): what was not settled
    /// among them counts as lost, and the record of it goes to the state log.
    fn lose(&self, from: u64, to: u64, why: &str) {
        tracing::warn!(
            "{}/{} subscription {}: offsets {from}..{to} {why}; counted as lost",
            self.topic,
            self.partition,
            self.name
        );
        let op = self.state.borrow_mut().lose(from, to);
        if let Some(op) = op {
            self.append(&op);
        }
    }

    /// Waits until the state log holds everything up to `seq` durably.
    pub async fn durable(&self, seq: u64) -> Result<(), StorageError> {
        self.store.durable(seq).await
    }

    /// The sequence number of the last state record.
    pub fn last_seq(&self) -> u64 {
        self.store.last_seq()
    }

    /// Applies the passage of time; returns true when some event became deliverable (and
    /// wakes waiting receivers). Events due for dead-lettering are queued.
    pub fn tick(&self, now_ms: i64) -> bool {
        let (dead, ready) = {
            let mut st = self.state.borrow_mut();
            let dead = st.tick(now_ms, &self.config);
            (dead, st.has_ready())
        };
        if !dead.is_empty() {
            self.dead_letters.borrow_mut().extend(dead);
        }
        if ready {
            self.notify();
        }
        ready
    }

    /// True when a receive could find something now: a redelivery, or data not looked at yet.
    pub fn deliverable(&self, now_ms: i64) -> bool {
        self.tick(now_ms);
        let st = self.state.borrow();
        st.has_ready()
            || (st.cursor() < self.log.high_watermark()
                && st.unsettled() < self.limits.max_unsettled)
    }

    /// The earliest time at which a lock or a delay may end.
    pub fn next_due_ms(&self) -> Option<i64> {
        self.state.borrow().next_due_ms()
    }

    /// A receiver that resolves when a release or an expiry makes an event deliverable, or the
    /// subscription closes.
    pub fn waiter(&self) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        let mut waiters = self.waiters.borrow_mut();
        waiters.retain(|w| !w.is_canceled()); // receivers that gave up
        waiters.push(tx);
        rx
    }

    /// Waits until new data is appended to the partition, at most `wait`.
    pub async fn wait_for_data(&self, wait: Duration) {
        let hw = self.log.high_watermark();
        let _ = self.log.fetch(hw, 1, wait).await;
    }

    /// Queued dead letters (at most `max`), taken for the broker to process.
    pub fn take_dead_letters(&self, max: usize) -> Vec<DeadLetter> {
        let mut queue = self.dead_letters.borrow_mut();
        let n = queue.len().min(max);
        queue.drain(..n).collect()
    }

    /// Gives dead letters back after a failed attempt, to be tried again later.
    pub fn requeue_dead_letters(&self, items: Vec<DeadLetter>) {
        self.dead_letters.borrow_mut().extend(items);
    }

    /// True when dead letters are queued.
    pub fn has_dead_letters(&self) -> bool {
        !self.dead_letters.borrow().is_empty()
    }

    /// Records that a dead letter was appended to the dead-letter topic (or dropped); returns
    /// the state-log sequence number to wait for.
    pub fn settle_dead_letter(&self, offset: u64, dead_lettered: bool) -> u64 {
        let op = self.state.borrow_mut().settle(offset, dead_lettered);
        match op {
            Some(op) => self.append(&op),
            None => self.store.last_seq(),
        }
    }

    /// Reads the records at `offsets` (ascending) from the log. Offsets whose data is gone
    /// (deleted by retention, or in a range recovery found corrupt) are missing from the
    /// result; a checksum failure outside such a range is an error (`Corrupt`).
    pub async fn read_records(
        &self,
        offsets: &[u64],
    ) -> Result<BTreeMap<u64, Vec<u8>>, StorageError> {
        let mut found = BTreeMap::new();
        let mut i = 0usize;
        while i < offsets.len() {
            let want = offsets[i];
            let data = match self.log.fetch(want, SCAN_BYTES, Duration::ZERO).await {
                Ok(data) => data,
                Err(StorageError::OffsetOutOfRange { .. }) => {
                    i += 1;
                    continue;
                }
                Err(StorageError::Corrupt(_)) if self.log.corrupt_range_around(want).is_some() => {
                    i += 1;
                    continue;
                }
                Err(e) => return Err(e),
            };
            let mut last = None;
            for_each_record(&data.batches.contiguous(), |offset, bytes, _| {
                last = Some(offset);
                if offsets[i..].binary_search(&offset).is_ok() {
                    found.insert(offset, bytes.to_vec());
                }
                true
            })?;
            // Move past every wanted offset the read covered (found or not).
            let covered = last.map_or(want, |l| l.max(want));
            while i < offsets.len() && offsets[i] <= covered {
                i += 1;
            }
        }
        Ok(found)
    }

    /// Locks up to `max` events (about `max_bytes` of records) for a receiver: redeliveries
    /// first, then new events past the cursor that match the filter. The locks are recorded
    /// but not yet durable: wait for [`SubscriptionPartition::durable`] of
    /// [`SubscriptionPartition::last_seq`] before handing them out.
    pub async fn receive(
        &self,
        max: usize,
        max_bytes: usize,
    ) -> Result<Vec<Delivered>, StorageError> {
        let mut out: Vec<Delivered> = Vec::new();
        let mut bytes = 0usize;
        if self.closed.get() || max == 0 {
            return Ok(out);
        }
        let now = now_ms();
        self.tick(now);
        let (leases, dead) = {
            let mut st = self.state.borrow_mut();
            let mut nonces = self.nonces.borrow_mut();
            st.take_ready(max, now, &self.config, &mut nonces)
        };
        self.dead_letters.borrow_mut().extend(dead);
        if !leases.is_empty() {
            for (_, op) in &leases {
                self.append(op);
            }
            let offsets: Vec<u64> = leases.iter().map(|(l, _)| l.offset).collect();
            let records = self.read_records(&offsets).await?;
            for (lease, _) in leases {
                match records.get(&lease.offset) {
                    Some(record) => {
                        bytes += record.len();
                        out.push(self.delivered(lease, record.clone()));
                    }
                    None => self.lose(
                        lease.offset,
                        lease.offset + 1,
                        "are gone from the log before they were settled",
                    ),
                }
            }
        }
        let mut steps = 0;
        while out.len() < max && bytes < max_bytes && steps < MAX_SCAN_STEPS {
            steps += 1;
            let from = {
                let st = self.state.borrow();
                if st.unsettled() >= self.limits.max_unsettled {
                    break;
                }
                st.cursor()
            };
            if from >= self.log.high_watermark() {
                break;
            }
            let data = match self.log.fetch(from, SCAN_BYTES, Duration::ZERO).await {
                Ok(data) => data,
                Err(StorageError::OffsetOutOfRange {
                    log_start_offset, ..
                }) => {
                    let why = "were removed by retention before the subscription read them";
                    self.lose(from, log_start_offset, why);
                    continue;
                }
                Err(StorageError::Corrupt(why)) => match self.log.corrupt_range_around(from) {
                    // Known-corrupt offsets can never be delivered: move past them.
                    Some((_, last)) => {
                        self.lose(from, last + 1, &format!("fail their checksum ({why})"));
                        continue;
                    }
                    None => return Err(StorageError::Corrupt(why)),
                },
                Err(e) => return Err(e),
            };
            if data.batches.is_empty() {
                break;
            }
            let now = now_ms();
            let mut st = self.state.borrow_mut();
            let mut nonces = self.nonces.borrow_mut();
            let mut dead = Vec::new();
            let mut ops = Vec::new();
            for_each_record(&data.batches.contiguous(), |offset, raw, record| {
                if out.len() >= max
                    || bytes >= max_bytes
                    || st.unsettled() >= self.limits.max_unsettled
                {
                    return false;
                }
                let matches = self.config.filter.matches(record);
                match st.offer(
                    offset,
                    record.timestamp_ms,
                    matches,
                    now,
                    &self.config,
                    &mut nonces,
                ) {
                    Offer::Locked(lease, op) => {
                        ops.push(op);
                        bytes += raw.len();
                        out.push(self.delivered(lease, raw.to_vec()));
                    }
                    Offer::Expired(dl) => dead.push(dl),
                    Offer::Stale | Offer::Skipped => {}
                }
                true
            })?;
            drop(nonces);
            drop(st);
            for op in &ops {
                self.append(op);
            }
            self.dead_letters.borrow_mut().extend(dead);
        }
        Ok(out)
    }

    fn delivered(&self, lease: Lease, record: Vec<u8>) -> Delivered {
        Delivered {
            token: LockToken {
                partition: self.partition,
                offset: lease.offset,
                nonce: lease.nonce,
            },
            delivery_count: lease.delivery_count,
            locked_until_ms: lease.until_ms,
            record,
        }
    }

    /// Applies one action to the event a token names.
    pub fn settle(&self, token: LockToken, action: SettleAction) -> Result<Settled, LockError> {
        let now = now_ms();
        let (offset, nonce) = (token.offset, token.nonce);
        let result = {
            let mut st = self.state.borrow_mut();
            match action {
                SettleAction::Ack => st.ack(offset, nonce, now).map(|op| (Some(op), None, None)),
                SettleAction::Release(delay_ms) => st
                    .release(offset, nonce, now, delay_ms)
                    .map(|op| (Some(op), None, None)),
                SettleAction::Renew => st
                    .renew(offset, nonce, now, self.config.lock_duration_ms)
                    .map(|(op, until)| (Some(op), Some(until), None)),
                SettleAction::Reject => st
                    .reject(offset, nonce, now)
                    .map(|dl| (None, None, Some(dl))),
            }
        };
        let (op, until, dead) = result?;
        if let Some(dl) = dead {
            return Ok(Settled::DeadLetter(dl));
        }
        let seq = match op {
            Some(op) => self.append(&op),
            None => self.store.last_seq(),
        };
        if matches!(action, SettleAction::Release(0)) {
            self.tick(now);
        }
        Ok(Settled::Recorded {
            seq,
            locked_until_ms: until,
        })
    }

    /// (locked, backlog, counters): backlog counts events waiting for delivery and events not
    /// looked at yet (some of which may not match the filter).
    pub fn stats(&self) -> (u64, u64, super::state::Counters) {
        let st = self.state.borrow();
        let (locked, waiting) = st.census(now_ms());
        let unscanned = self.log.high_watermark().saturating_sub(st.cursor());
        (locked, waiting + unscanned, st.counters())
    }
}
