"""Exceptions raised by the corebus client."""

from __future__ import annotations

from .generated.corebus_generated import ErrorCode

#: ErrorCode value -> name as the schema spells it. flatc generates ``ErrorCode.None_`` in
#: Python (``None`` is a keyword); the name reported here is ``"None"``.
_CODE_NAMES: dict[int, str] = {
    value: name.rstrip("_")
    for name, value in vars(ErrorCode).items()
    if not name.startswith("__") and isinstance(value, int)
}


def code_name(code: int) -> str:
    """The schema name of an ``ErrorCode`` value, e.g. ``"UnknownTopic"`` for 3."""
    return _CODE_NAMES.get(code, f"ErrorCode({code})")


class CorebusError(Exception):
    """An error reported by the broker (docs/protocol.md section 5).

    Attributes:
        code: the ``ErrorCode`` value (compare with ``ErrorCode.UnknownTopic`` etc.).
        name: the code's name as in the schema, e.g. ``"UnknownTopic"``.
        message: the broker's human-readable message (for logs only; do not parse it).
    """

    def __init__(self, code: int, message: str) -> None:
        self.code = code
        self.name = code_name(code)
        self.message = message
        super().__init__(f"{self.name}: {message}")


class OffsetOutOfRangeError(CorebusError):
    """A fetch offset outside ``[log_start_offset, high_watermark]``.

    Carries the partition's bounds so that a reader can move to the start or the end.
    """

    def __init__(self, message: str, log_start_offset: int, high_watermark: int) -> None:
        super().__init__(ErrorCode.OffsetOutOfRange, message)
        self.log_start_offset = log_start_offset
        self.high_watermark = high_watermark


class ConnectionClosedError(ConnectionError):
    """The connection ended (closed by either side or failed) before a reply arrived."""


class ProtocolError(Exception):
    """The broker sent something this client cannot understand (a client or broker bug)."""
