//! Truncation of a partition log (what a Raft follower does when its log diverged from a new
//! leader's), on a real filesystem with direct I/O: the cut lands on a batch boundary in any
//! segment, nothing past it is served or comes back after a restart, the log grows again from
//! the cut, and the idempotent producers forget the batches that were cut.

mod common;

use std::path::Path;
use std::rc::Rc;

use bytes::Bytes;
use common::log::{
    append_batches, prime_direct_io, read_records, small_segments, value, PER_BATCH,
};
use corebus::record::{BatchBuilder, BatchOptions, ProducerFields, RecordWriter};
use corebus::storage::segment;
use corebus::storage::{LogConfig, PartitionLog, StorageError};

fn config() -> Rc<LogConfig> {
    small_segments(32)
}

/// What the log should serve: `kind-N` at each offset N of `range`.
fn expected(kind: &str, range: std::ops::Range<u64>) -> Vec<(u64, String)> {
    range.map(|i| (i, value(kind, i))).collect()
}

async fn reopen(dir: &Path, log: Rc<PartitionLog>, clean: bool) -> Rc<PartitionLog> {
    if clean {
        log.close().await;
    }
    drop(log);
    PartitionLog::open(dir, config()).await.expect("reopen")
}

#[test]
fn a_truncation_cuts_back_to_a_batch_boundary_in_an_earlier_segment_and_the_log_grows_again() {
    corebus::runtime::block_on(None, async {
        prime_direct_io().await;
        let dir = common::fresh_dir("truncate-mid");
        let log = PartitionLog::open(&dir, config()).await.expect("open");
        append_batches(&log, "old", 400).await;
        let end = log.high_watermark();
        let bases = segment::list(&dir).expect("segments");
        assert!(bases.len() >= 3, "the log spans segments: {bases:?}");
        let cut = bases[1] + 5 * PER_BATCH;

        match log.truncate(cut + 1).await {
            Err(StorageError::NotABatchBoundary {
                batch_base,
                batch_last,
                ..
            }) => assert_eq!((batch_base, batch_last), (cut, cut + 2)),
            other => panic!("a cut inside a batch must be refused, got {other:?}"),
        }
        assert!(matches!(
            log.truncate(end + 3).await,
            Err(StorageError::OffsetOutOfRange { .. })
        ));
        log.truncate(end)
            .await
            .expect("a cut at the end cuts nothing");
        assert_eq!(log.high_watermark(), end);

        log.truncate(cut).await.expect("truncate");
        assert_eq!(log.high_watermark(), cut);
        assert_eq!(read_records(&log).await, expected("old", 0..cut));
        assert_eq!(
            segment::list(&dir).expect("segments"),
            bases[..2].to_vec(),
            "the later segments are gone"
        );
        // A restart without a clean stop scans the log: nothing past the cut comes back.
        let log = reopen(&dir, log, false).await;
        assert_eq!(log.high_watermark(), cut);
        assert_eq!(read_records(&log).await, expected("old", 0..cut));

        append_batches(&log, "new", 300).await;
        let grown = log.high_watermark();
        let mut want = expected("old", 0..cut);
        want.extend(expected("new", cut..grown));
        assert_eq!(read_records(&log).await, want);
        let log = reopen(&dir, log, false).await;
        assert_eq!(read_records(&log).await, want, "after a crash");
        let log = reopen(&dir, log, true).await;
        assert_eq!(read_records(&log).await, want, "after a clean stop");
        log.close().await;
        let _ = std::fs::remove_dir_all(&dir);
    })
    .expect("executor");
}

#[test]
fn a_truncation_to_a_segment_start_or_to_zero_empties_that_segment() {
    corebus::runtime::block_on(None, async {
        prime_direct_io().await;
        let dir = common::fresh_dir("truncate-base");
        let log = PartitionLog::open(&dir, config()).await.expect("open");
        append_batches(&log, "old", 300).await;
        let bases = segment::list(&dir).expect("segments");
        assert!(bases.len() >= 2, "the log spans segments: {bases:?}");

        log.truncate(bases[1])
            .await
            .expect("truncate to a segment's start");
        assert_eq!(log.high_watermark(), bases[1]);
        assert_eq!(read_records(&log).await, expected("old", 0..bases[1]));
        let log = reopen(&dir, log, false).await;
        assert_eq!(read_records(&log).await, expected("old", 0..bases[1]));

        log.truncate(0).await.expect("truncate everything");
        assert_eq!(log.high_watermark(), 0);
        assert!(read_records(&log).await.is_empty());
        let log = reopen(&dir, log, false).await;
        assert_eq!(log.high_watermark(), 0, "nothing comes back");
        append_batches(&log, "new", 50).await;
        let log = reopen(&dir, log, false).await;
        assert_eq!(read_records(&log).await, expected("new", 0..150));
        log.close().await;
        let _ = std::fs::remove_dir_all(&dir);
    })
    .expect("executor");
}

/// Append times must be recent: idempotent producers idle for a day are forgotten.
fn now() -> i64 {
    corebus::clock::now_ms()
}

fn producer_batch(base_sequence: u32, label: &str) -> Bytes {
    let mut b = BatchBuilder::new();
    for i in 0..PER_BATCH {
        let value = format!("{label}-{i}");
        b.push(&RecordWriter {
            timestamp_ms: 1_000,
            value: value.as_bytes(),
            ..RecordWriter::default()
        });
    }
    Bytes::from(b.finish_with(BatchOptions {
        producer: Some(ProducerFields {
            producer_id: 7,
            epoch: 0,
            base_sequence,
        }),
        ..BatchOptions::default()
    }))
}

#[test]
fn an_idempotent_producers_batch_that_was_cut_is_appended_again_when_resent() {
    corebus::runtime::block_on(None, async {
        prime_direct_io().await;
        let dir = common::fresh_dir("truncate-producers");
        let log = PartitionLog::open(&dir, config()).await.expect("open");
        // Enough batches to roll a few times: each roll saves the producers' snapshot.
        for n in 0..400u32 {
            let ticket = log
                .append(&[producer_batch(n * PER_BATCH as u32, "first")], now())
                .await
                .expect("append");
            ticket.durable().await.expect("durable");
        }
        let bases = segment::list(&dir).expect("segments");
        assert!(bases.len() >= 3, "the log spans segments: {bases:?}");
        // Cut below the offsets the last snapshot covers.
        let cut = bases[1] + PER_BATCH;
        log.truncate(cut).await.expect("truncate");
        // Other writers take the log back past where the producers' snapshot of before the
        // cut reached. A restart must not take that snapshot back: it remembers batches of
        // this producer at offsets that now hold others' records, and would answer a resend
        // of one of them with those offsets.
        // (With larger segments, as after an operator raised the segment size, no roll
        // replaces the snapshot on the way.)
        drop(log);
        let larger = Rc::new(LogConfig {
            segment_bytes: 1 << 20,
            ..(*config()).clone()
        });
        let log = PartitionLog::open(&dir, Rc::clone(&larger))
            .await
            .expect("reopen");
        append_batches(&log, "other", 400).await;
        assert_eq!(segment::list(&dir).expect("segments").len(), 2, "no roll");
        drop(log);
        let log = PartitionLog::open(&dir, larger).await.expect("reopen");
        let last_cut = producer_batch(399 * PER_BATCH as u32, "first");
        match log.append(&[last_cut], now()).await {
            Err(StorageError::Sequence(_)) => {}
            Ok(ticket) => panic!(
                "a resend of a batch that was cut was taken for a duplicate at {:?}",
                ticket.durable().await
            ),
            Err(e) => panic!("unexpected error {e}"),
        }
        // The batch after the last one kept is appended anew, at the end.
        let end = log.high_watermark();
        let resend = (cut / PER_BATCH) as u32 * PER_BATCH as u32;
        let appended = log
            .append(&[producer_batch(resend, "second")], now())
            .await
            .expect("a resend of the first batch cut")
            .durable()
            .await
            .expect("durable");
        assert_eq!(appended, (end, end + 2), "appended anew");
        let log = reopen(&dir, log, false).await;
        let records = read_records(&log).await;
        assert_eq!(records.len() as u64, end + PER_BATCH);
        assert_eq!(records[end as usize].1, "second-0");
        log.close().await;
        let _ = std::fs::remove_dir_all(&dir);
    })
    .expect("executor");
}
