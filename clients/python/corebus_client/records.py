"""Record batches: the bytes inside ``PartitionProduce.batches``, ``FetchResponse.batches`` and
``ReceivedEvent.record`` (docs/protocol.md sections 7 and 8). They are not FlatBuffers.

A batch is a 64-byte header followed by records; every integer is little-endian.
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

#: Size of a batch header.
HEADER_BYTES = 64
#: The only batch format version.
MAGIC = 1
#: ``key_length`` of a record without a key.
NO_KEY = 0xFFFFFFFF

# base_offset, batch_length, leader_epoch, append_time_ms, crc, magic, attributes,
# record_count, last_offset_delta, first_timestamp_ms, max_timestamp_ms, producer id.
_HEADER = struct.Struct("<QIIqIHHIIqqQ")
assert _HEADER.size == HEADER_BYTES
#: The CRC covers ``[CRC_START, batch_length)``: everything from ``magic`` on.
CRC_START = 28
_CRC_AT = 24


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
    """A decoded batch. ``records`` carry their offsets (``base_offset + offset_delta``)."""

    base_offset: int
    append_time_ms: int
    first_timestamp_ms: int
    max_timestamp_ms: int
    records: list[Record]


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


def encode_batch(records: Sequence[Record], timestamp_ms: Optional[int] = None) -> bytes:
    """One batch holding ``records`` as a producer sends it: broker-stamped fields zero, CRC
    set. A record whose ``timestamp_ms`` is ``None`` gets ``timestamp_ms`` (default: now)."""
    if not records:
        raise ValueError("a batch holds at least one record")
    default_ts = now_ms() if timestamp_ms is None else timestamp_ms
    stamps = [default_ts if r.timestamp_ms is None else r.timestamp_ms for r in records]
    body = b"".join(encode_record(r, i, ts) for i, (r, ts) in enumerate(zip(records, stamps)))
    count = len(records)
    batch = bytearray(
        _HEADER.pack(
            0, HEADER_BYTES + len(body), 0, 0, 0, MAGIC, 0, count, count - 1,
            stamps[0], max(stamps), 0,
        )
    )
    batch += body
    struct.pack_into("<I", batch, _CRC_AT, crc32c(memoryview(batch)[CRC_START:]))
    return bytes(batch)


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
    """Decodes concatenated batches (a fetch reply's ``batches``), checking each header, CRC
    and record (the checks of section 7.4). Raises :class:`BatchFormatError`."""
    return list(iter_batches(buf, verify_crc))


def iter_batches(buf: bytes, verify_crc: bool = True) -> Iterator[Batch]:
    """Like :func:`decode_batches`, one batch at a time."""
    view = memoryview(buf)
    at = 0
    while at < len(buf):
        if len(buf) - at < HEADER_BYTES:
            raise BatchFormatError(f"{len(buf) - at} bytes at {at} are too short for a batch")
        (base, length, _epoch, append_ms, crc, magic, _attrs, count, last_delta, first_ts,
         max_ts, _producer) = _HEADER.unpack_from(buf, at)
        if not HEADER_BYTES <= length <= len(buf) - at:
            raise BatchFormatError(f"batch at {at}: bad batch_length {length}")
        if magic != MAGIC:
            raise BatchFormatError(f"batch at {at}: magic {magic}, expected {MAGIC}")
        if verify_crc:
            actual = crc32c(view[at + CRC_START : at + length])
            if actual != crc:
                raise BatchFormatError(
                    f"batch at {at}: CRC32C {actual:#010x} does not match {crc:#010x}"
                )
        if count == 0 or last_delta != count - 1:
            raise BatchFormatError(f"batch at {at}: record_count {count}, last delta {last_delta}")
        records = []
        pos = at + HEADER_BYTES
        for k in range(count):
            record, delta, pos = decode_record(buf, pos, at + length)
            if delta != k:
                raise BatchFormatError(f"batch at {at}: record {k} has offset_delta {delta}")
            record.offset = base + delta
            records.append(record)
        if pos != at + length:
            raise BatchFormatError(f"batch at {at}: {at + length - pos} bytes after its records")
        yield Batch(base, append_ms, first_ts, max_ts, records)
        at += length
