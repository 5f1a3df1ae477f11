//! One partition's log: an append-only direct-I/O file with group commit, a sparse offset
//! index, an in-memory tail for recent reads, long-poll waiters and recovery at open.
//!
//! Owned by exactly one shard (everything here is `Rc`/`RefCell`, never shared across
//! threads). The network layer hands it already-validated batches; it stamps their offsets,
//! makes them durable per the [`Durability`] mode, and only then acknowledges them and lets
//! readers see them.
//!
//! Group commit: appends go into `pending`; one flush task per log takes everything pending,
//! writes it with a few large aligned writes (the partial last block rewritten from
//! `tail_block`), syncs, then acknowledges every batch it covered. Batches that arrive while
//! a flush is in flight wait for the next one, so one write + one `fdatasync` serves many
//! producers. Flushes are sequential per log, so the durable point is always a prefix.
//!
//! On-disk layout: `<dir>/00000000000000000000.log`, a concatenation of record batches.
//! (Segment rolling, on-disk indexes and retention grow from here; see docs/architecture.md.)

use std::cell::RefCell;
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Duration;

use bytes::Bytes;
use futures::channel::oneshot;
use glommio::io::DmaFile;

use super::dma::{self, align_down, ChunkFiller, ALIGN};
use super::{Durability, StorageError};
use crate::record::batch::{self, BatchHeader, HEADER_LEN};

/// File name of the first (today: only) segment.
const SEGMENT_FILE: &str = "00000000000000000000.log";

/// Tunables of a partition log; one per shard, shared by its logs.
#[derive(Clone, Debug)]
pub struct LogConfig {
    /// When appends are acknowledged.
    pub durability: Durability,
    /// Largest single DMA read or write (glommio issue #633).
    pub max_io_bytes: usize,
    /// Recent batches kept in memory per partition for readers.
    pub cache_bytes: usize,
    /// Bytes of log between two sparse index entries.
    pub index_interval_bytes: u64,
    /// Bytes that may wait for a flush before appenders are held back.
    pub max_pending_bytes: usize,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            durability: Durability::Sync,
            max_io_bytes: 4 << 20,
            cache_bytes: 8 << 20,
            index_interval_bytes: 4096,
            max_pending_bytes: 64 << 20,
        }
    }
}

/// A batch stamped with its offsets, as it will be stored. The body is the producer's bytes
/// after the header, still inside the received frame: no copy until the flush.
struct StoredBatch {
    header: [u8; HEADER_LEN],
    body: Bytes,
    base_offset: u64,
    last_offset: u64,
}

impl StoredBatch {
    fn len(&self) -> usize {
        HEADER_LEN + self.body.len()
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

/// What a fetch returns: whole batches and the log's bounds at that moment.
#[derive(Debug, Default)]
pub struct FetchedData {
    /// Next offset to be written; all offsets below are acknowledged.
    pub high_watermark: u64,
    /// Earliest stored offset.
    pub log_start_offset: u64,
    /// Whole stored batches, concatenated.
    pub batches: Vec<u8>,
    /// Set when the requested offset was outside `[log_start_offset, high_watermark]`.
    pub out_of_range: bool,
}

struct LogState {
    /// Next offset to assign.
    next_offset: u64,
    /// Offsets below this are written per the durability mode, acknowledged and readable.
    high_watermark: u64,
    log_start_offset: u64,
    /// Bytes of the segment file that hold acknowledged batches.
    file_end: u64,
    /// The bytes of the partial last block, `file_end % ALIGN` long, rewritten on the next
    /// flush.
    tail_block: Vec<u8>,
    pending: Vec<StoredBatch>,
    pending_bytes: usize,
    flushing: bool,
    /// (last offset of an append, its acknowledgement), in offset order.
    ack_waiters: VecDeque<(u64, oneshot::Sender<Result<(), StorageError>>)>,
    /// Long-polling readers and appenders held back by a full pending queue.
    data_waiters: Vec<oneshot::Sender<()>>,
    space_waiters: Vec<oneshot::Sender<()>>,
    /// Sparse index: (base offset, file position) every `index_interval_bytes`.
    index: Vec<(u64, u64)>,
    /// Recent stored batches with their file positions, oldest first.
    cache: VecDeque<(u64, StoredBatch)>,
    cache_bytes: usize,
    /// Set after a fatal error (fdatasync failure): the log no longer accepts writes.
    failed: Option<String>,
    closed: bool,
}

/// A partition's log. Create with [`PartitionLog::open`].
pub struct PartitionLog {
    dir: PathBuf,
    file: DmaFile,
    config: Rc<LogConfig>,
    state: RefCell<LogState>,
}

impl PartitionLog {
    /// Opens the log in `dir` (creating it), scanning the file to find the end of the valid
    /// data: a torn or corrupt tail left by a crash is cut off, never served.
    pub async fn open(dir: &Path, config: Rc<LogConfig>) -> Result<Rc<Self>, StorageError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| StorageError::io(format!("creating {}", dir.display()), &e))?;
        let path = dir.join(SEGMENT_FILE);
        let file = dma::open_rw(&path).await?;
        let scan = recover(&file, &path, &config).await?;
        let log = Rc::new(Self {
            dir: dir.to_path_buf(),
            file,
            config,
            state: RefCell::new(LogState {
                next_offset: scan.next_offset,
                high_watermark: scan.next_offset,
                log_start_offset: 0,
                file_end: scan.file_end,
                tail_block: scan.tail_block,
                pending: Vec::new(),
                pending_bytes: 0,
                flushing: false,
                ack_waiters: VecDeque::new(),
                data_waiters: Vec::new(),
                space_waiters: Vec::new(),
                index: scan.index,
                cache: VecDeque::new(),
                cache_bytes: 0,
                failed: None,
                closed: false,
            }),
        });
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
        self.state.borrow().log_start_offset
    }

    /// Appends already-validated batches (each a complete batch; see `record::Batch`) as one
    /// unit: either all get offsets or none. Waits while too many bytes are pending a flush.
    pub async fn append(
        self: &Rc<Self>,
        batches: &[Bytes],
        append_time_ms: i64,
    ) -> Result<AppendTicket, StorageError> {
        let incoming: usize = batches.iter().map(Bytes::len).sum();
        loop {
            let wait = {
                let mut st = self.state.borrow_mut();
                self.check_writable(&st)?;
                if st.pending_bytes == 0
                    || st.pending_bytes + incoming <= self.config.max_pending_bytes
                {
                    None
                } else {
                    let (tx, rx) = oneshot::channel();
                    st.space_waiters.push(tx);
                    Some(rx)
                }
            };
            match wait {
                Some(rx) => {
                    let _ = rx.await;
                }
                None => break,
            }
        }
        let mut st = self.state.borrow_mut();
        let base_offset = st.next_offset;
        for bytes in batches {
            let Ok(header) = BatchHeader::parse(bytes) else {
                continue; // validated by the caller; cannot happen
            };
            let count = u64::from(header.record_count());
            let mut stamped = [0u8; HEADER_LEN];
            stamped.copy_from_slice(&bytes[..HEADER_LEN]);
            batch::stamp(&mut stamped, st.next_offset, append_time_ms);
            let stored = StoredBatch {
                header: stamped,
                body: bytes.slice(HEADER_LEN..),
                base_offset: st.next_offset,
                last_offset: st.next_offset + count - 1,
            };
            st.next_offset += count;
            st.pending_bytes += stored.len();
            st.pending.push(stored);
        }
        let last_offset = st.next_offset.saturating_sub(1);
        debug_assert!(last_offset >= base_offset, "append of an empty batch list");
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

    fn check_writable(&self, st: &LogState) -> Result<(), StorageError> {
        if let Some(why) = &st.failed {
            return Err(StorageError::ReadOnly(why.clone()));
        }
        if st.closed {
            return Err(StorageError::ReadOnly("the log is closed".into()));
        }
        Ok(())
    }

    /// Flushes pending batches until none are left: the group commit.
    async fn flush_loop(self: Rc<Self>) {
        loop {
            let (batches, start_pos, carry) = {
                let mut st = self.state.borrow_mut();
                if st.pending.is_empty() || st.failed.is_some() {
                    st.flushing = false;
                    return;
                }
                st.pending_bytes = 0;
                let batches = std::mem::take(&mut st.pending);
                (batches, align_down(st.file_end), st.tail_block.clone())
            };
            for tx in self.state.borrow_mut().space_waiters.drain(..) {
                let _ = tx.send(());
            }
            let bytes: usize = batches.iter().map(StoredBatch::len).sum();
            let mut filler =
                ChunkFiller::new(&self.file, carry.len() + bytes, self.config.max_io_bytes);
            filler.put(&carry);
            for b in &batches {
                filler.put(&b.header);
                filler.put(&b.body);
            }
            let new_end = start_pos + (carry.len() + bytes) as u64;
            let new_tail = filler.last_bytes((new_end % ALIGN) as usize);
            let written = filler.write_at(start_pos).await;
            let result = match written {
                Err(e) => Err((e, false)),
                Ok(()) if self.config.durability == Durability::Sync => {
                    self.file.fdatasync().await.map_err(|e| {
                        let path = self.dir.join(SEGMENT_FILE);
                        (
                            StorageError::glommio(format!("fdatasync of {}", path.display()), e),
                            true,
                        )
                    })
                }
                Ok(()) => Ok(()),
            };
            match result {
                Ok(()) => self.complete_flush(batches, new_end, new_tail),
                Err((error, fatal)) => self.fail_flush(error, fatal),
            }
        }
    }

    /// Makes a finished flush visible: acknowledges, indexes and caches its batches.
    fn complete_flush(&self, batches: Vec<StoredBatch>, new_end: u64, new_tail: Vec<u8>) {
        let mut st = self.state.borrow_mut();
        let mut pos = st.file_end;
        for b in batches {
            let due = match st.index.last() {
                None => true,
                Some(&(_, last_pos)) => pos - last_pos >= self.config.index_interval_bytes,
            };
            if due {
                st.index.push((b.base_offset, pos));
            }
            debug_assert_eq!(
                b.base_offset, st.high_watermark,
                "offsets must be contiguous"
            );
            st.high_watermark = b.last_offset + 1;
            let len = b.len();
            st.cache_bytes += len;
            st.cache.push_back((pos, b));
            pos += len as u64;
        }
        debug_assert_eq!(pos, new_end);
        st.file_end = new_end;
        st.tail_block = new_tail;
        while st.cache_bytes > self.config.cache_bytes && st.cache.len() > 1 {
            if let Some((_, old)) = st.cache.pop_front() {
                st.cache_bytes -= old.len();
            }
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
    /// refused and its offsets are given back. An fdatasync failure is fatal: the log turns
    /// read-only and never retries the sync (the kernel may have dropped the dirty pages).
    fn fail_flush(&self, error: StorageError, fatal: bool) {
        let mut st = self.state.borrow_mut();
        let hw = st.high_watermark;
        st.next_offset = hw;
        st.pending.clear();
        st.pending_bytes = 0;
        if fatal {
            eprintln!(
                "corebus: FATAL storage error in {}: {error}; the partition is now read-only",
                self.dir.display()
            );
            st.failed = Some(error.to_string());
        }
        for (_, tx) in st.ack_waiters.drain(..) {
            let _ = tx.send(Err(error.clone()));
        }
        for tx in st.space_waiters.drain(..) {
            let _ = tx.send(());
        }
    }

    /// Reads whole batches starting with the one that holds `offset`, about `max_bytes` of
    /// them (at least one). At the end of the log, waits up to `max_wait` for data.
    pub async fn fetch(
        &self,
        offset: u64,
        max_bytes: usize,
        max_wait: Duration,
    ) -> Result<FetchedData, StorageError> {
        let (hw, start) = {
            let st = self.state.borrow();
            (st.high_watermark, st.log_start_offset)
        };
        if offset < start || offset > hw {
            return Err(StorageError::OffsetOutOfRange {
                requested: offset,
                log_start_offset: start,
                high_watermark: hw,
            });
        }
        if offset == hw && !max_wait.is_zero() {
            let (tx, rx) = oneshot::channel();
            self.state.borrow_mut().data_waiters.push(tx);
            let timeout = async {
                glommio::timer::sleep(max_wait).await;
            };
            futures_lite::future::or(
                async {
                    let _ = rx.await;
                },
                timeout,
            )
            .await;
        }
        let mut out = FetchedData {
            high_watermark: self.high_watermark(),
            log_start_offset: self.log_start_offset(),
            batches: Vec::new(),
            out_of_range: false,
        };
        if offset >= out.high_watermark {
            return Ok(out);
        }
        if let Some(bytes) = self.fetch_from_cache(offset, max_bytes) {
            out.batches = bytes;
            return Ok(out);
        }
        out.batches = self.fetch_from_file(offset, max_bytes).await?;
        Ok(out)
    }

    fn fetch_from_cache(&self, offset: u64, max_bytes: usize) -> Option<Vec<u8>> {
        let st = self.state.borrow();
        let (_, first) = st.cache.front()?;
        if first.base_offset > offset {
            return None;
        }
        let at = st.cache.partition_point(|(_, b)| b.last_offset < offset);
        let mut out = Vec::with_capacity(max_bytes.min(st.cache_bytes));
        for (_, b) in st.cache.iter().skip(at) {
            if !out.is_empty() && out.len() + b.len() > max_bytes {
                break;
            }
            out.extend_from_slice(&b.header);
            out.extend_from_slice(&b.body);
        }
        Some(out)
    }

    async fn fetch_from_file(
        &self,
        offset: u64,
        max_bytes: usize,
    ) -> Result<Vec<u8>, StorageError> {
        let (mut pos, file_end) = {
            let st = self.state.borrow();
            let i = st.index.partition_point(|&(o, _)| o <= offset);
            let pos = if i == 0 { 0 } else { st.index[i - 1].1 };
            (pos, st.file_end)
        };
        let mut want = max_bytes.max(64 * 1024);
        while pos < file_end {
            let len = (want as u64).min(file_end - pos) as usize;
            let mut window =
                dma::read_range(&self.file, pos, len, self.config.max_io_bytes).await?;
            let mut at = 0usize;
            let mut first: Option<usize> = None;
            let mut need_more = None;
            while at + HEADER_LEN <= window.len() {
                let header = BatchHeader::parse(&window[at..])
                    .map_err(|e| StorageError::Corrupt(e.to_string()))?;
                let blen = header.batch_len() as usize;
                if blen < HEADER_LEN || pos + (at + blen) as u64 > file_end {
                    return Err(self.corrupt_at(pos + at as u64, "batch length is invalid"));
                }
                if at + blen > window.len() {
                    need_more = Some(blen);
                    break;
                }
                if !batch::crc_matches(&window[at..at + blen]) {
                    return Err(self.corrupt_at(pos + at as u64, "CRC32C mismatch"));
                }
                if header.last_offset() < offset {
                    at += blen;
                    continue;
                }
                match first {
                    None => first = Some(at),
                    Some(f) if at + blen - f > max_bytes => break,
                    Some(_) => {}
                }
                at += blen;
            }
            if let Some(f) = first {
                window.truncate(at);
                window.drain(..f);
                return Ok(window);
            }
            pos += at as u64;
            want = need_more.unwrap_or(want).max(want);
        }
        Ok(Vec::new())
    }

    fn corrupt_at(&self, pos: u64, what: &str) -> StorageError {
        let msg = format!(
            "{} at byte {pos} of {}",
            what,
            self.dir.join(SEGMENT_FILE).display()
        );
        eprintln!("corebus: CORRUPT stored batch: {msg}; the range is not served");
        StorageError::Corrupt(msg)
    }

    /// Stops accepting appends and waits for the in-flight flush to finish; pending appends
    /// are still flushed and acknowledged.
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
        let mut st = self.state.borrow_mut();
        for tx in st.data_waiters.drain(..) {
            let _ = tx.send(());
        }
    }
}

/// What recovery found in the segment file.
struct Recovered {
    next_offset: u64,
    file_end: u64,
    tail_block: Vec<u8>,
    index: Vec<(u64, u64)>,
}

/// Scans the segment from the start, checking every batch header, CRC and offset, and cuts
/// the file at the first batch that is not whole and valid (a torn tail from a crash).
async fn recover(
    file: &DmaFile,
    path: &Path,
    config: &LogConfig,
) -> Result<Recovered, StorageError> {
    let size = file
        .file_size()
        .await
        .map_err(|e| StorageError::glommio(format!("stat of {}", path.display()), e))?;
    let mut pos = 0u64;
    let mut next_offset = 0u64;
    let mut index: Vec<(u64, u64)> = Vec::new();
    let window_bytes = config.max_io_bytes;
    let mut want = window_bytes;
    let mut torn = None;
    'scan: while pos < size {
        let len = (want as u64).min(size - pos) as usize;
        let window = dma::read_range(file, pos, len, config.max_io_bytes).await?;
        let mut at = 0usize;
        loop {
            let rest = &window[at..];
            if rest.len() < HEADER_LEN {
                if window.len() < len || pos + (at as u64) + (rest.len() as u64) >= size {
                    if rest.iter().any(|&b| b != 0) {
                        torn = Some("a partial batch header");
                    }
                    pos += at as u64;
                    break 'scan;
                }
                break;
            }
            let Ok(header) = BatchHeader::parse(rest) else {
                break;
            };
            let blen = header.batch_len() as usize;
            if blen == 0 && rest[..HEADER_LEN].iter().all(|&b| b == 0) {
                // Zero padding after the last block: the clean end of the log.
                pos += at as u64;
                break 'scan;
            }
            if blen < HEADER_LEN || pos + (at + blen) as u64 > size {
                torn = Some("a batch that runs past the end of the file");
                pos += at as u64;
                break 'scan;
            }
            if blen > rest.len() {
                want = want.max(blen);
                break;
            }
            if !batch::crc_matches(&rest[..blen]) {
                torn = Some("a batch whose CRC32C does not match");
                pos += at as u64;
                break 'scan;
            }
            if header.base_offset() != next_offset {
                torn = Some("a batch whose offset does not follow the previous one");
                pos += at as u64;
                break 'scan;
            }
            let batch_pos = pos + at as u64;
            let due = index
                .last()
                .is_none_or(|&(_, last)| batch_pos - last >= config.index_interval_bytes);
            if due {
                index.push((next_offset, batch_pos));
            }
            next_offset = header.last_offset() + 1;
            at += blen;
        }
        pos += at as u64;
    }
    let file_end = pos;
    if let Some(why) = torn {
        eprintln!(
            "corebus: recovery of {}: cut {} bytes of torn tail at byte {file_end} ({why})",
            path.display(),
            size - file_end
        );
    }
    if size > file_end {
        // Remove whatever lies past the valid data so that it can never be mistaken for
        // batches after later appends.
        file.truncate(file_end)
            .await
            .map_err(|e| StorageError::glommio(format!("truncating {}", path.display()), e))?;
        file.fdatasync()
            .await
            .map_err(|e| StorageError::glommio(format!("fdatasync of {}", path.display()), e))?;
    }
    let tail_start = align_down(file_end);
    let tail_block = if file_end > tail_start {
        dma::read_range(
            file,
            tail_start,
            (file_end - tail_start) as usize,
            config.max_io_bytes,
        )
        .await?
    } else {
        Vec::new()
    };
    Ok(Recovered {
        next_offset,
        file_end,
        tail_block,
        index,
    })
}
