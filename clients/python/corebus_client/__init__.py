"""corebus_client: a Python reference client for the corebus broker.

Written from docs/protocol.md, docs/subscriptions.md and schema/corebus.fbs; it shares no code
with the broker. Start with :class:`Client`.
"""

from .client import Client, ubyte_vector
from .connection import Connection, build_request, parse_response, read_frame
from .errors import (
    ConnectionClosedError,
    CorebusError,
    OffsetOutOfRangeError,
    ProtocolError,
    code_name,
)
from .generated.corebus_generated import ErrorCode
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
from .records import (
    Batch,
    BatchFormatError,
    Record,
    crc32c,
    decode_batches,
    decode_record,
    encode_batch,
    encode_record,
)

__all__ = [
    "AttributeFilter", "Batch", "BatchFormatError", "Client", "Connection",
    "ConnectionClosedError", "CorebusError", "ErrorCode", "FetchResult", "Metadata",
    "OffsetOutOfRangeError", "PartitionMetadata", "PartitionOffset", "PartitionStats",
    "ProduceResult", "ProtocolError", "ReceivedEvent", "Record", "SettleAction", "SettleResult",
    "ShardStats", "StartPosition", "Stats", "Subscription", "SubscriptionInfo",
    "SubscriptionStats", "TopicInfo", "TopicMetadata", "build_request", "code_name", "crc32c",
    "decode_batches", "decode_record", "encode_batch", "encode_record", "parse_response",
    "read_frame", "ubyte_vector",
]
