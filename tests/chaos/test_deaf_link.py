"""A broker link that is connected but deaf: node 2 talks to valkey through a proxy that,
switched to deaf, drops every pub/sub message on the open connections while PING and every
reply still pass. The node must notice by its probe (/healthz degraded, a warning in its
log), restart its subscriber, and repair the hole from the history: its clients, which stay
connected, lose nothing. A control client on node 1 is untouched. Publishers on node 0."""

from __future__ import annotations

import asyncio
import time

import pytest

from wscluster.embedded import EmbeddedRedis

from .conftest import MakeChaos, MakeChaosCluster
from .harness import PROFILE, get_json, metric
from .proxy import DeafProxy

pytestmark = pytest.mark.timeout(PROFILE.timeout)


async def test_deaf_broker_link_detected_and_repaired(
    valkey: EmbeddedRedis, chaos_cluster: MakeChaosCluster, chaos: MakeChaos
) -> None:
    proxy = DeafProxy(valkey.host, valkey.port)
    await proxy.start()
    try:
        # started from a thread: the proxy lives on this event loop
        c = await asyncio.to_thread(chaos_cluster, valkey.url, brokers={2: proxy.url})
        run = chaos("deaf_link", c, seed=5006)
        group = f"room-{c.namespace}"
        controls = [await run.subscriber(f"c{i}", 1, [group]) for i in range(PROFILE.subscribers)]
        deaf = [await run.subscriber(f"d{i}", 2, [group]) for i in range(PROFILE.subscribers)]
        run.publisher("pg", 0, f"group:{group}", PROFILE.rate * 0.8)
        run.publisher("pu", 0, run.uid(deaf[0]), PROFILE.rate * 0.2)
        run.start_load()
        detected: list[float] = []
        healed: list[float] = []
        bodies: list[dict[str, object]] = []  # of the 503 answers
        health = f"{c.nodes[2].http_url}/healthz"
        for _ in range(PROFILE.rounds):
            await asyncio.sleep(PROFILE.phase)
            t0 = time.monotonic()
            assert proxy.go_deaf() > 0
            async with asyncio.timeout(15):  # degraded, then healthy again
                while (answer := await get_json(health))[0] == 200:
                    await asyncio.sleep(0.05)
                detected.append(time.monotonic() - t0)
                while answer[0] != 200:
                    bodies.append(answer[1])
                    await asyncio.sleep(0.05)
                    answer = await get_json(health)
                healed.append(time.monotonic() - t0)
        await asyncio.sleep(PROFILE.phase)
        await run.stop_load()
        deaf_acc, controls_acc = run.total(deaf), run.total(controls)
        repaired = await metric(c.nodes[2:], "wscluster_history_repaired_total")
        line = run.report(detected_s=[round(t, 2) for t in detected], dropped=proxy.dropped,
                          healed_s=[round(t, 2) for t in healed], repaired=repaired,
                          control=run.figures(controls), **await run.leak_gates())  # fmt: skip
    finally:
        await proxy.close()
    assert proxy.dropped > 0, run.explain(line)
    assert deaf_acc.exact and deaf_acc.reported == 0 and line["gaps"] == {}, run.explain(line)
    assert line["anomalies"] == 0 and line["errors"] == 0, run.explain(line)
    assert controls_acc.exact and line["control"]["reconnects"] == 0, run.explain(line)
    assert line["reconnects"] == 0 and line["acked"] > 0, run.explain(line)
    assert max(detected) < 6, f"deaf link noticed after {detected} s (--check-interval 1)"
    log = c.nodes[2].log()
    assert log.count("deaf") >= PROFILE.rounds and "degraded" in log, log
    statuses = {(b.get("status"), b.get("reason")) for b in bodies}
    assert "degraded" in {s for s, _ in statuses}, f"/healthz said only {statuses}"
