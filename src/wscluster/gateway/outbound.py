"""Server frames on the wire: headers made here, in bytes of their own, and the backlog a
congested connection holds. I/O is one call on the asyncio transport.

Never hand a data frame to picows' ``WSTransport.send``: for payloads over 8 KiB it writes a
memoryview of its one shared header buffer, which the transport keeps uncopied when the
socket is full, and the next frame's header overwrites it (garbled frames and bogus close
codes reach the client). Close, ping and pong frames (at most 125 bytes) are copied by
picows and may use it.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Iterable
from typing import Any

from picows import WSMsgType

HELD_COST = 128  # bytes charged per held message on top of its payload (tuple, int, header)
_JOIN_BELOW = 4096  # smaller payloads are copied behind their header: one buffer, one write

_SHORT = struct.Struct("!BB")
_MEDIUM = struct.Struct("!BBH")
_LONG = struct.Struct("!BBQ")


def header(kind: WSMsgType, size: int) -> bytes:
    """The header of an unmasked, final server frame (RFC 6455 5.2)."""
    first = 0x80 | kind.value
    if size < 126:
        return _SHORT.pack(first, size)
    if size < 65536:
        return _MEDIUM.pack(first, 126, size)
    return _LONG.pack(first, 127, size)


def write(transport: Any, kind: WSMsgType, payload: bytes) -> None:
    """Write one frame on an asyncio transport."""
    if type(payload) is not bytes:  # an application's bytearray could change after this
        payload = bytes(payload)
    if len(payload) < _JOIN_BELOW:
        transport.write(header(kind, len(payload)) + payload)
    else:
        transport.writelines((header(kind, len(payload)), payload))


def write_all(transport: Any, frames: Iterable[tuple[WSMsgType, bytes, bool]]) -> None:
    """Write several frames (kind, payload, droppable) in one call (one writev when the
    socket takes them)."""
    parts: list[bytes] = []
    for kind, payload, _ in frames:
        parts.append(header(kind, len(payload)))
        parts.append(payload if type(payload) is bytes else bytes(payload))
    transport.writelines(parts)


def close_reason(reason: str) -> bytes | None:
    """A close reason that fits a control frame (123 bytes), cut at a character boundary:
    a reason that is not valid UTF-8 makes clients fail the connection (1006, not the code)."""
    if not reason:
        return None
    return reason.encode()[:120].decode("utf-8", "ignore").encode()


class Backlog:
    """The messages a congested connection holds back, in push order: the droppable ones
    (dropped oldest first past the bound) and the others (never dropped), merged by a
    sequence number when written."""

    __slots__ = ("droppable_bytes", "drops", "keeps", "kept_bytes", "seq")

    def __init__(self) -> None:
        self.drops: deque[tuple[int, WSMsgType, bytes]] = deque()
        self.keeps: deque[tuple[int, WSMsgType, bytes]] = deque()
        self.droppable_bytes = 0  # held bytes of droppable messages (charged HELD_COST each)
        self.kept_bytes = 0  # held bytes of the others
        self.seq = 0

    def add(self, kind: WSMsgType, payload: bytes) -> None:
        self.seq += 1
        self.keeps.append((self.seq, kind, payload))
        self.kept_bytes += len(payload) + HELD_COST

    def add_droppable(self, kind: WSMsgType, payload: bytes, limit: int) -> int:
        """Hold a droppable message, then drop the oldest ones (maybe this one) until they
        weigh at most ``limit`` bytes; how many were dropped."""
        self.seq += 1
        self.drops.append((self.seq, kind, payload))
        self.droppable_bytes += len(payload) + HELD_COST
        n = 0
        while self.droppable_bytes > limit:
            self.droppable_bytes -= len(self.drops.popleft()[2]) + HELD_COST
            n += 1
        return n

    def pop(self) -> tuple[WSMsgType, bytes] | None:
        """The oldest held message (droppable or not), or None when nothing is held."""
        drops, keeps = self.drops, self.keeps
        if keeps and (not drops or keeps[0][0] < drops[0][0]):
            _, kind, payload = keeps.popleft()
            self.kept_bytes -= len(payload) + HELD_COST
        elif drops:
            _, kind, payload = drops.popleft()
            self.droppable_bytes -= len(payload) + HELD_COST
        else:
            return None
        return kind, payload
