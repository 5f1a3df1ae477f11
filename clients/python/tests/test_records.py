"""Unit tests without a broker: CRC32C, the record-batch codec (docs/protocol.md sections 7
and 8) and the framing helpers."""

from __future__ import annotations

import struct

import flatbuffers
import pytest

from corebus_client import (
    BatchFormatError,
    ErrorCode,
    Record,
    build_request,
    code_name,
    crc32c,
    decode_batches,
    decode_record,
    encode_batch,
    encode_record,
    ubyte_vector,
)
from corebus_client.client import _FETCH_RESPONSE_BATCHES, _RECEIVED_EVENT_RECORD
from corebus_client.generated import corebus_generated as g

# docs/protocol.md section 8, "As one hex string".
DOC_EXAMPLE = bytes.fromhex(
    "00000000000000006400000000000000000000000000000076bc5191010000000100000000000000"
    "0068e5cf8b0100000068e5cf8b01000000000000000000002000000000000000"
    "0068e5cf8b010000ffffffff02000000686900000000000000000000"
)


def test_crc32c_check_value() -> None:
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(b"") == 0


def test_worked_example_encodes_byte_for_byte() -> None:
    batch = encode_batch([Record(b"hi", timestamp_ms=1_700_000_000_000)])
    assert len(batch) == 100
    assert batch == DOC_EXAMPLE
    assert crc32c(batch[28:]) == 0x9151BC76
    assert batch[24:28] == bytes.fromhex("76bc5191")
    assert encode_record(Record(b"hi"), 0, 1_700_000_000_000) == DOC_EXAMPLE[64:]


def test_worked_example_as_stamped_by_the_broker_decodes() -> None:
    stamped = bytearray(DOC_EXAMPLE)
    struct.pack_into("<Q", stamped, 0, 42)
    struct.pack_into("<q", stamped, 16, 1_700_000_000_123)
    assert stamped[16:24] == bytes.fromhex("7b68e5cf8b010000")
    (batch,) = decode_batches(bytes(stamped))
    assert (batch.base_offset, batch.append_time_ms) == (42, 1_700_000_000_123)
    assert batch.first_timestamp_ms == batch.max_timestamp_ms == 1_700_000_000_000
    assert batch.records == [Record(b"hi", timestamp_ms=1_700_000_000_000, offset=42)]


def test_full_record_round_trips() -> None:
    records = [
        Record(b"v1", key=b"k1", headers=[("traceparent", b"00-ab"), ("x", b"")], id="id-1",
               source="/src", type="com.example.t", subject="s/1", timestamp_ms=5),
        Record(b"", key=b"", timestamp_ms=9),  # empty key is not "no key"
        Record(b"\x00\xff" * 100, headers=[("dup", b"1"), ("dup", b"2")], timestamp_ms=7),
    ]
    data = encode_batch(records)
    header = struct.unpack_from("<IIqq", data, 32)
    assert header == (3, 2, 5, 9)  # record_count, last_offset_delta, first and max timestamp
    (batch,) = decode_batches(data)
    for i, (sent, got) in enumerate(zip(records, batch.records)):
        assert got.offset == i
        got.offset = None
        assert got == sent
    assert batch.records[1].key == b""
    # A record with no key, attributes or headers takes 34 bytes plus the value (7.2).
    assert len(encode_record(Record(b"abc"), 0, 0)) == 34 + 3


def test_non_utf8_text_round_trips() -> None:
    raw = encode_record(Record(b"v", type="t"), 0, 0).replace(b"\x01\x00t", b"\x01\x00\xff")
    record, delta, end = decode_record(raw)
    assert (delta, end) == (0, len(raw))
    assert encode_record(record, 0, 0) == raw


@pytest.mark.parametrize(
    "corrupt, why",
    [
        (lambda b: b.__setitem__(24, b[24] ^ 1), "CRC"),
        (lambda b: b.__setitem__(28, 2), "magic"),
        (lambda b: b.__delitem__(slice(90, None)), "batch_length"),
    ],
)
def test_decode_refuses_bad_batches(corrupt, why: str) -> None:
    data = bytearray(DOC_EXAMPLE)
    corrupt(data)
    with pytest.raises(BatchFormatError, match=why):
        decode_batches(bytes(data))


def test_decode_refuses_bytes_left_in_a_record() -> None:
    rec = bytearray(encode_record(Record(b"hi"), 0, 0))
    struct.pack_into("<I", rec, 0, struct.unpack_from("<I", rec)[0] + 1)
    with pytest.raises(BatchFormatError, match="left over"):
        decode_record(bytes(rec + b"\x00"))
    with pytest.raises(BatchFormatError, match="runs past"):
        decode_record(bytes(rec))


def test_ubyte_vector_matches_the_generated_accessors() -> None:
    """The vtable offsets the client slices with name the right fields."""
    data = bytes(range(256)) * 3
    b = flatbuffers.Builder(0)
    vec = b.CreateByteVector(data)
    g.FetchResponseStart(b)
    g.FetchResponseAddPartition(b, 3)
    g.FetchResponseAddBatches(b, vec)
    b.Finish(g.FetchResponseEnd(b))
    f = g.FetchResponse.GetRootAs(b.Output(), 0)
    assert ubyte_vector(f._tab, _FETCH_RESPONSE_BATCHES) == data
    assert bytes(f.Batches(i) for i in range(f.BatchesLength())) == data

    b = flatbuffers.Builder(0)
    vec = b.CreateByteVector(data[:77])
    g.ReceivedEventStart(b)
    g.ReceivedEventAddRecord(b, vec)
    b.Finish(g.ReceivedEventEnd(b))
    e = g.ReceivedEvent.GetRootAs(b.Output(), 0)
    assert ubyte_vector(e._tab, _RECEIVED_EVENT_RECORD) == data[:77]
    assert bytes(e.Record(i) for i in range(e.RecordLength())) == data[:77]


def test_request_frames_are_size_prefixed_and_aligned() -> None:
    for cid in (1, 2, 2**64 - 1):
        frame = build_request(cid, g.RequestBody.ListTopicsRequest,
                              lambda b: (g.ListTopicsRequestStart(b), g.ListTopicsRequestEnd(b))[1])
        assert struct.unpack_from("<I", frame)[0] == len(frame) - 4
        req = g.Request.GetRootAs(frame, 4)
        assert req.CorrelationId() == cid
        assert req.BodyType() == g.RequestBody.ListTopicsRequest
        # The 8-byte correlation_id is aligned from the first byte of the length prefix.
        assert (req._tab.Pos + req._tab.Offset(4)) % 8 == 0


def test_error_code_names() -> None:
    assert ErrorCode.None_ == 0
    assert code_name(ErrorCode.None_) == "None"
    assert code_name(ErrorCode.LockLost) == "LockLost"
    assert code_name(999) == "ErrorCode(999)"
