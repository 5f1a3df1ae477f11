//! Shard-wide group commit: one `syncfs` of the data directory's filesystem makes every write
//! that completed before it durable, whichever partition file it went to.
//!
//! With per-partition `fdatasync` (the default), a shard with many small partitions sends the
//! disk one cache flush per partition per group: 1,000 partitions at 100k msgs/s made 6,500
//! flushes a second, each waiting ~35 ms in the queue. With `--group-commit shard`, every
//! partition whose O_DIRECT write has completed asks the shard's syncer; syncs do not
//! overlap, and a request waits for the next one to *start* after it (one in flight may have
//! started before its write completed), so one `syncfs` serves every partition that wrote
//! meanwhile. `syncfs` also writes back whatever else is dirty on that filesystem (our own
//! buffered state and index files, other programs' files): it suits a disk given to corebus.
//! It reports a writeback error of any file of the filesystem since the previous call; the
//! flushes waiting for it then fail as for a failed `fdatasync` (the partitions turn
//! read-only).

use std::cell::RefCell;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::rc::Rc;

use futures::channel::oneshot;

use super::StorageError;

/// The shard's syncer. Cheap to share (`Rc`) among the shard's partition logs.
pub struct ShardSync {
    /// The data directory, opened to name its filesystem to `syncfs`.
    dir: OwnedFd,
    state: RefCell<SyncState>,
}

impl std::fmt::Debug for ShardSync {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardSync").finish_non_exhaustive()
    }
}

#[derive(Default)]
struct SyncState {
    running: bool,
    /// Flushes waiting for the next sync to start (and end).
    waiting: Vec<oneshot::Sender<Result<(), String>>>,
}

impl ShardSync {
    /// A syncer for the filesystem that holds `data_dir`.
    pub fn open(data_dir: &Path) -> Result<Rc<Self>, StorageError> {
        let dir = std::fs::File::open(data_dir)
            .map_err(|e| StorageError::io(format!("opening {}", data_dir.display()), &e))?;
        Ok(Rc::new(Self {
            dir: OwnedFd::from(dir),
            state: RefCell::new(SyncState::default()),
        }))
    }

    /// Returns once a `syncfs` that started after this call has ended: every write completed
    /// before the call is then durable.
    pub async fn sync(self: &Rc<Self>) -> Result<(), StorageError> {
        let (tx, rx) = oneshot::channel();
        let start = {
            let mut st = self.state.borrow_mut();
            st.waiting.push(tx);
            !std::mem::replace(&mut st.running, true)
        };
        if start {
            // glommio may run a spawned task right away: no borrow is held here.
            let syncer = Rc::clone(self);
            glommio::spawn_local(async move { syncer.run().await }).detach();
        }
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(message)) => Err(StorageError::Io {
                context: "syncfs of the data directory's filesystem".into(),
                errno: None,
                message,
            }),
            Err(_) => Err(StorageError::ReadOnly("the shard's syncer stopped".into())),
        }
    }

    /// Syncs while flushes wait, one `syncfs` for all who asked before it started.
    async fn run(self: Rc<Self>) {
        loop {
            let waiting = {
                let mut st = self.state.borrow_mut();
                if st.waiting.is_empty() {
                    st.running = false;
                    return;
                }
                std::mem::take(&mut st.waiting)
            };
            let fd = self.dir.as_raw_fd();
            // syncfs blocks; glommio runs it on its blocking-thread pool. The descriptor stays
            // open: this task holds `self` until the call returns.
            let result = glommio::executor()
                .spawn_blocking(move || {
                    // SAFETY: `fd` stays open while the task that awaits this call holds `self`.
                    if unsafe { libc::syncfs(fd) } == 0 {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error().to_string())
                    }
                })
                .await;
            for tx in waiting {
                let _ = tx.send(result.clone());
            }
        }
    }
}
