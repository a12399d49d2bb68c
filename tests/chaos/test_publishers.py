"""Three publishers send into one group at once, from a node that holds no subscriber:
every subscriber gets every message of every publisher exactly once, in that publisher's
order."""

from __future__ import annotations

import asyncio

import pytest

from wscluster.embedded import EmbeddedRedis

from .conftest import MakeChaos, MakeChaosCluster
from .harness import PROFILE

pytestmark = pytest.mark.timeout(PROFILE.timeout)


async def test_parallel_publishers_keep_their_order(
    valkey: EmbeddedRedis, chaos_cluster: MakeChaosCluster, chaos: MakeChaos
) -> None:
    c = chaos_cluster(valkey.url)
    run = chaos("parallel_publishers", c, seed=5003)
    group = f"room-{c.namespace}"
    for i in range(PROFILE.subscribers):
        for node in (1, 2):
            await run.subscriber(f"s{node}.{i}", node, [group])
    for i in range(3):
        run.publisher(f"p{i}", 0, f"group:{group}", PROFILE.rate / 3)
    run.start_load()
    await asyncio.sleep(PROFILE.phase * 2 * PROFILE.rounds)
    await run.stop_load()
    total = run.total()
    line = run.report(**await run.leak_gates())
    assert total.exact and line["anomalies"] == 0, run.explain(line)
    assert line["acked"] == line["published"] > 0 and line["refused"] == 0, run.explain(line)
    assert line["expected"] == line["acked"] * len(run.subs), run.explain(line)
