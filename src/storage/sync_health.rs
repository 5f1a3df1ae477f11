//! Whether every sync on the data device has succeeded so far.
//!
//! A failed `fdatasync` or disk cache flush says that writes the device had accepted may be
//! gone, and not only those of the file that was synced: the cache that failed to reach the
//! medium held every file's writes. After such a failure the kernel may also have marked the
//! lost pages clean, so a later "successful" sync proves nothing (PostgreSQL's "fsyncgate",
//! 2018). So the first failure of any sync on the device (a flush's own `fdatasync`, the
//! shard's shared disk flush or `syncfs`, the `fdatasync` of a zero-fill, of a spare segment
//! or of a state log) or of a data write with `EIO` poisons it for good: every partition log
//! and state log turns read-only, and nothing more is acknowledged until the broker is
//! restarted after the disk was checked.
//!
//! Each shard keeps its own record (no lock is shared across cores). The shards share the
//! data directory's device, so the shard that sees the first failure tells the others
//! ([`SyncHealth::on_first_failure`]), which take it over with [`SyncHealth::poison_from`].

use std::cell::RefCell;

/// Called once with the first failure this shard saw itself.
type FailureHook = Box<dyn Fn(&str)>;

/// A shard's record of the first failed sync on the data device, shared by its logs.
#[derive(Default)]
pub struct SyncHealth {
    failure: RefCell<Option<String>>,
    on_failure: RefCell<Option<FailureHook>>,
}

impl std::fmt::Debug for SyncHealth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncHealth")
            .field("failure", &self.failure.borrow())
            .finish_non_exhaustive()
    }
}

impl SyncHealth {
    /// Records a failed sync seen on this shard; the first failure is the one kept, reported
    /// and passed to the hook.
    pub fn poison(&self, what: &str) {
        if !self.set(what, "") {
            return;
        }
        if let Some(hook) = self.on_failure.borrow().as_ref() {
            hook(what);
        }
    }

    /// Records a failed sync that another shard saw on the same device.
    pub fn poison_from(&self, shard: usize, what: &str) {
        self.set(what, &format!(" on shard {shard}"));
    }

    /// Sets the hook told of the first failure this shard sees itself.
    pub fn on_first_failure(&self, hook: FailureHook) {
        *self.on_failure.borrow_mut() = Some(hook);
    }

    /// The first failed sync, if any.
    pub fn failure(&self) -> Option<String> {
        self.failure.borrow().clone()
    }

    /// Keeps the first failure; true if this was it.
    fn set(&self, what: &str, place: &str) -> bool {
        let mut failure = self.failure.borrow_mut();
        if failure.is_some() {
            return false;
        }
        tracing::error!(
            "FATAL: a sync on the data device failed{place} ({what}); every partition and \
             subscription state of the shard is now read-only; restart the broker after \
             checking the disk"
        );
        *failure = Some(format!("{what}{place}"));
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::rc::Rc;

    #[test]
    fn the_first_failure_is_kept_and_told_once() {
        let health = SyncHealth::default();
        let told = Rc::new(RefCell::new(Vec::new()));
        let sink = Rc::clone(&told);
        health.on_first_failure(Box::new(move |what| {
            sink.borrow_mut().push(what.to_string())
        }));
        assert_eq!(health.failure(), None);
        health.poison("fdatasync of a: EIO");
        health.poison("fdatasync of b: EIO");
        assert_eq!(health.failure().as_deref(), Some("fdatasync of a: EIO"));
        assert_eq!(*told.borrow(), vec!["fdatasync of a: EIO".to_string()]);
    }

    #[test]
    fn a_failure_from_another_shard_is_kept_but_not_told_back() {
        let health = SyncHealth::default();
        let told = Rc::new(RefCell::new(0));
        let sink = Rc::clone(&told);
        health.on_first_failure(Box::new(move |_| *sink.borrow_mut() += 1));
        health.poison_from(3, "fdatasync of c: EIO");
        health.poison("fdatasync of d: EIO");
        assert_eq!(
            health.failure().as_deref(),
            Some("fdatasync of c: EIO on shard 3")
        );
        assert_eq!(*told.borrow(), 0);
    }
}
