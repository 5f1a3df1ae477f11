//! Our one doorway to glommio's direct-I/O files: open, aligned chunked writes, ranged reads.
//!
//! Workarounds for glommio 0.9 live here:
//! - glommio issue #633: one DMA request larger than the device's `max_sectors_kb` hung
//!   processes on some kernels, so every read and write is cut into pieces of at most
//!   `max_io_bytes` (4 MiB by default, or the device's limit if smaller).
//! - A device's first DmaFile must not be empty (see `superblock`).

use std::os::fd::AsRawFd;
use std::path::Path;

use futures::future::try_join_all;
use glommio::io::{DmaBuffer, DmaFile, OpenOptions};

use super::disk_trace::{self, Op, WriteData};
use super::StorageError;

/// Alignment for O_DIRECT positions and sizes. 4 KiB covers every disk we support.
pub const ALIGN: u64 = 4096;

/// Rounds `v` down to a multiple of [`ALIGN`].
pub fn align_down(v: u64) -> u64 {
    v & !(ALIGN - 1)
}

/// Rounds `v` up to a multiple of [`ALIGN`].
pub fn align_up(v: u64) -> u64 {
    (v + ALIGN - 1) & !(ALIGN - 1)
}

/// Opens (creating if needed) a file for direct-I/O reads and writes.
pub async fn open_rw(path: &Path) -> Result<DmaFile, StorageError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .dma_open(path)
        .await
        .map_err(|e| StorageError::glommio(format!("opening {}", path.display()), e))?;
    traced_open(&file, path, true);
    Ok(file)
}

/// Records (in the disk trace) that `file` was opened at `path` for writing or syncing.
pub fn traced_open(file: &impl AsRawFd, path: &Path, create: bool) {
    disk_trace::instant(|| Op::Open {
        fd: file.as_raw_fd(),
        path: disk_trace::path_string(path),
        create,
        truncate: false,
    });
}

/// `fdatasync` of `file`.
pub async fn fdatasync(file: &DmaFile) -> Result<(), glommio::GlommioError<()>> {
    let pending = disk_trace::begin(|| Op::Sync {
        fd: file.as_raw_fd(),
    });
    let result = file.fdatasync().await;
    disk_trace::end(pending, result.is_ok());
    result
}

/// Allocates `file` up to `size` bytes (its size grows to `size` if smaller).
pub async fn pre_allocate(file: &DmaFile, size: u64) -> Result<(), glommio::GlommioError<()>> {
    let pending = disk_trace::begin(|| Op::Allocate {
        fd: file.as_raw_fd(),
        size,
    });
    let result = file.pre_allocate(size, false).await;
    disk_trace::end(pending, result.is_ok());
    result
}

/// Punches a hole of `len` bytes at `offset` (reads as zeros; the size does not change).
pub async fn deallocate(
    file: &DmaFile,
    offset: u64,
    len: u64,
) -> Result<(), glommio::GlommioError<()>> {
    let pending = disk_trace::begin(|| Op::Punch {
        fd: file.as_raw_fd(),
        offset,
        len,
    });
    let result = file.deallocate(offset, len).await;
    disk_trace::end(pending, result.is_ok());
    result
}

/// Cuts `file` to `len` bytes.
pub async fn truncate(file: &DmaFile, len: u64) -> Result<(), glommio::GlommioError<()>> {
    let pending = disk_trace::begin(|| Op::Truncate {
        fd: file.as_raw_fd(),
        len,
    });
    let result = file.truncate(len).await;
    disk_trace::end(pending, result.is_ok());
    result
}

/// Reads `len` bytes at `pos` (any alignment) into a new vector, in pieces of at most
/// `max_io_bytes`. Returns fewer bytes only at end of file.
pub async fn read_range(
    file: &DmaFile,
    pos: u64,
    len: usize,
    max_io_bytes: usize,
) -> Result<Vec<u8>, StorageError> {
    let start = align_down(pos);
    let end = align_up(pos + len as u64);
    let mut pieces = Vec::new();
    let mut at = start;
    while at < end {
        let n = (end - at).min(max_io_bytes as u64) as usize;
        pieces.push((at, n));
        at += n as u64;
    }
    let reads = pieces.iter().map(|&(at, n)| async move {
        file.read_at_aligned(at, n)
            .await
            .map_err(|e| StorageError::glommio(format!("reading {n} bytes at {at}"), e))
    });
    let results = try_join_all(reads).await?;
    let skip = (pos - start) as usize;
    let mut out = Vec::with_capacity(len);
    let mut stream_pos = 0usize; // bytes of the aligned range seen so far
    for (result, &(_, asked)) in results.iter().zip(&pieces) {
        let got = &result[..];
        let from = skip.saturating_sub(stream_pos).min(got.len());
        let want = len - out.len();
        let take = (got.len() - from).min(want);
        out.extend_from_slice(&got[from..from + take]);
        stream_pos += got.len();
        if got.len() < asked || out.len() == len {
            break; // end of file, or done
        }
    }
    Ok(out)
}

/// Fills DMA buffers of at most `max_io_bytes` each with a stream of byte slices, so that a
/// flush can be written as a few large aligned writes.
pub struct ChunkFiller<'f> {
    file: &'f DmaFile,
    max_io_bytes: usize,
    remaining: usize,
    chunks: Vec<(DmaBuffer, usize)>,
}

impl<'f> ChunkFiller<'f> {
    /// Prepares buffers for exactly `total` bytes.
    pub fn new(file: &'f DmaFile, total: usize, max_io_bytes: usize) -> Self {
        Self {
            file,
            max_io_bytes,
            remaining: total,
            chunks: Vec::new(),
        }
    }

    /// Appends `bytes` to the stream.
    pub fn put(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let need_new = match self.chunks.last() {
                Some((buf, used)) => *used == buf.len(),
                None => true,
            };
            if need_new {
                let size = align_up(self.remaining.min(self.max_io_bytes).max(1) as u64) as usize;
                let buf = self.file.alloc_dma_buffer(size);
                self.chunks.push((buf, 0));
            }
            let Some((buf, used)) = self.chunks.last_mut() else {
                return;
            };
            let n = (buf.len() - *used).min(bytes.len());
            buf.as_bytes_mut()[*used..*used + n].copy_from_slice(&bytes[..n]);
            *used += n;
            self.remaining = self.remaining.saturating_sub(n);
            bytes = &bytes[n..];
        }
    }

    /// The last `n` bytes put (`n` at most one block), for the log's tail block.
    pub fn last_bytes(&self, n: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(n);
        let mut left = n;
        for (buf, used) in self.chunks.iter().rev() {
            let take = left.min(*used);
            let mut piece = buf.as_bytes()[*used - take..*used].to_vec();
            piece.extend_from_slice(&out);
            out = piece;
            left -= take;
            if left == 0 {
                break;
            }
        }
        out
    }

    /// Zero-pads the last buffer and writes every buffer at `pos` onwards, concurrently.
    /// Fails if any write fails or comes up short.
    pub async fn write_at(mut self, pos: u64) -> Result<(), StorageError> {
        if let Some((buf, used)) = self.chunks.last_mut() {
            buf.as_bytes_mut()[*used..].fill(0);
        }
        let buffers = self.chunks.into_iter().map(|(buf, _)| buf).collect();
        write_buffers(self.file, buffers, pos).await
    }
}

/// Writes `buffers` back to back from `pos` on, concurrently. Fails if any write fails or
/// comes up short.
pub async fn write_buffers(
    file: &DmaFile,
    buffers: Vec<DmaBuffer>,
    pos: u64,
) -> Result<(), StorageError> {
    let mut at = pos;
    let mut writes = Vec::with_capacity(buffers.len());
    for buf in buffers {
        let len = buf.len();
        let chunk_pos = at;
        let pending = disk_trace::begin(|| Op::Write {
            fd: file.as_raw_fd(),
            offset: chunk_pos,
            direct: true,
            data: WriteData::of(buf.as_bytes()),
        });
        writes.push(async move {
            let written = file.write_at(buf, chunk_pos).await;
            disk_trace::end(pending, matches!(written, Ok(n) if n == len));
            let written = written.map_err(|e| {
                StorageError::glommio(format!("writing {len} bytes at {chunk_pos}"), e)
            })?;
            if written != len {
                return Err(StorageError::Io {
                    context: format!("writing {len} bytes at {chunk_pos}"),
                    errno: None,
                    message: format!("short write of {written} bytes"),
                });
            }
            Ok(())
        });
        at += len as u64;
    }
    try_join_all(writes).await.map(|_| ())
}
