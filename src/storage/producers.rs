//! Idempotent producers' state in one partition: per producer id, its epoch and its last
//! [`REMEMBERED_BATCHES`] batches (first and last sequence, offsets), so that a resent batch
//! is recognised and answered with its original offsets instead of being written twice.
//!
//! The table is bounded (least recently seen producers are dropped past `max_producers`) and
//! forgets a producer idle for longer than `expiry_ms`. A producer the table does not know
//! (new, expired or dropped) is accepted at any sequence: its resends from before it was
//! forgotten can then be written twice, the price of a bounded table (Kafka's too).
//!
//! It is kept on disk as a snapshot taken at each checkpoint (`producers.snapshot` in the
//! partition directory, covering the offsets below its `next_offset`); at open the batches
//! after that are read back from the log to bring it up to date.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};

use crate::record::ProducerFields;

/// Batches remembered per producer: as many as a producer may have unanswered per partition.
pub const REMEMBERED_BATCHES: usize = 5;

const SNAPSHOT_MAGIC: &[u8; 8] = b"CBPROD01";
const SNAPSHOT_FILE: &str = "producers.snapshot";

/// One remembered batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SequencedBatch {
    /// Sequence of its first record.
    pub first_sequence: u32,
    /// Sequence of its last record.
    pub last_sequence: u32,
    /// Offset given to its first record.
    pub base_offset: u64,
    /// Offset given to its last record.
    pub last_offset: u64,
}

#[derive(Clone, Debug)]
struct ProducerState {
    epoch: u16,
    batches: VecDeque<SequencedBatch>,
    last_seen_ms: i64,
}

/// What the table says of an incoming batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sequenced {
    /// Not seen before: append it, then [`ProducerTable::record`] it.
    New,
    /// A resend of a batch the partition has: answer with its offsets.
    Duplicate(SequencedBatch),
}

/// Why a batch was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SequenceError {
    /// Its sequence does not follow the producer's last batch.
    OutOfOrder {
        /// The producer.
        producer_id: u64,
        /// The sequence that would follow.
        expected: u32,
        /// The batch's first sequence.
        found: u32,
    },
    /// It carries an older epoch than the partition has seen.
    Fenced {
        /// The producer.
        producer_id: u64,
        /// The epoch the partition has.
        current: u16,
        /// The batch's epoch.
        found: u16,
    },
}

impl std::fmt::Display for SequenceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::OutOfOrder {
                producer_id,
                expected,
                found,
            } => write!(
                f,
                "producer {producer_id}: batch at sequence {found}, expected {expected}"
            ),
            Self::Fenced {
                producer_id,
                current,
                found,
            } => write!(
                f,
                "producer {producer_id}: epoch {found} is fenced by epoch {current}"
            ),
        }
    }
}

/// The idempotent producers of one partition.
#[derive(Clone, Debug)]
pub struct ProducerTable {
    producers: HashMap<u64, ProducerState>,
    max_producers: usize,
    expiry_ms: i64,
    /// Changed since the last snapshot.
    dirty: bool,
}

impl ProducerTable {
    /// An empty table.
    pub fn new(max_producers: usize, expiry_ms: u64) -> Self {
        Self {
            producers: HashMap::new(),
            max_producers: max_producers.max(1),
            expiry_ms: i64::try_from(expiry_ms).unwrap_or(i64::MAX),
            dirty: false,
        }
    }

    /// Producers known.
    pub fn len(&self) -> usize {
        self.producers.len()
    }

    /// True when no producer is known.
    pub fn is_empty(&self) -> bool {
        self.producers.is_empty()
    }

    fn live(&self, producer_id: u64, now_ms: i64) -> Option<&ProducerState> {
        self.producers
            .get(&producer_id)
            .filter(|s| now_ms.saturating_sub(s.last_seen_ms) <= self.expiry_ms)
    }

    /// Checks a batch of `count` records from `producer` against what the partition has.
    pub fn check(
        &self,
        producer: ProducerFields,
        count: u32,
        now_ms: i64,
    ) -> Result<Sequenced, SequenceError> {
        let Some(state) = self.live(producer.producer_id, now_ms) else {
            return Ok(Sequenced::New);
        };
        if producer.epoch < state.epoch {
            return Err(SequenceError::Fenced {
                producer_id: producer.producer_id,
                current: state.epoch,
                found: producer.epoch,
            });
        }
        let last_sequence = producer.base_sequence.wrapping_add(count.saturating_sub(1));
        if producer.epoch > state.epoch {
            // A new epoch starts its numbering again.
            if producer.base_sequence == 0 {
                return Ok(Sequenced::New);
            }
            return Err(SequenceError::OutOfOrder {
                producer_id: producer.producer_id,
                expected: 0,
                found: producer.base_sequence,
            });
        }
        if let Some(same) = state.batches.iter().find(|b| {
            b.first_sequence == producer.base_sequence && b.last_sequence == last_sequence
        }) {
            return Ok(Sequenced::Duplicate(*same));
        }
        let expected = state
            .batches
            .back()
            .map_or(producer.base_sequence, |b| b.last_sequence.wrapping_add(1));
        if producer.base_sequence == expected {
            Ok(Sequenced::New)
        } else {
            Err(SequenceError::OutOfOrder {
                producer_id: producer.producer_id,
                expected,
                found: producer.base_sequence,
            })
        }
    }

    /// Records a batch appended at `base_offset..=last_offset` (checked `New` just before,
    /// or read back from the log at open).
    pub fn record(
        &mut self,
        producer: ProducerFields,
        count: u32,
        base_offset: u64,
        last_offset: u64,
        now_ms: i64,
    ) {
        let batch = SequencedBatch {
            first_sequence: producer.base_sequence,
            last_sequence: producer.base_sequence.wrapping_add(count.saturating_sub(1)),
            base_offset,
            last_offset,
        };
        let expired = self.producers.contains_key(&producer.producer_id)
            && self.live(producer.producer_id, now_ms).is_none();
        if expired {
            self.producers.remove(&producer.producer_id);
        }
        if !self.producers.contains_key(&producer.producer_id)
            && self.producers.len() >= self.max_producers
        {
            self.evict_least_recent();
        }
        let state = self
            .producers
            .entry(producer.producer_id)
            .or_insert_with(|| ProducerState {
                epoch: producer.epoch,
                batches: VecDeque::with_capacity(REMEMBERED_BATCHES),
                last_seen_ms: now_ms,
            });
        if producer.epoch != state.epoch {
            state.epoch = producer.epoch;
            state.batches.clear();
        }
        if state.batches.len() == REMEMBERED_BATCHES {
            state.batches.pop_front();
        }
        state.batches.push_back(batch);
        state.last_seen_ms = state.last_seen_ms.max(now_ms);
        self.dirty = true;
    }

    fn evict_least_recent(&mut self) {
        let oldest = self
            .producers
            .iter()
            .min_by_key(|(_, s)| s.last_seen_ms)
            .map(|(&id, _)| id);
        if let Some(id) = oldest {
            self.producers.remove(&id);
        }
    }

    /// Forgets producers idle for longer than the expiry; returns how many.
    pub fn expire(&mut self, now_ms: i64) -> usize {
        let before = self.producers.len();
        let expiry = self.expiry_ms;
        self.producers
            .retain(|_, s| now_ms.saturating_sub(s.last_seen_ms) <= expiry);
        let gone = before - self.producers.len();
        self.dirty |= gone > 0;
        gone
    }

    /// True when the table changed since [`ProducerTable::snapshot`] last ran.
    pub fn is_dirty(&self) -> bool {
        self.dirty
    }

    /// The table's snapshot, covering the batches below `next_offset` (later ones are left
    /// out: they are read back from the log at open).
    pub fn snapshot(&mut self, next_offset: u64) -> Vec<u8> {
        self.dirty = false;
        let mut out = Vec::with_capacity(32 + self.producers.len() * 64);
        out.extend_from_slice(SNAPSHOT_MAGIC);
        out.extend_from_slice(&next_offset.to_le_bytes());
        let count_at = out.len();
        out.extend_from_slice(&0u32.to_le_bytes());
        let mut count = 0u32;
        for (&id, state) in &self.producers {
            let kept: Vec<&SequencedBatch> = state
                .batches
                .iter()
                .filter(|b| b.last_offset < next_offset)
                .collect();
            if kept.is_empty() {
                continue;
            }
            count += 1;
            out.extend_from_slice(&id.to_le_bytes());
            out.extend_from_slice(&state.epoch.to_le_bytes());
            out.extend_from_slice(&state.last_seen_ms.to_le_bytes());
            out.push(kept.len() as u8);
            for b in kept {
                out.extend_from_slice(&b.first_sequence.to_le_bytes());
                out.extend_from_slice(&b.last_sequence.to_le_bytes());
                out.extend_from_slice(&b.base_offset.to_le_bytes());
                out.extend_from_slice(&b.last_offset.to_le_bytes());
            }
        }
        out[count_at..count_at + 4].copy_from_slice(&count.to_le_bytes());
        let crc = crc32c::crc32c(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    /// Reads a snapshot: the table and the offset it covers up to. `None` for anything but an
    /// intact snapshot (the caller then rebuilds from the log).
    pub fn from_snapshot(
        bytes: &[u8],
        max_producers: usize,
        expiry_ms: u64,
    ) -> Option<(Self, u64)> {
        let (body, crc) = bytes.split_at_checked(bytes.len().checked_sub(4)?)?;
        if crc32c::crc32c(body).to_le_bytes() != crc {
            return None;
        }
        let mut r = Reader(body);
        if r.take(8)? != SNAPSHOT_MAGIC {
            return None;
        }
        let next_offset = r.u64()?;
        let count = r.u32()?;
        let mut table = Self::new(max_producers, expiry_ms);
        for _ in 0..count {
            let id = r.u64()?;
            let epoch = u16::from_le_bytes(r.take(2)?.try_into().ok()?);
            let last_seen_ms = r.u64()? as i64;
            let n = usize::from(*r.take(1)?.first()?);
            if n == 0 || n > REMEMBERED_BATCHES {
                return None;
            }
            let mut batches = VecDeque::with_capacity(REMEMBERED_BATCHES);
            for _ in 0..n {
                batches.push_back(SequencedBatch {
                    first_sequence: r.u32()?,
                    last_sequence: r.u32()?,
                    base_offset: r.u64()?,
                    last_offset: r.u64()?,
                });
            }
            table.producers.insert(
                id,
                ProducerState {
                    epoch,
                    batches,
                    last_seen_ms,
                },
            );
        }
        if !r.0.is_empty() {
            return None;
        }
        Some((table, next_offset))
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = self.0.split_at_checked(n)?;
        self.0 = rest;
        Some(head)
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
}

/// The snapshot file of the partition directory `dir`.
pub fn snapshot_path(dir: &Path) -> PathBuf {
    dir.join(SNAPSHOT_FILE)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(epoch: u16, seq: u32) -> ProducerFields {
        ProducerFields {
            producer_id: 9,
            epoch,
            base_sequence: seq,
        }
    }

    #[test]
    fn the_table_of_the_issue() {
        let mut t = ProducerTable::new(100, 60_000);
        assert_eq!(t.check(p(0, 0), 10, 0), Ok(Sequenced::New));
        t.record(p(0, 0), 10, 100, 109, 0);
        // A resend: its offsets.
        assert!(matches!(
            t.check(p(0, 0), 10, 1),
            Ok(Sequenced::Duplicate(SequencedBatch {
                base_offset: 100,
                last_offset: 109,
                ..
            }))
        ));
        // The next one, then a gap.
        assert_eq!(t.check(p(0, 10), 5, 1), Ok(Sequenced::New));
        assert!(matches!(
            t.check(p(0, 11), 5, 1),
            Err(SequenceError::OutOfOrder { expected: 10, .. })
        ));
        // A newer epoch fences the older one, and starts at 0.
        assert!(t.check(p(1, 3), 1, 1).is_err());
        t.record(p(1, 0), 1, 110, 110, 2);
        assert!(matches!(
            t.check(p(0, 10), 5, 2),
            Err(SequenceError::Fenced { current: 1, .. })
        ));
        // Forgotten after the expiry: any sequence is taken.
        assert_eq!(t.check(p(1, 77), 1, 70_000), Ok(Sequenced::New));
        assert_eq!(t.expire(70_000), 1);
        assert!(t.is_empty());
    }

    #[test]
    fn only_the_last_five_batches_are_remembered_and_the_snapshot_round_trips() {
        let mut t = ProducerTable::new(100, 60_000);
        for i in 0..7u32 {
            t.record(p(0, i * 2), 2, u64::from(i) * 2, u64::from(i) * 2 + 1, 5);
        }
        assert!(t.check(p(0, 2), 2, 5).is_err(), "batch 1 is forgotten");
        assert!(matches!(
            t.check(p(0, 4), 2, 5),
            Ok(Sequenced::Duplicate(_))
        ));
        let snap = t.snapshot(10);
        let (back, next) = ProducerTable::from_snapshot(&snap, 100, 60_000).expect("intact");
        assert_eq!(next, 10);
        // Batches at or past offset 10 are left to the log.
        assert!(matches!(
            back.check(p(0, 8), 2, 5),
            Ok(Sequenced::Duplicate(_))
        ));
        assert_eq!(back.check(p(0, 10), 2, 5), Ok(Sequenced::New));
        let mut bad = snap.clone();
        bad[20] ^= 1;
        assert!(ProducerTable::from_snapshot(&bad, 100, 60_000).is_none());
        assert!(ProducerTable::from_snapshot(&snap[..snap.len() - 1], 100, 60_000).is_none());
    }

    #[test]
    fn the_least_recently_seen_producer_makes_room() {
        let mut t = ProducerTable::new(2, 60_000);
        for (id, at) in [(1u64, 10i64), (2, 20), (3, 30)] {
            let f = ProducerFields {
                producer_id: id,
                epoch: 0,
                base_sequence: 0,
            };
            t.record(f, 1, id, id, at);
        }
        assert_eq!(t.len(), 2);
        assert!(t.live(1, 30).is_none());
        assert!(t.live(3, 30).is_some());
    }
}
