//! A small durable state file: an append-only log of CRC'd records with group commit, compacted
//! by replacing it with a snapshot. Subscription state and consumer-group offsets live in these,
//! one per (partition, subscription) and one per partition, next to the partition's segments.
//!
//! Owns the file's bytes and when they are durable; knows nothing of what the records mean.
//!
//! Layout: a sequence of groups, one per write: `u32 GROUP | len, u32 crc32c(body), body`
//! (little-endian), where the body is `len` bytes of records, each `u32 len, u32
//! crc32c(payload), payload`. A snapshot (written whole by [`StateLog::create`] or compaction,
//! then renamed into place) is one group with the `SEALED` bit too. Files written before groups
//! existed hold bare records, still read.
//!
//! Torn or damaged: one write and its `fdatasync` are in flight at a time, so after a power cut
//! only the last group can be incomplete. A bad group (or bare record) with nothing valid after
//! it is a torn tail, never acknowledged, and is cut at open. In `sync` mode, a bad group with
//! a valid group after it, or a bad snapshot, is damage to acknowledged state: the file is
//! refused (`Corrupt`) and left as it is, since cutting there would drop acknowledged settles
//! and commits. (`--durability write` promises nothing after a power cut, and cuts there.)
//!
//! I/O: appends and their `fdatasync` go through io_uring (glommio's buffered files: these
//! files are small and written in small pieces, where O_DIRECT buys nothing), so the syncs of
//! many state logs on a shard overlap and no thread hop sits on the receive and ack paths.
//! Opening, creating and compacting (rare) use `std::fs` on glommio's blocking thread pool,
//! whose one thread per shard would otherwise serialize every sync of the shard.
//!
//! Group commit: [`StateLog::append`] queues a record and returns its sequence number; one flush
//! task per file writes everything queued and (in `sync` mode) `fdatasync`s it, then wakes every
//! [`StateLog::durable`] waiter it covered. Compaction runs inside the flush task when nothing
//! is queued: the owner's [`SnapshotSource`] describes the whole state as records, which are
//! written to a temporary file, synced and renamed over the log, so a crash leaves either the old
//! log or the new snapshot, never a mix.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::fs::OpenOptions;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::rc::{Rc, Weak};

use futures::channel::oneshot;
use glommio::io::BufferedFile;

use super::disk_trace::{self, Op, WriteData};
use super::{dma, Durability, StorageError, SyncHealth};

/// Longest record accepted when reading back (a longer length prefix is a torn tail).
pub const MAX_RECORD_BYTES: usize = 1 << 20;
/// In a length word: the unit is a group of records (one write).
const GROUP: u32 = 1 << 31;
/// In a group's length word: a snapshot, written whole and renamed into place (never torn).
const SEALED: u32 = 1 << 30;
/// The length bits of a group's length word.
const GROUP_LEN: u32 = SEALED - 1;
/// Bytes of a group's or a record's header.
const HEADER: usize = 8;
/// A log is not compacted below this size.
pub const COMPACT_MIN_BYTES: u64 = 1 << 20;
/// ... and is compacted once it is this many times larger than its last snapshot.
pub const COMPACT_GROWTH_FACTOR: u64 = 4;

/// What the owner of a state log provides for compaction: its whole current state as
/// records, equivalent to replaying everything written so far.
pub trait SnapshotSource {
    /// The records of a snapshot, each one payload (framing is added here).
    fn snapshot(&self) -> Vec<Vec<u8>>;
}

/// Frames one payload as a record.
pub fn frame(payload: &[u8], out: &mut Vec<u8>) {
    debug_assert!(payload.len() <= MAX_RECORD_BYTES, "state record too large");
    debug_assert!(
        !payload.is_empty(),
        "an empty state record reads as a torn one"
    );
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(payload).to_le_bytes());
    out.extend_from_slice(payload);
}

/// Reserves a group header in front of records framed after it into `out` (empty).
fn open_group(out: &mut Vec<u8>) {
    debug_assert!(out.is_empty());
    out.extend_from_slice(&[0; HEADER]);
}

/// Fills the header that [`open_group`] reserved, for the records after it.
fn close_group(group: &mut [u8], sealed: bool) {
    let body = &group[HEADER..];
    debug_assert!(body.len() <= GROUP_LEN as usize, "state group too large");
    let word = GROUP | if sealed { SEALED } else { 0 } | body.len() as u32;
    let crc = crc32c::crc32c(body);
    group[..4].copy_from_slice(&word.to_le_bytes());
    group[4..HEADER].copy_from_slice(&crc.to_le_bytes());
}

/// The records of `payloads` as one sealed group (a snapshot), or nothing if there are none.
fn snapshot_bytes(payloads: &[Vec<u8>]) -> Vec<u8> {
    let mut bytes = Vec::new();
    if payloads.is_empty() {
        return bytes;
    }
    open_group(&mut bytes);
    for r in payloads {
        frame(r, &mut bytes);
    }
    close_group(&mut bytes, true);
    bytes
}

/// One valid unit of a file.
enum Unit<'a> {
    /// A bare record's payload (files from before groups).
    Record(&'a [u8]),
    /// A group's body: framed records.
    Group(&'a [u8]),
}

/// The valid unit at `at` and the position after it; `None` if it is incomplete or damaged.
fn unit_at(bytes: &[u8], at: usize) -> Option<(Unit<'_>, usize)> {
    let head = bytes.get(at..at + HEADER)?;
    let word = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
    let crc = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
    let grouped = word & GROUP != 0;
    let len = if grouped { word & GROUP_LEN } else { word } as usize;
    // No record is empty: zeros (a length of 0 and the CRC of nothing, 0) are what an append
    // whose size reached the disk before its data leaves after a power cut.
    if len == 0 || (!grouped && len > MAX_RECORD_BYTES) || bytes.len() - at - HEADER < len {
        return None;
    }
    let body = &bytes[at + HEADER..at + HEADER + len];
    if crc32c::crc32c(body) != crc {
        return None;
    }
    let unit = if grouped {
        Unit::Group(body)
    } else {
        Unit::Record(body)
    };
    Some((unit, at + HEADER + len))
}

/// The records framed in a group's body, if all of them are whole and valid.
fn group_records(body: &[u8]) -> Option<Vec<&[u8]>> {
    let mut records = Vec::new();
    let mut at = 0;
    while at < body.len() {
        match unit_at(body, at)? {
            (Unit::Record(payload), next) => {
                records.push(payload);
                at = next;
            }
            (Unit::Group(_), _) => return None,
        }
    }
    Some(records)
}

/// Splits a file into record payloads; returns them and the length of the valid prefix (what
/// follows it is a torn tail, to cut). With `strict` (`sync` mode), damage that can not be a
/// torn tail is an error: a bad unit with a valid group after it, or a bad snapshot.
pub fn parse(bytes: &[u8], strict: bool) -> Result<(Vec<&[u8]>, usize), String> {
    let mut records = Vec::new();
    let mut at = 0usize;
    while let Some((unit, next)) = unit_at(bytes, at) {
        match unit {
            Unit::Record(payload) => records.push(payload),
            Unit::Group(body) => records.extend(group_records(body).ok_or_else(|| {
                format!("the group at byte {at} passes its checksum but holds bad records")
            })?),
        }
        at = next;
    }
    if strict && at < bytes.len() {
        let word = u32::from_le_bytes(
            bytes[at..]
                .get(..4)
                .map_or([0; 4], |w| [w[0], w[1], w[2], w[3]]),
        );
        if word & (GROUP | SEALED) == GROUP | SEALED {
            return Err(format!("the snapshot at byte {at} fails its checksum"));
        }
        let later =
            (at + 1..bytes.len()).find(|&i| matches!(unit_at(bytes, i), Some((Unit::Group(_), _))));
        if let Some(later) = later {
            return Err(format!(
                "the records at byte {at} are damaged and valid ones follow at byte {later}: \
                 not a torn tail"
            ));
        }
    }
    Ok((records, at))
}

/// The valid records of a file and its valid length.
type Loaded = (Vec<Vec<u8>>, u64);

struct Inner {
    /// The open file (absent while compaction replaces it).
    file: Option<Rc<BufferedFile>>,
    /// Framed records not yet handed to a write.
    pending: Vec<u8>,
    /// Sequence number of the last record appended.
    appended_seq: u64,
    /// Every record up to this sequence number is durable.
    durable_seq: u64,
    /// (sequence number, waiter), ascending.
    waiters: VecDeque<(u64, oneshot::Sender<Result<(), StorageError>>)>,
    flushing: bool,
    /// Bytes in the file.
    size_bytes: u64,
    /// Bytes of the last snapshot (the file's size right after compaction or creation).
    snapshot_bytes: u64,
    /// Set after a failed write or sync: nothing more is accepted.
    failed: Option<String>,
    /// Set once the file was removed: appends are dropped.
    removed: bool,
}

/// One state file. Owned by one shard (not `Send`).
pub struct StateLog {
    path: PathBuf,
    durability: Durability,
    /// The shard's record of failed syncs on the data device: this log's failed sync
    /// poisons it, and nothing is reported durable once it is poisoned.
    health: Rc<SyncHealth>,
    inner: RefCell<Inner>,
    source: RefCell<Option<Weak<dyn SnapshotSource>>>,
}

fn io_err(context: String) -> impl FnOnce(std::io::Error) -> StorageError {
    move |e| StorageError::io(context, &e)
}

/// Replaces `path` with `bytes` atomically and durably (blocking): temporary file, fsync,
/// rename, fsync of the directory.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StorageError> {
    let context = format!("writing {}", path.display());
    super::atomic_file::replace(path, bytes).map_err(io_err(context))
}

/// Opens `path` for io_uring writes.
async fn open_for_append(path: &Path) -> Result<Rc<BufferedFile>, StorageError> {
    let file = glommio::io::OpenOptions::new()
        .write(true)
        .buffered_open(path)
        .await
        .map_err(|e| StorageError::glommio(format!("opening {}", path.display()), e))?;
    dma::traced_open(&file, path, false);
    Ok(Rc::new(file))
}

impl StateLog {
    /// Creates the file at `path` holding `records` (replacing any), durably. Its directory
    /// must exist: a state created while its topic is deleted must not bring the partition's
    /// directory back (a topic created again under that name would inherit it).
    pub async fn create(
        path: &Path,
        records: Vec<Vec<u8>>,
        durability: Durability,
        health: Rc<SyncHealth>,
    ) -> Result<Rc<Self>, StorageError> {
        let bytes = snapshot_bytes(&records);
        let owned = path.to_path_buf();
        let len = bytes.len() as u64;
        glommio::executor()
            .spawn_blocking(move || {
                if let Some(dir) = owned.parent().filter(|d| !d.is_dir()) {
                    return Err(StorageError::io(
                        format!("creating {}", owned.display()),
                        &std::io::Error::new(
                            std::io::ErrorKind::NotFound,
                            format!("{} is gone (its topic was deleted?)", dir.display()),
                        ),
                    ));
                }
                write_atomic(&owned, &bytes)
            })
            .await?;
        let file = open_for_append(path).await?;
        Ok(Self::with_file(path, file, len, durability, health))
    }

    /// Opens the file at `path` and returns it with the payloads of its valid records; a
    /// torn tail is cut off. `None` if the file does not exist; `Corrupt` if it holds damage
    /// that is not a torn tail (see the module's notes), the file left untouched.
    pub async fn open(
        path: &Path,
        durability: Durability,
        health: Rc<SyncHealth>,
    ) -> Result<Option<(Rc<Self>, Vec<Vec<u8>>)>, StorageError> {
        let owned = path.to_path_buf();
        let loaded = glommio::executor()
            .spawn_blocking(move || -> Result<Option<Loaded>, StorageError> {
                let context = format!("reading {}", owned.display());
                let mut file = match OpenOptions::new().read(true).write(true).open(&owned) {
                    Ok(f) => f,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                    Err(e) => return Err(StorageError::io(context, &e)),
                };
                let mut bytes = Vec::new();
                file.read_to_end(&mut bytes)
                    .map_err(io_err(context.clone()))?;
                let (records, valid) =
                    parse(&bytes, durability == Durability::Sync).map_err(|why| {
                        StorageError::Corrupt(format!(
                            "{}: {why}; the file is left as it is",
                            owned.display()
                        ))
                    })?;
                let records: Vec<Vec<u8>> = records.into_iter().map(<[u8]>::to_vec).collect();
                if valid < bytes.len() {
                    tracing::warn!(
                        "{}: cutting a torn tail of {} bytes after {} records",
                        owned.display(),
                        bytes.len() - valid,
                        records.len()
                    );
                    dma::traced_open(&file, &owned, false);
                    let fd = file.as_raw_fd();
                    disk_trace::traced(
                        || Op::Truncate {
                            fd,
                            len: valid as u64,
                        },
                        || file.set_len(valid as u64),
                    )
                    .map_err(io_err(context.clone()))?;
                    disk_trace::traced(|| Op::Sync { fd }, || file.sync_all())
                        .map_err(io_err(context))?;
                }
                Ok(Some((records, valid as u64)))
            })
            .await?;
        let Some((records, len)) = loaded else {
            return Ok(None);
        };
        let file = open_for_append(path).await?;
        let log = Self::with_file(path, file, len, durability, health);
        // Unknown history: compact at the next flush if the file is already large.
        log.inner.borrow_mut().snapshot_bytes = 0;
        Ok(Some((log, records)))
    }

    fn with_file(
        path: &Path,
        file: Rc<BufferedFile>,
        len: u64,
        durability: Durability,
        health: Rc<SyncHealth>,
    ) -> Rc<Self> {
        Rc::new(Self {
            path: path.to_path_buf(),
            durability,
            health,
            inner: RefCell::new(Inner {
                file: Some(file),
                pending: Vec::new(),
                appended_seq: 0,
                durable_seq: 0,
                waiters: VecDeque::new(),
                flushing: false,
                size_bytes: len,
                snapshot_bytes: len,
                failed: None,
                removed: false,
            }),
            source: RefCell::new(None),
        })
    }

    /// Names the owner that describes the state for compaction.
    pub fn set_snapshot_source(&self, source: Weak<dyn SnapshotSource>) {
        *self.source.borrow_mut() = Some(source);
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes in the file now.
    pub fn size_bytes(&self) -> u64 {
        self.inner.borrow().size_bytes
    }

    /// Queues one record; returns its sequence number for [`StateLog::durable`]. The flush
    /// starts at once (or after the one in flight).
    pub fn append(self: &Rc<Self>, payload: &[u8]) -> u64 {
        let start = {
            let mut inner = self.inner.borrow_mut();
            if inner.pending.is_empty() {
                open_group(&mut inner.pending);
            }
            frame(payload, &mut inner.pending);
            inner.appended_seq += 1;
            let start = !inner.flushing;
            inner.flushing = true;
            start
        };
        if start {
            // glommio may run a spawned task at once: no borrow is held here.
            let log = Rc::clone(self);
            glommio::spawn_local(async move { log.flush_loop().await }).detach();
        }
        self.inner.borrow().appended_seq
    }

    /// The sequence number of the last record appended.
    pub fn last_seq(&self) -> u64 {
        self.inner.borrow().appended_seq
    }

    /// Waits until every record up to `seq` is durable (written, and synced in `sync` mode).
    pub async fn durable(&self, seq: u64) -> Result<(), StorageError> {
        let rx = {
            let mut inner = self.inner.borrow_mut();
            if let Some(why) = &inner.failed {
                return Err(StorageError::ReadOnly(why.clone()));
            }
            if seq <= inner.durable_seq {
                return Ok(());
            }
            let (tx, rx) = oneshot::channel();
            inner.waiters.push_back((seq, tx));
            rx
        };
        match rx.await {
            Ok(result) => result,
            Err(_) => Err(StorageError::ReadOnly(format!(
                "{} was closed",
                self.path.display()
            ))),
        }
    }

    /// Deletes the file; later appends are dropped and their waiters fail.
    pub async fn remove(&self) {
        let path = {
            let mut inner = self.inner.borrow_mut();
            inner.removed = true;
            inner.failed = Some(format!("{} was removed", self.path.display()));
            for (_, tx) in inner.waiters.drain(..) {
                let _ = tx.send(Err(StorageError::ReadOnly("the state was removed".into())));
            }
            self.path.clone()
        };
        // The directory's fsync makes the removal durable: otherwise a state file re-created
        // under the same name after a power cut could come back as the old one.
        let removed = glommio::executor()
            .spawn_blocking(move || {
                disk_trace::remove_file(&path)?;
                super::atomic_file::sync_dir(path.parent().unwrap_or(Path::new(".")))
            })
            .await;
        if let Err(e) = removed {
            tracing::warn!("removing {}: {e}", self.path.display());
        }
    }

    fn wants_compaction(inner: &Inner) -> bool {
        inner.size_bytes >= COMPACT_MIN_BYTES
            && inner.size_bytes >= inner.snapshot_bytes.saturating_mul(COMPACT_GROWTH_FACTOR)
    }

    async fn flush_loop(self: Rc<Self>) {
        loop {
            let job = {
                let mut inner = self.inner.borrow_mut();
                if inner.failed.is_some() || inner.removed {
                    inner.pending.clear();
                    inner.flushing = false;
                    return;
                }
                if inner.pending.is_empty() {
                    if Self::wants_compaction(&inner) {
                        None
                    } else {
                        inner.flushing = false;
                        return;
                    }
                } else {
                    let Some(file) = inner.file.clone() else {
                        inner.flushing = false;
                        return;
                    };
                    let mut bytes = std::mem::take(&mut inner.pending);
                    close_group(&mut bytes, false);
                    Some((file, bytes, inner.size_bytes, inner.appended_seq))
                }
            };
            match job {
                Some((file, bytes, at, seq)) => self.write(&file, bytes, at, seq).await,
                None => self.compact().await,
            }
        }
    }

    /// Writes `bytes` at `at` (the end of the file) and, in `sync` mode, syncs. An error comes
    /// with whether it says the device failed (a sync error, or `EIO` from the write).
    async fn write_and_sync(
        &self,
        file: &BufferedFile,
        mut bytes: Vec<u8>,
        mut at: u64,
    ) -> Result<(), (StorageError, bool)> {
        let context = || format!("appending to {}", self.path.display());
        while !bytes.is_empty() {
            let pending = disk_trace::begin(|| Op::Write {
                fd: file.as_raw_fd(),
                offset: at,
                direct: false,
                data: WriteData::of(&bytes),
            });
            let n = file.write_at(bytes.clone(), at).await;
            disk_trace::end(pending, matches!(n, Ok(n) if n == bytes.len()));
            let n = n.map_err(|e| {
                let e = StorageError::glommio(context(), e);
                let device = e.is_device_failure();
                (e, device)
            })?;
            if n == 0 {
                let full = StorageError::Io {
                    context: context(),
                    errno: Some(libc::ENOSPC),
                    message: "short write".into(),
                };
                return Err((full, false));
            }
            bytes.drain(..n);
            at += n as u64;
        }
        if self.durability == Durability::Sync {
            let pending = disk_trace::begin(|| Op::Sync {
                fd: file.as_raw_fd(),
            });
            let synced = file.fdatasync().await;
            disk_trace::end(pending, synced.is_ok());
            synced.map_err(|e| {
                let e = StorageError::glommio(format!("syncing {}", self.path.display()), e);
                (e, true)
            })?;
        }
        Ok(())
    }

    async fn write(&self, file: &BufferedFile, bytes: Vec<u8>, at: u64, seq: u64) {
        let len = bytes.len() as u64;
        let result = match self.write_and_sync(file, bytes, at).await {
            Err((error, true)) => {
                self.health
                    .poison(&format!("{}: {error}", self.path.display()));
                Err(error)
            }
            Err((error, false)) => Err(error),
            // Another sync on the device failed meanwhile: this write may be gone with it.
            Ok(()) => match self.health.failure() {
                Some(why) => Err(StorageError::ReadOnly(format!(
                    "a sync on the data device failed: {why}"
                ))),
                None => Ok(()),
            },
        };
        let mut inner = self.inner.borrow_mut();
        match result {
            Ok(()) => {
                inner.size_bytes += len;
                inner.durable_seq = seq;
                while inner.waiters.front().is_some_and(|(s, _)| *s <= seq) {
                    if let Some((_, tx)) = inner.waiters.pop_front() {
                        let _ = tx.send(Ok(()));
                    }
                }
            }
            Err(error) => {
                // As with the partition logs: a failed write or sync is never retried (the
                // kernel may have dropped the dirty pages), the state turns read-only.
                tracing::error!("FATAL: {error}; this state is read-only until restart");
                inner.failed = Some(error.to_string());
                for (_, tx) in inner.waiters.drain(..) {
                    let _ = tx.send(Err(error.clone()));
                }
            }
        }
    }

    async fn compact(&self) {
        let source = self.source.borrow().as_ref().and_then(Weak::upgrade);
        let Some(source) = source else {
            // Nobody to describe the state: do not try again until the file grows more.
            let mut inner = self.inner.borrow_mut();
            inner.snapshot_bytes = inner.size_bytes;
            return;
        };
        let bytes = snapshot_bytes(&source.snapshot());
        drop(source);
        let old = self.inner.borrow_mut().file.take();
        drop(old);
        let path = self.path.clone();
        let len = bytes.len() as u64;
        let mut result = glommio::executor()
            .spawn_blocking(move || write_atomic(&path, &bytes))
            .await
            .map(|()| None);
        if result.is_ok() {
            result = open_for_append(&self.path).await.map(Some);
        }
        let mut inner = self.inner.borrow_mut();
        match result {
            Ok(file) => {
                inner.file = file;
                inner.size_bytes = len;
                inner.snapshot_bytes = len;
            }
            Err(e) => {
                tracing::error!("FATAL: compacting {}: {e}", self.path.display());
                inner.failed = Some(e.to_string());
                for (_, tx) in inner.waiters.drain(..) {
                    let _ = tx.send(Err(e.clone()));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::collections::BTreeMap;

    /// A key → value map kept in a state log; a record is `key, value, padding`.
    struct Map {
        entries: RefCell<BTreeMap<u32, u32>>,
    }

    impl SnapshotSource for Map {
        fn snapshot(&self) -> Vec<Vec<u8>> {
            self.entries
                .borrow()
                .iter()
                .map(|(&k, &v)| record(k, v))
                .collect()
        }
    }

    fn record(k: u32, v: u32) -> Vec<u8> {
        let mut r = k.to_le_bytes().to_vec();
        r.extend_from_slice(&v.to_le_bytes());
        r.extend_from_slice(&[0u8; 32]);
        r
    }

    fn replay(records: &[Vec<u8>]) -> BTreeMap<u32, u32> {
        records
            .iter()
            .map(|r| {
                let k = u32::from_le_bytes([r[0], r[1], r[2], r[3]]);
                let v = u32::from_le_bytes([r[4], r[5], r[6], r[7]]);
                (k, v)
            })
            .collect()
    }

    #[test]
    fn a_state_is_not_created_where_its_directory_is_gone() {
        let gone = std::env::temp_dir().join(format!("corebus-state-gone-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&gone);
        let path = gone.join("consumer-offsets.state");
        let ex = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
            .make()
            .expect("executor");
        let created = ex.run(async move {
            StateLog::create(&path, Vec::new(), Durability::Sync, Rc::default())
                .await
                .map(|_| ())
        });
        let err = created.expect_err("the directory is gone");
        assert!(err.to_string().contains("is gone"), "{err}");
        assert!(!gone.exists(), "the directory is not made again");
    }

    #[test]
    fn compaction_keeps_the_state_and_bounds_the_file() {
        let dir = std::env::temp_dir().join(format!("corebus-state-log-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("map.state");
        let ex = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
            .make()
            .expect("executor");
        let (expected, size, reopened) = ex.run(async move {
            let log = StateLog::create(&path, Vec::new(), Durability::Write, Rc::default())
                .await
                .expect("create");
            let map = Rc::new(Map {
                entries: RefCell::new(BTreeMap::new()),
            });
            let weak: Weak<dyn SnapshotSource> =
                Rc::downgrade(&(Rc::clone(&map) as Rc<dyn SnapshotSource>));
            log.set_snapshot_source(weak);
            // 60,000 records of 48 framed bytes over 100 keys: 2.9 MB appended.
            let mut seq = 0;
            for i in 0..60_000u32 {
                map.entries.borrow_mut().insert(i % 100, i);
                seq = log.append(&record(i % 100, i));
                if i % 1000 == 999 {
                    log.durable(seq).await.expect("durable");
                }
            }
            log.durable(seq).await.expect("durable");
            // One more flush lets a due compaction run.
            let seq = log.append(&record(0, 59_999 + 100));
            map.entries.borrow_mut().insert(0, 59_999 + 100);
            log.durable(seq).await.expect("durable");
            let size = log.size_bytes();
            let expected = map.entries.borrow().clone();
            drop(log);
            let (_, records) = StateLog::open(&path, Durability::Write, Rc::default())
                .await
                .expect("open")
                .expect("exists");
            (expected, size, replay(&records))
        });
        assert!(size < COMPACT_MIN_BYTES * 2, "compacted: {size} bytes");
        assert_eq!(reopened, expected);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn parse_stops_at_a_torn_or_damaged_bare_record() {
        // Files from before groups: bare records.
        let mut bytes = Vec::new();
        frame(b"one", &mut bytes);
        frame(b"two", &mut bytes);
        let whole = bytes.len();
        frame(b"three", &mut bytes);
        for cut in whole..bytes.len() {
            let (records, valid) = parse(&bytes[..cut], true).expect("a torn tail");
            assert_eq!(records, vec![&b"one"[..], &b"two"[..]]);
            assert_eq!(valid, whole);
        }
        let mut damaged = bytes.clone();
        damaged[whole + 9] ^= 1;
        assert_eq!(parse(&damaged, true).expect("cut").0.len(), 2);
        assert_eq!(parse(&bytes, true).expect("whole").0.len(), 3);
        // A power cut can leave an append's size without its data: zeros end the records.
        let mut zeros = bytes[..whole].to_vec();
        zeros.resize(whole + 4096, 0);
        let parsed = parse(&zeros, true).expect("a torn tail");
        assert_eq!(parsed, (vec![&b"one"[..], &b"two"[..]], whole));
    }

    /// A file as the log writes it: a snapshot, then one group per write.
    fn grouped_file() -> (Vec<u8>, Vec<usize>) {
        let mut bytes = snapshot_bytes(&[b"s1".to_vec(), b"s2".to_vec()]);
        let mut ends = vec![bytes.len()];
        for write in [&[&b"a"[..], b"bb"][..], &[b"ccc"], &[b"dddd", b"e", b"ff"]] {
            let mut group = Vec::new();
            open_group(&mut group);
            for r in write {
                frame(r, &mut group);
            }
            close_group(&mut group, false);
            bytes.extend_from_slice(&group);
            ends.push(bytes.len());
        }
        (bytes, ends)
    }

    #[test]
    fn a_torn_last_group_is_cut_wherever_it_ends() {
        let (bytes, ends) = grouped_file();
        let all = parse(&bytes, true).expect("whole").0;
        assert_eq!(all.len(), 8);
        let before_last = ends[ends.len() - 2];
        for cut in before_last..bytes.len() {
            let (records, valid) = parse(&bytes[..cut], true).expect("a torn tail");
            assert_eq!((records.len(), valid), (5, before_last), "cut at {cut}");
        }
        // The last write's first block lost and a later one kept: its records after the hole
        // parse alone, but they are inside the torn group, not after it.
        let mut holed = bytes.clone();
        holed[before_last..before_last + 12].fill(0);
        assert_eq!(parse(&holed, true).expect("torn").1, before_last);
    }

    #[test]
    fn damage_with_valid_groups_after_it_is_refused_in_sync_mode() {
        let (bytes, ends) = grouped_file();
        // A flipped bit in the second write after the snapshot, in its header or body.
        for at in [ends[1], ends[1] + 3, ends[1] + 12] {
            let mut damaged = bytes.clone();
            damaged[at] ^= 0x10;
            let err = parse(&damaged, true).expect_err("not a torn tail");
            assert!(err.contains("valid ones follow"), "{err}");
            // Without sync nothing is promised after a power cut: cut, as a torn tail.
            let (records, valid) = parse(&damaged, false).expect("cut");
            assert_eq!((records.len(), valid), (4, ends[1]));
        }
        // A snapshot is renamed into place whole: damage in it is never a torn tail.
        let mut damaged = bytes.clone();
        damaged[HEADER + 9] ^= 1;
        let err = parse(&damaged, true).expect_err("a bad snapshot");
        assert!(err.contains("snapshot"), "{err}");
        let snapshot_only = &bytes[..ends[0]];
        let mut damaged = snapshot_only.to_vec();
        damaged[HEADER + 9] ^= 1;
        assert!(parse(&damaged, true).is_err());
    }
}
