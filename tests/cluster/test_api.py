"""The Python API (Cluster, SyncCluster) against real nodes."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import aiohttp
import pytest

from wscluster import Cluster, SyncCluster
from wscluster.embedded import EmbeddedRedis
from wscluster.errors import Code, ProtocolError

from .conftest import Cluster as Nodes
from .wsclient import WS


async def test_cluster_api(cluster: Nodes, unique: str) -> None:
    u = f"api{unique}"
    a1 = await WS.open(cluster.ws_urls[0], u)
    a2 = await WS.open(cluster.ws_urls[1], u)
    anon = await WS.open(cluster.ws_urls[2])
    for ws in (a1, anon):
        await ws.ok({"type": "join", "group": f"g{unique}"})
    async with Cluster(cluster.redis_url, namespace=cluster.namespace) as api:
        assert await api.is_online(u)
        assert not await api.is_online(f"ghost{unique}")
        assert await api.client_ids(u) == sorted([a1.client_id, a2.client_id])
        assert await api.group_members(f"g{unique}") == [u]
        assert await api.group_count(f"g{unique}") == 2
        t0 = asyncio.get_running_loop().time()
        while await api.count() < 3:  # counts come with node heartbeats (0.5 s here)
            assert asyncio.get_running_loop().time() - t0 < 3
            await asyncio.sleep(0.1)
        stats = await api.stats()
        assert len(stats["nodes"]) == 3
        await api.send(f"uid:{u}", {"x": 1}, exclude=[a2.client_id])
        assert (await a1.next(type="message"))["data"] == {"x": 1}
        await a2.nothing()
        await api.send_verbatim(f"client:{anon.client_id}", b'{"custom": true}')
        assert await anon.next() == {"custom": True}
        await api.send_verbatim(f"client:{anon.client_id}", b"\x00\x01", binary=True)
        assert await anon.conn.recv() == b"\x00\x01"
        with pytest.raises(ProtocolError) as info:
            await api.send("nowhere", 1)
        assert info.value.code is Code.BAD_REQUEST
        with pytest.raises(ProtocolError):
            await api.send("all", object())
        with pytest.raises(ProtocolError):
            await api.close("group:x")
        await api.close(f"client:{a1.client_id}", 4001)
    await a2.ok({"type": "ping"})  # the other device is untouched
    for ws in (a1, a2, anon):
        await ws.close()


async def test_sync_cluster(cluster: Nodes, unique: str) -> None:
    ws = await WS.open(cluster.ws_urls[2], f"sync{unique}")

    def backend() -> tuple[bool, int]:
        with SyncCluster(cluster.redis_url, namespace=cluster.namespace) as api:
            api.send(f"uid:sync{unique}", "from django")
            return api.is_online(f"sync{unique}"), api.count()

    online, count = await asyncio.to_thread(backend)
    assert online and count >= 1
    assert (await ws.next(type="message"))["data"] == "from django"
    await ws.close()


async def test_api_key_guards_the_http_api(
    valkey: EmbeddedRedis, make_cluster: Callable[..., Nodes]
) -> None:
    c = make_cluster(valkey.url, 1, ["--api-key", "s3cret"])
    api = c.api_urls[0]
    async with aiohttp.ClientSession() as http:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            async with http.post(f"{api}/api/send", json={"to": "all", "data": 1},
                                 headers=headers) as r:  # fmt: skip
                assert r.status == 401
                assert (await r.json())["error"]["code"] == "forbidden"
            async with http.get(f"{api}/api/stats", headers=headers) as r:
                assert r.status == 401
        ok = {"Authorization": "Bearer s3cret"}
        async with http.post(f"{api}/api/send", json={"to": "all", "data": 1}, headers=ok) as r:
            assert r.status == 200
        async with http.get(f"{api}/healthz") as r:  # health and metrics stay open
            assert r.status == 200


async def test_http_api_for_connections_and_sessions(cluster: Nodes, unique: str) -> None:
    """/api/bind|unbind|join|leave|session act on a connection held by another node."""
    ws = await WS.open(cluster.ws_urls[1])
    cid, group, uid = ws.client_id, f"hg{unique}", f"hu{unique}"
    api = cluster.api_urls[0]

    async def call(method: str, path: str, **kw: object) -> tuple[int, dict[str, object]]:
        async with aiohttp.ClientSession() as http, http.request(method, api + path, **kw) as r:
            return r.status, await r.json()

    assert await call("POST", "/api/join", json={"client_id": cid, "group": group}) == (
        200, {"ok": True})  # fmt: skip
    # the barrier holds: a message sent right after the answer reaches the connection
    assert (await call("POST", "/api/send", json={"to": f"group:{group}", "data": 1}))[0] == 200
    assert (await ws.next(type="message"))["data"] == 1
    assert (await call("POST", "/api/bind", json={"client_id": cid, "uid": uid}))[1] == {
        "ok": True}  # fmt: skip
    await call("POST", "/api/send", json={"to": f"uid:{uid}", "data": 2})
    assert (await ws.next(type="message"))["data"] == 2
    for path, body in (("/api/leave", {"client_id": cid, "group": group}),
                       ("/api/unbind", {"client_id": cid})):  # fmt: skip
        assert await call("POST", path, json=body) == (200, {"ok": True})
    await call("POST", "/api/send", json={"to": f"group:{group}", "data": 3})
    await call("POST", "/api/send", json={"to": f"uid:{uid}", "data": 4})
    await ws.nothing()
    # sessions: replace, merge (null deletes), read; unknown connections
    body = {"client_id": cid, "session": {"a": 1, "b": [1, None]}}
    assert await call("POST", "/api/session", json=body) == (200, {"ok": True})
    merge = {"client_id": cid, "session": {"a": None, "c": "x"}, "merge": True}
    assert await call("POST", "/api/session", json=merge) == (200, {"ok": True})
    assert await call("GET", "/api/session", params={"client_id": cid}) == (
        200, {"session": {"b": [1, None], "c": "x"}})  # fmt: skip
    ghost = cid.rsplit(".", 1)[0] + ".999999"
    assert await call("GET", "/api/session", params={"client_id": ghost}) == (
        200, {"session": None})  # fmt: skip
    assert await call("POST", "/api/join", json={"client_id": ghost, "group": "g"}) == (
        200, {"ok": False})  # fmt: skip
    big = {"client_id": cid, "session": {"k": "x" * 20000}}
    status, err = await call("POST", "/api/session", json=big)
    assert status == 413 and err["error"]["code"] == "too_large"  # type: ignore[index]
    # bad input: the documented JSON error shape, also for unknown paths and methods
    for method, path, kw, code in (
        ("GET", "/api/session", {}, 400),
        ("POST", "/api/bind", {"json": {"client_id": cid}}, 400),
        ("POST", "/api/join", {"json": {"client_id": "nope", "group": "g"}}, 400),
        ("POST", "/api/session", {"json": {"client_id": cid, "session": [1]}}, 400),
        ("GET", "/api/nowhere", {}, 404),
        ("GET", "/api/send", {}, 405),
    ):
        status, err = await call(method, path, **kw)
        assert status == code and "code" in err["error"], (path, err)  # type: ignore[operator]
