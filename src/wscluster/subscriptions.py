"""Turns registry interest changes into broker (un)subscriptions, and lets an ack wait until the
subscription it depends on is confirmed (the join/login barrier of PROTOCOL.md)."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Sequence

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
        self._ops: list[tuple[bool, str, asyncio.Future[None] | None]] = []  # this turn's
        self.on_unsubscribe: Callable[[str], None] | None = None  # address no longer heard

    def apply(self, interest: Interest) -> None:
        """Queue the (un)subscriptions an interest change calls for (no waiting). Those of
        one loop turn start together at its end, in call order, one broker request per run
        of the same kind (a storm of logins or closes is a few requests, not thousands)."""
        for address in interest.unsubscribe:
            if self.on_unsubscribe is not None:
                self.on_unsubscribe(address)
            channel = self._names.channel(address)
            self._confirmed.pop(channel, None)
            self._queue(False, channel)
        for address in interest.subscribe:
            channel = self._names.channel(address)
            fut = self._queue(True, channel)
            assert fut is not None
            self._confirmed[channel] = fut

    def _queue(self, subscribe: bool, channel: str) -> asyncio.Future[None] | None:
        """Queue one (un)subscription; a subscription's future is its confirmation."""
        loop = asyncio.get_running_loop()
        if not self._ops:
            loop.call_soon(self._flush)
        fut: asyncio.Future[None] | None = None
        if subscribe:
            fut = loop.create_future()
            fut.add_done_callback(_consume)
        self._ops.append((subscribe, channel, fut))
        return fut

    def _flush(self) -> None:
        ops, self._ops = self._ops, []
        start = 0
        while start < len(ops):
            end = start
            while end < len(ops) and ops[end][0] == ops[start][0]:
                end += 1
            run, start = ops[start:end], end
            channels = [channel for _, channel, _ in run]
            if run[0][0]:
                task = asyncio.ensure_future(self._broker.subscribe(channels))
                task.add_done_callback(functools.partial(_settle, [f for _, _, f in run if f]))
            else:
                task = asyncio.ensure_future(self._unsubscribe(channels))
                self._unsubscribing.add(task)
                task.add_done_callback(self._unsubscribing.discard)

    def _start(self, channel: str) -> asyncio.Future[None]:
        fut = asyncio.ensure_future(self._broker.subscribe([channel]))
        fut.add_done_callback(_consume)
        return fut

    async def _unsubscribe(self, channels: Sequence[str]) -> None:
        try:
            await self._broker.unsubscribe(channels)
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


def _settle(futs: list[asyncio.Future[None]], task: asyncio.Future[None]) -> None:
    """A run's subscribe finished: each of its channels' confirmations with its outcome."""
    exc = task.exception() if not task.cancelled() else BrokerUnavailable("subscribe cancelled")
    for fut in futs:
        if fut.done():
            continue
        if exc is None:
            fut.set_result(None)
        else:
            fut.set_exception(exc)


def _consume(fut: asyncio.Future[None]) -> None:
    # Mark exceptions as retrieved: waiters look at them; nobody may be waiting.
    if not fut.cancelled() and fut.exception() is not None:
        log.debug("subscribe failed: %s", fut.exception())
