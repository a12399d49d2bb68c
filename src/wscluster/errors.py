"""Error codes of the wire protocol (PROTOCOL.md) and the exceptions that carry them."""

from __future__ import annotations

from enum import StrEnum


class Code(StrEnum):
    """Every error code a client or API caller can see."""

    BAD_JSON = "bad_json"
    BAD_REQUEST = "bad_request"
    UNKNOWN_TYPE = "unknown_type"
    NOT_LOGGED_IN = "not_logged_in"
    FORBIDDEN = "forbidden"
    TOO_LARGE = "too_large"
    RATE_LIMITED = "rate_limited"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"


class WSClusterError(Exception):
    """Base of every error wscluster raises on purpose."""


class ProtocolError(WSClusterError):
    """A request was refused with one of the protocol's error codes."""

    def __init__(self, code: Code, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class BrokerUnavailable(WSClusterError):
    """The broker cannot be reached (or did not answer in time)."""


class PresenceUnavailable(WSClusterError):
    """The presence store cannot be reached (or did not answer in time)."""


def bad_request(message: str) -> ProtocolError:
    return ProtocolError(Code.BAD_REQUEST, message)
