"""Protocol v1 against 3 real node processes on a real valkey (shared module cluster)."""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys

import aiohttp
import pytest
import websockets

from .conftest import Cluster
from .wsclient import WS


async def test_welcome_and_ping(cluster: Cluster) -> None:
    ws = await WS.open(cluster.ws_urls[0])
    w = ws.welcome
    assert w["uid"] is None and w["heartbeat"] == 25
    assert w["client_id"].startswith(w["node"] + ".")
    assert (await ws.request({"type": "ping", "id": "p1"})) == {"type": "pong", "id": "p1"}
    await ws.send_raw('{"type": "ping"}')
    assert (await ws.next(type="pong")) == {"type": "pong", "id": None}
    other = await WS.open(cluster.ws_urls[0])
    assert other.client_id != ws.client_id
    await ws.close()
    await other.close()


async def test_uid_reaches_every_device_on_every_node(cluster: Cluster, unique: str) -> None:
    alice1 = await WS.open(cluster.ws_urls[0], f"alice{unique}")
    alice2 = await WS.open(cluster.ws_urls[2], f"alice{unique}")
    bob = await WS.open(cluster.ws_urls[1], f"bob{unique}")
    ack = await bob.request({"type": "send", "to": f"uid:alice{unique}", "data": {"t": 1}})
    assert ack["type"] == "ack"
    for ws in (alice1, alice2):
        msg = await ws.next(type="message")
        assert msg["to"] == f"uid:alice{unique}"
        assert msg["data"] == {"t": 1}
        assert msg["from"] == {"uid": f"bob{unique}", "client_id": bob.client_id}
        assert isinstance(msg["ts"], int)
    await bob.nothing()
    for ws in (alice1, alice2, bob):
        await ws.close()


async def test_client_address_reaches_one_connection(cluster: Cluster, unique: str) -> None:
    a1 = await WS.open(cluster.ws_urls[2], f"a{unique}")
    a2 = await WS.open(cluster.ws_urls[2], f"a{unique}")
    b = await WS.open(cluster.ws_urls[0], f"b{unique}")
    await b.ok({"type": "send", "to": f"client:{a2.client_id}", "data": "only you"})
    assert (await a2.next(type="message"))["data"] == "only you"
    await a1.nothing()
    # a well-formed address with no receivers is accepted and delivered to nobody
    await b.ok({"type": "send", "to": "client:nosuchnode-00000000.1", "data": 1})
    await b.ok({"type": "send", "to": f"uid:nobody{unique}", "data": 1})
    for ws in (a1, a2, b):
        await ws.close()


async def test_group_spans_nodes_and_leave_is_a_barrier(cluster: Cluster, unique: str) -> None:
    g = f"group:room{unique}"
    members = [await WS.open(url, f"m{i}{unique}") for i, url in enumerate(cluster.ws_urls)]
    outsider = await WS.open(cluster.ws_urls[0], f"out{unique}")
    for ws in members:
        assert (await ws.ok({"type": "join", "group": g[6:]}))["type"] == "ack"
    await members[0].ok({"type": "send", "to": g, "data": "hello"})
    for ws in members:  # the sender is a member: it receives its own message
        assert (await ws.next(type="message"))["data"] == "hello"
    await outsider.nothing()
    await members[2].ok({"type": "leave", "group": g[6:]})
    await members[2].ok({"type": "leave", "group": g[6:]})  # idempotent
    await outsider.ok({"type": "send", "to": g, "data": "after leave"})
    for ws in members[:2]:
        assert (await ws.next(type="message"))["data"] == "after leave"
    await members[2].nothing()
    for ws in [*members, outsider]:
        await ws.close()


async def test_all_reaches_everyone(cluster: Cluster, unique: str) -> None:
    conns = [await WS.open(url) for url in cluster.ws_urls]  # anonymous receivers too
    sender = await WS.open(cluster.ws_urls[1], f"s{unique}")
    await sender.ok({"type": "send", "to": "all", "data": unique})
    for ws in [*conns, sender]:
        msg = await ws.next(type="message")
        while msg["data"] != unique:  # other tests may broadcast too
            msg = await ws.next(type="message")
    for ws in [*conns, sender]:
        await ws.close()


async def test_login_barrier_and_relogin(cluster: Cluster, unique: str) -> None:
    ws = await WS.open(cluster.ws_urls[0])
    sender = await WS.open(cluster.ws_urls[1], f"s{unique}")
    assert (await ws.ok({"type": "login", "uid": f"x{unique}"}))["uid"] == f"x{unique}"
    await sender.ok({"type": "send", "to": f"uid:x{unique}", "data": 1})
    assert (await ws.next(type="message"))["data"] == 1
    await ws.ok({"type": "login", "uid": f"y{unique}"})  # rebind: nothing more for x
    await sender.ok({"type": "send", "to": f"uid:x{unique}", "data": 2})
    await sender.ok({"type": "send", "to": f"uid:y{unique}", "data": 3})
    assert (await ws.next(type="message"))["data"] == 3
    await ws.ok({"type": "logout"})
    await ws.ok({"type": "logout"})
    await sender.ok({"type": "send", "to": f"uid:y{unique}", "data": 4})
    await ws.nothing()
    err = await ws.request({"type": "send", "to": "all", "data": 1})
    assert err["code"] == "not_logged_in"
    await ws.close()
    await sender.close()


async def test_per_sender_order_across_nodes(cluster: Cluster, unique: str) -> None:
    g = f"ord{unique}"
    receivers = [await WS.open(url, f"r{i}{unique}") for i, url in enumerate(cluster.ws_urls)]
    for ws in receivers:
        await ws.ok({"type": "join", "group": g})
    sender = await WS.open(cluster.ws_urls[1], f"s{unique}")
    n = 500
    for i in range(n):  # pipelined: no waiting for acks
        await sender.send_raw(json.dumps({"type": "send", "to": f"group:{g}", "data": i}))
    for ws in receivers:
        got = [(await ws.next(10, type="message"))["data"] for _ in range(n)]
        assert got == list(range(n))
    for ws in [*receivers, sender]:
        await ws.close()


async def test_presence_queries(cluster: Cluster, unique: str) -> None:
    u = f"p{unique}"
    a = await WS.open(cluster.ws_urls[0], u)
    anon = await WS.open(cluster.ws_urls[2])
    q = await WS.open(cluster.ws_urls[1])
    await a.ok({"type": "join", "group": f"g{unique}"})
    await anon.ok({"type": "join", "group": f"g{unique}"})
    assert (await q.ok({"type": "presence", "to": f"uid:{u}"}))["online"] is True
    got = await q.ok({"type": "presence", "to": f"group:g{unique}"})
    assert got["uids"] == [u] and got["count"] == 2
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{cluster.api_urls[2]}/api/presence",
                            params={"to": f"group:g{unique}"}) as r:  # fmt: skip
            assert r.status == 200 and await r.json() == {"uids": [u], "count": 2}
    await a.close()
    async with asyncio.timeout(5):  # the close reaches the store asynchronously
        while (await q.ok({"type": "presence", "to": f"uid:{u}"}))["online"]:
            await asyncio.sleep(0.05)
    got = await q.ok({"type": "presence", "to": f"group:g{unique}"})
    assert got == {"type": "ack", "id": got["id"], "uids": [], "count": 1}
    await anon.close()
    await q.close()


async def test_back_to_back_changes_reach_presence_in_order(
    cluster: Cluster, unique: str
) -> None:
    """join+leave (and login+logout) read from one socket in one go are written to the
    presence store in that order: the mirror never keeps a group the connection left."""
    a = await WS.open(cluster.ws_urls[0], f"o{unique}")
    q = await WS.open(cluster.ws_urls[1])
    for i in range(10):
        group = f"o{unique}{i}"
        frames = [
            {"type": "join", "group": group, "id": f"j{i}"},
            {"type": "leave", "group": group, "id": f"l{i}"},
            {"type": "login", "uid": f"o{unique}{i}", "id": f"b{i}"},
            {"type": "logout", "id": f"u{i}"},
        ]
        for frame in frames:  # no wait between them: they arrive in one read
            await a.send_raw(json.dumps(frame))
        replies = [json.loads(await asyncio.wait_for(a.conn.recv(), 5)) for _ in frames]
        assert sorted((r["type"], r["id"]) for r in replies) == sorted(
            ("ack", f["id"]) for f in frames
        )  # acks come as barriers hold, not necessarily in order
        got = await q.ok({"type": "presence", "to": f"group:{group}"})
        assert (got["uids"], got["count"]) == ([], 0), (i, got)
        assert (await q.ok({"type": "presence", "to": f"uid:o{unique}{i}"}))["online"] is False
    await a.close()
    await q.close()


async def test_presence_events(cluster: Cluster, unique: str) -> None:
    g = f"pe{unique}"
    watcher = await WS.open(cluster.ws_urls[0], f"w{unique}")
    await watcher.ok({"type": "join", "group": g, "presence": True})
    await watcher.nothing(type="presence")  # no event about its own join
    other = await WS.open(cluster.ws_urls[2], f"o{unique}")
    await other.ok({"type": "join", "group": g})
    ev = await watcher.next(type="presence")
    assert ev == {"type": "presence", "group": g, "event": "join", "uid": f"o{unique}",
                  "client_id": other.client_id}  # fmt: skip
    await other.close()  # closing leaves every group
    ev = await watcher.next(type="presence")
    assert ev["event"] == "leave" and ev["client_id"] == other.client_id
    # join and leave back to back: announced in that order
    third = await WS.open(cluster.ws_urls[1], f"t{unique}")
    await third.send_raw(json.dumps({"type": "join", "group": g}))
    await third.send_raw(json.dumps({"type": "leave", "group": g}))
    events = [await watcher.next(type="presence") for _ in range(2)]
    assert [(e["event"], e["client_id"]) for e in events] == [
        ("join", third.client_id), ("leave", third.client_id)
    ]
    await watcher.close()


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ("{nope", "bad_json"),
        ("[1,2,3]", "bad_request"),
        ('{"type": "fly", "id": 1}', "unknown_type"),
        ('{"type": "send", "to": "mars:x", "data": 1, "id": 1}', "bad_request"),
        ('{"type": "join", "group": "", "id": 1}', "bad_request"),
        ('{"type": "ping", "id": {"x": 1}}', "bad_request"),
        ('{"type": "login", "token": "abc", "id": 1}', "forbidden"),
        ('{"type": "ping", "data": ' + "[" * 3000 + "]" * 3000 + "}", "bad_json"),
    ],
)
async def test_bad_frames_get_their_code_and_change_nothing(
    cluster: Cluster, unique: str, frame: str, code: str
) -> None:
    ws = await WS.open(cluster.ws_urls[0], f"e{unique}")
    await ws.send_raw(frame)
    err = await ws.next(type="error")
    assert err["code"] == code
    try:
        parsed_id = json.loads(frame).get("id") if frame.startswith('{"') else None
    except RecursionError:
        parsed_id = None
    assert err["id"] == (parsed_id if isinstance(parsed_id, int) else None)
    assert (await ws.ok({"type": "ping"}))["type"] == "pong"  # still usable
    assert ws.welcome["uid"] is None
    await ws.close()


async def test_binary_and_too_large(cluster: Cluster, unique: str) -> None:
    ws = await WS.open(cluster.ws_urls[1], f"big{unique}")
    await ws.send_raw(b"\x00\x01")
    assert (await ws.next(type="error"))["code"] == "bad_request"
    big = json.dumps({"type": "send", "to": "all", "data": "x" * 70_000, "id": 5})
    await ws.send_raw(big)
    err = await ws.next(type="error")
    assert err["code"] == "too_large" and err["id"] == 5
    assert (await ws.ok({"type": "ping"}))["type"] == "pong"
    # over the hard frame limit (1 MiB): closed 1009
    await ws.send_raw("x" * (1024 * 1024 + 10))
    with pytest.raises(websockets.ConnectionClosed) as info:
        await ws.next(5)
    assert info.value.rcvd is not None and info.value.rcvd.code == 1009


async def test_http_api(cluster: Cluster, unique: str) -> None:
    ws = await WS.open(cluster.ws_urls[2], f"h{unique}")
    api = cluster.api_urls[0]
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{api}/api/send",
                             json={"to": f"uid:h{unique}", "data": {"n": 1}}) as r:  # fmt: skip
            assert r.status == 200 and await r.json() == {"ok": True}
        msg = await ws.next(type="message")
        assert msg["from"] is None and msg["data"] == {"n": 1}
        for body, status, code in [
            (b"{bad", 400, "bad_json"),
            (b"[]", 400, "bad_request"),
            (b'{"to": "uid:x"}', 400, "bad_request"),
            (b'{"to": "bogus", "data": 1}', 400, "bad_request"),
            (json.dumps({"to": "all", "data": "x" * 70_000}).encode(), 413, "too_large"),
            (io.BytesIO(b"x" * (1024 * 1024 + 1)), 413, "too_large"),
            (b'{"to": "all", "data": ' + b"[" * 3000 + b"]" * 3000 + b"}", 400, "bad_json"),
        ]:
            async with http.post(f"{api}/api/send", data=body) as r:
                assert r.status == status
                assert (await r.json())["error"]["code"] == code
        async with http.get(f"{api}/api/presence", params={"to": f"uid:h{unique}"}) as r:
            assert await r.json() == {"online": True}
        async with http.get(f"{api}/api/presence", params={"to": "all"}) as r:
            assert r.status == 400
        async with http.get(f"{api}/api/stats") as r:
            stats = await r.json()
            assert len(stats["nodes"]) == 3
            assert stats["connections"] == sum(n["connections"] for n in stats["nodes"])
        async with http.get(f"{api}/healthz") as r:
            assert r.status == 200 and (await r.json())["ok"] is True
        async with http.get(f"{api}/metrics") as r:
            assert "wscluster_connections" in await r.text()
        async with http.get(f"{cluster.nodes[0].http_url}/healthz") as r:
            assert r.status == 200
        async with http.post(f"{api}/api/close", json={"to": f"uid:h{unique}"}) as r:
            assert r.status == 200
    with pytest.raises(websockets.ConnectionClosed) as info:
        await ws.next(5)
    assert info.value.rcvd is not None and info.value.rcvd.code == 4001


async def test_cli_send_and_status(cluster: Cluster, unique: str) -> None:
    ws = await WS.open(cluster.ws_urls[1], f"cli{unique}")
    base = [sys.executable, "-m", "wscluster"]
    opts = ["--broker", cluster.redis_url, "--namespace", cluster.namespace]
    out = await asyncio.to_thread(
        subprocess.run, [*base, "send", *opts, "--to", f"uid:cli{unique}", '{"text": "hi"}'],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert (await ws.next(type="message"))["data"] == {"text": "hi"}
    out = await asyncio.to_thread(
        subprocess.run, [*base, "status", *opts], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stderr
    assert "3 nodes" in out.stdout
    for node in cluster.nodes:
        assert f"node{node.index}-" in out.stdout
    bad = await asyncio.to_thread(
        subprocess.run, [*base, "send", *opts, "--to", "nowhere", "1"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert bad.returncode == 2 and "bad_request" in bad.stderr
    bad_configs = {  # each refuses to start, saying why
        (): "refusing to start",
        ("--anonymous", "--jwt-secret", "x" * 40): "exclude each other",
        ("--jwt-secret", "short"): "at least 32 bytes",
        ("--jwt-public-key", "/nonexistent.pem"): "no such file",
        ("--anonymous", "--allowed-origins", ","): "at least one origin",
        ("--anonymous", "--app", "no_such_module_xyz:app"): "cannot import",
        ("--anonymous", "--app", "wscluster:Cluster"): "not a wscluster.App",
    }
    for args, why in bad_configs.items():
        refused = await asyncio.to_thread(
            subprocess.run, [*base, "serve", *args, "--port", "1"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert refused.returncode == 2 and why in refused.stderr, (args, refused.stderr)
    await ws.close()


async def test_request_flood_is_answered_in_full(cluster: Cluster, unique: str) -> None:
    """More requests in flight than the per-connection bound (256): reading pauses, nothing
    is lost, and every one is answered."""
    ws = await WS.open(cluster.ws_urls[0], f"f{unique}")
    n = 1500
    for i in range(n):
        kind = ("presence", "join", "send")[i % 3]
        frame: dict[str, object] = {"type": kind, "id": i}
        if kind == "presence":
            frame["to"] = f"uid:f{unique}"
        elif kind == "join":
            frame["group"] = f"g{i}{unique}"
        else:
            frame.update(to=f"client:{ws.client_id}", data=i)
        await ws.send_raw(json.dumps(frame))
    answered = set()
    async with asyncio.timeout(30):
        while len(answered) < n:
            msg = await ws.next(type=None)
            if msg["type"] == "ack":
                answered.add(msg["id"])
    assert answered == set(range(n))
