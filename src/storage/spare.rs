//! The spare: the next segment's file, made ready while the active segment fills up.
//!
//! A roll used to create the next segment's file on the produce path, and the flushes right
//! after it wrote into freshly allocated (unwritten) blocks, each committing the
//! filesystem's journal with an `fdatasync` of its own until the zero-fill caught up: at
//! 100,000 msgs/s with 64 MiB segments that made the p99 ack 12-20 ms. Instead, when a
//! partition's active segment is close to full, a background task creates a file under a
//! name that is not a segment's, allocates and zero-fills its first stretch and syncs it. The
//! roll then only renames it (and syncs the directory), and the first flushes into it are
//! plain overwrites of committed blocks.
//!
//! A spare left behind by a crash or a stop holds nothing: it is removed when the partition
//! is opened.

use std::path::Path;

use glommio::io::DmaFile;

use super::{disk_trace, dma, prewrite, StorageError};

/// The spare's file name in a partition's directory (never parsed as a segment's).
pub const SPARE_FILE: &str = "next-segment.spare";

/// Where a partition's spare stands.
#[derive(Default)]
pub enum Spare {
    /// None made yet for the next roll.
    #[default]
    Absent,
    /// Being made in the background.
    Preparing,
    /// Ready: `prepared` bytes allocated, zero-filled and synced.
    Ready {
        /// The open spare file.
        file: DmaFile,
        /// Bytes from the start of the file that are written and committed.
        prepared: u64,
    },
    /// Making one failed (a full disk, say): the next roll creates its file itself and
    /// the spare is tried again after it.
    Failed,
}

impl Spare {
    /// Takes a ready spare for a roll; otherwise leaves the state for the next roll (one
    /// still being made stays so; a failed attempt is cleared, to be tried again).
    pub fn take_ready(&mut self) -> Option<(DmaFile, u64)> {
        match std::mem::take(self) {
            Spare::Ready { file, prepared } => Some((file, prepared)),
            Spare::Preparing => {
                *self = Spare::Preparing;
                None
            }
            Spare::Absent | Spare::Failed => None,
        }
    }
}

/// True when a partition should make its spare: prewriting is on (a `lead` of at least two
/// blocks) and the active segment's data ends within four leads of the segment's size.
pub fn due(lead: u64, data_end: u64, segment_bytes: u64) -> bool {
    lead >= 2 * dma::ALIGN && data_end.saturating_add(4 * lead) >= segment_bytes
}

/// Creates the spare in `dir` and allocates, zero-fills and syncs its first `bytes`.
pub async fn prepare(dir: &Path, bytes: u64) -> Result<DmaFile, StorageError> {
    let path = dir.join(SPARE_FILE);
    let file = dma::open_rw(&path).await?;
    let filled = async {
        dma::pre_allocate(&file, bytes).await.map_err(|e| {
            StorageError::glommio(
                format!("preallocating {bytes} bytes for {}", path.display()),
                e,
            )
        })?;
        prewrite::zero_fill(&file, 0, bytes).await
    };
    match filled.await {
        Ok(()) => Ok(file),
        Err(e) => {
            let _ = file.close().await;
            let _ = disk_trace::remove_file(&path);
            Err(e)
        }
    }
}

/// Removes a spare an earlier run left in `dir`, if any.
pub fn remove_leftover(dir: &Path) {
    let _ = disk_trace::remove_file(&dir.join(SPARE_FILE));
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn made_only_near_the_end_of_a_segment_and_only_with_prewriting_on() {
        assert!(!due(8 * MIB, 100 * MIB, 1024 * MIB));
        assert!(due(8 * MIB, 992 * MIB, 1024 * MIB));
        assert!(due(8 * MIB, 1024 * MIB, 1024 * MIB));
        assert!(!due(0, 1024 * MIB, 1024 * MIB), "prewriting off");
        assert!(due(MIB, 0, 64 << 10), "segments smaller than the lead");
    }
}
