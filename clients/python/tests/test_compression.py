"""Record-batch format v2 against the real broker: v1 batches and v2 batches (uncompressed, lz4,
zstd) in one partition, read back byte for byte, and compressed batches the broker must refuse
with ``CorruptBatch`` (garbage with a valid CRC, decompression bombs)."""

from __future__ import annotations

import random
import struct
from pathlib import Path
from typing import Iterator

import lz4.block
import pytest
import zstandard

from corebus_client import Client, CorebusError, ErrorCode, Record, decode_batches, encode_batch
from corebus_client.records import crc32c

from conftest import Broker, start_broker
from test_client import event, raw_fetch

MIB = 1024 * 1024


def resealed(batch: bytes | bytearray) -> bytes:
    """``batch`` with its CRC recomputed, so that only the deeper checks can refuse it."""
    out = bytearray(batch)
    struct.pack_into("<I", out, 24, crc32c(out[28:]))
    return bytes(out)


def with_region(batch: bytes, region: bytes, records_length: int | None = None) -> bytes:
    """The v2 ``batch`` with its records region replaced by ``region`` (and ``records_length``
    by the value given), ``batch_length`` and CRC fixed up."""
    out = bytearray(batch[:80]) + region
    struct.pack_into("<I", out, 8, len(out))
    if records_length is not None:
        struct.pack_into("<I", out, 72, records_length)
    return resealed(out)


def varied_records(first: int, n: int) -> list[Record]:
    """``n`` full records whose values compress well, badly, or are empty."""
    rnd = random.Random(first)
    values = [b"x" * 5000, bytes(rnd.getrandbits(8) for _ in range(3000)), b"",
              bytes(range(256)) * 8]
    return [event(first + i, value=values[i % len(values)]) for i in range(n)]


def assert_refused_as_corrupt(client: Client, topic: str, batches: bytes) -> None:
    """Producing ``batches`` fails with CorruptBatch and appends nothing."""
    before = client.fetch(topic, 0, 0).high_watermark
    with pytest.raises(CorebusError) as e:
        client.produce(topic, 0, batches)
    assert e.value.code == ErrorCode.CorruptBatch, e.value
    assert client.fetch(topic, 0, 0).high_watermark == before


def test_v1_and_v2_batches_in_one_partition_read_back_byte_for_byte(
    client: Client, broker: Broker, topic_name: str
) -> None:
    client.create_topic(topic_name, 1)
    sent = {
        "v1": varied_records(0, 4),
        "lz4": varied_records(100, 5),
        "zstd": varied_records(200, 6),
        "none": varied_records(300, 3),
    }
    batches = {
        "v1": encode_batch(sent["v1"]),
        "lz4": encode_batch(sent["lz4"], compression="lz4"),
        "zstd": encode_batch(sent["zstd"], compression="zstd"),
        "none": encode_batch(sent["none"], compression="none"),
    }
    assert len(batches["lz4"]) < len(encode_batch(sent["lz4"]))  # really compressed
    assert len(batches["zstd"]) < len(encode_batch(sent["zstd"]))
    bases = {}
    for name, batch in batches.items():  # one produce each...
        r = client.produce(topic_name, 0, batch)
        bases[name] = r.base_offset
        assert r.last_offset == r.base_offset + len(sent[name]) - 1
    # ... and all four kinds in one produce, appended as one unit.
    mixed = client.produce(topic_name, 0, b"".join(batches.values()))
    expected = [rec for name in batches for rec in sent[name]] * 2
    assert (mixed.base_offset, mixed.last_offset) == (len(expected) // 2, len(expected) - 1)

    got = client.fetch(topic_name, 0, 0)
    assert got.high_watermark == got.next_offset == len(expected)
    assert [r.offset for r in got.records] == list(range(len(expected)))
    for rec in got.records:
        rec.offset = None
    assert got.records == expected  # values, keys, attributes and headers byte for byte

    # From the middle of a compressed batch: the records below the offset are skipped.
    middle = client.fetch(topic_name, 0, bases["zstd"] + 2)
    assert [r.value for r in middle.records[:4]] == [r.value for r in sent["zstd"][2:]]

    # Stored as sent: each fetched batch is the produced one with only bytes [0, 24) stamped,
    # and keeps its format version, codec and records_length.
    stored = raw_fetch(broker.port, topic_name, 0, 0)
    produced = list(batches.values()) * 2
    offsets = list(bases.values())
    offsets += [mixed.base_offset + (o - offsets[0]) for o in offsets]
    decoded = decode_batches(stored)
    assert [(b.magic, b.codec) for b in decoded] == [
        (1, "none"), (2, "lz4"), (2, "zstd"), (2, "none")] * 2
    assert [b.base_offset for b in decoded] == offsets
    at = 0
    for batch in produced:
        assert stored[at + 24 : at + len(batch)] == batch[24:]
        at += len(batch)
    assert at == len(stored)


@pytest.mark.parametrize("codec", ["lz4", "zstd"])
def test_garbage_compressed_records_with_a_valid_crc_are_corrupt(
    client: Client, topic_name: str, codec: str
) -> None:
    client.create_topic(topic_name, 1)
    good = encode_batch(varied_records(0, 3), compression=codec)
    garbage = with_region(good, b"\xff" * (len(good) - 80))  # records_length unchanged
    assert_refused_as_corrupt(client, topic_name, garbage)
    # Refused as a whole even after a good batch of the same request.
    assert_refused_as_corrupt(client, topic_name, encode_batch([Record(b"ok")]) + garbage)
    # The compressed records cut short by 3 bytes (records_length unchanged).
    truncated = with_region(good, good[80:-3])
    assert_refused_as_corrupt(client, topic_name, truncated)
    assert client.produce(topic_name, 0, good).base_offset == 0  # the partition still works


# ---------------------------------------------------------------- decompression bombs


@pytest.fixture(scope="module")
def own_broker() -> Iterator[Broker]:
    """A broker of this module's own, so that its peak memory tells about these tests only."""
    yield from start_broker()


def peak_rss_bytes(broker: Broker) -> int:
    """The broker process's peak resident memory (VmHWM)."""
    assert broker.proc is not None
    for line in Path(f"/proc/{broker.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/PID/status")


def bombs() -> Iterator[tuple[str, bytes]]:
    """v2 batches whose records expand to 64 MiB: lying about it (records_length 1000), and
    honest but beyond the broker's 16 MiB frame limit."""
    records = [Record(bytes(64 * MIB), timestamp_ms=1)]
    for codec in ("lz4", "zstd"):
        honest = encode_batch(records, compression=codec)
        assert struct.unpack_from("<I", honest, 72)[0] > 64 * MIB
        assert len(honest) < MIB
        yield f"{codec}, records_length 1000", with_region(honest, honest[80:], 1000)
        yield f"{codec}, records_length 64 MiB", honest
    # records_length 1000 and a raw block of 64 MiB of zeros (not even records).
    zeros = lz4.block.compress(bytes(64 * MIB), store_size=False)
    yield "lz4 zeros", with_region(encode_batch([Record(b"x")], compression="lz4"), zeros, 1000)
    frame = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(64 * MIB))
    yield "zstd zeros, no content size", with_region(
        encode_batch([Record(b"x")], compression="zstd"), frame, 1000)


def test_decompression_bombs_are_corrupt(own_broker: Broker, topic_name: str) -> None:
    with Client("127.0.0.1", own_broker.port, timeout=10.0) as client:
        client.create_topic(topic_name, 1)
        client.produce(topic_name, 0, [Record(b"warm-up")])
        before = peak_rss_bytes(own_broker)
        for name, bomb in bombs():
            try:
                assert_refused_as_corrupt(client, topic_name, bomb)
            except AssertionError as e:
                raise AssertionError(f"{name}: {e}") from e
        # Refused before expanding: no 64 MiB buffer was ever filled.
        grown = peak_rss_bytes(own_broker) - before
        assert grown < 32 * MIB, f"the broker's peak memory grew by {grown / MIB:.0f} MiB"
        assert client.produce(topic_name, 0, [Record(b"after")]).base_offset == 1
