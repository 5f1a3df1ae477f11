"""Unit tests without a broker: CRC32C, the record-batch codec (docs/protocol.md sections 7
and 8; formats v1 and v2 with every codec) and the framing helpers."""

from __future__ import annotations

import struct
import sys
import tracemalloc
from typing import Optional

import flatbuffers
import lz4.block
import pytest
import zstandard

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
from corebus_client.records import CODECS
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
        (lambda b: b.__setitem__(28, 3), "magic"),  # 1 and 2 are known
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


# ---------------------------------------------------------------- batch format v2

V2_TAIL = struct.Struct("<qihHII")  # producer_id .. reserved, bytes [56, 80)


def sample_records() -> list[Record]:
    """Records with every field set, compressible enough for lz4 and zstd to shrink."""
    return [
        Record(b"v" * 500, key=b"k1", headers=[("traceparent", b"00-ab"), ("x", b"")],
               id="id-1", source="/src", type="com.example.t", subject="s/1", timestamp_ms=5),
        Record(b"", key=b"", timestamp_ms=9),
        Record(b"\x00\xff" * 300, headers=[("dup", b"1"), ("dup", b"2")], timestamp_ms=7),
    ]


def resealed(batch: bytes | bytearray) -> bytes:
    """``batch`` with its CRC recomputed, as a producer that means it would send it."""
    out = bytearray(batch)
    struct.pack_into("<I", out, 24, crc32c(out[28:]))
    return bytes(out)


def v2_batch(region: bytes, records_length: int, attributes: int, count: int = 1) -> bytes:
    """A v2 batch built by hand around any ``region``, with a valid CRC."""
    header = struct.pack("<QIIqIHHIIqq", 0, 80 + len(region), 0, 0, 0, 2, attributes, count,
                         count - 1, 1, 1)
    return resealed(header + V2_TAIL.pack(-1, 0, 0, 0, records_length, 0) + region)


def patched(batch: bytes, fmt: str, at: int, value: int) -> bytes:
    """``batch`` with one field overwritten and the CRC recomputed."""
    out = bytearray(batch)
    struct.pack_into(fmt, out, at, value)
    return resealed(out)


def stamped(batch: bytes, base_offset: int) -> bytes:
    """``batch`` as the broker stores it at ``base_offset`` (outside the CRC)."""
    out = bytearray(batch)
    struct.pack_into("<Q", out, 0, base_offset)
    return bytes(out)


def test_v1_bytes_do_not_change_with_the_v2_arguments_at_their_defaults() -> None:
    records = [Record(b"hi", timestamp_ms=1_700_000_000_000)]
    assert encode_batch(records, compression=None, producer_id=None, producer_epoch=0,
                        base_sequence=0) == DOC_EXAMPLE
    (batch,) = decode_batches(DOC_EXAMPLE)
    assert (batch.magic, batch.codec) == (1, "none")
    assert (batch.producer_id, batch.producer_epoch, batch.base_sequence) == (-1, 0, 0)


def test_v2_uncompressed_worked_example_layout() -> None:
    """The worked example's record in a v2 batch: the v1 header's first 56 bytes with magic 2,
    then the v2 fields, then the same record bytes."""
    record = DOC_EXAMPLE[64:]
    expected = bytearray(DOC_EXAMPLE[:56])
    struct.pack_into("<I", expected, 8, 80 + len(record))
    struct.pack_into("<H", expected, 28, 2)
    expected += V2_TAIL.pack(-1, 0, 0, 0, len(record), 0) + record
    batch = encode_batch([Record(b"hi", timestamp_ms=1_700_000_000_000)], compression="none")
    assert len(batch) == 116
    assert batch[56:64] == b"\xff" * 8  # producer_id -1: not idempotent
    assert batch == resealed(expected)
    idem = encode_batch([Record(b"hi", timestamp_ms=1)], producer_id=7, producer_epoch=3,
                        base_sequence=100)
    assert struct.unpack_from("<HH", idem, 28) == (2, 0)  # a producer id alone makes it v2
    assert V2_TAIL.unpack_from(idem, 56) == (7, 100, 3, 0, len(idem) - 80, 0)


@pytest.mark.parametrize("codec", ["none", "lz4", "zstd"])
@pytest.mark.parametrize("producer", [None, (42, 5, 1000)])
def test_v2_round_trips_with_every_codec(codec: str, producer: Optional[tuple]) -> None:
    records = sample_records()
    v1 = encode_batch(records)
    if producer is None:
        data = encode_batch(records, compression=codec)
        producer = (-1, 0, 0)
    else:
        pid, epoch, seq = producer
        data = encode_batch(records, compression=codec, producer_id=pid, producer_epoch=epoch,
                            base_sequence=seq)
    length, _, _, crc, magic, attrs = struct.unpack_from("<IIqIHH", data, 8)
    assert (length, magic, attrs) == (len(data), 2, CODECS[codec])
    assert crc == crc32c(data[28:])
    assert data[32:56] == v1[32:56]  # record count, last delta and timestamps as in v1
    pid, seq, epoch, _, records_length, _ = V2_TAIL.unpack_from(data, 56)
    assert (pid, epoch, seq) == producer
    assert records_length == len(v1) - 64  # the v1 records region, before compression
    region = data[80:]
    if codec == "lz4":
        region = lz4.block.decompress(region, uncompressed_size=records_length)
    elif codec == "zstd":
        region = zstandard.ZstdDecompressor().decompress(region)
    if codec != "none":
        assert len(data) < len(v1)
    assert region == v1[64:]

    (batch,) = decode_batches(stamped(data, 10))
    assert (batch.magic, batch.codec) == (2, codec)
    assert (batch.producer_id, batch.producer_epoch, batch.base_sequence) == producer
    assert (batch.first_timestamp_ms, batch.max_timestamp_ms) == (5, 9)
    assert [r.offset for r in batch.records] == [10, 11, 12]
    for got in batch.records:
        got.offset = None
    assert batch.records == records


def test_v1_and_v2_batches_decode_from_one_buffer() -> None:
    parts = [
        encode_batch([Record(b"a"), Record(b"b")], 1),
        encode_batch([Record(b"c")], 2, compression="lz4"),
        encode_batch([Record(b"d"), Record(b"e")], 3, compression="zstd", producer_id=9),
        encode_batch([Record(b"f")], 4, compression="none"),
        encode_batch([Record(b"g")], 5),
    ]
    buf, base = b"", 0
    for part in parts:
        buf += stamped(part, base)
        base += struct.unpack_from("<I", part, 32)[0]
    batches = decode_batches(buf)
    assert [(b.magic, b.codec, b.producer_id) for b in batches] == [
        (1, "none", -1), (2, "lz4", -1), (2, "zstd", 9), (2, "none", -1), (1, "none", -1)]
    records = [r for b in batches for r in b.records]
    assert [(r.offset, r.value) for r in records] == list(enumerate([b"a", b"b", b"c", b"d",
                                                                     b"e", b"f", b"g"]))


@pytest.mark.parametrize("codec", ["lz4", "zstd"])
def test_a_flipped_bit_in_compressed_records_fails_the_crc(codec: str) -> None:
    data = bytearray(encode_batch(sample_records(), compression=codec))
    data[80 + (len(data) - 80) // 2] ^= 0x10
    with pytest.raises(BatchFormatError, match="CRC"):
        decode_batches(bytes(data))
    data = bytearray(encode_batch(sample_records(), compression=codec))
    data[72] ^= 1  # records_length, also CRC-covered
    with pytest.raises(BatchFormatError, match="CRC"):
        decode_batches(bytes(data))


def zstd_without_content_size(records: list[Record]) -> bytes:
    """A v2 zstd batch whose frame does not state its content size (as streaming encoders
    write it), so that only ``records_length`` bounds the output."""
    body = encode_batch(records)[64:]
    frame = zstandard.ZstdCompressor(write_content_size=False).compress(body)
    assert zstandard.frame_content_size(frame) == -1
    return v2_batch(frame, len(body), CODECS["zstd"], len(records))


@pytest.mark.parametrize("codec", ["none", "lz4", "zstd", "zstd without content size"])
@pytest.mark.parametrize("lie", [-1, +1, -100, +100, pytest.param(None, id="u32-max")])
def test_a_records_length_that_lies_is_refused(codec: str, lie: Optional[int]) -> None:
    if codec == "zstd without content size":
        data = zstd_without_content_size(sample_records())
    else:
        data = encode_batch(sample_records(), compression=codec)
    true_length = struct.unpack_from("<I", data, 72)[0]
    assert len(decode_batches(data)[0].records) == 3
    declared = 0xFFFFFFFF if lie is None else true_length + lie
    with pytest.raises(BatchFormatError, match="records_length"):
        decode_batches(patched(data, "<I", 72, declared))


BOMB = 64 * 1024 * 1024  # bytes a small compressed region expands to


@pytest.mark.parametrize(
    "codec, declared",
    [("lz4", 16), ("zstd", 16), ("lz4", 0xFFFFFFFF), ("zstd", 0xFFFFFFFF)],
)
def test_a_decompression_bomb_is_refused_without_allocating_it(codec: str, declared: int) -> None:
    """A region that expands to 64 MiB (or a records_length of 4 GiB) is refused with no
    more than a few MiB allocated: the decompressor gets room for ``records_length`` bytes,
    and a ``records_length`` beyond what the region could hold is refused before that."""
    if codec == "lz4":
        region = lz4.block.compress(bytes(BOMB), store_size=False)
    else:
        region = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(BOMB))
    data = v2_batch(region, declared, CODECS[codec])
    tracemalloc.start()
    try:
        with pytest.raises(BatchFormatError, match="records_length"):
            decode_batches(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * 1024 * 1024


@pytest.mark.parametrize("attributes", [3, 4, 7, 0x08, 0x100 | 1, 0x8000 | 2])
def test_an_unknown_codec_or_attribute_bit_is_refused(attributes: int) -> None:
    data = encode_batch([Record(b"x")], compression="none")
    with pytest.raises(BatchFormatError, match="codec"):
        decode_batches(patched(data, "<H", 30, attributes))


@pytest.mark.parametrize("at, fmt", [(70, "<H"), (76, "<I")])
def test_nonzero_reserved_v2_bytes_are_refused(at: int, fmt: str) -> None:
    data = encode_batch([Record(b"x")], compression="lz4")
    with pytest.raises(BatchFormatError, match="reserved"):
        decode_batches(patched(data, fmt, at, 1))


@pytest.mark.parametrize("codec", ["lz4", "zstd"])
def test_garbage_compressed_records_with_a_good_crc_are_refused(codec: str) -> None:
    with pytest.raises(BatchFormatError, match="do not decompress"):
        decode_batches(v2_batch(b"\xff" * 40, 36, CODECS[codec]))


@pytest.mark.parametrize("codec", ["none", "lz4", "zstd"])
@pytest.mark.parametrize("count, why", [(2, "bytes after its records"), (4, "runs past")])
def test_decompressed_records_must_be_exactly_record_count(codec: str, count: int,
                                                           why: str) -> None:
    data = encode_batch(sample_records(), compression=codec)  # 3 records
    bad = bytearray(data)
    struct.pack_into("<II", bad, 32, count, count - 1)
    with pytest.raises(BatchFormatError, match=why):
        decode_batches(resealed(bad))


def test_a_v1_batch_relabelled_as_v2_is_refused() -> None:
    data = bytearray(DOC_EXAMPLE)
    data[28] = 2
    with pytest.raises(BatchFormatError, match="CRC"):
        decode_batches(bytes(data))
    with pytest.raises(BatchFormatError):  # its records read as v2 header fields
        decode_batches(resealed(data))
    data[8] = 70  # too short for a v2 header
    with pytest.raises(BatchFormatError, match="batch_length"):
        decode_batches(resealed(data[:70]))


@pytest.mark.parametrize(
    "kwargs, why",
    [
        (dict(compression="gzip"), "unknown compression"),
        (dict(producer_id=-1), "negative"),
        (dict(producer_epoch=1), "need a producer_id"),
        (dict(compression="lz4", base_sequence=1), "need a producer_id"),
        (dict(producer_id=2**63), "i64"),
        (dict(producer_id=1, producer_epoch=2**15), "i16"),
        (dict(producer_id=1, base_sequence=2**31), "i32"),
    ],
)
def test_encode_batch_refuses_bad_v2_arguments(kwargs: dict, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        encode_batch([Record(b"x")], **kwargs)


def test_a_missing_codec_package_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    lz4_batch = encode_batch([Record(b"x")], compression="lz4")
    monkeypatch.setitem(sys.modules, "lz4.block", None)  # makes `import lz4.block` fail
    monkeypatch.setitem(sys.modules, "zstandard", None)
    with pytest.raises(ImportError, match="pip install lz4"):
        decode_batches(lz4_batch)
    with pytest.raises(ImportError, match="pip install zstandard"):
        encode_batch([Record(b"x")], compression="zstd")
    # Uncompressed batches of either version need neither package.
    assert len(decode_batches(encode_batch([Record(b"x")], compression="none") + DOC_EXAMPLE)) == 2
