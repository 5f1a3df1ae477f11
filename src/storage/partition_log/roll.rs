//! Rolling: sealing the active segment and starting the next one, all or nothing.

use std::rc::Rc;

use super::checkpointing::save_checkpoint;
use super::{LogState, PartitionLog};
use crate::storage::checkpoint::Checkpoint;
use crate::storage::disk_trace;
use crate::storage::dma;
use crate::storage::probes::ProbePoint;
use crate::storage::producers;
use crate::storage::segment::{self, Segment};
use crate::storage::StorageError;

impl PartitionLog {
    pub(super) fn roll_due(&self, st: &LogState) -> bool {
        let (Some(active), Some(first)) = (st.segments.back(), st.pending.front()) else {
            return false;
        };
        if active.end == 0 {
            return false;
        }
        let by_size = active.end + first.len() as u64 > self.config.segment_bytes;
        let by_age = match (self.config.segment_ms, active.first_append_ms) {
            (Some(ms), Some(first_ms)) => crate::clock::now_ms() - first_ms >= ms as i64,
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
    pub(super) async fn roll(&self) -> Result<(), StorageError> {
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
            st.producers.expire(crate::clock::now_ms());
            if !st.producers.is_dirty() {
                return;
            }
            st.producers.snapshot(next_offset)
        };
        let path = producers::snapshot_path(&self.dir);
        let saved = glommio::executor()
            .spawn_blocking(move || crate::storage::atomic_file::replace(&path, &snapshot))
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
}
