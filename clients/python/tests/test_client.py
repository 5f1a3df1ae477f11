"""The client against the real broker: topics, metadata and routing, produce and fetch,
errors, consumer-group offsets and subscriptions."""

from __future__ import annotations

import socket
import struct

import flatbuffers
import pytest

from corebus_client import (
    Client,
    Connection,
    ConnectionClosedError,
    CorebusError,
    ErrorCode,
    OffsetOutOfRangeError,
    Record,
    Subscription,
    build_request,
    encode_batch,
    parse_response,
    read_frame,
    ubyte_vector,
)
from corebus_client.client import _FETCH_RESPONSE_BATCHES
from corebus_client.generated import corebus_generated as g
from corebus_client.records import now_ms

from conftest import Broker, wait_until


def fnv1a_64(data: bytes) -> int:
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) % 2**64
    return h


def raw_fetch(port: int, topic: str, partition: int, offset: int) -> bytes:
    """The ``batches`` bytes of a fetch, straight from the generated code."""

    def build(b: flatbuffers.Builder) -> int:
        t = b.CreateString(topic)
        g.FetchRequestStart(b)
        g.FetchRequestAddTopic(b, t)
        g.FetchRequestAddPartition(b, partition)
        g.FetchRequestAddOffset(b, offset)
        g.FetchRequestAddMaxBytes(b, 1 << 20)
        return g.FetchRequestEnd(b)

    with Connection("127.0.0.1", port) as conn:
        resp = conn.call(g.RequestBody.FetchRequest, build, timeout=10)
    body = resp.Body()
    f = g.FetchResponse()
    f.Init(body.Bytes, body.Pos)
    assert f.Error() is None
    return ubyte_vector(f._tab, _FETCH_RESPONSE_BATCHES)


def event(i: int, **kw: object) -> Record:
    fields = dict(value=f"value-{i}".encode(), key=f"key-{i}".encode(),
                  headers=[("traceparent", f"00-{i:032x}-01".encode()), ("n", str(i).encode())],
                  id=f"id-{i}", source="/tests/python", type="com.example.created",
                  subject=f"orders/{i}", timestamp_ms=1_700_000_000_000 + i)
    fields.update(kw)
    return Record(**fields)  # type: ignore[arg-type]


# ---------------------------------------------------------------- topics and metadata


def test_topic_administration(client: Client, topic_name: str) -> None:
    info = client.create_topic(topic_name, 3, retention_ms=3_600_000)
    assert (info.name, info.partitions) == (topic_name, 3)
    listed = {t.name: t for t in client.list_topics()}
    assert listed[topic_name].partitions == 3
    assert listed[topic_name].retention_ms == 3_600_000
    assert listed[topic_name].retention_bytes == -1

    with pytest.raises(CorebusError) as e:
        client.create_topic(topic_name, 3)
    assert e.value.code == ErrorCode.TopicAlreadyExists and e.value.name == "TopicAlreadyExists"
    with pytest.raises(CorebusError) as e:
        client.create_topic("bad/name", 1)
    assert e.value.code == ErrorCode.InvalidArgument

    client.delete_topic(topic_name)
    assert topic_name not in {t.name for t in client.list_topics()}
    with pytest.raises(CorebusError) as e:
        client.delete_topic(topic_name)
    assert e.value.code == ErrorCode.UnknownTopic


def test_metadata_gives_owners_by_the_documented_function(
    client: Client, broker: Broker, topic_name: str
) -> None:
    assert fnv1a_64(b"a") == 0xAF63DC4C8601EC8C  # the test vector of section 4
    client.create_topic(topic_name, 5)
    md = client.metadata([topic_name, "no-such-topic"])
    assert md.shards == {i: broker.shard_port(i) for i in range(broker.shards)}
    t, missing = md.topics
    assert t.error is None and [p.partition for p in t.partitions] == list(range(5))
    for p in t.partitions:
        assert p.shard == (fnv1a_64(topic_name.encode()) + p.partition) % 2**64 % broker.shards
        assert p.port == md.shards[p.shard]
    assert missing.name == "no-such-topic" and missing.partitions == []
    assert missing.error is not None and missing.error.code == ErrorCode.UnknownTopic
    assert topic_name in {t.name for t in client.metadata().topics}


# ---------------------------------------------------------------- produce and fetch


def test_produce_fetch_round_trip_across_partitions(
    client: Client, broker: Broker, topic_name: str
) -> None:
    client.create_topic(topic_name, 4)
    sent = {p: [event(10 * p + i) for i in range(3 + p)] for p in range(4)}
    sent[2].append(Record(b"", timestamp_ms=1))  # no key, no attributes, no headers
    results = client.produce_many(topic_name, sent)
    assert sorted(results) == [0, 1, 2, 3]
    for p, r in results.items():
        assert r.error is None
        assert (r.base_offset, r.last_offset) == (0, len(sent[p]) - 1)
    # Shard-aware: produce went to the owners' own ports.
    assert set(client._shard_conns) == {broker.shard_port(i) for i in range(broker.shards)}

    # A second produce continues the offsets; a plain (public-port) client reads it back.
    more = client.produce(topic_name, 1, [event(99)])
    assert (more.base_offset, more.last_offset) == (4, 4)
    sent[1].append(event(99))
    with Client("127.0.0.1", broker.port, shard_aware=False) as plain:
        for p in range(4):
            got = plain.fetch(topic_name, p, 0)
            assert got.high_watermark == len(sent[p]) and got.log_start_offset == 0
            assert got.next_offset == len(sent[p])
            assert [r.offset for r in got.records] == list(range(len(sent[p])))
            for rec in got.records:
                rec.offset = None
            assert got.records == sent[p]
        # From the middle: records below the offset are skipped.
        got = plain.fetch(topic_name, 3, 4)
        assert [r.value for r in got.records] == [b"value-34", b"value-35"]
        assert plain._shard_conns == {}

    # Byte for byte: the stored batch is the produced one with only bytes [0, 24) stamped.
    batch = encode_batch([event(7), event(8)])
    r = client.produce(topic_name, 0, batch)
    stored = raw_fetch(broker.port, topic_name, 0, r.base_offset)
    assert stored[24:] == batch[24:]
    assert struct.unpack_from("<QII", stored) == (r.base_offset, len(batch), 0)
    assert abs(struct.unpack_from("<q", stored, 16)[0] - now_ms()) < 60_000


def test_pipelined_produces_are_matched_by_id(client: Client, topic_name: str) -> None:
    client.create_topic(topic_name, 2)
    futures = [client.produce_async(topic_name, i % 2, [event(i)]) for i in range(60)]
    results = [f.result(10) for f in futures]
    offsets = {0: set(), 1: set()}  # type: dict[int, set[int]]
    for i, r in enumerate(results):
        assert r.partition == i % 2 and r.base_offset == r.last_offset
        offsets[i % 2].add(r.base_offset)
    assert offsets == {0: set(range(30)), 1: set(range(30))}
    # Each reply went to its own request: the record at each returned offset is its record.
    by_offset = {p: {r.offset: r for r in client.fetch(topic_name, p, 0).records} for p in (0, 1)}
    for i, r in enumerate(results):
        assert by_offset[i % 2][r.base_offset].value == f"value-{i}".encode()


def test_replies_come_back_out_of_order(client: Client, topic_name: str) -> None:
    client.create_topic(topic_name, 1)
    # A long-polling fetch at the end of the log, then a produce on the same connection: the
    # produce's reply overtakes the fetch's, which then returns the new record.
    waiting = client.fetch_async(topic_name, 0, 0, max_wait_ms=5_000)
    produced = client.produce_async(topic_name, 0, [event(1)])
    assert produced.result(10).base_offset == 0
    got = waiting.result(10)
    assert [r.value for r in got.records] == [b"value-1"]


# ---------------------------------------------------------------- errors


def test_fetch_unknown_topic_and_partition(client: Client, topic_name: str) -> None:
    with pytest.raises(CorebusError) as e:
        client.fetch("no-such-topic-anywhere", 0, 0)
    assert e.value.code == ErrorCode.UnknownTopic
    client.create_topic(topic_name, 1)
    with pytest.raises(CorebusError) as e:
        client.fetch(topic_name, 5, 0)
    assert e.value.code == ErrorCode.UnknownPartition


def test_offset_out_of_range_carries_bounds(client: Client, topic_name: str) -> None:
    client.create_topic(topic_name, 1)
    client.produce(topic_name, 0, [event(1), event(2)])
    with pytest.raises(OffsetOutOfRangeError) as e:
        client.fetch(topic_name, 0, 3)
    assert e.value.code == ErrorCode.OffsetOutOfRange
    assert (e.value.log_start_offset, e.value.high_watermark) == (0, 2)
    # At the high watermark it is not an error: an empty reply after the wait.
    got = client.fetch(topic_name, 0, 2, max_wait_ms=50)
    assert got.records == [] and got.next_offset == 2


def test_corrupt_batch_is_refused_and_nothing_appended(client: Client, topic_name: str) -> None:
    client.create_topic(topic_name, 2)
    bad = bytearray(encode_batch([event(1)]))
    bad[25] ^= 0xFF  # a CRC byte
    with pytest.raises(CorebusError) as e:
        client.produce(topic_name, 0, bytes(bad))
    assert e.value.code == ErrorCode.CorruptBatch
    # Per partition: a good batch next to the bad one in the same request is appended, a
    # partition the topic lacks is refused on its own.
    results = client.produce_many(topic_name, {0: bytes(bad), 1: [event(2)], 7: [event(3)]})
    assert results[0].error is not None and results[0].error.code == ErrorCode.CorruptBatch
    assert results[1].error is None and results[1].base_offset == 0
    assert results[7].error is not None and results[7].error.code == ErrorCode.UnknownPartition
    assert client.fetch(topic_name, 0, 0).high_watermark == 0


def test_too_large_frame_fails_everything_in_flight(
    client: Client, broker: Broker, topic_name: str
) -> None:
    client.create_topic(topic_name, 1)
    conn = Connection("127.0.0.1", broker.port)
    try:
        # Something in flight: a long-polling fetch.
        cid = conn.next_id()

        def build(b: flatbuffers.Builder) -> int:
            t = b.CreateString(topic_name)
            g.FetchRequestStart(b)
            g.FetchRequestAddTopic(b, t)
            g.FetchRequestAddMaxWaitMs(b, 10_000)
            return g.FetchRequestEnd(b)

        waiting = conn.submit(cid, build_request(cid, g.RequestBody.FetchRequest, build))
        # A length prefix over --max-frame-bytes (16 MiB): reply id 0 TooLarge, then closed.
        too_large = conn.submit(conn.next_id(), struct.pack("<I", 16 * 1024 * 1024 + 1))
        for fut in (waiting, too_large):
            with pytest.raises(CorebusError) as e:
                fut.result(10)
            assert e.value.code == ErrorCode.TooLarge
        assert conn.closed
        with pytest.raises(ConnectionClosedError):
            conn.request(g.RequestBody.StatsRequest, None).result(10)
    finally:
        conn.close()


def test_client_reconnects_after_a_connection_level_error(client: Client, topic_name: str) -> None:
    conn = client._public
    fut = conn.submit(conn.next_id(), struct.pack("<I", 16 * 1024 * 1024 + 1))
    with pytest.raises(CorebusError) as e:
        fut.result(10)
    assert e.value.code == ErrorCode.TooLarge and conn.closed
    assert client.create_topic(topic_name, 1).partitions == 1  # on a fresh connection
    assert client._public is not conn


def test_too_large_frame_on_the_wire(broker: Broker) -> None:
    with socket.create_connection(("127.0.0.1", broker.port), timeout=10) as s:
        s.sendall(struct.pack("<I", 16 * 1024 * 1024 + 1))
        frame = read_frame(s)
        assert frame is not None
        resp = parse_response(frame)
        assert resp.CorrelationId() == 0
        assert resp.Error().Code() == ErrorCode.TooLarge
        assert read_frame(s) is None  # the broker closed the connection


# ---------------------------------------------------------------- consumer groups


def test_consumer_group_offsets(client: Client, topic_name: str) -> None:
    client.create_topic(topic_name, 3)
    assert {p: o.offset for p, o in client.fetch_offsets("g1", topic_name).items()} == {
        0: -1, 1: -1, 2: -1}
    committed = client.commit_offsets("g1", topic_name, {0: 5, 1: 7})
    assert {p: (o.offset, o.error) for p, o in committed.items()} == {0: (5, None), 1: (7, None)}
    got = client.fetch_offsets("g1", topic_name)
    assert {p: o.offset for p, o in got.items()} == {0: 5, 1: 7, 2: -1}
    assert {p: o.offset for p, o in client.fetch_offsets("g1", topic_name, [1]).items()} == {1: 7}
    assert client.fetch_offsets("other-group", topic_name)[0].offset == -1
    # Per partition: a negative offset and a missing partition fail alone.
    mixed = client.commit_offsets("g1", topic_name, {0: -5, 2: 1, 9: 1})
    assert mixed[0].error is not None and mixed[0].error.code == ErrorCode.InvalidArgument
    assert mixed[2].error is None and mixed[2].offset == 1
    assert mixed[9].error is not None and mixed[9].error.code == ErrorCode.UnknownPartition
    assert client.fetch_offsets("g1", topic_name)[0].offset == 5
    with pytest.raises(CorebusError) as e:
        client.fetch_offsets("g1", "no-such-topic-anywhere")
    assert e.value.code == ErrorCode.UnknownTopic


# ---------------------------------------------------------------- subscriptions


def receive_n(client: Client, topic: str, sub: str, n: int) -> list:
    """Receives until ``n`` events came (deadline 10 s)."""
    events: list = []

    def more() -> bool:
        events.extend(client.receive(topic, sub, max_events=10, max_wait_ms=500))
        return len(events) >= n

    wait_until(f"{n} events", 10, more)
    return events


def test_subscription_filter_ack_release_reject(client: Client, topic_name: str) -> None:
    dead = topic_name + "-dlq"
    client.create_topic(topic_name, 3)
    client.create_topic(dead, 2)
    stored = client.create_subscription(Subscription(
        topic_name, "orders", filter_types=["com.example.created"], dead_letter_topic=dead))
    assert stored.lock_duration_ms == 30_000 and stored.max_deliveries == 10
    assert stored.filter_types == ["com.example.created"] and stored.dead_letter_topic == dead
    with pytest.raises(CorebusError) as e:
        client.create_subscription(Subscription(topic_name, "orders"))
    assert e.value.code == ErrorCode.SubscriptionAlreadyExists

    matching = {p: event(p) for p in range(3)}
    for p in range(3):
        client.produce(topic_name, p, [event(100 + p, type="com.example.deleted"), matching[p]])

    events = receive_n(client, topic_name, "orders", 3)
    assert len(events) == 3
    assert sorted(e.partition for e in events) == [0, 1, 2]
    for e in events:
        assert e.delivery_count == 1 and e.offset == 1 and e.record.offset == 1
        assert e.locked_until_ms > now_ms()
        expected = matching[e.partition]
        expected.offset = 1
        assert e.record == expected
    # The non-matching events are never delivered.
    assert client.receive(topic_name, "orders", max_events=10, max_wait_ms=300) == []

    acked, released, rejected = sorted(events, key=lambda e: e.partition)
    assert [r.error for r in client.ack(topic_name, "orders", [acked.lock_token])] == [None]
    (again,) = client.ack(topic_name, "orders", [acked.lock_token])
    assert again.error is not None and again.error.code == ErrorCode.LockLost

    assert client.release(topic_name, "orders", [released.lock_token])[0].error is None
    (redelivered,) = receive_n(client, topic_name, "orders", 1)
    assert (redelivered.partition, redelivered.offset) == (released.partition, released.offset)
    assert redelivered.delivery_count == 2
    assert redelivered.lock_token != released.lock_token
    (renewed,) = client.renew(topic_name, "orders", [redelivered.lock_token])
    assert renewed.error is None and renewed.locked_until_ms >= redelivered.locked_until_ms

    before = now_ms()
    assert client.reject(topic_name, "orders", [rejected.lock_token])[0].error is None
    after = now_ms()
    dlq_partition = rejected.partition % 2
    letters = client.fetch(dead, dlq_partition, 0).records
    assert len(letters) == 1
    letter = letters[0]
    assert letter.value == rejected.record.value and letter.id == rejected.record.id
    assert letter.type == "com.example.created" and letter.key == rejected.record.key
    assert letter.header("deliverycount") == b"1"
    assert letter.header("deadletterpartition") == str(rejected.partition).encode()
    assert letter.header("deadletteroffset") == str(rejected.offset).encode()
    assert letter.header("deadletterreason") == b"rejected"
    assert letter.header("deadlettersubscription") == b"orders"
    assert letter.header("deadlettertopic") == topic_name.encode()
    when = letter.header("deadlettertime")
    assert when is not None and when.isdigit() and before - 1000 <= int(when) <= after + 1000

    assert client.ack(topic_name, "orders", [redelivered.lock_token])[0].error is None
    (info,) = client.list_subscriptions(topic_name, with_stats=True)
    assert info.subscription.name == "orders" and info.stats is not None
    assert (info.stats.acked, info.stats.dead_lettered, info.stats.locked) == (2, 1, 0)
    assert client.list_subscriptions(topic_name)[0].stats is None

    client.delete_subscription(topic_name, "orders")
    assert client.list_subscriptions(topic_name) == []
    with pytest.raises(CorebusError) as e:
        client.delete_subscription(topic_name, "orders")
    assert e.value.code == ErrorCode.UnknownSubscription
