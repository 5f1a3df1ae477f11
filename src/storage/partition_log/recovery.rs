//! Recovery at open: each segment's index checked or rebuilt, the active segment scanned from
//! its last good point (not at all after a clean stop), a torn tail cut, corruption in
//! acknowledged data recorded; then the idempotent producers read back.

use std::collections::VecDeque;
use std::path::Path;
use std::rc::Rc;
use std::time::Duration;

use glommio::io::DmaFile;

use super::reader::stored_headers;
use super::retention::finish_retention;
use super::scan::{scan_segment, CorruptRange, DurablePoint, ScanEnd};
use super::{LogConfig, PartitionLog};
use crate::record::batch::{self, BatchHeader, HEADER_PREFIX_LEN};
use crate::storage::checkpoint::Checkpoint;
use crate::storage::dma::{self, align_down, align_up, ChunkFiller, ALIGN};
use crate::storage::producers::{self, ProducerTable};
use crate::storage::segment::{self, Segment};
use crate::storage::StorageError;
use crate::storage::{disk_trace, spare};

impl PartitionLog {
    /// Loads the idempotent producers' snapshot and reads the batches after it back from
    /// the log (from the active segment's start when there is no usable snapshot), so that
    /// resends from before a restart are still recognised.
    pub(super) async fn rebuild_producers(self: &Rc<Self>) {
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
}

/// What recovery found in a log's directory.
pub(super) struct Recovered {
    /// Segments, oldest first; the last one is the active segment.
    pub(super) segments: VecDeque<Segment>,
    /// Offsets whose stored bytes failed their checksum.
    pub(super) corrupt: Vec<CorruptRange>,
    /// The bytes of the active segment's partial last block.
    pub(super) tail_block: Vec<u8>,
}

/// Opens the segments in `dir` (creating the directory and a first segment if there are
/// none), finishes a retention pass a crash cut short and recovers each segment.
pub(super) async fn recover(dir: &Path, config: &LogConfig) -> Result<Recovered, StorageError> {
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
        recover_segment(&mut seg, next_base, checkpoint, config, &mut corrupt).await?;
        segments.push_back(seg);
    }
    let active = segments
        .back()
        .ok_or_else(|| StorageError::Corrupt("no segment".into()))?;
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
    if let Some(active) = segments.back_mut() {
        // A file cut short (by a roll that then crashed) may end inside the last block.
        let written = align_up(end).min(active.extent.allocated());
        active.extent.wrote(written);
    }
    Ok(Recovered {
        segments,
        corrupt,
        tail_block,
    })
}

/// Recovers one segment. Sealed segments (those with a `next_base` after them) are scanned
/// from their last index entry to their end; the active one likewise, unless a
/// clean-shutdown checkpoint vouches for its end. A torn tail of the active segment is cut
/// (zeroed).
pub(super) async fn recover_segment(
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

/// Zeroes everything after the valid end of the active segment (see [`zero_after`]).
async fn cut_tail(seg: &mut Segment, config: &LogConfig) -> Result<(), StorageError> {
    zero_after(
        &seg.file,
        &seg.path("log"),
        seg.end,
        seg.extent.allocated(),
        config,
    )
    .await?;
    seg.truncate_index(seg.end);
    Ok(())
}

/// Zeroes everything of the segment file at `path` after byte `end`: the rest of its block is
/// rewritten, the remainder (up to `allocated`) punched out and preallocated again, then the
/// file is synced. Returns the bytes kept of the block that holds `end` (the tail block).
pub(super) async fn zero_after(
    file: &DmaFile,
    path: &Path,
    end: u64,
    allocated: u64,
    config: &LogConfig,
) -> Result<Vec<u8>, StorageError> {
    let start = align_down(end);
    let keep = dma::read_range(file, start, (end - start) as usize, config.max_io_bytes).await?;
    let mut filler = ChunkFiller::new(file, ALIGN as usize, config.max_io_bytes);
    filler.put(&keep);
    filler.put(&vec![0u8; ALIGN as usize - keep.len()]);
    filler.write_at(start).await?;
    let hole = align_up(end).max(start + ALIGN);
    if allocated > hole {
        dma::deallocate(file, hole, allocated - hole)
            .await
            .map_err(|e| {
                StorageError::glommio(format!("punching the tail of {} out", path.display()), e)
            })?;
        dma::pre_allocate(file, allocated)
            .await
            .map_err(|e| StorageError::glommio(format!("preallocating {}", path.display()), e))?;
    }
    dma::fdatasync(file)
        .await
        .map_err(|e| StorageError::glommio(format!("fdatasync of {}", path.display()), e))?;
    Ok(keep)
}
