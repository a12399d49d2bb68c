"""A rolling restart of all three nodes, one by one (SIGTERM: drain, then start again) under
load. Every client moves (the publishers too) and resumes: every message exactly once, in
order, nothing reported lost. Publishers start on node 0, subscribers on nodes 1 and 2."""

from __future__ import annotations

import asyncio
import time

import pytest

from wscluster.embedded import EmbeddedRedis

from .conftest import MakeChaos, MakeChaosCluster
from .harness import PROFILE, spread

pytestmark = pytest.mark.timeout(PROFILE.timeout)


async def test_rolling_restart(
    valkey: EmbeddedRedis, chaos_cluster: MakeChaosCluster, chaos: MakeChaos
) -> None:
    c = chaos_cluster(valkey.url)
    run = chaos("rolling_restart", c, seed=5005)
    group = f"room-{c.namespace}"
    await run.steady_load(group)
    restarts = []
    for _ in range(PROFILE.rounds):
        for proc in c.nodes:
            await asyncio.sleep(PROFILE.phase)
            t0 = time.monotonic()
            code = await asyncio.to_thread(proc.terminate)
            assert code == 0, proc.log()
            await asyncio.to_thread(proc.start)
            restarts.append(time.monotonic() - t0)
            await run.resumed(run.subs, 0)  # every subscriber connected again
    await asyncio.sleep(PROFILE.phase)
    await run.stop_load()
    acc = run.total()
    moves = [r.up - r.down for s in run.subs for r in s.reconnects if r.up is not None]
    line = run.report(reconnect_ms=spread(moves), restart_s=[round(t, 2) for t in restarts],
                      publisher_moves=sum(p.reconnects for p in run.pubs),
                      **await run.leak_gates())  # fmt: skip
    assert acc.exact and acc.reported == 0 and line["gaps"] == {}, run.explain(line)
    assert set(line["resume"]) == {"recovered"}, run.explain(line)
    assert line["anomalies"] == 0 and line["errors"] == 0, run.explain(line)
    assert all(s.reconnects for s in run.subs), "a subscriber never moved"
    assert line["acked"] > 0, run.explain(line)
