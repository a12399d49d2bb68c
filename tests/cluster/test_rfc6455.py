"""RFC 6455 conformance of the public port (issue 13, item 6), in core mode and in raw mode
(tests/cluster/apps/rawecho.py), with hand-made frames (rawframes.py): reserved bits,
fragmentation, UTF-8 of text messages, close codes, pings. A frame that breaks the RFC
fails the connection: the server's close frame comes instead of any answer to it.

One core node and one raw node, default options, shared by the module."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from wscluster.embedded import EmbeddedRedis

from .conftest import Cluster
from .rawframes import (
    BINARY,
    CLOSE,
    CONTINUATION,
    MODES,
    PING,
    TEXT,
    alive,
    chunks,
    client_frame,
    close_frame,
    closed_in,
    connect,
    message_frames,
    recv_data,
    start_modes,
    stop_modes,
    write,
)
from .wsclient import WS

PING_JSON = b'{"type": "ping", "id": "p"}'  # core: a pong; raw: an echo


@pytest.fixture(scope="module")
def nodes(valkey: EmbeddedRedis, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    started = start_modes(valkey.url, tmp_path_factory)
    yield started
    stop_modes(started)


@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def _open(nodes: dict[str, Cluster], mode: str) -> WS:
    return await connect(nodes[mode].ws_urls[0], raw=mode == "raw")


async def _closed(ws: WS, mode: str, timeout: float = 6.0) -> tuple[int | None, list[Any]]:
    """The server's close code and the frames that came before it."""
    return await closed_in(mode, ws, timeout)


# --- reserved bits ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("frames", "rsv"),
    [
        ("text", 4), ("text", 2), ("text", 1), ("binary", 4), ("continuation", 2),
        ("ping", 4), ("ping", 1), ("close", 4),
    ],
)  # fmt: skip
async def test_a_frame_with_a_reserved_bit_closes_1002(
    nodes: dict[str, Cluster], mode: str, frames: str, rsv: int
) -> None:
    """No extension is ever negotiated: RSV1-3 must be 0 on every frame, data or control."""
    ws = await _open(nodes, mode)
    data = {
        "text": client_frame(PING_JSON, TEXT, rsv=rsv),
        "binary": client_frame(b"\x00bin", BINARY, rsv=rsv),
        "continuation": client_frame(PING_JSON[:10], TEXT, fin=False)
        + client_frame(PING_JSON[10:], CONTINUATION, rsv=rsv),
        "ping": client_frame(b"rsv", PING, rsv=rsv),
        "close": client_frame((4000).to_bytes(2, "big"), CLOSE, rsv=rsv),
    }[frames]
    write(ws, data)
    code, before = await _closed(ws, mode)
    assert (code, before) == (1002, [])


# --- fragmentation ------------------------------------------------------------------------
@pytest.mark.parametrize("fin", [True, False])
async def test_a_continuation_with_nothing_to_continue_closes_1002(
    nodes: dict[str, Cluster], mode: str, fin: bool
) -> None:
    ws = await _open(nodes, mode)
    await alive(ws, mode)  # a whole message before: nothing is left open
    write(ws, client_frame(PING_JSON, CONTINUATION, fin=fin))
    code, before = await _closed(ws, mode)
    assert (code, before) == (1002, [])


@pytest.mark.parametrize("opcode", [TEXT, BINARY])
async def test_a_new_message_inside_a_fragmented_one_closes_1002(
    nodes: dict[str, Cluster], mode: str, opcode: int
) -> None:
    ws = await _open(nodes, mode)
    write(ws, client_frame(b'{"type": ', TEXT, fin=False) + client_frame(PING_JSON, opcode))
    code, before = await _closed(ws, mode)
    assert (code, before) == (1002, [])


async def test_pings_between_fragments_are_answered_and_the_message_kept(
    nodes: dict[str, Cluster], mode: str
) -> None:
    """Control frames may come between the fragments of a message (RFC 6455 5.4)."""
    ws = await _open(nodes, mode)
    write(ws, client_frame(PING_JSON[:7], TEXT, fin=False))
    pong = await ws.conn.ping(b"between")
    await asyncio.wait_for(pong, 10)
    write(ws, client_frame(PING_JSON[7:15], CONTINUATION, fin=False))
    write(ws, client_frame(b"", PING) + client_frame(PING_JSON[15:], CONTINUATION))
    if mode == "core":
        assert await ws.reply("p", timeout=10) == {"type": "pong", "id": "p"}
    else:
        assert await recv_data(ws, 10) == "text:" + PING_JSON.decode()
    await alive(ws, mode)


# --- UTF-8 --------------------------------------------------------------------------------
BAD_UTF8 = {
    "ff": b"\xff",
    "lone continuation": b"\x80",
    "overlong": b"\xc0\xaf",
    "surrogate": b"\xed\xa0\x80",
    "over U+10FFFF": b"\xf4\x90\x80\x80",
    "bad continuation": b"\xe2\x28\xa1",
    "truncated at the end": b"\xe2\x82",
}


@pytest.mark.parametrize("bad", BAD_UTF8.values(), ids=BAD_UTF8.keys())
async def test_invalid_utf8_in_a_text_frame_closes_1007(
    nodes: dict[str, Cluster], mode: str, bad: bytes
) -> None:
    ws = await _open(nodes, mode)
    tail = b"" if bad == BAD_UTF8["truncated at the end"] else b'"}'
    write(ws, client_frame(b'{"type": "ping", "id": "u", "x": "' + bad + tail))
    code, before = await _closed(ws, mode)
    assert (code, before) == (1007, [])


@pytest.mark.parametrize(
    "first", [b"\xff", b"\x80", b'{"type": "ping", "x": "\xc3\x28'], ids=["ff", "80", "c3-28"]
)
async def test_invalid_utf8_closes_1007_as_soon_as_its_fragment_arrives(
    nodes: dict[str, Cluster], mode: str, first: bytes
) -> None:
    """A first, non-final fragment with an invalid byte, and nothing after it: the close
    comes without waiting for the rest of the message."""
    ws = await _open(nodes, mode)
    write(ws, client_frame(first, TEXT, fin=False))
    code, before = await _closed(ws, mode)
    assert (code, before) == (1007, [])


@pytest.mark.parametrize(
    "parts",
    [
        [b'{"type": "ping", "x": "\xe2\x82', b""],  # ends inside a character
        [b'{"type": "ping", "x": "\xe2', b'\x28"}'],  # the next fragment breaks it
        [b'{"type": "ping", "x": "\xf0\x9f', b"\x98", b'\xff"}'],
    ],
    ids=["truncated", "broken-by-next", "broken-by-third"],
)
async def test_invalid_utf8_across_fragments_closes_1007(
    nodes: dict[str, Cluster], mode: str, parts: list[bytes]
) -> None:
    ws = await _open(nodes, mode)
    write(ws, message_frames(parts))
    code, before = await _closed(ws, mode)
    assert (code, before) == (1007, [])


TEXT_WITH_WIDE_CHARS = "héllo € 😀 中文 ü ॐ 𝄞 end"


@pytest.mark.parametrize("size", [1, 2, 3, 5])
async def test_valid_utf8_split_inside_characters_is_accepted(
    nodes: dict[str, Cluster], mode: str, unique: str, size: int
) -> None:
    """Fragments of 1, 2, 3 or 5 bytes: the multi-byte characters (2, 3 and 4 bytes) are cut
    at every place; the message is still whole and valid."""
    ws = await _open(nodes, mode)
    if mode == "core":
        uid = f"u{unique}"
        await ws.ok({"type": "login", "uid": uid})
        send = {"type": "send", "id": "split", "to": f"uid:{uid}", "data": TEXT_WITH_WIDE_CHARS}
        payload = json.dumps(send, ensure_ascii=False).encode()
        assert len(payload) > len(json.dumps(send, ensure_ascii=False))  # multi-byte in it
        write(ws, message_frames(chunks(payload, size)))
        assert await ws.reply("split", timeout=10) == {"type": "ack", "id": "split"}
        message = await ws.next(10, type="message")
        assert message["data"] == TEXT_WITH_WIDE_CHARS
    else:
        write(ws, message_frames(chunks(TEXT_WITH_WIDE_CHARS.encode(), size)))
        assert await recv_data(ws, 10) == "text:" + TEXT_WITH_WIDE_CHARS
    await alive(ws, mode)


async def test_valid_utf8_that_is_not_json_is_still_bad_json(nodes: dict[str, Cluster]) -> None:
    ws = await _open(nodes, "core")
    for parts in ([b"h\xc3\xa9llo, not json"], [b"h\xc3", b"\xa9llo, not json \xe2\x82", b"\xac"]):
        write(ws, message_frames(parts))
        error = await ws.next(10, type="error")
        assert (error["code"], error["id"]) == ("bad_json", None)
    await alive(ws, "core")


# --- close frames -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("sent", "answered"),
    [
        (0, 1002), (1006, 1002), (5000, 1002), (65535, 1002),
        (None, 1000), (1000, 1000), (1001, 1001), (3000, 3000), (4999, 4999),
    ],
)  # fmt: skip
async def test_close_codes_are_echoed_or_refused(
    nodes: dict[str, Cluster], mode: str, sent: int | None, answered: int
) -> None:
    """A valid code is echoed; an empty close is answered 1000; a code no endpoint may send
    (0, 1006, over 4999) is a protocol error."""
    ws = await _open(nodes, mode)
    write(ws, close_frame(sent))
    code, before = await _closed(ws, mode)
    assert (code, before) == (answered, [])


# --- pings --------------------------------------------------------------------------------
@pytest.mark.parametrize("payload", [b"", b"hello", bytes(range(125))], ids=["0", "5", "125"])
async def test_pings_with_payload_get_the_same_payload_back(
    nodes: dict[str, Cluster], mode: str, payload: bytes
) -> None:
    ws = await _open(nodes, mode)
    for i in range(3):
        data = payload[:-1] + bytes([i]) if payload else payload
        pong = await ws.conn.ping(data)  # done when a pong with exactly `data` arrives
        latency = await asyncio.wait_for(pong, 10)
        assert latency >= 0
    await alive(ws, mode)


# --- HTTP ---------------------------------------------------------------------------------
async def test_post_on_the_public_port_is_400(nodes: dict[str, Cluster]) -> None:
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{nodes['core'].nodes[0].http_url}/", data=b"x") as r,
    ):
        assert r.status == 400
