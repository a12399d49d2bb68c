"""Real clusters for tests: node processes started through the CLI on a private valkey."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from wscluster.embedded import EmbeddedRedis, free_port

from .wsclient import close_all


class NodeProc:
    def __init__(
        self, index: int, args: list[str], log_dir: Path, env: dict[str, str] | None = None
    ) -> None:
        self.index = index
        self.env = env  # extra environment variables for the node process
        self.port = free_port()
        self.api_port = free_port()
        self.args = args
        self.log_path = log_dir / f"node{index}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def start(self, wait: bool = True) -> None:
        # anonymous unless the test configures JWT; the tests that flood a connection need a
        # rate limit above the default (the rate-limit tests pass their own, which win)
        auth = [] if any(a.startswith("--jwt-") for a in self.args) else ["--anonymous"]
        cmd = [
            sys.executable, "-m", "wscluster", "serve", *auth, "--host", "127.0.0.1",
            "--port", str(self.port), "--api-port", str(self.api_port),
            "--node-name", f"node{self.index}", "--rate-limit", "20000", "--rate-burst", "20000",
            # likewise the byte budget: tests publish far more from one connection than a user
            "--send-rate-bytes", "0",
            *self.args,
        ]  # fmt: skip
        log = open(self.log_path, "ab")  # handed to the child
        env = {**os.environ, **self.env} if self.env else None
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=env)
        log.close()
        if wait:
            self.wait_healthy()

    def wait_healthy(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"node{self.index} exited:\n{self.log()}")
            try:
                with urllib.request.urlopen(f"{self.http_url}/healthz", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"node{self.index} not healthy in {timeout}s:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def terminate(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)


class Cluster:
    def __init__(
        self, redis_url: str, n: int, log_dir: Path, extra: list[str],
        env: dict[str, str] | None = None,
    ) -> None:  # fmt: skip
        self.redis_url = redis_url
        self.namespace = f"t{uuid.uuid4().hex[:10]}"
        base = ["--broker", redis_url, "--namespace", self.namespace, *extra]
        self.nodes = [NodeProc(i, base, log_dir, env) for i in range(n)]

    @property
    def ws_urls(self) -> list[str]:
        return [n.ws_url for n in self.nodes]

    @property
    def api_urls(self) -> list[str]:
        return [n.api_url for n in self.nodes]

    def start(self) -> None:
        for node in self.nodes:
            node.start(wait=False)
        for node in self.nodes:
            node.wait_healthy()

    def kill(self, i: int) -> None:
        self.nodes[i].kill()

    def restart(self, i: int) -> None:
        self.nodes[i].kill()
        self.nodes[i].start()

    def stop(self) -> None:
        for node in self.nodes:
            node.kill()


def _make(
    redis_url: str, tmp: Path, n: int = 3, extra: list[str] | None = None,
    env: dict[str, str] | None = None,
) -> Cluster:  # fmt: skip
    cluster = Cluster(redis_url, n, tmp, extra or [], env)
    cluster.start()
    return cluster


@pytest.fixture(scope="module")
def cluster(valkey: EmbeddedRedis, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Three nodes shared by a test module (tests must use unique uids and groups)."""
    c = _make(valkey.url, tmp_path_factory.mktemp("cluster"), extra=["--node-heartbeat", "0.5"])
    yield c
    c.stop()


@pytest.fixture
def make_cluster(tmp_path: Path) -> Iterator[object]:
    """Factory for a private cluster a test may break: make_cluster(redis_url, n, extra, env)
    (``env``: extra environment variables for the node processes)."""
    made: list[Cluster] = []

    def factory(
        redis_url: str, n: int = 3, extra: list[str] | None = None,
        env: dict[str, str] | None = None,
    ) -> Cluster:  # fmt: skip
        c = _make(redis_url, tmp_path, n, extra, env)
        made.append(c)
        return c

    yield factory
    for c in made:
        c.stop()


@pytest.fixture(autouse=True)
async def _close_websockets() -> AsyncIterator[None]:
    yield
    await close_all()


@pytest.fixture
def unique() -> str:
    return uuid.uuid4().hex[:8]


if os.environ.get("WSCLUSTER_TEST_DEBUG"):
    print("cluster logs kept under pytest's tmp dirs")
