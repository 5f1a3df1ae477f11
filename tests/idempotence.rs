//! Idempotent producers and compressed batches against the real binary: the sequence table
//! (resends in flight and committed, gaps, fenced epochs, expired producers) across kill -9
//! restarts; `corebus publish --idempotence on` through two kill -9 restarts leaving every
//! message once, in order; every codec and v1 batches read back side by side; the topic
//! setting that recompresses; a decompression bomb refused.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{ok_stdout, parse_consumed, read_frame, wait_until, Broker};
use corebus::client::requests;
use corebus::protocol::message::{parse_response, ApiError};
use corebus::protocol::wire::ErrorCode;
use corebus::record::{
    BatchBuilder, BatchIter, BatchOptions, Codec, Decompressor, ProducerFields, RecordWriter,
};

const COREBUS: &str = env!("CARGO_BIN_EXE_corebus");

fn connect(addr: &str) -> TcpStream {
    let s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    s
}

/// A batch of `values` from `producer` (or none) in `codec`.
fn batch(values: &[&str], producer: Option<ProducerFields>, codec: Codec) -> Vec<u8> {
    let mut b = BatchBuilder::new();
    for v in values {
        b.push(&RecordWriter {
            timestamp_ms: 1_700_000_000_000,
            value: v.as_bytes(),
            ..RecordWriter::default()
        });
    }
    b.finish_with(BatchOptions { codec, producer })
}

fn fields(producer_id: u64, epoch: u16, base_sequence: u32) -> Option<ProducerFields> {
    Some(ProducerFields {
        producer_id,
        epoch,
        base_sequence,
    })
}

/// Sends produce frames back to back, then reads every reply: offsets or the error.
fn produce_pipelined(
    s: &mut TcpStream,
    topic: &str,
    batches: &[Vec<u8>],
) -> Vec<Result<(u64, u64), ApiError>> {
    let mut out = Vec::new();
    for (i, b) in batches.iter().enumerate() {
        let frame = requests::produce(i as u64 + 1, topic, 0, bytes::Bytes::copy_from_slice(b));
        out.extend_from_slice(&frame.to_vec());
    }
    s.write_all(&out).expect("send");
    let mut replies: Vec<(u64, Result<(u64, u64), ApiError>)> = (0..batches.len())
        .map(|_| {
            let frame = read_frame(s).expect("a reply");
            let response = parse_response(&frame).expect("valid reply");
            let id = response.correlation_id();
            let body = response.body_as_produce_response().expect("produce reply");
            let p = body.partitions().expect("results").get(0);
            let result = match ApiError::from_wire(p.error()) {
                Some(e) => Err(e),
                None => Ok((p.base_offset(), p.last_offset())),
            };
            (id, result)
        })
        .collect();
    replies.sort_by_key(|(id, _)| *id);
    replies.into_iter().map(|(_, r)| r).collect()
}

fn produce(s: &mut TcpStream, topic: &str, b: Vec<u8>) -> Result<(u64, u64), ApiError> {
    produce_pipelined(s, topic, &[b]).remove(0)
}

fn init_producer(s: &mut TcpStream, previous: Option<(u64, u16)>) -> (u64, u16) {
    s.write_all(&requests::init_producer(1, previous).to_vec())
        .expect("send");
    let frame = read_frame(s).expect("reply");
    let response = parse_response(&frame).expect("valid");
    assert!(ApiError::from_wire(response.error()).is_none());
    let body = response.body_as_init_producer_response().expect("body");
    (body.producer_id(), body.producer_epoch())
}

/// Every record of partition 0 as (offset, value, codec of its batch).
fn read_all(addr: &str, topic: &str) -> Vec<(u64, String, Codec)> {
    let mut s = connect(addr);
    let mut out = Vec::new();
    let mut offset = 0u64;
    let mut decompressor = Decompressor::new();
    loop {
        s.write_all(&requests::fetch(1, topic, 0, offset, 1 << 20, 0).to_vec())
            .expect("send");
        let frame = read_frame(&mut s).expect("reply");
        let response = parse_response(&frame).expect("valid");
        let body = response.body_as_fetch_response().expect("fetch body");
        assert!(ApiError::from_wire(body.error()).is_none(), "fetch failed");
        let bytes = body.batches().map(|v| v.bytes()).unwrap_or_default();
        if bytes.is_empty() {
            return out;
        }
        for batch in BatchIter::new(bytes) {
            let batch = batch.expect("intact batch");
            let h = batch.header();
            let codec = h.codec().expect("known codec");
            for r in batch.records(&mut decompressor).expect("records") {
                let r = r.expect("record");
                let at = h.base_offset() + u64::from(r.offset_delta);
                if at >= offset {
                    out.push((at, String::from_utf8_lossy(r.value).into_owned(), codec));
                    offset = at + 1;
                }
            }
        }
    }
}

fn code(result: Result<(u64, u64), ApiError>) -> ErrorCode {
    result.expect_err("refused").code
}

#[test]
fn the_sequence_table_holds_across_kill9_and_clean_restarts() {
    let mut broker = Broker::start("idem-table", 2, &["--producer-expiry", "1500ms"]);
    ok_stdout(&broker.cli(&["topic", "create", "t"], ""));
    let mut s = connect(&broker.addr());
    let (id, epoch) = init_producer(&mut s, None);
    assert_eq!(epoch, 0);
    let (other, _) = init_producer(&mut s, None);
    assert_ne!(id, other, "every InitProducer gives a new id");

    let first = batch(&["a", "b", "c"], fields(id, 0, 0), Codec::Lz4);
    assert_eq!(produce(&mut s, "t", first.clone()), Ok((0, 2)));
    // A resend of a committed batch: its original offsets, nothing written.
    assert_eq!(produce(&mut s, "t", first.clone()), Ok((0, 2)));
    // The same batch ten times back to back: the copies after the first arrive while it
    // waits for its group commit, and all get its offsets.
    let second = batch(&["d", "e"], fields(id, 0, 3), Codec::None);
    let replies = produce_pipelined(&mut s, "t", &vec![second.clone(); 10]);
    assert!(replies.iter().all(|r| *r == Ok((3, 4))), "{replies:?}");
    // A gap.
    let gap = batch(&["x"], fields(id, 0, 9), Codec::None);
    assert_eq!(
        code(produce(&mut s, "t", gap)),
        ErrorCode::OutOfOrderSequence
    );
    // Two batches of one producer in one request are refused as a whole.
    let two = [
        batch(&["y"], fields(id, 0, 5), Codec::None),
        batch(&["z"], fields(id, 0, 6), Codec::None),
    ]
    .concat();
    assert_eq!(code(produce(&mut s, "t", two)), ErrorCode::InvalidRequest);

    // Killed: the table comes back from the log.
    broker.kill9();
    broker.restart();
    let mut s = connect(&broker.addr());
    assert_eq!(produce(&mut s, "t", first.clone()), Ok((0, 2)));
    assert_eq!(produce(&mut s, "t", second.clone()), Ok((3, 4)));
    let third = batch(&["f"], fields(id, 0, 5), Codec::Zstd);
    assert_eq!(produce(&mut s, "t", third.clone()), Ok((5, 5)));

    // A new epoch fences the old one.
    let (same, bumped) = init_producer(&mut s, Some((id, 0)));
    assert_eq!((same, bumped), (id, 1));
    let fresh = batch(&["g"], fields(id, 1, 0), Codec::None);
    assert_eq!(produce(&mut s, "t", fresh.clone()), Ok((6, 6)));
    let stale = batch(&["h"], fields(id, 0, 6), Codec::None);
    assert_eq!(code(produce(&mut s, "t", stale)), ErrorCode::ProducerFenced);

    // Stopped cleanly (the snapshot is saved): resends are still recognised.
    assert!(broker.terminate().success());
    broker.restart();
    let mut s = connect(&broker.addr());
    assert_eq!(produce(&mut s, "t", fresh), Ok((6, 6)));
    // The older epoch's batches are fenced, resends included.
    assert_eq!(code(produce(&mut s, "t", third)), ErrorCode::ProducerFenced);

    // An expired producer is forgotten: it is taken at any sequence.
    let once = batch(&["i"], fields(other, 0, 0), Codec::None);
    assert_eq!(produce(&mut s, "t", once), Ok((7, 7)));
    std::thread::sleep(Duration::from_millis(1600)); // past --producer-expiry
    let later = batch(&["j"], fields(other, 0, 40), Codec::None);
    assert_eq!(produce(&mut s, "t", later), Ok((8, 8)));

    let values: Vec<String> = read_all(&broker.addr(), "t")
        .into_iter()
        .map(|(_, v, _)| v)
        .collect();
    assert_eq!(values, ["a", "b", "c", "d", "e", "f", "g", "i", "j"]);
}

/// Publishes `count` lines through `corebus publish` while the broker is killed with -9 and
/// restarted twice; returns the values read back from partition 0.
fn publish_through_two_crashes(name: &str, count: u64, idempotence: &str) -> Vec<String> {
    let mut broker = Broker::start(name, 2, &[]);
    ok_stdout(&broker.cli(&["topic", "create", "p"], ""));
    let mut publisher = Command::new(COREBUS)
        .args([
            "publish",
            "p",
            "--print-acks",
            "--batch-records",
            "500",
            "--idempotence",
            idempotence,
        ])
        .env("COREBUS_ADDR", broker.addr())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("publisher");
    let mut stdin = publisher.stdin.take().expect("stdin");
    let feeder = std::thread::spawn(move || {
        for i in 0..count {
            if writeln!(stdin, "m-{i:07}").is_err() {
                return;
            }
            if i % 200 == 0 {
                std::thread::sleep(Duration::from_micros(500));
            }
        }
    });
    let acked = Arc::new(AtomicU64::new(0));
    let stdout = publisher.stdout.take().expect("stdout");
    let counter = Arc::clone(&acked);
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            if line.is_err() {
                return;
            }
            counter.fetch_add(1, Ordering::Relaxed);
        }
    });
    for at in [count / 5, count * 3 / 5] {
        wait_until(
            &format!("{at} acknowledgements"),
            Duration::from_secs(120),
            || acked.load(Ordering::Relaxed) >= at,
        );
        broker.kill9();
        broker.restart();
    }
    let _ = feeder.join();
    let status = publisher.wait().expect("publisher exits");
    let _ = reader.join();
    let mut stderr = String::new();
    if let Some(mut e) = publisher.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut e, &mut stderr);
    }
    assert!(status.success(), "publish failed: {stderr}");
    assert_eq!(
        acked.load(Ordering::Relaxed),
        count,
        "every line acknowledged"
    );
    let out = ok_stdout(&broker.cli(
        &[
            "consume",
            "p",
            "--from",
            "earliest",
            "--format",
            "json",
            "--count",
            &(2 * count).to_string(),
        ],
        "",
    ));
    parse_consumed(&out).into_iter().map(|c| c.value).collect()
}

#[test]
fn an_idempotent_publish_through_two_kill9_restarts_leaves_every_message_once_in_order() {
    const COUNT: u64 = 200_000;
    let values = publish_through_two_crashes("idem-publish", COUNT, "on");
    let expected: Vec<String> = (0..COUNT).map(|i| format!("m-{i:07}")).collect();
    assert_eq!(values.len(), expected.len(), "records in the log");
    assert!(values == expected, "every message once, in order");
}

#[test]
fn without_idempotence_the_same_run_loses_nothing_but_may_write_twice() {
    const COUNT: u64 = 200_000;
    let values = publish_through_two_crashes("plain-publish", COUNT, "off");
    let mut seen = std::collections::HashSet::new();
    let duplicates = values.iter().filter(|v| !seen.insert(v.as_str())).count();
    assert_eq!(seen.len() as u64, COUNT, "no message lost");
    eprintln!(
        "idempotence off: {} records for {COUNT} messages, {duplicates} duplicates",
        values.len()
    );
}

#[test]
fn every_codec_and_v1_batches_read_back_side_by_side_and_bombs_are_refused() {
    let broker = Broker::start("codecs", 1, &[]);
    ok_stdout(&broker.cli(&["topic", "create", "c"], ""));
    ok_stdout(&broker.cli(&["topic", "create", "z", "--compression", "zstd"], ""));
    for codec in ["none", "lz4", "zstd"] {
        let lines: String = (0..300)
            .map(|i| format!("{{\"codec\":\"{codec}\",\"n\":{i},\"pad\":\"aaaaaaaaaaaaaaaa\"}}\n"))
            .collect();
        ok_stdout(&broker.cli(&["publish", "c", "--compression", codec], &lines));
    }
    // An old client's v1 batch: the documented example of docs/protocol.md section 8.
    let v1 = common::hex(
        "00000000000000006400000000000000000000000000000076bc5191010000000100000000000000\
         0068e5cf8b0100000068e5cf8b01000000000000000000002000000000000000\
         0068e5cf8b010000ffffffff02000000686900000000000000000000",
    );
    let mut s = connect(&broker.addr());
    assert_eq!(produce(&mut s, "c", v1), Ok((900, 900)));
    let all = read_all(&broker.addr(), "c");
    assert_eq!(all.len(), 901);
    for (i, codec) in [Codec::None, Codec::Lz4, Codec::Zstd]
        .into_iter()
        .enumerate()
    {
        let part = &all[i * 300..(i + 1) * 300];
        assert!(part.iter().all(|(_, _, c)| *c == codec), "{codec}");
        for (n, (_, v, _)) in part.iter().enumerate() {
            let json: serde_json::Value = serde_json::from_str(v).expect("json");
            assert_eq!(
                (json["codec"].as_str(), json["n"].as_u64()),
                (Some(codec.name()), Some(n as u64))
            );
        }
    }
    assert_eq!(all[900].1, "hi");
    // The CLI decompresses too.
    let out = ok_stdout(&broker.cli(
        &["consume", "c", "--from", "earliest", "--count", "901"],
        "",
    ));
    assert_eq!(out.lines().count(), 901);

    // A topic that recompresses: what came uncompressed (v2 and v1) is stored as zstd; a
    // batch that zstd would not shrink stays as it is.
    let long = "three ".repeat(50);
    ok_stdout(&broker.cli(&["publish", "z"], &format!("{long}\n{long}\n")));
    let v1 = common::hex(
        "00000000000000006400000000000000000000000000000076bc5191010000000100000000000000\
         0068e5cf8b0100000068e5cf8b01000000000000000000002000000000000000\
         0068e5cf8b010000ffffffff02000000686900000000000000000000",
    );
    assert_eq!(produce(&mut s, "z", v1.clone()), Ok((2, 2)));
    let plain = batch(&[long.as_str()], None, Codec::None);
    assert_eq!(produce(&mut s, "z", plain), Ok((3, 3)));
    let z = read_all(&broker.addr(), "z");
    let values: Vec<&str> = z.iter().map(|(_, v, _)| v.as_str()).collect();
    assert_eq!(values, [long.as_str(), &long, "hi", &long]);
    let codecs: Vec<Codec> = z.iter().map(|(_, _, c)| *c).collect();
    assert_eq!(codecs, [Codec::Zstd, Codec::Zstd, Codec::None, Codec::Zstd]);

    // A bomb: 64 MiB of zeros in an lz4 block of a few hundred KiB, over the 16 MiB limit;
    // and a batch whose block decodes to more than it declares. Both refused, nothing stored.
    let zeros = "\0".repeat(64 << 20);
    let bomb = batch(&[zeros.as_str()], None, Codec::Lz4);
    assert!(bomb.len() < 1 << 20, "{} bytes", bomb.len());
    let rss_before = broker.rss_kib();
    assert_eq!(code(produce(&mut s, "c", bomb)), ErrorCode::CorruptBatch);
    let mut liar = batch(&["x".repeat(10_000).as_str()], None, Codec::Lz4);
    liar[72..76].copy_from_slice(&100u32.to_le_bytes());
    let crc = crc32c::crc32c(&liar[28..]);
    liar[24..28].copy_from_slice(&crc.to_le_bytes());
    assert_eq!(code(produce(&mut s, "c", liar)), ErrorCode::CorruptBatch);
    assert!(
        broker.rss_kib() < rss_before + 32 * 1024,
        "the broker's memory grew from {rss_before} KiB to {} KiB",
        broker.rss_kib()
    );
    assert_eq!(read_all(&broker.addr(), "c").len(), 901);
}
