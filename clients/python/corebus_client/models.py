"""Plain data classes for what the client sends and returns."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Optional

from .errors import CorebusError
from .generated import corebus_generated as g
from .records import Record


class SettleAction(enum.IntEnum):
    """What to do with locked events (docs/subscriptions.md, "Settle")."""

    ACK = g.SettleAction.Ack
    RELEASE = g.SettleAction.Release
    REJECT = g.SettleAction.Reject
    RENEW = g.SettleAction.Renew


class StartPosition(enum.IntEnum):
    """Where a new subscription starts in each partition."""

    EARLIEST = g.StartPosition.Earliest
    LATEST = g.StartPosition.Latest


@dataclass(frozen=True)
class TopicInfo:
    """A topic as listed or created; retention -1 means the broker's default."""

    name: str
    partitions: int
    retention_ms: int = -1
    retention_bytes: int = -1


@dataclass(frozen=True)
class PartitionMetadata:
    """A partition's owning shard and that shard's own port."""

    partition: int
    shard: int
    port: int


@dataclass(frozen=True)
class TopicMetadata:
    """One topic of a metadata reply; ``error`` is set (UnknownTopic) for a missing topic."""

    name: str
    partitions: list[PartitionMetadata]
    error: Optional[CorebusError] = None


@dataclass(frozen=True)
class Metadata:
    """The broker's shards (shard index -> own port) and the requested topics."""

    shards: dict[int, int]
    topics: list[TopicMetadata]


@dataclass(frozen=True)
class ProduceResult:
    """The outcome for one partition of a produce. When ``error`` is set nothing of the
    partition was appended and the offsets mean nothing."""

    partition: int
    base_offset: int
    last_offset: int
    error: Optional[CorebusError] = None


@dataclass(frozen=True)
class FetchResult:
    """Records at or after the requested offset, in order, each with its ``offset``.

    ``next_offset`` is where the next fetch continues (the requested offset when nothing
    came back).
    """

    topic: str
    partition: int
    high_watermark: int
    log_start_offset: int
    records: list[Record]
    next_offset: int


@dataclass(frozen=True)
class AttributeFilter:
    """An ``ATTR=VALUE`` condition; ``name`` is ``id``, ``source``, ``type``, ``subject`` or a
    header key."""

    name: str
    value: str


@dataclass
class Subscription:
    """A subscription's definition (docs/subscriptions.md, "Definitions").

    0 for ``lock_duration_ms`` / ``max_deliveries`` means the broker's default (30 s / 10);
    ``ttl_ms`` -1 means no TTL; ``dead_letter_topic`` ``None`` means dead letters are dropped.
    """

    topic: str
    name: str
    filter_types: list[str] = field(default_factory=list)
    filter_subject_begins_with: Optional[str] = None
    filter_subject_ends_with: Optional[str] = None
    filter_attributes: list[AttributeFilter] = field(default_factory=list)
    lock_duration_ms: int = 0
    max_deliveries: int = 0
    ttl_ms: int = -1
    dead_letter_topic: Optional[str] = None
    start: StartPosition = StartPosition.EARLIEST


@dataclass(frozen=True)
class SubscriptionStats:
    """A subscription's figures, summed over its partitions."""

    locked: int
    backlog: int
    acked: int
    dead_lettered: int
    dropped: int
    #: Offsets lost before they were settled (retention, or a range failing its checksum).
    lost: int


@dataclass(frozen=True)
class SubscriptionInfo:
    """A listed subscription; ``stats`` only when asked for."""

    subscription: Subscription
    stats: Optional[SubscriptionStats] = None


@dataclass(frozen=True)
class ReceivedEvent:
    """An event locked to the receiver until ``locked_until_ms`` (broker clock).

    ``record.offset`` equals ``offset``.
    """

    partition: int
    offset: int
    delivery_count: int
    lock_token: str
    locked_until_ms: int
    record: Record


@dataclass(frozen=True)
class SettleResult:
    """The outcome for one lock token; ``locked_until_ms`` is the new lock end of a renew."""

    lock_token: str
    error: Optional[CorebusError] = None
    locked_until_ms: int = 0


@dataclass(frozen=True)
class PartitionOffset:
    """A consumer group's offset for one partition: the next offset the group will read,
    -1 when nothing is committed, and a per-partition error."""

    partition: int
    offset: int
    error: Optional[CorebusError] = None


@dataclass(frozen=True)
class ShardStats:
    """Figures of one shard."""

    shard: int
    connections: int
    requests_in_flight: int
    #: Flushes (group commits) completed since the broker started.
    flushes: int = 0
    #: Of those, the ones slower than 10 ms.
    slow_flushes: int = 0
    #: The longest flush since the broker started, in microseconds.
    flush_max_us: int = 0
    #: The longest sync of a flush since the broker started, in microseconds.
    sync_max_us: int = 0
    #: The longest write of a flush since the broker started, in microseconds.
    write_max_us: int = 0


@dataclass(frozen=True)
class PartitionStats:
    """Figures of one partition; the counters count since the broker started."""

    topic: str
    partition: int
    shard: int
    log_start_offset: int
    high_watermark: int
    size_bytes: int
    segments: int
    messages_in: int
    bytes_in: int
    messages_out: int
    bytes_out: int


@dataclass(frozen=True)
class Stats:
    """Figures of every shard and partition."""

    shards: list[ShardStats]
    partitions: list[PartitionStats]
