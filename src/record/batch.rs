//! The record-batch layout: the unit producers send, the log stores and readers receive.
//!
//! A batch is a little-endian header followed by its records region. Two versions exist:
//! magic 1 (a 64-byte header, records stored as they are) and magic 2 (an 80-byte header that
//! adds the idempotent producer's id, epoch and sequence, and the records region's size before
//! compression; the region may be compressed as a whole, codec in `attributes`). The first 64
//! bytes mean the same in both. The CRC32C covers the bytes from `magic` to the end of the
//! batch (the compressed bytes, so a batch is checked without decompressing it); the fields
//! before it (base offset, length, leader epoch, append time) are stamped by the broker and
//! stay outside the checksum, as in Kafka. This module owns the byte layout only: it knows
//! nothing of files or sockets.

use super::compression::{Codec, Compressor, Decompressor, CODEC_MASK};
use super::record::{RecordIter, RecordWriter};
use super::RecordError;

/// The header bytes every format version shares (the whole v1 header): enough to read a
/// batch's length, magic, CRC, offsets and timestamps.
pub const HEADER_PREFIX_LEN: usize = 64;
/// Size of the v2 header.
pub const V2_HEADER_LEN: usize = 80;
/// The first format version: 64-byte header, no compression, no producer fields.
pub const MAGIC_V1: u16 = 1;
/// The format version this broker and its clients write.
pub const MAGIC_V2: u16 = 2;
/// `producer_id` of a batch that no idempotent producer sent.
pub const NO_PRODUCER: u64 = u64::MAX;

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
// v2 only.
const PRODUCER_ID: usize = 56;
const BASE_SEQUENCE: usize = 64;
const PRODUCER_EPOCH: usize = 68;
const RECORDS_LEN: usize = 72;
/// Bytes 70..72 and 76..80 are reserved (0); `seal_v2` clears 70..80 before setting 72..76.
const V2_RESERVED: usize = 70;

/// The header size of format version `magic`, if this broker knows it.
pub fn header_len(magic: u16) -> Option<usize> {
    match magic {
        MAGIC_V1 => Some(HEADER_PREFIX_LEN),
        MAGIC_V2 => Some(V2_HEADER_LEN),
        _ => None,
    }
}

/// What a batch may hold: the produce path's limits.
#[derive(Clone, Copy, Debug)]
pub struct BatchLimits {
    /// Most records in one batch.
    pub max_records: u32,
    /// Most bytes of a records region after decompression.
    pub max_records_bytes: usize,
}

/// The idempotent producer's fields of a v2 batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProducerFields {
    /// The id that `InitProducer` gave.
    pub producer_id: u64,
    /// Its epoch: a higher one fences the lower.
    pub epoch: u16,
    /// Sequence number of the batch's first record, per partition.
    pub base_sequence: u32,
}

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
/// that the shared prefix is present; the accessors then cannot fail.
#[derive(Clone, Copy, Debug)]
pub struct BatchHeader<'a> {
    /// The prefix, and the v2 fields when `bytes` held them.
    bytes: &'a [u8],
}

impl<'a> BatchHeader<'a> {
    /// Views the header at the start of `bytes` (no CRC check). Needs the shared
    /// [`HEADER_PREFIX_LEN`] bytes; the v2 fields read as "none" if they are cut off.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, RecordError> {
        if bytes.len() < HEADER_PREFIX_LEN {
            return Err(RecordError::Truncated {
                needed: HEADER_PREFIX_LEN,
                available: bytes.len(),
            });
        }
        Ok(Self {
            bytes: &bytes[..bytes.len().min(V2_HEADER_LEN)],
        })
    }
    fn v2_field(&self, at: usize, width: usize) -> Option<&'a [u8]> {
        (self.magic() == MAGIC_V2).then(|| self.bytes.get(at..at + width))?
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
    /// Batch attributes: the codec in bits 0..=2, the rest 0.
    pub fn attributes(&self) -> u16 {
        read_u16(self.bytes, ATTRIBUTES)
    }
    /// The records region's codec (`None` for v1); `None` (the Option) for an unknown one.
    pub fn codec(&self) -> Option<Codec> {
        match self.magic() {
            MAGIC_V2 => Codec::from_attributes(self.attributes()),
            _ => Some(Codec::None),
        }
    }
    /// The header's size, per its magic; `None` for an unknown version.
    pub fn header_len(&self) -> Option<usize> {
        header_len(self.magic())
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
    /// The idempotent producer's fields; `None` for v1 and for a batch of no such producer.
    pub fn producer(&self) -> Option<ProducerFields> {
        let producer_id = read_u64(self.v2_field(PRODUCER_ID, 8)?, 0);
        if producer_id == NO_PRODUCER {
            return None;
        }
        Some(ProducerFields {
            producer_id,
            epoch: read_u16(self.v2_field(PRODUCER_EPOCH, 2)?, 0),
            base_sequence: read_u32(self.v2_field(BASE_SEQUENCE, 4)?, 0),
        })
    }
    /// Size of the records region before compression, as the header declares it (v1: the
    /// stored size).
    pub fn records_len(&self) -> usize {
        match self.v2_field(RECORDS_LEN, 4) {
            Some(field) => read_u32(field, 0) as usize,
            None => (self.batch_len() as usize).saturating_sub(HEADER_PREFIX_LEN),
        }
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

/// A whole batch whose length and magic have been checked (and, from
/// [`Batch::validate`], its CRC and records).
#[derive(Clone, Copy, Debug)]
pub struct Batch<'a> {
    bytes: &'a [u8],
    header_len: usize,
}

impl<'a> Batch<'a> {
    /// Checks the header, the CRC and the record layout of the batch at the start of `bytes`
    /// and returns it; `bytes` may continue past the batch. A compressed records region is
    /// decompressed into `decompressor` (never past `limits.max_records_bytes`) to walk it.
    pub fn validate(
        bytes: &'a [u8],
        limits: BatchLimits,
        decompressor: &mut Decompressor,
    ) -> Result<Self, RecordError> {
        let batch = Self::trusted(bytes)?;
        let header = batch.header();
        let crc = crc32c::crc32c(&batch.bytes[CRC_START..]);
        if crc != header.crc() {
            return Err(RecordError::BadCrc {
                stored: header.crc(),
                computed: crc,
            });
        }
        if header.codec().is_none() || header.attributes() & !CODEC_MASK != 0 {
            return Err(RecordError::BadAttributes(header.attributes()));
        }
        if header.magic() == MAGIC_V2
            && (batch.bytes[V2_RESERVED..RECORDS_LEN] != [0; 2]
                || batch.bytes[RECORDS_LEN + 4..V2_HEADER_LEN] != [0; 4])
        {
            return Err(RecordError::BadRecord("reserved header bytes are not zero"));
        }
        let count = header.record_count();
        if count == 0 || count > limits.max_records || header.last_offset_delta() != count - 1 {
            return Err(RecordError::BadRecordCount(count));
        }
        // Walk the records so that a batch whose lengths lie is refused before it is stored.
        let mut seen = 0u32;
        for record in batch.records_bounded(decompressor, limits.max_records_bytes)? {
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
        Ok(batch)
    }

    /// Views a batch that was validated before (e.g. read back from our own log) without
    /// checking its CRC or records: only its length and format version.
    pub fn trusted(bytes: &'a [u8]) -> Result<Self, RecordError> {
        let header = BatchHeader::parse(bytes)?;
        let header_len = header
            .header_len()
            .ok_or(RecordError::BadMagic(header.magic()))?;
        let len = header.batch_len() as usize;
        if len < header_len {
            return Err(RecordError::BadLength(len));
        }
        if bytes.len() < len {
            return Err(RecordError::Truncated {
                needed: len,
                available: bytes.len(),
            });
        }
        Ok(Self {
            bytes: &bytes[..len],
            header_len,
        })
    }

    /// The batch header.
    pub fn header(&self) -> BatchHeader<'a> {
        BatchHeader {
            bytes: &self.bytes[..self.header_len],
        }
    }
    /// The whole batch, header included.
    pub fn as_bytes(&self) -> &'a [u8] {
        self.bytes
    }
    /// The records region as stored (compressed if the batch is).
    pub fn stored_records(&self) -> &'a [u8] {
        &self.bytes[self.header_len..]
    }

    /// The records of the batch, decompressed into `decompressor` if needed (bounded only by
    /// the header's declared size: use on batches that passed [`Batch::validate`]).
    pub fn records<'s>(
        &self,
        decompressor: &'s mut Decompressor,
    ) -> Result<RecordIter<'s>, RecordError>
    where
        'a: 's,
    {
        self.records_bounded(decompressor, usize::MAX)
    }

    /// The records, decompressing at most `max_bytes`.
    pub fn records_bounded<'s>(
        &self,
        decompressor: &'s mut Decompressor,
        max_bytes: usize,
    ) -> Result<RecordIter<'s>, RecordError>
    where
        'a: 's,
    {
        let header = self.header();
        match header.codec() {
            Some(Codec::None) => {
                let stored = self.stored_records();
                if header.records_len() != stored.len() {
                    return Err(RecordError::DecompressedSize {
                        declared: header.records_len(),
                        actual: stored.len(),
                    });
                }
                Ok(RecordIter::new(stored))
            }
            Some(codec) => Ok(RecordIter::new(decompressor.decompress(
                codec,
                self.stored_records(),
                header.records_len(),
                max_bytes,
            )?)),
            None => Err(RecordError::BadAttributes(header.attributes())),
        }
    }
}

/// Checks only the length, format version and CRC of the batch at the start of `bytes` (used
/// by recovery scans and readers of stored data, where the records were checked at append).
pub fn crc_matches(bytes: &[u8]) -> bool {
    match Batch::trusted(bytes) {
        Ok(batch) => crc32c::crc32c(&batch.bytes[CRC_START..]) == batch.header().crc(),
        Err(_) => false,
    }
}

/// Writes the broker-owned header fields (outside the CRC) into a batch header in place.
pub fn stamp(header: &mut [u8], base_offset: u64, append_time_ms: i64) {
    header[BASE_OFFSET..BASE_OFFSET + 8].copy_from_slice(&base_offset.to_le_bytes());
    header[LEADER_EPOCH..LEADER_EPOCH + 4].copy_from_slice(&0u32.to_le_bytes());
    header[APPEND_TIME..APPEND_TIME + 8].copy_from_slice(&append_time_ms.to_le_bytes());
}

/// Builds v2 batches into a reusable buffer: add records, then [`BatchBuilder::finish`] (or
/// [`BatchBuilder::finish_with`] for compression and producer fields).
pub struct BatchBuilder {
    /// The v2 header's room, then the uncompressed records.
    buf: Vec<u8>,
    count: u32,
    first_timestamp_ms: i64,
    max_timestamp_ms: i64,
    compressor: Compressor,
}

impl Default for BatchBuilder {
    fn default() -> Self {
        Self::new()
    }
}

/// How [`BatchBuilder::finish_with`] writes the batch.
#[derive(Clone, Copy, Debug, Default)]
pub struct BatchOptions {
    /// Codec of the records region.
    pub codec: Codec,
    /// The idempotent producer's fields, if any.
    pub producer: Option<ProducerFields>,
}

impl BatchBuilder {
    /// An empty builder.
    pub fn new() -> Self {
        Self::with_capacity(4096)
    }

    /// An empty builder whose buffer holds `bytes` without growing.
    pub fn with_capacity(bytes: usize) -> Self {
        let mut buf = Vec::with_capacity(bytes.max(V2_HEADER_LEN));
        buf.resize(V2_HEADER_LEN, 0);
        Self {
            buf,
            count: 0,
            first_timestamp_ms: 0,
            max_timestamp_ms: 0,
            compressor: Compressor::new(),
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
    /// Bytes the batch would take if finished now, uncompressed.
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

    /// Finishes an uncompressed batch of no idempotent producer.
    pub fn finish(&mut self) -> Vec<u8> {
        self.finish_with(BatchOptions::default())
    }

    /// Fills in the header and CRC, compressing the records as `options` says, and returns
    /// the finished batch bytes. The builder is empty afterwards and reuses its buffer.
    pub fn finish_with(&mut self, options: BatchOptions) -> Vec<u8> {
        let records_len = self.buf.len() - V2_HEADER_LEN;
        let mut codec = options.codec;
        let mut out = if codec == Codec::None {
            let capacity = self.buf.capacity();
            let out = std::mem::replace(&mut self.buf, Vec::with_capacity(capacity));
            self.buf.resize(V2_HEADER_LEN, 0);
            out
        } else {
            let mut out = Vec::with_capacity(V2_HEADER_LEN + records_len / 2 + 64);
            out.resize(V2_HEADER_LEN, 0);
            let compressed =
                self.compressor
                    .compress_into(codec, &self.buf[V2_HEADER_LEN..], &mut out);
            // Data that does not shrink (or a codec failure) is stored as it is.
            if compressed.is_err() || out.len() >= self.buf.len() {
                codec = Codec::None;
                out.truncate(V2_HEADER_LEN);
                out.extend_from_slice(&self.buf[V2_HEADER_LEN..]);
            }
            self.buf.truncate(V2_HEADER_LEN);
            out
        };
        out[..V2_HEADER_LEN].fill(0);
        out[RECORD_COUNT..RECORD_COUNT + 4].copy_from_slice(&self.count.to_le_bytes());
        let last_delta = self.count.saturating_sub(1);
        out[LAST_OFFSET_DELTA..LAST_OFFSET_DELTA + 4].copy_from_slice(&last_delta.to_le_bytes());
        out[FIRST_TIMESTAMP..FIRST_TIMESTAMP + 8]
            .copy_from_slice(&self.first_timestamp_ms.to_le_bytes());
        out[MAX_TIMESTAMP..MAX_TIMESTAMP + 8].copy_from_slice(&self.max_timestamp_ms.to_le_bytes());
        seal_v2(&mut out, codec, options.producer, records_len);
        self.count = 0;
        out
    }
}

/// Writes a v2 header's length, magic, codec, producer fields and records size into `out`
/// (a whole batch whose other header fields are set), then its CRC.
fn seal_v2(out: &mut [u8], codec: Codec, producer: Option<ProducerFields>, records_len: usize) {
    let producer = producer.unwrap_or(ProducerFields {
        producer_id: NO_PRODUCER,
        epoch: 0,
        base_sequence: 0,
    });
    let len = out.len() as u32;
    out[BATCH_LEN..BATCH_LEN + 4].copy_from_slice(&len.to_le_bytes());
    out[MAGIC_AT..MAGIC_AT + 2].copy_from_slice(&MAGIC_V2.to_le_bytes());
    out[ATTRIBUTES..ATTRIBUTES + 2].copy_from_slice(&codec.attribute_bits().to_le_bytes());
    out[PRODUCER_ID..PRODUCER_ID + 8].copy_from_slice(&producer.producer_id.to_le_bytes());
    out[BASE_SEQUENCE..BASE_SEQUENCE + 4].copy_from_slice(&producer.base_sequence.to_le_bytes());
    out[PRODUCER_EPOCH..PRODUCER_EPOCH + 2].copy_from_slice(&producer.epoch.to_le_bytes());
    out[V2_RESERVED..V2_HEADER_LEN].fill(0);
    out[RECORDS_LEN..RECORDS_LEN + 4].copy_from_slice(&(records_len as u32).to_le_bytes());
    let crc = crc32c::crc32c(&out[CRC_START..]);
    out[CRC..CRC + 4].copy_from_slice(&crc.to_le_bytes());
}

/// Rewrites a v1 or v2 batch as a v2 batch with the records region in `codec`, keeping its
/// records, timestamps and producer fields (the topic setting that recompresses what
/// producers send). `batch` must have passed [`Batch::validate`].
pub fn recompress(
    batch: &Batch<'_>,
    codec: Codec,
    decompressor: &mut Decompressor,
    compressor: &mut Compressor,
) -> Result<Vec<u8>, RecordError> {
    let header = batch.header();
    let records_len = header.records_len();
    let mut out = Vec::with_capacity(V2_HEADER_LEN + records_len / 2 + 64);
    out.resize(V2_HEADER_LEN, 0);
    out[..HEADER_PREFIX_LEN].copy_from_slice(&batch.as_bytes()[..HEADER_PREFIX_LEN]);
    let producer = header.producer();
    let records: &[u8] = match header.codec() {
        Some(Codec::None) => batch.stored_records(),
        Some(from) => {
            decompressor.decompress(from, batch.stored_records(), records_len, records_len)?
        }
        None => return Err(RecordError::BadAttributes(header.attributes())),
    };
    let mut codec = codec;
    compressor.compress_into(codec, records, &mut out)?;
    if codec != Codec::None && out.len() >= V2_HEADER_LEN + records.len() {
        codec = Codec::None;
        out.truncate(V2_HEADER_LEN);
        out.extend_from_slice(records);
    }
    seal_v2(&mut out, codec, producer, records_len);
    Ok(out)
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
        let computed = crc32c::crc32c(&batch.as_bytes()[CRC_START..]);
        if computed != batch.header().crc() {
            self.rest = &[];
            return Some(Err(RecordError::BadCrc {
                stored: batch.header().crc(),
                computed,
            }));
        }
        self.rest = &self.rest[batch.as_bytes().len()..];
        Some(Ok(batch))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: BatchLimits = BatchLimits {
        max_records: 100,
        max_records_bytes: 1 << 20,
    };

    fn sample_records(b: &mut BatchBuilder, n: u32) {
        for i in 0..n {
            let value = format!("value-{i} {{\"kind\":\"order\",\"status\":\"created\"}}");
            let rec = RecordWriter {
                timestamp_ms: 1000 + i64::from(i),
                key: Some(b"k"),
                value: value.as_bytes(),
                headers: &[(b"h".as_slice(), b"v".as_slice())],
                ..RecordWriter::default()
            };
            b.push(&rec);
        }
    }

    fn sample_batch_with(n: u32, options: BatchOptions) -> Vec<u8> {
        let mut b = BatchBuilder::new();
        sample_records(&mut b, n);
        b.finish_with(options)
    }

    fn sample_batch(n: u32) -> Vec<u8> {
        sample_batch_with(n, BatchOptions::default())
    }

    fn values(batch: &Batch<'_>) -> Vec<Vec<u8>> {
        let mut d = Decompressor::new();
        batch
            .records(&mut d)
            .expect("records")
            .map(|r| r.expect("record").value.to_vec())
            .collect()
    }

    #[test]
    fn round_trip_validates_and_reads_back() {
        let bytes = sample_batch(5);
        let batch = Batch::validate(&bytes, LIMITS, &mut Decompressor::new()).expect("valid");
        assert_eq!(batch.header().record_count(), 5);
        assert_eq!(batch.header().magic(), MAGIC_V2);
        assert_eq!(batch.header().first_timestamp_ms(), 1000);
        assert_eq!(batch.header().max_timestamp_ms(), 1004);
        assert_eq!(batch.header().producer(), None);
        assert_eq!(
            values(&batch)[4],
            b"value-4 {\"kind\":\"order\",\"status\":\"created\"}"
        );
    }

    #[test]
    fn every_codec_round_trips_with_producer_fields() {
        let producer = ProducerFields {
            producer_id: 7,
            epoch: 3,
            base_sequence: 40,
        };
        let plain = sample_batch(50);
        for codec in [Codec::None, Codec::Lz4, Codec::Zstd] {
            let bytes = sample_batch_with(
                50,
                BatchOptions {
                    codec,
                    producer: Some(producer),
                },
            );
            let batch = Batch::validate(&bytes, LIMITS, &mut Decompressor::new()).expect("valid");
            assert_eq!(batch.header().codec(), Some(codec));
            assert_eq!(batch.header().producer(), Some(producer));
            assert_eq!(batch.header().records_len(), plain.len() - V2_HEADER_LEN);
            if codec != Codec::None {
                assert!(bytes.len() < plain.len() / 2, "{codec}: {}", bytes.len());
            }
            let plain_batch = Batch::trusted(&plain).expect("plain");
            assert_eq!(values(&batch), values(&plain_batch), "{codec}");
            // Recompressing to any codec keeps the records and the producer.
            for to in [Codec::None, Codec::Lz4, Codec::Zstd] {
                let again =
                    recompress(&batch, to, &mut Decompressor::new(), &mut Compressor::new())
                        .expect("recompress");
                let again =
                    Batch::validate(&again, LIMITS, &mut Decompressor::new()).expect("valid");
                assert_eq!(again.header().codec(), Some(to));
                assert_eq!(again.header().producer(), Some(producer));
                assert_eq!(values(&again), values(&plain_batch), "{codec} -> {to}");
            }
        }
    }

    #[test]
    fn a_compressed_batch_over_the_limit_or_lying_is_refused() {
        let bytes = sample_batch_with(
            100,
            BatchOptions {
                codec: Codec::Lz4,
                producer: None,
            },
        );
        let small = BatchLimits {
            max_records: 100,
            max_records_bytes: 1000,
        };
        assert!(matches!(
            Batch::validate(&bytes, small, &mut Decompressor::new()),
            Err(RecordError::DecompressedTooLarge { .. })
        ));
        // A header that declares fewer bytes than the block holds, CRC fixed up.
        let mut lie = bytes.clone();
        lie[RECORDS_LEN..RECORDS_LEN + 4].copy_from_slice(&100u32.to_le_bytes());
        let crc = crc32c::crc32c(&lie[CRC_START..]);
        lie[CRC..CRC + 4].copy_from_slice(&crc.to_le_bytes());
        assert!(crc_matches(&lie));
        assert!(Batch::validate(&lie, LIMITS, &mut Decompressor::new()).is_err());
        // An unknown codec.
        let mut unknown = bytes;
        unknown[ATTRIBUTES] = 5;
        let crc = crc32c::crc32c(&unknown[CRC_START..]);
        unknown[CRC..CRC + 4].copy_from_slice(&crc.to_le_bytes());
        assert!(matches!(
            Batch::validate(&unknown, LIMITS, &mut Decompressor::new()),
            Err(RecordError::BadAttributes(5))
        ));
    }

    #[test]
    fn stamping_does_not_break_the_crc() {
        let mut bytes = sample_batch(3);
        stamp(&mut bytes[..HEADER_PREFIX_LEN], 42, 7);
        let batch =
            Batch::validate(&bytes, LIMITS, &mut Decompressor::new()).expect("valid after stamp");
        assert_eq!(batch.header().base_offset(), 42);
        assert_eq!(batch.header().last_offset(), 44);
        assert_eq!(batch.header().append_time_ms(), 7);
    }

    #[test]
    fn every_flipped_bit_in_the_crc_range_is_caught() {
        for codec in [Codec::None, Codec::Zstd] {
            let bytes = sample_batch_with(
                2,
                BatchOptions {
                    codec,
                    producer: None,
                },
            );
            for byte in CRC_START..bytes.len() {
                let mut bad = bytes.clone();
                bad[byte] ^= 0x10;
                assert!(
                    Batch::validate(&bad, LIMITS, &mut Decompressor::new()).is_err(),
                    "{codec}: flip at {byte} not caught"
                );
            }
        }
    }

    fn from_hex(hex: &str) -> Vec<u8> {
        let hex: String = hex.split_whitespace().collect();
        (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
            .collect()
    }

    #[test]
    fn the_v1_example_of_docs_protocol_md_is_still_read() {
        let bytes = from_hex(
            "00000000000000006400000000000000000000000000000076bc5191010000000100000000000000\
             0068e5cf8b0100000068e5cf8b01000000000000000000002000000000000000\
             0068e5cf8b010000ffffffff02000000686900000000000000000000",
        );
        let batch = Batch::validate(&bytes, LIMITS, &mut Decompressor::new())
            .expect("documented batch is valid");
        assert_eq!(batch.header().magic(), MAGIC_V1);
        assert_eq!(batch.header().codec(), Some(Codec::None));
        assert_eq!(batch.header().producer(), None);
        let mut d = Decompressor::new();
        let record = batch
            .records(&mut d)
            .expect("records")
            .next()
            .expect("one")
            .expect("ok");
        assert_eq!(record.value, b"hi");
        assert_eq!(record.timestamp_ms, 1_700_000_000_000);
    }

    /// docs/protocol.md section 8.2: a one-record v2 batch of an idempotent producer, LZ4.
    const DOCUMENTED_LZ4_BATCH: &str = "\
        0000000000000000840000000000000000000000000000008f74b11a020001000100000000000000\
        0068e5cf8b0100000068e5cf8b010000070000000000000000000000000000005100000000000000\
        234d000100ff1068e5cf8b010000ffffffff2f00000068656c6c6f2c20636f726562757321201000\
        0ca000000000000000000000";

    #[test]
    fn the_compressed_example_of_docs_protocol_md_is_what_the_builder_writes() {
        let documented = from_hex(DOCUMENTED_LZ4_BATCH);
        let value = b"hello, corebus! hello, corebus! hello, corebus!";
        let mut b = BatchBuilder::new();
        b.push(&RecordWriter {
            timestamp_ms: 1_700_000_000_000,
            value,
            ..RecordWriter::default()
        });
        let built = b.finish_with(BatchOptions {
            codec: Codec::Lz4,
            producer: Some(ProducerFields {
                producer_id: 7,
                epoch: 0,
                base_sequence: 0,
            }),
        });
        assert_eq!(
            built, documented,
            "the builder writes exactly the documented bytes"
        );
        let batch = Batch::validate(&documented, LIMITS, &mut Decompressor::new()).expect("valid");
        assert_eq!(batch.header().records_len(), 81);
        assert_eq!(values(&batch), [value.to_vec()]);
    }

    #[test]
    fn lying_lengths_are_refused() {
        let mut bytes = sample_batch(2);
        let len = bytes.len() as u32 + 10;
        bytes[BATCH_LEN..BATCH_LEN + 4].copy_from_slice(&len.to_le_bytes());
        assert!(matches!(
            Batch::validate(&bytes, LIMITS, &mut Decompressor::new()),
            Err(RecordError::Truncated { .. })
        ));
        assert!(Batch::validate(&bytes[..10], LIMITS, &mut Decompressor::new()).is_err());
        let four = BatchLimits {
            max_records: 4,
            ..LIMITS
        };
        assert!(matches!(
            Batch::validate(&sample_batch(5), four, &mut Decompressor::new()),
            Err(RecordError::BadRecordCount(5))
        ));
    }
}
