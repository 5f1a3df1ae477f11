//! The record-batch parser: `Batch::validate` on arbitrary bytes; a valid batch has every
//! record and header read, and re-encoding its records gives back the same bytes. Then
//! `BatchIter` over the whole input (as a client reads a fetch reply).
//!
//! Input: the bytes, with a `max_records` limit taken from the input's length.

#![no_main]

use corebus::record::batch::crc_matches;
use corebus::record::{
    Batch, BatchBuilder, BatchIter, BatchLimits, Codec, Decompressor, RecordWriter,
};
use corebus_fuzz::walk_batch;
use libfuzzer_sys::fuzz_target;

/// Re-encodes the records of a valid batch and checks that the same record bytes come back.
fn reencode(batch: &Batch<'_>) {
    let mut builder = BatchBuilder::new();
    let mut header_lists = Vec::new();
    let mut decompressor = Decompressor::new();
    let records: Vec<_> = batch
        .records(&mut decompressor)
        .expect("validated")
        .map(|r| r.expect("validated"))
        .collect();
    for r in &records {
        header_lists.push(r.headers().collect::<Vec<_>>());
    }
    for (r, headers) in records.iter().zip(&header_lists) {
        let (Ok(id), Ok(source), Ok(event_type), Ok(subject)) = (
            std::str::from_utf8(r.id),
            std::str::from_utf8(r.source),
            std::str::from_utf8(r.event_type),
            std::str::from_utf8(r.subject),
        ) else {
            return; // the writer takes text attributes only
        };
        let writer = RecordWriter {
            timestamp_ms: r.timestamp_ms,
            key: r.key,
            value: r.value,
            id,
            source,
            event_type,
            subject,
            headers,
        };
        builder.push(&writer);
    }
    let bytes = builder.finish();
    let limits = BatchLimits {
        max_records: u32::MAX,
        max_records_bytes: usize::MAX,
    };
    let again = Batch::validate(&bytes, limits, &mut Decompressor::new())
        .expect("a re-encoded batch must validate");
    let mut d = Decompressor::new();
    let original = match batch.header().codec() {
        Some(Codec::None) => batch.stored_records().to_vec(),
        Some(codec) => d
            .decompress(
                codec,
                batch.stored_records(),
                batch.header().records_len(),
                usize::MAX,
            )
            .expect("validated")
            .to_vec(),
        None => unreachable!("validated"),
    };
    assert_eq!(
        again.stored_records(),
        &original[..],
        "records re-encode to other bytes"
    );
    let (a, b) = (again.header(), batch.header());
    assert_eq!(a.record_count(), b.record_count());
    let max_ts = records.iter().map(|r| r.timestamp_ms).max();
    assert_eq!(Some(a.max_timestamp_ms()), max_ts);
    assert_eq!(a.first_timestamp_ms(), records[0].timestamp_ms);
}

fuzz_target!(|data: &[u8]| {
    let max_records = match data.len() % 3 {
        0 => u32::MAX,
        1 => 100_000,
        _ => 3,
    };
    let limits = BatchLimits {
        max_records,
        max_records_bytes: 16 << 20,
    };
    if let Ok(batch) = Batch::validate(data, limits, &mut Decompressor::new()) {
        assert!(crc_matches(data));
        assert!(batch.header().record_count() <= max_records);
        walk_batch(&batch);
        reencode(&batch);
        let trusted = Batch::trusted(data).expect("a valid batch is also a trusted one");
        assert_eq!(trusted.as_bytes(), batch.as_bytes());
    }
    let mut at = 0usize;
    for item in BatchIter::new(data) {
        match item {
            Ok(batch) => {
                assert!(crc_matches(batch.as_bytes()));
                assert_eq!(batch.as_bytes(), &data[at..at + batch.as_bytes().len()]);
                at += batch.as_bytes().len();
                // The CRC says nothing about the record layout: reading must not panic.
                // Decompression bounded as the broker bounds it.
                let mut d = Decompressor::new();
                if let Ok(records) = batch.records_bounded(&mut d, 16 << 20) {
                    for r in records.flatten() {
                        for _ in r.headers() {}
                    }
                }
            }
            Err(_) => break,
        }
    }
});
