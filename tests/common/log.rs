//! In-process partition logs on a real filesystem with direct I/O, for the storage tests that
//! drive `PartitionLog` itself rather than the broker.

use std::rc::Rc;
use std::time::Duration;

use bytes::Bytes;
use corebus::record::{BatchBuilder, BatchIter, Decompressor, RecordWriter};
use corebus::storage::PartitionLog;

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
