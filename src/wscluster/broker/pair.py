"""The shape shared by brokers built from two links: one connection that publishes (ordered,
acknowledged) and one that subscribes (its own reader, resubscribing after reconnects)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Protocol

from wscluster.broker.base import MessageHandler, StateHandler
from wscluster.broker.state import LinkState
from wscluster.tasks import cancel_and_wait


class PublishLink(Protocol):
    up: bool
    closing: bool

    @property
    def pending_bytes(self) -> int: ...

    def publish_nowait(self, channel: str, payload: bytes) -> asyncio.Future[None]: ...

    async def run(self) -> None: ...

    def fail_publishes(self, reason: str) -> None: ...


class SubscribeLink(Protocol):
    up: bool
    closing: bool
    on_message: MessageHandler | None

    async def run(self) -> None: ...

    async def subscribe(self, channels: list[str]) -> None: ...

    async def unsubscribe(self, channels: list[str]) -> None: ...

    def fail_waiters(self, reason: str) -> None: ...


class PairBroker:
    """The Broker role over a publishing and a subscribing link; connected means both are up.
    Subclasses build ``_pub`` and ``_sub`` (handing them ``_update_state``)."""

    _pub: PublishLink
    _sub: SubscribeLink

    def __init__(self, where: str, connect_timeout: float) -> None:
        self._where = where  # for logs: never the password
        self._connect_timeout = connect_timeout
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        self._state = LinkState(where)

    def _why_down(self) -> str:
        """What to say when the first connection did not come in time."""
        return ""

    @property
    def connected(self) -> bool:
        return self._state.connected

    @property
    def pending_bytes(self) -> int:
        return self._pub.pending_bytes

    async def start(
        self, on_message: MessageHandler | None = None, on_state: StateHandler | None = None
    ) -> None:
        if self._tasks or self._closing:
            raise RuntimeError(f"{type(self).__name__}.start() may be called once")
        self._sub.on_message, self._state.on_state = on_message, on_state
        self._tasks = [
            asyncio.create_task(self._pub.run(), name="wsc-broker-pub"),
            asyncio.create_task(self._sub.run(), name="wsc-broker-sub"),
        ]
        await self._state.wait_first(self._connect_timeout, self._why_down)

    def publish_nowait(self, channel: str, payload: bytes) -> asyncio.Future[None]:
        return self._pub.publish_nowait(channel, payload)

    async def publish(self, channel: str, payload: bytes) -> None:
        await self.publish_nowait(channel, payload)

    async def subscribe(self, channels: Sequence[str]) -> None:
        await self._sub.subscribe(list(channels))

    async def unsubscribe(self, channels: Sequence[str]) -> None:
        await self._sub.unsubscribe(list(channels))

    async def close(self) -> None:
        if self._closing:
            return
        self._closing = self._pub.closing = self._sub.closing = True
        self._pub.up = self._sub.up = self._state.connected = False
        await cancel_and_wait(self._tasks)
        self._pub.fail_publishes("broker closed")
        self._sub.fail_waiters("broker closed")

    def _update_state(self, reason: str = "") -> None:
        up = self._pub.up and self._sub.up and not self._closing
        self._state.set(up, reason)
