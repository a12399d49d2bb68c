"""Hand-made client frames, written straight to a `websockets` connection's transport so a
test can send what no well-behaved library would (RSV bits, stray continuations, split
UTF-8, bad close codes, floods in one TCP write). The replies are still read through the
`websockets` parser, which fails on any malformed server frame."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import pytest
import websockets
from websockets.exceptions import ConnectionClosed

from .conftest import Cluster, _make
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


def message_frames(parts: list[bytes], opcode: int = TEXT, fin: bool = True) -> bytes:
    """The frames of one fragmented message carrying ``parts`` in order: the first with
    ``opcode``, the others continuations; the last one final unless ``fin`` is False (the
    message is left unfinished)."""
    out = []
    for i, part in enumerate(parts):
        last = fin and i == len(parts) - 1
        out.append(client_frame(part, opcode if i == 0 else CONTINUATION, fin=last))
    return b"".join(out)


def chunks(data: bytes, size: int) -> list[bytes]:
    """``data`` cut into pieces of ``size`` bytes (the last one shorter)."""
    return [data[i : i + size] for i in range(0, len(data), size)] or [b""]


async def connect(url: str, raw: bool = False) -> WS:
    """A connection for the frame tests: a core one once welcomed, or one to a raw-mode node
    (no welcome: its client id is left empty). Closed by the autouse fixture."""
    if not raw:
        return await WS.open(url)
    conn = await websockets.connect(url, compression=None, max_size=None)
    ws = WS(conn, {"type": "raw", "client_id": ""})
    WS.opened.append(ws)
    return ws


async def recv_data(ws: WS, timeout: float = 5.0) -> str | bytes:
    """The next data message, as the `websockets` parser assembled it."""
    return await asyncio.wait_for(ws.conn.recv(), timeout)


async def closed_with_raw(ws: WS, timeout: float = 5.0) -> tuple[int | None, str, list[Any]]:
    """`closed_with` for raw-mode connections: the frames before the close as they are."""
    before: list[Any] = []
    try:
        async with asyncio.timeout(timeout):
            while True:
                before.append(await ws.conn.recv())
    except ConnectionClosed as exc:
        rcvd = exc.rcvd
        return (rcvd.code, rcvd.reason, before) if rcvd is not None else (None, "", before)


# --- nodes in both modes --------------------------------------------------------------
REPO = Path(__file__).resolve().parents[2]
RAW_APP = ["--app", "tests.cluster.apps.rawecho:app"]  # tests/cluster/apps/rawecho.py
MODES = ("core", "raw")


def start_modes(
    redis_url: str, tmp: pytest.TempPathFactory, extra: list[str] | None = None
) -> dict[str, Cluster]:
    """One node per mode with the options ``extra``: "core" (no app) and "raw" (rawecho,
    imported from the repository whatever pytest's cwd). Stop them with ``stop_modes``."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    nodes: dict[str, Cluster] = {}
    try:
        nodes["core"] = _make(redis_url, tmp.mktemp("core"), 1, extra)
        nodes["raw"] = _make(redis_url, tmp.mktemp("raw"), 1, [*RAW_APP, *(extra or [])],
                             {"PYTHONPATH": path})  # fmt: skip
    except BaseException:
        stop_modes(nodes)
        raise
    return nodes


def stop_modes(nodes: dict[str, Cluster]) -> None:
    for cluster in nodes.values():
        cluster.stop()


async def alive(ws: WS, mode: str) -> None:
    """Assert that the connection still works: a core ``ping`` gets its ``pong``; rawecho
    echoes a text."""
    if mode == "core":
        assert await ws.request({"type": "ping", "id": "alive"}, timeout=10) == {
            "type": "pong", "id": "alive"}  # fmt: skip
    else:
        await ws.conn.send("alive?")
        assert await recv_data(ws, 10) == "text:alive?"


async def closed_in(mode: str, ws: WS, timeout: float) -> tuple[int | None, list[Any]]:
    """The server's close code and the frames before it, read the way ``mode`` (``core`` or
    ``raw``) connections speak."""
    code, _, before = await (closed_with if mode == "core" else closed_with_raw)(ws, timeout)
    return code, before
