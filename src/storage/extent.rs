//! What is known of a segment file's blocks: how far the file is allocated, how far its
//! blocks are written (data or prewritten zeros), and how far an `fdatasync` of the file has
//! committed them. The shared disk flush rests on these three positions (a flush that only
//! overwrites blocks below `synced_to` changes no metadata, so a flush of the disk's cache
//! alone makes it durable: `storage::shard_sync`), so they change only here, and every change
//! keeps
//!
//! `synced_to <= written_to <= allocated`.
//!
//! A broken invariant would let an acknowledgement run ahead of the disk, so it stops the
//! broker (an assertion, as TigerBeetle does) rather than go on.

/// The three positions of one segment file (bytes from the start of the file).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    allocated: u64,
    written_to: u64,
    synced_to: u64,
}

impl Extent {
    /// A file allocated to `allocated` bytes of which nothing is known to be written: a new
    /// segment, or one opened for recovery.
    pub fn allocated_only(allocated: u64) -> Self {
        Self::checked(allocated, 0, 0)
    }

    /// A file whose first `bytes` are allocated, written and synced (a prepared spare).
    pub fn prepared(bytes: u64) -> Self {
        Self::checked(bytes, bytes, bytes)
    }

    /// Bytes allocated on disk.
    pub fn allocated(&self) -> u64 {
        self.allocated
    }

    /// Blocks below this are written, not just allocated.
    pub fn written_to(&self) -> u64 {
        self.written_to
    }

    /// Blocks below this are written and their allocation is committed by an `fdatasync`.
    pub fn synced_to(&self) -> u64 {
        self.synced_to
    }

    /// A flush whose blocks end at `end` only overwrites committed blocks: a disk cache
    /// flush makes it durable.
    pub fn is_overwrite(&self, end: u64) -> bool {
        end <= self.synced_to
    }

    /// The file was allocated up to `to` (`fallocate` returned). Allocation only grows.
    pub fn grew(&mut self, to: u64) {
        *self = Self::checked(self.allocated.max(to), self.written_to, self.synced_to);
    }

    /// Blocks up to `to` were written (a completed write within the allocation).
    pub fn wrote(&mut self, to: u64) {
        *self = Self::checked(self.allocated, self.written_to.max(to), self.synced_to);
    }

    /// An `fdatasync` of the file completed after writes of every block below `to`: they and
    /// their allocation are committed.
    pub fn synced(&mut self, to: u64) {
        *self = Self::checked(
            self.allocated,
            self.written_to.max(to),
            self.synced_to.max(to),
        );
    }

    /// The file was cut to `end` bytes (a sealed segment's unused preallocation freed):
    /// nothing past it is allocated, written or synced.
    pub fn truncated(&mut self, end: u64) {
        *self = Self::checked(
            self.allocated.min(end),
            self.written_to.min(end),
            self.synced_to.min(end),
        );
    }

    fn checked(allocated: u64, written_to: u64, synced_to: u64) -> Self {
        assert!(
            synced_to <= written_to && written_to <= allocated,
            "segment extent invariant broken: synced_to {synced_to} <= written_to \
             {written_to} <= allocated {allocated}"
        );
        Self {
            allocated,
            written_to,
            synced_to,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_only_grow_and_stay_ordered() {
        let mut e = Extent::allocated_only(8192);
        assert!(!e.is_overwrite(4096), "nothing is committed yet");
        e.wrote(4096);
        assert!(!e.is_overwrite(4096), "written but not synced");
        e.synced(4096);
        assert!(e.is_overwrite(4096));
        assert!(!e.is_overwrite(8192));
        e.grew(4096);
        assert_eq!(e.allocated(), 8192, "allocation never shrinks by growing");
        e.synced(2048);
        assert_eq!((e.written_to(), e.synced_to()), (4096, 4096));
    }

    #[test]
    fn a_truncation_forgets_everything_past_the_cut() {
        let mut e = Extent::prepared(1 << 20);
        assert!(e.is_overwrite(1 << 20));
        e.truncated(5000);
        assert_eq!(e, Extent::prepared(5000));
        assert!(
            !e.is_overwrite(8192),
            "a write past the cut extends the file"
        );
    }

    #[test]
    #[should_panic(expected = "segment extent invariant broken")]
    fn a_write_past_the_allocation_is_refused() {
        Extent::allocated_only(4096).wrote(8192);
    }

    #[test]
    #[should_panic(expected = "segment extent invariant broken")]
    fn a_sync_past_the_allocation_is_refused() {
        Extent::allocated_only(4096).synced(8192);
    }
}
