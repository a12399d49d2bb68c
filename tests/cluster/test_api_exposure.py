"""The HTTP API can no longer be opened to the network by accident: a non-loopback
--api-host needs --api-key (or --api-insecure, said on purpose), and with a key /metrics
wants it too."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import aiohttp
import pytest

from wscluster.embedded import EmbeddedRedis, free_port

from .conftest import Cluster

KEY = "api-exposure-key-0123456789"


def serve(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "wscluster", "serve", "--anonymous", "--broker", "memory://",
           "--port", str(free_port()), "--api-port", str(free_port()), *args]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=20)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.7", "api.example"])
def test_a_public_api_without_a_key_refuses_to_start(host: str) -> None:
    done = serve("--api-host", host)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "--api-key" in lines[0] and "Traceback" not in done.stderr, lines


async def test_api_insecure_starts_it_anyway(valkey: EmbeddedRedis, make_cluster: Any) -> None:
    c: Cluster = make_cluster(valkey.url, 1, ["--api-host", "0.0.0.0", "--api-insecure"])
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{c.api_urls[0]}/api/stats") as r:
            assert r.status == 200


async def test_metrics_need_the_key_when_there_is_one(
    valkey: EmbeddedRedis, make_cluster: Any
) -> None:
    c: Cluster = make_cluster(valkey.url, 1, ["--api-host", "0.0.0.0", "--api-key", KEY])
    url = f"{c.api_urls[0]}/metrics"
    async with aiohttp.ClientSession() as http:
        async with http.get(url) as r:
            assert r.status == 401
        async with http.get(url, headers={"Authorization": "Bearer nope"}) as r:
            assert r.status == 401
        async with http.get(url, headers={"Authorization": f"Bearer {KEY}"}) as r:
            assert r.status == 200
            assert "wscluster_" in await r.text()
        async with http.get(f"{c.api_urls[0]}/healthz") as r:  # for load balancers: open
            assert r.status == 200


async def test_metrics_stay_open_on_a_loopback_api_without_a_key(
    valkey: EmbeddedRedis, make_cluster: Any
) -> None:
    c: Cluster = make_cluster(valkey.url, 1)
    async with aiohttp.ClientSession() as http, http.get(f"{c.api_urls[0]}/metrics") as r:
        assert r.status == 200
