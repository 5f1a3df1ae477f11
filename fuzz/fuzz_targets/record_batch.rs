//! The record-batch parser: `Batch::validate` on arbitrary bytes; a valid batch has every
//! record and header read, and re-encoding its records gives back the same bytes. Then
//! `BatchIter` over the whole input (as a client reads a fetch reply).
//!
//! Input: the bytes, with a `max_records` limit taken from the input's length.

#![no_main]

use corebus::record::batch::crc_matches;
use corebus::record::{Batch, BatchBuilder, BatchIter, RecordWriter, HEADER_LEN};
use corebus_fuzz::walk_batch;
use libfuzzer_sys::fuzz_target;

/// Re-encodes the records of a valid batch and checks that the same record bytes come back.
fn reencode(batch: &Batch<'_>) {
    let mut builder = BatchBuilder::new();
    let mut header_lists = Vec::new();
    let records: Vec<_> = batch.records().map(|r| r.expect("validated")).collect();
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
    let again = Batch::validate(&bytes, u32::MAX).expect("a re-encoded batch must validate");
    assert_eq!(again.as_bytes().len(), batch.as_bytes().len());
    assert_eq!(
        &bytes[HEADER_LEN..],
        &batch.as_bytes()[HEADER_LEN..],
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
    if let Ok(batch) = Batch::validate(data, max_records) {
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
                for r in batch.records().flatten() {
                    for _ in r.headers() {}
                }
            }
            Err(_) => break,
        }
    }
});
