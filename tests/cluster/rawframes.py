"""Hand-made client frames, written straight to a `websockets` connection's transport so a
test can send what no well-behaved library would (RSV bits, stray continuations, split
UTF-8, bad close codes, floods in one TCP write). The replies are still read through the
`websockets` parser, which fails on any malformed server frame."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from websockets.exceptions import ConnectionClosed

from .wsclient import WS

TEXT, BINARY, CONTINUATION, CLOSE, PING, PONG = 0x1, 0x2, 0x0, 0x8, 0x9, 0xA


def client_frame(
    payload: bytes, opcode: int = TEXT, fin: bool = True, rsv: int = 0, mask: bytes = b"\0" * 4
) -> bytes:
    """One client frame. The default all-zero mask leaves the payload as it is; ``rsv`` is
    the three reserved bits as a number 0-7 (RSV1 = 4)."""
    n = len(payload)
    first = (0x80 if fin else 0) | (rsv & 7) << 4 | opcode
    if n < 126:
        head = bytes([first, 0x80 | n])
    elif n < 65536:
        head = bytes([first, 0x80 | 126]) + n.to_bytes(2, "big")
    else:
        head = bytes([first, 0x80 | 127]) + n.to_bytes(8, "big")
    if mask != b"\0" * 4:
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + payload


def close_frame(code: int | None, reason: bytes = b"") -> bytes:
    """A client close frame; ``code`` None sends an empty one."""
    body = b"" if code is None else code.to_bytes(2, "big") + reason
    return client_frame(body, CLOSE)


def write(ws: WS, data: bytes) -> None:
    """Put bytes on the wire as they are (one TCP write)."""
    assert ws.conn.transport is not None
    ws.conn.transport.write(data)


async def closed_with(ws: WS, timeout: float = 5.0) -> tuple[int | None, str, list[Any]]:
    """Read until the server's close frame: (its code or None, its reason, the frames before
    it, JSON-decoded where they are text)."""
    before: list[Any] = []
    try:
        async with asyncio.timeout(timeout):
            while True:
                data = await ws.conn.recv()
                before.append(json.loads(data) if isinstance(data, str) else data)
    except ConnectionClosed as exc:
        rcvd = exc.rcvd
        return (rcvd.code, rcvd.reason, before) if rcvd is not None else (None, "", before)
