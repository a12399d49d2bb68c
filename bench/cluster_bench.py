"""Cluster benchmark: prints numbers, never asserts.

    python bench/cluster_bench.py            # defaults: a few minutes
    python bench/cluster_bench.py --quick    # a small run
    python bench/cluster_bench.py --ws-urls ws://h:8001/ws,ws://h:8002/ws --node-pid 1234

Unless --ws-urls is given it starts a private valkey and 3 nodes (`python -m wscluster
serve`). The load comes from separate processes holding raw picows connections.

Scenarios:
  fanout  N clients spread over the nodes join one group; a publisher on node 1 sends
          timestamped messages at a fixed rate for D seconds, then flat out for F seconds.
          Reports deliveries/s, publish->receive latency (p50/p99/max) and lost deliveries.
  idle    M idle connections to node 0: handshakes/s and node RSS growth per connection.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import json
import multiprocessing as mp
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import msgspec
from picows import WSListener, WSMsgType, WSTransport, ws_connect

RESULTS = Path(__file__).resolve().parent / "results"
GROUP = "bench"


# -- wire ----------------------------------------------------------------------------------


class Payload(msgspec.Struct):
    s: int  # sequence number
    t: float  # send time (time.time())
    p: int  # phase: 0 fixed rate, 1 flat out


class Incoming(msgspec.Struct):
    type: str
    id: Any = None
    code: Any = None
    data: Payload | None = None


decode = msgspec.json.Decoder(Incoming).decode
encode = msgspec.json.encode


class Conn(WSListener):
    """A raw client connection: records message latency, resolves welcome and acks."""

    def __init__(self, stats: PhaseStats | None) -> None:
        super().__init__()
        loop = asyncio.get_running_loop()
        self.stats = stats
        self.transport: WSTransport | None = None
        self.welcome: asyncio.Future[None] = loop.create_future()
        self.acks: dict[int, asyncio.Future[Incoming]] = {}
        self.on_ack: Any = None

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def on_ws_frame(self, transport: WSTransport, frame: Any) -> None:
        if frame.msg_type is WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code())
            transport.disconnect()
            return
        if frame.msg_type is not WSMsgType.TEXT:
            return
        try:
            msg = decode(frame.get_payload_as_memoryview())
        except msgspec.ValidationError:  # a frame of another shape: not ours to measure
            return
        if msg.type == "message" and msg.data is not None and self.stats is not None:
            self.stats.record(msg.data)
        elif msg.type == "welcome":
            if not self.welcome.done():
                self.welcome.set_result(None)
        elif msg.type in ("ack", "error", "pong"):
            if self.on_ack is not None:
                self.on_ack(msg)
            fut = self.acks.pop(msg.id, None) if isinstance(msg.id, int) else None
            if fut is not None and not fut.done():
                fut.set_result(msg)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if not self.welcome.done():
            self.welcome.set_exception(ConnectionError("closed before welcome"))

    def send(self, frame: dict[str, Any]) -> None:
        assert self.transport is not None
        self.transport.send(WSMsgType.TEXT, encode(frame))

    async def request(self, frame: dict[str, Any]) -> Incoming:
        fut = asyncio.get_running_loop().create_future()
        self.acks[frame["id"]] = fut
        self.send(frame)
        return await asyncio.wait_for(fut, 30)


async def open_conn(url: str, stats: PhaseStats | None = None) -> Conn:
    conn = Conn(stats)
    await ws_connect(lambda: conn, url, use_aiofastnet=False, read_buffer_init_size=2048,
                     websocket_handshake_timeout=30)  # fmt: skip
    await asyncio.wait_for(conn.welcome, 30)
    return conn


class PhaseStats:
    """Per load process: deliveries per phase, first/last receive time, latencies (ms)."""

    def __init__(self) -> None:
        self.count = [0, 0]
        self.first = [0.0, 0.0]
        self.last = [0.0, 0.0]
        self.lat = [array.array("d"), array.array("d")]

    def record(self, data: Payload) -> None:
        now = time.time()
        p = data.p
        if not self.count[p]:
            self.first[p] = now
        self.count[p] += 1
        self.last[p] = now
        self.lat[p].append((now - data.t) * 1000.0)

    def total(self) -> int:
        return sum(self.count)


# -- load process ----------------------------------------------------------------------------


def load_main(pipe: Connection, urls: list[str], n: int, join: bool) -> None:
    """Child process: open `n` connections round-robin over `urls`, then obey the parent."""
    try:
        import uvloop

        uvloop.run(_load(pipe, urls, n, join))
    except ImportError:
        asyncio.run(_load(pipe, urls, n, join))


async def _load(pipe: Connection, urls: list[str], n: int, join: bool) -> None:
    stats = PhaseStats()
    conns: list[Conn] = []
    failed: list[str] = []
    gate = asyncio.Semaphore(64)

    async def one(i: int) -> None:
        async with gate:
            try:
                conn = await open_conn(urls[i % len(urls)], stats)
                if join:
                    ack = await conn.request({"type": "join", "group": GROUP, "id": 1})
                    if ack.type != "ack":
                        raise RuntimeError(f"join refused: {ack.code}")
                conns.append(conn)
            except Exception as exc:
                failed.append(repr(exc))

    t0 = time.time()
    await asyncio.gather(*(one(i) for i in range(n)))
    t1 = time.time()
    pipe.send(("ready", {"connected": len(conns), "failed": len(failed),
                         "errors": failed[:3], "t0": t0, "t1": t1}))  # fmt: skip
    loop = asyncio.get_running_loop()
    while True:
        ready = asyncio.Event()
        loop.add_reader(pipe.fileno(), ready.set)
        await ready.wait()
        loop.remove_reader(pipe.fileno())
        os.set_blocking(pipe.fileno(), True)  # the event loop made it non-blocking
        cmd = pipe.recv()
        if cmd == "count":
            pipe.send(("count", stats.total()))
        elif cmd == "stop":
            break
    for conn in conns:
        if conn.transport is not None:
            conn.transport.disconnect()
    await asyncio.sleep(0.2)
    pipe.send(("stats", {"count": stats.count, "first": stats.first, "last": stats.last,
                         "lat": [a.tobytes() for a in stats.lat]}))  # fmt: skip


class Load:
    """The parent's handle on the load processes."""

    def __init__(self, procs: int, urls: list[str], total: int, join: bool) -> None:
        ctx = mp.get_context("spawn")
        self.pipes: list[Connection] = []
        self.procs: list[Any] = []
        per = [total // procs + (1 if i < total % procs else 0) for i in range(procs)]
        for n in per:
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=load_main, args=(child, urls, n, join), daemon=True)
            proc.start()
            self.pipes.append(parent)
            self.procs.append(proc)

    def ready(self, timeout: float = 600) -> list[dict[str, Any]]:
        return [self._expect(p, "ready", timeout) for p in self.pipes]

    def count(self) -> int:
        for p in self.pipes:
            p.send("count")
        return sum(self._expect(p, "count", 30) for p in self.pipes)

    def stop(self) -> list[dict[str, Any]]:
        for p in self.pipes:
            p.send("stop")
        out = [self._expect(p, "stats", 120) for p in self.pipes]
        for proc in self.procs:
            proc.join(10)
        return out

    def kill(self) -> None:
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()
                proc.join(5)

    @staticmethod
    def _expect(pipe: Connection, tag: str, timeout: float) -> Any:
        if not pipe.poll(timeout):
            raise TimeoutError(f"load process did not answer {tag!r} in {timeout}s")
        got, value = pipe.recv()
        assert got == tag, (got, tag)
        return value


# -- nodes ---------------------------------------------------------------------------------


class Nodes:
    """A private valkey and `n` node processes, or nothing when URLs are given."""

    def __init__(self, n: int, max_connections: int, extra: list[str] | None = None) -> None:
        from wscluster.embedded import EmbeddedRedis, free_port

        self.redis = EmbeddedRedis()
        self.redis.start()
        self.namespace = f"bench{uuid.uuid4().hex[:6]}"
        self.logdir = Path(tempfile.mkdtemp(prefix="wscluster-bench-"))
        self.ports = [free_port() for _ in range(n)]
        self.procs: list[subprocess.Popen[bytes]] = []
        for i, port in enumerate(self.ports):
            cmd = [sys.executable, "-m", "wscluster", "serve", "--host", "127.0.0.1",
                   "--port", str(port), "--api-port", str(free_port()), "--anonymous",
                   "--broker", self.redis.url, "--namespace", self.namespace,
                   "--node-name", f"bench{i}", "--max-connections", str(max_connections),
                   "--log-level", "warning", "--rate-limit", "0", *(extra or [])]  # fmt: skip
            with open(self.logdir / f"node{i}.log", "ab") as log:
                self.procs.append(subprocess.Popen(cmd, stdout=log, stderr=log))
        for i, port in enumerate(self.ports):
            self._wait_healthy(i, port)

    @property
    def ws_urls(self) -> list[str]:
        return [f"ws://127.0.0.1:{p}/ws" for p in self.ports]

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def _wait_healthy(self, i: int, port: int) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.procs[i].poll() is not None:
                raise RuntimeError(f"node {i} exited: {self.log(i)}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"node {i} not healthy: {self.log(i)}")

    def log(self, i: int) -> str:
        return (self.logdir / f"node{i}.log").read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        self.redis.cleanup()


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


# -- scenarios -------------------------------------------------------------------------------


def percentiles(samples: array.array[float]) -> dict[str, float]:
    if not samples:
        return {"p50": float("nan"), "p99": float("nan"), "max": float("nan")}
    s = sorted(samples)
    pick = lambda q: s[min(len(s) - 1, int(q * len(s)))]  # noqa: E731
    return {"p50": round(pick(0.50), 2), "p99": round(pick(0.99), 2), "max": round(s[-1], 2)}


async def publish(url: str, rate: float, duration: float, flat: float, window: int) -> Any:
    """Send timestamped messages to the group: fixed rate, then flat out. Per-phase results."""
    pub = await open_conn(url)
    await pub.request({"type": "login", "uid": "bench-publisher", "id": 0})
    seq = 0
    phases: list[dict[str, Any]] = []
    inflight = 0
    wake = asyncio.Event()
    results = {"ack": 0, "errors": {}}

    def on_ack(msg: Incoming) -> None:
        nonlocal inflight
        inflight -= 1
        if msg.type == "ack":
            results["ack"] += 1
        else:
            results["errors"][msg.code] = results["errors"].get(msg.code, 0) + 1
        wake.set()

    pub.on_ack = on_ack

    def send(phase: int) -> None:
        nonlocal seq, inflight
        seq += 1
        inflight += 1
        data = {"s": seq, "t": time.time(), "p": phase}
        pub.send({"type": "send", "to": f"group:{GROUP}", "data": data, "id": seq})

    async def drain() -> None:
        while inflight > 0:
            wake.clear()
            await asyncio.wait_for(wake.wait(), 30)

    for phase, secs in ((0, duration), (1, flat)):
        results = {"ack": 0, "errors": {}}
        start = time.time()
        sent = 0
        if phase == 0:
            total = int(rate * secs)
            for i in range(total):
                delay = start + i / rate - time.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                send(0)
                sent += 1
        else:
            while time.time() - start < secs:
                while inflight >= window:
                    wake.clear()
                    await wake.wait()
                send(1)
                sent += 1
                if sent % window == 0:
                    await asyncio.sleep(0)
        await drain()
        phases.append({"start": start, "end": time.time(), "sent": sent, **results})
    pub.transport.disconnect()  # type: ignore[union-attr]
    return phases


def run_fanout(args: argparse.Namespace, urls: list[str]) -> dict[str, Any]:
    load = Load(args.load_procs, urls, args.clients, join=True)
    try:
        ready = load.ready()
        connected = sum(r["connected"] for r in ready)
        connect_s = max(r["t1"] for r in ready) - min(r["t0"] for r in ready)
        errors = [e for r in ready for e in r["errors"]]
        pub_url = urls[1 % len(urls)]
        phases = asyncio.run(publish(pub_url, args.rate, args.duration, args.flat, args.window))
        expected = sum(p["ack"] for p in phases) * connected
        settle_deadline = time.monotonic() + 20
        last, stable_since = -1, time.monotonic()
        while time.monotonic() < settle_deadline:
            got = load.count()
            if got != last:
                last, stable_since = got, time.monotonic()
            if got >= expected or time.monotonic() - stable_since > 2:
                break
            time.sleep(0.25)
        stats = load.stop()
    finally:
        load.kill()
    out: dict[str, Any] = {
        "scenario": "fanout", "nodes": len(urls), "clients": connected,
        "connect_failures": args.clients - connected, "connect_s": round(connect_s, 2),
        "connect_errors": errors[:3],
    }  # fmt: skip
    for p, name in ((0, "fixed_rate"), (1, "flat_out")):
        phase = phases[p]
        count = sum(s["count"][p] for s in stats)
        lat: array.array[float] = array.array("d")
        for s in stats:
            lat.frombytes(s["lat"][p])
        lasts = [s["last"][p] for s in stats if s["count"][p]]
        span = (max(lasts) - phase["start"]) if lasts else float("nan")
        out[name] = {
            "published": phase["ack"], "publish_errors": phase["errors"],
            "publish_per_s": round(phase["ack"] / max(phase["end"] - phase["start"], 1e-9), 1),
            "deliveries": count, "deliveries_per_s": round(count / span, 1) if lasts else 0.0,
            "latency_ms": percentiles(lat), "lost": phase["ack"] * connected - count,
        }  # fmt: skip
    return out


def run_idle(args: argparse.Namespace, urls: list[str], pid: int | None) -> dict[str, Any]:
    before = rss_kib(pid) if pid else None
    load = Load(args.load_procs, urls[:1], args.idle, join=False)
    try:
        ready = load.ready()
        time.sleep(2.0)  # let the node settle (presence writes, buffers)
        after = rss_kib(pid) if pid else None
        load.stop()
    finally:
        load.kill()
    connected = sum(r["connected"] for r in ready)
    span = max(r["t1"] for r in ready) - min(r["t0"] for r in ready)
    growth = (after - before) if (before is not None and after is not None) else None
    return {
        "scenario": "idle", "node": urls[0], "connections": connected,
        "failures": args.idle - connected, "errors": [e for r in ready for e in r["errors"]][:3],
        "handshakes_per_s": round(connected / span, 1) if span > 0 else None,
        "rss_before_mib": round(before / 1024, 1) if before is not None else None,
        "rss_after_mib": round(after / 1024, 1) if after is not None else None,
        "rss_per_conn_kib": round(growth / connected, 2) if growth and connected else None,
    }  # fmt: skip


def table(result: dict[str, Any]) -> str:
    lines = [f"== {result['scenario']}"]
    for key, value in result.items():
        if key == "scenario":
            continue
        if isinstance(value, dict):
            lines.append(f"  {key}:")
            for k, v in value.items():
                lines.append(f"    {k:<18} {v}")
        else:
            lines.append(f"  {key:<20} {value}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--scenario", choices=["fanout", "idle", "all"], default="all")
    ap.add_argument("--quick", action="store_true", help="a small run (seconds)")
    ap.add_argument("--ws-urls", help="comma-separated node URLs (no nodes are started)")
    ap.add_argument("--node-pid", type=int, help="PID of the first node, for RSS with --ws-urls")
    ap.add_argument("--clients", type=int, default=2000)
    ap.add_argument("--rate", type=float, default=20.0, help="publish rate, messages/s")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds at the fixed rate")
    ap.add_argument("--flat", type=float, default=5.0, help="seconds flat out")
    ap.add_argument("--window", type=int, default=32, help="sends in flight when flat out")
    ap.add_argument("--idle", type=int, default=10000, help="idle connections to node 0")
    ap.add_argument("--load-procs", type=int, default=2)
    ap.add_argument("--node-args", default="", help="extra `serve` options, space-separated")
    args = ap.parse_args()
    if args.quick:
        args.clients, args.duration, args.flat, args.idle = 200, 3.0, 2.0, 1000
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # inherited by every child

    nodes = None
    if args.ws_urls:
        urls, pid = args.ws_urls.split(","), args.node_pid
    else:
        nodes = Nodes(3, max_connections=max(args.idle, args.clients) + 1000,
                      extra=args.node_args.split())  # fmt: skip
        urls, pid = nodes.ws_urls, nodes.pids[0]
    results = []
    try:
        if args.scenario in ("fanout", "all"):
            results.append(run_fanout(args, urls))
            print(json.dumps(results[-1]), flush=True)
        if args.scenario in ("idle", "all"):
            if nodes is not None and args.scenario == "all":
                time.sleep(1.0)  # let node 0 release the fanout connections first
            results.append(run_idle(args, urls, pid))
            print(json.dumps(results[-1]), flush=True)
    finally:
        if nodes is not None:
            nodes.stop()
    print()
    for result in results:
        print(table(result))
    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    meta = {"argv": sys.argv[1:], "cpus": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform(), "fd_limit": hard}  # fmt: skip
    path = RESULTS / f"{stamp}.json"
    path.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    print(f"\nwritten to {path}")


if __name__ == "__main__":
    main()
