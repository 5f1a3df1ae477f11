//! One partition's log: an ordered set of segments with group commit, an in-memory tail for
//! recent reads, long-poll waiters, recovery at open, checkpoints and retention.
//!
//! Owned by exactly one shard (everything here is `Rc`/`RefCell`, never shared across
//! threads). The network layer hands it already-validated batches; it stamps their offsets,
//! makes them durable per the [`Durability`] mode, and only then acknowledges them and lets
//! readers see them.
//!
//! The parts, each in its own file: `append` (offsets, idempotent producers, the pending
//! queue), `flush` (the group commit), `prewriting` (zero-fill and the spare segment ahead of
//! the appender), `roll`, `reader` (the in-memory tail, disk reads and read-ahead),
//! `checkpointing` (checkpoints and the clean stop), `retention`, `truncation` (cutting the log
//! back to a batch boundary) and `recovery` with `scan` (what `open` does with the files it
//! finds).
//!
//! Group commit: appends go into `pending`; one flush task per log takes everything pending,
//! writes it with a few large aligned writes into the active segment (the partial last block
//! rewritten from `tail_block`), syncs, then acknowledges every batch it covered. Batches
//! that arrive while a flush is in flight wait for the next one, so one write + one
//! `fdatasync` serves many producers. Flushes are sequential per log, so the durable point is
//! always a prefix; flushes of different logs run concurrently. A flush that only overwrites
//! blocks already committed (`Extent::synced_to`) may instead share the shard's one disk
//! flush for the round (`storage::shard_sync`).

mod append;
mod checkpointing;
mod config;
mod flush;
mod prewriting;
mod reader;
mod recovery;
mod retention;
mod roll;
pub mod scan;
mod truncation;

use std::cell::RefCell;
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use futures::channel::oneshot;
use glommio::sync::Semaphore;

use super::checkpoint::Checkpoint;
use super::producers::ProducerTable;
use super::segment::Segment;
use super::shard_sync::ShardSync;
use super::space_queue::SpaceQueue;
use super::spare::Spare;
use super::StorageError;
use append::StoredBatch;
use checkpointing::save_checkpoint;
use prewriting::ZeroFill;
use reader::{ReadAhead, TailCache};
use recovery::Recovered;
use scan::CorruptRange;

pub use append::AppendTicket;
pub use config::LogConfig;

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
    /// Zero-filling ahead of the end of the active segment.
    zero_fill: ZeroFill,
    /// The next segment's file, made ready ahead of the roll.
    spare: Spare,
    /// (last offset of an append, its acknowledgement), in offset order.
    ack_waiters: VecDeque<(u64, oneshot::Sender<Result<(), StorageError>>)>,
    /// Long-polling readers, and appenders held back by a full pending queue.
    data_waiters: Vec<oneshot::Sender<()>>,
    space_waiters: SpaceQueue,
    /// Recent stored batches, oldest first.
    cache: TailCache,
    /// Offsets whose stored bytes failed their checksum: refused to readers.
    corrupt: Vec<CorruptRange>,
    /// Set after a fatal error (an fdatasync failure): the log no longer accepts writes.
    failed: Option<String>,
    closed: bool,
    /// A truncation is running: appends are refused.
    truncating: bool,
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
        let Recovered {
            segments,
            corrupt,
            tail_block,
        } = recovery::recover(dir, &config).await?;
        let shard_sync = config.shard_sync.clone().filter(|sync| sync.covers(dir));
        let (active_base, end, next_offset) = segments
            .back()
            .map(|a| (a.base_offset, a.end, a.next_offset))
            .ok_or_else(|| StorageError::Corrupt("no segment".into()))?;
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
                zero_fill: ZeroFill::default(),
                spare: Spare::default(),
                ack_waiters: VecDeque::new(),
                data_waiters: Vec::new(),
                space_waiters: SpaceQueue::default(),
                cache: TailCache::default(),
                corrupt,
                failed: None,
                closed: false,
                truncating: false,
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

    fn active_path(&self) -> PathBuf {
        let st = self.state.borrow();
        st.segments
            .back()
            .map_or_else(|| self.dir.clone(), |s| s.path("log"))
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
    if st.truncating {
        return Err(StorageError::ReadOnly(
            "the log is being truncated; append after the truncation returned".into(),
        ));
    }
    Ok(())
}
