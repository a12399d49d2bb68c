"""Publishers: WebSocket clients that send ``{"p": id, "s": seq}`` to one address at a fixed
rate, and remember what the cluster acked, refused, or left unanswered (the connection died
first). After a lost connection they reconnect to the next node URL and go on counting."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import random
import time
from dataclasses import dataclass, field
from typing import Any

import websockets
from websockets.asyncio.client import ClientConnection

MAX_IN_FLIGHT = 2000


@dataclass
class Publisher:
    pid: str
    urls: list[str]
    at: int  # index of the node URL to connect to first
    to: str  # the address every message goes to
    rate: float  # messages per second
    rng: random.Random
    sent: int = 0  # seq of the last message sent (seqs start at 1)
    acked: set[int] = field(default_factory=set)
    refused: dict[int, str] = field(default_factory=dict)  # seq -> error code
    unknown: set[int] = field(default_factory=set)  # no answer before the connection died
    reconnects: int = 0
    connected: bool = False
    _in_flight: set[int] = field(default_factory=set)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _drained: asyncio.Event = field(default_factory=asyncio.Event)
    _closing: asyncio.Event = field(default_factory=asyncio.Event)
    _task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"chaos-{self.pid}")

    async def stop(self, timeout: float = 10) -> None:
        """Stop sending and wait (up to ``timeout``) for the answers still due; the connection
        stays open until ``close``."""
        self._stop.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._drained.wait(), timeout)

    async def close(self) -> None:
        self._stop.set()
        self._closing.set()
        if self._task is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._task), 10)
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.unknown |= self._in_flight
        self._in_flight.clear()

    async def _run(self) -> None:
        for attempt in itertools.count():
            if self._stop.is_set():
                self._drained.set()
                return
            try:
                async with await self._connect() as ws:
                    attempt = 0
                    await self._session(ws)
                    return
            except (OSError, TimeoutError, websockets.WebSocketException):
                pass
            finally:
                self.unknown |= self._in_flight
                self._in_flight.clear()
            self.reconnects += 1
            self.at = (self.at + 1) % len(self.urls)
            await asyncio.sleep(min(1.0, 0.05 * 2**attempt) * self.rng.uniform(0.5, 1.0))

    async def _connect(self) -> ClientConnection:
        ws = await websockets.connect(self.urls[self.at], compression=None, max_size=None,
                                      open_timeout=3, ping_interval=None)  # fmt: skip
        try:
            await asyncio.wait_for(ws.recv(), 3)  # welcome
            await ws.send(json.dumps({"type": "login", "uid": self.pid, "id": "login"}))
            while json.loads(await asyncio.wait_for(ws.recv(), 5)).get("id") != "login":
                pass
        except BaseException:
            await ws.close()
            raise
        return ws

    async def _session(self, ws: ClientConnection) -> None:
        reader = asyncio.create_task(self._answers(ws), name=f"chaos-{self.pid}-read")
        self.connected = True
        try:
            t0, n = time.monotonic(), 0
            while not self._stop.is_set():
                if reader.done():
                    reader.result()
                    raise websockets.ConnectionClosedError(None, None)
                n += 1
                await asyncio.sleep(max(0.0, t0 + n / self.rate - time.monotonic()))
                if len(self._in_flight) >= MAX_IN_FLIGHT:
                    continue
                self.sent += 1
                self._in_flight.add(self.sent)
                data = {"p": self.pid, "s": self.sent}
                await ws.send(json.dumps({"type": "send", "id": self.sent, "to": self.to,
                                          "data": data}))  # fmt: skip
            while self._in_flight and not reader.done():  # the answers still due
                await asyncio.sleep(0.01)
            self.unknown |= self._in_flight
            self._in_flight.clear()
            self._drained.set()
            await self._closing.wait()
        finally:
            self.connected = False
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, websockets.ConnectionClosed):
                await reader

    async def _answers(self, ws: ClientConnection) -> None:
        async for text in ws:
            f: dict[str, Any] = json.loads(text)
            seq = f.get("id")
            if not isinstance(seq, int) or seq not in self._in_flight:
                continue
            self._in_flight.discard(seq)
            if f.get("type") == "ack":
                self.acked.add(seq)
            else:
                self.refused[seq] = str(f.get("code"))
