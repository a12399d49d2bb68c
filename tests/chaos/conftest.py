"""Fixtures of the chaos suite: clusters of real node processes with history on, and a
valkey with persistence (AOF) for the scenarios that restart it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from tests.cluster.conftest import Cluster
from tests.conftest import skip_or_fail
from wscluster.embedded import EmbeddedRedis, EmbeddedRedisError

from .harness import NODE_ARGS, Chaos

MakeChaosCluster = Callable[..., Cluster]
MakeChaos = Callable[[str, Cluster, int], Chaos]


@pytest.fixture
async def chaos() -> AsyncIterator[MakeChaos]:
    """``chaos(scenario, cluster, seed)``: a scenario whose clients are closed at teardown
    even when it fails before its leak gates."""
    runs: list[Chaos] = []

    def make(scenario: str, cluster: Cluster, seed: int) -> Chaos:
        runs.append(Chaos(scenario, cluster, seed))
        return runs[-1]

    yield make
    for run in runs:
        await run.close()


@pytest.fixture
def chaos_cluster(tmp_path: Path) -> Iterator[MakeChaosCluster]:
    """``chaos_cluster(redis_url, n=3, brokers={i: url})``: n nodes started with NODE_ARGS on
    their own namespace; ``brokers`` gives some nodes another broker URL (a proxy)."""
    made: list[Cluster] = []

    def factory(redis_url: str, n: int = 3, brokers: dict[int, str] | None = None) -> Cluster:
        c = Cluster(redis_url, n, tmp_path, list(NODE_ARGS))
        made.append(c)
        for i, url in (brokers or {}).items():
            node = c.nodes[i]
            node.args = [url if a == redis_url else a for a in node.args]
        c.start()
        return c

    yield factory
    for c in made:
        c.stop()


@pytest.fixture
def aof_valkey() -> Iterator[EmbeddedRedis]:
    """A private valkey with appendonly on: what it acked survives a kill -9 and restart."""
    server = EmbeddedRedis(appendonly=True, appendfsync="always")
    try:
        server.start()
    except EmbeddedRedisError as exc:
        skip_or_fail(f"cannot start valkey-server: {exc}")
    yield server
    server.cleanup()
