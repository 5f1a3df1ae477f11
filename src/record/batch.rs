//! The record-batch layout: the unit producers send, the log stores and readers receive.
//!
//! A batch is a fixed 64-byte little-endian header followed by its records. The CRC32C covers
//! the bytes from `magic` to the end of the batch; the fields before it (base offset, length,
//! leader epoch, append time) are stamped by the broker and stay outside the checksum, as in
//! Kafka. This module owns the byte layout only: it knows nothing of files or sockets.

use super::record::{RecordIter, RecordWriter};
use super::RecordError;

/// Size of the fixed batch header in bytes.
pub const HEADER_LEN: usize = 64;
/// The only batch format version this broker reads and writes.
pub const MAGIC: u16 = 1;

// Field offsets inside the header.
const BASE_OFFSET: usize = 0;
const BATCH_LEN: usize = 8;
const LEADER_EPOCH: usize = 12;
const APPEND_TIME: usize = 16;
const CRC: usize = 24;
/// First byte covered by the CRC.
const CRC_START: usize = 28;
const MAGIC_AT: usize = 28;
const ATTRIBUTES: usize = 30;
const RECORD_COUNT: usize = 32;
const LAST_OFFSET_DELTA: usize = 36;
const FIRST_TIMESTAMP: usize = 40;
const MAX_TIMESTAMP: usize = 48;

fn read_u16(bytes: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([bytes[at], bytes[at + 1]])
}
fn read_u32(bytes: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(b)
}
fn read_u64(bytes: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(b)
}

/// A read-only view of one batch's header. Construct it with [`BatchHeader::parse`], which checks
/// that the header is present; the accessors then cannot fail.
#[derive(Clone, Copy, Debug)]
pub struct BatchHeader<'a> {
    bytes: &'a [u8],
}

impl<'a> BatchHeader<'a> {
    /// Views the first [`HEADER_LEN`] bytes of `bytes` as a header (no CRC check).
    pub fn parse(bytes: &'a [u8]) -> Result<Self, RecordError> {
        if bytes.len() < HEADER_LEN {
            return Err(RecordError::Truncated {
                needed: HEADER_LEN,
                available: bytes.len(),
            });
        }
        Ok(Self {
            bytes: &bytes[..HEADER_LEN],
        })
    }
    /// Offset of the first record (stamped by the broker).
    pub fn base_offset(&self) -> u64 {
        read_u64(self.bytes, BASE_OFFSET)
    }
    /// Total length of the batch, header included.
    pub fn batch_len(&self) -> u32 {
        read_u32(self.bytes, BATCH_LEN)
    }
    /// Reserved for replication; 0 today.
    pub fn leader_epoch(&self) -> u32 {
        read_u32(self.bytes, LEADER_EPOCH)
    }
    /// Broker time at append, milliseconds since the Unix epoch.
    pub fn append_time_ms(&self) -> i64 {
        read_u64(self.bytes, APPEND_TIME) as i64
    }
    /// CRC32C of the batch from the magic field to its end.
    pub fn crc(&self) -> u32 {
        read_u32(self.bytes, CRC)
    }
    /// Batch format version.
    pub fn magic(&self) -> u16 {
        read_u16(self.bytes, MAGIC_AT)
    }
    /// Batch attributes (reserved for compression and transactions; 0 today).
    pub fn attributes(&self) -> u16 {
        read_u16(self.bytes, ATTRIBUTES)
    }
    /// Number of records in the batch.
    pub fn record_count(&self) -> u32 {
        read_u32(self.bytes, RECORD_COUNT)
    }
    /// Offset delta of the last record (record_count - 1).
    pub fn last_offset_delta(&self) -> u32 {
        read_u32(self.bytes, LAST_OFFSET_DELTA)
    }
    /// Offset of the last record.
    pub fn last_offset(&self) -> u64 {
        self.base_offset() + u64::from(self.last_offset_delta())
    }
    /// Timestamp of the first record, milliseconds since the Unix epoch.
    pub fn first_timestamp_ms(&self) -> i64 {
        read_u64(self.bytes, FIRST_TIMESTAMP) as i64
    }
    /// Largest record timestamp in the batch.
    pub fn max_timestamp_ms(&self) -> i64 {
        read_u64(self.bytes, MAX_TIMESTAMP) as i64
    }
    /// The batch's time for retention by age and the time index: its largest record
    /// timestamp, but never later than the broker's append time, so that a producer whose
    /// clock runs ahead can not keep a segment forever. A header the broker has not stamped
    /// (append time 0) keeps the record time.
    pub fn retention_timestamp_ms(&self) -> i64 {
        match self.append_time_ms() {
            stamped if stamped > 0 => self.max_timestamp_ms().min(stamped),
            _ => self.max_timestamp_ms(),
        }
    }
}

/// A whole batch whose CRC and layout have been checked.
#[derive(Clone, Copy, Debug)]
pub struct Batch<'a> {
    bytes: &'a [u8],
}

impl<'a> Batch<'a> {
    /// Checks the header, the CRC and the record layout of the batch at the start of `bytes`
    /// and returns it; `bytes` may continue past the batch.
    pub fn validate(bytes: &'a [u8], max_records: u32) -> Result<Self, RecordError> {
        let header = BatchHeader::parse(bytes)?;
        let len = header.batch_len() as usize;
        if len < HEADER_LEN {
            return Err(RecordError::BadLength(len));
        }
        if bytes.len() < len {
            return Err(RecordError::Truncated {
                needed: len,
                available: bytes.len(),
            });
        }
        if header.magic() != MAGIC {
            return Err(RecordError::BadMagic(header.magic()));
        }
        let bytes = &bytes[..len];
        let crc = crc32c::crc32c(&bytes[CRC_START..]);
        if crc != header.crc() {
            return Err(RecordError::BadCrc {
                stored: header.crc(),
                computed: crc,
            });
        }
        let count = header.record_count();
        if count == 0 || count > max_records || header.last_offset_delta() != count - 1 {
            return Err(RecordError::BadRecordCount(count));
        }
        // Walk the records so that a batch whose lengths lie is refused before it is stored.
        let mut seen = 0u32;
        let mut iter = RecordIter::new(&bytes[HEADER_LEN..]);
        for record in &mut iter {
            let record = record?;
            if record.offset_delta != seen {
                return Err(RecordError::BadOffsetDelta {
                    expected: seen,
                    found: record.offset_delta,
                });
            }
            seen += 1;
        }
        if seen != count {
            return Err(RecordError::BadRecordCount(count));
        }
        Ok(Self { bytes })
    }

    /// Views a batch that was validated before (e.g. read back from our own log) without
    /// checking it again. Only the header's presence and length are checked.
    pub fn trusted(bytes: &'a [u8]) -> Result<Self, RecordError> {
        let header = BatchHeader::parse(bytes)?;
        let len = header.batch_len() as usize;
        if len < HEADER_LEN || bytes.len() < len {
            return Err(RecordError::BadLength(len));
        }
        Ok(Self {
            bytes: &bytes[..len],
        })
    }

    /// The batch header.
    pub fn header(&self) -> BatchHeader<'a> {
        BatchHeader {
            bytes: &self.bytes[..HEADER_LEN],
        }
    }
    /// The whole batch, header included.
    pub fn as_bytes(&self) -> &'a [u8] {
        self.bytes
    }
    /// The records of the batch.
    pub fn records(&self) -> RecordIter<'a> {
        RecordIter::new(&self.bytes[HEADER_LEN..])
    }
}

/// Checks only the CRC of the batch at the start of `bytes` (used by recovery scans and readers
/// of stored data, where the layout was checked at append time).
pub fn crc_matches(bytes: &[u8]) -> bool {
    let Ok(header) = BatchHeader::parse(bytes) else {
        return false;
    };
    let len = header.batch_len() as usize;
    if len < HEADER_LEN || bytes.len() < len || header.magic() != MAGIC {
        return false;
    }
    crc32c::crc32c(&bytes[CRC_START..len]) == header.crc()
}

/// Writes the broker-owned header fields (outside the CRC) into a batch header in place.
pub fn stamp(header: &mut [u8], base_offset: u64, append_time_ms: i64) {
    header[BASE_OFFSET..BASE_OFFSET + 8].copy_from_slice(&base_offset.to_le_bytes());
    header[LEADER_EPOCH..LEADER_EPOCH + 4].copy_from_slice(&0u32.to_le_bytes());
    header[APPEND_TIME..APPEND_TIME + 8].copy_from_slice(&append_time_ms.to_le_bytes());
}

/// Builds a batch into a reusable buffer: add records, then [`BatchBuilder::finish`].
pub struct BatchBuilder {
    buf: Vec<u8>,
    count: u32,
    first_timestamp_ms: i64,
    max_timestamp_ms: i64,
}

impl Default for BatchBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl BatchBuilder {
    /// An empty builder.
    pub fn new() -> Self {
        Self::with_capacity(4096)
    }

    /// An empty builder whose buffer holds `bytes` without growing.
    pub fn with_capacity(bytes: usize) -> Self {
        let mut buf = Vec::with_capacity(bytes.max(HEADER_LEN));
        buf.resize(HEADER_LEN, 0);
        Self {
            buf,
            count: 0,
            first_timestamp_ms: 0,
            max_timestamp_ms: 0,
        }
    }

    /// Number of records added so far.
    pub fn len(&self) -> u32 {
        self.count
    }
    /// True when no record was added.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
    /// Bytes the batch would take if finished now.
    pub fn size_bytes(&self) -> usize {
        self.buf.len()
    }

    /// Appends a record; its offset delta is its position in the batch.
    pub fn push(&mut self, record: &RecordWriter<'_>) {
        if self.count == 0 {
            self.first_timestamp_ms = record.timestamp_ms;
            self.max_timestamp_ms = record.timestamp_ms;
        }
        self.max_timestamp_ms = self.max_timestamp_ms.max(record.timestamp_ms);
        record.encode_into(self.count, &mut self.buf);
        self.count += 1;
    }

    /// Fills in the header and CRC and returns the finished batch bytes. The builder is empty
    /// afterwards and reuses its buffer.
    pub fn finish(&mut self) -> Vec<u8> {
        let capacity = self.buf.capacity();
        let mut out = std::mem::replace(&mut self.buf, Vec::with_capacity(capacity));
        self.buf.resize(HEADER_LEN, 0);
        let len = out.len() as u32;
        out[BATCH_LEN..BATCH_LEN + 4].copy_from_slice(&len.to_le_bytes());
        out[MAGIC_AT..MAGIC_AT + 2].copy_from_slice(&MAGIC.to_le_bytes());
        out[ATTRIBUTES..ATTRIBUTES + 2].copy_from_slice(&0u16.to_le_bytes());
        out[RECORD_COUNT..RECORD_COUNT + 4].copy_from_slice(&self.count.to_le_bytes());
        let last_delta = self.count.saturating_sub(1);
        out[LAST_OFFSET_DELTA..LAST_OFFSET_DELTA + 4].copy_from_slice(&last_delta.to_le_bytes());
        out[FIRST_TIMESTAMP..FIRST_TIMESTAMP + 8]
            .copy_from_slice(&self.first_timestamp_ms.to_le_bytes());
        out[MAX_TIMESTAMP..MAX_TIMESTAMP + 8].copy_from_slice(&self.max_timestamp_ms.to_le_bytes());
        let crc = crc32c::crc32c(&out[CRC_START..]);
        out[CRC..CRC + 4].copy_from_slice(&crc.to_le_bytes());
        self.count = 0;
        out
    }
}

/// Iterates over the whole batches at the start of `bytes`, stopping at the first incomplete
/// one. Used by readers of fetch replies; each batch is checked with [`crc_matches`].
pub struct BatchIter<'a> {
    rest: &'a [u8],
}

impl<'a> BatchIter<'a> {
    /// Iterates over the batches in `bytes`.
    pub fn new(bytes: &'a [u8]) -> Self {
        Self { rest: bytes }
    }
}

impl<'a> Iterator for BatchIter<'a> {
    type Item = Result<Batch<'a>, RecordError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let batch = match Batch::trusted(self.rest) {
            Ok(batch) => batch,
            Err(e) => {
                self.rest = &[];
                return Some(Err(e));
            }
        };
        if !crc_matches(batch.as_bytes()) {
            self.rest = &[];
            return Some(Err(RecordError::BadCrc {
                stored: batch.header().crc(),
                computed: crc32c::crc32c(&batch.as_bytes()[CRC_START..]),
            }));
        }
        self.rest = &self.rest[batch.as_bytes().len()..];
        Some(Ok(batch))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_batch(n: u32) -> Vec<u8> {
        let mut b = BatchBuilder::new();
        for i in 0..n {
            let value = format!("value-{i}");
            let rec = RecordWriter {
                timestamp_ms: 1000 + i64::from(i),
                key: Some(b"k"),
                value: value.as_bytes(),
                headers: &[(b"h".as_slice(), b"v".as_slice())],
                ..RecordWriter::default()
            };
            b.push(&rec);
        }
        b.finish()
    }

    #[test]
    fn round_trip_validates_and_reads_back() {
        let bytes = sample_batch(5);
        let batch = Batch::validate(&bytes, 100).expect("valid");
        assert_eq!(batch.header().record_count(), 5);
        assert_eq!(batch.header().first_timestamp_ms(), 1000);
        assert_eq!(batch.header().max_timestamp_ms(), 1004);
        let values: Vec<Vec<u8>> = batch
            .records()
            .map(|r| r.expect("record").value.to_vec())
            .collect();
        assert_eq!(values[4], b"value-4");
    }

    #[test]
    fn stamping_does_not_break_the_crc() {
        let mut bytes = sample_batch(3);
        stamp(&mut bytes[..HEADER_LEN], 42, 7);
        let batch = Batch::validate(&bytes, 100).expect("valid after stamp");
        assert_eq!(batch.header().base_offset(), 42);
        assert_eq!(batch.header().last_offset(), 44);
        assert_eq!(batch.header().append_time_ms(), 7);
    }

    #[test]
    fn every_flipped_bit_in_the_crc_range_is_caught() {
        let bytes = sample_batch(2);
        for byte in CRC_START..bytes.len() {
            let mut bad = bytes.clone();
            bad[byte] ^= 0x10;
            assert!(
                Batch::validate(&bad, 100).is_err(),
                "flip at {byte} not caught"
            );
        }
    }

    #[test]
    fn the_example_of_docs_protocol_md_validates() {
        let hex =
            "00000000000000006400000000000000000000000000000076bc5191010000000100000000000000\
                   0068e5cf8b0100000068e5cf8b01000000000000000000002000000000000000\
                   0068e5cf8b010000ffffffff02000000686900000000000000000000";
        let bytes: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
            .collect();
        let batch = Batch::validate(&bytes, 10).expect("documented batch is valid");
        let record = batch.records().next().expect("one").expect("ok");
        assert_eq!(record.value, b"hi");
        assert_eq!(record.timestamp_ms, 1_700_000_000_000);
        let mut built = BatchBuilder::new();
        built.push(&RecordWriter {
            timestamp_ms: 1_700_000_000_000,
            value: b"hi",
            ..RecordWriter::default()
        });
        assert_eq!(
            built.finish(),
            bytes,
            "the builder writes exactly the documented bytes"
        );
    }

    #[test]
    fn lying_lengths_are_refused() {
        let mut bytes = sample_batch(2);
        let len = bytes.len() as u32 + 10;
        bytes[BATCH_LEN..BATCH_LEN + 4].copy_from_slice(&len.to_le_bytes());
        assert!(matches!(
            Batch::validate(&bytes, 100),
            Err(RecordError::Truncated { .. })
        ));
        assert!(Batch::validate(&bytes[..10], 100).is_err());
        assert!(matches!(
            Batch::validate(&sample_batch(5), 4),
            Err(RecordError::BadRecordCount(5))
        ));
    }
}
