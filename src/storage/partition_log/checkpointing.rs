//! Checkpoints of the durable point (so that recovery scans little) and the clean stop that
//! lets the next open skip the scan.

use std::path::Path;
use std::rc::Rc;

use super::PartitionLog;
use crate::storage::checkpoint::Checkpoint;
use crate::storage::dma;
use crate::storage::{Durability, StorageError};

impl PartitionLog {
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

    /// Stops accepting appends, waits for the in-flight flush, and records a clean stop
    /// (index and checkpoint), so that the next start needs no scan.
    pub async fn close(&self) {
        self.state.borrow_mut().closed = true;
        self.wait_for_flushes().await;
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

pub(super) async fn save_checkpoint(
    dir: &Path,
    checkpoint: Checkpoint,
) -> Result<(), StorageError> {
    let owned = dir.to_path_buf();
    glommio::executor()
        .spawn_blocking(move || checkpoint.save(&owned))
        .await
        .map_err(|e| StorageError::io(format!("writing the checkpoint of {}", dir.display()), &e))
}
