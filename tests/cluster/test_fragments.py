"""The memory a connection can pin with its messages (issue 13, item 4): a fragmented
message is refused as soon as its total passes --max-message-size (core: an error frame
``too_large``, the rest of it discarded, the connection kept; raw: close 1009), an unfinished
one is closed with 1008 after --fragment-timeout seconds (0: never), and a single frame over
--max-frame-size (256 KiB by default) closes 1009.

Module nodes: one core and one raw node with default options, one of each with
``--fragment-timeout 1``; the test of ``--fragment-timeout 0`` starts its own."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from wscluster.embedded import EmbeddedRedis

from .conftest import Cluster
from .rawframes import (
    CONTINUATION,
    MODES,
    TEXT,
    alive,
    chunks,
    client_frame,
    closed_in,
    closed_with,
    connect,
    message_frames,
    recv_data,
    start_modes,
    stop_modes,
    write,
)
from .wsclient import WS

MakeCluster = Callable[..., Cluster]
MAX_MESSAGE = 65536  # the default --max-message-size
MAX_FRAME = 262144  # the default --max-frame-size


@pytest.fixture(scope="module")
def nodes(valkey: EmbeddedRedis, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    started = start_modes(valkey.url, tmp_path_factory)
    yield started
    stop_modes(started)


@pytest.fixture(scope="module")
def timeout_nodes(valkey: EmbeddedRedis, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    started = start_modes(valkey.url, tmp_path_factory, ["--fragment-timeout", "1"])
    yield started
    stop_modes(started)


@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def _open(nodes: dict[str, Cluster], mode: str, uid: str | None = None) -> WS:
    ws = await connect(nodes[mode].ws_urls[0], raw=mode == "raw")
    if uid is not None:
        await ws.ok({"type": "login", "uid": uid})
    return ws


async def _closed(ws: WS, mode: str, timeout: float = 10.0) -> tuple[int | None, list[Any]]:
    return await closed_in(mode, ws, timeout)


def _send(uid: str, frame_id: str, data: str) -> bytes:
    """A core ``send`` to the connection's own uid, as bytes."""
    return json.dumps({"type": "send", "id": frame_id, "to": f"uid:{uid}", "data": data}).encode()


def _sized_send(uid: str, frame_id: str, size: int) -> bytes:
    """A ``send`` frame of exactly ``size`` bytes."""
    bare = len(_send(uid, frame_id, ""))
    payload = _send(uid, frame_id, "x" * (size - bare))
    assert len(payload) == size
    return payload


async def _delivered(ws: WS, uid: str, frame_id: str, data: str) -> None:
    """A normal ``send`` to the own uid is acked and comes back."""
    await ws.send_raw(_send(uid, frame_id, data).decode())
    assert await ws.reply(frame_id, timeout=10) == {"type": "ack", "id": frame_id}
    assert (await ws.next(10, type="message"))["data"] == data


def _errors(ws: WS) -> list[dict[str, Any]]:
    return [f for f in ws.pushed if f.get("type") == "error"]


# --- a fragmented message over --max-message-size -----------------------------------------
async def test_fragmented_message_over_the_limit_is_too_large_at_once_and_discarded(
    nodes: dict[str, Cluster], unique: str
) -> None:
    """Core: the error comes when the total passes the limit (before the last fragment),
    with id null; the last fragments are dropped (no answer, no close), and the connection
    goes on: twice in a row, then a ping and a normal send."""
    uid = f"u{unique}"
    ws = await _open(nodes, "core", uid)
    parts = chunks(_send(uid, "big", "y" * 120_000), 40_000)  # 40 KB, 80 KB: over; 120 KB
    assert len(parts) == 4
    for _ in range(2):
        write(ws, message_frames(parts[:2], fin=False))
        error = await ws.next(10, type="error")
        assert (error["code"], error["id"]) == ("too_large", None), error
        write(ws, client_frame(parts[2], CONTINUATION, fin=False))
        write(ws, client_frame(parts[3], CONTINUATION))
    assert await ws.request({"type": "ping", "id": "after"}, 10) == {"type": "pong", "id": "after"}
    await _delivered(ws, uid, "small", "small")
    await ws.nothing(0.5, type="error")
    await ws.nothing(0.1, type="message")  # the big ones were never sent
    assert _errors(ws) == []


async def test_fragmented_message_at_the_limit_passes_one_byte_over_does_not(
    nodes: dict[str, Cluster], unique: str
) -> None:
    uid = f"u{unique}"
    ws = await _open(nodes, "core", uid)
    at_limit = _sized_send(uid, "edge", MAX_MESSAGE)
    write(ws, message_frames(chunks(at_limit, 30_000)))
    assert await ws.reply("edge", timeout=10) == {"type": "ack", "id": "edge"}
    assert len((await ws.next(10, type="message"))["data"]) > 65_000

    over = _sized_send(uid, "over", MAX_MESSAGE + 1)
    write(ws, message_frames(chunks(over, 30_000)))
    error = await ws.next(10, type="error")
    assert (error["code"], error["id"]) == ("too_large", None), error
    await ws.nothing(0.3, type="message")
    await alive(ws, "core")


async def test_raw_fragmented_message_over_the_limit_closes_1009(
    nodes: dict[str, Cluster],
) -> None:
    """Raw: the same message closes 1009, as soon as the limit is passed."""
    ws = await _open(nodes, "raw")
    parts = chunks(b"z" * 120_000, 40_000)
    write(ws, message_frames(parts[:2], fin=False))  # 80 KB, unfinished
    code, before = await _closed(ws, "raw")
    assert (code, before) == (1009, [])


async def test_raw_fragmented_message_at_the_limit_is_echoed(nodes: dict[str, Cluster]) -> None:
    ws = await _open(nodes, "raw")
    text = "é" * (MAX_MESSAGE // 2)  # 65536 bytes; each cut (odd) splits a character
    assert len(text.encode()) == MAX_MESSAGE
    write(ws, message_frames(chunks(text.encode(), 30_001)))
    assert await recv_data(ws, 10) == "text:" + text
    await alive(ws, "raw")


# --- a single frame: --max-frame-size -----------------------------------------------------
@pytest.mark.parametrize("size", [100_000, MAX_FRAME])
async def test_a_frame_under_the_frame_limit_is_too_large_and_kept(
    nodes: dict[str, Cluster], unique: str, size: int
) -> None:
    uid = f"u{unique}"
    ws = await _open(nodes, "core", uid)
    write(ws, client_frame(_sized_send(uid, "f", size)))
    error = await ws.next(10, type="error")
    assert error["code"] == "too_large", error
    await ws.nothing(0.3, type="message")
    await _delivered(ws, uid, "small", "small")


@pytest.mark.parametrize("size", [MAX_FRAME + 1, 300_000])
async def test_a_frame_over_the_default_frame_limit_closes_1009(
    nodes: dict[str, Cluster], mode: str, unique: str, size: int
) -> None:
    uid = f"u{unique}"
    ws = await _open(nodes, mode, uid if mode == "core" else None)
    write(ws, client_frame(_sized_send(uid, "f", size)))
    code, before = await _closed(ws, mode)
    assert (code, before) == (1009, [])


# --- --fragment-timeout -------------------------------------------------------------------
async def test_an_unfinished_message_is_closed_1008_after_the_fragment_timeout(
    timeout_nodes: dict[str, Cluster], mode: str
) -> None:
    ws = await _open(timeout_nodes, mode)
    t0 = time.monotonic()
    write(ws, client_frame(b'{"type": "ping", "id": "half"', TEXT, fin=False))
    code, before = await _closed(ws, mode, timeout=15)
    assert (code, before) == (1008, [])
    assert time.monotonic() - t0 >= 0.5  # not at once: the timeout is 1 s


async def test_trickled_fragments_do_not_extend_the_fragment_timeout(
    timeout_nodes: dict[str, Cluster], mode: str
) -> None:
    """One small fragment every 0.2 s, for up to 10 s: the message is still closed (the
    timeout counts from its first fragment, not from the last one)."""
    ws = await _open(timeout_nodes, mode)
    closed = asyncio.ensure_future(_closed(ws, mode, timeout=15))
    transport = ws.conn.transport
    assert transport is not None
    write(ws, client_frame(b'{"type": "ping", "id": "slow", "x": "', TEXT, fin=False))
    deadline = time.monotonic() + 10
    while not closed.done() and not transport.is_closing() and time.monotonic() < deadline:
        write(ws, client_frame(b"x", CONTINUATION, fin=False))
        await asyncio.sleep(0.2)
    code, before = await closed
    assert (code, before) == (1008, [])


async def test_messages_finished_in_time_are_not_closed(
    timeout_nodes: dict[str, Cluster], mode: str, unique: str
) -> None:
    """Fragmented messages that end within the timeout: delivered, and the connection is not
    closed later by a timer left over from them."""
    uid = f"u{unique}"
    ws = await _open(timeout_nodes, mode, uid if mode == "core" else None)
    for n in range(2):
        data = f"fragmented {n} é"
        payload = _send(uid, f"m{n}", data) if mode == "core" else data.encode()
        first, second = payload[: len(payload) // 2], payload[len(payload) // 2 :]
        write(ws, client_frame(first, TEXT, fin=False))
        await asyncio.sleep(0.4)
        write(ws, client_frame(second, CONTINUATION))
        if mode == "core":
            assert await ws.reply(f"m{n}", timeout=10) == {"type": "ack", "id": f"m{n}"}
            assert (await ws.next(10, type="message"))["data"] == data
        else:
            assert await recv_data(ws, 10) == f"text:{data}"
        await asyncio.sleep(0.9)  # 1.3 s after this message started
    await asyncio.sleep(1.0)
    await alive(ws, mode)


async def test_fragment_timeout_0_keeps_an_unfinished_message_open(
    valkey: EmbeddedRedis, make_cluster: MakeCluster, unique: str
) -> None:
    """``--fragment-timeout 0``: no timer; 11 s (past the default of 10) with half a message
    sent, then its end: the message is taken."""
    cluster = make_cluster(valkey.url, 1, ["--fragment-timeout", "0"])
    uid = f"u{unique}"
    ws = await WS.open(cluster.ws_urls[0], uid=uid)
    payload = _send(uid, "late", "late é")
    write(ws, client_frame(payload[:25], TEXT, fin=False))
    with pytest.raises(TimeoutError):
        await closed_with(ws, timeout=11)
    write(ws, client_frame(payload[25:], CONTINUATION))
    assert await ws.reply("late", timeout=10) == {"type": "ack", "id": "late"}
    assert (await ws.next(10, type="message"))["data"] == "late é"
