//! Retention: whole old segments deleted past the size and age limits, crash-safe.

use std::path::Path;

use super::checkpointing::save_checkpoint;
use super::PartitionLog;
use crate::storage::segment::{self, sync_dir, Segment};
use crate::storage::{disk_trace, StorageError};

impl PartitionLog {
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
            st.cache.drop_below(start);
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
}

/// Removes the segments wholly below `log_start` (never the last one): what a retention pass
/// left when a crash cut it short, after it had checkpointed the new log start.
pub(super) async fn finish_retention(
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
            crate::storage::atomic_file::sync_dir(&owned)
        })
        .await
        .map_err(|e| StorageError::io(format!("finishing retention in {}", dir.display()), &e))
}
