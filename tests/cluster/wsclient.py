"""A minimal protocol driver over the `websockets` library (an independent client, so the
server is checked against the protocol, not against our own client library)."""

from __future__ import annotations

import asyncio
import itertools
import json
from typing import Any

import websockets
from websockets.asyncio.client import ClientConnection


class WS:
    _ids = itertools.count(1)
    opened: list[WS] = []  # closed by the autouse fixture after every test

    def __init__(self, conn: ClientConnection, welcome: dict[str, Any]) -> None:
        self.conn = conn
        self.welcome = welcome
        self.client_id: str = welcome["client_id"]
        self.pushed: list[dict[str, Any]] = []  # frames received while waiting for a reply

    @classmethod
    async def open(cls, url: str, uid: str | None = None, **kw: Any) -> WS:
        conn = await websockets.connect(url, compression=None, max_size=None, **kw)
        try:
            welcome = json.loads(await asyncio.wait_for(conn.recv(), 5))
        except BaseException:
            await conn.close()
            raise
        assert welcome["type"] == "welcome"
        ws = cls(conn, welcome)
        cls.opened.append(ws)
        if uid is not None:
            await ws.ok({"type": "login", "uid": uid})
        return ws

    async def send_raw(self, data: str | bytes) -> None:
        await self.conn.send(data)

    async def request(self, frame: dict[str, Any], timeout: float = 5) -> dict[str, Any]:
        frame = {**frame, "id": frame.get("id", next(self._ids))}
        await self.conn.send(json.dumps(frame))
        return await self.reply(frame["id"], timeout)

    async def ok(self, frame: dict[str, Any], timeout: float = 5) -> dict[str, Any]:
        reply = await self.request(frame, timeout)
        assert reply["type"] in ("ack", "pong"), reply
        return reply

    async def reply(self, frame_id: object, timeout: float = 5) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            while True:
                msg = json.loads(await self.conn.recv())
                if msg.get("type") in ("ack", "error", "pong") and msg.get("id") == frame_id:
                    return msg  # type: ignore[no-any-return]
                self.pushed.append(msg)

    async def next(self, timeout: float = 5, type: str | None = None) -> dict[str, Any]:
        for i, msg in enumerate(self.pushed):
            if type is None or msg.get("type") == type:
                return self.pushed.pop(i)
        async with asyncio.timeout(timeout):
            while True:
                msg = json.loads(await self.conn.recv())
                if type is None or msg.get("type") == type:
                    return msg  # type: ignore[no-any-return]
                self.pushed.append(msg)

    async def nothing(self, wait: float = 0.3, type: str = "message") -> None:
        """Assert that no frame of `type` arrives within `wait` seconds."""
        try:
            msg = await self.next(wait, type)
        except TimeoutError:
            return
        raise AssertionError(f"unexpected frame: {msg}")

    async def close(self) -> None:
        await self.conn.close()


async def close_all() -> None:
    opened, WS.opened = WS.opened, []
    await asyncio.gather(*(ws.conn.close() for ws in opened), return_exceptions=True)
