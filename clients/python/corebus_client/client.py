"""The client API: one method per request kind (docs/protocol.md section 6,
docs/subscriptions.md), with shard-aware routing of produce and fetch (section 4)."""

from __future__ import annotations

import threading
from concurrent.futures import Future
from typing import Callable, Iterable, Mapping, Optional, Sequence, TypeVar, Union

import flatbuffers

from . import errors
from .connection import BodyBuilder, Connection, error_from, response_error
from .generated import corebus_generated as g
from .models import (
    AttributeFilter,
    FetchResult,
    Metadata,
    PartitionMetadata,
    PartitionOffset,
    PartitionStats,
    ProduceResult,
    ReceivedEvent,
    SettleAction,
    SettleResult,
    ShardStats,
    StartPosition,
    Stats,
    Subscription,
    SubscriptionInfo,
    SubscriptionStats,
    TopicInfo,
    TopicMetadata,
)
from .records import BatchFormatError, Record, decode_record, encode_batch, iter_batches

T = TypeVar("T")
#: Records to produce to one partition, or bytes of ready record batches (sent as they are).
Batches = Union[Sequence[Record], bytes]

# vtable offsets of `[ubyte]` fields (4 + 2 * field index in the schema). The generated Python
# accessors return such vectors one byte per call (or as numpy arrays); these let us slice.
_FETCH_RESPONSE_BATCHES = 12  # FetchResponse.batches, field 4
_RECEIVED_EVENT_RECORD = 14  # ReceivedEvent.record, field 5


def ubyte_vector(table: flatbuffers.table.Table, voffset: int) -> bytes:
    """The bytes of the ``[ubyte]`` field at vtable offset ``voffset`` (empty when absent)."""
    o = table.Offset(voffset)
    if o == 0:
        return b""
    start = table.Vector(o)
    return bytes(table.Bytes[start : start + table.VectorLen(o)])


def _text(raw: Optional[bytes]) -> str:
    return raw.decode("utf-8") if raw else ""


def _opt_text(raw: Optional[bytes]) -> Optional[str]:
    return raw.decode("utf-8") if raw else None


def _body(resp: g.Response, body_type: int, cls: type[T]) -> T:
    if resp.BodyType() != body_type:
        raise errors.ProtocolError(f"reply body type {resp.BodyType()}, expected {body_type}")
    table = resp.Body()
    obj = cls()
    obj.Init(table.Bytes, table.Pos)  # type: ignore[attr-defined]
    return obj


def _vector(b: flatbuffers.Builder, start: Callable[..., int], offsets: Sequence[int]) -> int:
    """A vector of tables or strings already written to ``b``."""
    start(b, len(offsets))
    for off in reversed(offsets):
        b.PrependUOffsetTRelative(off)
    return b.EndVector()


def _strings(b: flatbuffers.Builder, start: Callable[..., int], items: Iterable[str]) -> int:
    return _vector(b, start, [b.CreateString(s) for s in items])


def _then(fut: Future[g.Response], parse: Callable[[g.Response], T]) -> Future[T]:
    """A future of ``parse(reply)``, failing with the reply's whole-request error if any."""
    out: Future[T] = Future()

    def done(f: Future[g.Response]) -> None:
        try:
            resp = f.result()
            err = response_error(resp)
            if err is not None:
                raise err
            out.set_result(parse(resp))
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            out.set_exception(e)

    fut.add_done_callback(done)
    return out


class Client:
    """A corebus client.

    Connects to ``host:port`` (the broker's public port). With ``shard_aware`` (the default),
    produce and fetch go straight to the port of the shard that owns the partition, as the
    metadata reply says (one extra connection per shard, opened on first use); everything else
    uses the public port. ``timeout`` bounds each blocking call (plus any ``max_wait_ms``).

    Methods block; ``produce_async`` and ``fetch_async`` return futures, so that many requests
    can be in flight on a connection at once. The client is thread-safe.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 7070,
        *,
        shard_aware: bool = True,
        timeout: float = 30.0,
        connect_timeout: float = 10.0,
    ) -> None:
        self.host = host
        self.timeout = timeout
        self._connect_timeout = connect_timeout
        self._shard_aware = shard_aware
        self._port = port
        self._public = Connection(host, port, connect_timeout)
        self._lock = threading.Lock()
        self._shard_conns: dict[int, Connection] = {}  # port -> connection
        self._owners: dict[str, dict[int, int]] = {}  # topic -> partition -> port

    def close(self) -> None:
        """Closes every connection."""
        with self._lock:
            conns = [self._public, *self._shard_conns.values()]
            self._shard_conns.clear()
        for conn in conns:
            conn.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ plumbing

    def _call(
        self,
        body_type: int,
        build: BodyBuilder,
        parse: Callable[[g.Response], T],
        conn: Optional[Connection] = None,
        wait_ms: int = 0,
    ) -> T:
        fut = _then((conn or self._public_conn()).request(body_type, build), parse)
        return fut.result(self.timeout + wait_ms / 1000)

    def _public_conn(self) -> Connection:
        """The public-port connection, opened again if it was closed (e.g. after a
        connection-level error, which fails and closes a connection)."""
        with self._lock:
            if self._public.closed:
                self._public = Connection(self.host, self._port, self._connect_timeout)
            return self._public

    def _route(self, topic: str, partition: int) -> Connection:
        """The connection to the owner of ``topic``/``partition``, or the public one."""
        if not self._shard_aware:
            return self._public_conn()
        with self._lock:
            owners = self._owners.get(topic)
        if owners is None:
            md = self.metadata([topic])
            if not md.topics or md.topics[0].error is not None:
                return self._public_conn()  # the broker will report the unknown topic
            owners = {p.partition: p.port for p in md.topics[0].partitions}
            with self._lock:
                self._owners[topic] = owners
        port = owners.get(partition)
        if port is None:
            return self._public_conn()  # the broker will report the unknown partition
        with self._lock:
            conn = self._shard_conns.get(port)
            if conn is None or conn.closed:
                conn = Connection(self.host, port, self._connect_timeout)
                self._shard_conns[port] = conn
            return conn

    def _forget(self, topic: str, err: Optional[BaseException]) -> None:
        """Drops cached ownership after an error that says it may be stale."""
        if isinstance(err, errors.CorebusError) and err.code in (
            g.ErrorCode.UnknownTopic,
            g.ErrorCode.UnknownPartition,
        ):
            with self._lock:
                self._owners.pop(topic, None)

    # ------------------------------------------------------------------ topics

    def create_topic(
        self, name: str, partitions: int, retention_ms: int = -1, retention_bytes: int = -1
    ) -> TopicInfo:
        """Creates a topic; raises ``TopicAlreadyExists`` or ``InvalidArgument``."""

        def build(b: flatbuffers.Builder) -> int:
            n = b.CreateString(name)
            g.CreateTopicRequestStart(b)
            g.CreateTopicRequestAddName(b, n)
            g.CreateTopicRequestAddPartitions(b, partitions)
            g.CreateTopicRequestAddRetentionMs(b, retention_ms)
            g.CreateTopicRequestAddRetentionBytes(b, retention_bytes)
            return g.CreateTopicRequestEnd(b)

        def parse(resp: g.Response) -> TopicInfo:
            r = _body(resp, g.ResponseBody.CreateTopicResponse, g.CreateTopicResponse)
            return TopicInfo(_text(r.Name()), r.Partitions(), retention_ms, retention_bytes)

        with self._lock:
            self._owners.pop(name, None)
        return self._call(g.RequestBody.CreateTopicRequest, build, parse)

    def delete_topic(self, name: str) -> None:
        """Deletes a topic with its data and subscriptions; raises ``UnknownTopic``."""

        def build(b: flatbuffers.Builder) -> int:
            n = b.CreateString(name)
            g.DeleteTopicRequestStart(b)
            g.DeleteTopicRequestAddName(b, n)
            return g.DeleteTopicRequestEnd(b)

        with self._lock:
            self._owners.pop(name, None)
        self._call(g.RequestBody.DeleteTopicRequest, build,
                   lambda r: _body(r, g.ResponseBody.DeleteTopicResponse, g.DeleteTopicResponse))

    def list_topics(self) -> list[TopicInfo]:
        """Every topic, sorted by name."""

        def build(b: flatbuffers.Builder) -> int:
            g.ListTopicsRequestStart(b)
            return g.ListTopicsRequestEnd(b)

        def parse(resp: g.Response) -> list[TopicInfo]:
            r = _body(resp, g.ResponseBody.ListTopicsResponse, g.ListTopicsResponse)
            out = []
            for i in range(r.TopicsLength()):
                t = r.Topics(i)
                out.append(TopicInfo(_text(t.Name()), t.Partitions(), t.RetentionMs(),
                                     t.RetentionBytes()))
            return out

        return self._call(g.RequestBody.ListTopicsRequest, build, parse)

    def metadata(self, topics: Optional[Sequence[str]] = None) -> Metadata:
        """Shards and partition owners of ``topics`` (all topics when empty). A missing topic
        comes back with ``error`` set (UnknownTopic); the call itself succeeds."""

        def build(b: flatbuffers.Builder) -> int:
            names = _strings(b, g.MetadataRequestStartTopicsVector, topics) if topics else None
            g.MetadataRequestStart(b)
            if names is not None:
                g.MetadataRequestAddTopics(b, names)
            return g.MetadataRequestEnd(b)

        def parse(resp: g.Response) -> Metadata:
            r = _body(resp, g.ResponseBody.MetadataResponse, g.MetadataResponse)
            shards = {}
            for i in range(r.ShardsLength()):
                s = r.Shards(i)
                shards[s.Shard()] = s.Port()
            out = []
            for i in range(r.TopicsLength()):
                t = r.Topics(i)
                parts = []
                for j in range(t.PartitionsLength()):
                    p = t.Partitions(j)
                    parts.append(PartitionMetadata(p.Partition(), p.Shard(), p.Port()))
                out.append(TopicMetadata(_text(t.Name()), parts, error_from(t.Error())))
            return Metadata(shards, out)

        return self._call(g.RequestBody.MetadataRequest, build, parse)

    # ------------------------------------------------------------------ produce

    @staticmethod
    def _build_produce(topic: str, parts: Mapping[int, Batches]) -> BodyBuilder:
        def build(b: flatbuffers.Builder) -> int:
            t = b.CreateString(topic)
            items = []
            for partition, batches in parts.items():
                data = batches if isinstance(batches, (bytes, bytearray)) else encode_batch(batches)
                vec = b.CreateByteVector(bytes(data))
                g.PartitionProduceStart(b)
                g.PartitionProduceAddPartition(b, partition)
                g.PartitionProduceAddBatches(b, vec)
                items.append(g.PartitionProduceEnd(b))
            vec = _vector(b, g.ProduceRequestStartPartitionsVector, items)
            g.ProduceRequestStart(b)
            g.ProduceRequestAddTopic(b, t)
            g.ProduceRequestAddPartitions(b, vec)
            return g.ProduceRequestEnd(b)

        return build

    @staticmethod
    def _parse_produce(resp: g.Response) -> dict[int, ProduceResult]:
        r = _body(resp, g.ResponseBody.ProduceResponse, g.ProduceResponse)
        out = {}
        for i in range(r.PartitionsLength()):
            p = r.Partitions(i)
            out[p.Partition()] = ProduceResult(p.Partition(), p.BaseOffset(), p.LastOffset(),
                                               error_from(p.Error()))
        return out

    def produce_async(
        self, topic: str, partition: int, records: Batches
    ) -> Future[ProduceResult]:
        """Sends ``records`` (or ready batch bytes) to one partition; the future fails with
        the partition's error (e.g. ``CorruptBatch``) if it was not appended."""
        parse_all = self._parse_produce

        def parse(resp: g.Response) -> ProduceResult:
            result = parse_all(resp).get(partition)
            if result is None:
                raise errors.ProtocolError(f"produce reply lacks partition {partition}")
            if result.error is not None:
                self._forget(topic, result.error)
                raise result.error
            return result

        conn = self._route(topic, partition)
        fut = conn.request(g.RequestBody.ProduceRequest,
                           self._build_produce(topic, {partition: records}))
        return _then(fut, parse)

    def produce(self, topic: str, partition: int, records: Batches) -> ProduceResult:
        """Appends ``records`` to one partition atomically and returns their offsets
        (``base_offset`` .. ``last_offset``); raises :class:`CorebusError` on failure."""
        return self.produce_async(topic, partition, records).result(self.timeout)

    def produce_many(
        self, topic: str, partitions: Mapping[int, Batches]
    ) -> dict[int, ProduceResult]:
        """Produces to several partitions at once (one request per owning shard, in
        parallel). Partitions succeed or fail independently: check each result's ``error``."""
        groups: dict[int, tuple[Connection, dict[int, Batches]]] = {}
        for partition, records in partitions.items():
            conn = self._route(topic, partition)
            groups.setdefault(id(conn), (conn, {}))[1][partition] = records
        futs = [
            _then(conn.request(g.RequestBody.ProduceRequest, self._build_produce(topic, part)),
                  self._parse_produce)
            for conn, part in groups.values()
        ]
        out: dict[int, ProduceResult] = {}
        for fut in futs:
            out.update(fut.result(self.timeout))
        for result in out.values():
            self._forget(topic, result.error)
        return out

    # ------------------------------------------------------------------ fetch

    def fetch_async(
        self,
        topic: str,
        partition: int,
        offset: int,
        *,
        max_bytes: int = 1 << 20,
        max_wait_ms: int = 0,
        verify_crc: bool = True,
    ) -> Future[FetchResult]:
        """Future of :meth:`fetch`."""

        def build(b: flatbuffers.Builder) -> int:
            t = b.CreateString(topic)
            g.FetchRequestStart(b)
            g.FetchRequestAddTopic(b, t)
            g.FetchRequestAddPartition(b, partition)
            g.FetchRequestAddOffset(b, offset)
            g.FetchRequestAddMaxBytes(b, max_bytes)
            g.FetchRequestAddMaxWaitMs(b, max_wait_ms)
            return g.FetchRequestEnd(b)

        def parse(resp: g.Response) -> FetchResult:
            f = _body(resp, g.ResponseBody.FetchResponse, g.FetchResponse)
            err = error_from(f.Error())
            if err is not None:
                if err.code == g.ErrorCode.OffsetOutOfRange:
                    raise errors.OffsetOutOfRangeError(err.message, f.LogStartOffset(),
                                                       f.HighWatermark())
                raise err
            records: list[Record] = []
            next_offset = offset
            try:
                for batch in iter_batches(ubyte_vector(f._tab, _FETCH_RESPONSE_BATCHES),
                                          verify_crc):
                    # The first batch is the one holding `offset`: skip records below it.
                    records += [r for r in batch.records if (r.offset or 0) >= offset]
                    next_offset = max(next_offset, batch.base_offset + len(batch.records))
            except BatchFormatError as e:
                raise errors.ProtocolError(f"fetched batches of {topic}/{partition}: {e}") from e
            return FetchResult(_text(f.Topic()), f.Partition(), f.HighWatermark(),
                               f.LogStartOffset(), records, next_offset)

        conn = self._route(topic, partition)
        out = _then(conn.request(g.RequestBody.FetchRequest, build), parse)
        out.add_done_callback(lambda f: self._forget(topic, f.exception()))
        return out

    def fetch(
        self,
        topic: str,
        partition: int,
        offset: int,
        *,
        max_bytes: int = 1 << 20,
        max_wait_ms: int = 0,
        verify_crc: bool = True,
    ) -> FetchResult:
        """Records of one partition from ``offset`` on (about ``max_bytes``, at least one
        batch when any is there). At the end of the log it waits up to ``max_wait_ms`` for new
        data. Raises :class:`OffsetOutOfRangeError` (with the valid bounds) or
        :class:`CorebusError`; batches whose CRC does not match raise :class:`ProtocolError`."""
        fut = self.fetch_async(topic, partition, offset, max_bytes=max_bytes,
                               max_wait_ms=max_wait_ms, verify_crc=verify_crc)
        return fut.result(self.timeout + max_wait_ms / 1000)

    # ------------------------------------------------------------------ consumer groups

    @staticmethod
    def _parse_offsets(
        vec_len: int, item: Callable[[int], g.PartitionOffset]
    ) -> dict[int, PartitionOffset]:
        out = {}
        for i in range(vec_len):
            p = item(i)
            out[p.Partition()] = PartitionOffset(p.Partition(), p.Offset(), error_from(p.Error()))
        return out

    def commit_offsets(
        self, group: str, topic: str, offsets: Mapping[int, int]
    ) -> dict[int, PartitionOffset]:
        """Commits, per partition, the next offset ``group`` will read. Durable when it
        returns; check each result's ``error``."""

        def build(b: flatbuffers.Builder) -> int:
            gr, t = b.CreateString(group), b.CreateString(topic)
            items = []
            for partition, offset in offsets.items():
                g.PartitionOffsetStart(b)
                g.PartitionOffsetAddPartition(b, partition)
                g.PartitionOffsetAddOffset(b, offset)
                items.append(g.PartitionOffsetEnd(b))
            vec = _vector(b, g.CommitOffsetsRequestStartOffsetsVector, items)
            g.CommitOffsetsRequestStart(b)
            g.CommitOffsetsRequestAddGroup(b, gr)
            g.CommitOffsetsRequestAddTopic(b, t)
            g.CommitOffsetsRequestAddOffsets(b, vec)
            return g.CommitOffsetsRequestEnd(b)

        def parse(resp: g.Response) -> dict[int, PartitionOffset]:
            r = _body(resp, g.ResponseBody.CommitOffsetsResponse, g.CommitOffsetsResponse)
            return self._parse_offsets(r.OffsetsLength(), r.Offsets)

        return self._call(g.RequestBody.CommitOffsetsRequest, build, parse)

    def fetch_offsets(
        self, group: str, topic: str, partitions: Optional[Sequence[int]] = None
    ) -> dict[int, PartitionOffset]:
        """``group``'s committed offsets (-1: none) for ``partitions`` (default: all)."""

        def build(b: flatbuffers.Builder) -> int:
            gr, t = b.CreateString(group), b.CreateString(topic)
            vec = None
            if partitions:
                g.FetchOffsetsRequestStartPartitionsVector(b, len(partitions))
                for p in reversed(partitions):
                    b.PrependUint32(p)
                vec = b.EndVector()
            g.FetchOffsetsRequestStart(b)
            g.FetchOffsetsRequestAddGroup(b, gr)
            g.FetchOffsetsRequestAddTopic(b, t)
            if vec is not None:
                g.FetchOffsetsRequestAddPartitions(b, vec)
            return g.FetchOffsetsRequestEnd(b)

        def parse(resp: g.Response) -> dict[int, PartitionOffset]:
            r = _body(resp, g.ResponseBody.FetchOffsetsResponse, g.FetchOffsetsResponse)
            return self._parse_offsets(r.OffsetsLength(), r.Offsets)

        return self._call(g.RequestBody.FetchOffsetsRequest, build, parse)

    # ------------------------------------------------------------------ subscriptions

    def create_subscription(self, subscription: Subscription) -> Subscription:
        """Creates a subscription; returns it as stored, defaults filled in."""

        def build(b: flatbuffers.Builder) -> int:
            s = _build_subscription(b, subscription)
            g.CreateSubscriptionRequestStart(b)
            g.CreateSubscriptionRequestAddSubscription(b, s)
            return g.CreateSubscriptionRequestEnd(b)

        def parse(resp: g.Response) -> Subscription:
            r = _body(resp, g.ResponseBody.CreateSubscriptionResponse,
                      g.CreateSubscriptionResponse)
            return _subscription_from(r.Subscription())

        return self._call(g.RequestBody.CreateSubscriptionRequest, build, parse)

    def delete_subscription(self, topic: str, name: str) -> None:
        """Deletes a subscription and its delivery state; raises ``UnknownSubscription``."""

        def build(b: flatbuffers.Builder) -> int:
            t, n = b.CreateString(topic), b.CreateString(name)
            g.DeleteSubscriptionRequestStart(b)
            g.DeleteSubscriptionRequestAddTopic(b, t)
            g.DeleteSubscriptionRequestAddName(b, n)
            return g.DeleteSubscriptionRequestEnd(b)

        self._call(g.RequestBody.DeleteSubscriptionRequest, build,
                   lambda r: _body(r, g.ResponseBody.DeleteSubscriptionResponse,
                                   g.DeleteSubscriptionResponse))

    def list_subscriptions(self, topic: str, with_stats: bool = False) -> list[SubscriptionInfo]:
        """The topic's subscriptions, with their figures if ``with_stats``."""

        def build(b: flatbuffers.Builder) -> int:
            t = b.CreateString(topic)
            g.ListSubscriptionsRequestStart(b)
            g.ListSubscriptionsRequestAddTopic(b, t)
            g.ListSubscriptionsRequestAddWithStats(b, with_stats)
            return g.ListSubscriptionsRequestEnd(b)

        def parse(resp: g.Response) -> list[SubscriptionInfo]:
            r = _body(resp, g.ResponseBody.ListSubscriptionsResponse,
                      g.ListSubscriptionsResponse)
            out = []
            for i in range(r.SubscriptionsLength()):
                info = r.Subscriptions(i)
                s = info.Stats()
                stats = None if s is None else SubscriptionStats(
                    s.Locked(), s.Backlog(), s.Acked(), s.DeadLettered(), s.Dropped(),
                    s.Lost())
                out.append(SubscriptionInfo(_subscription_from(info.Subscription()), stats))
            return out

        return self._call(g.RequestBody.ListSubscriptionsRequest, build, parse)

    def receive(
        self, topic: str, subscription: str, max_events: int = 1, max_wait_ms: int = 0
    ) -> list[ReceivedEvent]:
        """Up to ``max_events`` events, each locked to the caller; waits up to
        ``max_wait_ms`` for the first one. Settle them by ``lock_token``."""

        def build(b: flatbuffers.Builder) -> int:
            t, s = b.CreateString(topic), b.CreateString(subscription)
            g.ReceiveRequestStart(b)
            g.ReceiveRequestAddTopic(b, t)
            g.ReceiveRequestAddSubscription(b, s)
            g.ReceiveRequestAddMaxEvents(b, max_events)
            g.ReceiveRequestAddMaxWaitMs(b, max_wait_ms)
            return g.ReceiveRequestEnd(b)

        def parse(resp: g.Response) -> list[ReceivedEvent]:
            r = _body(resp, g.ResponseBody.ReceiveResponse, g.ReceiveResponse)
            out = []
            for i in range(r.EventsLength()):
                e = r.Events(i)
                raw = ubyte_vector(e._tab, _RECEIVED_EVENT_RECORD)
                try:
                    # One record, length prefix included; its offset_delta is its index in
                    # the batch it was published in, so the offset comes from the event.
                    record, _, end = decode_record(raw)
                    if end != len(raw):
                        raise BatchFormatError(f"{len(raw) - end} bytes after the record")
                except BatchFormatError as err:
                    raise errors.ProtocolError(f"received event: {err}") from err
                record.offset = e.Offset()
                out.append(ReceivedEvent(e.Partition(), e.Offset(), e.DeliveryCount(),
                                         _text(e.LockToken()), e.LockedUntilMs(), record))
            return out

        return self._call(g.RequestBody.ReceiveRequest, build, parse, wait_ms=max_wait_ms)

    def settle(
        self,
        topic: str,
        subscription: str,
        action: SettleAction,
        lock_tokens: Sequence[str],
        release_delay_ms: int = 0,
    ) -> list[SettleResult]:
        """Acks, releases, rejects or renews locked events: one result per token, in order
        (``LockLost`` for a lock that expired or was settled already)."""

        def build(b: flatbuffers.Builder) -> int:
            t, s = b.CreateString(topic), b.CreateString(subscription)
            tokens = _strings(b, g.SettleRequestStartLockTokensVector, lock_tokens)
            g.SettleRequestStart(b)
            g.SettleRequestAddTopic(b, t)
            g.SettleRequestAddSubscription(b, s)
            g.SettleRequestAddAction(b, int(action))
            g.SettleRequestAddLockTokens(b, tokens)
            g.SettleRequestAddReleaseDelayMs(b, release_delay_ms)
            return g.SettleRequestEnd(b)

        def parse(resp: g.Response) -> list[SettleResult]:
            r = _body(resp, g.ResponseBody.SettleResponse, g.SettleResponse)
            out = []
            for i in range(r.ResultsLength()):
                x = r.Results(i)
                out.append(SettleResult(_text(x.LockToken()), error_from(x.Error()),
                                        x.LockedUntilMs()))
            return out

        return self._call(g.RequestBody.SettleRequest, build, parse)

    def ack(self, topic: str, subscription: str, lock_tokens: Sequence[str]) -> list[SettleResult]:
        """Settles events for good."""
        return self.settle(topic, subscription, SettleAction.ACK, lock_tokens)

    def release(
        self, topic: str, subscription: str, lock_tokens: Sequence[str], delay_ms: int = 0
    ) -> list[SettleResult]:
        """Unlocks events; they are delivered again after ``delay_ms``."""
        return self.settle(topic, subscription, SettleAction.RELEASE, lock_tokens, delay_ms)

    def reject(
        self, topic: str, subscription: str, lock_tokens: Sequence[str]
    ) -> list[SettleResult]:
        """Dead-letters events now (reason ``rejected``)."""
        return self.settle(topic, subscription, SettleAction.REJECT, lock_tokens)

    def renew(
        self, topic: str, subscription: str, lock_tokens: Sequence[str]
    ) -> list[SettleResult]:
        """Extends locks by the lock duration from now (see ``locked_until_ms``)."""
        return self.settle(topic, subscription, SettleAction.RENEW, lock_tokens)

    # ------------------------------------------------------------------ stats

    def stats(self) -> Stats:
        """Figures of every shard and partition."""

        def build(b: flatbuffers.Builder) -> int:
            g.StatsRequestStart(b)
            return g.StatsRequestEnd(b)

        def parse(resp: g.Response) -> Stats:
            r = _body(resp, g.ResponseBody.StatsResponse, g.StatsResponse)
            shards = [
                ShardStats(s.Shard(), s.Connections(), s.RequestsInFlight(), s.Flushes(),
                           s.SlowFlushes(), s.FlushMaxUs(), s.SyncMaxUs(), s.WriteMaxUs())
                for s in (r.Shards(i) for i in range(r.ShardsLength()))
            ]
            parts = [
                PartitionStats(_text(p.Topic()), p.Partition(), p.Shard(), p.LogStartOffset(),
                               p.HighWatermark(), p.SizeBytes(), p.Segments(), p.MessagesIn(),
                               p.BytesIn(), p.MessagesOut(), p.BytesOut())
                for p in (r.Partitions(i) for i in range(r.PartitionsLength()))
            ]
            return Stats(shards, parts)

        return self._call(g.RequestBody.StatsRequest, build, parse)


def _build_subscription(b: flatbuffers.Builder, s: Subscription) -> int:
    topic, name = b.CreateString(s.topic), b.CreateString(s.name)
    types = None
    if s.filter_types:
        types = _strings(b, g.SubscriptionStartFilterTypesVector, s.filter_types)
    begins = b.CreateString(s.filter_subject_begins_with) if s.filter_subject_begins_with else None
    ends = b.CreateString(s.filter_subject_ends_with) if s.filter_subject_ends_with else None
    attrs = None
    if s.filter_attributes:
        items = []
        for f in s.filter_attributes:
            n, v = b.CreateString(f.name), b.CreateString(f.value)
            g.AttributeFilterStart(b)
            g.AttributeFilterAddName(b, n)
            g.AttributeFilterAddValue(b, v)
            items.append(g.AttributeFilterEnd(b))
        attrs = _vector(b, g.SubscriptionStartFilterAttributesVector, items)
    dead = b.CreateString(s.dead_letter_topic) if s.dead_letter_topic else None
    g.SubscriptionStart(b)
    g.SubscriptionAddTopic(b, topic)
    g.SubscriptionAddName(b, name)
    if types is not None:
        g.SubscriptionAddFilterTypes(b, types)
    if begins is not None:
        g.SubscriptionAddFilterSubjectBeginsWith(b, begins)
    if ends is not None:
        g.SubscriptionAddFilterSubjectEndsWith(b, ends)
    if attrs is not None:
        g.SubscriptionAddFilterAttributes(b, attrs)
    g.SubscriptionAddLockDurationMs(b, s.lock_duration_ms)
    g.SubscriptionAddMaxDeliveries(b, s.max_deliveries)
    g.SubscriptionAddTtlMs(b, s.ttl_ms)
    if dead is not None:
        g.SubscriptionAddDeadLetterTopic(b, dead)
    g.SubscriptionAddStart(b, int(s.start))
    return g.SubscriptionEnd(b)


def _subscription_from(s: g.Subscription) -> Subscription:
    return Subscription(
        topic=_text(s.Topic()),
        name=_text(s.Name()),
        filter_types=[_text(s.FilterTypes(i)) for i in range(s.FilterTypesLength())],
        filter_subject_begins_with=_opt_text(s.FilterSubjectBeginsWith()),
        filter_subject_ends_with=_opt_text(s.FilterSubjectEndsWith()),
        filter_attributes=[
            AttributeFilter(_text(a.Name()), _text(a.Value()))
            for a in (s.FilterAttributes(i) for i in range(s.FilterAttributesLength()))
        ],
        lock_duration_ms=s.LockDurationMs(),
        max_deliveries=s.MaxDeliveries(),
        ttl_ms=s.TtlMs(),
        dead_letter_topic=_opt_text(s.DeadLetterTopic()),
        start=StartPosition(s.Start()),
    )
