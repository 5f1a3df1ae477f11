"""Frame-level behaviour of the broker (docs/protocol.md section 3), on a raw socket: what
comes back for malformed or unusual requests, and that the connection stays usable."""

from __future__ import annotations

import socket
import struct
from typing import Iterator, Optional

import flatbuffers
import pytest

from corebus_client import build_request, code_name, parse_response, read_frame
from corebus_client.generated import corebus_generated as g

from conftest import Broker


class Raw:
    """A bare connection: send frames, read replies one at a time."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)

    def round_trip(self, frame: bytes) -> tuple[int, Optional[str], int]:
        """Sends ``frame``; returns the reply's (correlation id, error name, body type)."""
        self.sock.sendall(frame)
        reply = read_frame(self.sock)
        assert reply is not None, "the broker closed the connection"
        resp = parse_response(reply)
        err = resp.Error()
        name = code_name(err.Code()) if err is not None and err.Code() else None
        return resp.CorrelationId(), name, resp.BodyType()

    def assert_still_open(self, cid: int = 4242) -> None:
        """A following good request still gets its own reply."""
        assert self.round_trip(build_request(cid, g.RequestBody.ListTopicsRequest, list_topics)) \
            == (cid, None, g.ResponseBody.ListTopicsResponse)


def list_topics(b: flatbuffers.Builder) -> int:
    g.ListTopicsRequestStart(b)
    return g.ListTopicsRequestEnd(b)


@pytest.fixture
def raw(broker: Broker) -> Iterator[Raw]:
    r = Raw(broker.port)
    yield r
    r.sock.close()


def test_known_body_type_without_body_is_invalid_request(raw: Raw) -> None:
    frame = build_request(17, g.RequestBody.ProduceRequest, None)
    assert raw.round_trip(frame) == (17, "InvalidRequest", 0)
    raw.assert_still_open()


def test_unknown_body_type_is_unsupported_request(raw: Raw) -> None:
    assert raw.round_trip(build_request(18, 200, None)) == (18, "UnsupportedRequest", 0)
    raw.assert_still_open()


def test_none_body_type_is_unsupported_request(raw: Raw) -> None:
    assert raw.round_trip(build_request(19, g.RequestBody.NONE, None)) == (
        19, "UnsupportedRequest", 0)
    raw.assert_still_open()


def test_correlation_id_zero_is_refused(raw: Raw) -> None:
    reply = raw.round_trip(build_request(0, g.RequestBody.ListTopicsRequest, list_topics))
    assert reply == (0, "InvalidRequest", 0)
    raw.assert_still_open()


def test_zero_length_frame_is_invalid_request(raw: Raw) -> None:
    assert raw.round_trip(struct.pack("<I", 0)) == (0, "InvalidRequest", 0)
    raw.assert_still_open()


def test_commit_offsets_on_unknown_topic_fails_as_a_whole(raw: Raw) -> None:
    def commit(b: flatbuffers.Builder) -> int:
        group, topic = b.CreateString("g"), b.CreateString("no-such-topic-anywhere")
        g.PartitionOffsetStart(b)
        g.PartitionOffsetAddPartition(b, 0)
        g.PartitionOffsetAddOffset(b, 1)
        item = g.PartitionOffsetEnd(b)
        g.CommitOffsetsRequestStartOffsetsVector(b, 1)
        b.PrependUOffsetTRelative(item)
        offsets = b.EndVector()
        g.CommitOffsetsRequestStart(b)
        g.CommitOffsetsRequestAddGroup(b, group)
        g.CommitOffsetsRequestAddTopic(b, topic)
        g.CommitOffsetsRequestAddOffsets(b, offsets)
        return g.CommitOffsetsRequestEnd(b)

    frame = build_request(21, g.RequestBody.CommitOffsetsRequest, commit)
    assert raw.round_trip(frame) == (21, "UnknownTopic", 0)
    raw.assert_still_open()


def test_frame_failing_verification_keeps_the_connection(raw: Raw) -> None:
    # A root offset pointing past the end of the buffer: no correlation id can be read.
    assert raw.round_trip(struct.pack("<II", 4, 0xFFFF)) == (0, "InvalidRequest", 0)
    raw.assert_still_open()


def test_missing_required_field_echoes_the_id(raw: Raw) -> None:
    # CreateTopicRequest.name is (required): the frame fails verification, but the Request
    # table's correlation_id can still be read (section 3), so the reply carries it.
    def create(b: flatbuffers.Builder) -> int:
        g.CreateTopicRequestStart(b)
        g.CreateTopicRequestAddPartitions(b, 1)
        return g.CreateTopicRequestEnd(b)

    frame = build_request(23, g.RequestBody.CreateTopicRequest, create)
    assert raw.round_trip(frame) == (23, "InvalidRequest", 0)
    raw.assert_still_open()
