//! One partition's log: an ordered set of segments with group commit, an in-memory tail for
//! recent reads, long-poll waiters, recovery at open, checkpoints and retention.
//!
//! Owned by exactly one shard (everything here is `Rc`/`RefCell`, never shared across
//! threads). The network layer hands it already-validated batches; it stamps their offsets,
//! makes them durable per the [`Durability`] mode, and only then acknowledges them and lets
//! readers see them.
//!
//! Group commit: appends go into `pending`; one flush task per log takes everything pending,
//! writes it with a few large aligned writes into the active segment (the partial last block
//! rewritten from `tail_block`), syncs, then acknowledges every batch it covered. Batches
//! that arrive while a flush is in flight wait for the next one, so one write + one
//! `fdatasync` serves many producers. Flushes are sequential per log, so the durable point is
//! always a prefix; flushes of different logs run concurrently. A flush that only overwrites
//! blocks already committed (`Extent::synced_to`) may instead share the shard's one disk
//! flush for the round (`storage::shard_sync`).

use std::cell::RefCell;
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Duration;

use bytes::Bytes;
use futures::channel::oneshot;
use futures::future::{FutureExt, Shared};
use glommio::io::DmaFile;
use glommio::sync::Semaphore;

use super::checkpoint::Checkpoint;
use super::disk_trace::{self, Op};
use super::dma::{self, align_down, align_up, ChunkFiller, ALIGN};
use super::fetched::{BatchBytes, FetchedData};
use super::prewrite::{self, PrewriteConfig};
use super::probes::{FailureProbes, ProbePoint};
use super::producers::{self, ProducerTable, Sequenced, SequencedBatch};
use super::scan::{scan_segment, CorruptRange, DurablePoint, ScanEnd};
use super::segment::{self, sync_dir, Segment};
use super::shard_sync::{ShardSync, WriteInFlight};
use super::space_queue::SpaceQueue;
use super::spare::{self, Spare};
use super::sync_health::SyncHealth;
use super::{Durability, StorageError};
use crate::metrics::StorageMetrics;
use crate::record::batch::{self, BatchHeader, HEADER_PREFIX_LEN};

/// A zero-fill in flight (see `storage::prewrite`).
struct Prewriting {
    /// Where its zeros start.
    start: u64,
    /// Its zeros are written up to here (no zero write in flight below).
    zeroed_to: u64,
    /// A flush needs blocks it has not reached: stop after the piece in flight.
    stop: bool,
    /// It writes no more zeros (only its `fdatasync` may be left).
    stopped: bool,
}

/// Tunables of a partition log.
#[derive(Clone, Debug)]
pub struct LogConfig {
    /// When appends are acknowledged.
    pub durability: Durability,
    /// Largest single DMA read or write (glommio issue #633).
    pub max_io_bytes: usize,
    /// Recent batches kept in memory per partition for readers.
    pub cache_bytes: usize,
    /// Recent batches kept in memory over all the logs of a shard, at most: with many
    /// partitions each keeps `cache_budget_bytes / logs` (but no more than `cache_bytes`).
    pub cache_budget_bytes: usize,
    /// Bytes of log between two sparse index entries.
    pub index_interval_bytes: u64,
    /// Bytes that may wait for a flush before appenders are held back.
    pub max_pending_bytes: usize,
    /// A segment rolls when it would grow past this size.
    pub segment_bytes: u64,
    /// A segment rolls when its first batch is older than this.
    pub segment_ms: Option<u64>,
    /// Disk space is preallocated in steps of this size.
    pub preallocate_bytes: u64,
    /// Zero-filling ahead of the end for small flushes (see `storage::prewrite`).
    pub prewrite: PrewriteConfig,
    /// Oldest segments are deleted while the log is larger than this.
    pub retention_bytes: Option<u64>,
    /// Segments whose newest record is older than this are deleted.
    pub retention_ms: Option<u64>,
    /// The shard's syncer when flushes share one `syncfs` (`GroupCommit::Shard`); `None`:
    /// each flush `fdatasync`s its segment.
    pub shard_sync: Option<Rc<ShardSync>>,
    /// Fault injection for tests (empty in production).
    pub probes: Rc<FailureProbes>,
    /// The shard's record of a failed sync: once set, every log of the shard is read-only.
    pub sync_health: Rc<SyncHealth>,
    /// The shard's storage metrics.
    pub metrics: Rc<StorageMetrics>,
    /// Idempotent producers remembered per partition at most (least recently seen go).
    pub max_producers: usize,
    /// An idempotent producer idle this long is forgotten.
    pub producer_expiry_ms: u64,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            durability: Durability::Sync,
            max_io_bytes: 4 << 20,
            cache_bytes: 8 << 20,
            cache_budget_bytes: 128 << 20,
            index_interval_bytes: 4096,
            max_pending_bytes: 64 << 20,
            segment_bytes: 1 << 30,
            segment_ms: None,
            preallocate_bytes: 32 << 20,
            prewrite: PrewriteConfig::default(),
            retention_bytes: None,
            retention_ms: None,
            shard_sync: None,
            probes: Rc::new(FailureProbes::default()),
            sync_health: Rc::new(SyncHealth::default()),
            metrics: Rc::new(StorageMetrics::default()),
            max_producers: 10_000,
            producer_expiry_ms: 24 * 3600 * 1000,
        }
    }
}

/// What made a flush durable.
enum SyncedBy {
    /// An `fdatasync` of the segment file (which also committed its metadata).
    OwnFile,
    /// The shard's shared call (see `storage::shard_sync`).
    Shard,
}

/// A batch stamped with its offsets, as it will be stored. The body is the producer's bytes
/// after the header, still inside the received frame: no copy until the flush.
struct StoredBatch {
    header: [u8; HEADER_PREFIX_LEN],
    body: Bytes,
    base_offset: u64,
    last_offset: u64,
}

impl StoredBatch {
    fn len(&self) -> usize {
        HEADER_PREFIX_LEN + self.body.len()
    }
    fn retention_timestamp_ms(&self) -> i64 {
        BatchHeader::parse(&self.header).map_or(i64::MIN, |h| h.retention_timestamp_ms())
    }
}

/// A batch in the in-memory tail: its stamped header and its body, each shared, so that a
/// fetch hands them to the socket without copying.
struct CachedBatch {
    header: Bytes,
    body: Bytes,
    base_offset: u64,
    last_offset: u64,
}

impl CachedBatch {
    fn len(&self) -> usize {
        self.header.len() + self.body.len()
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

/// What a read of one segment found: the batches to serve, and where the walk stopped.
struct SegmentRead {
    batches: Bytes,
    /// Offset of the batch after the served ones.
    next_offset: u64,
    /// Its position in the segment.
    next_pos: u64,
}

/// Where the last disk read of a log stopped, and the read of the bytes after it.
struct ReadAhead {
    segment_base: u64,
    next_offset: u64,
    pos: u64,
    /// The read, shared so that a reader that comes before it ends waits for it rather than
    /// reading the same bytes a second time; `None` if it failed (the reader then reads, and
    /// reports the error, itself).
    data: Shared<glommio::Task<Option<Bytes>>>,
}

/// Figures about a log, for stats and tests.
#[derive(Clone, Debug, Default)]
pub struct LogStats {
    /// Number of segments.
    pub segments: usize,
    /// Bytes of batches stored.
    pub bytes: u64,
    /// Earliest stored offset.
    pub log_start_offset: u64,
    /// Next offset to be written.
    pub high_watermark: u64,
    /// Corrupt ranges found.
    pub corrupt_ranges: usize,
    /// Bytes appended and waiting for a flush.
    pub pending_bytes: u64,
    /// Records acknowledged since start.
    pub messages_in: u64,
    /// Bytes acknowledged since start.
    pub bytes_in: u64,
    /// Records served by fetches since start.
    pub messages_out: u64,
    /// Bytes served by fetches since start.
    pub bytes_out: u64,
}

struct LogState {
    /// Segments, oldest first; the last one is the active segment.
    segments: VecDeque<Segment>,
    /// Next offset to assign.
    next_offset: u64,
    /// Offsets below this are written per the durability mode, acknowledged and readable.
    high_watermark: u64,
    /// The bytes of the active segment's partial last block, rewritten on the next flush.
    tail_block: Vec<u8>,
    pending: VecDeque<StoredBatch>,
    pending_bytes: usize,
    flushing: bool,
    /// The zero-fill of the active segment in flight, if any: flushes must not write where
    /// its zeros are still to land, and the segment must not be sealed under it.
    prewriting: Option<Prewriting>,
    /// Woken when a zero-fill writes a piece, stops writing, or ends.
    prewrite_waiters: Vec<oneshot::Sender<()>>,
    /// The next segment's file, made ready ahead of the roll.
    spare: Spare,
    /// (last offset of an append, its acknowledgement), in offset order.
    ack_waiters: VecDeque<(u64, oneshot::Sender<Result<(), StorageError>>)>,
    /// Long-polling readers, and appenders held back by a full pending queue.
    data_waiters: Vec<oneshot::Sender<()>>,
    space_waiters: SpaceQueue,
    /// Recent stored batches, oldest first.
    cache: VecDeque<CachedBatch>,
    cache_bytes: usize,
    /// Offsets whose stored bytes failed their checksum: refused to readers.
    corrupt: Vec<CorruptRange>,
    /// Set after a fatal error (an fdatasync failure): the log no longer accepts writes.
    failed: Option<String>,
    closed: bool,
    /// The last checkpoint written.
    checkpointed: Checkpoint,
    /// Read-ahead for a reader catching up from disk.
    read_ahead: Option<ReadAhead>,
    /// Traffic counters since start: records and bytes in (acknowledged) and out (fetched).
    messages_in: u64,
    bytes_in: u64,
    messages_out: u64,
    bytes_out: u64,
    /// Idempotent producers' last batches, to recognise resends.
    producers: ProducerTable,
}

impl LogState {
    /// Earliest stored offset.
    fn log_start(&self) -> u64 {
        self.segments
            .front()
            .map_or(self.high_watermark, |s| s.base_offset)
    }
}

/// Zero-fills in flight on a shard at most (each holds a 256 KiB buffer and a disk queue slot):
/// with a thousand small partitions they take turns. With 4, 1,000 partitions at 100k msgs/s
/// had most flushes run past their committed stretch (so each fdatasync'd its own file instead
/// of sharing the shard's disk flush); with 16, 86–95% of them shared it and the ack p50 went
/// from 250–300 ms to 140–190 ms.
const MAX_PREWRITES_IN_FLIGHT: u64 = 16;

/// A partition's log. Create with [`PartitionLog::open`].
pub struct PartitionLog {
    dir: PathBuf,
    config: Rc<LogConfig>,
    state: RefCell<LogState>,
    /// Serializes checkpoint writes (periodic, roll and close).
    checkpoint_lock: Semaphore,
    /// The shard's syncer, when it covers this log's files (same device; see
    /// `ShardSync::covers`); `None`: every flush syncs its own file.
    shard_sync: Option<Rc<ShardSync>>,
}

impl PartitionLog {
    /// Opens the log in `dir` (creating it), recovering its segments: indexes are loaded or
    /// rebuilt, the active segment is scanned from its last index entry (not at all after a
    /// clean shutdown), a torn tail is cut off and corruption in acknowledged data reported.
    pub async fn open(dir: &Path, config: Rc<LogConfig>) -> Result<Rc<Self>, StorageError> {
        disk_trace::create_dir_all_durable(dir)
            .map_err(|e| StorageError::io(format!("creating {}", dir.display()), &e))?;
        spare::remove_leftover(dir);
        let mut bases = segment::list(dir)?;
        let mut checkpoint = Checkpoint::load(dir);
        if bases.is_empty() {
            Segment::create(dir, 0, config.preallocate_bytes.min(config.segment_bytes)).await?;
            bases.push(0);
            // Nothing to recover in a file made just now.
            checkpoint = Some(Checkpoint {
                segment_base: 0,
                durable_end: 0,
                next_offset: 0,
                log_start: 0,
                clean: true,
            });
        }
        finish_retention(dir, &mut bases, checkpoint.map_or(0, |c| c.log_start)).await?;
        let mut segments = VecDeque::with_capacity(bases.len());
        let mut corrupt = Vec::new();
        for (i, &base) in bases.iter().enumerate() {
            let mut seg = Segment::open(dir, base).await?;
            let next_base = bases.get(i + 1).copied();
            recover_segment(&mut seg, next_base, checkpoint, &config, &mut corrupt).await?;
            segments.push_back(seg);
        }
        let failed: Option<String> = None;
        let shard_sync = config.shard_sync.clone().filter(|sync| sync.covers(dir));
        let active = segments
            .back()
            .ok_or_else(|| StorageError::Corrupt("no segment".into()))?;
        let next_offset = active.next_offset;
        let end = active.end;
        let tail_start = align_down(end);
        let tail_block = if end > tail_start {
            dma::read_range(
                &active.file,
                tail_start,
                (end - tail_start) as usize,
                config.max_io_bytes,
            )
            .await?
        } else {
            Vec::new()
        };
        let active_base = active.base_offset;
        if let Some(active) = segments.back_mut() {
            // A file cut short (by a roll that then crashed) may end inside the last block.
            let written = align_up(end).min(active.extent.allocated());
            active.extent.wrote(written);
        }
        // From here on appends may come: the checkpoint must no longer claim a clean stop.
        let fresh = Checkpoint {
            segment_base: active_base,
            durable_end: end,
            next_offset,
            log_start: segments.front().map_or(next_offset, |s| s.base_offset),
            clean: false,
        };
        save_checkpoint(dir, fresh).await?;
        let log = Rc::new(Self {
            dir: dir.to_path_buf(),
            config,
            state: RefCell::new(LogState {
                segments,
                next_offset,
                high_watermark: next_offset,
                tail_block,
                pending: VecDeque::new(),
                pending_bytes: 0,
                flushing: false,
                prewriting: None,
                prewrite_waiters: Vec::new(),
                spare: Spare::default(),
                ack_waiters: VecDeque::new(),
                data_waiters: Vec::new(),
                space_waiters: SpaceQueue::default(),
                cache: VecDeque::new(),
                cache_bytes: 0,
                corrupt,
                failed,
                closed: false,
                checkpointed: fresh,
                read_ahead: None,
                messages_in: 0,
                bytes_in: 0,
                messages_out: 0,
                bytes_out: 0,
                producers: ProducerTable::new(0, 0),
            }),
            checkpoint_lock: Semaphore::new(1),
            shard_sync,
        });
        log.rebuild_producers().await;
        let open_logs = &log.config.metrics.open_logs;
        open_logs.set(open_logs.get() + 1);
        Ok(log)
    }

    /// Loads the idempotent producers' snapshot and reads the batches after it back from
    /// the log (from the active segment's start when there is no usable snapshot), so that
    /// resends from before a restart are still recognised.
    async fn rebuild_producers(self: &Rc<Self>) {
        let (max, expiry) = (self.config.max_producers, self.config.producer_expiry_ms);
        let (log_start, active_base, hw) = {
            let st = self.state.borrow();
            let active = st.segments.back().map_or(0, |s| s.base_offset);
            (st.log_start(), active, st.high_watermark)
        };
        let snapshot = std::fs::read(producers::snapshot_path(&self.dir))
            .ok()
            .and_then(|bytes| ProducerTable::from_snapshot(&bytes, max, expiry))
            .filter(|(_, covered)| *covered <= hw);
        let (mut table, mut offset) =
            snapshot.unwrap_or_else(|| (ProducerTable::new(max, expiry), active_base));
        offset = offset.max(log_start);
        let mut read = 0usize;
        while offset < hw {
            let fetched = match self.fetch(offset, 8 << 20, Duration::ZERO).await {
                Ok(fetched) if !fetched.batches.is_empty() => fetched,
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!(
                        "{}: idempotent producers not read back past offset {offset}: {e}",
                        self.dir.display()
                    );
                    break;
                }
            };
            let bytes = fetched.batches.contiguous();
            read += bytes.len();
            for header in stored_headers(&bytes) {
                if let Some(fields) = header.producer().filter(|_| header.last_offset() >= offset) {
                    let count = header.record_count();
                    let (base, last) = (header.base_offset(), header.last_offset());
                    table.record(fields, count, base, last, header.append_time_ms());
                }
                offset = offset.max(header.last_offset() + 1);
            }
        }
        let mut st = self.state.borrow_mut();
        // The read back is not traffic.
        (st.messages_out, st.bytes_out) = (0, 0);
        if read > 0 || !table.is_empty() {
            tracing::debug!(
                "{}: {} idempotent producer(s), {read} bytes of log read back",
                self.dir.display(),
                table.len()
            );
        }
        st.producers = table;
    }

    /// The directory holding this log.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Next offset to be written; everything below is acknowledged and readable.
    pub fn high_watermark(&self) -> u64 {
        self.state.borrow().high_watermark
    }

    /// Earliest stored offset.
    pub fn log_start_offset(&self) -> u64 {
        self.state.borrow().log_start()
    }

    /// Figures about the log.
    pub fn stats(&self) -> LogStats {
        let st = self.state.borrow();
        LogStats {
            segments: st.segments.len(),
            bytes: st.segments.iter().map(|s| s.end).sum(),
            log_start_offset: st.segments.front().map_or(0, |s| s.base_offset),
            high_watermark: st.high_watermark,
            corrupt_ranges: st.corrupt.len(),
            pending_bytes: st.pending_bytes as u64,
            messages_in: st.messages_in,
            bytes_in: st.bytes_in,
            messages_out: st.messages_out,
            bytes_out: st.bytes_out,
        }
    }

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

    /// Flushes pending batches until none are left: the group commit.
    async fn flush_loop(self: Rc<Self>) {
        loop {
            let roll = {
                let mut st = self.state.borrow_mut();
                self.adopt_device_failure(&mut st);
                if let Some(why) = st.failed.clone().filter(|_| !st.pending.is_empty()) {
                    // Turned read-only (a sync failed elsewhere on the device) with appends
                    // waiting: they are refused, not left waiting.
                    drop(st);
                    self.fail_flush(StorageError::ReadOnly(why), false);
                    continue;
                }
                if st.pending.is_empty() || st.failed.is_some() {
                    st.flushing = false;
                    return;
                }
                self.roll_due(&st)
            };
            if roll {
                if let Err(e) = self.roll().await {
                    self.fail_flush(e, false);
                    continue;
                }
            }
            let (batches, bytes, file, start_pos, carry, needed, extent) = {
                let mut st = self.state.borrow_mut();
                let Some(active) = st.segments.back() else {
                    st.flushing = false;
                    return;
                };
                let (end, extent, file) = (active.end, active.extent, Rc::clone(&active.file));
                let mut batches = Vec::new();
                let mut bytes = 0usize;
                while let Some(next) = st.pending.front() {
                    let fits = end + (bytes + next.len()) as u64 <= self.config.segment_bytes;
                    if !batches.is_empty() && !fits {
                        break;
                    }
                    let Some(b) = st.pending.pop_front() else {
                        break;
                    };
                    bytes += b.len();
                    batches.push(b);
                }
                st.pending_bytes -= bytes;
                let needed = align_up(end + bytes as u64);
                (
                    batches,
                    bytes,
                    file,
                    align_down(end),
                    st.tail_block.clone(),
                    needed,
                    extent,
                )
            };
            self.state.borrow_mut().space_waiters.wake_next();
            if needed > extent.allocated() {
                if let Err(e) = self.grow_active(&file, needed, extent.allocated()).await {
                    self.fail_flush(e, false);
                    continue;
                }
            }
            self.prewrite_clear_of(needed).await;
            let mut filler = ChunkFiller::new(&file, carry.len() + bytes, self.config.max_io_bytes);
            filler.put(&carry);
            for b in &batches {
                filler.put(&b.header);
                filler.put(&b.body);
            }
            let new_end = start_pos + (carry.len() + bytes) as u64;
            let new_tail = filler.last_bytes((new_end % ALIGN) as usize);
            let metrics = &self.config.metrics;
            let started = std::time::Instant::now();
            metrics.flush_bytes.observe(bytes as f64);
            metrics.flush_batches.observe(batches.len() as f64);
            // Only rewritten blocks whose allocation is committed: no metadata to sync.
            let overwrite =
                extent.is_overwrite(needed) || self.config.probes.skips(ProbePoint::OverwriteCheck);
            let shared_sync = match &self.shard_sync {
                Some(shard)
                    if self.config.durability == Durability::Sync && shard.serves(overwrite) =>
                {
                    Some(shard.write_started())
                }
                _ => None,
            };
            let written = match self.config.probes.hit(ProbePoint::Write) {
                Some(e) => Err(StorageError::io(
                    format!("writing {}", self.active_path().display()),
                    &e,
                )),
                None => filler.write_at(start_pos).await,
            };
            let result = match written {
                // EIO: the device failed the write, and may lose what it had accepted.
                Err(e) => {
                    let fatal = e.is_device_failure();
                    Err((e, fatal))
                }
                Ok(()) if self.config.durability == Durability::Sync => {
                    match self.sync(&file, shared_sync).await {
                        Ok(SyncedBy::OwnFile) => {
                            self.mark_synced(&file, needed);
                            Ok(())
                        }
                        Ok(SyncedBy::Shard) => Ok(()),
                        Err(e) => Err((e, true)),
                    }
                }
                Ok(()) => Ok(()),
            };
            // Another sync on the device failed meanwhile: this write may be gone with it.
            let result = match (result, self.config.sync_health.failure()) {
                (Ok(()), Some(why)) => Err((device_failed(&why), true)),
                (result, _) => result,
            };
            match result {
                Ok(()) => {
                    metrics
                        .flush_latency
                        .observe(started.elapsed().as_secs_f64());
                    self.complete_flush(batches, new_end, new_tail);
                    self.start_prewrite(&file, bytes as u64);
                    self.start_spare();
                }
                Err((error, fatal)) => {
                    metrics.flush_errors.set(metrics.flush_errors.get() + 1);
                    self.fail_flush(error, fatal);
                }
            }
        }
    }

    /// Waits until no zero write is in flight or still to come below `needed`. A zero-fill
    /// that has not got that far yet is told to stop after its current piece: the flush then
    /// writes into blocks that are not zero-filled (and syncs its own file) instead of
    /// waiting for the whole fill and its `fdatasync` (15-20 ms stalls at 200 MB/s).
    async fn prewrite_clear_of(&self, needed: u64) {
        loop {
            let rx = {
                let mut st = self.state.borrow_mut();
                match &mut st.prewriting {
                    Some(p) if p.start < needed && p.zeroed_to < needed && !p.stopped => {
                        if !p.stop {
                            p.stop = true;
                            let cut_short = &self.config.metrics.prewrites_cut_short;
                            cut_short.set(cut_short.get() + 1);
                        }
                        let (tx, rx) = oneshot::channel();
                        st.prewrite_waiters.push(tx);
                        rx
                    }
                    _ => return,
                }
            };
            let _ = rx.await;
        }
    }

    /// Waits until no zero-fill is in flight at all (it is told to stop early).
    async fn prewrite_finished(&self) {
        loop {
            let rx = {
                let mut st = self.state.borrow_mut();
                let Some(p) = &mut st.prewriting else {
                    return;
                };
                p.stop = true;
                let (tx, rx) = oneshot::channel();
                st.prewrite_waiters.push(tx);
                rx
            };
            let _ = rx.await;
        }
    }

    /// After a flush of `flushed` bytes into `file` (the active segment): starts zero-filling
    /// ahead of the end in the background when the policy says so.
    fn start_prewrite(self: &Rc<Self>, file: &Rc<DmaFile>, flushed: u64) {
        let range = {
            let mut st = self.state.borrow_mut();
            let in_flight = &self.config.metrics.prewrites_in_flight;
            if st.prewriting.is_some() || st.closed || in_flight.get() >= MAX_PREWRITES_IN_FLIGHT {
                return;
            }
            let lead = self.prewrite_lead();
            let Some(active) = st.segments.back_mut() else {
                return;
            };
            let flushed_to = align_up(active.end);
            active.extent.wrote(flushed_to);
            // Up to the segment's size: a stretch past the allocation is allocated first,
            // here in the background, so that no flush waits for an allocation and then for
            // the zero-fill behind it (seen as 10-25 ms acks every 32 MiB at 100 MB/s).
            let Some(range) = self.config.prewrite.due(
                lead,
                flushed,
                active.end,
                active.extent.written_to(),
                self.config.segment_bytes,
            ) else {
                return;
            };
            let allocated = active.extent.allocated();
            st.prewriting = Some(Prewriting {
                start: range.0,
                zeroed_to: range.0,
                stop: false,
                stopped: false,
            });
            in_flight.set(in_flight.get() + 1);
            (range, allocated)
        };
        let (log, file) = (Rc::clone(self), Rc::clone(file));
        // glommio may run a spawned task right away: no borrow is held here.
        glommio::spawn_local(async move {
            let ((start, end), allocated) = range;
            // A failed allocation (a full disk) is reported by the flush that needs the space.
            let allocated =
                end <= allocated || log.grow_active(&file, end, allocated).await.is_ok();
            // Flushes waiting for the zeros to pass their blocks learn of each piece.
            let progress = |at: u64| {
                let mut st = log.state.borrow_mut();
                let go = match &mut st.prewriting {
                    Some(p) => {
                        p.zeroed_to = at;
                        p.stopped = p.stop || at >= end;
                        !p.stopped
                    }
                    None => false,
                };
                for tx in st.prewrite_waiters.drain(..) {
                    let _ = tx.send(());
                }
                go
            };
            let result = if allocated {
                prewrite::zero_fill_until(&file, start, end, progress)
                    .await
                    .map(Some)
            } else {
                Ok(None)
            };
            let in_flight = &log.config.metrics.prewrites_in_flight;
            in_flight.set(in_flight.get().saturating_sub(1));
            let mut st = log.state.borrow_mut();
            st.prewriting = None;
            match result {
                Ok(None) => {}
                Err(e) if e.is_device_failure() => {
                    drop(st);
                    log.device_failed(&format!("zero-filling ahead in {}: {e}", log.dir.display()));
                    st = log.state.borrow_mut();
                }
                Ok(Some(zeroed_to)) => {
                    let prewritten = &log.config.metrics.prewritten_bytes;
                    prewritten.set(prewritten.get() + (zeroed_to - start));
                    if let Some(active) = st.segments.back_mut() {
                        if Rc::ptr_eq(&active.file, &file) {
                            // The zero-fill ends with an fdatasync of the file.
                            active.extent.synced(zeroed_to);
                        }
                    }
                }
                // Only speed is lost: flushes write into unwritten blocks as without it.
                Err(e) => tracing::warn!("prewriting {}: {e}", log.dir.display()),
            }
            for tx in st.prewrite_waiters.drain(..) {
                let _ = tx.send(());
            }
        })
        .detach();
    }

    /// How far this log keeps written ahead (its share of the shard's prewrite budget).
    fn prewrite_lead(&self) -> u64 {
        let open_logs = self.config.metrics.open_logs.get();
        self.config.prewrite.lead(open_logs)
    }

    /// When the active segment is close to full, makes the next segment's file ready in the
    /// background (see `storage::spare`).
    fn start_spare(self: &Rc<Self>) {
        let bytes = {
            let mut st = self.state.borrow_mut();
            let in_flight = &self.config.metrics.prewrites_in_flight;
            let absent = matches!(st.spare, Spare::Absent);
            if !absent || st.closed || in_flight.get() >= MAX_PREWRITES_IN_FLIGHT {
                return;
            }
            let lead = self.prewrite_lead();
            let Some(active) = st.segments.back() else {
                return;
            };
            if !spare::due(lead, active.end, self.config.segment_bytes) {
                return;
            }
            st.spare = Spare::Preparing;
            in_flight.set(in_flight.get() + 1);
            align_up(lead.min(self.config.segment_bytes))
        };
        let log = Rc::clone(self);
        // glommio may run a spawned task right away: no borrow is held here.
        glommio::spawn_local(async move {
            let result = spare::prepare(&log.dir, bytes).await;
            let metrics = &log.config.metrics;
            let in_flight = &metrics.prewrites_in_flight;
            in_flight.set(in_flight.get().saturating_sub(1));
            let spare = match result {
                Ok(file) => {
                    let prewritten = &metrics.prewritten_bytes;
                    prewritten.set(prewritten.get() + bytes);
                    Spare::Ready {
                        file,
                        prepared: bytes,
                    }
                }
                Err(e) if e.is_device_failure() => {
                    log.device_failed(&format!(
                        "making the next segment's file ready in {}: {e}",
                        log.dir.display()
                    ));
                    Spare::Failed
                }
                Err(e) => {
                    tracing::warn!(
                        "making the next segment's file ready in {}: {e}; the roll creates it",
                        log.dir.display()
                    );
                    Spare::Failed
                }
            };
            log.state.borrow_mut().spare = spare;
        })
        .detach();
    }

    fn active_path(&self) -> PathBuf {
        let st = self.state.borrow();
        st.segments
            .back()
            .map_or_else(|| self.dir.clone(), |s| s.path("log"))
    }

    /// Makes a flush's completed write durable: by the shard's shared call when the write was
    /// announced to it (`shared`), else by an `fdatasync` of `file`.
    async fn sync(
        &self,
        file: &DmaFile,
        shared: Option<WriteInFlight>,
    ) -> Result<SyncedBy, StorageError> {
        let context = || format!("fdatasync of {}", self.active_path().display());
        if let Some(e) = self.config.probes.hit(ProbePoint::Fdatasync) {
            return Err(StorageError::io(context(), &e));
        }
        let started = std::time::Instant::now();
        let metrics = &self.config.metrics;
        let result = match shared {
            Some(write) => {
                metrics
                    .shard_synced_flushes
                    .set(metrics.shard_synced_flushes.get() + 1);
                write.synced().await.map(|()| SyncedBy::Shard)
            }
            None if self.config.probes.skips(ProbePoint::Fdatasync) => Ok(SyncedBy::OwnFile),
            None => {
                metrics
                    .file_synced_flushes
                    .set(metrics.file_synced_flushes.get() + 1);
                dma::fdatasync(file)
                    .await
                    .map(|()| SyncedBy::OwnFile)
                    .map_err(|e| StorageError::glommio(context(), e))
            }
        };
        metrics
            .fdatasync_latency
            .observe(started.elapsed().as_secs_f64());
        result
    }

    /// An `fdatasync` of `file` committed its blocks below `to` (block-aligned): flushes that
    /// only overwrite them may share the shard's disk flush from now on.
    fn mark_synced(&self, file: &Rc<DmaFile>, to: u64) {
        let mut st = self.state.borrow_mut();
        if let Some(active) = st.segments.back_mut() {
            if Rc::ptr_eq(&active.file, file) {
                active.extent.synced(to);
            }
        }
    }

    /// Preallocates more of the active segment (in steps), so that flushes write into
    /// allocated space and a full disk shows up here, before anything is written.
    async fn grow_active(
        &self,
        file: &DmaFile,
        needed: u64,
        allocated: u64,
    ) -> Result<(), StorageError> {
        let step = self.config.preallocate_bytes.max(ALIGN);
        let target = align_up(
            needed
                .max(allocated + step)
                .min(self.config.segment_bytes.max(needed)),
        );
        dma::pre_allocate(file, target).await.map_err(|e| {
            StorageError::glommio(
                format!(
                    "preallocating {target} bytes of {}",
                    self.active_path().display()
                ),
                e,
            )
        })?;
        // A flush and a prewrite may both grow the file: the allocation only ever grows.
        if let Some(active) = self.state.borrow_mut().segments.back_mut() {
            if std::ptr::eq(&*active.file, file) {
                active.extent.grew(target);
            }
        }
        Ok(())
    }

    fn roll_due(&self, st: &LogState) -> bool {
        let (Some(active), Some(first)) = (st.segments.back(), st.pending.front()) else {
            return false;
        };
        if active.end == 0 {
            return false;
        }
        let by_size = active.end + first.len() as u64 > self.config.segment_bytes;
        let by_age = match (self.config.segment_ms, active.first_append_ms) {
            (Some(ms), Some(first_ms)) => crate::broker::shard::now_ms() - first_ms >= ms as i64,
            _ => false,
        };
        by_size || by_age
    }

    /// Seals the active segment (its index made durable, its unused preallocation freed) and
    /// starts a new one at the next offset, durable with its directory: the spare when it is
    /// ready (see `storage::spare`), else a file created here.
    ///
    /// All or nothing: the next segment is made first, and only then is the old one sealed.
    /// A roll that can not make the next segment (a full disk, no file descriptors, an error
    /// on the directory's fsync) leaves the active segment exactly as it was, still growing;
    /// the next flush tries the roll again.
    async fn roll(&self) -> Result<(), StorageError> {
        // A prewrite still writing zeros into the old segment would grow it past its seal.
        self.prewrite_finished().await;
        let _guard = self.checkpoint_lock.acquire_permit(1).await;
        let base = self.state.borrow().high_watermark;
        let seg = self.next_segment(base).await?;
        let (append, sealed_file, sealed_end) = {
            let mut st = self.state.borrow_mut();
            let Some(active) = st.segments.back_mut() else {
                return Ok(());
            };
            (
                active.take_unwritten_index(),
                Rc::clone(&active.file),
                active.end,
            )
        };
        let written = glommio::executor()
            .spawn_blocking(move || append.write(true))
            .await;
        if let Err(e) = written {
            tracing::warn!(
                "writing the index of a sealed segment in {} failed: {e}; it will be rebuilt",
                self.dir.display()
            );
        }
        // Only space is lost if this fails: recovery reads a sealed segment up to its zeros.
        let _ = dma::truncate(&sealed_file, sealed_end).await;
        let checkpoint = {
            let mut st = self.state.borrow_mut();
            if let Some(old) = st.segments.back_mut() {
                old.extent.truncated(sealed_end);
            }
            st.segments.push_back(seg);
            st.tail_block.clear();
            st.checkpointed = Checkpoint {
                segment_base: base,
                durable_end: 0,
                next_offset: base,
                log_start: st.log_start(),
                clean: false,
            };
            st.checkpointed
        };
        save_checkpoint(&self.dir, checkpoint).await?;
        self.save_producers(checkpoint.next_offset).await;
        Ok(())
    }

    /// Saves the idempotent producers' snapshot (covering offsets below `next_offset`) if
    /// the table changed. A failed save is logged: the next open reads more of the log.
    async fn save_producers(&self, next_offset: u64) {
        let snapshot = {
            let mut st = self.state.borrow_mut();
            st.producers.expire(crate::broker::shard::now_ms());
            if !st.producers.is_dirty() {
                return;
            }
            st.producers.snapshot(next_offset)
        };
        let path = producers::snapshot_path(&self.dir);
        let saved = glommio::executor()
            .spawn_blocking(move || super::atomic_file::replace(&path, &snapshot))
            .await;
        if let Err(e) = saved {
            tracing::warn!(
                "saving the producers' snapshot of {} failed: {e}",
                self.dir.display()
            );
        }
    }

    /// The file of the segment starting at `base`, durable with its directory: the spare
    /// when one is ready, else a new file. Changes nothing of the active segment.
    async fn next_segment(&self, base: u64) -> Result<Segment, StorageError> {
        if let Some(e) = self.config.probes.hit(ProbePoint::NextSegment) {
            return Err(StorageError::io(
                format!(
                    "making the segment file for offset {base} in {}",
                    self.dir.display()
                ),
                &e,
            ));
        }
        let first = self.config.preallocate_bytes.min(self.config.segment_bytes);
        let spare = self.state.borrow_mut().spare.take_ready();
        match spare {
            Some((file, prepared)) => {
                match Segment::adopt_spare(&self.dir, base, file, prepared).await {
                    Ok(seg) => Ok(seg),
                    Err((file, e)) => {
                        tracing::warn!("{e}; creating the segment's file instead");
                        let _ = file.close().await;
                        // The rename may have happened: start from no file of that name.
                        let _ = disk_trace::remove_file(
                            &self.dir.join(segment::file_name(base, "log")),
                        );
                        Segment::create(&self.dir, base, first).await
                    }
                }
            }
            None => Segment::create(&self.dir, base, first).await,
        }
    }

    /// Makes a finished flush visible: acknowledges, indexes and caches its batches.
    fn complete_flush(&self, batches: Vec<StoredBatch>, new_end: u64, new_tail: Vec<u8>) {
        let acked = batches.first().zip(batches.last());
        let acked = acked.map(|(first, last)| (first.base_offset, last.last_offset));
        let mut st = self.state.borrow_mut();
        let interval = self.config.index_interval_bytes;
        let now = crate::broker::shard::now_ms();
        let Some(active) = st.segments.back_mut() else {
            return;
        };
        let mut pos = active.end;
        active.first_append_ms.get_or_insert(now);
        for b in &batches {
            active.record_batch(
                pos,
                b.len() as u64,
                b.base_offset,
                b.last_offset,
                b.retention_timestamp_ms(),
                interval,
            );
            pos += b.len() as u64;
        }
        debug_assert_eq!(pos, new_end, "flush must end where its bytes end");
        // The stamped headers of the whole flush in one allocation, shared by the cache.
        let mut headers = bytes::BytesMut::with_capacity(batches.len() * HEADER_PREFIX_LEN);
        for b in &batches {
            headers.extend_from_slice(&b.header);
        }
        let mut headers = headers.freeze();
        for b in batches {
            debug_assert_eq!(
                b.base_offset, st.high_watermark,
                "offsets must be contiguous"
            );
            st.high_watermark = b.last_offset + 1;
            st.messages_in += b.last_offset - b.base_offset + 1;
            st.bytes_in += b.len() as u64;
            st.cache_bytes += b.len();
            st.cache.push_back(CachedBatch {
                header: headers.split_to(HEADER_PREFIX_LEN),
                body: b.body,
                base_offset: b.base_offset,
                last_offset: b.last_offset,
            });
        }
        st.tail_block = new_tail;
        let open_logs = self.config.metrics.open_logs.get().max(1) as usize;
        let cache_limit = self
            .config
            .cache_bytes
            .min(self.config.cache_budget_bytes / open_logs);
        while st.cache_bytes > cache_limit && st.cache.len() > 1 {
            if let Some(old) = st.cache.pop_front() {
                st.cache_bytes -= old.len();
            }
        }
        if let Some((first, last)) = acked {
            disk_trace::instant(|| Op::Acked {
                dir: disk_trace::path_string(&self.dir),
                first,
                last,
            });
        }
        let hw = st.high_watermark;
        while st.ack_waiters.front().is_some_and(|(last, _)| *last < hw) {
            if let Some((_, tx)) = st.ack_waiters.pop_front() {
                let _ = tx.send(Ok(()));
            }
        }
        for tx in st.data_waiters.drain(..) {
            let _ = tx.send(());
        }
    }

    /// A failed flush: nothing it covered is acknowledged. Every batch not yet durable is
    /// refused and its offsets are given back, so that the log stays contiguous. An
    /// fdatasync failure is fatal: the log turns read-only and never retries the sync (the
    /// kernel may have dropped the dirty pages, so a later "successful" sync proves nothing).
    fn fail_flush(&self, error: StorageError, fatal: bool) {
        let mut st = self.state.borrow_mut();
        let hw = st.high_watermark;
        st.next_offset = hw;
        st.pending.clear();
        st.pending_bytes = 0;
        if fatal {
            self.config
                .sync_health
                .poison(&format!("{}: {error}", self.dir.display()));
            tracing::error!(
                "FATAL storage error in {}: {error}; the partition is now read-only and the \
                 sync is not retried; restart the broker after checking the disk",
                self.dir.display()
            );
            st.failed = Some(error.to_string());
        } else {
            tracing::warn!(
                "flush of {} failed: {error}; producers get an error",
                self.dir.display()
            );
        }
        for (_, tx) in st.ack_waiters.drain(..) {
            let _ = tx.send(Err(error.clone()));
        }
        st.space_waiters.wake_next();
    }

    /// A sync failed on the device outside a flush (a zero-fill, a spare): the shard's logs
    /// turn read-only, this one at once.
    fn device_failed(&self, what: &str) {
        self.config.sync_health.poison(what);
        let mut st = self.state.borrow_mut();
        self.adopt_device_failure(&mut st);
    }

    /// Turns this log read-only once a sync on the shard's device has failed (see
    /// `storage::sync_health`).
    fn adopt_device_failure(&self, st: &mut LogState) {
        if st.failed.is_none() {
            if let Some(why) = self.config.sync_health.failure() {
                st.failed = Some(device_failed(&why).to_string());
            }
        }
    }

    /// Reads whole batches starting with the one that holds `offset`, about `max_bytes` of
    /// them (at least one). At the end of the log, waits up to `max_wait` for data.
    pub async fn fetch(
        self: &Rc<Self>,
        offset: u64,
        max_bytes: usize,
        max_wait: Duration,
    ) -> Result<FetchedData, StorageError> {
        let (hw, start) = (self.high_watermark(), self.log_start_offset());
        if offset < start || offset > hw {
            return Err(StorageError::OffsetOutOfRange {
                requested: offset,
                log_start_offset: start,
                high_watermark: hw,
            });
        }
        if offset == hw && !max_wait.is_zero() {
            let (tx, rx) = oneshot::channel();
            {
                let mut st = self.state.borrow_mut();
                // Readers whose long poll timed out left their senders here; without this an
                // idle partition polled by readers would collect them forever.
                st.data_waiters.retain(|w| !w.is_canceled());
                st.data_waiters.push(tx);
            }
            futures_lite::future::or(
                async {
                    let _ = rx.await;
                },
                glommio::timer::sleep(max_wait),
            )
            .await;
        }
        let mut out = FetchedData {
            high_watermark: self.high_watermark(),
            log_start_offset: self.log_start_offset(),
            batches: BatchBytes::default(),
            out_of_range: false,
        };
        if offset >= out.high_watermark {
            return Ok(out);
        }
        if let Some(range) = self.corrupt_range_of(offset) {
            return Err(StorageError::Corrupt(format!(
                "offsets {}..={} fail their checksum at byte {} of segment {} and are not served; \
                 the next readable offset is {}",
                range.first_offset,
                range.last_offset,
                range.pos,
                range.segment_base,
                range.last_offset + 1
            )));
        }
        let metrics = &self.config.metrics;
        let (batches, records) = match self.fetch_from_cache(offset, max_bytes) {
            Some(cached) => {
                let served = &metrics.fetched_from_memory_bytes;
                served.set(served.get() + cached.0.len() as u64);
                cached
            }
            None => {
                let read = self.fetch_from_segments(offset, max_bytes).await?;
                let served = &metrics.fetched_from_disk_bytes;
                served.set(served.get() + read.len() as u64);
                let records = count_records(&read);
                (BatchBytes::from(read), records)
            }
        };
        {
            let mut st = self.state.borrow_mut();
            st.messages_out += records;
            st.bytes_out += batches.len() as u64;
        }
        out.batches = batches;
        Ok(out)
    }

    /// The first and last offset of the range recovery found corrupt around `offset`, if
    /// any: readers that must move on (subscriptions) skip past it.
    pub fn corrupt_range_around(&self, offset: u64) -> Option<(u64, u64)> {
        self.corrupt_range_of(offset)
            .map(|r| (r.first_offset, r.last_offset))
    }

    fn corrupt_range_of(&self, offset: u64) -> Option<CorruptRange> {
        let st = self.state.borrow();
        st.corrupt
            .iter()
            .find(|r| r.first_offset <= offset && offset <= r.last_offset)
            .cloned()
    }

    /// Whole batches from the in-memory tail, shared rather than copied, and how many
    /// records they hold; `None` if `offset` is older than the tail.
    fn fetch_from_cache(&self, offset: u64, max_bytes: usize) -> Option<(BatchBytes, u64)> {
        let st = self.state.borrow();
        let first = st.cache.front()?;
        if first.base_offset > offset {
            return None;
        }
        let at = st.cache.partition_point(|b| b.last_offset < offset);
        let mut end = at;
        let mut bytes = 0usize;
        while let Some(b) = st.cache.get(end) {
            if end > at && bytes + b.len() > max_bytes {
                break;
            }
            bytes += b.len();
            end += 1;
        }
        let mut out = BatchBytes::with_capacity(2 * (end - at));
        let mut records = 0u64;
        for b in st.cache.range(at..end) {
            out.push(b.header.clone());
            out.push(b.body.clone());
            records += b.last_offset - b.base_offset + 1;
        }
        Some((out, records))
    }

    /// Reads from the segment holding `offset`, moving to the next segment if that one has
    /// nothing at or after it. A read that continues where the previous disk read stopped
    /// starts there (no index lookup) with the bytes read ahead meanwhile, and each disk read
    /// starts the read-ahead of the next window, so that a reader catching up overlaps its
    /// processing with the disk.
    async fn fetch_from_segments(
        self: &Rc<Self>,
        offset: u64,
        max_bytes: usize,
    ) -> Result<Bytes, StorageError> {
        let mut i = {
            let st = self.state.borrow();
            st.segments
                .partition_point(|s| s.base_offset <= offset)
                .saturating_sub(1)
        };
        loop {
            let target = {
                let st = self.state.borrow();
                st.segments.get(i).map(|s| {
                    (
                        Rc::clone(&s.file),
                        s.entry_for(offset),
                        s.end,
                        s.path("log"),
                        s.base_offset,
                    )
                })
            };
            let Some((file, entry, end, path, base)) = target else {
                return Ok(Bytes::new());
            };
            // Continue where the last read stopped, unless the index knows a later start
            // (after damaged bytes that recovery stepped over).
            let (start, ahead) = match self.take_read_ahead(offset, base) {
                Some((pos, data)) if entry.1 <= pos => ((offset, pos), data.await),
                _ => (entry, None),
            };
            let read = self
                .read_segment(&file, &path, start, end, offset, max_bytes, ahead)
                .await?;
            if !read.batches.is_empty() {
                self.start_read_ahead(file, base, read.next_offset, read.next_pos, max_bytes);
                return Ok(read.batches);
            }
            i += 1;
        }
    }

    /// The read-ahead left for a read of `offset` in segment `base`: (position, its read).
    fn take_read_ahead(
        &self,
        offset: u64,
        base: u64,
    ) -> Option<(u64, Shared<glommio::Task<Option<Bytes>>>)> {
        let mut st = self.state.borrow_mut();
        let matches = st
            .read_ahead
            .as_ref()
            .is_some_and(|ra| ra.next_offset == offset && ra.segment_base == base);
        if !matches {
            return None;
        }
        st.read_ahead.take().map(|ra| (ra.pos, ra.data))
    }

    /// Notes where a disk read stopped and starts reading the next `len` bytes of the
    /// segment (up to its end) ahead.
    fn start_read_ahead(
        self: &Rc<Self>,
        file: Rc<DmaFile>,
        base: u64,
        next_offset: u64,
        pos: u64,
        len: usize,
    ) {
        let end = {
            let mut st = self.state.borrow_mut();
            st.read_ahead = None;
            st.segments
                .iter()
                .find(|s| s.base_offset == base)
                .map_or(0, |s| s.end)
        };
        if pos >= end {
            return;
        }
        let n = (len as u64).min(end - pos) as usize;
        let max_io_bytes = self.config.max_io_bytes;
        // The task holds the file, not the log: a log dropped meanwhile drops the read.
        // glommio may run a spawned task right away: no borrow is held here.
        let data = glommio::spawn_local(async move {
            dma::read_range(&file, pos, n, max_io_bytes)
                .await
                .ok()
                .map(Bytes::from)
        })
        .shared();
        self.state.borrow_mut().read_ahead = Some(ReadAhead {
            segment_base: base,
            next_offset,
            pos,
            data,
        });
    }

    /// Reads whole batches from `start` = (offset of the batch there, position), walking to
    /// the one that holds `offset`; `ahead` holds bytes already read from `start` on. A batch
    /// is served only if its CRC matches and its base offset (outside the CRC) continues the
    /// walk; others are damage, skipped before the wanted offset and never served.
    #[allow(clippy::too_many_arguments)]
    async fn read_segment(
        &self,
        file: &DmaFile,
        path: &Path,
        start: (u64, u64),
        end: u64,
        offset: u64,
        max_bytes: usize,
        mut ahead: Option<Bytes>,
    ) -> Result<SegmentRead, StorageError> {
        let (mut next, mut pos) = start;
        let mut want = max_bytes.max(64 * 1024);
        while pos < end {
            // `short`: the file ends before the log's end (only known for a fresh read).
            let (window, from_ahead, short) = match ahead.take() {
                Some(w) if !w.is_empty() => {
                    (w.slice(..w.len().min((end - pos) as usize)), true, false)
                }
                _ => {
                    let len = (want as u64).min(end - pos) as usize;
                    let bytes = dma::read_range(file, pos, len, self.config.max_io_bytes).await?;
                    let short = bytes.len() < len;
                    (Bytes::from(bytes), false, short)
                }
            };
            let mut at = 0usize;
            let mut first: Option<usize> = None;
            let mut need_more = None;
            while at + HEADER_PREFIX_LEN <= window.len() {
                let abs = pos + at as u64;
                let header = BatchHeader::parse(&window[at..])
                    .map_err(|e| StorageError::Corrupt(e.to_string()))?;
                let blen = header.batch_len() as usize;
                if blen < HEADER_PREFIX_LEN || abs + blen as u64 > end {
                    if first.is_some() {
                        break; // serve what came before it, as for a CRC failure below
                    }
                    return Err(corrupt_read(path, abs, "its length is invalid"));
                }
                if at + blen > window.len() {
                    need_more = Some(blen);
                    break;
                }
                // The batch should hold `next..=last`; its count is all a damaged one offers.
                let last = next.saturating_add(u64::from(header.last_offset_delta()));
                let crc_ok = batch::crc_matches(&window[at..at + blen]);
                if !crc_ok || header.base_offset() != next {
                    if first.is_none() && last < offset {
                        next = last.saturating_add(1);
                        at += blen; // a damaged batch before the one wanted: skip it
                        continue;
                    }
                    if first.is_some() {
                        break; // serve what came before it; the next fetch reports it
                    }
                    let what = if crc_ok {
                        "its base offset does not follow the batch before it"
                    } else {
                        "CRC32C mismatch"
                    };
                    return Err(corrupt_read(path, abs, what));
                }
                if last < offset {
                    next = last.saturating_add(1);
                    at += blen;
                    continue;
                }
                match first {
                    None => first = Some(at),
                    Some(f) if at + blen - f > max_bytes => break,
                    Some(_) => {}
                }
                next = last.saturating_add(1);
                at += blen;
            }
            if let Some(f) = first {
                // A view of the whole batches in the window: no copy.
                return Ok(SegmentRead {
                    batches: window.slice(f..at),
                    next_offset: next,
                    next_pos: pos + at as u64,
                });
            }
            if at == 0 && !from_ahead && (need_more.is_none() || short) {
                // No way forward: fewer bytes than a batch header, or than the batch its
                // header announces, are left before the end. Reading again would loop.
                return Err(corrupt_read(path, pos, "the log ends inside it"));
            }
            pos += at as u64;
            want = need_more.unwrap_or(want).max(want);
        }
        Ok(SegmentRead {
            batches: Bytes::new(),
            next_offset: next,
            next_pos: pos,
        })
    }

    /// Writes the active segment's new index entries and a checkpoint of the durable point,
    /// if it moved. Called periodically, so that recovery after a crash scans little.
    pub async fn checkpoint(&self) -> Result<(), StorageError> {
        let _guard = self.checkpoint_lock.acquire_permit(1).await;
        let (append, checkpoint) = {
            let mut st = self.state.borrow_mut();
            let hw = st.high_watermark;
            let previous = st.checkpointed;
            let log_start = st.log_start();
            let Some(active) = st.segments.back_mut() else {
                return Ok(());
            };
            if (active.base_offset, active.end) == (previous.segment_base, previous.durable_end) {
                return Ok(());
            }
            let checkpoint = Checkpoint {
                segment_base: active.base_offset,
                durable_end: active.end,
                next_offset: hw,
                log_start,
                clean: false,
            };
            let append = active.take_unwritten_index();
            st.checkpointed = checkpoint;
            (append, checkpoint)
        };
        if !append.is_empty() {
            let written = glommio::executor()
                .spawn_blocking(move || append.write(false))
                .await;
            if let Err(e) = written {
                tracing::warn!(
                    "appending to the index in {} failed: {e}",
                    self.dir.display()
                );
            }
        }
        save_checkpoint(&self.dir, checkpoint).await
    }

    /// Deletes whole segments (never the active one) past the retention limits. Returns the
    /// number deleted.
    ///
    /// The new log start is checkpointed before any file is unlinked: a power cut may keep
    /// any subset of the unlinks, and recovery then removes the rest (`finish_retention`)
    /// instead of finding a gap in the offsets.
    pub async fn enforce_retention(&self, now_ms: i64) -> usize {
        let _guard = self.checkpoint_lock.acquire_permit(1).await;
        let removed: Vec<Segment> = {
            let mut st = self.state.borrow_mut();
            let mut removed = Vec::new();
            let mut total: u64 = st.segments.iter().map(|s| s.end).sum();
            while st.segments.len() > 1 {
                let Some(oldest) = st.segments.front() else {
                    break;
                };
                let too_big = self
                    .config
                    .retention_bytes
                    .is_some_and(|limit| total > limit);
                let too_old = self
                    .config
                    .retention_ms
                    .is_some_and(|ms| oldest.max_timestamp_ms < now_ms - ms as i64);
                if !(too_big || too_old) {
                    break;
                }
                total -= oldest.end;
                if let Some(seg) = st.segments.pop_front() {
                    removed.push(seg);
                }
            }
            let start = st
                .segments
                .front()
                .map_or(st.high_watermark, |s| s.base_offset);
            while st.cache.front().is_some_and(|b| b.base_offset < start) {
                if let Some(old) = st.cache.pop_front() {
                    st.cache_bytes -= old.len();
                }
            }
            st.corrupt.retain(|r| r.last_offset >= start);
            removed
        };
        if removed.is_empty() {
            return 0;
        }
        let checkpoint = {
            let mut st = self.state.borrow_mut();
            st.checkpointed.log_start = st.log_start();
            st.checkpointed
        };
        disk_trace::instant(|| disk_trace::Op::Note {
            text: format!("retention {} {}", self.dir.display(), checkpoint.log_start),
        });
        if let Err(e) = save_checkpoint(&self.dir, checkpoint).await {
            // Unlinked without a durable log start, the files could come back with a gap.
            tracing::warn!(
                "{e}; the {} segments below offset {} stay on disk until the next start",
                removed.len(),
                checkpoint.log_start
            );
            return 0;
        }
        let count = removed.len();
        for seg in removed {
            let paths = [seg.path("log"), seg.path("index"), seg.path("timeindex")];
            drop(seg); // readers holding the file keep it open until they finish
            let _ = glommio::executor()
                .spawn_blocking(move || {
                    for p in paths {
                        let _ = disk_trace::remove_file(&p);
                    }
                })
                .await;
        }
        let _ = sync_dir(&self.dir).await;
        count
    }

    /// Stops accepting appends, waits for the in-flight flush, and records a clean stop
    /// (index and checkpoint), so that the next start needs no scan.
    pub async fn close(&self) {
        self.state.borrow_mut().closed = true;
        loop {
            let rx = {
                let mut st = self.state.borrow_mut();
                if !st.flushing {
                    break;
                }
                let (tx, rx) = oneshot::channel();
                st.data_waiters.push(tx);
                rx
            };
            let _ = rx.await;
        }
        for tx in self.state.borrow_mut().data_waiters.drain(..) {
            let _ = tx.send(());
        }
        self.prewrite_finished().await;
        self.adopt_device_failure(&mut self.state.borrow_mut());
        if self.state.borrow().failed.is_some() {
            return; // no clean marker for a log that failed: recovery must scan it
        }
        let _guard = self.checkpoint_lock.acquire_permit(1).await;
        // A clean marker vouches for the end without a scan: with `--durability write` or
        // `none` nothing has synced the last writes yet, so this does, or there is no marker.
        if self.config.durability != Durability::Sync {
            let file = self
                .state
                .borrow()
                .segments
                .back()
                .map(|s| Rc::clone(&s.file));
            if let Some(file) = file {
                if let Err(e) = dma::fdatasync(&file).await {
                    tracing::error!(
                        "fdatasync of {} at shutdown failed: {e}; no clean-shutdown marker",
                        self.dir.display()
                    );
                    return;
                }
            }
        }
        let (append, checkpoint) = {
            let mut st = self.state.borrow_mut();
            let hw = st.high_watermark;
            let log_start = st.log_start();
            let Some(active) = st.segments.back_mut() else {
                return;
            };
            let checkpoint = Checkpoint {
                segment_base: active.base_offset,
                durable_end: active.end,
                next_offset: hw,
                log_start,
                clean: true,
            };
            (active.take_unwritten_index(), checkpoint)
        };
        let written = glommio::executor()
            .spawn_blocking(move || append.write(true))
            .await;
        if written.is_ok() {
            if let Err(e) = save_checkpoint(&self.dir, checkpoint).await {
                tracing::error!(
                    "clean-shutdown checkpoint of {} failed: {e}",
                    self.dir.display()
                );
            }
        }
    }
}

impl Drop for PartitionLog {
    fn drop(&mut self) {
        let open_logs = &self.config.metrics.open_logs;
        open_logs.set(open_logs.get().saturating_sub(1));
    }
}

/// The error of a log that turned read-only because a sync on its device failed.
fn device_failed(why: &str) -> StorageError {
    StorageError::ReadOnly(format!("a sync on this shard's data device failed: {why}"))
}

fn check_writable(st: &LogState) -> Result<(), StorageError> {
    if let Some(why) = &st.failed {
        return Err(StorageError::ReadOnly(why.clone()));
    }
    if st.closed {
        return Err(StorageError::ReadOnly("the log is closed".into()));
    }
    Ok(())
}

fn corrupt_read(path: &Path, pos: u64, what: &str) -> StorageError {
    let msg = format!("stored batch at byte {pos} of {}: {what}", path.display());
    tracing::error!("CORRUPT {msg}; the range is not served");
    StorageError::Corrupt(msg)
}

/// The headers of whole batches read from the log (each was checked when read).
fn stored_headers(batches: &[u8]) -> impl Iterator<Item = BatchHeader<'_>> {
    let mut rest = batches;
    std::iter::from_fn(move || {
        let header = BatchHeader::parse(rest).ok()?;
        let len = header.batch_len() as usize;
        if len < HEADER_PREFIX_LEN || len > rest.len() {
            return None;
        }
        rest = &rest[len..];
        Some(header)
    })
}

/// Records in whole batches read from the log.
fn count_records(batches: &[u8]) -> u64 {
    stored_headers(batches)
        .map(|h| u64::from(h.record_count()))
        .sum()
}

async fn save_checkpoint(dir: &Path, checkpoint: Checkpoint) -> Result<(), StorageError> {
    let owned = dir.to_path_buf();
    glommio::executor()
        .spawn_blocking(move || checkpoint.save(&owned))
        .await
        .map_err(|e| StorageError::io(format!("writing the checkpoint of {}", dir.display()), &e))
}

/// Removes the segments wholly below `log_start` (never the last one): what a retention pass
/// left when a crash cut it short, after it had checkpointed the new log start.
async fn finish_retention(
    dir: &Path,
    bases: &mut Vec<u64>,
    log_start: u64,
) -> Result<(), StorageError> {
    let below = bases
        .windows(2)
        .take_while(|pair| pair[1] <= log_start)
        .count();
    if below == 0 {
        return Ok(());
    }
    let removed: Vec<u64> = bases.drain(..below).collect();
    tracing::info!(
        "{}: removing {below} segments below the log start {log_start} (a retention pass cut \
         short)",
        dir.display()
    );
    let owned = dir.to_path_buf();
    glommio::executor()
        .spawn_blocking(move || -> std::io::Result<()> {
            for base in removed {
                for ext in ["log", "index", "timeindex"] {
                    match disk_trace::remove_file(&owned.join(segment::file_name(base, ext))) {
                        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                        _ => {}
                    }
                }
            }
            super::atomic_file::sync_dir(&owned)
        })
        .await
        .map_err(|e| StorageError::io(format!("finishing retention in {}", dir.display()), &e))
}

/// Recovers one segment. Sealed segments (those with a `next_base` after them) are scanned
/// from their last index entry to their end; the active one likewise, unless a
/// clean-shutdown checkpoint vouches for its end. A torn tail of the active segment is cut
/// (zeroed).
async fn recover_segment(
    seg: &mut Segment,
    next_base: Option<u64>,
    checkpoint: Option<Checkpoint>,
    config: &LogConfig,
    corrupt: &mut Vec<CorruptRange>,
) -> Result<(), StorageError> {
    let path = seg.path("log");
    let active = next_base.is_none();
    seg.load_index(seg.extent.allocated());
    let own_checkpoint = checkpoint.filter(|c| c.segment_base == seg.base_offset);
    if let Some(c) =
        own_checkpoint.filter(|c| active && c.clean && c.durable_end <= seg.extent.allocated())
    {
        if index_entry_checks_out(seg, c.durable_end, config).await? {
            seg.end = c.durable_end;
            seg.next_offset = c.next_offset;
            seg.index.retain(|&(_, p)| p < c.durable_end);
            seg.max_timestamp_ms = seg.time_index.last().map_or(i64::MIN, |&(t, _)| t);
            tracing::info!(
                "{}: clean start at offset {}, no scan",
                path.display(),
                c.next_offset
            );
            return Ok(());
        }
    }
    // Start from the last index entry that points at a valid batch; else from the start.
    if !index_entry_checks_out(seg, seg.extent.allocated(), config).await? {
        tracing::warn!(
            "{}: index does not match the log; rebuilding it",
            path.display()
        );
        seg.truncate_index(0);
    }
    let (pos, offset) = seg
        .index
        .last()
        .map_or((0, seg.base_offset), |&(o, p)| (p, o));
    let durable = match next_base {
        // A sealed segment was made durable before the roll.
        Some(next) => DurablePoint {
            end: seg.extent.allocated(),
            next_offset: next,
        },
        None => own_checkpoint.map_or(
            DurablePoint {
                end: 0,
                next_offset: 0,
            },
            // A file shorter than the checkpoint's durable end lost acknowledged bytes: the
            // scan reports their offsets, and the log must not end past the file's bytes
            // (the tail block is read from there and the next flush lands there).
            |c| DurablePoint {
                end: c.durable_end.min(seg.extent.allocated()),
                next_offset: c.next_offset,
            },
        ),
    };
    let outcome = scan_segment(seg, pos, offset, durable, config, corrupt).await?;
    seg.max_timestamp_ms = seg
        .max_timestamp_ms
        .max(seg.time_index.last().map_or(i64::MIN, |&(t, _)| t));
    match outcome {
        // Past the end of an active segment after a crash there may be batches of a torn
        // flush kept beyond a block it lost (zeros end the scan there). Never acknowledged,
        // but valid: they are cleared, so that no later scan takes them for data once new
        // appends reach them.
        ScanEnd::Clean if active && seg.end < seg.extent.allocated() => {
            cut_tail(seg, config).await?;
        }
        ScanEnd::Clean => {}
        ScanEnd::Torn(why) if active => {
            tracing::warn!(
                "recovery of {}: cut a torn tail at byte {} ({why}); it was never acknowledged",
                path.display(),
                seg.end
            );
            cut_tail(seg, config).await?;
        }
        ScanEnd::Torn(why) => {
            tracing::warn!(
                "recovery of {}: sealed segment ends early at byte {} ({why})",
                path.display(),
                seg.end
            );
        }
    }
    Ok(())
}

/// True if the segment's last index entry (below `limit`) points at a valid batch with the
/// offset the entry names (or there is no entry).
async fn index_entry_checks_out(
    seg: &Segment,
    limit: u64,
    config: &LogConfig,
) -> Result<bool, StorageError> {
    let Some(&(offset, pos)) = seg.index.iter().rev().find(|&&(_, p)| p < limit) else {
        return Ok(true);
    };
    let head = dma::read_range(&seg.file, pos, HEADER_PREFIX_LEN, config.max_io_bytes).await?;
    let Ok(header) = BatchHeader::parse(&head) else {
        return Ok(false);
    };
    let len = header.batch_len() as usize;
    if header.base_offset() != offset
        || len < HEADER_PREFIX_LEN
        || pos + len as u64 > seg.extent.allocated()
    {
        return Ok(false);
    }
    let bytes = dma::read_range(&seg.file, pos, len, config.max_io_bytes).await?;
    Ok(batch::crc_matches(&bytes))
}

/// Zeroes everything after the valid end of the active segment: the rest of its last block is
/// rewritten, the remainder punched out and preallocated again, then synced.
async fn cut_tail(seg: &mut Segment, config: &LogConfig) -> Result<(), StorageError> {
    let end = seg.end;
    let start = align_down(end);
    let path = seg.path("log");
    let keep = dma::read_range(
        &seg.file,
        start,
        (end - start) as usize,
        config.max_io_bytes,
    )
    .await?;
    let mut filler = ChunkFiller::new(&seg.file, ALIGN as usize, config.max_io_bytes);
    filler.put(&keep);
    filler.put(&vec![0u8; ALIGN as usize - keep.len()]);
    filler.write_at(start).await?;
    let hole = align_up(end).max(start + ALIGN);
    if seg.extent.allocated() > hole {
        dma::deallocate(&seg.file, hole, seg.extent.allocated() - hole)
            .await
            .map_err(|e| {
                StorageError::glommio(format!("punching the torn tail of {}", path.display()), e)
            })?;
        dma::pre_allocate(&seg.file, seg.extent.allocated())
            .await
            .map_err(|e| StorageError::glommio(format!("preallocating {}", path.display()), e))?;
    }
    dma::fdatasync(&seg.file)
        .await
        .map_err(|e| StorageError::glommio(format!("fdatasync of {}", path.display()), e))?;
    seg.truncate_index(end);
    Ok(())
}
