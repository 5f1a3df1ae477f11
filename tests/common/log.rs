//! In-process partition logs on a real filesystem with direct I/O, for the storage tests that
//! drive `PartitionLog` itself rather than the broker.

use std::rc::Rc;
use std::time::Duration;

use bytes::Bytes;
use corebus::record::{BatchBuilder, BatchIter, Decompressor, RecordWriter};
use corebus::storage::{LogConfig, PartitionLog};

/// glommio 0.9 breaks DMA reads on a device whose first DmaFile was empty: open the
/// (non-empty) superblock of a data directory first, as every broker shard does.
pub async fn prime_direct_io() {
    let dir = super::fresh_dir("superblock");
    corebus::storage::superblock::ensure(&dir).expect("superblock");
    corebus::storage::superblock::verify(&dir)
        .await
        .expect("direct-I/O self-test");
}

/// One batch holding `values`, in order, with timestamps from `first_ts`.
pub fn batch_of(values: &[String], first_ts: i64) -> Bytes {
    let mut b = BatchBuilder::new();
    for (i, value) in values.iter().enumerate() {
        b.push(&RecordWriter {
            timestamp_ms: first_ts + i as i64,
            value: value.as_bytes(),
            ..RecordWriter::default()
        });
    }
    Bytes::from(b.finish())
}

/// Records per batch of [`append_batches`]: batch boundaries are the multiples of 3.
pub const PER_BATCH: u64 = 3;

/// A log with small segments (`segment_kib` each), so that a few hundred batches span several.
pub fn small_segments(segment_kib: u64) -> Rc<LogConfig> {
    Rc::new(LogConfig {
        segment_bytes: segment_kib * 1024,
        preallocate_bytes: segment_kib * 512,
        index_interval_bytes: 1024,
        ..LogConfig::default()
    })
}

/// The value of the record at offset `i` written as `kind`.
pub fn value(kind: &str, i: u64) -> String {
    format!("{kind}-{i:05}-{}", "x".repeat((i % 29) as usize))
}

/// Appends `batches` batches of [`PER_BATCH`] records valued `value(kind, N)` (N the offset
/// each should land at) one by one, each waited for until durable and checked to land there.
pub async fn append_batches(log: &Rc<PartitionLog>, kind: &str, batches: u64) {
    for _ in 0..batches {
        let first = log.high_watermark();
        let values: Vec<String> = (first..first + PER_BATCH).map(|i| value(kind, i)).collect();
        let ticket = log
            .append(&[batch_of(&values, 1_000)], 1)
            .await
            .expect("append");
        let (base, last) = ticket.durable().await.expect("durable");
        assert_eq!((base, last), (first, first + PER_BATCH - 1));
    }
}

/// Every record readable from the log's start: (offset, value), in order.
pub async fn read_records(log: &Rc<PartitionLog>) -> Vec<(u64, String)> {
    try_read_records(log).await.expect("read the log")
}

/// Like [`read_records`], with what failed instead of a panic.
pub async fn try_read_records(log: &Rc<PartitionLog>) -> Result<Vec<(u64, String)>, String> {
    let mut records = Vec::new();
    let mut offset = log.log_start_offset();
    while offset < log.high_watermark() {
        let data = log
            .fetch(offset, 64 * 1024, Duration::ZERO)
            .await
            .map_err(|e| format!("fetch at {offset}: {e}"))?;
        let before = offset;
        let mut decompressor = Decompressor::new();
        for batch in BatchIter::new(&data.batches.contiguous()) {
            let batch = batch.map_err(|e| format!("batch at {offset}: {e}"))?;
            let base = batch.header().base_offset();
            let records_of = batch
                .records(&mut decompressor)
                .map_err(|e| format!("records at {base}: {e}"))?;
            for r in records_of {
                let r = r.map_err(|e| format!("record at {base}: {e}"))?;
                let at = base + u64::from(r.offset_delta);
                if at >= offset {
                    records.push((at, String::from_utf8_lossy(r.value).into_owned()));
                    offset = at + 1;
                }
            }
        }
        if offset == before {
            return Err(format!("a fetch at {offset} served nothing below the end"));
        }
    }
    Ok(records)
}

/// Every record value readable from the log's start, in order.
pub async fn read_all(log: &Rc<PartitionLog>) -> Vec<String> {
    read_records(log)
        .await
        .into_iter()
        .map(|(_, v)| v)
        .collect()
}
