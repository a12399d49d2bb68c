"""A counting subscriber written from docs/protocol.md alone (not wscluster.client), so the
chaos suite checks the server independently of our own client library.

It follows the client rules of "History, offsets and resume": a position per stream, a
message at or below it is dropped (counted in ``dropped``), after every reconnect (to the
next node URL, with jittered backoff) it logs in again and sends ``resume`` with its
positions, holds the messages of those streams until the ack and then delivers them in
offset order, and records ``recovered: false`` and ``gap`` as loss reports.

``log`` is what the application saw, in order: ``Msg`` deliveries and ``Loss`` reports.
Anything the protocol rules out is recorded in ``anomalies`` (a hole in the offsets, an
epoch change nobody reported, an ack whose offset disagrees with what was sent).
"""

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

TERMINAL = (1008, 4001)  # close codes after which a client must not reconnect


@dataclass(frozen=True, slots=True)
class Msg:
    stream: str
    pub: str  # publisher id
    seq: int
    epoch: str | None
    offset: int | None


@dataclass(frozen=True, slots=True)
class Loss:
    stream: str
    kind: str  # "resume" or "gap"
    reason: str
    epoch: str | None
    offset: int | None


@dataclass(slots=True)
class Reconnect:
    down: float  # monotonic time the connection was found closed
    code: int | None  # its close code (1006: no close frame)
    up: float | None = None  # resume acked


@dataclass(slots=True)
class Position:
    epoch: str | None
    offset: int


@dataclass
class CountingClient:
    name: str
    urls: list[str]
    at: int  # index of the node URL to connect to first
    uid: str
    groups: list[str]
    rng: random.Random
    since: dict[str, int] = field(default_factory=dict)  # publisher -> last seq sent before
    log: list[Msg | Loss] = field(default_factory=list)
    anomalies: list[str] = field(default_factory=list)
    heard: float = 0.0  # monotonic time of the last delivery
    dropped: int = 0  # frames at or below the stream's position (duplicates the rules drop)
    reconnects: list[Reconnect] = field(default_factory=list)
    resume_acks: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    nodes: list[str] = field(default_factory=list)  # node of every welcome, in order
    pos: dict[str, Position] = field(default_factory=dict)
    _ws: ClientConnection | None = None
    _reader: asyncio.Task[None] | None = None
    _task: asyncio.Task[None] | None = None
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _waiting: dict[int, asyncio.Future[dict[str, Any]]] = field(default_factory=dict)
    _held: dict[str, list[dict[str, Any]]] | None = None  # streams held until resume's ack
    _resume_id: int | None = None

    @property
    def streams(self) -> list[str]:
        return [f"uid:{self.uid}", *(f"group:{g}" for g in self.groups)]

    @property
    def connected(self) -> bool:
        return self._ws is not None and self._held is None

    async def start(self) -> None:
        """Connect, log in and join (positions from the acks); then read in the background."""
        ws = await self._open()
        login = await self._call({"type": "login", "uid": self.uid})
        self._adopt(f"uid:{self.uid}", login)
        for g in self.groups:
            self._adopt(f"group:{g}", await self._call({"type": "join", "group": g}))
        self._task = asyncio.create_task(self._run(ws), name=f"chaos-{self.name}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._ws is not None:
            await self._ws.close()
            self._ws = None
        if self._reader is not None:  # cancelled with the task that awaited it, or ended
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader

    def drop(self) -> None:
        """Break the connection without a close frame (a network failure): it reconnects."""
        if self._ws is not None:
            self._ws.transport.abort()

    # --- connection ----------------------------------------------------------------------
    async def _open(self) -> ClientConnection:
        ws = await websockets.connect(self.urls[self.at], compression=None, max_size=None,
                                      open_timeout=3, ping_interval=None)  # fmt: skip
        try:
            welcome = json.loads(await asyncio.wait_for(ws.recv(), 3))
        except BaseException:
            await ws.close()
            raise
        if welcome.get("type") != "welcome":
            self.anomalies.append(f"first frame not a welcome: {welcome}")
        self.nodes.append(str(welcome.get("node")))
        self._ws = ws
        self._reader = asyncio.create_task(self._read(ws), name=f"chaos-{self.name}-read")
        return ws

    async def _call(self, frame: dict[str, Any], timeout: float = 10) -> dict[str, Any]:
        assert self._ws is not None
        fid = next(self._ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[fid] = fut
        await self._ws.send(json.dumps({**frame, "id": fid}))
        reply = await asyncio.wait_for(fut, timeout)
        if reply.get("type") != "ack":
            raise RuntimeError(f"{self.name}: {frame['type']} answered {reply}")
        return reply

    async def _run(self, ws: ClientConnection) -> None:
        try:
            while True:
                code = await self._closed(ws)
                rec = Reconnect(time.monotonic(), code)
                self.reconnects.append(rec)
                if code in TERMINAL:
                    self.anomalies.append(f"terminal close {code}")
                    return
                ws = await self._reconnect(rec)
        except Exception as exc:  # a bug here must show in the figures, not vanish
            self.anomalies.append(f"client failed: {exc!r}")
            raise

    async def _closed(self, ws: ClientConnection) -> int | None:
        assert self._reader is not None
        await self._reader
        self._ws = None
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(ConnectionError("closed"))
        self._waiting.clear()
        return ws.close_code  # 1006: no close frame

    async def _reconnect(self, rec: Reconnect) -> ClientConnection:
        for attempt in itertools.count():
            await asyncio.sleep(min(1.0, 0.05 * 2**attempt) * self.rng.uniform(0.5, 1.0))
            self.at = (self.at + 1) % len(self.urls)
            try:
                ws = await self._resume()
            except (OSError, TimeoutError, RuntimeError, websockets.WebSocketException):
                if self._ws is not None and self._reader is not None:
                    await self._ws.close()
                    await self._reader
                    self._ws = None
                continue
            rec.up = time.monotonic()
            return ws
        raise AssertionError("unreachable")

    async def _resume(self) -> ClientConnection:
        self._held = {s: [] for s in self.pos}  # from the first frame on: login may bring some
        ws = await self._open()
        await self._call({"type": "login", "uid": self.uid})
        streams = {s: [p.epoch, p.offset] for s, p in self.pos.items()}
        self._resume_id = next(self._ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[self._resume_id] = fut
        await ws.send(json.dumps({"type": "resume", "id": self._resume_id, "streams": streams}))
        reply = await asyncio.wait_for(fut, 10)
        if reply.get("type") != "ack":
            raise RuntimeError(f"{self.name}: resume answered {reply}")
        return ws

    # --- frames --------------------------------------------------------------------------
    async def _read(self, ws: ClientConnection) -> None:
        with contextlib.suppress(websockets.ConnectionClosed):
            async for text in ws:
                self._frame(json.loads(text))

    def _frame(self, f: dict[str, Any]) -> None:
        kind = f.get("type")
        if kind == "message":
            stream = f.get("to", "")
            if self._held is not None and stream in self._held:
                self._held[stream].append(f)
            else:
                self._deliver(stream, f)
        elif kind == "gap":
            self._gap(f)
        elif kind in ("ack", "error", "pong"):
            if kind == "error":
                self.errors.append(f)
            if f.get("id") is not None and f["id"] == self._resume_id and kind == "ack":
                self._resumed(f)
            fut = self._waiting.pop(f.get("id"), None)  # type: ignore[arg-type]
            if fut is not None and not fut.done():
                fut.set_result(f)

    def _adopt(self, stream: str, ack: dict[str, Any]) -> None:
        """A join/login ack's position (never backwards within an epoch)."""
        if "offset" not in ack:
            self.anomalies.append(f"{stream}: ack without a position: {ack}")
            return
        cur = self.pos.get(stream)
        if cur is None or cur.epoch != ack.get("epoch") or cur.offset < ack["offset"]:
            self.pos[stream] = Position(ack.get("epoch"), int(ack["offset"]))

    def _deliver(self, stream: str, f: dict[str, Any]) -> None:
        epoch, off = f.get("epoch"), f.get("offset")
        cur = self.pos.get(stream)
        if off is None:
            self.anomalies.append(f"{stream}: message without an offset")
        elif cur is None:
            self.pos[stream] = Position(epoch, off)
        elif not cur.epoch:  # a stream with no epoch yet ("" or null): its offsets start at 1
            if off > cur.offset + 1:
                self.anomalies.append(f"{stream}: silent hole {cur.offset + 1}..{off - 1}")
            self.pos[stream] = Position(epoch, off)
        elif cur.epoch != epoch:
            self.anomalies.append(f"{stream}: epoch {cur.epoch}->{epoch} at offset {off} "
                                  "with no gap or recovered:false")  # fmt: skip
            self.pos[stream] = Position(epoch, off)
        elif off <= cur.offset:
            self.dropped += 1
            return
        else:
            if off > cur.offset + 1:
                self.anomalies.append(f"{stream}: silent hole {cur.offset + 1}..{off - 1}")
            cur.offset = off
        data = f.get("data")
        if not isinstance(data, dict) or "p" not in data:
            self.anomalies.append(f"{stream}: foreign data {data!r}")
            return
        self.log.append(Msg(stream, str(data["p"]), int(data["s"]), epoch, off))
        self.heard = time.monotonic()

    def _gap(self, f: dict[str, Any]) -> None:
        stream = f.get("stream", "")
        self.log.append(Loss(stream, "gap", str(f.get("reason")), f.get("epoch"), f.get("offset")))
        cur = self.pos.get(stream)
        epoch, off = f.get("epoch"), int(f.get("offset") or 0)
        if cur is None or cur.epoch != epoch or cur.offset < off:
            self.pos[stream] = Position(epoch, off)

    def _resumed(self, ack: dict[str, Any]) -> None:
        """Apply the resume ack, then deliver what was held, in offset order."""
        self.resume_acks.append(ack)
        held, self._held = self._held or {}, None
        entries = ack.get("streams") or {}
        for stream, msgs in held.items():
            entry = entries.get(stream)
            if not isinstance(entry, dict) or "error" in entry:
                self.anomalies.append(f"{stream}: resume entry {entry}")
                for m in msgs:
                    self._deliver(stream, m)
                continue
            msgs.sort(key=lambda m: m.get("offset") or 0)
            epoch, off = entry.get("epoch"), entry.get("offset")
            if entry.get("recovered") is not True:
                reason = str(entry.get("reason"))
                self.log.append(Loss(stream, "resume", reason, epoch, off))
                start = msgs[0]["offset"] - 1 if msgs else off
                self.pos[stream] = Position(epoch, int(start or 0))
            for m in msgs:
                if m.get("epoch") != epoch:
                    self.anomalies.append(f"{stream}: held message of epoch {m.get('epoch')} "
                                          f"but the resume ack says {epoch}")  # fmt: skip
                self._deliver(stream, m)
            cur = self.pos[stream]
            if off is not None and (cur.epoch != epoch or cur.offset != off):
                self.anomalies.append(f"{stream}: resume ack says offset {epoch}/{off}, "
                                      f"received up to {cur.epoch}/{cur.offset}")  # fmt: skip
