//! Decompression on the produce path: arbitrary bytes as the records region of a v2 batch
//! with a valid CRC, a codec and a declared decompressed size taken from the input. The broker
//! must refuse or accept it without a panic and without allocating past its limit (libFuzzer's
//! `-rss_limit_mb` catches a bomb that gets through); an accepted batch must read back
//! exactly as validated.
//!
//! Input: byte 0 picks the codec (lz4, zstd, or any attribute bits), bytes 1..5 the declared
//! size (little-endian u32), byte 5 the record count; the rest is the stored region.

#![no_main]

use corebus::record::batch::{BatchOptions, ProducerFields};
use corebus::record::{Batch, BatchBuilder, BatchLimits, Codec, Decompressor, RecordWriter};
use corebus_fuzz::walk_batch;
use libfuzzer_sys::fuzz_target;

/// The broker's default limit on a decompressed records region.
const LIMITS: BatchLimits = BatchLimits {
    max_records: 100_000,
    max_records_bytes: 16 << 20,
};

/// A v2 header (from the builder, so every other field is right) around `region`.
fn batch_around(attributes: u16, declared: u32, count: u32, region: &[u8]) -> Vec<u8> {
    let mut b = BatchBuilder::new();
    b.push(&RecordWriter {
        timestamp_ms: 1,
        value: b"x",
        ..RecordWriter::default()
    });
    let template = b.finish_with(BatchOptions {
        codec: Codec::None,
        producer: Some(ProducerFields {
            producer_id: 1,
            epoch: 0,
            base_sequence: 0,
        }),
    });
    let mut out = template[..80].to_vec();
    out.extend_from_slice(region);
    let len = out.len() as u32;
    out[8..12].copy_from_slice(&len.to_le_bytes());
    out[30..32].copy_from_slice(&attributes.to_le_bytes());
    out[32..36].copy_from_slice(&count.to_le_bytes());
    out[36..40].copy_from_slice(&count.saturating_sub(1).to_le_bytes());
    out[72..76].copy_from_slice(&declared.to_le_bytes());
    let crc = crc32c::crc32c(&out[28..]);
    out[24..28].copy_from_slice(&crc.to_le_bytes());
    out
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 6 {
        return;
    }
    let attributes = match data[0] % 4 {
        0 => 1,
        1 => 2,
        2 => 0,
        _ => u16::from(data[0]),
    };
    let declared = u32::from_le_bytes([data[1], data[2], data[3], data[4]]);
    let count = u32::from(data[5]).max(1);
    let bytes = batch_around(attributes, declared, count, &data[6..]);
    let mut d = Decompressor::new();
    if let Ok(batch) = Batch::validate(&bytes, LIMITS, &mut d) {
        assert!(batch.header().records_len() <= LIMITS.max_records_bytes);
        assert_eq!(batch.header().record_count(), count);
        walk_batch(&batch);
    }
});
