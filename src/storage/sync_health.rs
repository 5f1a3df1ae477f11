//! Whether every sync on a shard's data device has succeeded so far.
//!
//! A failed `fdatasync` or disk cache flush says that writes the device had accepted may be
//! gone, and not only those of the file that was synced: the cache that failed to reach the
//! medium held every partition's writes. After such a failure the kernel may also have marked
//! the lost pages clean, so a later "successful" sync proves nothing (PostgreSQL's
//! "fsyncgate", 2018). So the first failure of any sync on the device (a flush's own
//! `fdatasync`, the shard's shared disk flush or `syncfs`, the `fdatasync` of a zero-fill or of a
//! spare segment) poisons it for good: every partition log of the shard turns read-only, and
//! nothing more is acknowledged until the broker is restarted after the disk was checked.

use std::cell::RefCell;

/// The shard's record of the first failed sync, shared by its partition logs.
#[derive(Debug, Default)]
pub struct SyncHealth {
    failure: RefCell<Option<String>>,
}

impl SyncHealth {
    /// Records a failed sync; the first failure is the one kept and reported.
    pub fn poison(&self, what: &str) {
        let mut failure = self.failure.borrow_mut();
        if failure.is_none() {
            tracing::error!(
                "FATAL: a sync on this shard's data device failed ({what}); every partition \
                 of the shard is now read-only; restart the broker after checking the disk"
            );
            *failure = Some(what.to_string());
        }
    }

    /// The first failed sync, if any.
    pub fn failure(&self) -> Option<String> {
        self.failure.borrow().clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_failure_is_kept() {
        let health = SyncHealth::default();
        assert_eq!(health.failure(), None);
        health.poison("fdatasync of a: EIO");
        health.poison("fdatasync of b: EIO");
        assert_eq!(health.failure().as_deref(), Some("fdatasync of a: EIO"));
    }
}
