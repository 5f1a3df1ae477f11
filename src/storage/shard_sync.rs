//! Shard-wide group commit: one sync call serves every partition of the shard that wrote
//! meanwhile, instead of one `fdatasync` per partition file.
//!
//! Why: each `fdatasync` ends in a flush of the disk's volatile cache, and a disk does those
//! one after another. On the development machine 64 single-message producers over 4
//! partitions made 4 concurrent flushes per group at ~550 µs each; over 1 partition the same
//! load saw ~240 µs (and 35% more messages a second).
//!
//! Two ways to make the shared call, chosen by `--group-commit`:
//! - **shared disk flush** (`shared-flush`, the default): an `fdatasync` of the superblock, a
//!   file nobody writes after format, so it has no metadata to commit. On ext4 and XFS such
//!   an `fdatasync` still flushes the disk's cache (ext4 `ext4_sync_file`, XFS
//!   `xfs_file_fsync`: "overwriting an already allocated file ... we might have to flush the
//!   data device cache here"), and that flush makes every O_DIRECT write completed before it
//!   durable, whichever file it went to, *provided that write needs no metadata*: it only
//!   overwrites blocks that are written (not just allocated) and whose allocation an earlier
//!   `fdatasync` of that file committed. A partition asks for it only for such flushes (the
//!   prewritten stretch ahead of its end, see `storage::prewrite`); any other flush
//!   `fdatasync`s its own file. Other filesystems fall back to per-file `fdatasync`.
//! - **syncfs** (`syncfs`, formerly `shard`): one `syncfs` of the data directory's
//!   filesystem, which writes back and commits everything dirty there, so it serves every
//!   flush. It also writes back whatever else is dirty on that filesystem (other programs'
//!   files): it suits a disk given to corebus. The `syncfs` is followed by the same disk
//!   flush as above: XFS and btrfs issue no cache flush from a `syncfs` that finds nothing to
//!   commit, which is what flushes that only overwrite prewritten blocks leave it. Only on
//!   ext4 and XFS; elsewhere every flush syncs its own file.
//!
//! Either way, calls do not overlap, and a request waits for the next call to *start* after
//! it (one in flight may have started before its write completed). Left at that, partitions
//! catch the calls one after another (1.5 flushes per call measured with 4 partitions), so a
//! flush announces its write before issuing it, and a due call first waits for the writes
//! announced before it: the shard's partitions then write together and share one call per
//! round. A failed call fails every flush that waited for it, as a failed `fdatasync` would
//! (the partitions turn read-only).

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::rc::Rc;

use futures::channel::oneshot;
use glommio::io::DmaFile;

use super::{disk_trace, dma, superblock, StorageError};
use crate::metrics::StorageMetrics;

/// Filesystem magic numbers (`statfs`'s `f_type`) of the filesystems on which an `fdatasync`
/// of an unchanged file still flushes the disk's cache.
const EXT4_MAGIC: i64 = 0xEF53;
const XFS_MAGIC: i64 = 0x5846_5342;

/// What the shard's one call is.
enum SyncCall {
    /// `fdatasync` of a file that never changes: a flush of the disk's cache.
    DiskFlush(DmaFile),
    /// `syncfs` of the filesystem that holds this directory, then an `fdatasync` of a file
    /// that never changes: on XFS (and btrfs) a `syncfs` with nothing to commit issues no
    /// cache flush, and the overwrites of prewritten blocks commit nothing.
    Syncfs { dir: OwnedFd, flush: DmaFile },
}

/// The shard's syncer. Cheap to share (`Rc`) among the shard's partition logs.
pub struct ShardSync {
    call: SyncCall,
    /// `st_dev` of the data directory: the device whose cache the call flushes.
    device: u64,
    state: RefCell<SyncState>,
    /// The shard's storage metrics (counts the calls).
    metrics: Rc<StorageMetrics>,
}

impl std::fmt::Debug for ShardSync {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardSync")
            .field("kind", &self.kind())
            .finish_non_exhaustive()
    }
}

#[derive(Default)]
struct SyncState {
    running: bool,
    /// Flushes waiting for the next call to start (and end).
    waiting: Vec<oneshot::Sender<Result<(), String>>>,
    /// Ids given to writes announced so far (see [`ShardSync::write_started`]).
    writes_announced: u64,
    /// Announced writes still running, by id.
    writes_in_flight: BTreeSet<u64>,
    /// The syncer, waiting for the writes that started before its next call.
    write_waiter: Option<oneshot::Sender<()>>,
}

/// A write whose flush will ask the shard's syncer for a call; the next call waits for it
/// to end (or to be dropped, if it fails) so that one call serves it too.
pub struct WriteInFlight {
    sync: Rc<ShardSync>,
    id: u64,
}

impl WriteInFlight {
    /// The write ended: returns once a call that started after now has ended.
    pub async fn synced(self) -> Result<(), StorageError> {
        let sync = Rc::clone(&self.sync);
        sync.sync(Some(self)).await
    }
}

impl Drop for WriteInFlight {
    fn drop(&mut self) {
        let mut st = self.sync.state.borrow_mut();
        st.writes_in_flight.remove(&self.id);
        if let Some(tx) = st.write_waiter.take() {
            let _ = tx.send(());
        }
    }
}

impl ShardSync {
    /// A syncer that flushes the disk's cache under the data directory, or `None` when its
    /// filesystem is not ext4 or XFS, the ones known to flush the disk on an `fdatasync` of an
    /// unchanged file (then every flush syncs its own file).
    pub async fn disk_flush(
        data_dir: &Path,
        metrics: Rc<StorageMetrics>,
    ) -> Result<Option<Rc<Self>>, StorageError> {
        let Some((file, device)) = open_disk_flush(data_dir).await? else {
            return Ok(None);
        };
        Ok(Some(Self::new(SyncCall::DiskFlush(file), device, metrics)))
    }

    /// A syncer that calls `syncfs` on the filesystem that holds `data_dir` and then flushes
    /// the disk's cache; `None` where that flush can not be made (not ext4 or XFS).
    pub async fn syncfs(
        data_dir: &Path,
        metrics: Rc<StorageMetrics>,
    ) -> Result<Option<Rc<Self>>, StorageError> {
        let Some((flush, device)) = open_disk_flush(data_dir).await? else {
            return Ok(None);
        };
        let dir = std::fs::File::open(data_dir)
            .map_err(|e| StorageError::io(format!("opening {}", data_dir.display()), &e))?;
        let dir = OwnedFd::from(dir);
        Ok(Some(Self::new(
            SyncCall::Syncfs { dir, flush },
            device,
            metrics,
        )))
    }

    fn new(call: SyncCall, device: u64, metrics: Rc<StorageMetrics>) -> Rc<Self> {
        Rc::new(Self {
            call,
            device,
            state: RefCell::new(SyncState::default()),
            metrics,
        })
    }

    /// Whether this syncer's call makes writes to files in `dir` durable: only when `dir` is
    /// on the device it flushes (a partition directory mounted elsewhere, or a symlink to
    /// another disk, is not), checked by `st_dev`. Logs it does not cover sync their own files.
    pub fn covers(&self, dir: &Path) -> bool {
        use std::os::unix::fs::MetadataExt;
        match std::fs::metadata(dir) {
            Ok(m) if m.dev() == self.device && is_fscrypt_encrypted(dir) => {
                tracing::warn!(
                    "{} is encrypted with fscrypt, where direct I/O may be buffered: its \
                     flushes sync their own files instead of sharing the shard's {}",
                    dir.display(),
                    self.kind()
                );
                false
            }
            Ok(m) if m.dev() == self.device => true,
            Ok(_) => {
                tracing::warn!(
                    "{} is on another device than the data directory: its flushes sync their \
                     own files instead of sharing the shard's {}",
                    dir.display(),
                    self.kind()
                );
                false
            }
            Err(_) => false,
        }
    }

    /// `"disk flush"` or `"syncfs"`, for messages.
    pub fn kind(&self) -> &'static str {
        match self.call {
            SyncCall::DiskFlush(_) => "disk flush",
            SyncCall::Syncfs { .. } => "syncfs",
        }
    }

    /// Whether a call makes a flush durable: a `syncfs` always does; a disk flush only when
    /// the flush overwrote blocks whose allocation is already committed (`overwrite`).
    pub fn serves(&self, overwrite: bool) -> bool {
        overwrite || matches!(self.call, SyncCall::Syncfs { .. })
    }

    /// Announces a write that will ask for a call when it ends: the calls that become due
    /// meanwhile wait for it (at most one write's time), so that the shard's partitions share
    /// one call per round instead of each catching the next.
    pub fn write_started(self: &Rc<Self>) -> WriteInFlight {
        let mut st = self.state.borrow_mut();
        let id = st.writes_announced;
        st.writes_announced += 1;
        st.writes_in_flight.insert(id);
        WriteInFlight {
            sync: Rc::clone(self),
            id,
        }
    }

    /// Returns once a call that started after this one has ended: every write completed
    /// before this call (and served, see [`ShardSync::serves`]) is then durable. `write` is
    /// the announcement of the write this flush made, if any; it ends here.
    pub async fn sync(self: &Rc<Self>, write: Option<WriteInFlight>) -> Result<(), StorageError> {
        let (tx, rx) = oneshot::channel();
        let start = {
            let mut st = self.state.borrow_mut();
            st.waiting.push(tx);
            !std::mem::replace(&mut st.running, true)
        };
        // Only now, with the request queued: a syncer woken by this finds it.
        drop(write);
        if start {
            // glommio may run a spawned task right away: no borrow is held here.
            let syncer = Rc::clone(self);
            glommio::spawn_local(async move { syncer.run().await }).detach();
        }
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(message)) => Err(StorageError::Io {
                context: format!("the shard's {}", self.kind()),
                errno: None,
                message,
            }),
            Err(_) => Err(StorageError::ReadOnly("the shard's syncer stopped".into())),
        }
    }

    /// Calls while flushes wait, one call for all who asked before it started.
    async fn run(self: Rc<Self>) {
        loop {
            self.writes_started_before_now().await;
            let waiting = {
                let mut st = self.state.borrow_mut();
                if st.waiting.is_empty() {
                    st.running = false;
                    return;
                }
                std::mem::take(&mut st.waiting)
            };
            let calls = &self.metrics.shard_syncs;
            calls.set(calls.get() + 1);
            let result = match &self.call {
                SyncCall::DiskFlush(file) => dma::fdatasync(file).await.map_err(|e| e.to_string()),
                SyncCall::Syncfs { dir, flush } => {
                    let fd = dir.as_raw_fd();
                    // syncfs blocks; glommio runs it on its blocking-thread pool. The
                    // descriptor stays open: this task holds `self` until the call returns.
                    let pending = disk_trace::begin(|| disk_trace::Op::SyncFs);
                    let synced = glommio::executor()
                        .spawn_blocking(move || {
                            // SAFETY: `fd` stays open while the task awaiting this holds `self`.
                            if unsafe { libc::syncfs(fd) } == 0 {
                                Ok(())
                            } else {
                                Err(std::io::Error::last_os_error().to_string())
                            }
                        })
                        .await;
                    disk_trace::end(pending, synced.is_ok());
                    match synced {
                        Ok(()) => dma::fdatasync(flush).await.map_err(|e| e.to_string()),
                        Err(e) => Err(e),
                    }
                }
            };
            for tx in waiting {
                let _ = tx.send(result.clone());
            }
        }
    }
}

impl ShardSync {
    /// Waits until every write announced before this call has ended (their flushes have then
    /// queued their requests, or failed).
    async fn writes_started_before_now(&self) {
        let barrier = self.state.borrow().writes_announced;
        loop {
            let rx = {
                let mut st = self.state.borrow_mut();
                match st.writes_in_flight.first() {
                    Some(&oldest) if oldest < barrier => {
                        let (tx, rx) = oneshot::channel();
                        st.write_waiter = Some(tx);
                        rx
                    }
                    _ => return,
                }
            };
            let _ = rx.await;
        }
    }
}

/// The superblock opened for flushing the disk's cache with an `fdatasync`, with the data
/// directory's device, on ext4 and XFS (see the module docs); `None` on other filesystems and
/// on ext4 mounted `data=journal`, which turns O_DIRECT writes into buffered ones that only
/// their own file's `fdatasync` makes durable.
async fn open_disk_flush(data_dir: &Path) -> Result<Option<(DmaFile, u64)>, StorageError> {
    use std::os::unix::fs::MetadataExt;
    let magic = filesystem_magic(data_dir)?;
    if magic != EXT4_MAGIC && magic != XFS_MAGIC {
        return Ok(None);
    }
    if mount_options(data_dir).is_some_and(|o| o.split(',').any(|o| o == "data=journal")) {
        tracing::warn!(
            "{} is on ext4 mounted data=journal: direct I/O is buffered there, so every flush \
             syncs its own file",
            data_dir.display()
        );
        return Ok(None);
    }
    let device = std::fs::metadata(data_dir)
        .map_err(|e| StorageError::io(format!("stat of {}", data_dir.display()), &e))?
        .dev();
    let path = data_dir.join(superblock::FILE_NAME);
    let file = DmaFile::open(&path).await.map_err(|e| {
        StorageError::glommio(format!("opening {} to flush the disk", path.display()), e)
    })?;
    dma::traced_open(&file, &path, false);
    Ok(Some((file, device)))
}

/// True when `dir` is encrypted with fscrypt (ext4, f2fs): without inline encryption hardware
/// the kernel turns direct I/O on its files into buffered I/O, which only the file's own
/// `fdatasync` makes durable.
fn is_fscrypt_encrypted(dir: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(path) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return false;
    };
    let encrypted = libc::STATX_ATTR_ENCRYPTED as u64;
    // SAFETY: `path` is a valid C string and `stx` a zeroed statx that the call fills in.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statx(libc::AT_FDCWD, path.as_ptr(), 0, 0, &mut stx) };
    rc == 0 && stx.stx_attributes_mask & encrypted != 0 && stx.stx_attributes & encrypted != 0
}

/// The filesystem options (mountinfo's super options) of the mount that holds `dir`.
fn mount_options(dir: &Path) -> Option<String> {
    let dir = std::fs::canonicalize(dir).ok()?;
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    // Fields: id parent major:minor root mount-point options [optional...] - type source super.
    mountinfo
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let point = fields.get(4)?;
            let after = fields.iter().position(|f| *f == "-")?;
            let options = fields.get(after + 3)?;
            dir.starts_with(point)
                .then(|| (point.len(), options.to_string()))
        })
        .max_by_key(|(len, _)| *len)
        .map(|(_, options)| options)
}

/// `statfs`'s `f_type` of the filesystem that holds `dir`.
fn filesystem_magic(dir: &Path) -> Result<i64, StorageError> {
    use std::os::unix::ffi::OsStrExt;
    let context = || format!("statfs of {}", dir.display());
    let cpath = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| StorageError::io(context(), &std::io::Error::other("path holds a NUL")))?;
    // SAFETY: statfs fills the struct we pass for a NUL-terminated path.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(cpath.as_ptr(), &mut fs) } != 0 {
        return Err(StorageError::io(
            context(),
            &std::io::Error::last_os_error(),
        ));
    }
    Ok(fs.f_type as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mount_options_of_a_directory_are_found() {
        let options = mount_options(Path::new("/")).expect("the root mount");
        assert!(
            options.split(',').any(|o| o == "rw" || o == "ro"),
            "{options}"
        );
    }
}
