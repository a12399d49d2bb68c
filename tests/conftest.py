"""Shared fixtures: a private Valkey per test session, unique namespaces.

Tests never touch the machine's shared Redis on 6379. When a needed service cannot be had,
the test is skipped with the reason, except under WSCLUSTER_NO_SKIP=1 (set by .ci/run),
where it fails instead.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from wscluster.embedded import EmbeddedRedis, EmbeddedRedisError

NO_SKIP = os.environ.get("WSCLUSTER_NO_SKIP") == "1"


def skip_or_fail(reason: str) -> None:
    if NO_SKIP:
        pytest.fail(f"{reason} (skips are forbidden: WSCLUSTER_NO_SKIP=1)")
    pytest.skip(reason)


def _started() -> EmbeddedRedis:
    server = EmbeddedRedis()
    try:
        server.start()
    except EmbeddedRedisError as exc:
        skip_or_fail(f"cannot start valkey-server: {exc}")
    return server


@pytest.fixture(scope="session")
def valkey() -> Iterator[EmbeddedRedis]:
    """A private valkey-server for the whole session (do not restart it: see `own_valkey`)."""
    server = _started()
    yield server
    server.cleanup()


@pytest.fixture
def own_valkey() -> Iterator[EmbeddedRedis]:
    """A private valkey-server for one test, which the test may kill and restart."""
    server = _started()
    yield server
    server.cleanup()


@pytest.fixture
def redis_url(valkey: EmbeddedRedis) -> str:
    return valkey.url


@pytest.fixture
def namespace() -> str:
    return f"t{uuid.uuid4().hex[:10]}"
