"""Redis (valkey) killed with -9 and started again under load, the nodes staying up.

Empty (no persistence): every node resubscribes; the history went with the epoch, so
messages may be lost, but every loss is announced to the clients (a `gap` or a resume's
`recovered: false`), never a silent gap. With AOF: nothing acked is lost (the history and its
epoch survive). Publishers on node 0, subscribers on nodes 1 and 2; one subscriber loses its
connection during the outage and resumes after it (`epoch_changed`, or recovered with AOF)."""

from __future__ import annotations

import asyncio
import time
from functools import partial
from typing import Any

import pytest

from tests.cluster.conftest import Cluster
from wscluster.embedded import EmbeddedRedis

from .client import Msg
from .conftest import MakeChaos, MakeChaosCluster
from .harness import PROFILE, Chaos, get_json, wait_for

pytestmark = pytest.mark.timeout(PROFILE.timeout)


async def _all_heard(run: Chaos, since: float) -> bool:
    return all(s.heard > since for s in run.subs)


async def _restarts_under_load(
    chaos: MakeChaos, name: str, seed: int, server: EmbeddedRedis, c: Cluster
) -> tuple[Chaos, dict[str, Any]]:
    run = chaos(name, c, seed)
    group = f"room-{c.namespace}"
    await run.steady_load(group)
    healthy, heard = [], []
    for _ in range(PROFILE.rounds):
        await asyncio.sleep(PROFILE.phase)
        outage = asyncio.create_task(asyncio.to_thread(server.restart, 0.5))  # kill -9, 0.5 s
        await asyncio.sleep(0.2)
        run.subs[0].drop()  # it resumes from a position of the old epoch once redis is back
        await outage
        t_up = time.monotonic()

        async def all_healthy() -> bool:
            codes = [(await get_json(f"{n.http_url}/healthz"))[0] for n in c.nodes]
            return codes == [200] * len(c.nodes)

        healthy.append(await wait_for("every node healthy again", all_healthy, 15, 0.1))
        await wait_for("every subscriber hearing again", partial(_all_heard, run, t_up), 15)
        heard.append(max(s.heard for s in run.subs) - t_up)
        await asyncio.sleep(PROFILE.phase)
    await run.stop_load()
    epochs = {m.epoch for s in run.subs for m in s.log if isinstance(m, Msg)}
    return run, {
        "healthy_s": [round(t, 2) for t in healthy],
        "resubscribed_s": [round(t, 2) for t in heard],  # up to every subscriber hearing again
        "epochs": len(epochs),  # of the group and the uid streams together
    }


async def test_redis_restarted_empty(
    own_valkey: EmbeddedRedis, chaos_cluster: MakeChaosCluster, chaos: MakeChaos
) -> None:
    c = chaos_cluster(own_valkey.url)
    run, figures = await _restarts_under_load(chaos, "redis_restart_empty", 5002, own_valkey, c)
    acc = run.total()
    line = run.report(**figures, **await run.leak_gates())
    assert acc.no_silent_loss, run.explain(line)
    assert line["anomalies"] == 0 and line["errors"] == 0, run.explain(line)
    # the history really was lost: a new epoch per stream per round
    assert figures["epochs"] == 2 * (1 + PROFILE.rounds), run.explain(line)
    assert set(line["resume"]) == {"epoch_changed"}, run.explain(line)
    assert line["acked"] > 0 and line["reconnects"] == PROFILE.rounds, run.explain(line)


async def test_redis_restarted_with_aof(
    aof_valkey: EmbeddedRedis, chaos_cluster: MakeChaosCluster, chaos: MakeChaos
) -> None:
    c = chaos_cluster(aof_valkey.url)
    run, figures = await _restarts_under_load(chaos, "redis_restart_aof", 5012, aof_valkey, c)
    acc = run.total()
    line = run.report(**figures, **await run.leak_gates())
    assert acc.exact and acc.reported == 0 and line["gaps"] == {}, run.explain(line)
    assert line["anomalies"] == 0 and line["errors"] == 0, run.explain(line)
    assert figures["epochs"] == 2, run.explain(line)  # one per stream: the history survived
    assert set(line["resume"]) == {"recovered"}, run.explain(line)
    assert line["acked"] > 0 and line["reconnects"] == PROFILE.rounds, run.explain(line)
