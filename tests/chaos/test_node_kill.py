"""kill -9 one of three nodes under steady load. Its clients reconnect to another node and
resume: every message exactly once, in order, nothing reported lost; the dead node's
presence is purged; a control client on an undisturbed node sees everything, untouched.
The publishers are on node 0, the victims on node 2, the control clients on node 1."""

from __future__ import annotations

import asyncio
import time

import pytest

from wscluster.embedded import EmbeddedRedis

from .conftest import MakeChaos, MakeChaosCluster
from .harness import PROFILE, get_json, spread, wait_for

pytestmark = pytest.mark.timeout(PROFILE.timeout)


async def test_kill_9_one_node_of_three(
    valkey: EmbeddedRedis, chaos_cluster: MakeChaosCluster, chaos: MakeChaos
) -> None:
    c = chaos_cluster(valkey.url)
    run = chaos("kill_9_node", c, seed=5001)
    group = f"room-{c.namespace}"
    controls = [await run.subscriber(f"c{i}", 1, [group]) for i in range(PROFILE.subscribers)]
    victims = [await run.subscriber(f"v0.{i}", 2, [group]) for i in range(PROFILE.subscribers)]
    run.publisher("pg", 0, f"group:{group}", PROFILE.rate * 0.8)
    run.publisher("pu", 0, run.uid(victims[0]), PROFILE.rate * 0.2)  # a uid stream resumes too
    run.start_load()
    reconnect: list[float] = []
    purge: list[float] = []
    for r in range(PROFILE.rounds):
        if r:  # fresh victims on the restarted node (the earlier ones stay where they went)
            victims += [await run.subscriber(f"v{r}.{i}", 2, [group])
                        for i in range(PROFILE.subscribers)]  # fmt: skip
        await asyncio.sleep(PROFILE.phase)
        on_victim = [v for v in victims if not v.reconnects]
        t_kill = time.monotonic()
        c.kill(2)
        await run.resumed(on_victim, 1)
        reconnect += [v.reconnects[0].up - t_kill for v in on_victim]  # type: ignore[operator]

        async def purged() -> bool:
            _, stats = await get_json(f"{c.api_urls[0]}/api/stats")
            _, members = await get_json(f"{c.api_urls[0]}/api/presence?to=group:{group}")
            return bool(len(stats["nodes"]) == 2 and members["count"] == len(run.subs))

        await wait_for("dead node purged from presence", purged, 15, 0.1)
        purge.append(time.monotonic() - t_kill)
        await asyncio.sleep(PROFILE.phase)
        await asyncio.to_thread(c.nodes[2].start)
    await asyncio.sleep(PROFILE.phase)
    await run.stop_load()
    victims_acc, controls_acc = run.total(victims), run.total(controls)
    line = run.report(reconnect_ms=spread(reconnect), purge_s=[round(p, 2) for p in purge],
                      control=run.figures(controls), **await run.leak_gates())  # fmt: skip
    assert victims_acc.exact and victims_acc.reported == 0, run.explain(line, victims)
    # a group and a uid stream per resume, all recovered
    assert line["resume"] == {"recovered": len(reconnect) * 2}, run.explain(line)
    assert line["anomalies"] == 0 and line["errors"] == 0, run.explain(line)
    assert controls_acc.exact and line["control"]["reconnects"] == 0, run.explain(line)
    assert line["acked"] > 0 and line["refused"] == 0, run.explain(line)
    assert max(purge) < 6, f"dead node purged after {purge} s (node TTL 3 s)"
