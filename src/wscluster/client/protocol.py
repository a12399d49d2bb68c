"""Pure parts of the client: close-code rules, frame decoding, the bounded push queue and
reply matching. No I/O."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from typing import Any

import msgspec

Frame = dict[str, Any]

TERMINAL_CLOSE_CODES = frozenset({1008, 4001})  # policy, kicked by the server API
RETRY_STATUSES = frozenset({408, 429})  # and every 5xx: busy, full or draining, try later
REPLY_TYPES = frozenset({"ack", "pong", "error"})
TRANSIENT_ERRORS = frozenset({"unavailable", "rate_limited"})  # a session restore is retried
MAX_RETRY_HINT = 60.0


class ServerError(Exception):
    """The server answered a request with an ``error`` frame."""

    def __init__(self, code: str, message: str, frame_id: int | str | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.frame_id = frame_id


class ConnectionClosed(Exception):
    """The link is gone (``code`` is the close code received, None without a close frame)."""

    def __init__(self, code: int | None, reason: str = "") -> None:
        what = f"connection closed (code {code})" if code is not None else "connection closed"
        super().__init__(f"{what}: {reason}" if reason else what)
        self.code = code
        self.reason = reason


class HandshakeRefused(ConnectionClosed):
    """The node answered the WebSocket handshake with an HTTP error ``status``."""

    def __init__(self, status: int, reason: str = "") -> None:
        detail = f": {reason}" if reason else ""
        super().__init__(None, f"handshake refused with HTTP {status}{detail}")
        self.status = status
        self.reason = reason  # the node's {"error": …} text (e.g. "token expired")


def retryable_status(status: int) -> bool:
    """A refused handshake worth retrying (a bounded number of times): 408, 429 and 5xx.
    Other 4xx (401 bad token, 403 origin, an application's own refusal) are final."""
    return status in RETRY_STATUSES or status >= 500


def is_terminal_close(code: int | None) -> bool:
    """True for close codes after which a client must not reconnect on its own."""
    return code in TERMINAL_CLOSE_CODES


def retry_hint(reason: str) -> float | None:
    """Seconds to wait from a close reason like ``{"retry_ms": 500}`` (capped), else None."""
    try:
        obj = msgspec.json.decode(reason) if reason else None
    except msgspec.DecodeError:
        return None
    ms = obj.get("retry_ms") if isinstance(obj, dict) else None
    if isinstance(ms, int | float) and not isinstance(ms, bool) and ms >= 0:
        return min(ms / 1000.0, MAX_RETRY_HINT)
    return None


def decode_frame(payload: bytes | memoryview) -> Frame | None:
    """Parse one text frame; None when it is not a JSON object."""
    try:
        obj = msgspec.json.decode(payload)
    except msgspec.DecodeError:
        return None
    return obj if isinstance(obj, dict) else None


class PushQueue:
    """Bounded queue of pushed frames: ``put`` never blocks, it drops the oldest when full."""

    def __init__(self, maxsize: int) -> None:
        if maxsize < 1:
            raise ValueError("maxsize must be >= 1")
        self.maxsize = maxsize
        self.dropped = 0
        self._items: collections.deque[Frame] = collections.deque()
        self._waiters: list[asyncio.Future[None]] = []
        self._closed: ConnectionClosed | None = None

    def __len__(self) -> int:
        return len(self._items)

    def put(self, frame: Frame) -> None:
        if len(self._items) >= self.maxsize:
            self._items.popleft()
            self.dropped += 1
        self._items.append(frame)
        self._wake()

    def close(self, exc: ConnectionClosed) -> None:
        """After the queued frames are consumed, ``get`` raises a copy of ``exc``."""
        self._closed = exc
        self._wake()

    async def get(self) -> Frame:
        while not self._items:
            if self._closed is not None:
                raise ConnectionClosed(self._closed.code, self._closed.reason)
            fut = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            try:
                await fut
            finally:
                if fut in self._waiters:
                    self._waiters.remove(fut)
        return self._items.popleft()

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)


class Pending(dict[int, "asyncio.Future[Frame]"]):
    """Futures of the requests in flight on one connection, keyed by id."""

    def add(self, frame_id: int) -> asyncio.Future[Frame]:
        fut: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        self[frame_id] = fut
        return fut

    def resolve(self, frame: Frame) -> bool:
        """Hand a reply to the request with its id; False when no request waits for it."""
        frame_id = frame.get("id")
        fut = self.pop(frame_id, None) if type(frame_id) is int else None
        if fut is not None and not fut.done():
            fut.set_result(frame)
        return fut is not None

    def fail_all(self, exc: ConnectionClosed) -> None:
        futures = list(self.values())
        self.clear()
        for fut in futures:
            if not fut.done():
                fut.set_exception(ConnectionClosed(exc.code, exc.reason))


def route(frame: Frame, pending: Pending, push: Callable[[Frame], None], last_id: int) -> None:
    """Deliver a frame: replies to their request, the rest (and foreign replies) to ``push``.

    A reply carrying one of our own ids that nobody waits for any more (the request timed
    out) is dropped, so late acks never show up as pushed frames.
    """
    if frame.get("type") in REPLY_TYPES:
        if pending.resolve(frame):
            return
        frame_id = frame.get("id")
        if type(frame_id) is int and 0 < frame_id <= last_id:
            return
    push(frame)
