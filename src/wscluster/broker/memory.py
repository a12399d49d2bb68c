"""In-process broker: every ``MemoryBroker`` created with the same hub name (URL
``memory://<name>``, default ``default``) shares one hub, so several nodes in one process
and one event loop can talk to each other. For tests, demos and single-process setups.

Guarantee: **at-most-once**, **FIFO per publisher** (one outbox per broker, flushed by a
``loop.call_soon`` callback, never inside ``publish_nowait``). Nothing is persisted; the hub
lives as long as the process. ``MemoryHub.set_down(True)`` simulates an outage: publishes
fail with ``BrokerUnavailable`` (queued ones too), ``on_state(False)`` fires, the hub forgets
its subscriptions like a restarted server, and ``set_down(False)`` restores every
broker's remembered subscriptions before ``on_state(True)``. Messages published while down
are lost.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Sequence

from wscluster.broker.base import MessageHandler, StateHandler, refuse_bad
from wscluster.broker.state import LinkState
from wscluster.errors import BrokerUnavailable
from wscluster.routing import is_utf8

log = logging.getLogger("wscluster.broker")

_Item = tuple[str, bytes, asyncio.Future[None]]


class MemoryHub:
    """The shared "server": who listens to which channel, and whether it is up."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.down = False
        self._subs: dict[str, dict[MemoryBroker, None]] = {}
        self._members: dict[MemoryBroker, None] = {}

    def set_down(self, down: bool) -> None:
        """Test hook: simulate a broker outage (``True``) or its end (``False``)."""
        if down == self.down:
            return
        self.down = down
        if down:
            self._subs.clear()
        for broker in list(self._members):
            broker._hub_state(not down)

    def _add(self, broker: MemoryBroker, channels: Sequence[str]) -> None:
        for ch in channels:
            self._subs.setdefault(ch, {})[broker] = None

    def _remove(self, broker: MemoryBroker, channels: Sequence[str]) -> None:
        for ch in channels:
            subs = self._subs.get(ch)
            if subs is not None:
                subs.pop(broker, None)
                if not subs:
                    del self._subs[ch]

    def _receivers(self, channel: str) -> list[MemoryBroker]:
        return list(self._subs.get(channel, ()))


_hubs: dict[str, MemoryHub] = {}


def get_hub(name: str = "default") -> MemoryHub:
    """The hub of that name in this process (created on first use)."""
    hub = _hubs.get(name)
    if hub is None:
        hub = _hubs[name] = MemoryHub(name)
    return hub


def hub_name(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() != "memory":
        raise ValueError(f"not a memory:// URL: {url!r}")
    return rest.strip("/") or "default"


class MemoryBroker:
    """The ``Broker`` role inside one process. Timeouts are accepted for interface parity;
    ``connect_timeout`` bounds how long ``start``/``subscribe`` wait while the hub is down."""

    def __init__(
        self,
        url: str = "memory://default",
        *,
        connect_timeout: float = 5.0,
        publish_timeout: float = 5.0,
        max_pending_bytes: int = 64 << 20,
    ) -> None:
        self.hub = get_hub(hub_name(url))
        self._connect_timeout = connect_timeout
        self._publish_timeout = publish_timeout
        self._max_pending = max_pending_bytes
        self._on_message: MessageHandler | None = None
        self._state = LinkState(f"memory hub {self.hub.name!r}")
        self._desired: set[str] = set()
        self._outbox: deque[_Item] = deque()
        self._pending_bytes = 0
        self._flush_scheduled = False
        self._started = self._closed = False

    @property
    def connected(self) -> bool:
        return self._state.connected

    @property
    def pending_bytes(self) -> int:
        return self._pending_bytes

    async def start(
        self, on_message: MessageHandler | None = None, on_state: StateHandler | None = None
    ) -> None:
        if self._started or self._closed:
            raise RuntimeError("MemoryBroker.start() may be called once")
        self._started = True
        self._on_message, self._state.on_state = on_message, on_state
        self.hub._members[self] = None
        if not self.hub.down:
            self._hub_state(True)
            return
        await self._state.wait_first(self._connect_timeout, lambda: "hub is down")

    def publish_nowait(self, channel: str, payload: bytes) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        size = len(payload)
        if not self._state.connected or self._closed:
            fut.set_exception(BrokerUnavailable("broker not connected"))
        elif not is_utf8(channel):  # as a real broker would (broker.base)
            fut.set_exception(BrokerUnavailable("publish refused: channel not valid UTF-8"))
        elif self._pending_bytes + size > self._max_pending:
            fut.set_exception(BrokerUnavailable("publish queue full"))
        else:
            self._pending_bytes += size
            self._outbox.append((channel, payload, fut))
            if not self._flush_scheduled:
                self._flush_scheduled = True
                loop.call_soon(self._flush)
        return fut

    async def publish(self, channel: str, payload: bytes) -> None:
        await self.publish_nowait(channel, payload)

    async def subscribe(self, channels: Sequence[str]) -> None:
        if self._closed:
            raise BrokerUnavailable("broker closed")
        todo = await refuse_bad(self.subscribe, channels)
        self._desired.update(todo)
        if self._state.connected:
            self.hub._add(self, todo)
            return
        # restored by _hub_state(True) when the hub comes back
        if not await self._state.wait_up(self._connect_timeout):
            raise BrokerUnavailable(f"subscription not confirmed within {self._connect_timeout} s")
        if self._closed:
            raise BrokerUnavailable("broker closed")

    async def unsubscribe(self, channels: Sequence[str]) -> None:
        todo = [ch for ch in dict.fromkeys(channels) if ch in self._desired]
        self._desired.difference_update(todo)
        self.hub._remove(self, todo)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._state.wake()  # waiters must see the broker is closed
        self.hub._remove(self, list(self._desired))
        self.hub._members.pop(self, None)
        self._fail_outbox("broker closed")

    # --- internals ---------------------------------------------------------------------
    def _fail_outbox(self, reason: str) -> None:
        items = list(self._outbox)
        self._outbox.clear()
        self._pending_bytes = 0
        for _, _, fut in items:
            if not fut.done():
                fut.set_exception(BrokerUnavailable(reason))

    def _flush(self) -> None:
        self._flush_scheduled = False
        while self._outbox:
            channel, payload, fut = self._outbox.popleft()
            self._pending_bytes -= len(payload)
            if not fut.done():
                fut.set_result(None)
            for receiver in self.hub._receivers(channel):
                receiver._receive(channel, payload)

    def _receive(self, channel: str, payload: bytes) -> None:
        if self._on_message is None or channel not in self._desired or self._closed:
            return
        try:
            self._on_message(channel, payload)
        except Exception:
            log.exception("on_message handler failed (channel %r)", channel)

    def _hub_state(self, up: bool) -> None:
        if self._closed:
            return
        if up:
            self.hub._add(self, list(self._desired))
        else:
            self._fail_outbox(f"memory hub {self.hub.name!r} is down")
        self._state.set(up, "hub is down")
