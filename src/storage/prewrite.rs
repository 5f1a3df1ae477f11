//! Prewriting: keeping the blocks just past a partition's end written (with zeros) before
//! its appends reach them.
//!
//! Segments are preallocated with `fallocate`, which leaves *unwritten* extents on ext4 (and
//! XFS). The first write into one converts it to written, a metadata change, and that costs
//! small flushes twice:
//! - the next `fdatasync` must commit the filesystem journal. fio on the development machine,
//!   4 KiB O_DIRECT writes each followed by fdatasync: p50 184 µs / p99 881 µs / p99.9 3.5 ms
//!   into fallocated space, against 91 µs / 221 µs / 848 µs into written space;
//! - a write that spans written and unwritten blocks (every flush does: it rewrites the
//!   partial tail block) cannot be issued inline by io_uring, which hands it to a kernel
//!   worker thread (seen as `iou-wrk` at 11% of the samples of an open-loop run).
//!
//! A trickle of single-message publishes, an open-loop rate and many partitions all make
//! small flushes. For those, a partition zero-fills a stretch ahead of its end in the
//! background and syncs it once, so that one journal commit serves the whole stretch and the
//! flushes that follow are pure overwrites. It writes those bytes twice, so partitions whose
//! flushes are large (at least `max_flush_bytes`) skip it: there the commit is amortised and
//! the disk's bandwidth is better spent on data.

use glommio::io::DmaFile;

use super::dma::{self, align_down, ALIGN};
use super::StorageError;

/// How far ahead partitions prewrite.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrewriteConfig {
    /// Bytes a partition keeps written ahead of its end (0 turns prewriting off).
    pub ahead_bytes: u64,
    /// Bytes all the partitions of one shard keep written ahead together, at most: with many
    /// partitions each gets `shard_budget_bytes / partitions` (but no more than
    /// `ahead_bytes`).
    pub shard_budget_bytes: u64,
    /// A partition whose last flush wrote at least this many bytes does not prewrite.
    pub max_flush_bytes: u64,
}

impl Default for PrewriteConfig {
    fn default() -> Self {
        Self {
            ahead_bytes: 8 << 20,
            shard_budget_bytes: 256 << 20,
            max_flush_bytes: 512 << 10,
        }
    }
}

impl PrewriteConfig {
    /// The stretch each of `open_logs` partitions keeps written ahead, a multiple of the block
    /// size (0: none).
    pub fn lead(&self, open_logs: u64) -> u64 {
        let share = self.shard_budget_bytes / open_logs.max(1);
        align_down(self.ahead_bytes.min(share))
    }

    /// The range to prewrite after a flush of `flushed` bytes that left the log's written
    /// blocks ending at `written_to` (block-aligned, the flush's own end or beyond), never
    /// past `limit` (the segment's size; the caller allocates what the range needs); `None`
    /// when nothing is due. A refill is due
    /// once less than half the lead is left, so that each refill (and its journal commit)
    /// covers at least half the lead.
    pub fn due(
        &self,
        lead: u64,
        flushed: u64,
        data_end: u64,
        written_to: u64,
        limit: u64,
    ) -> Option<(u64, u64)> {
        if lead < 2 * ALIGN || flushed >= self.max_flush_bytes {
            return None;
        }
        let start = written_to.max(dma::align_up(data_end));
        if start >= data_end + lead / 2 {
            return None;
        }
        let end = align_down((data_end + lead).min(limit));
        (end > start).then_some((start, end))
    }
}

/// Zeros are written in pieces of this size, one at a time, so that a flush queued behind
/// them at the disk waits for one piece at most (256 KiB: ~0.2 ms at 1.4 GB/s).
const PIECE_BYTES: u64 = 256 << 10;

/// Writes zeros over `[start, end)` (block-aligned), one piece after the other, then syncs
/// them, so that the extents are written and their conversion is committed.
pub async fn zero_fill(file: &DmaFile, start: u64, end: u64) -> Result<(), StorageError> {
    zero_fill_until(file, start, end, |_| true)
        .await
        .map(|_| ())
}

/// [`zero_fill`] that reports, before each piece and at the end, how far the zeros reach; it
/// stops early (and syncs what it wrote) when `progress` returns false. Returns where the
/// zeros end.
pub async fn zero_fill_until(
    file: &DmaFile,
    start: u64,
    end: u64,
    mut progress: impl FnMut(u64) -> bool,
) -> Result<u64, StorageError> {
    let mut at = start;
    while progress(at) && at < end {
        let n = (end - at).min(PIECE_BYTES) as usize;
        let mut buf = file.alloc_dma_buffer(n);
        buf.as_bytes_mut().fill(0);
        dma::write_buffers(file, vec![buf], at).await?;
        at += n as u64;
    }
    if at > start {
        dma::fdatasync(file).await.map_err(|e| {
            StorageError::glommio(format!("fdatasync after zero-filling {start}..{at}"), e)
        })?;
    }
    Ok(at)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn config() -> PrewriteConfig {
        PrewriteConfig {
            ahead_bytes: 8 * MIB,
            shard_budget_bytes: 64 * MIB,
            max_flush_bytes: 512 << 10,
        }
    }

    #[test]
    fn the_budget_is_split_among_partitions() {
        let c = config();
        assert_eq!(c.lead(1), 8 * MIB);
        assert_eq!(c.lead(8), 8 * MIB);
        assert_eq!(c.lead(64), MIB);
        assert_eq!(c.lead(1000) % ALIGN, 0);
        assert!(c.lead(1000) < MIB / 10);
        assert_eq!(c.lead(1 << 20), 0, "under a block each: off");
    }

    #[test]
    fn refills_start_past_the_written_blocks_and_stop_at_the_limit() {
        let c = config();
        let lead = 8 * MIB;
        // Nothing written ahead yet: fill from the flush's last block to the lead.
        assert_eq!(
            c.due(lead, 4096, 5000, 8192, 32 * MIB),
            Some((8192, 5000 + lead - (5000 + lead) % ALIGN))
        );
        // More than half the lead still written ahead: nothing to do.
        assert_eq!(c.due(lead, 4096, MIB, 6 * MIB, 32 * MIB), None);
        // Under half left: refill from where the written blocks end.
        assert_eq!(
            c.due(lead, 4096, 3 * MIB, 6 * MIB, 32 * MIB),
            Some((6 * MIB, 11 * MIB))
        );
        // Never past the limit (the segment's size).
        assert_eq!(
            c.due(lead, 4096, 30 * MIB, 30 * MIB, 32 * MIB),
            Some((30 * MIB, 32 * MIB))
        );
        assert_eq!(c.due(lead, 4096, 32 * MIB, 32 * MIB, 32 * MIB), None);
    }

    #[test]
    fn large_flushes_and_tiny_leads_skip_it() {
        let c = config();
        assert_eq!(c.due(8 * MIB, 512 << 10, 0, 0, 32 * MIB), None);
        assert_eq!(c.due(4096, 100, 0, 0, 32 * MIB), None);
    }
}
