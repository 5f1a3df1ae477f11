//! The delivery state of one subscription on one partition, and the records that make it
//! durable. Pure logic: no I/O, no clock (callers pass `now_ms`), so every rule is unit-tested
//! here.
//!
//! Offsets below `cursor` have been looked at. Of those, the ones still in `entries` matched
//! the filter and are not settled yet (available, locked or being dead-lettered); every other
//! offset below the cursor is done (acknowledged, dead-lettered, dropped, or not matching). The
//! ack floor is the lowest entry, or the cursor when there is none.
//!
//! Records (`Op`), replayed in order at start, rebuild the state: `Snapshot` resets it;
//! `Lock` and `Available` set an entry absolutely; `Ack` and `Settled` remove one. Every
//! change to the state is recorded at the moment it is made, except two that replay
//! reproduces by itself: the cursor passing events that do not match (they are looked at
//! again) and an expired lock (its `Lock` record carries the expiry time).

use std::collections::{BTreeMap, BTreeSet};

use super::{Nonces, SubscriptionConfig};

/// Why an event goes to the dead-letter topic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeadLetterReason {
    /// It was delivered `max_deliveries` times without being acknowledged.
    MaxDeliveries,
    /// It outlived the subscription's time-to-live.
    TtlExpired,
    /// A receiver rejected it.
    Rejected,
}

impl DeadLetterReason {
    /// The value of the `deadletterreason` header.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::MaxDeliveries => "max-deliveries",
            Self::TtlExpired => "ttl-expired",
            Self::Rejected => "rejected",
        }
    }
}

/// An event to dead-letter (or drop, without a dead-letter topic).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeadLetter {
    /// Its offset.
    pub offset: u64,
    /// Why.
    pub reason: DeadLetterReason,
    /// How many times it was delivered.
    pub delivery_count: u32,
}

/// Why a lock token was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockError {
    /// No unsettled event at that offset: acknowledged, dead-lettered, or never delivered.
    Settled,
    /// The lock expired.
    Expired,
    /// The event is not locked now (released, or being dead-lettered).
    NotLocked,
    /// The event is locked under another delivery (the token is from an earlier one).
    OtherDelivery,
}

impl std::fmt::Display for LockError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Settled => "the event is already settled or was never delivered",
            Self::Expired => "the lock expired",
            Self::NotLocked => "the event is not locked (released or being dead-lettered)",
            Self::OtherDelivery => "the event was delivered again under another token",
        })
    }
}

/// Where an unsettled event stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryState {
    /// Deliverable from `not_before_ms` on.
    Available {
        /// Not delivered before this time.
        not_before_ms: i64,
    },
    /// Locked to one receiver.
    Locked {
        /// Names the delivery (the token's nonce).
        nonce: u64,
        /// When the lock ends.
        until_ms: i64,
    },
    /// On its way to the dead-letter topic.
    Settling,
}

/// One unsettled event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Deliveries so far.
    pub delivery_count: u32,
    /// Record time, for the TTL.
    pub timestamp_ms: i64,
    /// The nonce of the last delivery while its lock was not released (0 otherwise): tells a
    /// token whose lock expired from one that never held it.
    pub last_nonce: u64,
    /// Where it stands.
    pub state: EntryState,
}

/// A fresh lock on an event, to be returned to a receiver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lease {
    /// The event's offset.
    pub offset: u64,
    /// This delivery's number (1 for the first).
    pub delivery_count: u32,
    /// The token's nonce.
    pub nonce: u64,
    /// When the lock ends.
    pub until_ms: i64,
}

/// What happened to an event offered by a scan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Offer {
    /// Below the cursor (another receiver looked at it first): ignore.
    Stale,
    /// It does not match: passed.
    Skipped,
    /// Locked for the caller; persist the op.
    Locked(Lease, Op),
    /// Too old: dead-letter it.
    Expired(DeadLetter),
}

/// Totals kept with the state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Events acknowledged.
    pub acked: u64,
    /// Events appended to the dead-letter topic.
    pub dead_lettered: u64,
    /// Events dropped for want of a dead-letter topic.
    pub dropped: u64,
    /// Offsets lost before they were settled: removed by retention, or in a range of the log
    /// that failed its checksum. Offsets the cursor had not reached count whether or not they
    /// would have matched the filter.
    pub lost: u64,
}

/// A persisted change to the state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Resets the state: the first record of every file.
    Snapshot {
        /// Lowest unsettled offset.
        floor: u64,
        /// Next offset to look at.
        cursor: u64,
        /// Totals.
        counters: Counters,
    },
    /// The event is locked (a delivery or a renewal).
    Lock {
        /// Offset.
        offset: u64,
        /// Deliveries so far, this one included.
        delivery_count: u32,
        /// The delivery's nonce.
        nonce: u64,
        /// End of the lock.
        until_ms: i64,
        /// Record time.
        timestamp_ms: i64,
    },
    /// The event is deliverable from `not_before_ms` (a release, or a snapshot entry).
    Available {
        /// Offset.
        offset: u64,
        /// Deliveries so far.
        delivery_count: u32,
        /// Not delivered before this.
        not_before_ms: i64,
        /// Record time.
        timestamp_ms: i64,
    },
    /// Acknowledged.
    Ack {
        /// Offset.
        offset: u64,
    },
    /// Dead-lettered (`true`) or dropped.
    Settled {
        /// Offset.
        offset: u64,
        /// True when it went to the dead-letter topic.
        dead_lettered: bool,
    },
    /// Offsets `from..to` can no longer be read (retention removed them, or they fail their
    /// checksum): entries among them are forgotten, the cursor moves to `to`, and the ones not
    /// settled before count as lost.
    Lost {
        /// First offset lost.
        from: u64,
        /// Offset after the last one lost.
        to: u64,
        /// How many of them count as lost (entries and offsets past the cursor).
        count: u64,
    },
}

const SNAPSHOT: u8 = 1;
const LOCK: u8 = 2;
const AVAILABLE: u8 = 3;
const ACK: u8 = 4;
const SETTLED: u8 = 5;
const LOST: u8 = 6;

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn u64(&mut self) -> Result<u64, String> {
        if self.0.len() < 8 {
            return Err("state record is truncated".into());
        }
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.0[..8]);
        self.0 = &self.0[8..];
        Ok(u64::from_le_bytes(b))
    }
    fn i64(&mut self) -> Result<i64, String> {
        self.u64().map(|v| v as i64)
    }
    fn u32(&mut self) -> Result<u32, String> {
        if self.0.len() < 4 {
            return Err("state record is truncated".into());
        }
        let mut b = [0u8; 4];
        b.copy_from_slice(&self.0[..4]);
        self.0 = &self.0[4..];
        Ok(u32::from_le_bytes(b))
    }
}

impl Op {
    /// The record's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(48);
        match *self {
            Op::Snapshot {
                floor,
                cursor,
                counters,
            } => {
                out.push(SNAPSHOT);
                for v in [
                    floor,
                    cursor,
                    counters.acked,
                    counters.dead_lettered,
                    counters.dropped,
                    counters.lost,
                ] {
                    out.extend_from_slice(&v.to_le_bytes());
                }
            }
            Op::Lock {
                offset,
                delivery_count,
                nonce,
                until_ms,
                timestamp_ms,
            } => {
                out.push(LOCK);
                out.extend_from_slice(&offset.to_le_bytes());
                out.extend_from_slice(&delivery_count.to_le_bytes());
                out.extend_from_slice(&nonce.to_le_bytes());
                out.extend_from_slice(&until_ms.to_le_bytes());
                out.extend_from_slice(&timestamp_ms.to_le_bytes());
            }
            Op::Available {
                offset,
                delivery_count,
                not_before_ms,
                timestamp_ms,
            } => {
                out.push(AVAILABLE);
                out.extend_from_slice(&offset.to_le_bytes());
                out.extend_from_slice(&delivery_count.to_le_bytes());
                out.extend_from_slice(&not_before_ms.to_le_bytes());
                out.extend_from_slice(&timestamp_ms.to_le_bytes());
            }
            Op::Ack { offset } => {
                out.push(ACK);
                out.extend_from_slice(&offset.to_le_bytes());
            }
            Op::Settled {
                offset,
                dead_lettered,
            } => {
                out.push(SETTLED);
                out.extend_from_slice(&offset.to_le_bytes());
                out.push(u8::from(dead_lettered));
            }
            Op::Lost { from, to, count } => {
                out.push(LOST);
                for v in [from, to, count] {
                    out.extend_from_slice(&v.to_le_bytes());
                }
            }
        }
        out
    }

    /// Reads a record.
    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        let Some((&kind, rest)) = bytes.split_first() else {
            return Err("empty state record".into());
        };
        let mut r = Reader(rest);
        let op = match kind {
            SNAPSHOT => Op::Snapshot {
                floor: r.u64()?,
                cursor: r.u64()?,
                counters: Counters {
                    acked: r.u64()?,
                    dead_lettered: r.u64()?,
                    dropped: r.u64()?,
                    // Snapshots written before `lost` existed end here.
                    lost: if r.0.is_empty() { 0 } else { r.u64()? },
                },
            },
            LOCK => Op::Lock {
                offset: r.u64()?,
                delivery_count: r.u32()?,
                nonce: r.u64()?,
                until_ms: r.i64()?,
                timestamp_ms: r.i64()?,
            },
            AVAILABLE => Op::Available {
                offset: r.u64()?,
                delivery_count: r.u32()?,
                not_before_ms: r.i64()?,
                timestamp_ms: r.i64()?,
            },
            ACK => Op::Ack { offset: r.u64()? },
            SETTLED => {
                let offset = r.u64()?;
                let Some(&flag) = r.0.first() else {
                    return Err("state record is truncated".into());
                };
                r.0 = &r.0[1..];
                Op::Settled {
                    offset,
                    dead_lettered: flag == 1,
                }
            }
            LOST => Op::Lost {
                from: r.u64()?,
                to: r.u64()?,
                count: r.u64()?,
            },
            other => return Err(format!("unknown state record kind {other}")),
        };
        if !r.0.is_empty() {
            return Err("state record has trailing bytes".into());
        }
        Ok(op)
    }
}

/// The delivery state of one subscription on one partition.
#[derive(Clone, Debug, Default)]
pub struct SubState {
    cursor: u64,
    entries: BTreeMap<u64, Entry>,
    /// Available entries whose time has come, delivered in offset order.
    ready: BTreeSet<u64>,
    /// (due time, offset) of locks and delayed entries; may hold stale pairs, checked on use.
    timers: BTreeSet<(i64, u64)>,
    counters: Counters,
}

impl SubState {
    /// A fresh state starting at `offset`.
    pub fn new(offset: u64) -> Self {
        Self {
            cursor: offset,
            ..Self::default()
        }
    }

    /// Rebuilds the state from its records, in order.
    pub fn replay<'a>(records: impl IntoIterator<Item = &'a [u8]>) -> Result<Self, String> {
        let mut state = Self::default();
        let mut floor = 0u64;
        for bytes in records {
            match Op::decode(bytes)? {
                Op::Snapshot {
                    floor: f,
                    cursor,
                    counters,
                } => {
                    state = Self::new(cursor);
                    state.counters = counters;
                    floor = f;
                }
                Op::Lock {
                    offset,
                    delivery_count,
                    nonce,
                    until_ms,
                    timestamp_ms,
                } if offset >= floor => {
                    state.set(
                        offset,
                        Entry {
                            delivery_count,
                            timestamp_ms,
                            last_nonce: nonce,
                            state: EntryState::Locked { nonce, until_ms },
                        },
                    );
                }
                Op::Available {
                    offset,
                    delivery_count,
                    not_before_ms,
                    timestamp_ms,
                } if offset >= floor => {
                    state.set(
                        offset,
                        Entry {
                            delivery_count,
                            timestamp_ms,
                            last_nonce: 0,
                            state: EntryState::Available { not_before_ms },
                        },
                    );
                }
                Op::Ack { offset } => {
                    if state.entries.remove(&offset).is_some() {
                        state.counters.acked += 1;
                    }
                }
                Op::Settled {
                    offset,
                    dead_lettered,
                } => {
                    let present = state.entries.remove(&offset).is_some();
                    if present || offset >= state.cursor {
                        state.count_settled(dead_lettered);
                    }
                    state.cursor = state.cursor.max(offset + 1);
                }
                Op::Lost { from, to, count } => state.apply_lost(from, to, count),
                Op::Lock { .. } | Op::Available { .. } => {}
            }
        }
        state.ready.clear();
        Ok(state)
    }

    /// Inserts or replaces an entry during replay, with its timer.
    fn set(&mut self, offset: u64, entry: Entry) {
        self.cursor = self.cursor.max(offset + 1);
        match entry.state {
            EntryState::Locked { until_ms, .. } => {
                self.timers.insert((until_ms, offset));
            }
            EntryState::Available { not_before_ms } => {
                self.timers.insert((not_before_ms, offset));
            }
            EntryState::Settling => {}
        }
        self.entries.insert(offset, entry);
    }

    fn count_settled(&mut self, dead_lettered: bool) {
        if dead_lettered {
            self.counters.dead_lettered += 1;
        } else {
            self.counters.dropped += 1;
        }
    }

    /// The records that rebuild this state: a snapshot and one record per entry. Entries on
    /// their way to the dead-letter topic are written as available, so that a restart looks
    /// at them again.
    pub fn snapshot(&self) -> Vec<Op> {
        let mut ops = Vec::with_capacity(1 + self.entries.len());
        ops.push(Op::Snapshot {
            floor: self.floor(),
            cursor: self.cursor,
            counters: self.counters,
        });
        for (&offset, e) in &self.entries {
            ops.push(match e.state {
                EntryState::Locked { nonce, until_ms } => Op::Lock {
                    offset,
                    delivery_count: e.delivery_count,
                    nonce,
                    until_ms,
                    timestamp_ms: e.timestamp_ms,
                },
                EntryState::Available { not_before_ms } => Op::Available {
                    offset,
                    delivery_count: e.delivery_count,
                    not_before_ms,
                    timestamp_ms: e.timestamp_ms,
                },
                EntryState::Settling => Op::Available {
                    offset,
                    delivery_count: e.delivery_count,
                    not_before_ms: 0,
                    timestamp_ms: e.timestamp_ms,
                },
            });
        }
        ops
    }

    /// Next offset a scan looks at.
    pub fn cursor(&self) -> u64 {
        self.cursor
    }

    /// The ack floor: every offset below it is settled.
    pub fn floor(&self) -> u64 {
        self.entries
            .keys()
            .next()
            .map_or(self.cursor, |&o| o.min(self.cursor))
    }

    /// Totals.
    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// Unsettled events.
    pub fn unsettled(&self) -> usize {
        self.entries.len()
    }

    /// The entry at `offset`, if unsettled.
    pub fn entry(&self, offset: u64) -> Option<&Entry> {
        self.entries.get(&offset)
    }

    /// (locked now, waiting for delivery) among the unsettled events.
    pub fn census(&self, now_ms: i64) -> (u64, u64) {
        let locked = self
            .entries
            .values()
            .filter(|e| matches!(e.state, EntryState::Locked { until_ms, .. } if until_ms > now_ms))
            .count() as u64;
        (locked, self.entries.len() as u64 - locked)
    }

    /// True when an event can be delivered now without looking at new data.
    pub fn has_ready(&self) -> bool {
        !self.ready.is_empty()
    }

    /// The earliest time a lock or delay may end (possibly stale, never late).
    pub fn next_due_ms(&self) -> Option<i64> {
        self.timers.first().map(|&(due, _)| due)
    }

    /// Applies the passage of time: expired locks and ended delays make events deliverable
    /// again, or, past the delivery limit or the TTL, returns them for dead-lettering.
    pub fn tick(&mut self, now_ms: i64, config: &SubscriptionConfig) -> Vec<DeadLetter> {
        let mut dead = Vec::new();
        while let Some(&(due, offset)) = self.timers.first() {
            if due > now_ms {
                break;
            }
            self.timers.pop_first();
            let Some(entry) = self.entries.get_mut(&offset) else {
                continue;
            };
            let current = match entry.state {
                EntryState::Locked { until_ms, .. } => until_ms == due,
                EntryState::Available { not_before_ms } => not_before_ms == due,
                EntryState::Settling => false,
            };
            if !current {
                continue; // a stale timer: the entry changed since
            }
            let reason = if entry.delivery_count >= config.max_deliveries {
                Some(DeadLetterReason::MaxDeliveries)
            } else if config.expired(entry.timestamp_ms, now_ms) {
                Some(DeadLetterReason::TtlExpired)
            } else {
                None
            };
            match reason {
                Some(reason) => {
                    entry.state = EntryState::Settling;
                    dead.push(DeadLetter {
                        offset,
                        reason,
                        delivery_count: entry.delivery_count,
                    });
                }
                None => {
                    entry.state = EntryState::Available { not_before_ms: due };
                    self.ready.insert(offset);
                }
            }
        }
        dead
    }

    fn lease(
        &mut self,
        offset: u64,
        now_ms: i64,
        config: &SubscriptionConfig,
        nonces: &mut Nonces,
    ) -> Option<(Lease, Op)> {
        let entry = self.entries.get_mut(&offset)?;
        let nonce = nonces.next_u64();
        let until_ms = now_ms + i64::from(config.lock_duration_ms);
        entry.delivery_count += 1;
        entry.last_nonce = nonce;
        entry.state = EntryState::Locked { nonce, until_ms };
        self.timers.insert((until_ms, offset));
        let lease = Lease {
            offset,
            delivery_count: entry.delivery_count,
            nonce,
            until_ms,
        };
        let op = Op::Lock {
            offset,
            delivery_count: entry.delivery_count,
            nonce,
            until_ms,
            timestamp_ms: entry.timestamp_ms,
        };
        Some((lease, op))
    }

    /// Locks up to `max` events that are deliverable again (redeliveries), lowest offsets
    /// first. Events past their TTL are returned for dead-lettering instead.
    pub fn take_ready(
        &mut self,
        max: usize,
        now_ms: i64,
        config: &SubscriptionConfig,
        nonces: &mut Nonces,
    ) -> (Vec<(Lease, Op)>, Vec<DeadLetter>) {
        let mut leases = Vec::new();
        let mut dead = Vec::new();
        while leases.len() < max {
            let Some(offset) = self.ready.pop_first() else {
                break;
            };
            let Some(entry) = self.entries.get_mut(&offset) else {
                continue;
            };
            if !matches!(entry.state, EntryState::Available { .. }) {
                continue;
            }
            if config.expired(entry.timestamp_ms, now_ms) {
                entry.state = EntryState::Settling;
                dead.push(DeadLetter {
                    offset,
                    reason: DeadLetterReason::TtlExpired,
                    delivery_count: entry.delivery_count,
                });
                continue;
            }
            if let Some(lease) = self.lease(offset, now_ms, config, nonces) {
                leases.push(lease);
            }
        }
        (leases, dead)
    }

    /// Offers the next event a scan found at `offset` (ascending, at or above the cursor).
    pub fn offer(
        &mut self,
        offset: u64,
        timestamp_ms: i64,
        matches: bool,
        now_ms: i64,
        config: &SubscriptionConfig,
        nonces: &mut Nonces,
    ) -> Offer {
        if offset < self.cursor {
            return Offer::Stale;
        }
        self.cursor = offset + 1;
        if !matches {
            return Offer::Skipped;
        }
        let mut entry = Entry {
            delivery_count: 0,
            timestamp_ms,
            last_nonce: 0,
            state: EntryState::Available { not_before_ms: 0 },
        };
        if config.expired(timestamp_ms, now_ms) {
            entry.state = EntryState::Settling;
            self.entries.insert(offset, entry);
            return Offer::Expired(DeadLetter {
                offset,
                reason: DeadLetterReason::TtlExpired,
                delivery_count: 0,
            });
        }
        self.entries.insert(offset, entry);
        match self.lease(offset, now_ms, config, nonces) {
            Some((lease, op)) => Offer::Locked(lease, op),
            None => Offer::Skipped,
        }
    }

    fn locked(&mut self, offset: u64, nonce: u64, now_ms: i64) -> Result<&mut Entry, LockError> {
        let entry = self.entries.get_mut(&offset).ok_or(LockError::Settled)?;
        match entry.state {
            EntryState::Locked { nonce: n, .. } if n != nonce => Err(LockError::OtherDelivery),
            EntryState::Locked { until_ms, .. } if until_ms <= now_ms => Err(LockError::Expired),
            EntryState::Locked { .. } => Ok(entry),
            EntryState::Available { .. } if entry.last_nonce == nonce => Err(LockError::Expired),
            _ => Err(LockError::NotLocked),
        }
    }

    /// Acknowledges a locked event: it is never delivered again.
    pub fn ack(&mut self, offset: u64, nonce: u64, now_ms: i64) -> Result<Op, LockError> {
        self.locked(offset, nonce, now_ms)?;
        self.entries.remove(&offset);
        self.counters.acked += 1;
        Ok(Op::Ack { offset })
    }

    /// Unlocks an event: deliverable again `delay_ms` from now.
    pub fn release(
        &mut self,
        offset: u64,
        nonce: u64,
        now_ms: i64,
        delay_ms: u32,
    ) -> Result<Op, LockError> {
        let entry = self.locked(offset, nonce, now_ms)?;
        let not_before_ms = now_ms + i64::from(delay_ms);
        entry.last_nonce = 0;
        entry.state = EntryState::Available { not_before_ms };
        let op = Op::Available {
            offset,
            delivery_count: entry.delivery_count,
            not_before_ms,
            timestamp_ms: entry.timestamp_ms,
        };
        self.timers.insert((not_before_ms, offset));
        Ok(op)
    }

    /// Extends a lock by `lock_ms` from now; returns the record and the new end.
    pub fn renew(
        &mut self,
        offset: u64,
        nonce: u64,
        now_ms: i64,
        lock_ms: u32,
    ) -> Result<(Op, i64), LockError> {
        let entry = self.locked(offset, nonce, now_ms)?;
        let until_ms = now_ms + i64::from(lock_ms);
        let old = std::mem::replace(&mut entry.state, EntryState::Locked { nonce, until_ms });
        let op = Op::Lock {
            offset,
            delivery_count: entry.delivery_count,
            nonce,
            until_ms,
            timestamp_ms: entry.timestamp_ms,
        };
        // The old lock's timer goes: a client renewing often would otherwise pile up one
        // entry per renewal until each old lock end.
        if let EntryState::Locked { until_ms: old, .. } = old {
            self.timers.remove(&(old, offset));
        }
        self.timers.insert((until_ms, offset));
        Ok((op, until_ms))
    }

    /// Rejects a locked event: it is to be dead-lettered now.
    pub fn reject(
        &mut self,
        offset: u64,
        nonce: u64,
        now_ms: i64,
    ) -> Result<DeadLetter, LockError> {
        let entry = self.locked(offset, nonce, now_ms)?;
        entry.state = EntryState::Settling;
        Ok(DeadLetter {
            offset,
            reason: DeadLetterReason::Rejected,
            delivery_count: entry.delivery_count,
        })
    }

    /// Records that an event being dead-lettered went to the dead-letter topic (or was
    /// dropped). `None` if it was not waiting for that.
    pub fn settle(&mut self, offset: u64, dead_lettered: bool) -> Option<Op> {
        let entry = self.entries.get(&offset)?;
        if entry.state != EntryState::Settling {
            return None;
        }
        self.entries.remove(&offset);
        self.count_settled(dead_lettered);
        Some(Op::Settled {
            offset,
            dead_lettered,
        })
    }

    /// Gives up offsets `from..to` that can no longer be read (retention removed them, or they
    /// fail their checksum): unsettled entries among them, whatever their state, and offsets
    /// the cursor had not reached count as lost. Returns the record, if anything changed.
    pub fn lose(&mut self, from: u64, to: u64) -> Option<Op> {
        let entries = self.entries.range(from..to).count() as u64;
        let unread = to.saturating_sub(self.cursor.max(from));
        if entries + unread == 0 {
            return None;
        }
        let count = entries + unread;
        self.apply_lost(from, to, count);
        Some(Op::Lost { from, to, count })
    }

    fn apply_lost(&mut self, from: u64, to: u64, count: u64) {
        let gone: Vec<u64> = self.entries.range(from..to).map(|(&o, _)| o).collect();
        for offset in gone {
            self.entries.remove(&offset);
            self.ready.remove(&offset);
        }
        self.cursor = self.cursor.max(to);
        self.counters.lost += count;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> SubscriptionConfig {
        SubscriptionConfig {
            lock_duration_ms: 1_000,
            max_deliveries: 3,
            ..SubscriptionConfig::default()
        }
    }

    fn replayed(ops: &[Op]) -> SubState {
        let bytes: Vec<Vec<u8>> = ops.iter().map(Op::encode).collect();
        SubState::replay(bytes.iter().map(Vec::as_slice)).expect("replay")
    }

    #[test]
    fn ops_round_trip() {
        let ops = [
            Op::Snapshot {
                floor: 1,
                cursor: 9,
                counters: Counters {
                    acked: 2,
                    dead_lettered: 3,
                    dropped: 4,
                    lost: 6,
                },
            },
            Op::Lost {
                from: 3,
                to: 30,
                count: 28,
            },
            Op::Lock {
                offset: 5,
                delivery_count: 2,
                nonce: 77,
                until_ms: 1_000,
                timestamp_ms: -5,
            },
            Op::Available {
                offset: 6,
                delivery_count: 1,
                not_before_ms: 12,
                timestamp_ms: 3,
            },
            Op::Ack { offset: 8 },
            Op::Settled {
                offset: 7,
                dead_lettered: true,
            },
        ];
        for op in ops {
            assert_eq!(Op::decode(&op.encode()), Ok(op));
            let bytes = op.encode();
            assert!(Op::decode(&bytes[..bytes.len() - 1]).is_err());
        }
        assert!(Op::decode(&[99]).is_err());
    }

    #[test]
    fn deliver_expire_redeliver_and_dead_letter_after_max() {
        let cfg = config();
        let mut nonces = Nonces::new(7);
        let mut s = SubState::new(0);
        let Offer::Locked(first, _) = s.offer(0, 0, true, 0, &cfg, &mut nonces) else {
            panic!("not locked");
        };
        assert_eq!(first.delivery_count, 1);
        assert_eq!(s.offer(1, 0, false, 0, &cfg, &mut nonces), Offer::Skipped);
        assert_eq!(s.offer(1, 0, true, 0, &cfg, &mut nonces), Offer::Stale);
        assert!(s.tick(999, &cfg).is_empty());
        assert!(!s.has_ready());
        assert!(s.tick(1_000, &cfg).is_empty());
        assert!(s.has_ready());
        assert_eq!(s.ack(0, first.nonce, 1_000), Err(LockError::Expired));
        let (leases, _) = s.take_ready(10, 1_000, &cfg, &mut nonces);
        assert_eq!(leases.len(), 1);
        let second = leases[0].0;
        assert_eq!(second.delivery_count, 2);
        assert_eq!(s.ack(0, first.nonce, 1_001), Err(LockError::OtherDelivery));
        s.tick(2_000, &cfg);
        let (leases, _) = s.take_ready(10, 2_000, &cfg, &mut nonces);
        assert_eq!(leases[0].0.delivery_count, 3);
        let dead = s.tick(3_000, &cfg);
        assert_eq!(
            dead,
            vec![DeadLetter {
                offset: 0,
                reason: DeadLetterReason::MaxDeliveries,
                delivery_count: 3
            }]
        );
        assert!(s.settle(0, true).is_some());
        assert_eq!(s.counters().dead_lettered, 1);
        assert_eq!(s.floor(), 2);
    }

    #[test]
    fn ack_release_renew_reject() {
        let cfg = config();
        let mut nonces = Nonces::new(1);
        let mut s = SubState::new(10);
        let mut leases = Vec::new();
        for o in 10..14 {
            if let Offer::Locked(l, _) = s.offer(o, 0, true, 0, &cfg, &mut nonces) {
                leases.push(l);
            }
        }
        assert!(s.ack(10, leases[0].nonce, 500).is_ok());
        assert_eq!(s.ack(10, leases[0].nonce, 500), Err(LockError::Settled));
        assert_eq!(s.floor(), 11);
        // Release with a delay: not deliverable before it.
        s.release(11, leases[1].nonce, 500, 2_000).expect("release");
        // Renew: the lock outlives its first end.
        let (_, until) = s.renew(12, leases[2].nonce, 900, 1_000).expect("renew");
        assert_eq!(until, 1_900);
        // An ack after expiry is refused, whether or not the expiry was applied yet.
        assert_eq!(s.ack(13, leases[3].nonce, 1_000), Err(LockError::Expired));
        s.tick(1_500, &cfg);
        assert_eq!(s.ack(13, leases[3].nonce, 1_500), Err(LockError::Expired));
        assert_eq!(s.ack(11, leases[1].nonce, 1_500), Err(LockError::NotLocked));
        assert!(s.ack(12, leases[2].nonce, 1_500).is_ok());
        s.tick(2_499, &cfg);
        let (ready, _) = s.take_ready(10, 2_499, &cfg, &mut nonces);
        let offsets: Vec<u64> = ready.iter().map(|(l, _)| l.offset).collect();
        assert_eq!(offsets, vec![13], "11 is delayed until 2500");
        s.tick(2_500, &cfg);
        let (ready, _) = s.take_ready(10, 2_500, &cfg, &mut nonces);
        let offsets: Vec<u64> = ready.iter().map(|(l, _)| l.offset).collect();
        assert_eq!(offsets, vec![11]);
        let dl = s.reject(11, ready[0].0.nonce, 2_600).expect("reject");
        assert_eq!(dl.reason, DeadLetterReason::Rejected);
        assert_eq!(dl.delivery_count, 2);
        assert!(s.settle(11, false).is_some());
        assert_eq!(s.counters().dropped, 1);
    }

    #[test]
    fn renewing_a_lock_keeps_one_timer() {
        let cfg = config();
        let mut nonces = Nonces::new(5);
        let mut s = SubState::new(0);
        let Offer::Locked(lease, _) = s.offer(0, 0, true, 0, &cfg, &mut nonces) else {
            panic!("locked");
        };
        for now in 1..1_000 {
            s.renew(0, lease.nonce, now, 60_000).expect("renewed");
        }
        assert_eq!(s.timers.len(), 1);
        assert_eq!(s.next_due_ms(), Some(999 + 60_000));
    }

    #[test]
    fn offsets_lost_to_retention_are_counted_and_replayed() {
        let cfg = config();
        let mut nonces = Nonces::new(3);
        let mut s = SubState::new(0);
        let mut ops = vec![s.snapshot()[0]];
        for offset in 0..4 {
            let Offer::Locked(_, op) = s.offer(offset, 0, true, 0, &cfg, &mut nonces) else {
                panic!("offset {offset} is locked");
            };
            ops.push(op);
        }
        assert_eq!(s.offer(4, 0, false, 0, &cfg, &mut nonces), Offer::Skipped);
        // Retention removes 0..10: four locked events, and five offsets never read.
        ops.push(s.lose(0, 10).expect("something is lost"));
        assert_eq!(s.counters().lost, 9);
        assert_eq!((s.unsettled(), s.cursor()), (0, 10));
        assert_eq!(s.lose(0, 10), None, "nothing more to lose");
        let replayed = replayed(&ops);
        assert_eq!(replayed.counters(), s.counters());
        assert_eq!((replayed.unsettled(), replayed.cursor()), (0, 10));
        // A snapshot written before `lost` existed reads as 0 lost.
        let mut old = Op::Snapshot {
            floor: 1,
            cursor: 2,
            counters: Counters::default(),
        }
        .encode();
        old.truncate(old.len() - 8);
        assert!(
            matches!(Op::decode(&old), Ok(Op::Snapshot { counters, .. }) if counters.lost == 0)
        );
    }

    #[test]
    fn ttl_applies_at_scan_and_at_redelivery() {
        let cfg = SubscriptionConfig {
            ttl_ms: Some(1_000),
            ..config()
        };
        let mut nonces = Nonces::new(2);
        let mut s = SubState::new(0);
        assert!(matches!(
            s.offer(0, 0, true, 5_000, &cfg, &mut nonces),
            Offer::Expired(DeadLetter {
                reason: DeadLetterReason::TtlExpired,
                ..
            })
        ));
        assert!(matches!(
            s.offer(1, 4_500, true, 5_000, &cfg, &mut nonces),
            Offer::Locked(..)
        ));
        let dead = s.tick(6_000, &cfg);
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0].offset, 1);
        assert_eq!(dead[0].reason, DeadLetterReason::TtlExpired);
    }

    #[test]
    fn replay_rebuilds_what_was_recorded() {
        let cfg = config();
        let mut nonces = Nonces::new(3);
        let mut s = SubState::new(0);
        let mut ops = s.snapshot();
        let mut leases = Vec::new();
        for o in 0..6 {
            if let Offer::Locked(l, op) = s.offer(o, 0, o % 2 == 0, 0, &cfg, &mut nonces) {
                ops.push(op);
                leases.push(l);
            }
        }
        ops.push(s.ack(0, leases[0].nonce, 10).expect("ack"));
        ops.push(s.release(2, leases[1].nonce, 10, 50).expect("release"));
        let dl = s.reject(4, leases[2].nonce, 10).expect("reject");
        ops.push(s.settle(dl.offset, true).expect("settle"));
        let r = replayed(&ops);
        assert_eq!(r.cursor(), 5, "the cursor is past the last recorded offset");
        assert_eq!(r.floor(), 2);
        assert_eq!(r.counters(), s.counters());
        assert_eq!(r.entry(2), s.entry(2));
        assert!(r.entry(0).is_none());
        assert!(r.entry(4).is_none());
        // A snapshot of the live state replays to the same entries; replaying records that
        // the snapshot already reflects changes nothing.
        let snap = s.snapshot();
        let r2 = replayed(&snap);
        assert_eq!(r2.entries, s.entries);
        assert_eq!(r2.counters(), s.counters());
        let mut again = snap.clone();
        again.push(Op::Settled {
            offset: 4,
            dead_lettered: true,
        });
        assert_eq!(replayed(&again).counters(), s.counters());
        // Locks survive a restart with their nonce: a token stays valid until it expires.
        let lock = leases[1];
        let mut r3 = replayed(&ops[..3]);
        assert!(r3.ack(2, lock.nonce, 10).is_ok());
    }
}
