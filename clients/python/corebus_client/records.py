"""Record batches: the bytes inside ``PartitionProduce.batches``, ``FetchResponse.batches`` and
``ReceivedEvent.record`` (docs/protocol.md sections 7 and 8). They are not FlatBuffers.

A batch is a header followed by records; every integer is little-endian. Two format versions
(``magic``) exist, and one buffer may mix them:

- **v1**: a 64-byte header, then the records as they are.
- **v2**: an 80-byte header (v1's first 56 bytes, then ``producer_id``, ``base_sequence``,
  ``producer_epoch`` and ``records_length``), then the records region, stored as is or
  compressed as a whole (``attributes`` bits 0..2: 0 none, 1 one raw LZ4 block, 2 one zstd
  frame). ``records_length`` is the region's size before compression. The CRC covers the
  stored (compressed) bytes.

:func:`encode_batch` writes v1 unless asked for compression or a producer id. Compressed batches
need the ``lz4`` or ``zstandard`` package (the ``compression`` extra), imported only when such a
batch is written or read.
"""

from __future__ import annotations

import importlib
import struct
import time
from dataclasses import dataclass, field
from types import ModuleType
from typing import Iterator, Optional, Sequence

#: Size of a v1 batch header.
HEADER_BYTES = 64
#: Size of a v2 batch header.
HEADER_BYTES_V2 = 80
#: Format version 1, which :func:`encode_batch` writes by default.
MAGIC = 1
#: Format version 2: producer fields and compression.
MAGIC_V2 = 2
#: ``key_length`` of a record without a key.
NO_KEY = 0xFFFFFFFF
#: ``producer_id`` of a batch from a producer that is not idempotent (and of every v1 batch).
NO_PRODUCER_ID = -1
#: Codec names (``encode_batch(compression=...)``, ``Batch.codec``) and their ``attributes``
#: values.
CODECS = {"none": 0, "lz4": 1, "zstd": 2}
#: The bits of v2 ``attributes`` that hold the codec; all others must be 0.
CODEC_MASK = 0x7

# Bytes [0, 56), the same in both versions: base_offset, batch_length, leader_epoch,
# append_time_ms, crc, magic, attributes, record_count, last_offset_delta, first_timestamp_ms,
# max_timestamp_ms.
_COMMON = struct.Struct("<QIIqIHHIIqq")
# v1 bytes [56, 64): reserved (producer id), 0.
_V1_TAIL = struct.Struct("<Q")
# v2 bytes [56, 80): producer_id, base_sequence, producer_epoch, reserved 0, records_length,
# reserved 0.
_V2_TAIL = struct.Struct("<qihHII")
assert _COMMON.size + _V1_TAIL.size == HEADER_BYTES
assert _COMMON.size + _V2_TAIL.size == HEADER_BYTES_V2
_HEADER_SIZES = {MAGIC: HEADER_BYTES, MAGIC_V2: HEADER_BYTES_V2}
_CODEC_NAMES = {value: name for name, value in CODECS.items()}
#: The CRC covers ``[CRC_START, batch_length)``: everything from ``magic`` on.
CRC_START = 28
_CRC_AT = 24
# How many times its size a compressed region can expand at most: an LZ4 match-length byte adds
# at most 255 bytes of output, a 4-byte zstd RLE block at most 128 KiB. A larger records_length
# is a lie, refused before room for it is made.
_MAX_RATIO = {"lz4": 255, "zstd": 32768}


class BatchFormatError(ValueError):
    """Bytes that are not a valid record batch or record."""


def _crc32c_table() -> list[int]:
    table = []
    for n in range(256):
        crc = n
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
        table.append(crc)
    return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes | bytearray | memoryview) -> int:
    """CRC-32C (Castagnoli): reflected polynomial 0x82F63B78, initial value and final XOR
    0xFFFFFFFF. ``crc32c(b"123456789") == 0xE3069283``."""
    crc = 0xFFFFFFFF
    table = _CRC_TABLE
    for b in data:
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


@dataclass
class Record:
    """One record, i.e. one CloudEvent (docs/protocol.md section 7.2).

    ``id``, ``source``, ``type`` and ``subject`` are the CloudEvents attributes; an empty or
    absent one is encoded with length 0 and decodes as ``None``. ``headers`` are the
    extension attributes, in order (names may repeat). ``timestamp_ms`` is the CloudEvents
    ``time``; ``None`` means "now" when the record is encoded. ``offset`` is set on records
    read from the broker and ignored when producing.

    Text fields are encoded as UTF-8. The broker does not check UTF-8 inside records, so text
    from other producers is decoded with ``surrogateescape``: it re-encodes to the same bytes.
    """

    value: bytes = b""
    key: Optional[bytes] = None
    headers: list[tuple[str, bytes]] = field(default_factory=list)
    id: Optional[str] = None
    source: Optional[str] = None
    type: Optional[str] = None
    subject: Optional[str] = None
    timestamp_ms: Optional[int] = None
    offset: Optional[int] = None

    def header(self, name: str) -> Optional[bytes]:
        """The value of the first header called ``name``, or ``None``."""
        for k, v in self.headers:
            if k == name:
                return v
        return None


@dataclass
class Batch:
    """A decoded batch. ``records`` carry their offsets (``base_offset + offset_delta``).

    ``magic`` is the format version (1 or 2) and ``codec`` the name of the compression the
    records were stored with (``"none"``, ``"lz4"`` or ``"zstd"``; always ``"none"`` in v1).
    ``producer_id`` is :data:`NO_PRODUCER_ID` (-1), and ``producer_epoch`` and
    ``base_sequence`` 0, for a producer that is not idempotent and for every v1 batch.
    """

    base_offset: int
    append_time_ms: int
    first_timestamp_ms: int
    max_timestamp_ms: int
    records: list[Record]
    magic: int = MAGIC
    codec: str = "none"
    producer_id: int = NO_PRODUCER_ID
    producer_epoch: int = 0
    base_sequence: int = 0


def now_ms() -> int:
    """Milliseconds since the Unix epoch."""
    return time.time_ns() // 1_000_000


def _text(s: Optional[str]) -> bytes:
    return s.encode("utf-8", "surrogateescape") if s else b""


def encode_record(record: Record, offset_delta: int, timestamp_ms: int) -> bytes:
    """One record in the layout of section 7.2, its ``u32`` length prefix included."""
    parts = [struct.pack("<Iq", offset_delta, timestamp_ms)]
    if record.key is None:
        parts.append(struct.pack("<I", NO_KEY))
    else:
        parts += [struct.pack("<I", len(record.key)), bytes(record.key)]
    parts += [struct.pack("<I", len(record.value)), bytes(record.value)]
    for name, attr in (
        ("id", record.id),
        ("source", record.source),
        ("type", record.type),
        ("subject", record.subject),
    ):
        raw = _text(attr)
        if len(raw) > 0xFFFF:
            raise ValueError(f"record {name} is longer than 65535 bytes")
        parts += [struct.pack("<H", len(raw)), raw]
    if len(record.headers) > 0xFFFF:
        raise ValueError("a record has at most 65535 headers")
    parts.append(struct.pack("<H", len(record.headers)))
    for name, value in record.headers:
        raw = _text(name)
        if len(raw) > 0xFFFF:
            raise ValueError("a header name is longer than 65535 bytes")
        parts += [struct.pack("<H", len(raw)), raw, struct.pack("<I", len(value)), bytes(value)]
    body = b"".join(parts)
    return struct.pack("<I", len(body)) + body


def _codec_module(name: str) -> ModuleType:
    """Imports ``lz4.block`` or ``zstandard`` on first use, with an error that says what to
    install."""
    package = name.split(".")[0]
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise ImportError(
            f"compressed record batches need the {package!r} package: pip install {package} "
            "(or install corebus-client[compression])"
        ) from e


def _check_int(name: str, value: int, bits: int) -> None:
    """Raises ``ValueError`` unless ``value`` fits a signed integer of ``bits`` bits."""
    if not -(1 << (bits - 1)) <= value < 1 << (bits - 1):
        raise ValueError(f"{name} {value} does not fit an i{bits}")


def _encode_records(
    records: Sequence[Record], timestamp_ms: Optional[int]
) -> tuple[bytes, list[int]]:
    """The records region of a batch and each record's timestamp (``None`` ones replaced by
    ``timestamp_ms``, default now)."""
    if not records:
        raise ValueError("a batch holds at least one record")
    default_ts = now_ms() if timestamp_ms is None else timestamp_ms
    stamps = [default_ts if r.timestamp_ms is None else r.timestamp_ms for r in records]
    body = b"".join(encode_record(r, i, ts) for i, (r, ts) in enumerate(zip(records, stamps)))
    return body, stamps


def _sealed(header: bytes, region: bytes) -> bytes:
    """``header + region`` with the CRC filled in."""
    batch = bytearray(header)
    batch += region
    struct.pack_into("<I", batch, _CRC_AT, crc32c(memoryview(batch)[CRC_START:]))
    return bytes(batch)


def _compress(codec: str, data: bytes) -> bytes:
    """``data`` as the stored records region of ``codec``."""
    if codec == "lz4":
        return bytes(_codec_module("lz4.block").compress(data, store_size=False))
    if codec == "zstd":
        return bytes(_codec_module("zstandard").ZstdCompressor().compress(data))
    return data


def encode_batch(
    records: Sequence[Record],
    timestamp_ms: Optional[int] = None,
    *,
    compression: Optional[str] = None,
    producer_id: Optional[int] = None,
    producer_epoch: int = 0,
    base_sequence: int = 0,
) -> bytes:
    """One batch holding ``records`` as a producer sends it: broker-stamped fields zero, CRC
    set. A record whose ``timestamp_ms`` is ``None`` gets ``timestamp_ms`` (default: now).

    With the defaults the batch is v1. ``compression`` (``"none"``, ``"lz4"`` or ``"zstd"``)
    or a ``producer_id`` (0 or more; ``None`` means not idempotent) make it v2;
    ``producer_epoch`` (i16) and ``base_sequence`` (i32) then go with the ``producer_id``."""
    body, stamps = _encode_records(records, timestamp_ms)
    count = len(records)
    if producer_id is None and (producer_epoch or base_sequence):
        raise ValueError("producer_epoch and base_sequence need a producer_id")
    if compression is None and producer_id is None:
        header = _COMMON.pack(
            0, HEADER_BYTES + len(body), 0, 0, 0, MAGIC, 0, count, count - 1,
            stamps[0], max(stamps),
        ) + _V1_TAIL.pack(0)
        return _sealed(header, body)
    codec = "none" if compression is None else compression
    if codec not in CODECS:
        raise ValueError(f"unknown compression {codec!r}: use one of {', '.join(CODECS)}")
    if producer_id is None:
        producer_id = NO_PRODUCER_ID
    elif producer_id < 0:
        raise ValueError(f"producer_id {producer_id} is negative: pass None for none")
    _check_int("producer_id", producer_id, 64)
    _check_int("producer_epoch", producer_epoch, 16)
    _check_int("base_sequence", base_sequence, 32)
    region = _compress(codec, body)
    header = _COMMON.pack(
        0, HEADER_BYTES_V2 + len(region), 0, 0, 0, MAGIC_V2, CODECS[codec], count, count - 1,
        stamps[0], max(stamps),
    ) + _V2_TAIL.pack(producer_id, base_sequence, producer_epoch, 0, len(body), 0)
    return _sealed(header, region)


class _Cursor:
    """Bounds-checked little-endian reads of ``buf[pos:end]``."""

    def __init__(self, buf: bytes, pos: int, end: int) -> None:
        self.buf, self.pos, self.end = buf, pos, end

    def take(self, n: int) -> bytes:
        if n > self.end - self.pos:
            raise BatchFormatError(f"a field at byte {self.pos} runs past its record")
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return bytes(out)

    def unpack(self, fmt: str) -> int:
        (value,) = struct.unpack(fmt, self.take(struct.calcsize(fmt)))
        return value

    def text(self) -> Optional[str]:
        raw = self.take(self.unpack("<H"))
        return raw.decode("utf-8", "surrogateescape") if raw else None


def decode_record(buf: bytes, pos: int = 0, end: Optional[int] = None) -> tuple[Record, int, int]:
    """Decodes the record at ``buf[pos:]`` (its length prefix included), which must fit below
    ``end`` (default ``len(buf)``). Returns ``(record, offset_delta, position after it)``;
    ``record.offset`` is left ``None``."""
    end = len(buf) if end is None else end
    length = _Cursor(buf, pos, end).unpack("<I")
    rec_end = pos + 4 + length
    if rec_end > end:
        raise BatchFormatError(f"the record at byte {pos} runs past its batch")
    c = _Cursor(buf, pos + 4, rec_end)
    offset_delta = c.unpack("<I")
    timestamp_ms = c.unpack("<q")
    key_len = c.unpack("<I")
    key = None if key_len == NO_KEY else c.take(key_len)
    value = c.take(c.unpack("<I"))
    id_, source, type_, subject = c.text(), c.text(), c.text(), c.text()
    headers = []
    for _ in range(c.unpack("<H")):
        name = c.take(c.unpack("<H")).decode("utf-8", "surrogateescape")
        headers.append((name, c.take(c.unpack("<I"))))
    if c.pos != rec_end:
        raise BatchFormatError(f"the record at byte {pos} has {rec_end - c.pos} bytes left over")
    record = Record(value, key, headers, id_, source, type_, subject, timestamp_ms)
    return record, offset_delta, rec_end


def decode_batches(buf: bytes, verify_crc: bool = True) -> list[Batch]:
    """Decodes concatenated batches of either version (a fetch reply's ``batches``), checking
    each header, CRC and record (the checks of section 7.4), and decompressing compressed v2
    records. Raises :class:`BatchFormatError`, or ``ImportError`` when a compressed batch needs
    a package that is not installed."""
    return list(iter_batches(buf, verify_crc))


def iter_batches(buf: bytes, verify_crc: bool = True) -> Iterator[Batch]:
    """Like :func:`decode_batches`, one batch at a time."""
    at = 0
    while at < len(buf):
        batch, length = _decode_batch(buf, at, verify_crc)
        yield batch
        at += length


def _decode_batch(buf: bytes, at: int, verify_crc: bool) -> tuple[Batch, int]:
    """Decodes the batch at ``buf[at:]``; returns it and its ``batch_length``."""
    if len(buf) - at < HEADER_BYTES:
        raise BatchFormatError(f"{len(buf) - at} bytes at {at} are too short for a batch")
    (base, length, _epoch, append_ms, crc, magic, attrs, count, last_delta, first_ts,
     max_ts) = _COMMON.unpack_from(buf, at)
    if not HEADER_BYTES <= length <= len(buf) - at:
        raise BatchFormatError(f"batch at {at}: bad batch_length {length}")
    header_bytes = _HEADER_SIZES.get(magic)
    if header_bytes is None:
        raise BatchFormatError(f"batch at {at}: magic {magic}, expected {MAGIC} or {MAGIC_V2}")
    if length < header_bytes:
        raise BatchFormatError(f"batch at {at}: bad batch_length {length} for magic {magic}")
    if verify_crc:
        actual = crc32c(memoryview(buf)[at + CRC_START : at + length])
        if actual != crc:
            raise BatchFormatError(
                f"batch at {at}: CRC32C {actual:#010x} does not match {crc:#010x}"
            )
    if count == 0 or last_delta != count - 1:
        raise BatchFormatError(f"batch at {at}: record_count {count}, last delta {last_delta}")
    batch = Batch(base, append_ms, first_ts, max_ts, [], magic)
    if magic == MAGIC:
        batch.records = _decode_records(buf, at + HEADER_BYTES, at + length, count, base, at)
    else:
        batch.records = _decode_v2_records(buf, at, length, batch, attrs, count)
    return batch, length


def _decode_v2_records(
    buf: bytes, at: int, length: int, batch: Batch, attrs: int, count: int
) -> list[Record]:
    """Checks the v2 fields of the batch at ``buf[at:at + length]`` (whose common header fields
    have been checked and put into ``batch``), sets its producer fields and codec, and returns
    its records, decompressed."""
    (batch.producer_id, batch.base_sequence, batch.producer_epoch, reserved1, records_length,
     reserved2) = _V2_TAIL.unpack_from(buf, at + _COMMON.size)
    if reserved1 or reserved2:
        raise BatchFormatError(f"batch at {at}: reserved header bytes are not zero")
    codec = _CODEC_NAMES.get(attrs & CODEC_MASK)
    if codec is None or attrs & ~CODEC_MASK:
        raise BatchFormatError(f"batch at {at}: attributes {attrs:#06x} name no known codec")
    batch.codec = codec
    start, end = at + HEADER_BYTES_V2, at + length
    if codec == "none":
        if records_length != end - start:
            raise BatchFormatError(
                f"batch at {at}: records_length {records_length}, but {end - start} bytes of "
                "records"
            )
        return _decode_records(buf, start, end, count, batch.base_offset, at)
    region = _decompress(codec, bytes(buf[start:end]), records_length, at)
    try:
        return _decode_records(region, 0, len(region), count, batch.base_offset, at)
    except BatchFormatError as e:
        raise BatchFormatError(f"{e} (in the {codec}-decompressed records of batch at {at})") from e


def _decompress(codec: str, data: bytes, size: int, at: int) -> bytes:
    """The records region of the batch at ``at``, stored as ``data`` with ``codec``, which must
    decompress to exactly ``size`` bytes. Never makes room for more than ``size`` bytes."""
    if size > _MAX_RATIO[codec] * len(data):
        raise BatchFormatError(
            f"batch at {at}: records_length {size} is more than {len(data)} bytes of {codec} "
            "can hold"
        )
    try:
        if codec == "lz4":
            out = _lz4_decompress(data, size)
        else:
            out = _zstd_decompress(data, size)
    except BatchFormatError as e:
        raise BatchFormatError(f"batch at {at}: {e}") from e
    if len(out) != size:
        raise BatchFormatError(
            f"batch at {at}: records_length {size}, but the {codec} records decompress to "
            f"{len(out)} bytes"
        )
    return out


def _lz4_decompress(data: bytes, size: int) -> bytes:
    """One raw LZ4 block, decompressed into at most ``size`` bytes."""
    block = _codec_module("lz4.block")
    try:
        return bytes(block.decompress(data, uncompressed_size=size))
    except (block.LZ4BlockError, OverflowError, ValueError) as e:
        raise BatchFormatError(
            f"the lz4 records do not decompress to records_length {size}: {e}"
        ) from e


def _zstd_decompress(data: bytes, size: int) -> bytes:
    """One zstd frame, decompressed into at most ``size`` bytes."""
    zstandard = _codec_module("zstandard")
    try:
        # A content size in the frame header would be allocated as is: check it first.
        declared = zstandard.frame_content_size(data)
        if declared != -1 and declared != size:
            raise BatchFormatError(
                f"records_length {size}, but the zstd frame holds {declared} bytes"
            )
        return bytes(
            zstandard.ZstdDecompressor().decompress(
                data, max_output_size=size, allow_extra_data=False
            )
        )
    except zstandard.ZstdError as e:
        raise BatchFormatError(
            f"the zstd records do not decompress to records_length {size}: {e}"
        ) from e


def _decode_records(
    data: bytes, pos: int, end: int, count: int, base: int, at: int
) -> list[Record]:
    """The ``count`` records filling ``data[pos:end]`` exactly, with offsets from ``base``
    (``at`` names the batch in errors)."""
    records = []
    for k in range(count):
        record, delta, pos = decode_record(data, pos, end)
        if delta != k:
            raise BatchFormatError(f"batch at {at}: record {k} has offset_delta {delta}")
        record.offset = base + delta
        records.append(record)
    if pos != end:
        raise BatchFormatError(f"batch at {at}: {end - pos} bytes after its records")
    return records
