//! The append path: batches get their offsets (after the wait for room in the pending queue
//! and, for an idempotent producer, the sequence check) and wait in `pending` for the flush.

use std::rc::Rc;

use bytes::Bytes;
use futures::channel::oneshot;

use super::{check_writable, LogState, PartitionLog};
use crate::record::batch::{self, BatchHeader, HEADER_PREFIX_LEN};
use crate::storage::producers::{Sequenced, SequencedBatch};
use crate::storage::{Durability, StorageError};

/// A batch stamped with its offsets, as it will be stored. The body is the producer's bytes
/// after the header, still inside the received frame: no copy until the flush.
pub(super) struct StoredBatch {
    pub(super) header: [u8; HEADER_PREFIX_LEN],
    pub(super) body: Bytes,
    pub(super) base_offset: u64,
    pub(super) last_offset: u64,
}

impl StoredBatch {
    pub(super) fn len(&self) -> usize {
        HEADER_PREFIX_LEN + self.body.len()
    }
    pub(super) fn retention_timestamp_ms(&self) -> i64 {
        BatchHeader::parse(&self.header).map_or(i64::MIN, |h| h.retention_timestamp_ms())
    }
}

/// Offsets given to an append, and a receiver that resolves when it is acknowledged.
pub struct AppendTicket {
    /// Offset of the first record appended.
    pub base_offset: u64,
    /// Offset of the last record appended.
    pub last_offset: u64,
    durable: Option<oneshot::Receiver<Result<(), StorageError>>>,
}

impl AppendTicket {
    /// Waits until the append is durable per the log's mode.
    pub async fn durable(self) -> Result<(u64, u64), StorageError> {
        if let Some(rx) = self.durable {
            match rx.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(e),
                Err(_) => return Err(StorageError::ReadOnly("the log was closed".into())),
            }
        }
        Ok((self.base_offset, self.last_offset))
    }
}

impl PartitionLog {
    /// Appends already-validated batches (each a complete batch; see `record::Batch`) as one
    /// unit: either all get offsets or none. Waits while too many bytes are pending a flush.
    pub async fn append(
        self: &Rc<Self>,
        batches: &[Bytes],
        append_time_ms: i64,
    ) -> Result<AppendTicket, StorageError> {
        let incoming: usize = batches.iter().map(Bytes::len).sum();
        // An idempotent producer's batch comes alone (the broker checks): it may be a resend.
        let producer = match batches {
            [only] => BatchHeader::parse(only)
                .ok()
                .and_then(|h| Some((h.producer()?, h.record_count()))),
            _ => None,
        };
        // Appenders already waiting go first (see `SpaceQueue`): appends keep arrival order.
        let mut woken = false;
        loop {
            let wait = {
                let mut st = self.state.borrow_mut();
                if woken {
                    st.space_waiters.take_turn();
                }
                self.adopt_device_failure(&mut st);
                if let Err(e) = check_writable(&st) {
                    if woken {
                        st.space_waiters.wake_next();
                    }
                    return Err(e);
                }
                let room = st.pending_bytes == 0
                    || st.pending_bytes + incoming <= self.config.max_pending_bytes;
                if room && (woken || st.space_waiters.is_clear()) {
                    None
                } else if woken {
                    Some(st.space_waiters.wait_again_first())
                } else {
                    Some(st.space_waiters.join_back())
                }
            };
            match wait {
                Some(rx) => {
                    let _ = rx.await;
                    woken = true;
                }
                None => break,
            }
        }
        let mut st = self.state.borrow_mut();
        if let Some((fields, count)) = producer {
            let checked = st.producers.check(fields, count, append_time_ms);
            let resent = match checked {
                Ok(Sequenced::New) => None,
                Ok(Sequenced::Duplicate(original)) => Some(Ok(original)),
                Err(e) => Some(Err(StorageError::Sequence(e))),
            };
            if let Some(outcome) = resent {
                if woken {
                    st.space_waiters.wake_next();
                }
                return outcome.map(|original| self.ticket_for_resend(&mut st, original));
            }
        }
        let base_offset = st.next_offset;
        for bytes in batches {
            let Ok(header) = BatchHeader::parse(bytes) else {
                continue; // validated by the caller; cannot happen
            };
            let count = u64::from(header.record_count());
            let mut stamped = [0u8; HEADER_PREFIX_LEN];
            stamped.copy_from_slice(&bytes[..HEADER_PREFIX_LEN]);
            batch::stamp(&mut stamped, st.next_offset, append_time_ms);
            let stored = StoredBatch {
                header: stamped,
                body: bytes.slice(HEADER_PREFIX_LEN..),
                base_offset: st.next_offset,
                last_offset: st.next_offset + count - 1,
            };
            st.next_offset += count;
            st.pending_bytes += stored.len();
            st.pending.push_back(stored);
        }
        if woken {
            st.space_waiters.wake_next();
        }
        let last_offset = st.next_offset.saturating_sub(1);
        debug_assert!(last_offset >= base_offset, "append of an empty batch list");
        if let Some((fields, count)) = producer {
            st.producers
                .record(fields, count, base_offset, last_offset, append_time_ms);
        }
        let durable = if self.config.durability == Durability::None {
            None
        } else {
            let (tx, rx) = oneshot::channel();
            st.ack_waiters.push_back((last_offset, tx));
            Some(rx)
        };
        let start_flusher = !st.flushing;
        st.flushing = true;
        drop(st);
        if start_flusher {
            // glommio may run a spawned task right away: no borrow may be held here.
            let log = Rc::clone(self);
            glommio::spawn_local(async move { log.flush_loop().await }).detach();
        }
        Ok(AppendTicket {
            base_offset,
            last_offset,
            durable,
        })
    }

    /// The answer to a resent batch: the original's offsets, once they are durable (at once
    /// if they are already).
    fn ticket_for_resend(&self, st: &mut LogState, original: SequencedBatch) -> AppendTicket {
        let durable = if self.config.durability == Durability::None
            || original.last_offset < st.high_watermark
        {
            None
        } else {
            let (tx, rx) = oneshot::channel();
            // Waiters are released in offset order: the resend's goes where its offset is.
            let at = st
                .ack_waiters
                .partition_point(|(last, _)| *last <= original.last_offset);
            st.ack_waiters.insert(at, (original.last_offset, tx));
            Some(rx)
        };
        AppendTicket {
            base_offset: original.base_offset,
            last_offset: original.last_offset,
            durable,
        }
    }
}
