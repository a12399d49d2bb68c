"""The systems under test: wscluster and its peers, each started with a private valkey.

Every system exposes ``urls`` (one WebSocket URL per server process), ``proto`` (the wire
protocol its clients speak) and ``procs`` (name -> pid of every server-side process, for CPU
and RSS). ``start()`` returns when every server answers its health check.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
NODE_DIR = HERE / "peers" / "node"
SCENARIOS = ("fanout", "private", "rooms", "idle", "storm")


def pin(pid: int, cpus: list[int] | None) -> None:
    """Pin every thread of ``pid`` (threads started later inherit from their creator)."""
    if not cpus:
        return
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            os.sched_setaffinity(int(tid), cpus)
    except OSError:
        pass


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of a live process (all its threads), from /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _preexec(cpus: list[int] | None) -> Any:
    from wscluster.embedded import die_with_parent

    def run() -> None:
        die_with_parent()
        if cpus:
            os.sched_setaffinity(0, cpus)

    return run


class System:
    name = ""
    proto = "wsc"
    scenarios: tuple[str, ...] = SCENARIOS
    health_path = "/healthz"

    def __init__(self, nodes: int, cpus: list[int] | None = None) -> None:
        self.nodes = nodes
        self.cpus = cpus
        self.redis: Any = None
        self.popens: list[subprocess.Popen[bytes]] = []
        self.ports: list[int] = []
        self.logdir = Path(tempfile.mkdtemp(prefix=f"bench-{self.name}-"))
        self.extra_procs: dict[str, int] = {}

    # -- subclass hooks ------------------------------------------------------------------
    def command(self, i: int, port: int) -> list[str]:
        raise NotImplementedError

    def url(self, port: int) -> str:
        return f"ws://127.0.0.1:{port}/ws"

    def prepare(self) -> None:
        """Install what the system needs (runs before start)."""

    # -- lifecycle -----------------------------------------------------------------------
    @property
    def urls(self) -> list[str]:
        return [self.url(p) for p in self.ports]

    @property
    def procs(self) -> dict[str, int]:
        out = {f"{self.name}{i}": p.pid for i, p in enumerate(self.popens)}
        if self.redis is not None and self.redis.pid:
            out["redis"] = self.redis.pid
        return {**out, **self.extra_procs}

    @property
    def server_pids(self) -> list[int]:
        """The processes that hold client connections (node 0 first)."""
        return [p.pid for p in self.popens]

    def start_redis(self) -> None:
        from wscluster.embedded import EmbeddedRedis

        self.redis = EmbeddedRedis()
        self.redis.start()
        pin(self.redis.pid, self.cpus)

    def start(self) -> None:
        from wscluster.embedded import free_port

        self.prepare()
        self.start_redis()
        self.ports = [free_port() for _ in range(self.nodes)]
        for i, port in enumerate(self.ports):
            with open(self.logdir / f"server{i}.log", "ab") as log:
                self.popens.append(subprocess.Popen(
                    self.command(i, port), stdout=log, stderr=log, cwd=HERE.parent,
                    preexec_fn=_preexec(self.cpus)))  # fmt: skip
        for i, port in enumerate(self.ports):
            self._wait_healthy(i, port)

    def _wait_healthy(self, i: int, port: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popens[i].poll() is not None:
                raise RuntimeError(f"{self.name} server {i} exited:\n{self.log(i)}")
            try:
                url = f"http://127.0.0.1:{port}{self.health_path}"
                with urllib.request.urlopen(url, timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} server {i} not healthy in {timeout}s:\n{self.log(i)}")

    def log(self, i: int) -> str:
        try:
            return (self.logdir / f"server{i}.log").read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def crashed(self) -> list[str]:
        """Servers that died during the run, with the end of their log."""
        return [f"{self.name} server {i} exit {p.returncode}: {self.log(i)[-500:]}"
                for i, p in enumerate(self.popens) if p.poll() is not None]  # fmt: skip

    def stop(self) -> None:
        for p in self.popens:
            if p.poll() is None:
                p.terminate()
        for p in self.popens:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        if self.redis is not None:
            self.redis.cleanup()
        shutil.rmtree(self.logdir, ignore_errors=True)


class WsCluster(System):
    name = "wscluster"

    def __init__(self, nodes: int, cpus: list[int] | None = None, node_args: str = "",
                 max_connections: int = 20000) -> None:  # fmt: skip
        super().__init__(nodes, cpus)
        self.node_args = node_args.split()
        self.max_connections = max_connections
        self.namespace = f"bench{uuid.uuid4().hex[:6]}"

    def command(self, i: int, port: int) -> list[str]:
        from wscluster.embedded import free_port

        return [sys.executable, "-m", "wscluster", "serve", "--host", "127.0.0.1",
                "--port", str(port), "--api-port", str(free_port()), "--anonymous",
                "--broker", self.redis.url, "--namespace", self.namespace,
                "--node-name", f"bench{i}", "--max-connections", str(self.max_connections),
                "--max-connections-per-uid", "0", "--rate-limit", "0",
                # the load generator's connections send far more than a user: no per-client
                # budgets (the peers have none either)
                "--send-rate-bytes", "0", "--ping-rate", "0",
                "--log-level", "warning", *self.node_args]  # fmt: skip


class External(System):
    """An existing wscluster (``--url``): nothing is started; pids only when given."""

    name = "wscluster"

    def __init__(self, urls: list[str], pids: list[int]) -> None:
        super().__init__(len(urls))
        self._urls = urls
        self._pids = pids

    @property
    def urls(self) -> list[str]:
        return self._urls

    @property
    def procs(self) -> dict[str, int]:
        return {f"wscluster{i}": p for i, p in enumerate(self._pids)}

    @property
    def server_pids(self) -> list[int]:
        return list(self._pids)

    def start(self) -> None:
        pass

    def stop(self) -> None:
        shutil.rmtree(self.logdir, ignore_errors=True)


class PySocketIO(System):
    name = "python-socketio"
    proto = "sio"

    def __init__(self, nodes: int, cpus: list[int] | None = None, mode: str = "asgi") -> None:
        super().__init__(nodes, cpus)
        self.mode = mode

    def prepare(self) -> None:
        try:
            import socketio  # noqa: F401
        except ImportError as exc:
            raise SystemExit("--peer python-socketio needs: pip install -e '.[bench]'") from exc

    def command(self, i: int, port: int) -> list[str]:
        return [sys.executable, str(HERE / "peers" / "pysio_server.py"), "--port", str(port),
                "--redis", self.redis.url, "--mode", self.mode]  # fmt: skip

    def url(self, port: int) -> str:
        return f"ws://127.0.0.1:{port}/socket.io/?EIO=4&transport=websocket"


class SocketIONode(System):
    name = "socketio-node"
    proto = "sio"

    def prepare(self) -> None:
        if (NODE_DIR / "node_modules" / "@socket.io" / "redis-adapter").is_dir():
            return
        npm = shutil.which("npm")
        if npm is None:
            raise SystemExit("--peer socketio-node needs Node.js and npm on PATH")
        print(f"installing the Node peer's packages into {NODE_DIR} (npm install) ...",
              file=sys.stderr, flush=True)  # fmt: skip
        subprocess.run([npm, "install", "--no-audit", "--no-fund", "--loglevel", "error"],
                       cwd=NODE_DIR, check=True)  # fmt: skip

    def command(self, i: int, port: int) -> list[str]:
        node = shutil.which("node") or "node"
        return [node, str(NODE_DIR / "server.js"), "--port", str(port), "--redis", self.redis.url]

    def url(self, port: int) -> str:
        return f"ws://127.0.0.1:{port}/socket.io/?EIO=4&transport=websocket"


class PicowsEcho(System):
    """Floor for idle RSS and handshakes: a bare picows server (no broker, no routing)."""

    name = "picows-echo"
    scenarios = ("idle",)
    health_path = "/"

    def start_redis(self) -> None:
        pass

    def command(self, i: int, port: int) -> list[str]:
        return [sys.executable, str(HERE / "peers" / "echo_server.py"), "--port", str(port)]

    def _wait_healthy(self, i: int, port: int, timeout: float = 30) -> None:
        import socket

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popens[i].poll() is not None:
                raise RuntimeError(f"{self.name} server {i} exited:\n{self.log(i)}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"{self.name} server {i} not listening:\n{self.log(i)}")


class FanoutFloor(System):
    """Not a server: the kernel's own cost of the fan-out (bench/floor.py), as a lower bound
    for every system's fixed-rate fan-out latency on this machine."""

    name = "floor"
    scenarios = ("fanout",)

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def measure(self, args: Any) -> dict[str, Any]:
        from .floor import measure

        fixed = measure(args.members, self.nodes, args.fanout_rate, args.duration)
        return {"scenario": "fanout", "system": self.name, "nodes": self.nodes,
                "fixed_rate": {**fixed, "lost": fixed["expected"] - fixed["deliveries"]}}


PEERS: dict[str, type[System]] = {
    "python-socketio": PySocketIO,
    "socketio-node": SocketIONode,
    "picows-echo": PicowsEcho,
    "floor": FanoutFloor,
}
