"""Turns registry interest changes into broker (un)subscriptions, and lets an ack wait until the
subscription it depends on is confirmed (the join/login barrier of PROTOCOL.md).

The (un)subscriptions of one loop turn, many connections' together, go to the broker in one
call per run of the same kind. One bad channel fails only its own confirmation: one that is
not UTF-8 is refused before it joins the call, one the broker refuses (``ChannelRefused``)
fails alone, and a call that fails for a reason of its own (not ``BrokerUnavailable``, which
is the link's and fails them all) is made again channel by channel."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from .broker.base import Broker, ChannelRefused
from .errors import BrokerUnavailable
from .naming import Names
from .registry import Interest
from .routing import is_utf8

log = logging.getLogger("wscluster.node")


class Subscriptions:
    def __init__(self, broker: Broker, names: Names, timeout: float) -> None:
        self._broker = broker
        self._names = names
        self._timeout = timeout
        self._confirmed: dict[str, asyncio.Future[None]] = {}  # channel -> confirmation
        self._tasks: set[asyncio.Future[None]] = set()  # (un)subscribe calls under way
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
        """Queue one (un)subscription; a subscription's future is its confirmation. A
        channel that is not UTF-8 never joins the turn's call: refused here, alone (never
        subscribed, so there is nothing to unsubscribe either)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] | None = None
        if subscribe:
            fut = loop.create_future()
            fut.add_done_callback(_consume)
        if not is_utf8(channel):
            if fut is not None:
                fut.set_exception(ChannelRefused([channel], "not valid UTF-8"))
            return fut
        if not self._ops:
            loop.call_soon(self._flush)
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
            if run[0][0]:
                self._spawn(self._subscribe([(ch, f) for _, ch, f in run if f]))
            else:
                self._spawn(self._unsubscribe([ch for _, ch, _ in run]))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _subscribe(self, run: list[tuple[str, asyncio.Future[None]]]) -> None:
        """One broker call for a run of subscriptions; settle each one's confirmation."""
        try:
            await self._broker.subscribe([ch for ch, _ in run])
        except ChannelRefused as exc:  # those fail, the others are subscribed
            refused = set(exc.channels)
            for ch, fut in run:
                _settle(fut, exc if ch in refused else None)
        except BrokerUnavailable as exc:  # the link's: shared by all
            for _, fut in run:
                _settle(fut, exc)
        except Exception as exc:  # not the link's: maybe one channel's, so each alone
            if len(run) > 1:
                await asyncio.gather(*(self._subscribe([item]) for item in run))
                return
            log.error("subscribe of %r failed: %r", run[0][0], exc)
            _settle(run[0][1], BrokerUnavailable(f"subscribe failed: {exc!r}"))
        else:
            for _, fut in run:
                _settle(fut, None)
        finally:  # cancelled (the node stops): nobody is left waiting
            for _, fut in run:
                _settle(fut, BrokerUnavailable("subscribe cancelled"))

    def _start(self, channel: str) -> asyncio.Future[None]:
        fut = asyncio.get_running_loop().create_future()
        fut.add_done_callback(_consume)
        self._spawn(self._subscribe([(channel, fut)]))
        return fut

    async def _unsubscribe(self, channels: Sequence[str]) -> None:
        try:
            await self._broker.unsubscribe(channels)
        except BrokerUnavailable:
            pass  # the broker forgets it at reconnect: it is no longer desired
        except Exception as exc:  # not the link's: maybe one channel's, so each alone
            if len(channels) > 1:
                await asyncio.gather(*(self._unsubscribe([ch]) for ch in channels))
            else:
                log.error("unsubscribe of %r failed: %r", channels[0], exc)

    async def wait(self, address: str) -> None:
        """Wait until the subscription for ``address`` is confirmed; BrokerUnavailable if not."""
        channel = self._names.channel(address)
        fut = self._confirmed.get(channel)
        if fut is None:
            return  # nobody here needs it any more (e.g. the connection left again)
        refused = fut.exception() if fut.done() else None
        if isinstance(refused, ChannelRefused):  # for good: not tried again
            raise ChannelRefused([channel], refused.reason)
        if fut.done() and fut.exception() is not None:
            fut = self._confirmed[channel] = self._start(channel)
        try:
            await asyncio.wait_for(asyncio.shield(fut), self._timeout)
        except TimeoutError:
            raise BrokerUnavailable("subscription not confirmed in time") from None


def _settle(fut: asyncio.Future[None], exc: BaseException | None) -> None:
    """A subscription's confirmation, unless it has one already."""
    if fut.done():
        return
    if exc is None:
        fut.set_result(None)
    else:
        fut.set_exception(exc)


def _consume(fut: asyncio.Future[None]) -> None:
    # Mark exceptions as retrieved: waiters look at them; nobody may be waiting.
    if not fut.cancelled() and fut.exception() is not None:
        log.debug("subscribe failed: %s", fut.exception())
