"""The broker's pub/sub connections alone killed (`CLIENT KILL TYPE pubsub`) under load:
every node resubscribes and repairs the hole from the history, so the clients (which stay
connected) get every message exactly once, in order, with no gap announced. Publishers on
node 0, subscribers on nodes 1 and 2."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as redis

from wscluster.embedded import EmbeddedRedis

from .conftest import MakeChaos, MakeChaosCluster
from .harness import PROFILE, metric

pytestmark = pytest.mark.timeout(PROFILE.timeout)


async def test_pubsub_connections_killed(
    own_valkey: EmbeddedRedis, chaos_cluster: MakeChaosCluster, chaos: MakeChaos
) -> None:
    c = chaos_cluster(own_valkey.url)
    run = chaos("pubsub_kill", c, seed=5004)
    group = f"room-{c.namespace}"
    await run.steady_load(group, -1)
    killed = []
    admin = redis.Redis.from_url(own_valkey.url)
    try:
        for _ in range(PROFILE.rounds):
            await asyncio.sleep(PROFILE.phase)
            killed.append(await admin.execute_command("CLIENT", "KILL", "TYPE", "pubsub"))
    finally:
        await admin.aclose()
    await asyncio.sleep(PROFILE.phase)
    await run.stop_load()
    acc = run.total()
    repaired = await metric(c.nodes, "wscluster_history_repaired_total")
    line = run.report(killed=killed, repaired=repaired, **await run.leak_gates())
    assert all(k >= len(c.nodes) for k in killed), run.explain(line)  # every node's subscriber went
    assert acc.exact and acc.reported == 0 and line["gaps"] == {}, run.explain(line)
    assert line["anomalies"] == 0 and line["errors"] == 0, run.explain(line)
    assert line["acked"] > 0 and line["reconnects"] == 0, run.explain(line)
