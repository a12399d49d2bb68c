"""Issue 13, items 3 and 5: floods that cost a node CPU for one token.

- A `resume` with N streams is charged N tokens of the connection's frame bucket
  (`--rate-limit`/s, `--rate-burst`); it is still processed and acked when that leaves the
  bucket in debt, and the node then reads nothing more from the connection until the debt
  is repaid (no `rate_limited` for the resume itself).
- Pings (WebSocket PING frames, unsolicited PONG frames, app-level `ping` frames) take a
  token of a ping bucket (`--ping-rate`, default 10/s; `--ping-burst`, default 50; 0 turns
  it off): over it the node pauses reading the connection (every ping it reads is still
  answered), and a connection over the limit for 10 s is closed with 1008.

Most scenarios run on one node with the default ping options, so the old code (which had
no ping bucket) starts too and fails on behaviour. Counts are bounded, not times, where
possible; the time bounds are lower bounds (a loaded machine only makes them longer) or
generous upper ones.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import time
from collections.abc import Iterator
from typing import Any

import pytest

from wscluster.embedded import EmbeddedRedis

from .conftest import NodeProc, _make
from .rawframes import CLOSE, PING, PONG, TEXT, client_frame, closed_with, write
from .wsclient import WS

RATE, BURST = 200, 100  # the frame bucket of the shared node
PING_RATE, PING_BURST = 10, 50  # the defaults of --ping-rate and --ping-burst
FLOOD = 5000  # pings written in one TCP write
MASK = b"\x5a\x17\xc3\x08"


@pytest.fixture(scope="module")
def node(valkey: EmbeddedRedis, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProc]:
    """One node with history on every group and a small frame bucket; ping options are the
    defaults (so the old code starts and the ping tests fail on behaviour)."""
    extra = ["--history", "group:*=10/60s", "--rate-limit", str(RATE), "--rate-burst", str(BURST)]
    c = _make(valkey.url, tmp_path_factory.mktemp("flood"), 1, extra)
    yield c.nodes[0]
    c.stop()


def _resume(prefix: str, n: int) -> dict[str, Any]:
    return {"type": "resume", "streams": {f"group:{prefix}-{i}": [None, 0] for i in range(n)}}


def _pings(n: int) -> bytes:
    """n masked WebSocket PING frames, the payload of the i-th being i (4 bytes)."""
    return b"".join(client_frame(i.to_bytes(4, "big"), PING, mask=MASK) for i in range(n))


def _app_pings(n: int) -> bytes:
    return b"".join(
        client_frame(json.dumps({"type": "ping", "id": i}).encode(), mask=MASK) for i in range(n)
    )


class Raw:
    """A WebSocket client on a plain TCP stream: a hand-written handshake and a strict frame
    reader (server frames unmasked, unfragmented, RSV 0), so that it sees every PONG frame
    (the `websockets` library consumes them)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.eof = False

    @classmethod
    async def open(cls, port: int) -> Raw:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        raw = cls(reader, writer)
        try:
            key = base64.b64encode(os.urandom(16)).decode()
            writer.write(
                f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n".encode()
            )
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 101"), head
            magic = hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode())
            assert base64.b64encode(magic.digest()) in head, head
            opcode, payload = await asyncio.wait_for(raw.frame(), 5)
            assert opcode == TEXT and json.loads(payload)["type"] == "welcome", payload
        except BaseException:
            await raw.close()
            raise
        return raw

    def write(self, data: bytes) -> None:
        self.writer.write(data)

    async def frame(self) -> tuple[int, bytes]:
        first, second = await self.reader.readexactly(2)
        assert first & 0xF0 == 0x80, f"fragmented or RSV bits set: {first:#x}"
        assert second & 0x80 == 0, "a masked server frame"
        n = second & 0x7F
        if n == 126:
            n = int.from_bytes(await self.reader.readexactly(2), "big")
        elif n == 127:
            n = int.from_bytes(await self.reader.readexactly(8), "big")
        return first & 0x0F, await self.reader.readexactly(n)

    async def collect(self, seconds: float, until: int | None = None) -> list[tuple[int, bytes]]:
        """The frames received within ``seconds`` (or until ``until`` frames came), stopping
        at a close frame or at EOF (``self.eof``)."""
        got: list[tuple[int, bytes]] = []
        try:
            async with asyncio.timeout(seconds):
                while until is None or len(got) < until:
                    got.append(await self.frame())
                    if got[-1][0] == CLOSE:
                        break
        except TimeoutError:
            pass
        except asyncio.IncompleteReadError:
            self.eof = True
        return got

    async def close(self) -> None:
        self.writer.close()
        try:
            await asyncio.wait_for(self.writer.wait_closed(), 2)
        except (OSError, TimeoutError):
            pass


async def _recv_for(ws: WS, seconds: float, until: int | None = None) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = []
    try:
        async with asyncio.timeout(seconds):
            while until is None or len(got) < until:
                got.append(json.loads(await ws.conn.recv()))
    except TimeoutError:
        pass
    return got


def _abort(ws: WS) -> None:
    if ws.conn.transport is not None:
        ws.conn.transport.abort()


async def _probe(ws: WS, stop: asyncio.Event, lags: list[float]) -> None:
    """Ping every 0.2 s (under the ping rate) until ``stop``; each round trip into ``lags``."""
    while not stop.is_set():
        t = time.monotonic()
        await ws.ok({"type": "ping"}, timeout=10)
        lags.append(time.monotonic() - t)
        try:
            await asyncio.wait_for(stop.wait(), 0.2)
        except TimeoutError:
            pass


async def test_resume_charges_a_token_per_stream(node: NodeProc, unique: str) -> None:
    """A resume of 600 streams with a burst of 100 at 200/s leaves a debt of 500 tokens: it
    is acked, and the connection's next frame is read only ~2.5 s later, while another
    client of the node is served at once."""
    probe = await WS.open(node.ws_url)
    stop, lags = asyncio.Event(), []
    task = asyncio.create_task(_probe(probe, stop, lags))
    try:
        ws = await WS.open(node.ws_url)
        t0 = time.monotonic()
        ack = await ws.request(_resume(unique, 600), timeout=20)
        assert ack["type"] == "ack", ack  # processed, not rate_limited
        assert len(ack["streams"]) == 600
        assert not [s for s, r in ack["streams"].items() if "error" in r], ack
        # the debt is (600 - BURST) / RATE = 2.5 s from when the resume was read
        reply = await ws.request({"type": "presence", "to": f"group:{unique}-0"}, timeout=20)
        waited = time.monotonic() - t0
        # the client waited for its debt (protocol.md: "no `rate_limited`: the client just
        # waits; the frames it sent meanwhile are read later"): it is served
        assert reply["type"] == "ack", f"the frame sent after the resume's ack got {reply}"
        assert reply["count"] == 1
        assert waited > 2.0, f"the frame after the resume was read {waited:.2f} s after it"
        pong = await ws.request({"type": "ping"}, timeout=5)
        assert pong["type"] == "pong"
        assert not [m for m in ws.pushed if m.get("type") == "error"], ws.pushed
    finally:
        stop.set()
        await task
    assert len(lags) >= 5, lags  # the probe kept going during the other client's debt
    assert max(lags) < 1.0, lags


async def test_resume_loop_is_paced_by_the_bucket(node: NodeProc, unique: str) -> None:
    """A client looping resume frames of 500 streams (one after the other's ack) for 3 s
    gets at most 1 + (BURST + RATE * t) / 500 of them acked; a probe is served throughout."""
    n, seconds = 500, 3.0
    probe = await WS.open(node.ws_url)
    stop, lags = asyncio.Event(), []
    task = asyncio.create_task(_probe(probe, stop, lags))
    acked, limited = 0, 0
    try:
        ws = await WS.open(node.ws_url)
        t0 = time.monotonic()
        while time.monotonic() - t0 < seconds:
            reply = await ws.request(_resume(unique, n), timeout=20)
            if reply["type"] == "ack":
                acked += 1
            else:  # tolerated here (test_resume_charges_a_token_per_stream checks it)
                assert reply.get("code") == "rate_limited", reply
                limited += 1
        elapsed = time.monotonic() - t0
    finally:
        stop.set()
        await task
    # every ack but the first needs n tokens refilled (the burst covers part of one);
    # `elapsed` includes the wait for the last answer, and 1 more is slack
    bound = 1 + int((BURST + RATE * elapsed) / n) + 1
    assert 1 <= acked <= bound, f"{acked} resumes of {n} acked in {elapsed:.1f} s (bound {bound})"
    assert len(lags) >= 5, lags
    assert max(lags) < 1.0, lags


async def test_websocket_ping_flood_is_paced(node: NodeProc) -> None:
    """5,000 PING frames in one write: the node answers the ones it reads, in order, but
    reads far fewer than 5,000 in 2 s (burst 50 + 10/s + what one read holds); the
    connection stays open."""
    raw = await Raw.open(node.port)
    try:
        raw.write(_pings(FLOOD))
        got = await raw.collect(2.0)
        pongs = [p for op, p in got if op == PONG]
        assert [op for op, _ in got if op != PONG] == []
        assert 1 <= len(pongs) < 2000, f"{len(pongs)} of {FLOOD} pings answered in 2 s"
        assert pongs == [i.to_bytes(4, "big") for i in range(len(pongs))]
        more = await raw.collect(2.0)  # no close within a few seconds of the flood
        assert CLOSE not in [op for op, _ in more] and not raw.eof
        assert len(pongs) + len(more) < 2000
    finally:
        await raw.close()


async def test_unsolicited_pongs_take_ping_tokens(node: NodeProc) -> None:
    """2,000 unsolicited PONG frames, then an app-level ping: the ping sits behind the
    pongs, which the node reads at the ping rate, so it is not answered within 2 s."""
    raw = await Raw.open(node.port)
    try:
        pongs = b"".join(client_frame(i.to_bytes(4, "big"), PONG, mask=MASK) for i in range(2000))
        raw.write(pongs + client_frame(b'{"type": "ping", "id": "after"}', mask=MASK))
        got = await raw.collect(2.0)
        assert got == [], f"answered within 2 s: {got[:3]}"
        assert not raw.eof
    finally:
        await raw.close()


async def test_app_ping_flood_is_paced(node: NodeProc) -> None:
    """5,000 app-level pings in one write: pongs come in order, far fewer than 5,000 in 2 s,
    and no error (a ping is always answered once read, never rate_limited)."""
    ws = await WS.open(node.ws_url)
    try:
        write(ws, _app_pings(FLOOD))
        got = await _recv_for(ws, 2.0)
        assert 1 <= len(got) < 2000, f"{len(got)} of {FLOOD} pings answered in 2 s"
        assert got == [{"type": "pong", "id": i} for i in range(len(got))]
    finally:
        _abort(ws)  # the node reads nothing more for a while: no closing handshake


async def test_app_ping_flood_all_answered(valkey: EmbeddedRedis, make_cluster: Any) -> None:
    """With --ping-rate 1000 every one of 5,000 app-level pings written at once is answered
    (slowed, not dropped): fewer than all of them within 1 s, all of them eventually."""
    c = make_cluster(valkey.url, 1, ["--ping-rate", "1000", "--ping-burst", "50"])
    ws = await WS.open(c.nodes[0].ws_url)
    write(ws, _app_pings(FLOOD))
    first = await _recv_for(ws, 1.0)
    assert len(first) < 4000, f"{len(first)} of {FLOOD} pings answered in 1 s at 1000/s"
    rest = await _recv_for(ws, 30.0, until=FLOOD - len(first))
    assert first + rest == [{"type": "pong", "id": i} for i in range(FLOOD)]


async def test_staying_over_the_ping_limit_closes_1008(node: NodeProc) -> None:
    """Pings at 50/s against the default 10/s (burst 50): over the limit from ~1.3 s on,
    closed with 1008 "too many pings" about 10 s later. (About 12 s: kept in the suite.)"""
    ws = await WS.open(node.ws_url)
    assert ws.conn.transport is not None
    transport = ws.conn.transport

    async def flood() -> None:
        i = 0
        while not transport.is_closing():
            transport.write(b"".join(client_frame(b"%d" % (i + k,), PING) for k in range(5)))
            i += 5
            await asyncio.sleep(0.1)

    t0 = time.monotonic()
    task = asyncio.create_task(flood())
    try:
        code, reason, _ = await closed_with(ws, timeout=20)
    finally:
        task.cancel()
    elapsed = time.monotonic() - t0
    assert (code, reason) == (1008, "too many pings")
    assert elapsed > 6.0, f"closed {elapsed:.1f} s after the pings started"


async def test_ping_rate_zero_turns_the_bucket_off(
    valkey: EmbeddedRedis, make_cluster: Any
) -> None:
    """--ping-rate 0: 5,000 PING frames and 5,000 app-level pings in one write are all
    answered, in order."""
    c = make_cluster(valkey.url, 1, ["--ping-rate", "0"])
    raw = await Raw.open(c.nodes[0].port)
    try:
        raw.write(_pings(FLOOD) + _app_pings(FLOOD))
        got = await raw.collect(20.0, until=2 * FLOOD)
        pongs = [p for op, p in got if op == PONG]
        texts = [json.loads(p) for op, p in got if op == TEXT]
        assert pongs == [i.to_bytes(4, "big") for i in range(FLOOD)]
        assert texts == [{"type": "pong", "id": i} for i in range(FLOOD)]
    finally:
        await raw.close()
