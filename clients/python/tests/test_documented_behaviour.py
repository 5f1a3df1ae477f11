"""Behaviour that docs/protocol.md (sections 3, 5, 6.3, 6.6) and docs/subscriptions.md spell
out in so many words, pinned against the real broker: receive and settle limits, per-token
settle outcomes, consumer-group offset edge cases, one partition twice in a produce, the frame
limit, and the text of dead-letter headers."""

from __future__ import annotations

import socket
import struct
from typing import Iterator

import flatbuffers
import pytest

from corebus_client import (
    Client,
    Connection,
    CorebusError,
    ErrorCode,
    Record,
    Subscription,
    build_request,
    encode_batch,
    parse_response,
    read_frame,
)
from corebus_client.generated import corebus_generated as g
from corebus_client.records import now_ms

from conftest import Broker, start_broker, wait_until

MAX_RELEASE_DELAY_MS = 3_600_000  # 1 h (protocol.md 6.6, subscriptions.md "Settle")


def receive_exactly(client: Client, topic: str, sub: str, n: int) -> list:
    """Receives until ``n`` events came (deadline 10 s); fails if more than ``n`` come."""
    events: list = []

    def more() -> bool:
        events.extend(client.receive(topic, sub, max_events=10, max_wait_ms=200))
        return len(events) >= n

    wait_until(f"{n} events", 10, more)
    assert len(events) == n
    return events


def backlog(client: Client, topic: str, sub: str) -> int:
    (info,) = client.list_subscriptions(topic, with_stats=True)
    assert info.stats is not None
    return info.stats.backlog


# ---------------------------------------------------------------- receive


def test_receive_max_events_zero_is_treated_as_one(client: Client, topic_name: str) -> None:
    # protocol.md 6.6 / subscriptions.md "Receive": "0 is treated as 1".
    client.create_topic(topic_name, 1)
    client.create_subscription(Subscription(topic_name, "s"))
    client.produce(topic_name, 0, [Record(f"e{i}".encode()) for i in range(3)])
    wait_until("3 events in the backlog", 10, lambda: backlog(client, topic_name, "s") == 3)

    # The Python builder leaves out a field equal to its default (1), so 0 is on the wire.
    got = client.receive(topic_name, "s", max_events=0, max_wait_ms=5_000)
    assert len(got) == 1
    # The other two were there all along and come on the next receive.
    rest = receive_exactly(client, topic_name, "s", 2)
    assert sorted(e.offset for e in got + rest) == [0, 1, 2]


# ---------------------------------------------------------------- settle


def test_release_delay_over_one_hour_fails_the_whole_request(
    client: Client, topic_name: str
) -> None:
    client.create_topic(topic_name, 1)
    client.create_subscription(Subscription(topic_name, "s"))
    client.produce(topic_name, 0, [Record(b"a"), Record(b"b")])
    first, second = receive_exactly(client, topic_name, "s", 2)

    with pytest.raises(CorebusError) as e:
        client.release(topic_name, "s", [first.lock_token, second.lock_token],
                       delay_ms=MAX_RELEASE_DELAY_MS + 1)
    assert e.value.code == ErrorCode.InvalidArgument
    # Nothing was settled: both locks are still held, and exactly 1 h is allowed.
    (released,) = client.release(topic_name, "s", [first.lock_token],
                                 delay_ms=MAX_RELEASE_DELAY_MS)
    assert released.error is None
    assert [r.error for r in client.ack(topic_name, "s", [second.lock_token])] == [None]


def test_settle_outcomes_per_token(client: Client, topic_name: str) -> None:
    client.create_topic(topic_name, 2)
    client.create_subscription(Subscription(topic_name, "s"))
    client.produce(topic_name, 0, [Record(f"e{i}".encode()) for i in range(4)])
    events = receive_exactly(client, topic_name, "s", 4)
    # Upper-case hex is accepted; take a token whose nonce has a hex letter to upper-case
    # (a random 16-digit nonce without one is rare, four without one all but impossible).
    chosen = next((e for e in events if e.lock_token.upper() != e.lock_token), None)
    assert chosen is not None, [e.lock_token for e in events]
    _, _, nonce = chosen.lock_token.split("-")
    assert len(nonce) == 16 and int(nonce, 16) >= 0
    upper = chosen.lock_token.upper()
    never_issued = "1-0-0123456789abcdef"  # partition 1 is empty: no lock there
    other = next(e for e in events if e is not chosen)
    wrong_nonce = "fedcba9876543210" if other.lock_token.endswith("0123456789abcdef") \
        else "0123456789abcdef"
    forged = f"{other.partition}-{other.offset}-{wrong_nonce}"  # a locked event, not its token
    past_partitions = "2-0-0123456789abcdef"  # the topic has partitions 0 and 1
    tokens = [past_partitions, never_issued, forged, "not-a-token", upper]

    results = client.ack(topic_name, "s", tokens)
    assert [r.lock_token for r in results] == tokens  # one result per token, in order
    codes = [r.error.code if r.error is not None else None for r in results]
    assert codes == [ErrorCode.InvalidArgument, ErrorCode.LockLost, ErrorCode.LockLost,
                     ErrorCode.InvalidArgument, None]
    # The upper-case token settled the event: its lower-case form no longer names a lock.
    (again,) = client.ack(topic_name, "s", [chosen.lock_token])
    assert again.error is not None and again.error.code == ErrorCode.LockLost
    others = [e.lock_token for e in events if e is not chosen]
    assert [r.error for r in client.ack(topic_name, "s", others)] == [None] * 3
    (info,) = client.list_subscriptions(topic_name, with_stats=True)
    assert info.stats is not None and (info.stats.acked, info.stats.locked) == (4, 0)


# ---------------------------------------------------------------- consumer-group offsets


@pytest.mark.parametrize("group", ["", "a\nb", "tab\there", "del\x7f", "g" * 256],
                         ids=["empty", "newline", "tab", "del", "256-bytes"])
def test_bad_group_name_fails_the_whole_commit(
    client: Client, topic_name: str, group: str
) -> None:
    client.create_topic(topic_name, 2)
    with pytest.raises(CorebusError) as e:
        client.commit_offsets(group, topic_name, {0: 1, 1: 2})
    assert e.value.code == ErrorCode.InvalidArgument
    # FetchOffsets "fails as a whole like CommitOffsets".
    with pytest.raises(CorebusError) as e:
        client.fetch_offsets(group, topic_name)
    assert e.value.code == ErrorCode.InvalidArgument


def test_longest_group_name_is_accepted(client: Client, topic_name: str) -> None:
    client.create_topic(topic_name, 1)
    group = "g" * 255  # 1..=255 bytes
    assert client.commit_offsets(group, topic_name, {0: 3})[0].error is None
    assert client.fetch_offsets(group, topic_name)[0].offset == 3


def test_commit_offsets_per_partition_outcomes(client: Client, topic_name: str) -> None:
    client.create_topic(topic_name, 3)
    client.produce(topic_name, 1, [Record(b"x")])  # high watermark of partition 1: 1
    beyond = 1_000_000
    got = client.commit_offsets("g", topic_name, {0: -1, 1: beyond, 2: 7, 5: 4})
    assert sorted(got) == [0, 1, 2, 5]
    # A negative offset fails only its partition, reported with offset -1.
    assert got[0].error is not None and got[0].error.code == ErrorCode.InvalidArgument
    assert got[0].offset == -1
    # A partition the topic does not have, likewise.
    assert got[5].error is not None and got[5].error.code == ErrorCode.UnknownPartition
    assert got[5].offset == -1
    # Beyond the high watermark is accepted and stored as given; the others commit.
    assert (got[1].error, got[1].offset) == (None, beyond)
    assert (got[2].error, got[2].offset) == (None, 7)
    fetched = client.fetch_offsets("g", topic_name)
    assert {p: (o.offset, o.error) for p, o in fetched.items()} == {
        0: (-1, None), 1: (beyond, None), 2: (7, None)}


# ---------------------------------------------------------------- produce


def test_same_partition_twice_in_one_produce(
    client: Client, broker: Broker, topic_name: str
) -> None:
    client.create_topic(topic_name, 1)
    first = [Record(f"a{i}".encode()) for i in range(2)]
    second = [Record(f"b{i}".encode()) for i in range(3)]

    def build(b: flatbuffers.Builder) -> int:
        t = b.CreateString(topic_name)
        items = []
        for records in (first, second):
            vec = b.CreateByteVector(encode_batch(records))
            g.PartitionProduceStart(b)
            g.PartitionProduceAddPartition(b, 0)
            g.PartitionProduceAddBatches(b, vec)
            items.append(g.PartitionProduceEnd(b))
        g.ProduceRequestStartPartitionsVector(b, len(items))
        for item in reversed(items):
            b.PrependUOffsetTRelative(item)
        parts = b.EndVector()
        g.ProduceRequestStart(b)
        g.ProduceRequestAddTopic(b, t)
        g.ProduceRequestAddPartitions(b, parts)
        return g.ProduceRequestEnd(b)

    with Connection("127.0.0.1", broker.port) as conn:
        resp = conn.call(g.RequestBody.ProduceRequest, build, timeout=10)
    assert resp.BodyType() == g.ResponseBody.ProduceResponse
    body = resp.Body()
    r = g.ProduceResponse()
    r.Init(body.Bytes, body.Pos)
    results = [r.Partitions(i) for i in range(r.PartitionsLength())]
    assert len(results) == 2  # one result per entry
    ranges = []
    for p in results:
        assert p.Partition() == 0
        assert p.Error() is None or p.Error().Code() == ErrorCode.None_
        ranges.append((p.BaseOffset(), p.LastOffset()))
    # In no promised order, but each entry is one atomic unit: one range of 2, one of 3,
    # not overlapping, together 0..=4.
    by_size = {last - base + 1: (base, last) for base, last in ranges}
    assert sorted(by_size) == [2, 3]
    covered = sorted(o for base, last in ranges for o in range(base, last + 1))
    assert covered == [0, 1, 2, 3, 4]

    got = client.fetch(topic_name, 0, 0)
    assert got.high_watermark == 5
    values = {rec.offset: rec.value for rec in got.records}
    assert len(values) == 5
    for records, size in ((first, 2), (second, 3)):
        base, _ = by_size[size]
        assert [values[base + i] for i in range(size)] == [rec.value for rec in records]


# ---------------------------------------------------------------- frame limit

# A FlatBuffers buffer holding an 8-byte field (Request.correlation_id) is aligned to 8,
# length prefix included, so the N after a FinishSizePrefixed prefix is always 4 mod 8: the
# limit is chosen so that a well-formed request can be exactly that long.
SMALL_FRAME_LIMIT = 4100


@pytest.fixture(scope="module")
def small_frame_broker() -> Iterator[Broker]:
    yield from start_broker("--max-frame-bytes", str(SMALL_FRAME_LIMIT))


def produce_frame_of(n: int, cid: int, topic: str) -> bytes:
    """A valid one-record produce to partition 0 of ``topic`` whose frame is exactly ``n``
    bytes after its 4-byte prefix (the record value is sized to make it so)."""

    def frame(value_len: int) -> bytes:
        def build(b: flatbuffers.Builder) -> int:
            t = b.CreateString(topic)
            vec = b.CreateByteVector(encode_batch([Record(b"v" * value_len, timestamp_ms=1)]))
            g.PartitionProduceStart(b)
            g.PartitionProduceAddPartition(b, 0)
            g.PartitionProduceAddBatches(b, vec)
            item = g.PartitionProduceEnd(b)
            g.ProduceRequestStartPartitionsVector(b, 1)
            b.PrependUOffsetTRelative(item)
            parts = b.EndVector()
            g.ProduceRequestStart(b)
            g.ProduceRequestAddTopic(b, t)
            g.ProduceRequestAddPartitions(b, parts)
            return g.ProduceRequestEnd(b)

        return build_request(cid, g.RequestBody.ProduceRequest, build)

    for value_len in range(n):
        f = frame(value_len)
        if len(f) - 4 == n:
            assert struct.unpack_from("<I", f)[0] == n
            return f
        if len(f) - 4 > n:
            break
    raise AssertionError(f"no value length gives a produce frame of exactly {n} bytes")


def test_frame_of_exactly_the_limit_is_accepted(
    small_frame_broker: Broker, topic_name: str
) -> None:
    with Client("127.0.0.1", small_frame_broker.port, timeout=10.0) as c:
        c.create_topic(topic_name, 1)
    with socket.create_connection(("127.0.0.1", small_frame_broker.port), timeout=10) as s:
        s.sendall(produce_frame_of(SMALL_FRAME_LIMIT, 31, topic_name))
        frame = read_frame(s)
        assert frame is not None
        resp = parse_response(frame)
        assert resp.CorrelationId() == 31
        assert resp.Error() is None or resp.Error().Code() == ErrorCode.None_
        assert resp.BodyType() == g.ResponseBody.ProduceResponse
        body = resp.Body()
        r = g.ProduceResponse()
        r.Init(body.Bytes, body.Pos)
        assert r.PartitionsLength() == 1
        p = r.Partitions(0)
        assert p.Error() is None or p.Error().Code() == ErrorCode.None_
        assert (p.BaseOffset(), p.LastOffset()) == (0, 0)

        # One byte more is over the limit: TooLarge with id 0, then the connection closes.
        s.sendall(struct.pack("<I", SMALL_FRAME_LIMIT + 1))
        frame = read_frame(s)
        assert frame is not None
        resp = parse_response(frame)
        assert resp.CorrelationId() == 0
        assert resp.Error() is not None and resp.Error().Code() == ErrorCode.TooLarge
        assert read_frame(s) is None
    with Client("127.0.0.1", small_frame_broker.port, timeout=10.0) as c:
        assert c.fetch(topic_name, 0, 0).high_watermark == 1


# ---------------------------------------------------------------- dead letters


def test_dead_letter_headers_are_decimal_text(client: Client, topic_name: str) -> None:
    # test_client.py checks the headers of a rejected event (partition, offset and
    # deliverycount of one digit). Here they are two digits each, where a binary or hex
    # encoding would differ from decimal text: partition 11, offset 11, delivery count 10,
    # dead-lettered by max-deliveries.
    dead = topic_name + "-dlq"
    client.create_topic(topic_name, 12)
    client.create_topic(dead, 13)  # dead-letter partition = 11 mod 13 = 11
    client.create_subscription(Subscription(topic_name, "s", filter_types=["match"],
                                            max_deliveries=10, dead_letter_topic=dead))
    records = [Record(f"skip{i}".encode(), type="other") for i in range(11)]
    records.append(Record(b"the one", type="match", id="dl-1"))
    client.produce(topic_name, 11, records)

    for delivery in range(1, 11):
        (ev,) = receive_exactly(client, topic_name, "s", 1)
        assert (ev.partition, ev.offset, ev.delivery_count) == (11, 11, delivery)
        before = now_ms()
        assert client.release(topic_name, "s", [ev.lock_token])[0].error is None

    letters: list = []

    def dead_lettered() -> bool:
        letters.extend(client.fetch(dead, 11, 0, max_wait_ms=200).records)
        return bool(letters)

    wait_until("the dead letter", 10, dead_lettered)
    after = now_ms()
    (letter,) = letters
    assert letter.value == b"the one" and letter.id == "dl-1"
    assert letter.header("deadletterreason") == b"max-deliveries"
    assert letter.header("deliverycount") == b"10"
    assert letter.header("deadletterpartition") == b"11"
    assert letter.header("deadletteroffset") == b"11"
    when = letter.header("deadlettertime")
    assert when is not None and when.isascii() and when.isdigit()
    # Epoch milliseconds, from between the last release and its arrival (1 s of slack).
    assert before - 1000 <= int(when) <= after + 1000
