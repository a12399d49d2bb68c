"""`wscluster serve --workers N`: a real supervisor and its worker processes on one public port
(SO_REUSEPORT), against the session's valkey."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp
import pytest

from wscluster.embedded import EmbeddedRedis, free_port

from .wsclient import WS

pytestmark = pytest.mark.skipif(not hasattr(socket, "SO_REUSEPORT"), reason="no SO_REUSEPORT")

_WORKER_LINE = re.compile(r"worker (\d+): pid (\d+), api ")
_NODE_ID = re.compile(r"_w(\d+)-[0-9a-f]{8}$")  # node name <host:port>/w<i>, '/' shown as '_'


def _free_ports(n: int) -> int:
    """The first of n consecutive free ports, below Linux's ephemeral range (32768-60999) so
    that no outgoing connection takes one of them before a worker binds it."""
    rng = random.Random()
    while True:
        base = rng.randrange(20000, 32000 - n)
        try:
            with contextlib.ExitStack() as stack:
                for port in range(base, base + n):
                    sock = stack.enter_context(socket.socket())
                    sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue


class Supervised:
    """``wscluster serve --workers N`` in its own process group, logging to a file."""

    def __init__(self, redis_url: str, namespace: str, log_path: Path) -> None:
        self.port = free_port()
        self.api_port = _free_ports(2)  # worker i's API port is api_port + i
        self.base = [
            sys.executable, "-m", "wscluster", "serve", "--anonymous", "--host", "127.0.0.1",
            "--broker", redis_url, "--namespace", namespace, "--port", str(self.port),
            "--api-port", str(self.api_port), "--drain-timeout", "2", "--node-heartbeat", "0.5",
        ]  # fmt: skip
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def start(self, *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = open(self.log_path, "ab")  # handed to the child
        self.proc = subprocess.Popen(
            [*self.base, *extra], stdout=log, stderr=log, start_new_session=True,
            env={**os.environ, **(env or {})},
        )  # fmt: skip
        log.close()
        return self.proc

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def worker_pids(self) -> dict[int, int]:
        """Worker index -> pid of its latest start, from the supervisor's log lines."""
        return {int(i): int(pid) for i, pid in _WORKER_LINE.findall(self.log())}

    def children(self) -> list[int]:
        assert self.proc is not None
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]

    async def health(self, api_port: int) -> dict[str, object] | None:
        try:
            async with aiohttp.ClientSession() as http, http.get(
                f"http://127.0.0.1:{api_port}/healthz", timeout=aiohttp.ClientTimeout(total=1)
            ) as r:
                return await r.json() if r.status == 200 else None  # type: ignore[no-any-return]
        except (aiohttp.ClientError, TimeoutError):
            return None

    async def wait_healthy(self, n: int, timeout: float = 15.0) -> list[dict[str, object]]:
        """Every worker's /healthz body (API ports api_port .. api_port + n - 1)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"supervisor exited {self.proc.returncode}:\n{self.log()}")
            bodies = [await self.health(self.api_port + i) for i in range(n)]
            if all(bodies):
                return [b for b in bodies if b]
            await asyncio.sleep(0.05)
        raise AssertionError(f"workers not healthy in {timeout}s:\n{self.log()}")

    def kill(self) -> None:
        """The finalizer: SIGKILL the whole process group, supervisor and workers."""
        if self.proc is None:
            return
        with_pids = [self.proc.pid, *self.worker_pids().values()]
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)
        for pid in with_pids[1:]:  # a worker outside the group (it should not be) dies too
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


Make = Callable[[], Supervised]


@pytest.fixture
def supervised(valkey: EmbeddedRedis, unique: str, tmp_path: Path) -> Iterator[Make]:
    made: list[Supervised] = []

    def make() -> Supervised:
        s = Supervised(valkey.url, f"w{unique}{len(made)}", tmp_path / f"sup{len(made)}.log")
        made.append(s)
        return s

    yield make
    for s in made:
        s.kill()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is not alive
        return f.read().rpartition(")")[2].split()[0] != "Z"


async def _open_many(url: str, n: int) -> list[WS]:
    return list(await asyncio.gather(*(WS.open(url) for _ in range(n))))


def _index(node_id: object) -> int:
    """The worker index in a node id (``..._w1-3f2a9c1e``)."""
    match = _NODE_ID.search(str(node_id))
    assert match, node_id
    return int(match.group(1))


def _worker_of(ws: WS) -> int:
    return _index(ws.welcome["node"])


async def test_one_port_spreads_over_workers_and_they_talk(supervised: Make,
                                                           unique: str) -> None:  # fmt: skip
    s = supervised()
    s.start("--workers", "2")
    bodies = await s.wait_healthy(2)
    # each API port is its own worker: distinct node ids, named .../w0 and .../w1
    assert [_index(b["node"]) for b in bodies] == [0, 1]
    assert len(s.children()) == 2, s.log()

    clients = await _open_many(s.ws_url, 40)
    nodes = {ws.welcome["node"] for ws in clients}
    assert len(nodes) == 2, nodes
    assert {_worker_of(ws) for ws in clients} == {0, 1}
    assert nodes == {b["node"] for b in bodies}

    # a private message from a client on worker 0 to one on worker 1 crosses the broker
    a = next(ws for ws in clients if _worker_of(ws) == 0)
    b = next(ws for ws in clients if _worker_of(ws) == 1)
    await a.ok({"type": "login", "uid": f"a{unique}"})
    await b.ok({"type": "login", "uid": f"b{unique}"})
    await a.ok({"type": "send", "to": f"uid:b{unique}", "data": {"text": "hi w1"}})
    msg = await b.next(type="message")
    assert msg["data"] == {"text": "hi w1"}
    assert msg["from"]["uid"] == f"a{unique}"


async def test_sigterm_drains_every_worker_and_exits_0(supervised: Make) -> None:
    s = supervised()
    proc = s.start("--workers", "2")
    await s.wait_healthy(2)
    clients = await _open_many(s.ws_url, 20)
    assert {_worker_of(ws) for ws in clients} == {0, 1}
    pids = list(s.worker_pids().values())
    assert len(pids) == 2

    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    async with asyncio.timeout(2 + 5):
        await asyncio.gather(*(ws.conn.wait_closed() for ws in clients))
        while proc.poll() is None:
            await asyncio.sleep(0.05)
    assert proc.returncode == 0, s.log()
    assert time.monotonic() - started < 2 + 5
    assert {ws.conn.close_code for ws in clients} <= {1001, 1012}, s.log()
    assert not [pid for pid in pids if _alive(pid)]
    assert "SIGTERM: stopping the workers" in s.log()


async def test_killed_worker_is_restarted(supervised: Make) -> None:
    s = supervised()
    s.start(env={"WSCLUSTER_WORKERS": "2"})  # the option from the environment
    before = await s.wait_healthy(2)
    assert len(s.children()) == 2, s.log()  # and the workers did not start workers
    old = s.worker_pids()[1]
    os.kill(old, signal.SIGKILL)
    deadline = time.monotonic() + 10
    reaped = f"worker 1 (pid {old}) exited unexpectedly"
    while reaped not in s.log():  # until then, its socket may still take (and reset) some
        assert time.monotonic() < deadline, s.log()
        await asyncio.sleep(0.01)

    while True:  # the port keeps accepting meanwhile: worker 0 takes every new connection
        ws = await WS.open(s.ws_url)
        await ws.close()
        body = await s.health(s.api_port + 1)
        if body is not None and body["node"] != before[1]["node"]:
            break
        assert time.monotonic() < deadline, s.log()
        await asyncio.sleep(0.1)
    assert _index(body["node"]) == 1
    assert s.worker_pids()[1] != old
    assert s.proc is not None and s.proc.poll() is None
    clients = await _open_many(s.ws_url, 30)
    assert {_worker_of(ws) for ws in clients} == {0, 1}


async def test_port_in_use_gives_up(supervised: Make) -> None:
    s = supervised()
    with socket.socket() as taken:  # a listener without SO_REUSEPORT: the workers cannot bind
        taken.bind(("127.0.0.1", s.port))
        taken.listen()
        proc = s.start("--workers", "2")
        deadline = time.monotonic() + 15
        while proc.poll() is None:
            assert time.monotonic() < deadline, f"still running after 15 s:\n{s.log()}"
            await asyncio.sleep(0.1)
    assert proc.returncode == 1
    # found before any worker starts (issue 15's preflight), else the supervisor gives up
    assert f"127.0.0.1:{s.port} is already in use" in s.log() or "giving up" in s.log()
    assert not [pid for pid in s.worker_pids().values() if _alive(pid)]


async def test_one_worker_is_the_plain_node(supervised: Make) -> None:
    s = supervised()
    s.start("--workers", "1")
    (body,) = await s.wait_healthy(1)
    assert not _NODE_ID.search(str(body["node"]))  # no /w0: the node itself, not a worker
    assert s.children() == []
    assert "supervisor" not in s.log()


@pytest.mark.parametrize("extra, message", [
    (["--workers", "-1"], "--workers must be >= 0"),
    (["--workers", "2", "--port", "0"], "fixed --port"),
])  # fmt: skip
def test_bad_workers_options_exit_2(supervised: Make, extra: list[str], message: str) -> None:
    s = supervised()
    proc = s.start(*extra)
    assert proc.wait(20) == 2
    assert message in s.log()
