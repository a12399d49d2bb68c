"""The cluster holds its history rules (issue 15): publishers that were not given ``--history``
store too, a node without ``--history`` adopts the cluster's, ``--history none`` clears them,
and a ``send`` answers with the position of a stored message."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp

from wscluster.cluster import Cluster
from wscluster.embedded import EmbeddedRedis
from wscluster.history import Position
from wscluster.sync_cluster import SyncCluster

from .conftest import NodeProc
from .wsclient import WS

RULES = ["--history", "uid:*=100/600s", "--check-interval", "0.5"]


async def cli_send(url: str, ns: str, to: str, data: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "wscluster", "send", "--broker", url, "--namespace", ns,
        "--to", to, data, stdout=subprocess.PIPE,
    )  # fmt: skip
    out, _ = await proc.communicate()
    assert proc.returncode == 0
    return out.decode()


async def test_every_publisher_stores_and_learns_the_position(
    valkey: EmbeddedRedis, make_cluster: Any, unique: str
) -> None:
    c = make_cluster(valkey.url, 2, RULES)
    me = f"uid:x{unique}"
    out = await cli_send(valkey.url, c.namespace, me, '"cli"')  # no --history
    assert "offset 1" in out and "epoch" in out
    async with Cluster(valkey.url, namespace=c.namespace) as api:  # no history=
        pos = await api.send(me, "api")
        assert isinstance(pos, Position) and pos.offset == 2

    def sync_send() -> Position | None:
        with SyncCluster(valkey.url, namespace=c.namespace) as blocking:
            return blocking.send(me, "sync")

    assert await asyncio.to_thread(sync_send) == Position(pos.epoch, 3)
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{c.api_urls[1]}/api/send", json={"to": me, "data": "http"}) as r:
            body = await r.json()
    assert body == {"ok": True, "epoch": pos.epoch, "offset": 4}
    sender = await WS.open(c.ws_urls[0], f"s{unique}")
    ack = await sender.ok({"type": "send", "to": me, "data": "ws"})
    assert (ack["epoch"], ack["offset"]) == (pos.epoch, 5)
    plain = await sender.ok({"type": "send", "to": f"group:g{unique}", "data": 1})
    assert "offset" not in plain and "epoch" not in plain  # no rule: not stored
    late = await WS.open(c.ws_urls[1], f"x{unique}")
    res = await late.ok({"type": "resume", "streams": {me: [None, 0]}})
    assert res["streams"][me]["recovered"] is True
    got = [m for m in late.pushed if m["type"] == "message"]
    assert [m["data"] for m in got] == ["cli", "api", "sync", "http", "ws"]
    assert [m["offset"] for m in got] == [1, 2, 3, 4, 5]


async def test_rules_are_adopted_overridden_and_cleared(
    valkey: EmbeddedRedis, make_cluster: Any, unique: str, tmp_path: Path
) -> None:
    c = make_cluster(valkey.url, 1, RULES)
    me, room = f"uid:y{unique}", f"group:r{unique}"
    base = ["--broker", valkey.url, "--namespace", c.namespace, "--check-interval", "0.5"]
    late = NodeProc(7, base, tmp_path)  # no --history: adopts the cluster's
    late.start()
    try:
        ws = await WS.open(late.ws_url, f"w{unique}")
        ack = await ws.ok({"type": "send", "to": me, "data": 1})
        assert ack["offset"] == 1
        # a publisher's own rules override the cluster's, for its publishes only
        async with Cluster(valkey.url, namespace=c.namespace,
                           history=["group:r*=10/60s"]) as own:  # fmt: skip
            assert await own.send(me, 2) is None
            pos = await own.send(room, 3)
            assert pos is not None and pos.offset == 1
        follower = Cluster(valkey.url, namespace=c.namespace, check_interval=0.5)
        async with follower:
            assert (await follower.send(me, 4)) is not None
            # a restart with --history none clears the cluster's rules
            c.nodes[0].kill()
            kept = [a for a in c.nodes[0].args if a not in ("--history", "uid:*=100/600s")]
            c.nodes[0].args = [*kept, "--history", "none"]
            c.nodes[0].start()
            assert "history rules" in c.nodes[0].log()
            await asyncio.sleep(1.2)  # within one check interval (and some)
            assert await follower.send(me, 5) is None
            ack = await ws.ok({"type": "send", "to": me, "data": 6})
            assert "offset" not in ack
            out = await cli_send(valkey.url, c.namespace, me, "7")
            assert "offset" not in out
    finally:
        late.kill()
