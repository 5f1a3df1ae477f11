//! Recovery of a partition log from damaged files, on a real filesystem with direct I/O:
//! every cut point of a torn tail, and checksum failures inside acknowledged data.

mod common;

use std::path::Path;
use std::rc::Rc;
use std::time::Duration;

use bytes::Bytes;
use common::log::{prime_direct_io, read_all};
use corebus::metrics::StorageMetrics;
use corebus::record::{BatchBuilder, BatchIter, RecordWriter, HEADER_PREFIX_LEN};
use corebus::storage::checkpoint::Checkpoint;
use corebus::storage::{LogConfig, PartitionLog, PrewriteConfig, ShardSync};

const SEGMENT: &str = "00000000000000000000.log";

fn config() -> Rc<LogConfig> {
    Rc::new(LogConfig {
        preallocate_bytes: 64 * 1024,
        ..LogConfig::default()
    })
}

/// The value of record `i` in the batches of [`batch`].
fn value_of(i: u64) -> String {
    format!("record-{i:05}-{}", "p".repeat((i % 37) as usize))
}

fn batch(first: u64, records: u64) -> Bytes {
    let mut b = BatchBuilder::new();
    for i in first..first + records {
        let value = value_of(i);
        b.push(&RecordWriter {
            timestamp_ms: 1_000 + i as i64,
            value: value.as_bytes(),
            ..RecordWriter::default()
        });
    }
    Bytes::from(b.finish())
}

/// Writes `batches` batches of 3 records and closes the log; returns the end byte of each.
async fn write_log(dir: &Path, batches: u64) -> Vec<u64> {
    let log = PartitionLog::open(dir, config()).await.expect("open");
    let mut ends = Vec::new();
    let mut end = 0u64;
    for b in 0..batches {
        let bytes = batch(b * 3, 3);
        end += bytes.len() as u64;
        ends.push(end);
        let ticket = log.append(&[bytes], 1).await.expect("append");
        ticket.durable().await.expect("durable");
    }
    log.close().await;
    ends
}

#[test]
fn every_cut_point_of_a_torn_tail_recovers_exactly_the_complete_batches() {
    let outcome = corebus::runtime::block_on(None, async {
        prime_direct_io().await;
        let source = common::fresh_dir("torn-source");
        let ends = write_log(&source, 60).await;
        let total = *ends.last().expect("batches");
        let original = std::fs::read(source.join(SEGMENT)).expect("segment");
        let mut checked = 0;
        for cut in total.saturating_sub(4096)..total {
            let dir = common::fresh_dir("torn-cut");
            std::fs::write(dir.join(SEGMENT), &original[..cut as usize]).expect("cut copy");
            let log = PartitionLog::open(&dir, config()).await.expect("recovers");
            let complete = ends.iter().filter(|&&e| e <= cut).count() as u64;
            assert_eq!(log.high_watermark(), complete * 3, "cut at byte {cut}");
            let values = read_all(&log).await;
            assert_eq!(values.len() as u64, complete * 3, "cut at byte {cut}");
            if cut % 97 == 0 {
                // The log takes appends again right after the cut point.
                let ticket = log
                    .append(&[batch(complete * 3, 3)], 2)
                    .await
                    .expect("append");
                assert_eq!(
                    ticket.durable().await.expect("durable"),
                    (complete * 3, complete * 3 + 2)
                );
                log.close().await;
                drop(log);
                let reopened = PartitionLog::open(&dir, config()).await.expect("reopen");
                assert_eq!(read_all(&reopened).await.len() as u64, complete * 3 + 3);
            }
            let _ = std::fs::remove_dir_all(&dir);
            checked += 1;
        }
        let _ = std::fs::remove_dir_all(&source);
        checked
    })
    .expect("executor");
    assert_eq!(outcome, 4096);
}

#[test]
fn a_bad_checksum_in_acknowledged_data_is_kept_reported_and_skipped() {
    corebus::runtime::block_on(None, async {
        prime_direct_io().await;
        let dir = common::fresh_dir("scan-corrupt");
        let ends = write_log(&dir, 40).await;
        // Damage a record of batch 37 (after the last index entry, so the scan meets it), and
        // drop the clean-shutdown flag so that recovery scans.
        let path = dir.join(SEGMENT);
        let mut bytes = std::fs::read(&path).expect("segment");
        let damaged_at = ends[36] as usize + 80;
        bytes[damaged_at] ^= 0x20;
        std::fs::write(&path, &bytes).expect("write");
        let mut c = Checkpoint::load(&dir).expect("checkpoint");
        assert!(c.clean);
        c.clean = false;
        c.save(&dir).expect("save");

        let log = PartitionLog::open(&dir, config()).await.expect("opens");
        assert_eq!(log.high_watermark(), 120, "nothing is truncated");
        assert_eq!(log.stats().corrupt_ranges, 1);
        let err = log
            .fetch(111, 1 << 20, Duration::ZERO)
            .await
            .expect_err("corrupt");
        assert!(err.to_string().contains("111..=113"), "{err}");
        let after = log
            .fetch(114, 1 << 20, Duration::ZERO)
            .await
            .expect("after");
        assert!(!after.batches.is_empty());
        let before = log.fetch(0, 1 << 20, Duration::ZERO).await.expect("before");
        let served: u32 = BatchIter::new(&before.batches.contiguous())
            .map(|b| b.expect("ok").header().record_count())
            .sum();
        assert_eq!(
            served, 111,
            "everything before the damage is served, nothing of it"
        );
        // Appends continue after the end, not over the damaged range.
        let ticket = log.append(&[batch(120, 3)], 3).await.expect("append");
        assert_eq!(ticket.durable().await.expect("durable"), (120, 122));
        let _ = std::fs::remove_dir_all(&dir);
    })
    .expect("executor");
}

/// Changes the segment's bytes in `dir` with `damage`, then makes the checkpoint lag as after
/// a crash: the last one was written when batches `..acked` were durable, and those after them
/// were acknowledged since.
fn damage_and_lag_checkpoint(
    dir: &Path,
    ends: &[u64],
    acked: usize,
    damage: impl FnOnce(&mut Vec<u8>),
) {
    let path = dir.join(SEGMENT);
    let mut bytes = std::fs::read(&path).expect("segment");
    damage(&mut bytes);
    std::fs::write(&path, &bytes).expect("write");
    let mut c = Checkpoint::load(dir).expect("checkpoint");
    c.clean = false;
    c.durable_end = ends[acked - 1];
    c.next_offset = acked as u64 * 3;
    c.save(dir).expect("save");
}

/// Asserts that a read of `first..=last` fails as corrupt and that `served` records follow.
async fn assert_refused_then_served(log: &Rc<PartitionLog>, first: u64, last: u64, served: u32) {
    let err = log
        .fetch(first, 1 << 20, Duration::ZERO)
        .await
        .expect_err("corrupt");
    let range = format!("{first}..={last}");
    assert!(err.to_string().contains(&range), "{err}");
    if served == 0 {
        return;
    }
    let after = log
        .fetch(last + 1, 1 << 20, Duration::ZERO)
        .await
        .expect("after");
    let count: u32 = BatchIter::new(&after.batches.contiguous())
        .map(|b| b.expect("ok").header().record_count())
        .sum();
    assert_eq!(count, served, "the batches after the damage are served");
}

/// Issue 16, finding 2: the checkpoint's durable end lags the acknowledgements by up to a
/// checkpoint interval. A damaged batch after it, followed by valid batches with continuing
/// offsets, was acknowledged (a later batch could only be written after its flush synced):
/// it is reported as corruption, and neither it nor what follows is cut, so no offset that
/// may have been acknowledged is handed out again.
#[test]
fn damage_past_the_checkpoint_followed_by_valid_batches_is_corruption_not_a_torn_tail() {
    corebus::runtime::block_on(None, async {
        prime_direct_io().await;
        let dir = common::fresh_dir("scan-lagging-checkpoint");
        let ends = write_log(&dir, 40).await;
        // The last checkpoint was written before batches 35.. were acknowledged.
        damage_and_lag_checkpoint(&dir, &ends, 35, |bytes| {
            bytes[ends[36] as usize + 80] ^= 0x20;
        });

        let log = PartitionLog::open(&dir, config()).await.expect("opens");
        assert_eq!(log.high_watermark(), 120, "nothing acknowledged is cut");
        assert_eq!(log.stats().corrupt_ranges, 1);
        assert_refused_then_served(&log, 111, 113, 6).await;
        let ticket = log.append(&[batch(120, 3)], 3).await.expect("append");
        assert_eq!(ticket.durable().await.expect("durable"), (120, 122));
        let _ = std::fs::remove_dir_all(&dir);
    })
    .expect("executor");
}

/// The last batch of the log, acknowledged after the last checkpoint and then damaged on the
/// medium (a flipped bit, no lost sector): refused as corrupt, not cut, so that its offsets
/// are not handed out again; appends go on after it. A torn last batch (a lost sector reads as
/// zeros) is still cut.
#[test]
fn a_damaged_last_batch_is_refused_and_a_torn_one_is_cut() {
    corebus::runtime::block_on(None, async {
        prime_direct_io().await;
        // A last batch whose bytes after its header reach into the next sector (a torn write
        // can lose that sector alone).
        let scratch = common::fresh_dir("last-batch-scratch");
        let all = write_log(&scratch, 80).await;
        let _ = std::fs::remove_dir_all(&scratch);
        let k = (36..80)
            .find(|&k| {
                (all[k - 1] as usize + HEADER_PREFIX_LEN).next_multiple_of(512) + 32
                    < all[k] as usize
            })
            .expect("a batch across a sector boundary");
        let first = k as u64 * 3;
        for (name, torn) in [("rotted-last", false), ("torn-last", true)] {
            let dir = common::fresh_dir(name);
            let ends = write_log(&dir, k as u64 + 1).await;
            let (start, end) = (ends[k - 1] as usize, ends[k] as usize);
            damage_and_lag_checkpoint(&dir, &ends, k - 4, |bytes| {
                if torn {
                    // The batch's bytes in its lost second sector read as zeros.
                    bytes[(start + HEADER_PREFIX_LEN).next_multiple_of(512)..end].fill(0);
                } else {
                    bytes[start + 70] ^= 0x04;
                }
            });

            let log = PartitionLog::open(&dir, config()).await.expect("opens");
            if torn {
                assert_eq!(log.high_watermark(), first, "the torn batch is cut");
                assert_eq!(log.stats().corrupt_ranges, 0);
            } else {
                assert_eq!(log.high_watermark(), first + 3, "the damaged batch is kept");
                assert_eq!(log.stats().corrupt_ranges, 1);
                assert_refused_then_served(&log, first, first + 2, 0).await;
            }
            let next = log.high_watermark();
            let ticket = log.append(&[batch(next, 3)], 3).await.expect("append");
            assert_eq!(ticket.durable().await.expect("durable"), (next, next + 2));
            log.close().await;
            let _ = std::fs::remove_dir_all(&dir);
        }
    })
    .expect("executor");
}

/// As above with the damage in the batch's header: nothing tells where the batch ends, but a
/// valid batch of later offsets further on says the damaged one was written before it, so it
/// is corruption too, and what follows it (acknowledged within the last second) is kept.
#[test]
fn a_damaged_header_past_the_checkpoint_followed_by_valid_batches_is_corruption() {
    corebus::runtime::block_on(None, async {
        prime_direct_io().await;
        let dir = common::fresh_dir("scan-damaged-header");
        let ends = write_log(&dir, 40).await;
        damage_and_lag_checkpoint(&dir, &ends, 35, |bytes| {
            bytes[ends[35] as usize + 28] ^= 0x7f; // batch 36's magic: its header is not valid
        });

        let log = PartitionLog::open(&dir, config()).await.expect("opens");
        assert_eq!(log.high_watermark(), 120, "nothing acknowledged is cut");
        assert_eq!(log.stats().corrupt_ranges, 1);
        assert_refused_then_served(&log, 108, 110, 9).await;
        let _ = std::fs::remove_dir_all(&dir);
    })
    .expect("executor");
}

/// A torn flush can lose a block and keep later ones: zeros end the scan there, and the valid
/// batches kept past them (never acknowledged) are cleared at open, so that no later scan
/// takes them for data once new appends reach them.
#[test]
fn valid_batches_past_zeros_at_the_end_are_cleared_at_open() {
    corebus::runtime::block_on(None, async {
        prime_direct_io().await;
        let dir = common::fresh_dir("stale-past-zeros");
        let ends = write_log(&dir, 200).await;
        let path = dir.join(SEGMENT);
        // A batch end with room for a header before its block ends: zeros from there to the
        // block's end, as a lost block would leave.
        let (i, end) = ends
            .iter()
            .enumerate()
            .map(|(i, &e)| (i, e as usize))
            .find(|&(i, e)| i > 50 && e.next_multiple_of(4096) - e >= 100)
            .expect("a batch end");
        damage_and_lag_checkpoint(&dir, &ends, i - 9, |bytes| {
            let block_end = end.next_multiple_of(4096);
            bytes[end..block_end].fill(0);
            assert!(
                bytes[block_end..].iter().any(|&b| b != 0),
                "batches lie past it"
            );
        });
        // The index never leads the checkpoint: without it the scan starts at the beginning.
        std::fs::remove_file(path.with_extension("index")).expect("no index");

        let log = PartitionLog::open(&dir, config()).await.expect("opens");
        assert_eq!(log.high_watermark(), (i as u64 + 1) * 3);
        let after = std::fs::read(&path).expect("segment");
        assert!(
            after[end..].iter().all(|&b| b == 0),
            "nothing past the end is left to be read as data"
        );
        log.close().await;
        let _ = std::fs::remove_dir_all(&dir);
    })
    .expect("executor");
}

/// Regression (found by the `segment_recovery` fuzz target): damaged bytes in acknowledged
/// data that hold no offset, i.e. the next valid batch is the one the scan expects. Recovery
/// used to report the range `expected..=next - 1`: an overflow panic for offset 0 (debug
/// builds) or, wrapped, a corrupt range `0..=u64::MAX` that refused every read of the
/// partition (release builds). Nothing is lost, so nothing may be refused. The junk between
/// batches also covers the read path: a fetch whose window reaches damaged bytes with an
/// invalid length after the batches it wants serves those batches instead of failing.
#[test]
fn damaged_bytes_that_hold_no_offset_refuse_nothing() {
    corebus::runtime::block_on(None, async {
        prime_direct_io().await;
        let source = common::fresh_dir("junk-source");
        let ends = write_log(&source, 5).await;
        let total = *ends.last().expect("batches") as usize;
        let original = std::fs::read(source.join(SEGMENT)).expect("segment");
        let junk = [0xabu8; 64];
        // Junk before the first batch (offset 0 expected) and between batches 2 and 3.
        for at in [0, ends[1] as usize] {
            let dir = common::fresh_dir("junk");
            let mut bytes = original[..at].to_vec();
            bytes.extend_from_slice(&junk);
            bytes.extend_from_slice(&original[at..total]);
            bytes.resize(64 * 1024, 0);
            std::fs::write(dir.join(SEGMENT), &bytes).expect("damaged copy");
            Checkpoint {
                segment_base: 0,
                durable_end: (total + junk.len()) as u64,
                next_offset: 15,
                log_start: 0,
                clean: false,
            }
            .save(&dir)
            .expect("checkpoint");

            let log = PartitionLog::open(&dir, config()).await.expect("opens");
            assert_eq!(log.high_watermark(), 15, "junk at byte {at}");
            assert_eq!(log.stats().corrupt_ranges, 0, "junk at byte {at}");
            let values = read_all(&log).await;
            assert_eq!(
                values.len(),
                15,
                "junk at byte {at}: every record is served"
            );
            let ticket = log.append(&[batch(15, 3)], 3).await.expect("append");
            assert_eq!(ticket.durable().await.expect("durable"), (15, 17));
            let _ = std::fs::remove_dir_all(&dir);
        }
        let _ = std::fs::remove_dir_all(&source);
    })
    .expect("executor");
}

/// Regression (found by the `segment_recovery` fuzz target): an active segment file shorter
/// than its checkpoint's durable end (acknowledged bytes lost with the end of the file).
/// Recovery reported the lost offsets but set the log's end to the checkpoint's durable end,
/// past the file's last byte; the tail block read from the file was then short, and the next
/// flush wrote its batches below the positions it indexed (a debug assertion in debug
/// builds; in release builds appended data that could not be read back after a restart).
#[test]
fn a_segment_shorter_than_its_checkpoint_reports_the_loss_and_keeps_appending() {
    corebus::runtime::block_on(None, async {
        prime_direct_io().await;
        let dir = common::fresh_dir("short-file");
        let ends = write_log(&dir, 5).await;
        let total = *ends.last().expect("batches");
        let path = dir.join(SEGMENT);
        let cut = ends[2] + 30; // inside batch 4 (offsets 9..=11)
        let bytes = std::fs::read(&path).expect("segment");
        std::fs::write(&path, &bytes[..cut as usize]).expect("cut");
        Checkpoint {
            segment_base: 0,
            durable_end: total,
            next_offset: 15,
            log_start: 0,
            clean: false,
        }
        .save(&dir)
        .expect("checkpoint");

        let log = PartitionLog::open(&dir, config()).await.expect("opens");
        assert_eq!(log.high_watermark(), 15, "offsets are never reused");
        assert_eq!(log.stats().corrupt_ranges, 1);
        let err = log
            .fetch(9, 1 << 20, Duration::ZERO)
            .await
            .expect_err("lost offsets are refused");
        assert!(err.to_string().contains("9..=14"), "{err}");
        let ticket = log.append(&[batch(15, 3)], 3).await.expect("append");
        assert_eq!(ticket.durable().await.expect("durable"), (15, 17));
        log.close().await;
        drop(log);

        let log = PartitionLog::open(&dir, config()).await.expect("reopens");
        assert_eq!(log.high_watermark(), 18);
        let data = log
            .fetch(15, 1 << 20, Duration::ZERO)
            .await
            .expect("read back");
        let bytes = data.batches.contiguous();
        let batch = BatchIter::new(&bytes)
            .next()
            .expect("a batch")
            .expect("its CRC");
        assert_eq!(batch.header().base_offset(), 15);
        let before = log.fetch(0, 1 << 20, Duration::ZERO).await.expect("before");
        let served: u32 = BatchIter::new(&before.batches.contiguous())
            .map(|b| b.expect("ok").header().record_count())
            .sum();
        assert_eq!(served, 9);
        let _ = std::fs::remove_dir_all(&dir);
    })
    .expect("executor");
}

/// Regression (found by the `segment_recovery` fuzz target): the base offset of a stored
/// batch is outside its CRC, so damage there passed the read path's check and a fetch served
/// the batch under the damaged offset (a reader asking for offset 0 got "offset 18834", then
/// offsets going backwards). Reads now check that each batch's base offset continues the walk
/// from the index entry, and treat a batch that does not as damaged.
#[test]
fn a_damaged_base_offset_is_refused_not_served() {
    corebus::runtime::block_on(None, async {
        prime_direct_io().await;
        let dir = common::fresh_dir("bad-base");
        write_log(&dir, 40).await; // more than one index interval: the last entry is past batch 0
        let path = dir.join(SEGMENT);
        let mut bytes = std::fs::read(&path).expect("segment");
        bytes[..8].copy_from_slice(&18_834u64.to_le_bytes());
        std::fs::write(&path, &bytes).expect("damage");

        // A clean start trusts the checkpoint: no scan sees the damage, reads must.
        let log = PartitionLog::open(&dir, config()).await.expect("opens");
        assert_eq!(log.high_watermark(), 120);
        assert_eq!(log.stats().corrupt_ranges, 0, "no scan met the damage");
        let err = log
            .fetch(0, 1 << 20, Duration::ZERO)
            .await
            .expect_err("the damaged batch is not served");
        assert!(err.to_string().contains("base offset"), "{err}");
        let after = log.fetch(3, 1 << 20, Duration::ZERO).await.expect("after");
        let bases: Vec<u64> = BatchIter::new(&after.batches.contiguous())
            .map(|b| b.expect("CRC").header().base_offset())
            .collect();
        assert_eq!(bases, (1..40).map(|b| b * 3).collect::<Vec<u64>>());
        let _ = std::fs::remove_dir_all(&dir);
    })
    .expect("executor");
}

/// Regression (found by the `segment_recovery` fuzz target, as a hang): a log whose end is not
/// at a batch boundary (here a clean-shutdown checkpoint whose durable end lies 30 bytes past
/// the last batch). A fetch that walked to the last, partial piece found fewer bytes than a
/// batch header, made no progress, and read the same bytes again forever. It now fails with
/// `Corrupt`, and the batches before are still served.
#[test]
fn a_log_ending_inside_a_batch_header_fails_the_read_instead_of_looping() {
    corebus::runtime::block_on(None, async {
        prime_direct_io().await;
        let dir = common::fresh_dir("mid-header-end");
        let ends = write_log(&dir, 5).await;
        let total = *ends.last().expect("batches");
        Checkpoint {
            segment_base: 0,
            durable_end: total + 30,
            next_offset: 18,
            log_start: 0,
            clean: true,
        }
        .save(&dir)
        .expect("checkpoint");
        let log = PartitionLog::open(&dir, config()).await.expect("opens");
        assert_eq!(log.high_watermark(), 18);
        let read = futures_lite::future::or(
            async { Some(log.fetch(15, 1 << 20, Duration::ZERO).await) },
            async {
                glommio::timer::sleep(Duration::from_secs(10)).await;
                None
            },
        )
        .await
        .expect("the fetch must not hang");
        let err = read.expect_err("nothing readable at offset 15");
        assert!(err.to_string().contains("ends inside"), "{err}");
        let before = log.fetch(0, 1 << 20, Duration::ZERO).await.expect("before");
        assert_eq!(BatchIter::new(&before.batches.contiguous()).count(), 5);
        let _ = std::fs::remove_dir_all(&dir);
    })
    .expect("executor");
}

/// A batch of 3 records of about 4 KiB each, their values telling their offsets.
fn big_batch(first: u64) -> (Bytes, Vec<String>) {
    let mut b = BatchBuilder::new();
    let mut values = Vec::new();
    for i in first..first + 3 {
        let value = format!("{i:08}-{}", "z".repeat(4000 + (i % 97) as usize));
        b.push(&RecordWriter {
            timestamp_ms: 1_000 + i as i64,
            value: value.as_bytes(),
            ..RecordWriter::default()
        });
        values.push(value);
    }
    (Bytes::from(b.finish()), values)
}

#[test]
fn zero_filling_ahead_never_touches_data_across_refills_rolls_and_restarts() {
    let metrics = Rc::new(StorageMetrics::default());
    let config = Rc::new(LogConfig {
        preallocate_bytes: 2 << 20,
        segment_bytes: 2 << 20,
        // Zero-filling takes several pieces, so appends catch up with one in flight.
        prewrite: PrewriteConfig {
            ahead_bytes: 1 << 20,
            shard_budget_bytes: 4 << 20,
            max_flush_bytes: 1 << 20,
        },
        metrics: Rc::clone(&metrics),
        ..LogConfig::default()
    });
    corebus::runtime::block_on(None, async move {
        prime_direct_io().await;
        let dir = common::fresh_dir("prewrite");
        let log = PartitionLog::open(&dir, Rc::clone(&config))
            .await
            .expect("open");
        assert_eq!(metrics.open_logs.get(), 1);
        let mut expected = Vec::new();
        // Waves of appends in flight together, so that flushes follow each other closely
        // and run beside the zero-filling.
        for wave in 0..12u64 {
            let mut tickets = Vec::new();
            for k in 0..64u64 {
                let (bytes, values) = big_batch((wave * 64 + k) * 3);
                expected.extend(values);
                tickets.push(log.append(&[bytes], 1).await.expect("append"));
            }
            for t in tickets {
                t.durable().await.expect("durable");
            }
        }
        assert!(
            metrics.prewritten_bytes.get() > 0,
            "small flushes must have zero-filled ahead"
        );
        assert!(
            metrics.prewrites_cut_short.get() > 0,
            "flushes must have caught up with a zero-fill and stopped it"
        );
        assert!(log.stats().segments > 2, "the log must have rolled");
        assert_eq!(read_all(&log).await, expected);
        log.close().await;
        drop(log);
        assert_eq!(metrics.open_logs.get(), 0);
        let reopened = PartitionLog::open(&dir, Rc::clone(&config))
            .await
            .expect("reopen");
        assert_eq!(read_all(&reopened).await, expected);
        let _ = std::fs::remove_dir_all(&dir);
    })
    .expect("executor");
}

/// A reader catching up from disk is served through the read-ahead (each window read while
/// the previous one is processed, and awaited rather than read again when the reader comes
/// first); a reader that jumps back drops it and still gets exactly what was stored.
/// A retention pass checkpoints the new log start, then unlinks; a power cut may keep any
/// subset of its unlinks. Recovery removes the rest instead of serving a log with a gap.
#[test]
fn a_retention_pass_cut_short_is_finished_at_open() {
    let config = Rc::new(LogConfig {
        preallocate_bytes: 64 * 1024,
        segment_bytes: 64 * 1024,
        ..LogConfig::default()
    });
    corebus::runtime::block_on(None, async move {
        prime_direct_io().await;
        let dir = common::fresh_dir("retention-cut-short");
        let log = PartitionLog::open(&dir, Rc::clone(&config))
            .await
            .expect("open");
        for k in 0..60u64 {
            let (bytes, _) = big_batch(k * 3);
            let ticket = log.append(&[bytes], 1).await.expect("append");
            ticket.durable().await.expect("durable");
        }
        log.close().await;
        drop(log);
        let mut bases: Vec<u64> = std::fs::read_dir(&dir)
            .expect("list")
            .filter_map(|e| {
                e.ok()?
                    .file_name()
                    .to_str()?
                    .strip_suffix(".log")?
                    .parse()
                    .ok()
            })
            .collect();
        bases.sort_unstable();
        assert!(bases.len() >= 4, "segments: {bases:?}");
        // The pass checkpointed a start of bases[2]; only the unlinks of bases[1] survived.
        let mut checkpoint = Checkpoint::load(&dir).expect("checkpoint");
        checkpoint.log_start = bases[2];
        checkpoint.save(&dir).expect("save");
        for ext in ["log", "index", "timeindex"] {
            let _ = std::fs::remove_file(dir.join(format!("{:020}.{ext}", bases[1])));
        }
        let log = PartitionLog::open(&dir, Rc::clone(&config))
            .await
            .expect("reopen");
        assert_eq!(log.log_start_offset(), bases[2]);
        assert_eq!(log.stats().corrupt_ranges, 0, "no gap is reported");
        assert!(!dir.join(format!("{:020}.log", bases[0])).exists());
        let data = log
            .fetch(bases[2], 64 * 1024, Duration::ZERO)
            .await
            .expect("fetch at the log start");
        let bytes = data.batches.contiguous();
        let first = BatchIter::new(&bytes)
            .next()
            .expect("a batch")
            .expect("CRC");
        assert_eq!(first.header().base_offset(), bases[2]);
        log.close().await;
        let _ = std::fs::remove_dir_all(&dir);
    })
    .expect("executor");
}

#[test]
fn catching_up_from_disk_through_the_read_ahead_serves_every_record_once() {
    let metrics = Rc::new(StorageMetrics::default());
    let config = Rc::new(LogConfig {
        preallocate_bytes: 1 << 20,
        segment_bytes: 1 << 20,
        cache_bytes: 16 * 1024,
        metrics: Rc::clone(&metrics),
        ..LogConfig::default()
    });
    corebus::runtime::block_on(None, async move {
        prime_direct_io().await;
        let dir = common::fresh_dir("read-ahead");
        let log = PartitionLog::open(&dir, Rc::clone(&config))
            .await
            .expect("open");
        let mut expected = Vec::new();
        for k in 0..200u64 {
            let (bytes, values) = big_batch(k * 3);
            expected.extend(values);
            let ticket = log.append(&[bytes], 1).await.expect("append");
            ticket.durable().await.expect("durable");
        }
        assert!(log.stats().segments > 1, "the log must span segments");
        assert_eq!(read_all(&log).await, expected);
        let from_disk = metrics.fetched_from_disk_bytes.get();
        assert!(
            from_disk > 2 << 20,
            "most of the log is older than the 16 KiB tail, yet only {from_disk} bytes came from disk"
        );
        // The newest batch is in the 16 KiB tail cache: a read of it is served from memory.
        let tail = log
            .fetch(log.high_watermark() - 1, 64 * 1024, Duration::ZERO)
            .await
            .expect("fetch the tail");
        assert!(!tail.batches.is_empty());
        assert!(metrics.fetched_from_memory_bytes.get() > 0);
        // Jump back into the first segment after reading far ahead.
        let data = log
            .fetch(30, 64 * 1024, Duration::ZERO)
            .await
            .expect("fetch");
        let bytes = data.batches.contiguous();
        let first = BatchIter::new(&bytes)
            .next()
            .expect("a batch")
            .expect("its CRC");
        assert_eq!(first.header().base_offset(), 30);
        assert_eq!(read_all(&log).await, expected);
        log.close().await;
        let _ = std::fs::remove_dir_all(&dir);
    })
    .expect("executor");
}

/// With the shard's shared disk flush, a flush that only overwrites blocks an `fdatasync`
/// committed (the prewritten stretch) waits for one flush of the disk's cache shared by the
/// partitions that wrote meanwhile; a flush into blocks not yet committed syncs its own file.
/// A data directory's superblock made in `dir`, and a log config whose flushes share the
/// disk flush of `dir`'s filesystem (ext4 or XFS), zero-filling 1 MiB ahead.
async fn shared_flush_config(
    dir: &Path,
    metrics: &Rc<StorageMetrics>,
    preallocate_bytes: u64,
) -> Rc<LogConfig> {
    corebus::storage::superblock::ensure(dir).expect("superblock");
    corebus::storage::superblock::verify(dir)
        .await
        .expect("direct-I/O self-test");
    let syncer = ShardSync::disk_flush(dir, Rc::clone(metrics))
        .await
        .expect("statfs")
        .expect("the test directory must be on ext4 or XFS");
    Rc::new(LogConfig {
        preallocate_bytes,
        prewrite: PrewriteConfig {
            ahead_bytes: 1 << 20,
            shard_budget_bytes: 8 << 20,
            max_flush_bytes: 512 << 10,
        },
        shard_sync: Some(syncer),
        metrics: Rc::clone(metrics),
        ..LogConfig::default()
    })
}

/// Waits until some zero-fill has ended and none is in flight.
async fn prewrites_done(metrics: &StorageMetrics) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while metrics.prewrites_in_flight.get() > 0 || metrics.prewritten_bytes.get() == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the zero-fills did not end"
        );
        glommio::timer::sleep(Duration::from_millis(1)).await;
    }
}

#[test]
fn flushes_that_only_overwrite_committed_blocks_share_one_disk_flush() {
    let metrics = Rc::new(StorageMetrics::default());
    corebus::runtime::block_on(None, async move {
        let dir = common::fresh_dir("shared-flush");
        let config = shared_flush_config(&dir, &metrics, 2 << 20).await;
        let mut logs = Vec::new();
        for p in 0..4 {
            let log_dir = dir.join(format!("p{p}"));
            std::fs::create_dir_all(&log_dir).expect("log dir");
            let log = PartitionLog::open(&log_dir, Rc::clone(&config))
                .await
                .expect("open");
            logs.push((log_dir, log));
        }
        // A fresh segment: nothing committed yet, so each log syncs its own file.
        for (_, log) in &logs {
            let ticket = log.append(&[batch(0, 3)], 1).await.expect("append");
            ticket.durable().await.expect("durable");
        }
        assert_eq!(metrics.file_synced_flushes.get(), 4);
        assert_eq!(metrics.shard_synced_flushes.get(), 0);
        // Then each zero-fills ahead and commits that with an fdatasync of its own.
        prewrites_done(&metrics).await;
        // Four writes in flight together: all overwrite committed blocks, one disk flush.
        let mut tickets = Vec::new();
        for (_, log) in &logs {
            tickets.push(log.append(&[batch(3, 3)], 1).await.expect("append"));
        }
        for t in tickets {
            t.durable().await.expect("durable");
        }
        assert_eq!(metrics.file_synced_flushes.get(), 4);
        assert_eq!(metrics.shard_synced_flushes.get(), 4);
        assert_eq!(metrics.shard_syncs.get(), 1, "one call serves the round");
        for (log_dir, log) in logs {
            log.close().await;
            drop(log);
            let reopened = PartitionLog::open(&log_dir, Rc::clone(&config))
                .await
                .expect("reopen");
            let expected: Vec<String> = (0..6).map(value_of).collect();
            assert_eq!(read_all(&reopened).await, expected);
        }
        let _ = std::fs::remove_dir_all(&dir);
    })
    .expect("executor");
}

#[test]
fn appends_waiting_for_room_are_stored_in_arrival_order() {
    corebus::runtime::block_on(None, async {
        prime_direct_io().await;
        let dir = common::fresh_dir("arrival-order");
        // Room for about one large append: most appends wait for a flush, and a small one
        // behind a large one would fit earlier than the large one does.
        let config = Rc::new(LogConfig {
            max_pending_bytes: 4096,
            ..(*config()).clone()
        });
        let log = PartitionLog::open(&dir, config).await.expect("open");
        let sizes: Vec<u64> = (0..60).map(|i| if i % 2 == 0 { 60 } else { 1 }).collect();
        let mut first = 0;
        let mut appends = Vec::new();
        for &records in &sizes {
            let bytes = batch(first, records);
            first += records;
            let log = Rc::clone(&log);
            appends.push(async move {
                let ticket = log.append(&[bytes], 1).await.expect("append");
                ticket.durable().await.expect("durable")
            });
        }
        // Polled in order: the order the appends arrive in.
        let stored = futures::future::join_all(appends).await;
        let mut expected_base = 0;
        for ((base, last), records) in stored.into_iter().zip(&sizes) {
            assert_eq!(base, expected_base, "appends keep their arrival order");
            assert_eq!(last, base + records - 1);
            expected_base = last + 1;
        }
        let values = read_all(&log).await;
        let expected: Vec<String> = (0..first).map(value_of).collect();
        assert_eq!(values, expected);
        log.close().await;
    })
    .expect("executor");
}

/// Appends batches of 50 records one at a time, each durable and followed by the end of the
/// zero-fill it started, until the log took `bytes`; returns how many records it took.
async fn append_one_by_one(log: &Rc<PartitionLog>, metrics: &StorageMetrics, bytes: u64) -> u64 {
    let mut records = 0;
    while log.stats().bytes_in < bytes {
        let ticket = log.append(&[batch(records, 50)], 1).await.expect("append");
        ticket.durable().await.expect("durable");
        records += 50;
        prewrites_done(metrics).await;
    }
    records
}

/// Closes `log`, reopens it from `dir` and checks that it holds exactly the first `records`.
async fn reopen_holds(log: Rc<PartitionLog>, dir: &Path, config: Rc<LogConfig>, records: u64) {
    log.close().await;
    drop(log);
    let reopened = PartitionLog::open(dir, config).await.expect("reopen");
    let expected: Vec<String> = (0..records).map(value_of).collect();
    assert_eq!(read_all(&reopened).await, expected);
}

#[test]
fn zero_filling_allocates_ahead_so_that_flushes_never_grow_the_file() {
    let metrics = Rc::new(StorageMetrics::default());
    corebus::runtime::block_on(None, async move {
        let dir = common::fresh_dir("allocate-ahead");
        // Allocation steps of 64 KiB: the appends below cross about 30 of them.
        let config = shared_flush_config(&dir, &metrics, 64 << 10).await;
        let log_dir = dir.join("p0");
        std::fs::create_dir_all(&log_dir).expect("log dir");
        let log = PartitionLog::open(&log_dir, Rc::clone(&config))
            .await
            .expect("open");
        let first = append_one_by_one(&log, &metrics, 2 << 20).await;
        // Only the first flush of the fresh segment synced its own file: every later one
        // overwrote zero-filled blocks allocated and committed ahead of it, so none had to
        // allocate, and all shared the disk flush.
        assert_eq!(metrics.file_synced_flushes.get(), 1);
        assert_eq!(metrics.shard_synced_flushes.get(), first / 50 - 1);
        reopen_holds(log, &log_dir, config, first).await;
        let _ = std::fs::remove_dir_all(&dir);
    })
    .expect("executor");
}

#[test]
fn a_roll_adopts_the_spare_so_that_new_segments_start_on_committed_blocks() {
    let metrics = Rc::new(StorageMetrics::default());
    corebus::runtime::block_on(None, async move {
        let dir = common::fresh_dir("spare");
        let config = shared_flush_config(&dir, &metrics, 64 << 10).await;
        // Segments of 256 KiB: the appends below roll about 8 times.
        let config = Rc::new(LogConfig {
            segment_bytes: 256 << 10,
            ..(*config).clone()
        });
        let log_dir = dir.join("p0");
        std::fs::create_dir_all(&log_dir).expect("log dir");
        let log = PartitionLog::open(&log_dir, Rc::clone(&config))
            .await
            .expect("open");
        let first = append_one_by_one(&log, &metrics, 2 << 20).await;
        let segments = corebus::storage::segment::list(&log_dir).expect("list");
        assert!(segments.len() >= 8, "{} segments", segments.len());
        // Only the very first flush synced its own file: every later segment was a spare,
        // allocated, zero-filled and synced before its roll.
        assert_eq!(metrics.file_synced_flushes.get(), 1);
        let spare = log_dir.join(corebus::storage::spare::SPARE_FILE);
        assert!(spare.exists(), "the next roll's spare is ready");
        reopen_holds(log, &log_dir, config, first).await;
        assert!(!spare.exists(), "a leftover spare is removed at open");
        let _ = std::fs::remove_dir_all(&dir);
    })
    .expect("executor");
}
