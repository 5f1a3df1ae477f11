//! Truncation: cutting the log back to a batch boundary, as a Raft follower does when its log
//! diverged from a new leader's (only entries that were never committed are cut).
//!
//! Crash-safe: a power cut at any point leaves the log as it was or cut back to some batch
//! boundary at or after the requested one (every state on the way is a prefix of the log as
//! it was), and once `truncate` returns, nothing past the cut comes back. The steps, each
//! durable before the next:
//! 1. the idempotent producers' snapshot, if it covers offsets past the cut, is removed;
//! 2. the segments after the one that holds the cut are removed, the last first (their index
//!    files before their log file), so that no power cut leaves a gap in the offsets; the
//!    index files of the segment that holds the cut go too (rebuilt from the kept entries);
//! 3. the checkpoint moves to the cut;
//! 4. that segment is zeroed from the cut on (as a torn tail is at recovery) and synced.

use std::path::{Path, PathBuf};
use std::rc::Rc;

use futures::channel::oneshot;

use super::checkpointing::save_checkpoint;
use super::recovery::zero_after;
use super::{check_writable, PartitionLog};
use crate::record::batch::{BatchHeader, HEADER_PREFIX_LEN};
use crate::storage::checkpoint::Checkpoint;
use crate::storage::dma::{self, align_up, ALIGN};
use crate::storage::extent::Extent;
use crate::storage::producers::{self, ProducerTable};
use crate::storage::{disk_trace, StorageError};

impl PartitionLog {
    /// Cuts the log back so that `offset` is the next offset to be written: every batch at or
    /// past it is removed. `offset` must be a batch boundary within the stored log (the end
    /// of the log is one: nothing is cut). Appends are refused while it runs; waits for the
    /// flush in flight first.
    ///
    /// The log can not know what was committed: the caller (the replication layer) cuts only
    /// what was never acknowledged.
    pub async fn truncate(self: &Rc<Self>, offset: u64) -> Result<(), StorageError> {
        {
            let mut st = self.state.borrow_mut();
            self.adopt_device_failure(&mut st);
            check_writable(&st)?;
            st.truncating = true;
        }
        let outcome = self.truncate_to(offset).await;
        self.state.borrow_mut().truncating = false;
        if outcome.is_ok() {
            self.rebuild_producers().await;
        }
        outcome
    }

    async fn truncate_to(self: &Rc<Self>, offset: u64) -> Result<(), StorageError> {
        self.wait_for_flushes().await;
        self.prewrite_finished().await;
        let _guard = self.checkpoint_lock.acquire_permit(1).await;
        let (index, file_end) = {
            let mut st = self.state.borrow_mut();
            self.adopt_device_failure(&mut st);
            if let Some(why) = &st.failed {
                return Err(StorageError::ReadOnly(why.clone()));
            }
            let start = st.log_start();
            if offset < start || offset > st.next_offset {
                return Err(StorageError::OffsetOutOfRange {
                    requested: offset,
                    log_start_offset: start,
                    high_watermark: st.high_watermark,
                });
            }
            if offset == st.next_offset {
                return Ok(());
            }
            let index = st
                .segments
                .partition_point(|s| s.base_offset <= offset)
                .saturating_sub(1);
            (index, st.segments[index].end)
        };
        let cut = self.batch_position(index, offset, file_end).await?;
        let outcome = self.cut_at(index, offset, cut).await;
        if let Err(e) = &outcome {
            // The files hold a prefix of the log that recovery reads back; what this log
            // holds in memory may not match them any more.
            self.state.borrow_mut().failed = Some(format!(
                "a truncation to offset {offset} failed midway ({e}); the log is read back \
                 at the next start"
            ));
        }
        outcome
    }

    /// The steps of a truncation to `offset`, at byte `cut` of segment `index`, once checked.
    async fn cut_at(&self, index: usize, offset: u64, cut: u64) -> Result<(), StorageError> {
        let (segment_base, file, path, later) = {
            let mut st = self.state.borrow_mut();
            // From here on readers see the log end at the cut.
            st.next_offset = offset;
            st.high_watermark = offset;
            st.cache.drop_from(offset);
            st.read_ahead = None;
            st.corrupt.retain(|r| r.first_offset < offset);
            let seg = &st.segments[index];
            let later: Vec<PathBuf> = st
                .segments
                .range(index + 1..)
                .map(|s| s.path("log"))
                .collect();
            (
                seg.base_offset,
                Rc::clone(&seg.file),
                seg.path("log"),
                later,
            )
        };
        disk_trace::instant(|| disk_trace::Op::Note {
            text: format!("truncate {} {offset}", self.dir.display()),
        });
        remove_producers_snapshot_past(&self.dir, offset).await?;
        for log_path in later.iter().rev() {
            remove_segment_files(&self.dir, log_path, true).await?;
            self.state.borrow_mut().segments.pop_back();
        }
        remove_segment_files(&self.dir, &path, false).await?;
        let checkpoint = {
            let mut st = self.state.borrow_mut();
            let log_start = st.log_start();
            if let Some(seg) = st.segments.back_mut() {
                seg.forget_index_files();
            }
            st.checkpointed = Checkpoint {
                segment_base,
                durable_end: cut,
                next_offset: offset,
                log_start,
                clean: false,
            };
            st.checkpointed
        };
        save_checkpoint(&self.dir, checkpoint).await?;
        let allocated = file
            .file_size()
            .await
            .map_err(|e| StorageError::glommio(format!("stat of {}", path.display()), e))?;
        let tail_block = zero_after(&file, &path, cut, allocated, &self.config).await?;
        let size = file
            .file_size()
            .await
            .map_err(|e| StorageError::glommio(format!("stat of {}", path.display()), e))?;
        let mut st = self.state.borrow_mut();
        st.tail_block = tail_block;
        if let Some(seg) = st.segments.back_mut() {
            seg.truncate_index(cut);
            seg.end = cut;
            seg.next_offset = offset;
            // Zeroed, written and synced up to the end of the block after the cut.
            let mut extent = Extent::allocated_only(size);
            extent.synced(align_up(cut).max(dma::align_down(cut) + ALIGN).min(size));
            seg.extent = extent;
            seg.max_timestamp_ms = seg.time_index.last().map_or(i64::MIN, |&(t, _)| t);
            if cut == 0 {
                seg.first_append_ms = None;
            }
        }
        Ok(())
    }

    /// The position in segment `index` of the batch that starts at `offset`, walking the
    /// stored headers from the index entry before it; an error if `offset` falls inside a
    /// batch.
    async fn batch_position(
        &self,
        index: usize,
        offset: u64,
        end: u64,
    ) -> Result<u64, StorageError> {
        let (file, path, (mut at, mut pos)) = {
            let st = self.state.borrow();
            let seg = &st.segments[index];
            (Rc::clone(&seg.file), seg.path("log"), seg.entry_for(offset))
        };
        while at < offset {
            if pos + HEADER_PREFIX_LEN as u64 > end {
                return Err(StorageError::Corrupt(format!(
                    "{}: no batch boundary at offset {offset}: the segment ends at byte {end}",
                    path.display()
                )));
            }
            let head =
                dma::read_range(&file, pos, HEADER_PREFIX_LEN, self.config.max_io_bytes).await?;
            let header = BatchHeader::parse(&head).map_err(|e| {
                StorageError::Corrupt(format!(
                    "{}: batch header at byte {pos}: {e}",
                    path.display()
                ))
            })?;
            if header.base_offset() != at {
                return Err(StorageError::Corrupt(format!(
                    "{}: the batch at byte {pos} starts at offset {}, expected {at}",
                    path.display(),
                    header.base_offset()
                )));
            }
            if header.last_offset() >= offset {
                return Err(StorageError::NotABatchBoundary {
                    requested: offset,
                    batch_base: at,
                    batch_last: header.last_offset(),
                });
            }
            pos += u64::from(header.batch_len());
            at = header.last_offset() + 1;
        }
        Ok(pos)
    }

    /// Waits until no flush is in flight.
    pub(super) async fn wait_for_flushes(&self) {
        loop {
            let rx = {
                let mut st = self.state.borrow_mut();
                if !st.flushing {
                    return;
                }
                let (tx, rx) = oneshot::channel();
                st.data_waiters.push(tx);
                rx
            };
            let _ = rx.await;
        }
    }
}

/// Removes the idempotent producers' snapshot, durably, if it covers offsets at or past
/// `offset`: once the log grew back past it, it would claim batches the log no longer holds.
async fn remove_producers_snapshot_past(dir: &Path, offset: u64) -> Result<(), StorageError> {
    let path = producers::snapshot_path(dir);
    let covered = std::fs::read(&path)
        .ok()
        .and_then(|bytes| ProducerTable::from_snapshot(&bytes, usize::MAX, u64::MAX))
        .map(|(_, covered)| covered);
    if covered.is_some_and(|covered| covered <= offset) || !path.exists() {
        return Ok(());
    }
    let owned = dir.to_path_buf();
    glommio::executor()
        .spawn_blocking(move || {
            disk_trace::remove_file(&path)?;
            crate::storage::atomic_file::sync_dir(&owned)
        })
        .await
        .map_err(|e| {
            StorageError::io(
                format!("removing the producers' snapshot of {}", dir.display()),
                &e,
            )
        })
}

/// Removes a segment's index files and, with `log_file`, then its log file, each step durable
/// with the directory: a power cut never leaves an index over a log it does not describe,
/// nor a later segment without the ones before it.
async fn remove_segment_files(
    dir: &Path,
    log_path: &Path,
    log_file: bool,
) -> Result<(), StorageError> {
    let mut steps = vec![vec![
        log_path.with_extension("index"),
        log_path.with_extension("timeindex"),
    ]];
    if log_file {
        steps.push(vec![log_path.to_path_buf()]);
    }
    for paths in steps {
        let owned = dir.to_path_buf();
        let what = paths[0].display().to_string();
        glommio::executor()
            .spawn_blocking(move || -> std::io::Result<()> {
                for path in paths {
                    match disk_trace::remove_file(&path) {
                        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                        _ => {}
                    }
                }
                crate::storage::atomic_file::sync_dir(&owned)
            })
            .await
            .map_err(|e| StorageError::io(format!("removing {what} in a truncation"), &e))?;
    }
    Ok(())
}
