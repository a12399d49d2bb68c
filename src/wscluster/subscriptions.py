"""Turns registry interest changes into broker (un)subscriptions, and lets an ack wait until the
subscription it depends on is confirmed (the join/login barrier of PROTOCOL.md)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from .broker.base import Broker
from .errors import BrokerUnavailable
from .naming import Names
from .registry import Interest

log = logging.getLogger("wscluster.node")


class Subscriptions:
    def __init__(self, broker: Broker, names: Names, timeout: float) -> None:
        self._broker = broker
        self._names = names
        self._timeout = timeout
        self._confirmed: dict[str, asyncio.Future[None]] = {}  # channel -> confirmation
        self._unsubscribing: set[asyncio.Future[None]] = set()
        self.on_unsubscribe: Callable[[str], None] | None = None  # address no longer heard

    def apply(self, interest: Interest) -> None:
        """Start the (un)subscriptions an interest change calls for (in order, no waiting)."""
        for address in interest.unsubscribe:
            if self.on_unsubscribe is not None:
                self.on_unsubscribe(address)
            channel = self._names.channel(address)
            self._confirmed.pop(channel, None)
            task = asyncio.ensure_future(self._unsubscribe(channel))
            self._unsubscribing.add(task)
            task.add_done_callback(self._unsubscribing.discard)
        for address in interest.subscribe:
            channel = self._names.channel(address)
            self._confirmed[channel] = self._start(channel)

    def _start(self, channel: str) -> asyncio.Future[None]:
        fut = asyncio.ensure_future(self._broker.subscribe([channel]))
        fut.add_done_callback(_consume)
        return fut

    async def _unsubscribe(self, channel: str) -> None:
        try:
            await self._broker.unsubscribe([channel])
        except BrokerUnavailable:
            pass  # the broker forgets it at reconnect: it is no longer desired

    async def wait(self, address: str) -> None:
        """Wait until the subscription for ``address`` is confirmed; BrokerUnavailable if not."""
        channel = self._names.channel(address)
        fut = self._confirmed.get(channel)
        if fut is None:
            return  # nobody here needs it any more (e.g. the connection left again)
        if fut.done() and fut.exception() is not None:
            fut = self._confirmed[channel] = self._start(channel)
        try:
            await asyncio.wait_for(asyncio.shield(fut), self._timeout)
        except TimeoutError:
            raise BrokerUnavailable("subscription not confirmed in time") from None


def _consume(fut: asyncio.Future[None]) -> None:
    # Mark exceptions as retrieved: waiters look at them; nobody may be waiting.
    if not fut.cancelled() and fut.exception() is not None:
        log.debug("subscribe failed: %s", fut.exception())
