"""Load processes: each holds many client connections and obeys the parent over a pipe.

The parent (:class:`Load`) sends ``(command, kwargs)``; a worker runs one command at a time
and answers ``(command, result)``. Live counters (connected, received, acked) go through
shared memory so the parent can draw a progress bar without talking to busy workers.
"""

from __future__ import annotations

import array
import asyncio
import multiprocessing as mp
import os
import random
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from typing import Any, cast

from .wire import Client, Sink, connect

SLOTS = 3
CONNECTED, RECEIVED, ACKED = range(SLOTS)

# (url, uid or None, group or None, send-to address or None, receivers per send)
Spec = tuple[str, str | None, str | None, str | None, int]


def worker_main(index: int, pipe: Connection, counters: Any, cpus: list[int] | None) -> None:
    if cpus:
        os.sched_setaffinity(0, cpus)
    import uvloop

    uvloop.run(Worker(index, pipe, counters).serve())


class Worker:
    def __init__(self, index: int, pipe: Connection, counters: Any) -> None:
        self.index = index
        self.pipe = pipe
        self.counters = counters
        self.sink = Sink()
        self.proto = "wsc"
        self.specs: list[Spec] = []
        self.sources: list[str] = []
        self.clients: list[Client | None] = []
        self.senders: list[Client] = []
        self.connected = 0
        self.rr = 0
        self.seq = 0

    async def serve(self) -> None:
        self.sink.wake = asyncio.Event()
        ticker = asyncio.create_task(self._tick())
        while True:
            tag, kwargs = await self._recv()
            if tag == "exit":
                break
            try:
                result = await getattr(self, "cmd_" + tag)(**kwargs)
                self._send((tag, result))
            except Exception:
                self._send(("error", traceback.format_exc()))
        ticker.cancel()

    async def _recv(self) -> tuple[str, dict[str, Any]]:
        loop = asyncio.get_running_loop()
        ready = asyncio.Event()
        loop.add_reader(self.pipe.fileno(), ready.set)
        try:
            await ready.wait()
        finally:
            loop.remove_reader(self.pipe.fileno())
        os.set_blocking(self.pipe.fileno(), True)  # the event loop made it non-blocking
        msg: tuple[str, dict[str, Any]] = self.pipe.recv()
        return msg

    def _send(self, msg: Any) -> None:
        os.set_blocking(self.pipe.fileno(), True)
        self.pipe.send(msg)

    async def _tick(self) -> None:
        base = self.index * SLOTS
        while True:
            self.counters[base + CONNECTED] = self.connected
            self.counters[base + RECEIVED] = self.sink.received
            self.counters[base + ACKED] = self.sink.acked
            await asyncio.sleep(0.1)

    async def _open(self, i: int, timeout: float = 30) -> Client:
        url, uid, group, to, fan = self.specs[i]
        source = self.sources[i % len(self.sources)] if self.sources else None
        client = await connect(self.proto, url, self.sink, to, fan, source, timeout)
        try:
            for op, arg in (("login", uid), ("join", group)):
                if arg is not None:
                    ok, code = await client.request(op, arg, timeout)
                    if not ok:
                        raise RuntimeError(f"{op} refused: {code}")
        except BaseException:
            client.close()
            raise
        self.connected += 1
        return client

    # -- commands --------------------------------------------------------------------------

    async def cmd_open(self, proto: str, specs: list[Spec], concurrency: int,
                       sources: list[str], origin: float) -> dict[str, Any]:  # fmt: skip
        self.proto, self.specs, self.sources = proto, specs, sources
        self.sink.origin = origin
        self.clients = [None] * len(specs)
        gate = asyncio.Semaphore(concurrency)
        errors: list[str] = []

        async def one(i: int) -> None:
            async with gate:
                try:
                    self.clients[i] = await self._open(i)
                except Exception as exc:
                    errors.append(repr(exc))

        t0 = time.time()
        await asyncio.gather(*(one(i) for i in range(len(specs))))
        t1 = time.time()
        self.senders = [c for c in self.clients if c is not None and c.to is not None]
        random.Random(self.index).shuffle(self.senders)
        return {"connected": self.connected, "failed": len(errors), "errors": errors[:3],
                "t0": t0, "t1": t1}  # fmt: skip

    async def cmd_phase(self, phase: int, rate: float, duration: float, window: int,
                        flat: bool) -> dict[str, Any]:  # fmt: skip
        s = self.sink
        acked0, expected0, errors0 = s.acked, s.expected, dict(s.errors)
        senders = [c for c in self.senders if not c.closed]
        start = time.time()
        sent = 0
        if senders and flat:
            sent = await self._flat(senders, phase, start + duration, window)
        elif senders and rate > 0:
            sent = await self._fixed(senders, phase, rate, duration)
        end = time.time()
        unacked = await self._drain(30.0)
        errors = {k: v - errors0.get(k, 0) for k, v in s.errors.items() if v != errors0.get(k, 0)}
        return {"phase": phase, "sent": sent, "acked": s.acked - acked0,
                "expected": s.expected - expected0, "errors": errors, "unacked": unacked,
                "start": start, "end": end, "drained": time.time()}  # fmt: skip

    def _next(self, senders: list[Client]) -> Client | None:
        for _ in range(len(senders)):
            c = senders[self.rr % len(senders)]
            self.rr += 1
            if not c.closed:
                return c
        return None

    def _send_one(self, senders: list[Client], phase: int) -> bool:
        """The next message from the next open sender; False when none is left."""
        c = self._next(senders)
        if c is None:
            return False
        self.seq += 1
        c.send_data(self.seq, phase)
        return True

    async def _fixed(self, senders: list[Client], phase: int, rate: float, duration: float) -> int:
        total, sent, start = int(rate * duration), 0, time.time()
        while sent < total:
            due = min(total, int((time.time() - start) * rate) + 1)
            while sent < due:
                if not self._send_one(senders, phase):
                    return sent
                sent += 1
            await asyncio.sleep(max(0.0, start + sent / rate - time.time()))
        return sent

    async def _flat(self, senders: list[Client], phase: int, end: float, window: int) -> int:
        s, sent = self.sink, 0
        wake = s.wake
        assert wake is not None
        timer = asyncio.get_running_loop().call_at(
            asyncio.get_running_loop().time() + max(0.0, end - time.time()), wake.set)
        try:
            while time.time() < end:
                while s.inflight < window:
                    if not self._send_one(senders, phase):
                        return sent
                    sent += 1
                wake.clear()
                await wake.wait()
        finally:
            timer.cancel()
        return sent

    async def _drain(self, timeout: float) -> int:
        s = self.sink
        assert s.wake is not None
        deadline = time.time() + timeout
        while s.inflight > 0 and time.time() < deadline:
            s.wake.clear()
            try:
                await asyncio.wait_for(s.wake.wait(), max(0.01, deadline - time.time()))
            except TimeoutError:
                break
        unacked = max(0, s.inflight)
        s.inflight = 0
        return unacked

    async def cmd_storm(self, concurrency: int, give_up: float) -> dict[str, Any]:
        """Close every connection at once, then reconnect (and log in / join) all of them."""
        t0 = time.time()
        for c in self.clients:
            if c is not None:
                c.close()
        self.connected = 0
        times = array.array("d")
        errors: list[str] = []
        retries = 0
        gate = asyncio.Semaphore(concurrency)

        async def one(i: int) -> None:
            nonlocal retries
            delay = 0.05
            while True:
                async with gate:
                    try:
                        self.clients[i] = await self._open(i, timeout=10)
                        times.append(time.time() - t0)
                        return
                    except Exception as exc:
                        err = exc
                if time.time() - t0 > give_up:
                    errors.append(repr(err))
                    return
                retries += 1
                await asyncio.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 2.0)

        await asyncio.gather(*(one(i) for i in range(len(self.specs))))
        return {"t0": t0, "times": times.tobytes(), "reconnected": len(times),
                "failed": len(errors), "errors": errors[:3], "retries": retries}  # fmt: skip

    async def cmd_stats(self) -> dict[str, Any]:
        s = self.sink
        return {"count": s.count, "first": s.first, "last": s.last, "closes": s.closes,
                "lat": [a.tobytes() for a in s.lat], "timeline": s.timeline.tobytes(),
                "received": s.received}  # fmt: skip

    async def cmd_close(self) -> int:
        n = 0
        for c in self.clients:
            if c is not None and not c.closed:
                c.close()
                n += 1
        self.connected = 0
        await asyncio.sleep(0.2)
        return n


class Load:
    """The parent's handle on ``n`` worker processes."""

    def __init__(self, n: int, cpus: list[int] | None = None) -> None:
        ctx = mp.get_context("spawn")
        self.counters = ctx.RawArray("q", n * SLOTS)
        self.pipes: list[Connection] = []
        self.procs: list[Any] = []
        for i in range(n):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=worker_main, args=(i, child, self.counters, cpus),
                               daemon=True, name=f"load{i}")  # fmt: skip
            proc.start()
            self.pipes.append(parent)
            self.procs.append(proc)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def total(self, slot: int) -> int:
        return sum(self.counters[i * SLOTS + slot] for i in range(len(self.procs)))

    def call(self, tag: str, kwargs: list[dict[str, Any] | None], timeout: float = 600,
             tick: Callable[[], None] | None = None) -> list[Any]:  # fmt: skip
        """Send ``tag`` to the workers whose kwargs are not None; wait for every answer."""
        pending: dict[Connection, int] = {}
        for i, (pipe, kw) in enumerate(zip(self.pipes, kwargs, strict=True)):
            if kw is not None:
                pipe.send((tag, kw))
                pending[pipe] = i
        results: list[Any] = [None] * len(self.pipes)
        deadline = time.monotonic() + timeout
        while pending:
            for ready in wait(list(pending), timeout=0.2):
                pipe = cast(Connection, ready)
                i = pending.pop(pipe)
                got, value = pipe.recv()
                if got == "error":
                    raise RuntimeError(f"load process {i} failed on {tag!r}:\n{value}")
                results[i] = value
            if tick is not None:
                tick()
            if time.monotonic() > deadline:
                raise TimeoutError(f"load processes did not answer {tag!r} in {timeout}s")
            for i in pending.values():
                if not self.procs[i].is_alive():
                    raise RuntimeError(f"load process {i} died (exit {self.procs[i].exitcode})")
        return results

    def all(self, tag: str, timeout: float = 600, tick: Callable[[], None] | None = None,
            **kwargs: Any) -> list[Any]:  # fmt: skip
        return self.call(tag, [kwargs] * len(self.pipes), timeout, tick)

    def stop(self) -> None:
        for pipe in self.pipes:
            try:
                pipe.send(("exit", {}))
            except OSError:
                pass
        for proc in self.procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
