//! The power-loss simulator: replays a disk trace (see `storage::disk_trace`) to the disk
//! images that a power cut at any point of it could leave, in the spirit of CrashMonkey and
//! ALICE. Tests restart the broker on each image and check what it serves.
//!
//! The rules (the fault model in docs/architecture.md):
//! - A write is durable once an `fdatasync` (or `fsync`) of its file was issued after the
//!   write returned, and returned; or a `syncfs` was, for any file.
//! - An O_DIRECT write that only overwrites blocks whose allocation an `fdatasync` of that
//!   file had already committed (written and synced blocks; a later punch or truncation
//!   uncommits them) is also durable once a flush of the disk's cache (an `fdatasync` of any
//!   file, or a `syncfs`) was issued after it returned, and returned.
//! - An allocation, truncation or hole punch is durable like a write, by its file's sync.
//! - A creation, rename or removal is durable once an `fsync` of the directory that holds it
//!   (both directories for a rename) was issued after it, and returned; or a `syncfs`.
//! - Anything else the history issued before the cut may or may not be on disk: each such
//!   write is kept, dropped or torn at 4 KiB (each block of it kept or not); each other
//!   change is kept or dropped. The choices come from a seeded generator, so that an image
//!   can be made again from its seed.
//!
//! A change that can not apply to the image as it is (a rename of a file whose creation was
//! dropped) is skipped, as the filesystem would never have shown it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::os::fd::RawFd;
use std::path::Path;

use super::disk_trace::{Event, Op, WriteData};

const BLOCK: u64 = 4096;

/// A small deterministic generator (SplitMix64): the same seed makes the same image.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// A coin flip.
    pub fn coin(&mut self) -> bool {
        self.next_u64() & 1 == 1
    }
}

/// A change to one file's bytes or size.
#[derive(Clone, Debug)]
enum Change {
    Write { offset: u64, data: WriteData },
    Allocate(u64),
    Punch { offset: u64, len: u64 },
    Truncate(u64),
}

/// A change to the namespace.
#[derive(Clone, Debug)]
enum NameChange {
    Create { path: String, inode: usize },
    Rename { from: String, to: String },
    Unlink(String),
    Mkdir(String),
    RemoveTree(String),
}

impl NameChange {
    /// The directories whose fsync makes this change durable.
    fn dirs(&self) -> Vec<String> {
        match self {
            Self::Create { path, .. } | Self::Unlink(path) | Self::Mkdir(path) => {
                vec![parent(path)]
            }
            Self::RemoveTree(path) => vec![parent(path)],
            Self::Rename { from, to } => {
                let mut dirs = vec![parent(from), parent(to)];
                dirs.dedup();
                dirs
            }
        }
    }
}

fn parent(path: &str) -> String {
    match path.rfind('/') {
        Some(0) => "/".into(),
        Some(i) => path[..i].into(),
        None => ".".into(),
    }
}

#[derive(Clone, Debug)]
enum Kind {
    Data { inode: usize, change: Change },
    Name(NameChange),
    Sync,
}

/// One operation of the history, with when it began and ended (event indexes).
#[derive(Clone, Debug)]
struct Traced {
    begin: usize,
    end: Option<usize>,
    ok: bool,
    kind: Kind,
    /// The event index of the sync that made it durable: a cut after that event keeps it.
    durable_at: Option<usize>,
}

impl Traced {
    fn durable_before(&self, cut: usize) -> bool {
        self.durable_at.is_some_and(|d| d < cut)
    }
}

/// Records `first..=last` of the partition in `dir` were acknowledged at event `at`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ack {
    /// The event index: a cut at any point after it must keep them.
    pub at: usize,
    /// The partition's directory, as traced.
    pub dir: String,
    /// First offset.
    pub first: u64,
    /// Last offset.
    pub last: u64,
}

/// A trace analysed for replay: every operation with the moment it became durable.
pub struct History {
    ops: Vec<Traced>,
    events: usize,
    acks: Vec<Ack>,
    notes: Vec<(usize, String)>,
    inodes: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Entry {
    Dir,
    File(usize),
}

/// Per-file bookkeeping during the analysis.
#[derive(Default)]
struct FileState {
    /// Blocks written and committed by an `fdatasync` of this file.
    committed: BTreeSet<u64>,
    /// Ended, successful changes of this file not yet durable by its own sync.
    unsynced: Vec<usize>,
}

fn blocks(offset: u64, len: u64) -> std::ops::Range<u64> {
    offset / BLOCK..(offset + len).div_ceil(BLOCK)
}

impl History {
    /// Analyses `events` (a whole trace, in order).
    pub fn new(events: &[Event]) -> Result<Self, String> {
        let mut ops: Vec<Traced> = Vec::new();
        let mut acks = Vec::new();
        let mut notes = Vec::new();
        let mut live: BTreeMap<String, Entry> = BTreeMap::new();
        let mut fds: HashMap<RawFd, usize> = HashMap::new();
        let mut files: Vec<FileState> = Vec::new();
        let mut in_flight: HashMap<u64, usize> = HashMap::new();
        // Per in-flight sync: the operations it makes durable when it returns.
        let mut covers: HashMap<usize, Vec<usize>> = HashMap::new();
        // O_DIRECT overwrites of committed blocks that ended, not yet durable.
        let mut shared: Vec<usize> = Vec::new();
        // Name changes not yet durable.
        let mut names: Vec<usize> = Vec::new();
        // Writes that began as overwrites of committed blocks.
        let mut overwrites: BTreeSet<usize> = BTreeSet::new();

        for (i, event) in events.iter().enumerate() {
            match event {
                Event::Begin { id, op } => {
                    let kind = match op {
                        Op::Write {
                            fd,
                            offset,
                            data,
                            direct,
                        } => {
                            let inode =
                                *fds.get(fd).ok_or(format!("event {i}: unknown fd {fd}"))?;
                            let len = data.len();
                            let idx = ops.len();
                            if *direct
                                && len > 0
                                && offset % BLOCK == 0
                                && len % BLOCK == 0
                                && blocks(*offset, len).all(|b| files[inode].committed.contains(&b))
                            {
                                overwrites.insert(idx);
                            }
                            Kind::Data {
                                inode,
                                change: Change::Write {
                                    offset: *offset,
                                    data: data.clone(),
                                },
                            }
                        }
                        Op::Allocate { fd, size } => Kind::Data {
                            inode: *fds.get(fd).ok_or(format!("event {i}: unknown fd {fd}"))?,
                            change: Change::Allocate(*size),
                        },
                        Op::Punch { fd, offset, len } => {
                            let inode =
                                *fds.get(fd).ok_or(format!("event {i}: unknown fd {fd}"))?;
                            // Punched blocks are unwritten again: overwrites need a sync.
                            for b in blocks(*offset, *len) {
                                files[inode].committed.remove(&b);
                            }
                            Kind::Data {
                                inode,
                                change: Change::Punch {
                                    offset: *offset,
                                    len: *len,
                                },
                            }
                        }
                        Op::Truncate { fd, len } => {
                            let inode =
                                *fds.get(fd).ok_or(format!("event {i}: unknown fd {fd}"))?;
                            let keep = len.div_ceil(BLOCK);
                            files[inode].committed.retain(|&b| b < keep);
                            Kind::Data {
                                inode,
                                change: Change::Truncate(*len),
                            }
                        }
                        Op::Sync { fd } => {
                            let inode =
                                *fds.get(fd).ok_or(format!("event {i}: unknown fd {fd}"))?;
                            let mut covered = files[inode].unsynced.clone();
                            covered.extend(shared.iter().copied());
                            covers.insert(ops.len(), covered);
                            Kind::Sync
                        }
                        Op::DirSync { path } => {
                            let covered = names
                                .iter()
                                .copied()
                                .filter(|&n| match &ops[n].kind {
                                    Kind::Name(c) => c.dirs().iter().any(|d| d == path),
                                    _ => false,
                                })
                                .collect();
                            covers.insert(ops.len(), covered);
                            Kind::Sync
                        }
                        Op::SyncFs => {
                            let mut covered: Vec<usize> = files
                                .iter()
                                .flat_map(|f| f.unsynced.iter().copied())
                                .collect();
                            covered.extend(shared.iter().copied());
                            covered.extend(names.iter().copied());
                            covers.insert(ops.len(), covered);
                            Kind::Sync
                        }
                        other => return Err(format!("event {i}: {other:?} can not begin")),
                    };
                    in_flight.insert(*id, ops.len());
                    ops.push(Traced {
                        begin: i,
                        end: None,
                        ok: false,
                        kind,
                        durable_at: None,
                    });
                }
                Event::End { id, ok } => {
                    let Some(idx) = in_flight.remove(id) else {
                        return Err(format!("event {i}: end of unknown operation {id}"));
                    };
                    ops[idx].end = Some(i);
                    ops[idx].ok = *ok;
                    match ops[idx].kind.clone() {
                        Kind::Data { inode, .. } if *ok => {
                            files[inode].unsynced.push(idx);
                            if overwrites.contains(&idx) {
                                shared.push(idx);
                            }
                        }
                        Kind::Sync if *ok => {
                            for c in covers.remove(&idx).unwrap_or_default() {
                                let op = &mut ops[c];
                                if op.durable_at.is_none() {
                                    op.durable_at = Some(i);
                                }
                                if let Kind::Data { inode, change } = &op.kind {
                                    let inode = *inode;
                                    let own = files[inode].unsynced.contains(&c);
                                    if let (true, Change::Write { offset, data }) = (own, change) {
                                        // Blocks fully written by it are committed now.
                                        let (start, end) = (*offset, offset + data.len());
                                        for b in blocks(start, data.len()) {
                                            if b * BLOCK >= start && (b + 1) * BLOCK <= end {
                                                files[inode].committed.insert(b);
                                            }
                                        }
                                    }
                                }
                            }
                            Self::forget_durable(&ops, &mut files, &mut shared, &mut names);
                        }
                        _ => {
                            covers.remove(&idx);
                        }
                    }
                }
                Event::Instant(op) => match op {
                    Op::Open {
                        fd,
                        path,
                        create,
                        truncate,
                    } => {
                        let inode = match live.get(path) {
                            Some(Entry::File(inode)) => *inode,
                            Some(Entry::Dir) => {
                                return Err(format!("event {i}: {path} is a directory"))
                            }
                            None if *create => {
                                let inode = files.len();
                                files.push(FileState::default());
                                live.insert(path.clone(), Entry::File(inode));
                                names.push(ops.len());
                                ops.push(Self::instant_op(
                                    i,
                                    Kind::Name(NameChange::Create {
                                        path: path.clone(),
                                        inode,
                                    }),
                                ));
                                inode
                            }
                            None => {
                                return Err(format!("event {i}: {path} opened but never created"))
                            }
                        };
                        fds.insert(*fd, inode);
                        if *truncate {
                            files[inode].committed.clear();
                            files[inode].unsynced.push(ops.len());
                            ops.push(Self::instant_op(
                                i,
                                Kind::Data {
                                    inode,
                                    change: Change::Truncate(0),
                                },
                            ));
                        }
                    }
                    Op::Rename { from, to } => {
                        let moved: Vec<(String, Entry)> = live
                            .iter()
                            .filter(|(p, _)| *p == from || p.starts_with(&format!("{from}/")))
                            .map(|(p, e)| (p.clone(), *e))
                            .collect();
                        live.retain(|p, _| !(p == to || p.starts_with(&format!("{to}/"))));
                        for (p, e) in moved {
                            live.remove(&p);
                            live.insert(format!("{to}{}", &p[from.len()..]), e);
                        }
                        names.push(ops.len());
                        ops.push(Self::instant_op(
                            i,
                            Kind::Name(NameChange::Rename {
                                from: from.clone(),
                                to: to.clone(),
                            }),
                        ));
                    }
                    Op::Unlink { path } => {
                        live.remove(path);
                        names.push(ops.len());
                        ops.push(Self::instant_op(
                            i,
                            Kind::Name(NameChange::Unlink(path.clone())),
                        ));
                    }
                    Op::Mkdir { path } => {
                        live.insert(path.clone(), Entry::Dir);
                        names.push(ops.len());
                        ops.push(Self::instant_op(
                            i,
                            Kind::Name(NameChange::Mkdir(path.clone())),
                        ));
                    }
                    Op::RemoveTree { path } => {
                        live.retain(|p, _| !(p == path || p.starts_with(&format!("{path}/"))));
                        names.push(ops.len());
                        ops.push(Self::instant_op(
                            i,
                            Kind::Name(NameChange::RemoveTree(path.clone())),
                        ));
                    }
                    Op::Acked { dir, first, last } => acks.push(Ack {
                        at: i,
                        dir: dir.clone(),
                        first: *first,
                        last: *last,
                    }),
                    Op::Note { text } => notes.push((i, text.clone())),
                    other => return Err(format!("event {i}: {other:?} is not instant")),
                },
            }
        }
        Ok(Self {
            ops,
            events: events.len(),
            acks,
            notes,
            inodes: files.len(),
        })
    }

    fn instant_op(at: usize, kind: Kind) -> Traced {
        Traced {
            begin: at,
            end: Some(at),
            ok: true,
            kind,
            durable_at: None,
        }
    }

    fn forget_durable(
        ops: &[Traced],
        files: &mut [FileState],
        shared: &mut Vec<usize>,
        names: &mut Vec<usize>,
    ) {
        for f in files.iter_mut() {
            f.unsynced.retain(|&c| ops[c].durable_at.is_none());
        }
        shared.retain(|&c| ops[c].durable_at.is_none());
        names.retain(|&c| ops[c].durable_at.is_none());
    }

    /// The number of events: a cut is any point `0..=events()` (the cut at `n` keeps the
    /// first `n` events' effects as the rules allow).
    pub fn events(&self) -> usize {
        self.events
    }

    /// Every acknowledgement of the history, in order.
    pub fn acks(&self) -> &[Ack] {
        &self.acks
    }

    /// Every note of the history (see `disk_trace::Op::Note`) with its event index: a cut
    /// after it must keep what it says.
    pub fn notes(&self) -> &[(usize, String)] {
        &self.notes
    }

    /// How many operations of each kind the history holds (`write`, `sync`, `rename`...),
    /// to show what a run exercised.
    pub fn summary(&self) -> BTreeMap<&'static str, usize> {
        let mut counts = BTreeMap::new();
        for op in &self.ops {
            let kind = match &op.kind {
                Kind::Data { change, .. } => match change {
                    Change::Write { .. } => "write",
                    Change::Allocate(_) => "allocate",
                    Change::Punch { .. } => "punch",
                    Change::Truncate(_) => "truncate",
                },
                Kind::Name(change) => match change {
                    NameChange::Create { .. } => "create",
                    NameChange::Rename { .. } => "rename",
                    NameChange::Unlink(_) => "unlink",
                    NameChange::Mkdir(_) => "mkdir",
                    NameChange::RemoveTree(_) => "remove-tree",
                },
                Kind::Sync => "sync",
            };
            *counts.entry(kind).or_insert(0) += 1;
        }
        counts.insert("ack", self.acks.len());
        counts.insert("note", self.notes.len());
        counts
    }

    /// Every path a file was created at or renamed to, over the whole history.
    pub fn named_paths(&self) -> Vec<String> {
        self.ops
            .iter()
            .filter_map(|o| match &o.kind {
                Kind::Name(NameChange::Create { path, .. }) => Some(path.clone()),
                Kind::Name(NameChange::Rename { to, .. }) => Some(to.clone()),
                _ => None,
            })
            .collect()
    }

    /// The paths of the files removed by the first `cut` events.
    pub fn removed_before(&self, cut: usize) -> Vec<String> {
        self.ops
            .iter()
            .filter(|o| o.begin < cut)
            .filter_map(|o| match &o.kind {
                Kind::Name(NameChange::Unlink(path)) => Some(path.clone()),
                _ => None,
            })
            .collect()
    }

    /// The event indexes right after each sync returned and right after each
    /// acknowledgement: the cuts most likely to find a missing sync.
    pub fn interesting_cuts(&self) -> Vec<usize> {
        let mut cuts: BTreeSet<usize> = self.acks.iter().map(|a| a.at + 1).collect();
        for op in &self.ops {
            if let (Kind::Sync, Some(end)) = (&op.kind, op.end) {
                cuts.insert(end);
                cuts.insert(end + 1);
            }
        }
        cuts.into_iter().filter(|&c| c <= self.events).collect()
    }

    /// The files and directories a power cut after the first `cut` events could leave, with
    /// `rng` choosing what the rules leave open. Paths are those of the trace.
    pub fn image(&self, cut: usize, root: &str, rng: &mut Rng) -> Image {
        let mut names: BTreeMap<String, Entry> = BTreeMap::new();
        names.insert(root.to_string(), Entry::Dir);
        for op in self.ops.iter().filter(|o| o.begin < cut) {
            let Kind::Name(change) = &op.kind else {
                continue;
            };
            if !op.durable_before(cut) && !rng.coin() {
                continue;
            }
            apply_name(&mut names, change);
        }
        let mut contents: Vec<Option<Vec<u8>>> = vec![None; self.inodes];
        for entry in names.values() {
            if let Entry::File(inode) = entry {
                contents[*inode] = Some(Vec::new());
            }
        }
        for op in self.ops.iter().filter(|o| o.begin < cut) {
            let Kind::Data { inode, change } = &op.kind else {
                continue;
            };
            let Some(bytes) = contents[*inode].as_mut() else {
                continue;
            };
            if op.durable_before(cut) {
                apply_change(bytes, change, None);
                continue;
            }
            match (change, rng.below(3)) {
                (_, 0) => {}
                (Change::Write { .. }, 1) => apply_change(bytes, change, Some(rng)),
                _ => apply_change(bytes, change, None),
            }
        }
        let mut image = Image::default();
        for (path, entry) in names {
            match entry {
                Entry::Dir => image.dirs.push(path),
                Entry::File(inode) => {
                    let bytes = contents[inode].take().unwrap_or_default();
                    image.files.push((path, bytes));
                }
            }
        }
        image
    }
}

fn apply_name(names: &mut BTreeMap<String, Entry>, change: &NameChange) {
    let has_dir = |names: &BTreeMap<String, Entry>, p: &str| names.get(p) == Some(&Entry::Dir);
    let under = |p: &str, dir: &str| p == dir || p.starts_with(&format!("{dir}/"));
    match change {
        NameChange::Create { path, inode } => {
            if has_dir(names, &parent(path)) && !names.contains_key(path) {
                names.insert(path.clone(), Entry::File(*inode));
            }
        }
        NameChange::Mkdir(path) => {
            if has_dir(names, &parent(path)) && !names.contains_key(path) {
                names.insert(path.clone(), Entry::Dir);
            }
        }
        NameChange::Unlink(path) => {
            if matches!(names.get(path), Some(Entry::File(_))) {
                names.remove(path);
            }
        }
        NameChange::RemoveTree(path) => names.retain(|p, _| !under(p, path)),
        NameChange::Rename { from, to } => {
            if !names.contains_key(from) || !has_dir(names, &parent(to)) {
                return;
            }
            let moved: Vec<(String, Entry)> = names
                .iter()
                .filter(|(p, _)| under(p, from))
                .map(|(p, e)| (p.clone(), *e))
                .collect();
            names.retain(|p, _| !under(p, to) && !under(p, from));
            for (p, e) in moved {
                names.insert(format!("{to}{}", &p[from.len()..]), e);
            }
        }
    }
}

/// Applies `change` to a file's bytes; a write with `tear` set keeps each 4 KiB block of it
/// or not, by coin flips.
fn apply_change(bytes: &mut Vec<u8>, change: &Change, mut tear: Option<&mut Rng>) {
    match change {
        Change::Write { offset, data } => {
            let (start, end) = (*offset as usize, (*offset + data.len()) as usize);
            let mut block_start = start;
            while block_start < end {
                let block_end = ((block_start as u64 / BLOCK + 1) * BLOCK) as usize;
                let block_end = block_end.min(end);
                let keep = tear.as_deref_mut().is_none_or(Rng::coin);
                if keep {
                    if bytes.len() < block_end {
                        bytes.resize(block_end, 0);
                    }
                    let piece = &mut bytes[block_start..block_end];
                    match data {
                        WriteData::Bytes(b) => {
                            piece.copy_from_slice(&b[block_start - start..block_end - start])
                        }
                        WriteData::Zeros(_) => piece.fill(0),
                    }
                }
                block_start = block_end;
            }
        }
        Change::Allocate(size) => {
            if (bytes.len() as u64) < *size {
                bytes.resize(*size as usize, 0);
            }
        }
        Change::Punch { offset, len } => {
            let start = (*offset as usize).min(bytes.len());
            let end = ((offset + len) as usize).min(bytes.len());
            bytes[start..end].fill(0);
        }
        Change::Truncate(len) => bytes.resize(*len as usize, 0),
    }
}

/// The directories and files of one crash image, by their traced paths.
#[derive(Debug, Default)]
pub struct Image {
    /// Directories, parents first.
    pub dirs: Vec<String>,
    /// Files and their bytes.
    pub files: Vec<(String, Vec<u8>)>,
}

impl Image {
    /// Writes the image under `to`, in place of the traced `root`.
    pub fn write(&self, root: &str, to: &Path) -> std::io::Result<()> {
        let place = |p: &str| to.join(p.strip_prefix(root).unwrap_or(p).trim_start_matches('/'));
        std::fs::create_dir_all(to)?;
        for dir in &self.dirs {
            std::fs::create_dir_all(place(dir))?;
        }
        for (path, bytes) in &self.files {
            std::fs::write(place(path), bytes)?;
        }
        Ok(())
    }

    /// The bytes of the file at `path`, if the image has it.
    pub fn file(&self, path: &str) -> Option<&[u8]> {
        self.files
            .iter()
            .find(|(p, _)| p == path)
            .map(|(_, b)| b.as_slice())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn begin(id: u64, op: Op) -> Event {
        Event::Begin { id, op }
    }

    fn end(id: u64) -> Event {
        Event::End { id, ok: true }
    }

    fn open(fd: RawFd, path: &str) -> Event {
        Event::Instant(Op::Open {
            fd,
            path: path.into(),
            create: true,
            truncate: false,
        })
    }

    fn write(fd: RawFd, offset: u64, byte: u8, len: usize) -> Op {
        Op::Write {
            fd,
            offset,
            direct: true,
            data: WriteData::of(&vec![byte; len]),
        }
    }

    /// Every image of every cut, over many seeds, for one file's contents.
    fn all_images(history: &History, path: &str, cut: usize) -> Vec<Option<Vec<u8>>> {
        (0..64)
            .map(|seed| {
                let image = history.image(cut, "/d", &mut Rng::new(seed));
                image.file(path).map(<[u8]>::to_vec)
            })
            .collect()
    }

    #[test]
    fn a_write_survives_only_once_its_files_sync_and_the_directory_sync_returned() {
        let events = vec![
            open(3, "/d/a"),                             // 0
            begin(1, write(3, 0, 7, 4096)),              // 1
            end(1),                                      // 2
            begin(2, Op::Sync { fd: 3 }),                // 3
            end(2),                                      // 4
            begin(3, Op::DirSync { path: "/d".into() }), // 5
            end(3),                                      // 6
        ];
        let h = History::new(&events).expect("history");
        // Before the sync returned: anything (the file may even be missing).
        let early = all_images(&h, "/d/a", 4);
        assert!(early.iter().any(|f| f.is_none()));
        assert!(early.iter().any(|f| f.as_deref() == Some(&[][..])));
        // After both: always there, whole.
        for f in all_images(&h, "/d/a", 7) {
            assert_eq!(f, Some(vec![7; 4096]));
        }
    }

    #[test]
    fn overwrites_of_committed_blocks_need_a_later_flush_of_any_file() {
        let events = vec![
            open(3, "/d/a"),
            open(4, "/d/b"),
            begin(9, Op::DirSync { path: "/d".into() }),
            end(9),
            begin(1, write(3, 0, 0, 8192)), // zero-fill: 4
            end(1),
            begin(2, Op::Sync { fd: 3 }), // commits blocks 0 and 1
            end(2),
            begin(3, write(3, 4096, 5, 4096)), // 8: an overwrite
            end(3),
            begin(4, Op::Sync { fd: 4 }), // 10: a flush through another file
            end(4),
            begin(5, write(3, 8192, 6, 4096)), // 12: past the committed blocks
            end(5),
            begin(6, Op::Sync { fd: 4 }), // 14
            end(6),
        ];
        let h = History::new(&events).expect("history");
        let before_flush = all_images(&h, "/d/a", 11);
        assert!(before_flush
            .iter()
            .any(|f| f.as_ref().is_some_and(|b| b[4096] == 0)));
        for f in all_images(&h, "/d/a", 12) {
            let f = f.expect("file");
            assert_eq!(f[4096], 5, "the overwrite is durable after the flush");
        }
        let appended = all_images(&h, "/d/a", 16);
        assert!(
            appended
                .iter()
                .any(|f| f.as_ref().is_some_and(|b| b.len() == 8192)),
            "a write past the committed blocks needs its own file's sync"
        );
    }

    #[test]
    fn tears_are_at_4_kib_and_renames_wait_for_the_directory() {
        let events = vec![
            open(3, "/d/a.tmp"),
            begin(1, write(3, 0, 1, 3 * 4096)),
            end(1),
            Event::Instant(Op::Rename {
                from: "/d/a.tmp".into(),
                to: "/d/a".into(),
            }),
        ];
        let h = History::new(&events).expect("history");
        let mut torn = false;
        for seed in 0..200 {
            let image = h.image(4, "/d", &mut Rng::new(seed));
            assert!(image.file("/d/a").is_none() || image.file("/d/a.tmp").is_none());
            for (_, bytes) in &image.files {
                for block in bytes.chunks(4096) {
                    assert!(block.iter().all(|&b| b == block[0]), "a block is whole");
                }
                torn |= bytes.len() == 3 * 4096 && bytes[4096] == 0 && bytes[0] == 1;
            }
        }
        assert!(torn, "some image tears the write");
    }
}
