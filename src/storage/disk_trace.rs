//! The disk trace: when `COREBUS_DISK_TRACE=FILE` is set, every operation of the storage
//! layer that changes what a power cut would leave on disk is recorded, in order, to `FILE`:
//! writes (with their bytes), allocations, truncations, hole punches, `fdatasync`s, directory
//! fsyncs, `syncfs`, creations, renames and removals, and the moments acknowledgements were
//! released. `storage::power_loss` replays a trace to the disk images a power cut could
//! leave at any point of it. Unset (always, outside tests), each hook costs one branch.
//!
//! An operation that takes time is recorded twice: `begin` before it is issued (a write with
//! its bytes) and `end` after it returned. Both are recorded on the conservative side of the
//! real moment (a `begin` before the kernel saw the call, an `end` after it returned), so
//! the replay never counts a write as covered by a sync that it was not. Namespace changes
//! (create, rename, unlink, mkdir) are recorded once, after they returned.
//!
//! The shards of one process share the file behind one lock; this mode is for tests only.
//!
//! Format: a sequence of events, little-endian. Event: `u8` tag (1 begin, 2 end, 3 instant);
//! begin: `u64` id, op; end: `u64` id, `u8` ok; instant: op. Op: `u8` kind, then its
//! fields (see [`Op`]); a path or byte string is `u32` length + bytes.

use std::fs::File;
use std::io::Write;
use std::os::fd::RawFd;
use std::path::Path;
use std::sync::{Mutex, OnceLock};

/// The environment variable that turns the trace on.
pub const ENV: &str = "COREBUS_DISK_TRACE";

/// One recorded operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// A file was opened for writing or syncing (`create`: with `O_CREAT`; `truncate`: with
    /// `O_TRUNC`), as descriptor `fd`.
    Open {
        /// The descriptor it got.
        fd: RawFd,
        /// Its path.
        path: String,
        /// Opened with `O_CREAT`.
        create: bool,
        /// Opened with `O_TRUNC`.
        truncate: bool,
    },
    /// A write of `data` at `offset` (`direct`: with O_DIRECT, bypassing the page cache).
    Write {
        /// The descriptor.
        fd: RawFd,
        /// Where.
        offset: u64,
        /// O_DIRECT.
        direct: bool,
        /// The bytes written.
        data: WriteData,
    },
    /// `fallocate` of `[0, size)`, growing the file's size to at least `size`.
    Allocate {
        /// The descriptor.
        fd: RawFd,
        /// The size allocated.
        size: u64,
    },
    /// A hole punched at `[offset, offset + len)` (reads as zeros, size unchanged).
    Punch {
        /// The descriptor.
        fd: RawFd,
        /// Where.
        offset: u64,
        /// How much.
        len: u64,
    },
    /// The file cut (or grown) to `len` bytes.
    Truncate {
        /// The descriptor.
        fd: RawFd,
        /// The new size.
        len: u64,
    },
    /// `fdatasync` (or `fsync`) of a file; also a flush of the disk's cache.
    Sync {
        /// The descriptor.
        fd: RawFd,
    },
    /// `fsync` of a directory: its entries become durable.
    DirSync {
        /// The directory.
        path: String,
    },
    /// `syncfs` of the filesystem.
    SyncFs,
    /// A rename.
    Rename {
        /// The old path.
        from: String,
        /// The new path.
        to: String,
    },
    /// A file removed.
    Unlink {
        /// Its path.
        path: String,
    },
    /// A directory created.
    Mkdir {
        /// Its path.
        path: String,
    },
    /// A directory removed with everything in it.
    RemoveTree {
        /// Its path.
        path: String,
    },
    /// Something else was acknowledged as durable (a consumer group's commit, an event's
    /// ack), in words the tests parse: `group PARTITION-DIR GROUP OFFSET` or
    /// `settled TOPIC SUBSCRIPTION PARTITION OFFSET`.
    Note {
        /// What.
        text: String,
    },
    /// Records `first..=last` of the partition in `dir` were acknowledged as durable.
    Acked {
        /// The partition's directory.
        dir: String,
        /// First offset.
        first: u64,
        /// Last offset.
        last: u64,
    },
}

/// The bytes of a write: kept whole, or only their length when they are all zeros (the
/// prewrites, which would otherwise fill the trace).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WriteData {
    /// The bytes.
    Bytes(Vec<u8>),
    /// This many zeros.
    Zeros(u64),
}

impl WriteData {
    /// `bytes`, compacted when they are all zeros.
    pub fn of(bytes: &[u8]) -> Self {
        if bytes.iter().all(|&b| b == 0) {
            Self::Zeros(bytes.len() as u64)
        } else {
            Self::Bytes(bytes.to_vec())
        }
    }

    /// How many bytes were written.
    pub fn len(&self) -> u64 {
        match self {
            Self::Bytes(b) => b.len() as u64,
            Self::Zeros(n) => *n,
        }
    }

    /// True for an empty write.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One entry of a trace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// An operation was issued; `id` pairs it with its [`Event::End`].
    Begin {
        /// Pairs begin and end.
        id: u64,
        /// What.
        op: Op,
    },
    /// The operation `id` returned (`ok`: successfully).
    End {
        /// Pairs begin and end.
        id: u64,
        /// It succeeded.
        ok: bool,
    },
    /// An operation recorded once, after it returned successfully.
    Instant(Op),
}

struct Tracer {
    file: File,
    next_id: u64,
}

fn tracer() -> Option<&'static Mutex<Tracer>> {
    static TRACER: OnceLock<Option<Mutex<Tracer>>> = OnceLock::new();
    TRACER
        .get_or_init(|| {
            let path = std::env::var_os(ENV)?;
            match std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
            {
                Ok(file) => Some(Mutex::new(Tracer { file, next_id: 1 })),
                Err(e) => {
                    tracing::error!("{ENV}: opening {}: {e}", Path::new(&path).display());
                    None
                }
            }
        })
        .as_ref()
}

/// True when the trace is on.
pub fn enabled() -> bool {
    tracer().is_some()
}

fn record(tracer: &Mutex<Tracer>, event: impl FnOnce(&mut Tracer) -> Vec<u8>) -> u64 {
    let Ok(mut t) = tracer.lock() else {
        return 0;
    };
    let bytes = event(&mut t);
    // One write per event, so that a kill -9 leaves whole events (a torn last one is ignored).
    if let Err(e) = t.file.write_all(&bytes) {
        tracing::error!("{ENV}: {e}");
    }
    t.next_id - 1
}

/// A traced operation in progress (see [`begin`]).
#[must_use]
pub struct Pending(Option<u64>);

/// Records that `op()` is being issued; pass the result to [`end`]. `op` is only called
/// when the trace is on.
pub fn begin(op: impl FnOnce() -> Op) -> Pending {
    let Some(tracer) = tracer() else {
        return Pending(None);
    };
    let op = op();
    Pending(Some(record(tracer, |t| {
        let id = t.next_id;
        t.next_id += 1;
        let mut out = vec![1u8];
        out.extend_from_slice(&id.to_le_bytes());
        encode_op(&op, &mut out);
        out
    })))
}

/// Records that the operation of `pending` returned.
pub fn end(pending: Pending, ok: bool) {
    let (Some(id), Some(tracer)) = (pending.0, tracer()) else {
        return;
    };
    record(tracer, |_| {
        let mut out = vec![2u8];
        out.extend_from_slice(&id.to_le_bytes());
        out.push(u8::from(ok));
        out
    });
}

/// Records `op()`, which returned successfully a moment ago.
pub fn instant(op: impl FnOnce() -> Op) {
    let Some(tracer) = tracer() else {
        return;
    };
    let op = op();
    record(tracer, |_| {
        let mut out = vec![3u8];
        encode_op(&op, &mut out);
        out
    });
}

/// A path as the trace records it.
pub fn path_string(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

/// Runs the synchronous `call`, traced as `op()` (begin and end).
pub fn traced<T>(
    op: impl FnOnce() -> Op,
    call: impl FnOnce() -> std::io::Result<T>,
) -> std::io::Result<T> {
    let pending = begin(op);
    let result = call();
    end(pending, result.is_ok());
    result
}

/// `fsync` of the directory `dir`, traced.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    traced(
        || Op::DirSync {
            path: path_string(dir),
        },
        || File::open(dir).and_then(|d| d.sync_all()),
    )
}

/// Removes the file at `path`, traced.
pub fn remove_file(path: &Path) -> std::io::Result<()> {
    std::fs::remove_file(path)?;
    instant(|| Op::Unlink {
        path: path_string(path),
    });
    Ok(())
}

/// Renames `from` to `to`, traced.
pub fn rename(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::rename(from, to)?;
    instant(|| Op::Rename {
        from: path_string(from),
        to: path_string(to),
    });
    Ok(())
}

/// Removes the directory `path` and everything in it, traced.
pub fn remove_dir_all(path: &Path) -> std::io::Result<()> {
    std::fs::remove_dir_all(path)?;
    instant(|| Op::RemoveTree {
        path: path_string(path),
    });
    Ok(())
}

/// Creates `dir` and its missing parents, traced; then makes each new entry durable with an
/// fsync of the directory that holds it (a file's own `fdatasync` does not make the
/// directory it is in durable).
pub fn create_dir_all_durable(dir: &Path) -> std::io::Result<()> {
    let mut missing = Vec::new();
    let mut at = Some(dir);
    while let Some(p) = at {
        if p.as_os_str().is_empty() || p.is_dir() {
            break;
        }
        missing.push(p);
        at = p.parent();
    }
    for p in missing.iter().rev() {
        create_dir_durable(p)?;
    }
    Ok(())
}

/// Creates `dir` (not its parents: their absence is an error), traced, durable with an fsync
/// of its parent; nothing if it exists.
pub fn create_dir_durable(dir: &Path) -> std::io::Result<()> {
    match std::fs::create_dir(dir) {
        Ok(()) => instant(|| Op::Mkdir {
            path: path_string(dir),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(()),
        Err(e) => return Err(e),
    }
    match dir.parent().filter(|q| !q.as_os_str().is_empty()) {
        Some(parent) => sync_dir(parent),
        None => Ok(()),
    }
}

fn put_str(s: &str, out: &mut Vec<u8>) {
    put_bytes(s.as_bytes(), out);
}

fn put_bytes(b: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

fn encode_op(op: &Op, out: &mut Vec<u8>) {
    let fd = |fd: &RawFd, out: &mut Vec<u8>| out.extend_from_slice(&fd.to_le_bytes());
    let u = |v: u64, out: &mut Vec<u8>| out.extend_from_slice(&v.to_le_bytes());
    match op {
        Op::Open {
            fd: f,
            path,
            create,
            truncate,
        } => {
            out.push(1);
            fd(f, out);
            put_str(path, out);
            out.push(u8::from(*create));
            out.push(u8::from(*truncate));
        }
        Op::Write {
            fd: f,
            offset,
            direct,
            data,
        } => {
            out.push(2);
            fd(f, out);
            u(*offset, out);
            out.push(u8::from(*direct));
            match data {
                WriteData::Bytes(b) => {
                    out.push(0);
                    put_bytes(b, out);
                }
                WriteData::Zeros(n) => {
                    out.push(1);
                    u(*n, out);
                }
            }
        }
        Op::Allocate { fd: f, size } => {
            out.push(3);
            fd(f, out);
            u(*size, out);
        }
        Op::Punch { fd: f, offset, len } => {
            out.push(4);
            fd(f, out);
            u(*offset, out);
            u(*len, out);
        }
        Op::Truncate { fd: f, len } => {
            out.push(5);
            fd(f, out);
            u(*len, out);
        }
        Op::Sync { fd: f } => {
            out.push(6);
            fd(f, out);
        }
        Op::DirSync { path } => {
            out.push(7);
            put_str(path, out);
        }
        Op::SyncFs => out.push(8),
        Op::Rename { from, to } => {
            out.push(9);
            put_str(from, out);
            put_str(to, out);
        }
        Op::Unlink { path } => {
            out.push(10);
            put_str(path, out);
        }
        Op::Mkdir { path } => {
            out.push(11);
            put_str(path, out);
        }
        Op::RemoveTree { path } => {
            out.push(12);
            put_str(path, out);
        }
        Op::Acked { dir, first, last } => {
            out.push(13);
            put_str(dir, out);
            u(*first, out);
            u(*last, out);
        }
        Op::Note { text } => {
            out.push(14);
            put_str(text, out);
        }
    }
}

/// Reads a trace back. A torn last event (the process was killed while writing it) ends the
/// trace; anything else malformed is an error.
pub fn read(bytes: &[u8]) -> Result<Vec<Event>, String> {
    let mut r = Reader {
        bytes,
        at: 0,
        truncated: false,
    };
    let mut events = Vec::new();
    while r.at < bytes.len() {
        let start = r.at;
        match r.event() {
            Some(e) => events.push(e),
            None if r.at >= bytes.len() || r.truncated => break,
            None => return Err(format!("malformed trace event at byte {start}")),
        }
    }
    Ok(events)
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
    truncated: bool,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        let Some(end) = self.at.checked_add(n).filter(|&e| e <= self.bytes.len()) else {
            self.truncated = true;
            return None;
        };
        let s = &self.bytes[self.at..end];
        self.at = end;
        Some(s)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    fn u64(&mut self) -> Option<u64> {
        self.take(8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    }

    fn fd(&mut self) -> Option<RawFd> {
        self.take(4)
            .and_then(|b| b.try_into().ok())
            .map(RawFd::from_le_bytes)
    }

    fn bytes(&mut self) -> Option<Vec<u8>> {
        let n = self
            .take(4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_le_bytes)?;
        self.take(n as usize).map(<[u8]>::to_vec)
    }

    fn string(&mut self) -> Option<String> {
        self.bytes().and_then(|b| String::from_utf8(b).ok())
    }

    fn event(&mut self) -> Option<Event> {
        match self.u8()? {
            1 => Some(Event::Begin {
                id: self.u64()?,
                op: self.op()?,
            }),
            2 => Some(Event::End {
                id: self.u64()?,
                ok: self.u8()? == 1,
            }),
            3 => Some(Event::Instant(self.op()?)),
            _ => None,
        }
    }

    fn op(&mut self) -> Option<Op> {
        Some(match self.u8()? {
            1 => Op::Open {
                fd: self.fd()?,
                path: self.string()?,
                create: self.u8()? == 1,
                truncate: self.u8()? == 1,
            },
            2 => Op::Write {
                fd: self.fd()?,
                offset: self.u64()?,
                direct: self.u8()? == 1,
                data: match self.u8()? {
                    0 => WriteData::Bytes(self.bytes()?),
                    1 => WriteData::Zeros(self.u64()?),
                    _ => return None,
                },
            },
            3 => Op::Allocate {
                fd: self.fd()?,
                size: self.u64()?,
            },
            4 => Op::Punch {
                fd: self.fd()?,
                offset: self.u64()?,
                len: self.u64()?,
            },
            5 => Op::Truncate {
                fd: self.fd()?,
                len: self.u64()?,
            },
            6 => Op::Sync { fd: self.fd()? },
            7 => Op::DirSync {
                path: self.string()?,
            },
            8 => Op::SyncFs,
            9 => Op::Rename {
                from: self.string()?,
                to: self.string()?,
            },
            10 => Op::Unlink {
                path: self.string()?,
            },
            11 => Op::Mkdir {
                path: self.string()?,
            },
            12 => Op::RemoveTree {
                path: self.string()?,
            },
            13 => Op::Acked {
                dir: self.string()?,
                first: self.u64()?,
                last: self.u64()?,
            },
            14 => Op::Note {
                text: self.string()?,
            },
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_round_trip_and_a_torn_last_one_ends_the_trace() {
        let ops = vec![
            Op::Open {
                fd: 7,
                path: "/d/a".into(),
                create: true,
                truncate: false,
            },
            Op::Write {
                fd: 7,
                offset: 4096,
                direct: true,
                data: WriteData::of(b"abc"),
            },
            Op::Write {
                fd: 7,
                offset: 0,
                direct: false,
                data: WriteData::of(&[0; 9]),
            },
            Op::Allocate {
                fd: 7,
                size: 1 << 20,
            },
            Op::Punch {
                fd: 7,
                offset: 1,
                len: 2,
            },
            Op::Truncate { fd: 7, len: 3 },
            Op::Sync { fd: 7 },
            Op::DirSync { path: "/d".into() },
            Op::SyncFs,
            Op::Rename {
                from: "/d/a".into(),
                to: "/d/b".into(),
            },
            Op::Unlink {
                path: "/d/b".into(),
            },
            Op::Mkdir {
                path: "/d/c".into(),
            },
            Op::RemoveTree {
                path: "/d/c".into(),
            },
            Op::Acked {
                dir: "/d".into(),
                first: 1,
                last: 2,
            },
            Op::Note {
                text: "group t 0 g 5".into(),
            },
        ];
        let mut bytes = Vec::new();
        let mut events = Vec::new();
        for (i, op) in ops.into_iter().enumerate() {
            let id = i as u64;
            bytes.push(1);
            bytes.extend_from_slice(&id.to_le_bytes());
            encode_op(&op, &mut bytes);
            bytes.push(2);
            bytes.extend_from_slice(&id.to_le_bytes());
            bytes.push(1);
            events.push(Event::Begin { id, op });
            events.push(Event::End { id, ok: true });
        }
        assert_eq!(read(&bytes).expect("read"), events);
        assert_eq!(
            read(&bytes[..bytes.len() - 3]).expect("torn").len(),
            events.len() - 1
        );
        assert!(read(&[9, 9, 9]).is_err());
    }
}
