"""A receiver whose socket is backed up (issue 13, item 1): when the node cannot write a
frame at once, what it keeps for later must still go out byte for byte. The receiver is a
hand-made WebSocket client on a socket with a small SO_RCVBUF (set before connect) that stops
reading while another user sends it messages of 1 KB to 1 MB, then reads the whole stream with
a strict frame parser: every message intact, in order, none missing, or (past --max-outbox)
the messages in order then a clean close 1013 "slow consumer"; never a garbled frame.

The old failure: picows' ``transport.send`` of a frame over 8 KiB hands uvloop a memoryview
of its shared write buffer for the header; when the socket is full uvloop keeps that view,
and the next send overwrites the header: a frame of the wrong length, then garbage parsed as
frames (invalid JSON, a close with a code read out of payload bytes)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import random
import re
import socket
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from wscluster.embedded import EmbeddedRedis

from .conftest import Cluster
from .rawframes import client_frame
from .wsclient import WS

TEXT, CLOSE, PING = 0x1, 0x8, 0x9
LIMITS = ["--max-message-size", "2097152", "--max-frame-size", "2097152"]
BIG_OUTBOX = 64 * 1024 * 1024  # above every case's total: no slow-consumer close
SMALL_OUTBOX = 256 * 1024  # above the transport's 64 KiB high-water mark
STALL = 1.0  # seconds the receiver does not read, after the last message was accepted
READ_TIMEOUT = 60.0

# (case, smallest and largest data size, messages, messages sent per ack). Past 1 KB each case
# sends more than the socket buffers on both sides hold (the node's send buffer grows to 4 MB),
# so the node has frames waiting in its transport when it writes the next ones, one per turn;
# frame sizes vary (a header overwritten by an identical one would go unnoticed).
SIZES = [
    ("1k", 1_000, 1_100, 2000, 25),
    ("9k", 9_000, 9_500, 750, 1),
    ("30-60k", 30_000, 60_000, 150, 1),
    ("200k", 190_000, 210_000, 35, 1),
    ("1m", 950_000, 1_050_000, 8, 1),
]
ISSUE_CASE = ("30-60k", 4096, 72)  # the issue's repro: 72 messages of 30-60 KB, 4 KB buffer
RCVBUFS = [4096, 16384, 65536, 262144]


def expected_data(tag: str, i: int, size: int) -> str:
    """Message ``i`` of a case: its number, then a pattern that depends on the case and on
    ``i`` (so a frame cut, shifted or swapped with another does not compare equal)."""
    pattern = hashlib.sha256(f"{tag}:{i}".encode()).hexdigest()
    head = f"{i:06d}:"
    return (head + pattern * (size // len(pattern) + 1))[:size]


def case_sizes(tag: str, lo: int, hi: int, k: int) -> list[int]:
    rng = random.Random(tag)
    return [rng.randint(lo, hi) for _ in range(k)]


class StreamError(AssertionError):
    """The node's byte stream is not a valid sequence of server frames."""


class SlowReceiver:
    """A WebSocket client written by hand on a raw socket: it reads only when told to, and
    parses what it reads strictly (RFC 6455 5.2, server side)."""

    opened: list[SlowReceiver] = []

    def __init__(self, sock: socket.socket, max_payload: int) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.max_payload = max_payload  # a longer frame can only be a garbled header
        self.frames = 0  # frames parsed so far (for the error messages)
        self.offset = 0  # stream offset of the next frame
        SlowReceiver.opened.append(self)

    @classmethod
    async def open(cls, port: int, rcvbuf: int, max_payload: int) -> SlowReceiver:
        sock = socket.socket()
        receiver = cls(sock, max_payload)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # before the window
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_connect(sock, ("127.0.0.1", port))
        key = base64.b64encode(os.urandom(16))
        await loop.sock_sendall(
            sock,
            b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: " + key + b"\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n",
        )
        async with asyncio.timeout(10):
            while b"\r\n\r\n" not in receiver.buf:
                await receiver._fill(len(receiver.buf) + 1)
        head, _, rest = bytes(receiver.buf).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head
        guid = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
        accept = base64.b64encode(hashlib.sha1(key + guid).digest())
        assert re.search(rb"(?im)^sec-websocket-accept: *" + re.escape(accept) + rb"\r?$", head)
        receiver.buf = bytearray(rest)
        async with asyncio.timeout(10):
            welcome = await receiver.text()
        assert welcome["type"] == "welcome", welcome
        return receiver

    async def _fill(self, n: int) -> None:
        loop = asyncio.get_running_loop()
        while len(self.buf) < n:
            data = await loop.sock_recv(self.sock, 1 << 18)
            if not data:
                raise StreamError(
                    f"EOF after {self.frames} frames, {len(self.buf)} bytes of a partial frame"
                )
            self.buf += data

    def _fail(self, what: str) -> StreamError:
        head = bytes(self.buf[:16]).hex(" ")
        return StreamError(f"frame {self.frames} at byte {self.offset}: {what} (head {head})")

    async def frame(self) -> tuple[int, bytes]:
        """The next frame (opcode, payload); StreamError if it is not a valid server frame."""
        await self._fill(2)
        b0, b1 = self.buf[0], self.buf[1]
        opcode, size, head = b0 & 0x0F, b1 & 0x7F, 2
        if not b0 & 0x80:
            raise self._fail("FIN not set")
        if b0 & 0x70:
            raise self._fail("RSV bits set")
        if opcode not in (TEXT, CLOSE, PING):
            raise self._fail(f"unexpected opcode {opcode:#x}")
        if b1 & 0x80:
            raise self._fail("masked server frame")
        if size == 126:
            await self._fill(4)
            size, head = int.from_bytes(self.buf[2:4], "big"), 4
            if size < 126:
                raise self._fail(f"length {size} not in its minimal encoding")
        elif size == 127:
            await self._fill(10)
            size, head = int.from_bytes(self.buf[2:10], "big"), 10
            if size < 65536:
                raise self._fail(f"length {size} not in its minimal encoding")
        if opcode != TEXT and (size > 125 or head != 2):
            raise self._fail(f"control frame of {size} bytes")
        if size > self.max_payload:
            raise self._fail(f"length {size} over any frame sent ({self.max_payload})")
        await self._fill(head + size)
        payload = bytes(self.buf[head : head + size])
        del self.buf[: head + size]
        self.frames += 1
        self.offset += head + size
        return opcode, payload

    async def text(self) -> dict[str, Any]:
        """The next frame, which must be a text frame of a JSON object (pings skipped)."""
        while True:
            opcode, payload = await self.frame()
            if opcode == PING:
                continue
            if opcode != TEXT:
                raise StreamError(f"frame {self.frames}: opcode {opcode}, not text: {payload!r}")
            return decode(payload, self.frames)

    async def send(self, frame: dict[str, Any]) -> None:
        data = client_frame(json.dumps(frame).encode(), mask=os.urandom(4))
        await asyncio.get_running_loop().sock_sendall(self.sock, data)

    async def request(self, frame: dict[str, Any]) -> dict[str, Any]:
        await self.send(frame)
        async with asyncio.timeout(10):
            while True:
                reply = await self.text()
                if reply.get("id") == frame["id"]:
                    return reply

    async def login(self, uid: str) -> None:
        reply = await self.request({"type": "login", "uid": uid, "id": "login"})
        assert reply["type"] == "ack", reply

    async def after_close(self) -> bytes:
        """What the node sends after its close frame, until it drops the link."""
        rest = bytes(self.buf)
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(15):
                while data := await loop.sock_recv(self.sock, 65536):
                    rest += data
        except ConnectionResetError:
            pass
        return rest

    @classmethod
    def close_all(cls) -> None:
        opened, cls.opened = cls.opened, []
        for receiver in opened:
            receiver.sock.close()


def decode(payload: bytes, n: int) -> dict[str, Any]:
    try:
        frame = json.loads(payload.decode("utf-8"))
    except ValueError as exc:  # UnicodeDecodeError is one
        raise StreamError(
            f"frame {n}: a text frame of {len(payload)} bytes that is not UTF-8 JSON ({exc}): "
            f"{payload[:60]!r}...{payload[-20:]!r}"
        ) from None
    if not isinstance(frame, dict):
        raise StreamError(f"frame {n}: not a JSON object: {payload[:60]!r}")
    return frame


@pytest.fixture(autouse=True)
def _close_receivers() -> Iterator[None]:
    yield
    SlowReceiver.close_all()


def _node(valkey: EmbeddedRedis, tmp: pytest.TempPathFactory, outbox: int) -> Iterator[Cluster]:
    extra = [*LIMITS, "--max-outbox", str(outbox)]
    c = Cluster(valkey.url, 1, tmp.mktemp("slow"), extra)
    try:
        c.start()
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def node(valkey: EmbeddedRedis, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """One node for the whole matrix, with an outbox no case fills."""
    yield from _node(valkey, tmp_path_factory, BIG_OUTBOX)


@pytest.fixture(scope="module")
def small_outbox_node(
    valkey: EmbeddedRedis, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    """A node whose outbox the slow receiver fills: it closes it 1013."""
    yield from _node(valkey, tmp_path_factory, SMALL_OUTBOX)


async def closes_1013(api_url: str) -> float:
    async with aiohttp.ClientSession() as http, http.get(f"{api_url}/metrics") as r:
        text = await r.text()
    m = re.search(r'^wscluster_server_closes_total\{code="1013"\} (\S+)$', text, re.MULTILINE)
    return float(m[1]) if m else 0.0


async def send_all(sender: WS, to: str, tag: str, sizes: list[int], window: int) -> None:
    """Send the case's messages in order, waiting for an ack every ``window`` messages:
    with 1, a user typing rather than a burst (the node delivers them one per turn, each
    frame written alone); with more, the node also writes several frames in one go."""
    for i, size in enumerate(sizes):
        frame = {"type": "send", "to": to, "data": expected_data(tag, i, size)}
        if (i + 1) % window and i + 1 < len(sizes):
            await sender.send_raw(json.dumps(frame))
        else:
            await sender.ok(frame, timeout=30)


async def read_stream(
    receiver: SlowReceiver, to: str, tag: str, sizes: list[int]
) -> tuple[int, tuple[int, str] | None]:
    """Read and check every message, in order; stop after the last one or at a close frame.
    (messages received, (close code, reason) or None)."""
    i = 0
    async with asyncio.timeout(READ_TIMEOUT):
        while i < len(sizes):
            opcode, payload = await receiver.frame()
            if opcode == PING:
                continue
            if opcode == CLOSE:
                if len(payload) < 2:
                    raise StreamError(f"after {i} messages: a close frame of {payload!r}")
                try:
                    reason = payload[2:].decode("utf-8")
                except UnicodeDecodeError:
                    raise StreamError(f"after {i} messages: close reason {payload!r}") from None
                return i, (int.from_bytes(payload[:2], "big"), reason)
            msg = decode(payload, receiver.frames)
            if msg.get("type") != "message" or msg.get("to") != to:
                raise StreamError(f"after {i} messages: not one of them: {payload[:80]!r}")
            data = msg.get("data")
            if data != expected_data(tag, i, sizes[i]):
                got = data[:7] if isinstance(data, str) else type(data).__name__
                size = len(data) if isinstance(data, str) else "?"
                raise StreamError(f"message {i} expected, got {got!r} ({size} chars)")
            i += 1
    return i, None


def _cases() -> list[Any]:
    cases = []
    for name, lo, hi, k, window in SIZES:
        for rcvbuf in RCVBUFS:
            n = ISSUE_CASE[2] if (name, rcvbuf) == ISSUE_CASE[:2] else k
            case = f"{name}-x{n}-rcvbuf{rcvbuf}"
            cases.append(pytest.param(lo, hi, n, window, rcvbuf, id=case))
    return cases


@pytest.mark.parametrize(("lo", "hi", "k", "window", "rcvbuf"), _cases())
async def test_slow_receiver_gets_every_frame_intact(
    node: Cluster, unique: str, lo: int, hi: int, k: int, window: int, rcvbuf: int
) -> None:
    tag, to = f"{unique}-{lo}-{rcvbuf}", f"uid:r{unique}"
    sizes = case_sizes(tag, lo, hi, k)
    receiver = await SlowReceiver.open(node.nodes[0].port, rcvbuf, hi + 1024)
    await receiver.login(f"r{unique}")
    sender = await WS.open(node.ws_urls[0], f"s{unique}")
    await send_all(sender, to, tag, sizes, window)  # the receiver reads nothing meanwhile
    await asyncio.sleep(STALL)

    got, closed = await read_stream(receiver, to, tag, sizes)
    assert closed is None, f"closed {closed} after {got} of {k} messages"
    assert got == k
    # the stream is still in sync after them: a request gets its answer
    assert (await receiver.request({"type": "ping", "id": 2}))["type"] == "pong"


@pytest.mark.parametrize(
    ("lo", "hi", "k", "rcvbuf"),
    [
        pytest.param(30_000, 60_000, 200, 4096, id="30-60k-rcvbuf4096"),
        pytest.param(190_000, 210_000, 40, 65536, id="200k-rcvbuf65536"),
    ],
)
async def test_slow_receiver_over_the_outbox_is_closed_1013_cleanly(
    small_outbox_node: Cluster, unique: str, lo: int, hi: int, k: int, rcvbuf: int
) -> None:
    node = small_outbox_node
    tag, to = f"{unique}-{lo}-{rcvbuf}", f"uid:r{unique}"
    sizes = case_sizes(tag, lo, hi, k)
    closes = await closes_1013(node.api_urls[0])
    receiver = await SlowReceiver.open(node.nodes[0].port, rcvbuf, hi + 1024)
    await receiver.login(f"r{unique}")
    sender = await WS.open(node.ws_urls[0], f"s{unique}")
    sending = asyncio.create_task(send_all(sender, to, tag, sizes, 1))
    try:
        # read as soon as the node closed it (it drops the link 2 s after its close frame;
        # what the socket buffers and the outbox hold takes well under that to read)
        async with asyncio.timeout(30):
            while await closes_1013(node.api_urls[0]) <= closes:
                if sending.done():
                    sending.result()  # raises if the sender failed
                await asyncio.sleep(0.05)
    finally:
        sending.cancel()  # the rest would not be delivered anyway

    got, closed = await read_stream(receiver, to, tag, sizes)
    assert closed == (1013, "slow consumer"), f"after {got} of {k} messages"
    assert 0 < got < k  # what the socket buffers took came first, intact and in order
    rest = await receiver.after_close()
    assert rest == b"", f"{len(rest)} bytes after the close frame: {rest[:40]!r}"
