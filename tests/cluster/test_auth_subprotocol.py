"""The JWT in the WebSocket subprotocol, against a real node: a browser cannot set headers,
and a token in the URL lands in access logs, so it offers ``["wscluster.v1",
"bearer.<JWT>"]``; the node selects ``wscluster.v1`` and never echoes the token. ``?token=``
and ``Authorization: Bearer`` keep working."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time
import uuid
from collections.abc import Iterator
from typing import Any

import aiohttp
import jwt
import pytest
import websockets
from websockets.exceptions import InvalidStatus
from websockets.typing import Subprotocol

from wscluster.embedded import EmbeddedRedis

from .conftest import NodeProc
from .wsclient import WS

SECRET = "subprotocol-test-secret-0123456789abcdef"
V1 = "wscluster.v1"


def token(sub: str, ttl: float = 60) -> str:
    now = int(time.time())
    return jwt.encode({"sub": sub, "iat": now, "exp": now + int(ttl)}, SECRET, algorithm="HS256")


@pytest.fixture(scope="module")
def node(valkey: EmbeddedRedis, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProc]:
    tmp = tmp_path_factory.mktemp("subprotocol")
    ns = ["--broker", valkey.url, "--namespace", f"t{uuid.uuid4().hex[:10]}"]
    proc = NodeProc(0, [*ns, "--jwt-secret", SECRET], tmp)
    proc.start()
    try:
        yield proc
    finally:
        proc.kill()


async def raw_handshake(port: int, protocols: list[str], query: str = "") -> bytes:
    """The node's whole answer to a handshake written by hand (one Sec-WebSocket-Protocol line
    per entry of ``protocols``), up to the end of its headers."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [f"GET /ws{query} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Upgrade: websocket",
             "Connection: Upgrade", f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13",
             *(f"Sec-WebSocket-Protocol: {p}" for p in protocols)]  # fmt: skip
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        if not head.startswith(b"HTTP/1.1 101"):  # a refusal has a body: read it all
            head += await asyncio.wait_for(reader.read(), 10)
        return head
    finally:
        writer.close()


def header_lines(response: bytes, name: str) -> list[str]:
    lines = response.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")[1:]
    return [v.strip() for n, _, v in (line.partition(":") for line in lines)
            if n.strip().lower() == name.lower()]  # fmt: skip


async def test_subprotocol_token_alone_authenticates(node: NodeProc) -> None:
    sub = f"sp{uuid.uuid4().hex[:8]}"
    t = token(sub)
    ws = await WS.open(node.ws_url, subprotocols=[V1, f"bearer.{t}"])
    assert ws.welcome["uid"] == sub
    assert ws.conn.subprotocol == V1
    assert ws.conn.response is not None
    assert t not in str(ws.conn.response.headers)
    for part in t.split("."):
        assert part not in str(ws.conn.response.headers)
    await ws.close()
    # the bytes on the wire: 101, wscluster.v1 selected once, the token nowhere
    for protocols in ([f"{V1}, bearer.{t}"], [f"bearer.{t}, {V1}"], [V1, f"bearer.{t}"]):
        response = await raw_handshake(node.port, protocols)
        assert response.startswith(b"HTTP/1.1 101"), response
        assert header_lines(response, "Sec-WebSocket-Protocol") == [V1], response
        assert t.encode() not in response
        assert all(part.encode() not in response for part in t.split("."))


async def test_no_wscluster_v1_offered_no_subprotocol_selected(node: NodeProc) -> None:
    """A client that offers only the bearer entry (or other subprotocols) gets none selected:
    never the bearer entry, never one it did not offer."""
    t = token(f"np{uuid.uuid4().hex[:8]}")
    response = await raw_handshake(node.port, [f"bearer.{t}"])
    assert response.startswith(b"HTTP/1.1 101"), response
    assert header_lines(response, "Sec-WebSocket-Protocol") == []
    assert t.encode() not in response
    response = await raw_handshake(node.port, ["chat"], f"?token={t}")
    assert response.startswith(b"HTTP/1.1 101"), response
    assert header_lines(response, "Sec-WebSocket-Protocol") == []
    ws = await WS.open(node.ws_url, subprotocols=["chat", f"bearer.{t}"])  # a client that
    assert ws.conn.subprotocol is None  # does not insist on a subprotocol works
    await ws.close()


async def test_bad_subprotocol_token_is_a_401_without_the_token(node: NodeProc) -> None:
    cases = {
        "expired": token("late", ttl=-60),
        "garbage": "not-a-jwt",
        "bad signature": jwt.encode(
            {"sub": "x", "exp": int(time.time()) + 60}, "another-secret-0123456789abcdefgh"
        ),
    }
    for case, bad in cases.items():
        with pytest.raises(InvalidStatus) as info:
            offered = [Subprotocol(V1), Subprotocol(f"bearer.{bad}")]
            await websockets.connect(node.ws_url, subprotocols=offered)
        response = info.value.response
        assert response.status_code == 401, case
        assert set(json.loads(response.body)) == {"error"}, case
        assert "Sec-WebSocket-Protocol" not in response.headers, case
        raw = await raw_handshake(node.port, [V1, f"bearer.{bad}"])
        assert raw.startswith(b"HTTP/1.1 401"), (case, raw)
        assert bad.encode() not in raw, case
        assert all(len(p) < 4 or p.encode() not in raw for p in bad.split(".")), case
    # no token at all, wscluster.v1 offered: the contract holds (401)
    assert (await raw_handshake(node.port, [V1])).startswith(b"HTTP/1.1 401")
    # nothing of a refused token reaches the node's log
    log = node.log()
    for bad in cases.values():
        assert all(len(p) < 4 or p not in log for p in bad.split(".")), log[-2000:]


async def test_query_and_authorization_still_work_and_select_v1(node: NodeProc) -> None:
    sub = f"qa{uuid.uuid4().hex[:8]}"
    t = token(sub)
    options: list[dict[str, Any]] = [{}, {"subprotocols": [V1]}]
    for kw in options:
        q = await WS.open(f"{node.ws_url}?token={t}", **kw)
        h = await WS.open(node.ws_url, additional_headers={"Authorization": f"Bearer {t}"}, **kw)
        assert q.welcome["uid"] == h.welcome["uid"] == sub
        assert q.conn.subprotocol == h.conn.subprotocol == (V1 if kw else None)
        await q.close()
        await h.close()


async def test_two_different_tokens_are_refused(node: NodeProc) -> None:
    a, b = token("ann"), token("ben")
    raw = await raw_handshake(node.port, [f"{V1}, bearer.{b}"], f"?token={a}")
    assert raw.startswith(b"HTTP/1.1 401") and b"conflicting tokens" in raw, raw
    assert a.encode() not in raw and b.encode() not in raw
    same = await raw_handshake(node.port, [f"{V1}, bearer.{a}"], f"?token={a}")
    assert same.startswith(b"HTTP/1.1 101"), same


async def test_plain_get_of_ws_reads_the_subprotocol(node: NodeProc) -> None:
    url = node.http_url + "/ws"
    cases = [
        ({"Sec-WebSocket-Protocol": f"{V1}, bearer.{token('g')}"}, 426, "upgrade"),
        ({"Sec-WebSocket-Protocol": f"{V1}, bearer.{token('g', ttl=-60)}"}, 401, "expired"),
        ({"Sec-WebSocket-Protocol": V1}, 401, "missing token"),
        ({"Authorization": f"Bearer {token('g')}"}, 426, "upgrade"),  # what a page's fetch sends
    ]
    async with aiohttp.ClientSession() as http:
        for headers, status, reason in cases:
            async with http.get(url, headers=headers) as r:
                body = await r.json()
                assert (r.status, reason in body["error"]) == (status, True), (headers, body)


def test_node_log_has_no_token(node: NodeProc) -> None:
    """Runs last in this module: every token the tests above sent is still out of the log."""
    assert "bearer." not in node.log()
    assert "eyJ" not in node.log()  # the start of every JWT's header
