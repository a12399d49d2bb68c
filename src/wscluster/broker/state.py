"""A broker's link state, shared by every implementation: one "broker lost" warning and one
"broker back after X s" line per outage, waiters woken, and the node told (``on_state``)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from wscluster.broker.base import StateHandler
from wscluster.errors import BrokerUnavailable

log = logging.getLogger("wscluster.broker")


class LinkState:
    def __init__(self, where: str) -> None:
        self.where = where  # for logs: host and port, never a password
        self.connected = False
        self.on_state: StateHandler | None = None
        self._up = asyncio.Event()
        self._down_since: float | None = None

    def set(self, up: bool, reason: str = "") -> None:
        """Record the state; transitions are logged and reported, repeats are ignored."""
        if up == self.connected:
            return
        self.connected = up
        now = time.monotonic()
        if up:
            self._up.set()
            if self._down_since is not None:
                log.info("broker back after %.1f s", now - self._down_since)
            self._down_since = None
        else:
            self._up.clear()
            self._down_since = now
            log.warning("broker lost: %s (%s)", reason, self.where)
        if self.on_state is not None:
            try:
                self.on_state(up)
            except Exception:
                log.exception("on_state handler failed")

    async def wait_up(self, within: float) -> bool:
        """Wait until connected (or woken by ``wake``); False after ``within`` seconds."""
        try:
            async with asyncio.timeout(within):
                await self._up.wait()
        except TimeoutError:
            return False
        return True

    def wake(self) -> None:
        """Release every waiter (on close: they must see the broker is gone)."""
        self.connected = False
        self._up.set()

    async def wait_first(self, within: float, why: Callable[[], str]) -> None:
        """start(): wait for the first connection; past the timeout say so once and let the
        background loops keep trying."""
        if not await self.wait_up(within):
            self._down_since = time.monotonic() - within
            msg = "broker lost: %s not reachable within %.1f s (%s), retrying in the background"
            log.warning(msg, self.where, within, why() or "no answer")


def fail_all(reason: str, *queues: deque[tuple[Any, ...]]) -> None:
    """Empty publish queues (items end with their future), failing every future still
    waiting (never reported as sent)."""
    items = [item for queue in queues for item in queue]
    for queue in queues:
        queue.clear()
    for item in items:
        fut: asyncio.Future[Any] = item[-1]
        if not fut.done():
            fut.set_exception(BrokerUnavailable(reason))
