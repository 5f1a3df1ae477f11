//! Hostile clients against the real binary: garbage, lies, floods and slow senders. The
//! broker must stay up, bounded in memory, and keep serving everyone else with acknowledged
//! data intact.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{ok_stdout, parse_acks, raw_round_trip, read_frame, wait_until, Broker};
use corebus::client::requests;
use corebus::protocol::message::{parse_response, ApiError};
use corebus::record::{BatchBuilder, RecordWriter};

fn connect(addr: &str) -> TcpStream {
    let s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    s.set_write_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    s
}

/// Reads until the broker closes the connection (or the deadline passes: then fails).
fn assert_closed_by_broker(mut s: TcpStream, within: Duration) {
    s.set_read_timeout(Some(within)).expect("timeout");
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
            Err(e) => panic!(
                "connection not closed within {within:?} ({:?}): {e}",
                started.elapsed()
            ),
        }
    }
}

fn list_topics_frame(id: u64) -> Vec<u8> {
    requests::list_topics(id).as_bytes().to_vec()
}

fn produce_frame(id: u64, topic: &str, batches: &[u8]) -> Vec<u8> {
    requests::produce(id, topic, 0, bytes::Bytes::copy_from_slice(batches)).to_vec()
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

#[test]
fn hostile_bytes_leave_the_broker_up_bounded_and_serving() {
    let broker = Broker::start(
        "hostile",
        2,
        &["--frame-timeout", "2s", "--max-frame-bytes", "1MiB"],
    );
    ok_stdout(&broker.cli(&["topic", "create", "h", "--partitions", "1"], ""));
    let before = parse_acks(&ok_stdout(
        &broker.cli(&["publish", "h", "--print-acks"], "kept-1\nkept-2\n"),
    ));
    assert_eq!(before.len(), 2);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);

    // Random bytes on many connections: each gets an error or is closed, never a crash.
    for _ in 0..50 {
        let mut s = connect(&broker.addr());
        let n = 1 + (rng.next() % 8192) as usize;
        let junk = rng.bytes(n);
        let _ = s.write_all(&junk);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink);
    }
    // A 4 GiB length prefix, an HTTP request, a TLS ClientHello.
    for opener in [
        u32::MAX.to_le_bytes().to_vec(),
        b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n".to_vec(),
        vec![
            0x16, 0x03, 0x01, 0x00, 0xa5, 0x01, 0x00, 0x00, 0xa1, 0x03, 0x03,
        ],
    ] {
        let mut s = connect(&broker.addr());
        s.write_all(&opener).expect("write");
        if let Some(reply) = read_frame(&mut s) {
            let response = parse_response(&reply).expect("a valid error reply");
            assert!(ApiError::from_wire(response.error()).is_some());
        }
        assert_closed_by_broker(s, Duration::from_secs(10));
    }
    // A truncated frame, then silence: cut off after the frame timeout.
    let mut s = connect(&broker.addr());
    s.write_all(&1000u32.to_le_bytes()).expect("write");
    s.write_all(b"only a little").expect("write");
    assert_closed_by_broker(s, Duration::from_secs(10));
    // Valid frames with invalid FlatBuffers, unknown kinds, bad CRCs and lying lengths.
    let mut s = connect(&broker.addr());
    for i in 0..200u64 {
        let payload = match i % 4 {
            0 => rng.bytes(64),
            1 => {
                let mut f = list_topics_frame(i + 1);
                f[8] ^= 0xff; // damage the vtable offset
                f[4..].to_vec()
            }
            2 => {
                let mut b = BatchBuilder::new();
                b.push(&RecordWriter {
                    value: b"x",
                    ..RecordWriter::default()
                });
                let mut batch = b.finish();
                let n = batch.len();
                batch[n - 1 - (rng.next() % 8) as usize] ^= 1;
                produce_frame(i + 1, "h", &batch)[4..].to_vec()
            }
            _ => {
                let mut b = BatchBuilder::new();
                b.push(&RecordWriter {
                    value: b"y",
                    ..RecordWriter::default()
                });
                let mut batch = b.finish();
                let lie = (rng.next() % 100_000) as u32;
                batch[8..12].copy_from_slice(&lie.to_le_bytes());
                produce_frame(i + 1, "h", &batch)[4..].to_vec()
            }
        };
        let reply = raw_round_trip(&mut s, &payload).expect("a reply for every frame");
        parse_response(&reply).expect("replies are valid");
    }
    // 10,000 pipelined requests without reading a reply: the broker stops reading instead of
    // buffering; the client's writes stall, then it gives up.
    let mut s = connect(&broker.addr());
    s.set_write_timeout(Some(Duration::from_secs(3)))
        .expect("timeout");
    let mut sent = 0;
    for i in 0..10_000u64 {
        if s.write_all(&list_topics_frame(i + 1)).is_err() {
            break;
        }
        sent += 1;
    }
    println!("pipelined {sent} requests before the broker pushed back");
    drop(s);

    let rss_kib = broker.rss_kib();
    println!("broker RSS after the hostile load: {} MiB", rss_kib / 1024);
    assert!(rss_kib < 400 * 1024, "RSS {rss_kib} KiB is not bounded");
    let after = parse_acks(&ok_stdout(
        &broker.cli(&["publish", "h", "--print-acks"], "after\n"),
    ));
    assert_eq!(
        after,
        vec![(0, 0, 2)],
        "offsets continue: nothing was appended by the garbage"
    );
    let values = ok_stdout(&broker.cli(&["consume", "h", "--idle-timeout", "500ms"], ""));
    assert_eq!(values, "kept-1\nkept-2\nafter\n");
}

#[test]
fn connection_floods_and_slow_senders_do_not_starve_other_clients() {
    let broker = Broker::start(
        "flood",
        2,
        &[
            "--max-connections",
            "1000",
            "--frame-timeout",
            "1s",
            "--idle-timeout",
            "8s",
        ],
    );
    ok_stdout(&broker.cli(&["topic", "create", "f", "--partitions", "2"], ""));
    // A slow sender trickles a frame: it is cut off, others are served meanwhile.
    let slow = std::thread::spawn({
        let addr = broker.addr();
        move || {
            let mut s = connect(&addr);
            let frame = list_topics_frame(1);
            let started = Instant::now();
            for byte in frame {
                if s.write_all(&[byte]).is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(150));
            }
            assert_closed_by_broker(s, Duration::from_secs(10));
            started.elapsed()
        }
    });
    // A client connected before the flood.
    let mut keeper = connect(&broker.addr());
    // 3,000 connections at once (the limit is 1,000): extra ones are closed at once.
    let mut flood = Vec::new();
    for _ in 0..3000 {
        match TcpStream::connect(broker.addr()) {
            Ok(s) => flood.push(s),
            Err(e) => panic!("connect during the flood: {e}"),
        }
    }
    let mut b = BatchBuilder::new();
    b.push(&RecordWriter {
        value: b"during-flood",
        ..RecordWriter::default()
    });
    let reply = raw_round_trip(&mut keeper, &produce_frame(7, "f", &b.finish())[4..])
        .expect("served during the flood");
    let response = parse_response(&reply).expect("valid");
    let result = response
        .body_as_produce_response()
        .and_then(|p| p.partitions())
        .map(|p| p.get(0));
    assert!(
        result.is_some_and(|r| r.error().is_none()),
        "a connected client is served during the flood"
    );
    // Connections over the limit are closed by the broker; the others stay open.
    let count_closed = |flood: &mut Vec<TcpStream>| {
        flood
            .iter_mut()
            .filter(|s| {
                let _ = s.set_nonblocking(true);
                let mut b = [0u8; 1];
                match s.peek(&mut b) {
                    Ok(0) => true,
                    Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
                    Ok(_) => false,
                }
            })
            .count()
    };
    wait_until("refusals past the limit", Duration::from_secs(10), || {
        count_closed(&mut flood) >= 1990
    });
    let closed = count_closed(&mut flood);
    println!("flood: {closed} of {} connections refused", flood.len());
    assert!(
        closed <= 2010,
        "connections within the limit must stay open ({closed} closed)"
    );
    // Idle connections are closed after the idle timeout; the limit frees up.
    let idle = flood
        .into_iter()
        .find(|s| {
            let mut b = [0u8; 1];
            matches!(s.peek(&mut b), Err(ref e) if e.kind() == std::io::ErrorKind::WouldBlock)
        })
        .expect("an accepted connection");
    let _ = idle.set_nonblocking(false);
    assert_closed_by_broker(idle, Duration::from_secs(30));
    let elapsed = slow.join().expect("slow sender");
    assert!(
        elapsed < Duration::from_secs(5),
        "slow sender cut off after {elapsed:?}"
    );
    wait_until("service after the flood", Duration::from_secs(10), || {
        broker.cli(&["topic", "list"], "").status.success()
    });
    let values = ok_stdout(&broker.cli(&["consume", "f", "--idle-timeout", "500ms"], ""));
    assert_eq!(values, "during-flood\n");
}

/// Issue 16, finding 9: replies count against a connection's byte budget until they are
/// written, so clients that pipeline large fetches and read nothing hold at most their budget
/// of the broker's memory (before: 16 such clients took one shard from 98 MiB to 12.7 GB), and
/// everyone else is still served meanwhile.
#[test]
fn clients_that_pipeline_fetches_and_read_nothing_hold_bounded_memory() {
    const CONNECTIONS: usize = 8;
    const FETCHES: u64 = 64;
    let broker = Broker::start(
        "unread-fetches",
        1,
        &[
            "--cache-bytes-per-partition",
            "0",
            "--max-buffered-bytes-per-connection",
            "32MiB",
        ],
    );
    ok_stdout(&broker.cli(&["topic", "create", "big", "--partitions", "1"], ""));
    // 24 MB on disk, read afresh by every fetch (no cache).
    let line = format!("{}\n", "d".repeat(100_000));
    ok_stdout(&broker.cli(&["publish", "big"], &line.repeat(240)));
    let before_kib = broker.rss_kib();

    let mut hostile = Vec::new();
    for c in 0..CONNECTIONS {
        let s = connect(&broker.addr());
        let mut frames = Vec::new();
        for i in 0..FETCHES {
            let id = (c as u64) * 1000 + i + 1;
            frames.extend_from_slice(requests::fetch(id, "big", 0, 0, 8 << 20, 0).as_bytes());
        }
        // The broker stops reading once the budget is reached: write from a thread.
        let writer = s.try_clone().expect("clone");
        std::thread::spawn(move || {
            let mut writer = writer;
            let _ = writer.write_all(&frames);
        });
        s.set_read_timeout(Some(Duration::from_secs(60)))
            .expect("timeout");
        hostile.push(s);
    }
    // Give the broker every chance to grow: poll RSS while the fetches are taken in.
    let mut peak_kib = 0;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(3) {
        peak_kib = peak_kib.max(broker.rss_kib());
        std::thread::sleep(Duration::from_millis(50));
    }
    // Meanwhile a well-behaved client is served.
    let mut other = connect(&broker.addr());
    let reply = raw_round_trip(&mut other, &list_topics_frame(1)[4..]).expect("reply");
    let response = parse_response(&reply).expect("valid");
    assert!(ApiError::from_wire(response.error()).is_none());
    peak_kib = peak_kib.max(broker.rss_kib());
    let grown_mib = peak_kib.saturating_sub(before_kib) / 1024;
    // Budget: 8 connections x 32 MiB, plus socket buffers and one batch over per reply.
    assert!(
        grown_mib < 8 * 32 + 200,
        "RSS grew by {grown_mib} MiB with {CONNECTIONS} connections of unread fetches"
    );
    drop(hostile);
    assert!(broker.rss_kib() > 0, "the broker is still up");
}

/// A produce request with batches for two partitions, `small` for partition 0 and `big` for 1.
fn two_partition_produce(id: u64, topic: &str, small: &[u8], big: &[u8]) -> Vec<u8> {
    use corebus::protocol::wire;
    let mut fbb = flatbuffers::FlatBufferBuilder::with_capacity(small.len() + big.len() + 256);
    let mut parts = Vec::new();
    for (partition, batches) in [(0, small), (1, big)] {
        let batches = fbb.create_vector(batches);
        parts.push(wire::PartitionProduce::create(
            &mut fbb,
            &wire::PartitionProduceArgs {
                partition,
                batches: Some(batches),
            },
        ));
    }
    let parts = fbb.create_vector(&parts);
    let topic = fbb.create_string(topic);
    let body = wire::ProduceRequest::create(
        &mut fbb,
        &wire::ProduceRequestArgs {
            topic: Some(topic),
            partitions: Some(parts),
        },
    );
    let frame = corebus::protocol::message::finish_request(
        fbb,
        id,
        wire::RequestBody::ProduceRequest,
        body.as_union_value(),
    );
    frame.as_bytes()[4..].to_vec()
}

/// Issue 16, finding 9: a tiny batch cached by its partition must not keep its whole request
/// in memory. Each request here carries 60 bytes for partition 0 and 1 MiB for partition 1:
/// partition 0's cache, which counts bytes, would otherwise hold every request's megabyte.
#[test]
fn a_tiny_cached_batch_does_not_pin_its_whole_request() {
    const REQUESTS: u64 = 300;
    let broker = Broker::start("pinned-frames", 1, &[]);
    ok_stdout(&broker.cli(&["topic", "create", "pin", "--partitions", "2"], ""));
    let batch = |value: &[u8]| {
        let mut b = BatchBuilder::new();
        b.push(&RecordWriter {
            timestamp_ms: 1,
            value,
            ..RecordWriter::default()
        });
        b.finish()
    };
    let small = batch(&[b's'; 60]);
    let big = batch(&vec![b'b'; 1 << 20]);
    let mut s = connect(&broker.addr());
    // One request first, so that what a flush allocates once is in the baseline.
    let before_kib = {
        let reply = raw_round_trip(&mut s, &two_partition_produce(1, "pin", &small, &big));
        assert!(reply.is_some());
        broker.rss_kib()
    };
    for id in 2..=REQUESTS {
        let reply = raw_round_trip(&mut s, &two_partition_produce(id, "pin", &small, &big))
            .expect("a reply");
        let response = parse_response(&reply).expect("valid");
        assert!(ApiError::from_wire(response.error()).is_none());
    }
    let grown_mib = broker.rss_kib().saturating_sub(before_kib) / 1024;
    println!("broker RSS grew by {grown_mib} MiB over {REQUESTS} requests");
    // Partition 1's cache holds its 8 MiB; partition 0's would hold 300 MiB of requests.
    assert!(
        grown_mib < 100,
        "RSS grew by {grown_mib} MiB: cached tiny batches keep their requests"
    );
}
