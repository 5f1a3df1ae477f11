//! Segment recovery: arbitrary bytes as the segment file `00000000000000000000.log` of a
//! fresh partition directory on the real disk, opened with `PartitionLog::open` (the recovery
//! scan, torn-tail cut and corruption report) inside one glommio executor kept for the whole
//! process. Then everything from the log start to the high watermark is fetched: nothing may
//! panic, and every served batch must pass its CRC, hold the offset asked for, and follow the
//! one before. Last, one batch is appended and must read back as written, so recovery must
//! leave a log that works.
//!
//! Input: a flags byte, then optional parts, then the segment file:
//! - bit 0: a checkpoint follows (`u32` durable end, `u32` next offset, little-endian),
//!   with `clean` from bit 1;
//! - bit 2: an offset index follows (one byte N, then N entries of `u32` relative offset,
//!   `u32` position);
//! - the remaining bytes are the segment file. A flags byte of 0 makes the rest a plain
//!   segment file recovered without checkpoint or index.

#![no_main]

use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Duration;

use bytes::Bytes;
use corebus::record::batch::crc_matches;
use corebus::record::{BatchBuilder, BatchIter, RecordWriter};
use corebus::storage::checkpoint::Checkpoint;
use corebus::storage::{superblock, Durability, LogConfig, PartitionLog, StorageError};
use corebus_fuzz::{quietly, run, scratch_dir};
use libfuzzer_sys::fuzz_target;

const MAX_FETCH_BYTES: usize = 16 * 1024;
/// Fetches per input at most (each returns at least one batch, so this bounds the walk).
const MAX_FETCHES: usize = 10_000;

thread_local! {
    static ROOT: PathBuf = {
        let root = scratch_dir("segment_recovery");
        superblock::ensure(&root).expect("superblock");
        root
    };
    static RUNS: Cell<u64> = const { Cell::new(0) };
}

struct Input<'a> {
    checkpoint: Option<Checkpoint>,
    index: Option<&'a [u8]>,
    segment: &'a [u8],
}

fn take<'a>(data: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if data.len() < n {
        return None;
    }
    let (head, rest) = data.split_at(n);
    *data = rest;
    Some(head)
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

fn parse(mut data: &[u8]) -> Option<Input<'_>> {
    let flags = take(&mut data, 1)?[0];
    let checkpoint = if flags & 1 != 0 {
        let raw = take(&mut data, 8)?;
        Some(Checkpoint {
            segment_base: 0,
            durable_end: u64::from(u32_at(raw, 0)),
            next_offset: u64::from(u32_at(raw, 4)),
            log_start: 0,
            clean: flags & 2 != 0,
        })
    } else {
        None
    };
    let index = if flags & 4 != 0 {
        let n = usize::from(take(&mut data, 1)?[0]);
        Some(take(&mut data, 8 * n)?)
    } else {
        None
    };
    Some(Input {
        checkpoint,
        index,
        segment: data,
    })
}

fn config() -> Rc<LogConfig> {
    Rc::new(LogConfig {
        durability: Durability::Write,
        max_io_bytes: 64 * 1024,
        cache_bytes: 64 * 1024,
        index_interval_bytes: 512,
        preallocate_bytes: 64 * 1024,
        segment_bytes: 16 << 20,
        ..LogConfig::default()
    })
}

/// The next readable offset named by a `Corrupt` error of a fetch, if it names one.
fn next_readable(message: &str) -> Option<u64> {
    let (_, tail) = message.rsplit_once("the next readable offset is ")?;
    tail.trim().parse().ok()
}

async fn check(dir: &Path) {
    let log = match PartitionLog::open(dir, config()).await {
        Ok(log) => log,
        // Refusing to open is allowed (it is reported, not a panic); I/O must not fail here.
        Err(StorageError::Corrupt(_)) => return,
        Err(e) => panic!("opening the recovered log failed: {e}"),
    };
    let start = log.log_start_offset();
    let hw = log.high_watermark();
    assert!(start <= hw);
    let mut offset = start;
    let mut fetches = 0;
    while offset < hw && fetches < MAX_FETCHES {
        fetches += 1;
        match log.fetch(offset, MAX_FETCH_BYTES, Duration::ZERO).await {
            Ok(data) => {
                assert_eq!(data.high_watermark, hw);
                assert!(!data.out_of_range);
                if data.batches.is_empty() {
                    break; // nothing readable at or after `offset`
                }
                let mut first = true;
                let mut at = 0usize;
                let bytes = data.batches.contiguous();
                for batch in BatchIter::new(&bytes) {
                    let batch = batch.expect("a served batch fails its CRC");
                    assert!(crc_matches(batch.as_bytes()));
                    let h = batch.header();
                    // The first batch holds `offset` (or follows a gap); each next one follows.
                    assert!(
                        h.last_offset() >= offset && (first || h.base_offset() >= offset),
                        "fetch at {offset} served {}..={}",
                        h.base_offset(),
                        h.last_offset()
                    );
                    first = false;
                    offset = h.last_offset() + 1;
                    at += batch.as_bytes().len();
                }
                assert_eq!(at, data.batches.len(), "a fetch served a partial batch");
            }
            Err(StorageError::Corrupt(message)) => match next_readable(&message) {
                Some(next) => {
                    assert!(next > offset, "a corrupt range that does not move on");
                    offset = next;
                }
                None => break, // corruption met while reading: nothing more is served
            },
            Err(e) => panic!("fetch at {offset} of [{start}, {hw}) failed: {e}"),
        }
    }

    // The recovered log must take appends and serve them back as written.
    let mut builder = BatchBuilder::new();
    builder.push(&RecordWriter {
        timestamp_ms: 42,
        value: b"after recovery",
        ..RecordWriter::default()
    });
    let batch = builder.finish();
    let ticket = log
        .append(&[Bytes::from(batch.clone())], 7)
        .await
        .expect("append after recovery");
    let (base, last) = ticket.durable().await.expect("durable after recovery");
    assert_eq!((base, last), (hw, hw));
    let data = log
        .fetch(hw, MAX_FETCH_BYTES, Duration::ZERO)
        .await
        .expect("reading back the append");
    let bytes = data.batches.contiguous();
    let served = BatchIter::new(&bytes)
        .next()
        .expect("the appended batch")
        .expect("its CRC");
    assert_eq!(served.header().base_offset(), hw);
    assert_eq!(&served.as_bytes()[28..], &batch[28..]);
}

fuzz_target!(|data: &[u8]| {
    let Some(input) = parse(data) else {
        return;
    };
    let root = ROOT.with(Clone::clone);
    let run_id = RUNS.with(|r| {
        r.set(r.get() + 1);
        r.get()
    });
    let dir = root.join(format!("p{}", run_id % 2));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("partition directory");
    std::fs::write(dir.join("00000000000000000000.log"), input.segment).expect("segment file");
    if let Some(index) = input.index {
        std::fs::write(dir.join("00000000000000000000.index"), index).expect("index file");
    }
    if let Some(c) = input.checkpoint {
        c.save(&dir).expect("checkpoint");
    }
    quietly(|| {
        run(async move {
            thread_local!(static VERIFIED: Cell<bool> = const { Cell::new(false) });
            if !VERIFIED.with(Cell::get) {
                // glommio 0.9: the first DmaFile opened on a device must not be empty.
                superblock::verify(&root).await.expect("superblock check");
                VERIFIED.with(|v| v.set(true));
            }
            check(&dir).await;
        })
    });
});
