//! Recovery scanning: walk a segment's batches from a known-good point, checking every
//! header, CRC and offset, and decide what an invalid batch means.
//!
//! - Past the checkpoint's `durable_end` (written once a checkpoint interval) the first
//!   invalid batch is a torn tail, cut off by the caller, unless (with `--durability sync`)
//!   its header is intact and the batch right after it is valid and continues its offsets:
//!   then it was acknowledged after the checkpoint was written (a flush writes only after the
//!   one before it synced), and it is corruption.
//! - Before it the bytes were acknowledged: an invalid batch there is corruption. It is never
//!   cut; its offsets are recorded as a corrupt range (refused to readers, reported loudly)
//!   and the scan resumes at the next valid batch.

use super::LogConfig;
use crate::record::batch::{self, BatchHeader, HEADER_PREFIX_LEN};
use crate::storage::dma;
use crate::storage::segment::Segment;
use crate::storage::{Durability, StorageError};

/// Offsets whose stored bytes failed their checksum.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CorruptRange {
    /// First offset that cannot be served.
    pub first_offset: u64,
    /// Last offset that cannot be served.
    pub last_offset: u64,
    /// Where the bad bytes start in the segment file.
    pub pos: u64,
    /// Base offset of the segment.
    pub segment_base: u64,
}

/// How a scan ended.
#[derive(Debug, PartialEq, Eq)]
pub enum ScanEnd {
    /// At zero padding or the end of the file: the log ends here.
    Clean,
    /// At an invalid batch past the durable point: cut the log here.
    Torn(&'static str),
}

/// What is known to be durable in a segment: bytes below `end` were acknowledged, and the
/// offsets below `next_offset` with them.
#[derive(Clone, Copy, Debug)]
pub struct DurablePoint {
    /// Bytes of the segment known acknowledged.
    pub end: u64,
    /// Offset after the acknowledged records.
    pub next_offset: u64,
}

/// A header that is intact enough to trust its length and offsets.
fn plausible(header: &BatchHeader<'_>, pos: u64, limit: u64) -> bool {
    let len = u64::from(header.batch_len());
    let count = header.record_count();
    header
        .header_len()
        .is_some_and(|header_len| len >= header_len as u64)
        && pos + len <= limit
        && count > 0
        && header.last_offset_delta() == count - 1
}

/// Scans `seg` from `pos` (where offset `offset` starts) to the end of its valid data,
/// filling in its end, next offset and index. Corrupt ranges found before the durable point
/// are pushed to `corrupt`.
pub async fn scan_segment(
    seg: &mut Segment,
    mut pos: u64,
    offset: u64,
    durable: DurablePoint,
    config: &LogConfig,
    corrupt: &mut Vec<CorruptRange>,
) -> Result<ScanEnd, StorageError> {
    let durable_end = durable.end;
    let limit = seg.extent.allocated();
    let mut expected = offset;
    seg.end = pos;
    seg.next_offset = offset;
    let mut want = config.max_io_bytes;
    let mut force_index = false;
    while pos < limit {
        let len = (want as u64).min(limit - pos) as usize;
        let window = dma::read_range(&seg.file, pos, len, config.max_io_bytes).await?;
        let at_file_end = pos + window.len() as u64 >= limit;
        let mut at = 0usize;
        loop {
            let abs = pos + at as u64;
            let rest = &window[at..];
            if rest.len() < HEADER_PREFIX_LEN {
                if !at_file_end {
                    break;
                }
                if rest.iter().all(|&b| b == 0) && abs >= durable_end {
                    return Ok(ScanEnd::Clean);
                }
                if abs >= durable_end {
                    return Ok(ScanEnd::Torn(
                        "a partial batch header at the end of the file",
                    ));
                }
            }
            let header_bytes = &rest[..rest.len().min(HEADER_PREFIX_LEN)];
            let zeros =
                header_bytes.len() == HEADER_PREFIX_LEN && header_bytes.iter().all(|&b| b == 0);
            if zeros && abs >= durable_end {
                return Ok(ScanEnd::Clean);
            }
            let header = BatchHeader::parse(rest).ok();
            let blen = header.map_or(0, |h| h.batch_len() as usize);
            let is_plausible = header.is_some_and(|h| plausible(&h, abs, limit));
            if is_plausible && blen > rest.len() {
                want = want.max(blen);
                break;
            }
            let valid = is_plausible
                && header.is_some_and(|h| h.base_offset() == expected)
                && batch::crc_matches(&rest[..blen]);
            if let (true, Some(h)) = (valid, header) {
                if force_index {
                    seg.force_index(h.base_offset(), abs);
                    force_index = false;
                }
                seg.record_batch(
                    abs,
                    blen as u64,
                    h.base_offset(),
                    h.last_offset(),
                    h.retention_timestamp_ms(),
                    config.index_interval_bytes,
                );
                expected = h.last_offset() + 1;
                at += blen;
                continue;
            }
            // Past the durable point an invalid batch is a torn tail, unless valid batches
            // follow it: the batch right after it, continuing its offsets, when its header
            // is intact; a valid batch of later offsets further on, when its header is
            // damaged. With `--durability sync` a flush writes only after the one before it
            // synced, so the bad batch was most likely acknowledged after the last checkpoint
            // was written. (Both could also be the torn write of one flush: then a
            // never-acknowledged batch is refused as corrupt, which loses nothing.) The last
            // batch, with an intact header, is torn only if it shows a lost block (below);
            // otherwise its bytes rotted after it was acknowledged: refused, not cut, so that
            // its offsets are not handed out again.
            let intact = header.filter(|h| is_plausible && h.base_offset() == expected);
            let sync_tail = abs >= durable_end && config.durability == Durability::Sync;
            let mut resynced = None;
            let acknowledged = match intact {
                Some(h) if sync_tail => {
                    let next = abs + blen as u64;
                    valid_batch_at(seg, next, h.last_offset() + 1, limit, config).await?
                        || rest
                            .get(..blen)
                            .is_some_and(|b| !shows_a_lost_block(b, abs))
                }
                None if sync_tail => {
                    resynced = resync(seg, abs + 1, expected, limit, config).await?;
                    resynced.is_some()
                }
                _ => false,
            };
            if abs >= durable_end && !acknowledged {
                let why = if !is_plausible {
                    "a batch header that is not valid"
                } else if header.is_some_and(|h| h.base_offset() != expected) {
                    "a batch whose offset does not follow the previous one"
                } else {
                    "a batch whose CRC32C does not match"
                };
                return Ok(ScanEnd::Torn(why));
            }
            // Acknowledged bytes that fail their check: corruption, never cut.
            force_index = true;
            let intact_header =
                !zeros && is_plausible && header.is_some_and(|h| h.base_offset() == expected);
            if let (true, Some(h)) = (intact_header, header) {
                report(seg, abs, expected, h.last_offset(), corrupt);
                expected = h.last_offset() + 1;
                seg.end = abs + blen as u64;
                seg.next_offset = expected;
                at += blen;
                continue;
            }
            let resynced = match resynced {
                Some(found) => Some(found),
                None => resync(seg, abs + 1, expected, limit, config).await?,
            };
            match resynced {
                Some((next_pos, next_base)) => {
                    if next_base > expected {
                        report(seg, abs, expected, next_base - 1, corrupt);
                    } else {
                        // The damaged bytes held no offset: the next batch is the one expected.
                        // There is nothing to refuse to readers (and no `expected - 1`).
                        tracing::error!(
                            "CORRUPT bytes in {} at {abs}..{next_pos}: they hold no \
                             offset (the batch of offset {expected} follows them); skipped",
                            seg.path("log").display()
                        );
                    }
                    expected = next_base;
                    seg.next_offset = expected;
                    pos = next_pos;
                    at = 0;
                    want = config.max_io_bytes;
                    break;
                }
                None => {
                    // Nothing valid follows. Zeros up to the durable point with nothing
                    // missing are unused preallocated space; otherwise the acknowledged
                    // offsets up to the durable point are lost and reported.
                    if durable.next_offset > expected {
                        report(seg, abs, expected, durable.next_offset - 1, corrupt);
                        seg.end = durable_end;
                        seg.next_offset = durable.next_offset;
                        // Appends land after the unreadable bytes: index the first of them.
                        seg.index_next_batch();
                    }
                    return Ok(ScanEnd::Clean);
                }
            }
        }
        pos += at as u64;
    }
    Ok(ScanEnd::Clean)
}

/// Sectors: the smallest unit a disk writes whole.
const SECTOR: u64 = 512;

/// Whether the bytes of a batch that starts at file position `at` hold a sector's share that
/// reads as zeros. Past a segment's end every byte is zero until a flush writes it (prewritten,
/// preallocated, or cleared at recovery), so a flush torn by a power cut, which keeps or drops
/// whole sectors, leaves zeros where it lost one; a batch damaged on the medium after it was
/// written shows no such hole (unless its own bytes there were zeros).
fn shows_a_lost_block(bytes: &[u8], at: u64) -> bool {
    let mut start = 0usize;
    while start < bytes.len() {
        let block_end = (at + start as u64 + SECTOR) / SECTOR * SECTOR;
        let end = ((block_end - at) as usize).min(bytes.len());
        if bytes[start..end].iter().all(|&b| b == 0) {
            return true;
        }
        start = end;
    }
    false
}

fn report(seg: &Segment, pos: u64, first: u64, last: u64, corrupt: &mut Vec<CorruptRange>) {
    tracing::error!(
        "CORRUPT acknowledged data in {} at byte {pos}: offsets {first}..={last} fail their \
         checksum; they are not served and not truncated (restore them from a replica or backup)",
        seg.path("log").display()
    );
    corrupt.push(CorruptRange {
        first_offset: first,
        last_offset: last,
        pos,
        segment_base: seg.base_offset,
    });
}

/// Whether a valid batch with base offset `base` starts at `pos`.
async fn valid_batch_at(
    seg: &Segment,
    pos: u64,
    base: u64,
    limit: u64,
    config: &LogConfig,
) -> Result<bool, StorageError> {
    if pos + HEADER_PREFIX_LEN as u64 > limit {
        return Ok(false);
    }
    let head = dma::read_range(&seg.file, pos, HEADER_PREFIX_LEN, config.max_io_bytes).await?;
    let Ok(h) = BatchHeader::parse(&head) else {
        return Ok(false);
    };
    if !plausible(&h, pos, limit) || h.base_offset() != base {
        return Ok(false);
    }
    let bytes =
        dma::read_range(&seg.file, pos, h.batch_len() as usize, config.max_io_bytes).await?;
    Ok(batch::crc_matches(&bytes))
}

/// Finds the next valid batch at or after `from` whose base offset is at least `expected`.
async fn resync(
    seg: &Segment,
    from: u64,
    expected: u64,
    limit: u64,
    config: &LogConfig,
) -> Result<Option<(u64, u64)>, StorageError> {
    let mut pos = from;
    while pos + HEADER_PREFIX_LEN as u64 <= limit {
        let len = (config.max_io_bytes as u64).min(limit - pos) as usize;
        let window = dma::read_range(&seg.file, pos, len, config.max_io_bytes).await?;
        if window.len() < HEADER_PREFIX_LEN {
            break;
        }
        for at in 0..=window.len() - HEADER_PREFIX_LEN {
            // Cheap filter first: the magic field, then the header's own sanity.
            if batch::header_len(u16::from_le_bytes([window[at + 28], window[at + 29]])).is_none() {
                continue;
            }
            let Ok(h) = BatchHeader::parse(&window[at..]) else {
                continue;
            };
            let abs = pos + at as u64;
            if !plausible(&h, abs, limit)
                || h.base_offset() < expected
                || h.base_offset() - expected > (1 << 40)
            {
                continue;
            }
            let blen = h.batch_len() as usize;
            let ok = if at + blen <= window.len() {
                batch::crc_matches(&window[at..at + blen])
            } else {
                let bytes = dma::read_range(&seg.file, abs, blen, config.max_io_bytes).await?;
                batch::crc_matches(&bytes)
            };
            if ok {
                return Ok(Some((abs, h.base_offset())));
            }
        }
        pos += (window.len() - HEADER_PREFIX_LEN + 1) as u64;
    }
    Ok(None)
}
