"""Framing and one pipelined connection (docs/protocol.md sections 2, 3 and 9).

A frame is a ``u32`` little-endian length ``N`` and ``N`` bytes of FlatBuffers: exactly a
FlatBuffers *size-prefixed* buffer. Requests are built with ``Builder.FinishSizePrefixed``
(never ``Finish`` plus a hand-written prefix, which misaligns 8-byte fields).

:class:`Connection` pipelines: any number of requests may be in flight; one reader thread
matches each reply to its request by correlation id (ids count up from 1), and replies may
arrive in any order. A reply with id 0 is a connection-level error: every request in flight
fails with it and the connection is closed.
"""

from __future__ import annotations

import itertools
import logging
import socket
import struct
import threading
from concurrent.futures import Future
from typing import Callable, Optional

import flatbuffers

from . import errors
from .generated import corebus_generated as g

log = logging.getLogger(__name__)

#: Replies announcing more than this are refused (the broker's own limit is configurable up
#: to 1 GiB; fetch replies are capped by ``--max-fetch-bytes``).
MAX_REPLY_BYTES = 1 << 30

#: Builds a request body into a builder and returns its offset.
BodyBuilder = Callable[[flatbuffers.Builder], int]


def build_request(
    correlation_id: int, body_type: int, build_body: Optional[BodyBuilder] = None
) -> bytes:
    """A whole request frame (length prefix included) around the body ``build_body`` writes.

    With ``build_body=None`` the request has ``body_type`` but no body (for tests).
    """
    b = flatbuffers.Builder(256)
    body = build_body(b) if build_body is not None else None
    g.RequestStart(b)
    g.RequestAddCorrelationId(b, correlation_id)
    g.RequestAddBodyType(b, body_type)
    if body is not None:
        g.RequestAddBody(b, body)
    b.FinishSizePrefixed(g.RequestEnd(b))
    return bytes(b.Output())


def parse_response(frame: bytes) -> g.Response:
    """The ``Response`` in a whole frame (length prefix included)."""
    return g.Response.GetRootAs(frame, 4)


def _recv_exact(sock: socket.socket, n: int) -> Optional[bytes]:
    """Exactly ``n`` bytes, or ``None`` at end of stream before the first byte."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            if got == 0:
                return None
            raise errors.ConnectionClosedError("connection closed in the middle of a frame")
        got += k
    return bytes(buf)


def read_frame(sock: socket.socket, max_bytes: int = MAX_REPLY_BYTES) -> Optional[bytes]:
    """The next whole frame (length prefix included), or ``None`` at a clean end of stream."""
    prefix = _recv_exact(sock, 4)
    if prefix is None:
        return None
    (n,) = struct.unpack("<I", prefix)
    if n > max_bytes:
        raise errors.ProtocolError(f"reply of {n} bytes exceeds the limit of {max_bytes}")
    body = _recv_exact(sock, n) if n else b""
    if body is None:
        raise errors.ConnectionClosedError("connection closed in the middle of a frame")
    return prefix + body


def response_error(resp: g.Response) -> Optional[errors.CorebusError]:
    """The whole-request error of a reply (level 1 of section 5), or ``None``."""
    return error_from(resp.Error())


def error_from(err: Optional[g.Error]) -> Optional[errors.CorebusError]:
    """A wire ``Error`` as an exception; ``None`` when absent or code ``None``."""
    if err is None or err.Code() == g.ErrorCode.None_:
        return None
    return errors.CorebusError(err.Code(), (err.Message() or b"").decode("utf-8", "replace"))


class Connection:
    """One TCP connection to a broker port, with pipelining.

    Thread-safe: any thread may send; a daemon reader thread completes the futures.
    """

    def __init__(self, host: str, port: int, connect_timeout: float = 10.0) -> None:
        self.host, self.port = host, port
        self._sock = socket.create_connection((host, port), timeout=connect_timeout)
        self._sock.settimeout(None)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._ids = itertools.count(1)
        self._lock = threading.Lock()  # guards _pending, _closed, _ids
        self._send_lock = threading.Lock()  # one frame at a time on the socket
        self._pending: dict[int, Future[g.Response]] = {}
        self._closed: Optional[BaseException] = None
        self._reader = threading.Thread(
            target=self._read_loop, name=f"corebus-reader-{host}:{port}", daemon=True
        )
        self._reader.start()

    @property
    def closed(self) -> bool:
        """True once the connection can no longer be used."""
        return self._closed is not None

    def next_id(self) -> int:
        """A fresh correlation id (1, 2, 3, ...)."""
        with self._lock:
            return next(self._ids)

    def request(self, body_type: int, build_body: Optional[BodyBuilder]) -> Future[g.Response]:
        """Sends a request and returns a future of its reply (not yet checked for errors)."""
        cid = self.next_id()
        return self.submit(cid, build_request(cid, body_type, build_body))

    def call(
        self, body_type: int, build_body: Optional[BodyBuilder], timeout: Optional[float] = None
    ) -> g.Response:
        """Sends a request and waits for its reply; raises the reply's whole-request error."""
        resp = self.request(body_type, build_body).result(timeout)
        err = response_error(resp)
        if err is not None:
            raise err
        return resp

    def submit(self, correlation_id: int, frame: bytes) -> Future[g.Response]:
        """Sends a ready frame whose request carries ``correlation_id`` (not 0, not in flight)
        and returns a future of the reply with that id."""
        fut: Future[g.Response] = Future()
        with self._lock:
            if self._closed is not None:
                fut.set_exception(self._closed_error())
                return fut
            if correlation_id == 0 or correlation_id in self._pending:
                raise ValueError(f"correlation id {correlation_id} is 0 or already in flight")
            self._pending[correlation_id] = fut  # before sending: the reply may come first
        try:
            with self._send_lock:
                self._sock.sendall(frame)
        except OSError as e:
            self._fail_all(errors.ConnectionClosedError(f"send failed: {e}"))
        return fut

    def close(self) -> None:
        """Closes the connection; requests in flight fail with ConnectionClosedError."""
        self._fail_all(errors.ConnectionClosedError("connection closed by the client"))
        if threading.current_thread() is not self._reader:
            self._reader.join(timeout=5)
        self._sock.close()

    def __enter__(self) -> "Connection":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _closed_error(self) -> BaseException:
        reason = self._closed
        if isinstance(reason, errors.ConnectionClosedError):
            return reason
        return errors.ConnectionClosedError(f"connection closed after: {reason}")

    def _fail_all(self, exc: BaseException) -> None:
        with self._lock:
            if self._closed is None:
                self._closed = exc
            pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(exc)
        try:
            self._sock.shutdown(socket.SHUT_RDWR)  # also wakes the reader
        except OSError:
            pass

    def _read_loop(self) -> None:
        try:
            while True:
                frame = read_frame(self._sock)
                if frame is None:
                    raise errors.ConnectionClosedError("the broker closed the connection")
                resp = parse_response(frame)
                cid = resp.CorrelationId()
                if cid == 0:
                    # A connection-level error (section 3): it names no request, so every
                    # request in flight fails with it and the connection is given up.
                    err = response_error(resp) or errors.ProtocolError("reply with id 0")
                    log.warning("corebus %s:%d: connection-level error: %s", self.host,
                                self.port, err)
                    self._fail_all(err)
                    return
                with self._lock:
                    fut = self._pending.pop(cid, None)
                if fut is None:
                    log.warning("corebus %s:%d: reply to unknown correlation id %d", self.host,
                                self.port, cid)
                elif not fut.done():
                    fut.set_result(resp)
        except errors.ConnectionClosedError as e:
            self._fail_all(e)
        except Exception as e:  # socket errors, unparsable frames
            self._fail_all(errors.ConnectionClosedError(f"connection failed: {e!r}"))
