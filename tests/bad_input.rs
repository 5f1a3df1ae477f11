//! Bad input on live connections gets a clear error, never a panic, and the broker keeps
//! serving everyone else with earlier data intact.

mod common;

use std::net::TcpStream;
use std::time::Duration;

use common::{ok_stdout, raw_round_trip, read_frame, Broker};
use corebus::client::requests;
use corebus::protocol::message::{finish_request, parse_response, ApiError};
use corebus::protocol::wire::{self, ErrorCode};
use corebus::record::{BatchBuilder, RecordWriter};
use flatbuffers::FlatBufferBuilder;

fn connect(addr: &str) -> TcpStream {
    let stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    stream
}

fn produce_frame(id: u64, topic: &str, partition: u32, batches: &[u8]) -> Vec<u8> {
    requests::produce(id, topic, partition, bytes::Bytes::copy_from_slice(batches)).to_vec()[4..]
        .to_vec()
}

fn fetch_frame(id: u64, topic: &str, partition: u32, offset: u64) -> Vec<u8> {
    requests::fetch(id, topic, partition, offset, 1 << 20, 0).as_bytes()[4..].to_vec()
}

fn one_batch(value: &str) -> Vec<u8> {
    let mut b = BatchBuilder::new();
    b.push(&RecordWriter {
        timestamp_ms: 1,
        value: value.as_bytes(),
        ..RecordWriter::default()
    });
    b.finish()
}

/// The first partition's error of a produce reply.
fn produce_error(reply: &[u8]) -> Option<ApiError> {
    let response = parse_response(reply).expect("valid reply");
    assert!(ApiError::from_wire(response.error()).is_none());
    let body = response.body_as_produce_response().expect("produce reply");
    let part = body.partitions().expect("partitions").get(0);
    ApiError::from_wire(part.error())
}

fn envelope_error(reply: &[u8]) -> (u64, Option<ApiError>) {
    let response = parse_response(reply).expect("valid reply");
    (
        response.correlation_id(),
        ApiError::from_wire(response.error()),
    )
}

#[test]
fn malformed_frames_and_batches_get_errors_and_the_broker_keeps_serving() {
    let broker = Broker::start("bad-input", 2, &[]);
    ok_stdout(&broker.cli(&["topic", "create", "t", "--partitions", "2"], ""));
    let acks = ok_stdout(&broker.cli(
        &["publish", "t", "--partition", "0", "--print-acks"],
        "before\n",
    ));
    assert_eq!(acks.trim(), "0 0 0");

    // A length prefix of 4 GiB: refused before allocation, with an error, then closed.
    let mut s = connect(&broker.addr());
    use std::io::Write;
    s.write_all(&u32::MAX.to_le_bytes()).expect("write");
    let reply = read_frame(&mut s).expect("an error reply before closing");
    let (id, err) = envelope_error(&reply);
    assert_eq!(id, 0);
    assert_eq!(err.expect("error").code, ErrorCode::TooLarge);
    assert!(read_frame(&mut s).is_none(), "connection must be closed");

    // Bytes that are not a FlatBuffers request: error reply, connection stays usable.
    let mut s = connect(&broker.addr());
    for junk in [
        &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        &[0xff; 40],
        b"\x16\x03\x01\x02\x00\x01",
    ] {
        let reply = raw_round_trip(&mut s, junk).expect("reply");
        let (id, err) = envelope_error(&reply);
        assert_eq!(id, 0);
        assert_eq!(err.expect("error").code, ErrorCode::InvalidRequest);
    }

    // A batch with a flipped bit: CorruptBatch, nothing appended.
    let mut batch = one_batch("corrupt me");
    let last = batch.len() - 1;
    batch[last] ^= 1;
    let reply = raw_round_trip(&mut s, &produce_frame(7, "t", 0, &batch)).expect("reply");
    assert_eq!(
        produce_error(&reply).expect("error").code,
        ErrorCode::CorruptBatch
    );

    // A batch whose length lies.
    let mut batch = one_batch("liar");
    let len = batch.len() as u32 + 1000;
    batch[8..12].copy_from_slice(&len.to_le_bytes());
    let reply = raw_round_trip(&mut s, &produce_frame(8, "t", 0, &batch)).expect("reply");
    assert_eq!(
        produce_error(&reply).expect("error").code,
        ErrorCode::CorruptBatch
    );

    // Unknown topic and partition.
    let reply =
        raw_round_trip(&mut s, &produce_frame(9, "nope", 0, &one_batch("x"))).expect("reply");
    assert_eq!(
        produce_error(&reply).expect("error").code,
        ErrorCode::UnknownTopic
    );
    let reply = raw_round_trip(&mut s, &produce_frame(10, "t", 9, &one_batch("x"))).expect("reply");
    assert_eq!(
        produce_error(&reply).expect("error").code,
        ErrorCode::UnknownPartition
    );

    // A fetch past the end: OffsetOutOfRange with the valid bounds.
    let reply = raw_round_trip(&mut s, &fetch_frame(11, "t", 0, 50)).expect("reply");
    let response = parse_response(&reply).expect("valid");
    assert_eq!(response.correlation_id(), 11);
    let body = response.body_as_fetch_response().expect("fetch reply");
    let err = ApiError::from_wire(body.error()).expect("error");
    assert_eq!(err.code, ErrorCode::OffsetOutOfRange);
    assert_eq!((body.log_start_offset(), body.high_watermark()), (0, 1));

    // An unknown request kind.
    let mut fbb = FlatBufferBuilder::new();
    let body = wire::ListTopicsRequest::create(&mut fbb, &wire::ListTopicsRequestArgs {});
    let frame = finish_request(fbb, 12, wire::RequestBody(99), body.as_union_value());
    let reply = raw_round_trip(&mut s, &frame.as_bytes()[4..]).expect("reply");
    let (id, err) = envelope_error(&reply);
    assert_eq!(id, 12);
    assert_eq!(err.expect("error").code, ErrorCode::UnsupportedRequest);

    // A truncated frame then a hang-up.
    let mut t = connect(&broker.addr());
    t.write_all(&100u32.to_le_bytes()).expect("write");
    t.write_all(b"partial").expect("write");
    drop(t);

    // Everyone else is still served and earlier data is intact.
    let acks = ok_stdout(&broker.cli(
        &["publish", "t", "--partition", "0", "--print-acks"],
        "after\n",
    ));
    assert_eq!(acks.trim(), "0 0 1");
    let values = ok_stdout(&broker.cli(
        &[
            "consume",
            "t",
            "--partition",
            "0",
            "--idle-timeout",
            "500ms",
        ],
        "",
    ));
    assert_eq!(values, "before\nafter\n");
}

/// A `Request` envelope built by hand: `body_type` set or not, `body` present or not.
fn envelope_frame(id: u64, body_type: u8, with_body: bool) -> Vec<u8> {
    let mut fbb = FlatBufferBuilder::new();
    let body = with_body.then(|| {
        wire::ListTopicsRequest::create(&mut fbb, &wire::ListTopicsRequestArgs {}).as_union_value()
    });
    let request = wire::Request::create(
        &mut fbb,
        &wire::RequestArgs {
            correlation_id: id,
            body_type: wire::RequestBody(body_type),
            body,
        },
    );
    fbb.finish_size_prefixed(request, None);
    fbb.finished_data()[4..].to_vec()
}

/// protocol.md sections 3 and 5, as documented: a reply carries the request's own id wherever
/// the envelope can be read, id 0 only for frames that can not be tied to a request (and for
/// a request that used the reserved id 0), and the connection stays open throughout.
#[test]
fn envelope_errors_echo_the_correlation_id_and_keep_the_connection() {
    let broker = Broker::start("envelope", 1, &[]);
    let mut s = connect(&broker.addr());
    let cases: [(&str, Vec<u8>, u64, ErrorCode); 5] = [
        (
            "a known body type without its body",
            envelope_frame(21, wire::RequestBody::ProduceRequest.0, false),
            21,
            ErrorCode::InvalidRequest,
        ),
        (
            "an unknown body type without a body",
            envelope_frame(22, 200, false),
            22,
            ErrorCode::UnsupportedRequest,
        ),
        (
            "an unknown body type with a table",
            envelope_frame(23, 200, true),
            23,
            ErrorCode::UnsupportedRequest,
        ),
        (
            "the reserved correlation id 0",
            envelope_frame(0, wire::RequestBody::ListTopicsRequest.0, true),
            0,
            ErrorCode::InvalidRequest,
        ),
        (
            "a zero-length frame",
            Vec::new(),
            0,
            ErrorCode::InvalidRequest,
        ),
    ];
    for (what, frame, want_id, want_code) in cases {
        let reply = raw_round_trip(&mut s, &frame).unwrap_or_else(|| panic!("reply to {what}"));
        let (id, err) = envelope_error(&reply);
        assert_eq!(id, want_id, "{what}: correlation id");
        assert_eq!(err.expect("an error").code, want_code, "{what}: code");
    }
    // Still open and serving: a well-formed request on the same connection.
    let reply = raw_round_trip(&mut s, &requests::list_topics(24).as_bytes()[4..]).expect("reply");
    let (id, err) = envelope_error(&reply);
    assert_eq!((id, err), (24, None));

    // CommitOffsets to a topic that does not exist fails as a whole, as FetchOffsets does.
    let mut fbb = FlatBufferBuilder::new();
    let (group, topic) = (fbb.create_string("g"), fbb.create_string("no-such-topic"));
    let offset = wire::PartitionOffset::create(
        &mut fbb,
        &wire::PartitionOffsetArgs {
            partition: 0,
            offset: 5,
            error: None,
        },
    );
    let offsets = fbb.create_vector(&[offset]);
    let body = wire::CommitOffsetsRequest::create(
        &mut fbb,
        &wire::CommitOffsetsRequestArgs {
            group: Some(group),
            topic: Some(topic),
            offsets: Some(offsets),
        },
    );
    let frame = finish_request(
        fbb,
        25,
        wire::RequestBody::CommitOffsetsRequest,
        body.as_union_value(),
    );
    let reply = raw_round_trip(&mut s, &frame.as_bytes()[4..]).expect("reply");
    let (id, err) = envelope_error(&reply);
    assert_eq!(id, 25);
    assert_eq!(err.expect("error").code, ErrorCode::UnknownTopic);
}
