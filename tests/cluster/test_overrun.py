"""Overrun: a broker that cannot keep up slows the senders down instead of losing what it
acked. While Redis is frozen (SIGSTOP) a client floods `send`: the node answers
`rate_limited` once `--max-publish-queue` bytes wait for the broker, and stops reading a
connection with `--max-inflight` requests waiting; every acked message was handed to the
broker and reaches its receiver exactly once, in order, once Redis runs again; nothing
refused arrives; the nodes stay up and healthy."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import Callable

import aiohttp
import pytest

from wscluster.embedded import EmbeddedRedis

from .conftest import Cluster
from .wsclient import WS

MakeCluster = Callable[..., Cluster]


@pytest.mark.parametrize("bound", ["queue", "inflight"])
async def test_a_frozen_broker_slows_senders_and_loses_nothing_acked(
    own_valkey: EmbeddedRedis, make_cluster: MakeCluster, unique: str, bound: str
) -> None:
    """``queue``: a 10 kB publish queue fills at once, later sends are answered rate_limited
    (reading goes on). ``inflight``: a roomy queue, at most 64 requests in flight: the node
    stops reading the sender, whose flood (10 MB, more than the socket buffers hold) stalls
    until the broker answers again, and then every send is acked."""
    queue, inflight = ("10000", "256") if bound == "queue" else ("100000000", "64")
    cluster = make_cluster(own_valkey.url, 2, [
        "--anonymous", "--rate-limit", "0", "--max-publish-queue", queue,
        "--max-inflight", inflight, "--request-timeout", "8",
        "--max-outbox", str(64 << 20),  # the receiver, in this busy process, may lag behind
    ])  # fmt: skip
    sender = await WS.open(cluster.ws_urls[0], f"s{unique}")
    receiver = await WS.open(cluster.ws_urls[1], f"r{unique}")
    n, blob = 5000, "x" * 2000

    acked: list[int] = []
    errors: dict[str, int] = {}
    got: list[int] = []

    async def flood() -> None:
        for i in range(1, n + 1):
            frame = {"type": "send", "to": f"uid:r{unique}", "id": i, "data": [i, blob]}
            await sender.send_raw(json.dumps(frame))

    async def answers() -> None:  # read while flooding: the sender is no slow consumer
        while len(acked) + sum(errors.values()) < n:
            msg = json.loads(await sender.conn.recv())
            if msg["type"] == "ack":
                acked.append(msg["id"])
            elif msg["type"] == "error":
                errors[msg["code"]] = errors.get(msg["code"], 0) + 1

    async def receive() -> None:
        while True:
            msg = json.loads(await receiver.conn.recv())
            if msg["type"] == "message":
                got.append(msg["data"][0])

    receiving = asyncio.create_task(receive())
    answering = asyncio.create_task(answers())
    pid = own_valkey.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    try:
        flooding = asyncio.create_task(flood())
        await asyncio.sleep(2.0)
        stalled = not flooding.done()
        got_while_frozen = len(got)
    finally:
        os.kill(pid, signal.SIGCONT)
    await asyncio.wait_for(flooding, 30)
    await asyncio.wait_for(answering, 30)

    assert got_while_frozen == 0
    assert set(errors) <= {"rate_limited"}, errors  # nothing timed out, nothing failed
    if bound == "queue":
        assert errors.get("rate_limited", 0) > n / 2 and acked, (errors, len(acked))
    else:
        assert stalled and not errors and len(acked) == n, (stalled, errors, len(acked))
    async with asyncio.timeout(30):
        while len(got) < len(acked):
            await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)  # nothing that was refused arrives later
    receiving.cancel()
    assert got == sorted(acked)  # every acked message, once, in send order

    async with aiohttp.ClientSession() as http:
        for api in cluster.api_urls:
            async with http.get(f"{api}/healthz") as r:
                assert r.status == 200, await r.text()
