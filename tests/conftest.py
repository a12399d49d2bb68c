"""Shared fixtures: a private Valkey per test session, unique namespaces.

Tests never touch the machine's shared Redis on 6379. When a needed service cannot be had,
the test is skipped with the reason, except under WSCLUSTER_NO_SKIP=1 (set by .ci/run),
where it fails instead.
"""

from __future__ import annotations

import os
import socket
import urllib.parse
import uuid
from collections.abc import Iterator

import pytest

from wscluster.embedded import ChildServer, EmbeddedNats, EmbeddedRedis, EmbeddedRedisError

NO_SKIP = os.environ.get("WSCLUSTER_NO_SKIP") == "1"


def skip_or_fail(reason: str) -> None:
    if NO_SKIP:
        pytest.fail(f"{reason} (skips are forbidden: WSCLUSTER_NO_SKIP=1)")
    pytest.skip(reason)


def _started(server: ChildServer) -> ChildServer:
    try:
        server.start()
    except EmbeddedRedisError as exc:
        skip_or_fail(f"cannot start {server.name}: {exc}")
    return server


@pytest.fixture(scope="session")
def valkey() -> Iterator[EmbeddedRedis]:
    """A private valkey-server for the whole session (do not restart it: see `own_valkey`)."""
    server = EmbeddedRedis()
    _started(server)
    yield server
    server.cleanup()


@pytest.fixture
def own_valkey() -> Iterator[EmbeddedRedis]:
    """A private valkey-server for one test, which the test may kill and restart."""
    server = EmbeddedRedis()
    _started(server)
    yield server
    server.cleanup()


@pytest.fixture(scope="session")
def nats() -> Iterator[EmbeddedNats]:
    """A private nats-server (JetStream on) for the whole session."""
    server = EmbeddedNats()
    _started(server)
    yield server
    server.cleanup()


@pytest.fixture
def own_nats() -> Iterator[EmbeddedNats]:
    """A private nats-server for one test, which the test may kill and restart."""
    server = EmbeddedNats()
    _started(server)
    yield server
    server.cleanup()


@pytest.fixture
def nats_url(nats: EmbeddedNats) -> str:
    return nats.url


@pytest.fixture
def amqp_url() -> str:
    """RabbitMQ has no pip-installable server: the machine's (or WSCLUSTER_TEST_AMQP_URL).
    Tests isolate themselves by namespace, never by restarting it."""
    url = os.environ.get("WSCLUSTER_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
    parts = urllib.parse.urlsplit(url)
    try:
        socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 5672), 2).close()
    except OSError:
        skip_or_fail(f"RabbitMQ not reachable at {parts.hostname}:{parts.port or 5672}")
    return url


@pytest.fixture
def redis_url(valkey: EmbeddedRedis) -> str:
    return valkey.url


@pytest.fixture
def namespace() -> str:
    return f"t{uuid.uuid4().hex[:10]}"
