"""Limits per client address (--max-connections-per-ip, --handshake-rate-per-ip, with
--trusted-proxies for nginx in front) and the cap on token lifetimes (--jwt-max-lifetime)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import jwt
import pytest
import websockets
from websockets.exceptions import InvalidStatus

from wscluster.embedded import EmbeddedRedis

from .conftest import Cluster
from .rawframes import closed_with
from .wsclient import WS

REFUSED = (1013, "too many connections from your address")
SECRET = "peer-limits-test-secret-0123456789abcdef"


async def refused(url: str, **kw: Any) -> tuple[int | None, str]:
    """Open a connection the node refuses after the upgrade: its close code and reason."""
    conn = await websockets.connect(url, compression=None, **kw)
    ws = WS(conn, {"client_id": ""})
    WS.opened.append(ws)
    code, reason, before = await closed_with(ws)
    assert before == []  # no welcome
    return code, reason


async def test_connections_per_address(valkey: EmbeddedRedis, make_cluster: Any) -> None:
    c: Cluster = make_cluster(valkey.url, 1, ["--max-connections-per-ip", "3"])
    url = c.ws_urls[0]
    first = [await WS.open(url) for _ in range(3)]
    assert await refused(url) == REFUSED
    await first[0].close()
    await asyncio.sleep(0.3)
    await WS.open(url)  # a place is free again
    assert await refused(url) == REFUSED
    await first[1].ok({"type": "ping"})  # the others are untouched


async def test_handshakes_per_second(valkey: EmbeddedRedis, make_cluster: Any) -> None:
    c: Cluster = make_cluster(valkey.url, 1, ["--handshake-rate-per-ip", "4"])
    url = c.ws_urls[0]
    outcomes = []
    for _ in range(12):
        conn = await websockets.connect(url, compression=None)
        ws = WS(conn, {"client_id": ""})
        WS.opened.append(ws)
        try:
            first = await asyncio.wait_for(conn.recv(), 5)
            outcomes.append("welcome" in str(first))
        except websockets.ConnectionClosed as exc:
            assert exc.rcvd is not None and (exc.rcvd.code, exc.rcvd.reason) == REFUSED
            outcomes.append(False)
    assert 4 <= sum(outcomes) <= 7, outcomes  # the burst (4), maybe one more per 0.25 s
    await asyncio.sleep(1.1)
    await WS.open(url)  # the bucket refilled


async def test_forwarded_for_counts_only_behind_a_trusted_proxy(
    valkey: EmbeddedRedis, make_cluster: Any
) -> None:
    trusting = ["--max-connections-per-ip", "2", "--trusted-proxies", "127.0.0.0/8,::1"]
    c: Cluster = make_cluster(valkey.url, 1, trusting)
    url = c.ws_urls[0]

    def via(client: str) -> dict[str, Any]:  # what nginx adds (the client's own entry first)
        return {"additional_headers": {"X-Forwarded-For": f"6.6.6.6, {client}"}}

    for client in ("198.51.100.1", "198.51.100.2"):
        await WS.open(url, **via(client))
        await WS.open(url, **via(client))
    assert await refused(url, **via("198.51.100.1")) == REFUSED  # counted per client
    await WS.open(url, **via("198.51.100.3"))

    plain: Cluster = make_cluster(valkey.url, 1, ["--max-connections-per-ip", "2"])
    url = plain.ws_urls[0]
    await WS.open(url, **via("198.51.100.1"))
    await WS.open(url, **via("198.51.100.2"))
    # not from a trusted proxy: the header proves nothing, the peer (127.0.0.1) is counted
    assert await refused(url, **via("198.51.100.3")) == REFUSED


def token(exp: float) -> str:
    return jwt.encode({"sub": "life", "exp": exp}, SECRET, "HS256")


@pytest.mark.parametrize("exp", [1e308, 2**40, time.time() + 2 * 86400])
async def test_tokens_that_live_too_long_are_refused(
    valkey: EmbeddedRedis, make_cluster: Any, exp: float
) -> None:
    c: Cluster = make_cluster(valkey.url, 1, ["--jwt-secret", SECRET])
    with pytest.raises(InvalidStatus) as info:
        await websockets.connect(f"{c.ws_urls[0]}?token={token(exp)}")
    assert info.value.response.status_code == 401
    assert b"token lifetime too long" in info.value.response.body
    await WS.open(f"{c.ws_urls[0]}?token={token(time.time() + 3600)}")  # an hour is fine


async def test_jwt_max_lifetime_zero_takes_any(valkey: EmbeddedRedis, make_cluster: Any) -> None:
    c: Cluster = make_cluster(valkey.url, 1, ["--jwt-secret", SECRET, "--jwt-max-lifetime", "0"])
    await WS.open(f"{c.ws_urls[0]}?token={token(time.time() + 30 * 86400)}")
