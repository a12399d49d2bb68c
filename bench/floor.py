"""The machine's floor for fan-out latency: what the kernel alone costs to hand one small
message to each of M loopback TCP connections, with no WebSocket server, broker or routing.

    python -m bench.floor [--members 2000] [--senders 2] [--rate 5] [--duration 10]

It mirrors the `fanout` scenario's fixed-rate phase: ``--senders`` processes (the nodes)
each hold M / senders accepted connections and, ``--rate`` times a second, at the same
instants, write one ~150-byte message carrying the send time to every connection they hold;
as many receiving processes (uvloop, one asyncio protocol per connection: the load
generator) read them and record publish->receive latency. The p50/p99 printed is the best a
server in any language can get here with the same number of processes, since each write and
each read still is one system call on each side. Nothing here is wscluster's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import socket
import time
from typing import Any

import uvloop


def _sender(port_q: Any, n: int, rate: float, start: float, duration: float) -> None:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(n)
    port_q.put(srv.getsockname()[1])
    conns = [srv.accept()[0] for _ in range(n)]
    for c in conns:
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        c.setblocking(False)
    pad = b"x" * 100
    k = 0
    while (due := start + k / rate) < start + duration:
        time.sleep(max(0.0, due - time.time()))
        msg = b"%.6f " % time.time() + pad + b"\n"
        for c in conns:
            c.send(msg)
        k += 1
    time.sleep(1.0)


class _Reader(asyncio.Protocol):
    def __init__(self, lat: list[float]) -> None:
        self.lat = lat

    def data_received(self, data: bytes) -> None:
        now = time.time()
        for line in data.split(b"\n"):
            if line:
                self.lat.append(now - float(line.split(b" ", 1)[0]))


def _receiver(port: int, n: int, out_q: Any, until: float) -> None:
    async def main() -> list[float]:
        loop = asyncio.get_running_loop()
        lat: list[float] = []
        for _ in range(n):
            await loop.create_connection(lambda: _Reader(lat), "127.0.0.1", port)
        await asyncio.sleep(until - time.time())
        return lat

    out_q.put(uvloop.run(main()))


def measure(members: int, senders: int, rate: float, duration: float) -> dict[str, Any]:
    """Run the floor once: its latency percentiles (ms) and delivery counts."""
    ctx = mp.get_context("spawn")
    per = members // senders
    start = time.time() + 3.0 + per / 2000  # every connection is up by then
    port_q, out_q = ctx.Queue(), ctx.Queue()
    procs = [ctx.Process(target=_sender, args=(port_q, per, rate, start, duration))
             for _ in range(senders)]  # fmt: skip
    for p in procs:
        p.start()
    ports = [port_q.get() for _ in range(senders)]
    until = start + duration + 2.0
    receivers = [ctx.Process(target=_receiver, args=(port, per, out_q, until))
                 for port in ports]  # fmt: skip
    for p in receivers:
        p.start()
    lat = sorted(x for _ in receivers for x in out_q.get())
    for p in procs + receivers:
        p.join()
    if not lat:
        raise RuntimeError("the floor received no message")
    pct = {f"p{q}": round(lat[min(len(lat) - 1, int(len(lat) * q / 100))] * 1000, 2)
           for q in (50, 90, 99)}  # fmt: skip
    return {"members": per * senders, "senders": senders, "rate": rate,
            "deliveries": len(lat), "expected": per * senders * int(duration * rate),
            "deliveries_per_s": round(len(lat) / duration, 1),
            "latency_ms": {**pct, "max": round(lat[-1] * 1000, 2)}}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--members", type=int, default=2000)
    ap.add_argument("--senders", type=int, default=2)
    ap.add_argument("--rate", type=float, default=5.0)
    ap.add_argument("--duration", type=float, default=10.0)
    args = ap.parse_args()
    result = measure(args.members, args.senders, args.rate, args.duration)
    print(json.dumps({"floor": "fanout", "cpus": os.cpu_count(), **result}))


if __name__ == "__main__":
    main()
