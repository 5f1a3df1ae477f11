//! One segment of a partition log: a preallocated direct-I/O file `<base-offset>.log` with
//! its sparse offset index (`.index`) and time index (`.timeindex`).
//!
//! Index files are append-only arrays of fixed entries, written behind the log (they may lag
//! it after a crash, never lead it: recovery checks every entry against the log). Offset
//! index entry: `u32 offset - base, u32 position`. Time index entry: `i64 max timestamp so
//! far (ms), u32 offset - base`.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use glommio::io::DmaFile;

use super::disk_trace::{self, Op, WriteData};
use super::extent::Extent;
use super::{dma, StorageError};

const INDEX_ENTRY: usize = 8;
const TIME_ENTRY: usize = 12;

/// The file name of the segment starting at `base` with extension `ext`.
pub fn file_name(base: u64, ext: &str) -> String {
    format!("{base:020}.{ext}")
}

/// Base offsets of the segments in `dir`, ascending.
pub fn list(dir: &Path) -> Result<Vec<u64>, StorageError> {
    let entries = std::fs::read_dir(dir)
        .map_err(|e| StorageError::io(format!("listing {}", dir.display()), &e))?;
    let mut bases: Vec<u64> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.strip_suffix(".log").and_then(|b| b.parse().ok())
        })
        .collect();
    bases.sort_unstable();
    Ok(bases)
}

/// A segment's state, owned by its partition log.
pub struct Segment {
    /// Offset of the first record the segment holds.
    pub base_offset: u64,
    /// The open file; readers clone the `Rc` so that retention can drop the segment safely.
    pub file: Rc<DmaFile>,
    /// Directory of the partition.
    dir: PathBuf,
    /// Bytes of whole, valid batches.
    pub end: u64,
    /// Offset after the last record in the segment.
    pub next_offset: u64,
    /// How far the file is allocated, written and committed (see `storage::extent`).
    pub extent: Extent,
    /// Sparse offset index: (offset, position), ascending.
    pub index: Vec<(u64, u64)>,
    /// Time index: (largest timestamp so far, offset), ascending.
    pub time_index: Vec<(i64, u64)>,
    /// Entries of each index already on disk.
    index_on_disk: usize,
    time_index_on_disk: usize,
    /// Largest record timestamp in the segment, each batch's bounded by its append time
    /// (retention by age; see `BatchHeader::retention_timestamp_ms`).
    pub max_timestamp_ms: i64,
    /// Broker time of the first append (rolling by age); `None` while empty.
    pub first_append_ms: Option<i64>,
    /// Position of the last index entry, to space entries by `index_interval_bytes`.
    last_indexed_pos: Option<u64>,
}

impl Segment {
    /// Path of this segment's file with extension `ext`.
    pub fn path(&self, ext: &str) -> PathBuf {
        self.dir.join(file_name(self.base_offset, ext))
    }

    /// Opens an existing segment file (its state is filled in by recovery).
    pub async fn open(dir: &Path, base_offset: u64) -> Result<Self, StorageError> {
        let path = dir.join(file_name(base_offset, "log"));
        let file = dma::open_rw(&path).await?;
        let allocated = file
            .file_size()
            .await
            .map_err(|e| StorageError::glommio(format!("stat of {}", path.display()), e))?;
        Ok(Self::new(dir, base_offset, file, allocated))
    }

    /// Creates a new, empty segment preallocated to `bytes`, durable with its directory.
    pub async fn create(dir: &Path, base_offset: u64, bytes: u64) -> Result<Self, StorageError> {
        let path = dir.join(file_name(base_offset, "log"));
        let file = dma::open_rw(&path).await?;
        let bytes = dma::align_up(bytes.max(dma::ALIGN));
        if let Err(e) = dma::pre_allocate(&file, bytes).await {
            let err = StorageError::glommio(
                format!("preallocating {bytes} bytes for {}", path.display()),
                e,
            );
            let _ = file.close().await;
            let _ = disk_trace::remove_file(&path);
            return Err(err);
        }
        if let Err(e) = sync_dir(dir).await {
            // Not a segment: a stray file here would claim offsets the active one still holds.
            let _ = file.close().await;
            let _ = disk_trace::remove_file(&path);
            return Err(e);
        }
        Ok(Self::new(dir, base_offset, file, bytes))
    }

    /// Makes the partition's spare (see `storage::spare`), whose first `prepared` bytes are
    /// allocated, zero-filled and synced, the segment starting at `base_offset`: renamed,
    /// durable with its directory.
    pub async fn adopt_spare(
        dir: &Path,
        base_offset: u64,
        file: DmaFile,
        prepared: u64,
    ) -> Result<Self, (DmaFile, StorageError)> {
        let from = dir.join(super::spare::SPARE_FILE);
        let to = dir.join(file_name(base_offset, "log"));
        let (from_owned, to_owned, dir_owned) = (from.clone(), to.clone(), dir.to_path_buf());
        let renamed = glommio::executor()
            .spawn_blocking(move || {
                disk_trace::rename(&from_owned, &to_owned)?;
                sync_dir_blocking(&dir_owned)
            })
            .await;
        if let Err(e) = renamed {
            let context = format!("renaming {} to {}", from.display(), to.display());
            return Err((file, StorageError::io(context, &e)));
        }
        let mut segment = Self::new(dir, base_offset, file, prepared);
        segment.extent = Extent::prepared(prepared);
        Ok(segment)
    }

    fn new(dir: &Path, base_offset: u64, file: DmaFile, allocated: u64) -> Self {
        Self {
            base_offset,
            file: Rc::new(file),
            dir: dir.to_path_buf(),
            end: 0,
            next_offset: base_offset,
            extent: Extent::allocated_only(allocated),
            index: Vec::new(),
            time_index: Vec::new(),
            index_on_disk: 0,
            time_index_on_disk: 0,
            max_timestamp_ms: i64::MIN,
            first_append_ms: None,
            last_indexed_pos: None,
        }
    }

    /// Notes a batch stored at `pos`: advances the end and adds index entries when due.
    pub fn record_batch(
        &mut self,
        pos: u64,
        len: u64,
        base: u64,
        last: u64,
        max_ts: i64,
        interval: u64,
    ) {
        let due = self
            .last_indexed_pos
            .is_none_or(|last_pos| pos >= last_pos + interval);
        if due {
            self.index.push((base, pos));
            self.last_indexed_pos = Some(pos);
        }
        if max_ts > self.max_timestamp_ms {
            self.max_timestamp_ms = max_ts;
            if due || self.time_index.is_empty() {
                self.time_index.push((max_ts, base));
            }
        }
        self.end = pos + len;
        self.next_offset = last + 1;
    }

    /// Forces an index entry at `pos` (after a corrupt range, so readers can jump past it).
    pub fn force_index(&mut self, offset: u64, pos: u64) {
        self.index.push((offset, pos));
        self.last_indexed_pos = Some(pos);
    }

    /// Makes the next batch recorded get an index entry (after unreadable bytes that the log
    /// now ends past, so that readers can reach that batch without walking through them).
    pub fn index_next_batch(&mut self) {
        self.last_indexed_pos = None;
    }

    /// Index entries from the index files, checked for order and bounds (entries past
    /// `limit` bytes are dropped). Recovery checks the last one against the log.
    pub fn load_index(&mut self, limit: u64) {
        let base = self.base_offset;
        let index = std::fs::read(self.path("index")).unwrap_or_default();
        let mut entries: Vec<(u64, u64)> = index
            .chunks_exact(INDEX_ENTRY)
            .map(|e| {
                let rel = u32::from_le_bytes([e[0], e[1], e[2], e[3]]);
                let pos = u32::from_le_bytes([e[4], e[5], e[6], e[7]]);
                (base + u64::from(rel), u64::from(pos))
            })
            .collect();
        let ordered = entries
            .windows(2)
            .all(|w| w[0].0 < w[1].0 && w[0].1 < w[1].1);
        if !ordered {
            entries.clear();
        }
        entries.retain(|&(_, pos)| pos < limit);
        self.index_on_disk = entries.len();
        self.last_indexed_pos = entries.last().map(|&(_, p)| p);
        self.index = entries;
        let times = std::fs::read(self.path("timeindex")).unwrap_or_default();
        let mut time_entries: Vec<(i64, u64)> = times
            .chunks_exact(TIME_ENTRY)
            .map(|e| {
                let mut ts = [0u8; 8];
                ts.copy_from_slice(&e[..8]);
                let rel = u32::from_le_bytes([e[8], e[9], e[10], e[11]]);
                (i64::from_le_bytes(ts), base + u64::from(rel))
            })
            .collect();
        if !time_entries
            .windows(2)
            .all(|w| w[0].0 <= w[1].0 && w[0].1 <= w[1].1)
        {
            time_entries.clear();
        }
        self.time_index_on_disk = time_entries.len();
        self.time_index = time_entries;
    }

    /// Drops index entries at or past `pos` (after a torn tail was cut), and rewrites the
    /// index files if they held any.
    pub fn truncate_index(&mut self, pos: u64) {
        let before = self.index.len();
        self.index.retain(|&(_, p)| p < pos);
        let cut_offset = self.index.last().map_or(self.base_offset, |&(o, _)| o);
        self.time_index.retain(|&(_, o)| o <= cut_offset);
        self.last_indexed_pos = self.index.last().map(|&(_, p)| p);
        if self.index.len() != before {
            self.index_on_disk = 0;
            self.time_index_on_disk = 0;
            let _ = disk_trace::remove_file(&self.path("index"));
            let _ = disk_trace::remove_file(&self.path("timeindex"));
        }
    }

    /// The index files were removed: every entry is written again with the next append.
    pub fn forget_index_files(&mut self) {
        self.index_on_disk = 0;
        self.time_index_on_disk = 0;
    }

    /// The index entries not yet on disk, as bytes to append, marking them written.
    pub fn take_unwritten_index(&mut self) -> IndexAppend {
        let base = self.base_offset;
        let mut index = Vec::new();
        for &(offset, pos) in &self.index[self.index_on_disk..] {
            index.extend_from_slice(&((offset - base) as u32).to_le_bytes());
            index.extend_from_slice(&(pos as u32).to_le_bytes());
        }
        let mut time = Vec::new();
        for &(ts, offset) in &self.time_index[self.time_index_on_disk..] {
            time.extend_from_slice(&ts.to_le_bytes());
            time.extend_from_slice(&((offset - base) as u32).to_le_bytes());
        }
        self.index_on_disk = self.index.len();
        self.time_index_on_disk = self.time_index.len();
        IndexAppend {
            index_path: self.path("index"),
            time_path: self.path("timeindex"),
            index,
            time,
        }
    }

    /// The index position to start reading `offset` from.
    pub fn position_for(&self, offset: u64) -> u64 {
        self.entry_for(offset).1
    }

    /// The index entry to start reading `offset` from: (offset of the batch there, position);
    /// the segment's start when no entry comes before `offset`.
    pub fn entry_for(&self, offset: u64) -> (u64, u64) {
        let i = self.index.partition_point(|&(o, _)| o <= offset);
        if i == 0 {
            (self.base_offset, 0)
        } else {
            self.index[i - 1]
        }
    }

    /// The first offset whose batch has a timestamp at or after `ts` (by the time index).
    pub fn offset_for_time(&self, ts: i64) -> Option<u64> {
        let i = self.time_index.partition_point(|&(t, _)| t < ts);
        self.time_index.get(i).map(|&(_, o)| o)
    }
}

/// Index bytes to append to a segment's index files, off the executor.
pub struct IndexAppend {
    index_path: PathBuf,
    time_path: PathBuf,
    index: Vec<u8>,
    time: Vec<u8>,
}

impl IndexAppend {
    /// True when there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty() && self.time.is_empty()
    }

    /// Appends the entries (blocking I/O); with `sync`, makes them durable.
    pub fn write(&self, sync: bool) -> std::io::Result<()> {
        for (path, bytes) in [
            (&self.index_path, &self.index),
            (&self.time_path, &self.time),
        ] {
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)?;
            dma::traced_open(&f, path, true);
            let at = f.metadata()?.len();
            let fd = f.as_raw_fd();
            disk_trace::traced(
                || Op::Write {
                    fd,
                    offset: at,
                    direct: false,
                    data: WriteData::of(bytes),
                },
                || f.write_all(bytes),
            )?;
            if sync {
                disk_trace::traced(|| Op::Sync { fd }, || f.sync_data())?;
            }
        }
        Ok(())
    }
}

/// Makes the entries of `dir` (new or removed files) durable.
pub async fn sync_dir(dir: &Path) -> Result<(), StorageError> {
    let owned = dir.to_path_buf();
    glommio::executor()
        .spawn_blocking(move || sync_dir_blocking(&owned))
        .await
        .map_err(|e| StorageError::io(format!("fsync of directory {}", dir.display()), &e))
}

use super::atomic_file::sync_dir as sync_dir_blocking;
