//! Reads: the in-memory tail of recent batches (shared with the socket, never copied), disk
//! reads of whole checked batches, and the read-ahead for a reader catching up.

use std::collections::VecDeque;
use std::path::Path;
use std::rc::Rc;
use std::time::Duration;

use bytes::Bytes;
use futures::channel::oneshot;
use futures::future::{FutureExt, Shared};
use glommio::io::DmaFile;

use super::scan::CorruptRange;
use super::PartitionLog;
use crate::record::batch::{self, BatchHeader, HEADER_PREFIX_LEN};
use crate::storage::dma;
use crate::storage::fetched::{BatchBytes, FetchedData};
use crate::storage::StorageError;

/// A batch in the in-memory tail: its stamped header and its body, each shared, so that a
/// fetch hands them to the socket without copying.
pub(super) struct CachedBatch {
    pub(super) header: Bytes,
    pub(super) body: Bytes,
    pub(super) base_offset: u64,
    pub(super) last_offset: u64,
}

impl CachedBatch {
    pub(super) fn len(&self) -> usize {
        self.header.len() + self.body.len()
    }
}

/// What a read of one segment found: the batches to serve, and where the walk stopped.
pub(super) struct SegmentRead {
    batches: Bytes,
    /// Offset of the batch after the served ones.
    next_offset: u64,
    /// Its position in the segment.
    next_pos: u64,
}

/// Where the last disk read of a log stopped, and the read of the bytes after it.
pub(super) struct ReadAhead {
    segment_base: u64,
    next_offset: u64,
    pos: u64,
    /// The read, shared so that a reader that comes before it ends waits for it rather than
    /// reading the same bytes a second time; `None` if it failed (the reader then reads, and
    /// reports the error, itself).
    data: Shared<glommio::Task<Option<Bytes>>>,
}

impl PartitionLog {
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
        // Bound first: the borrow must end before a disk read awaits.
        let cached = self.state.borrow().cache.read(offset, max_bytes);
        let (batches, records) = match cached {
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
}

fn corrupt_read(path: &Path, pos: u64, what: &str) -> StorageError {
    let msg = format!("stored batch at byte {pos} of {}: {what}", path.display());
    tracing::error!("CORRUPT {msg}; the range is not served");
    StorageError::Corrupt(msg)
}

/// The headers of whole batches read from the log (each was checked when read).
pub(super) fn stored_headers(batches: &[u8]) -> impl Iterator<Item = BatchHeader<'_>> {
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

/// The in-memory tail of a log: its most recent stored batches, oldest first, within a byte
/// budget.
#[derive(Default)]
pub(super) struct TailCache {
    batches: VecDeque<CachedBatch>,
    bytes: usize,
}

impl TailCache {
    /// Adds a batch just made durable (the newest).
    pub(super) fn push(&mut self, batch: CachedBatch) {
        self.bytes += batch.len();
        self.batches.push_back(batch);
    }

    /// Drops the oldest batches while more than `limit` bytes are held (never the newest).
    pub(super) fn trim(&mut self, limit: usize) {
        while self.bytes > limit && self.batches.len() > 1 {
            self.pop_oldest();
        }
    }

    /// Drops the batches that start below `offset` (retention deleted them).
    pub(super) fn drop_below(&mut self, offset: u64) {
        while self.batches.front().is_some_and(|b| b.base_offset < offset) {
            self.pop_oldest();
        }
    }

    /// Drops the batches at or past `offset`, a batch boundary (a truncation cut them).
    pub(super) fn drop_from(&mut self, offset: u64) {
        while self.batches.back().is_some_and(|b| b.last_offset >= offset) {
            if let Some(newest) = self.batches.pop_back() {
                self.bytes -= newest.len();
            }
        }
    }

    fn pop_oldest(&mut self) {
        if let Some(old) = self.batches.pop_front() {
            self.bytes -= old.len();
        }
    }

    /// Whole batches starting with the one that holds `offset`, about `max_bytes` of them (at
    /// least one), shared rather than copied, and how many records they hold; `None` if
    /// `offset` is older than the tail.
    pub(super) fn read(&self, offset: u64, max_bytes: usize) -> Option<(BatchBytes, u64)> {
        let first = self.batches.front()?;
        if first.base_offset > offset {
            return None;
        }
        let at = self.batches.partition_point(|b| b.last_offset < offset);
        let mut end = at;
        let mut bytes = 0usize;
        while let Some(b) = self.batches.get(end) {
            if end > at && bytes + b.len() > max_bytes {
                break;
            }
            bytes += b.len();
            end += 1;
        }
        let mut out = BatchBytes::with_capacity(2 * (end - at));
        let mut records = 0u64;
        for b in self.batches.range(at..end) {
            out.push(b.header.clone());
            out.push(b.body.clone());
            records += b.last_offset - b.base_offset + 1;
        }
        Some((out, records))
    }
}
