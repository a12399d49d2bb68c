"""The subscribing link of ``RedisBroker``: its own reader loop, and the resubscription of
every remembered channel after a (re)connect (the guarantees: ``broker.redis``)."""

from __future__ import annotations

import asyncio
import logging
import math
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

from redis.asyncio.connection import AbstractConnection

from wscluster.backoff import Backoff
from wscluster.broker.base import MessageHandler, refuse_bad
from wscluster.broker.redis_conn import PING_AFTER, PING_TIMEOUT, Connector, describe
from wscluster.errors import BrokerUnavailable

log = logging.getLogger("wscluster.broker")

SUBSCRIBE_BATCH = 500  # channels per SUBSCRIBE / UNSUBSCRIBE command


class _Confirm(NamedTuple):
    """One expected (un)subscribe confirmation for a channel, and who waits for it."""

    waiters: list[asyncio.Future[None]]
    initial: bool = False  # part of the resubscription after a (re)connect


def _resolve(futures: Iterable[asyncio.Future[None]]) -> None:
    for fut in futures:
        if not fut.done():
            fut.set_result(None)


class Subscriber:
    """The subscribing link; ``run`` is its task, ``up`` its link's state."""

    def __init__(
        self,
        connector: Connector,
        update_state: Callable[[str], None],
        check_publisher: Callable[[], None],
    ) -> None:
        self._connector = connector
        self._update_state = update_state
        self._check_publisher = check_publisher
        self.on_message: MessageHandler | None = None
        self.closing = False  # set by RedisBroker.close
        self.up = False
        self._desired: set[str] = set()
        self._confirm: dict[tuple[bool, str], deque[_Confirm]] = {}
        self._orphans: dict[str, list[asyncio.Future[None]]] = {}
        self._sub_conn: AbstractConnection | None = None
        self._resub_left = 0

    async def subscribe(self, channels: Sequence[str]) -> None:
        if self.closing:
            raise BrokerUnavailable("broker closed")
        todo = await refuse_bad(self.subscribe, channels)
        if not todo:
            return
        self._desired.update(todo)
        conn = self._sub_conn
        if conn is not None and conn.is_connected:
            futs = await self._request(conn, True, todo)
        else:  # resolved by the resubscription after the next (re)connect
            futs = [asyncio.get_running_loop().create_future() for _ in todo]
            for ch, fut in zip(todo, futs, strict=True):
                waiting = self._orphans.setdefault(ch, [])
                waiting[:] = [f for f in waiting if not f.done()]
                waiting.append(fut)
        if not await self._all_within_timeout(futs):
            timeout = self._connector.connect_timeout
            raise BrokerUnavailable(f"subscription not confirmed in {timeout} s")

    async def unsubscribe(self, channels: Sequence[str]) -> None:
        todo = [ch for ch in dict.fromkeys(channels) if ch in self._desired]  # all UTF-8
        if not todo:
            return
        self._desired.difference_update(todo)
        for ch in todo:
            _resolve(self._orphans.pop(ch, ()))
        conn = self._sub_conn
        if self.closing or conn is None or not conn.is_connected:
            return  # nothing to undo: the next resubscription leaves these channels out
        # On timeout the link is in trouble: delivery is already filtered by the desired set.
        await self._all_within_timeout(await self._request(conn, False, todo))

    def restart(self) -> None:
        writer = getattr(self._sub_conn, "_writer", None)
        if writer is not None:
            writer.transport.abort()  # the reader fails; run() reconnects and resubscribes

    def fail_waiters(self, reason: str) -> None:
        waiting = [w for q in self._confirm.values() for c in q for w in c.waiters]
        waiting += [w for ws in self._orphans.values() for w in ws]
        self._confirm.clear()
        self._orphans.clear()
        for fut in waiting:
            if not fut.done():
                fut.set_exception(BrokerUnavailable(reason))

    async def _request(
        self, conn: AbstractConnection, is_sub: bool, chans: list[str]
    ) -> list[asyncio.Future[None]]:
        """(UN)SUBSCRIBE ``chans``; the futures resolve with the confirmations (in order)."""
        loop = asyncio.get_running_loop()
        packed = _pack(conn, "SUBSCRIBE" if is_sub else "UNSUBSCRIBE", chans)  # UTF-8: it packs
        futs: list[asyncio.Future[None]] = [loop.create_future() for _ in chans]
        for ch, fut in zip(chans, futs, strict=True):
            self._confirm.setdefault((is_sub, ch), deque()).append(_Confirm([fut]))
        await _send(conn, packed)
        return futs

    async def _all_within_timeout(self, futs: list[asyncio.Future[None]]) -> bool:
        try:
            async with asyncio.timeout(self._connector.connect_timeout):
                await asyncio.gather(*futs)
        except TimeoutError:
            return False
        return True


    async def run(self) -> None:
        backoff = Backoff(base=0.05, cap=2.0)
        while True:
            conn = self._connector.new_conn("wsc-sub", None)
            try:
                await self._connector.connect(conn)
                backoff.reset()
                self._sub_conn = conn
                await self._resubscribe(conn)
                await self._sub_read(conn)
            except Exception as exc:
                self._sub_lost()
                self._check_publisher()  # the publishing link probably broke too: look now
                self._update_state(describe(exc))
            finally:
                self._sub_lost()
                await self._connector.drop(conn)
            await asyncio.sleep(backoff.next())

    async def _resubscribe(self, conn: AbstractConnection) -> None:
        chans = sorted(self._desired)
        self._resub_left = len(chans)
        for ch in chans:
            entry = _Confirm(self._orphans.pop(ch, []), initial=True)
            self._confirm.setdefault((True, ch), deque()).append(entry)
        _resolve(f for ws in self._orphans.values() for f in ws)  # no longer desired
        self._orphans.clear()
        if chans:
            await _send(conn, _pack(conn, "SUBSCRIBE", chans))
        else:
            self.up = True
            self._update_state("")

    def _sub_lost(self) -> None:
        """Forget the link's pending confirmations; subscribe waiters wait for the next one."""
        self._sub_conn = None
        self.up = False
        self._resub_left = 0
        for (is_sub, ch), entries in self._confirm.items():
            for entry in entries:
                if is_sub and ch in self._desired:
                    self._orphans.setdefault(ch, []).extend(entry.waiters)
                else:
                    _resolve(entry.waiters)
        self._confirm.clear()

    async def _sub_read(self, conn: AbstractConnection) -> None:
        """Read until the link fails. One timer per silence, not one per message: when it
        fires, a PING is sent if nothing was heard for PING_AFTER seconds."""
        loop = asyncio.get_running_loop()
        heard = loop.time()
        pinged = False
        while True:
            deadline = heard + (PING_AFTER + PING_TIMEOUT if pinged else PING_AFTER)
            if loop.time() >= deadline:
                if pinged:
                    raise ConnectionError(f"no answer to PING within {PING_TIMEOUT} s")
                await conn.send_command("PING", check_health=False)
                pinged = True
                continue
            try:
                async with asyncio.timeout_at(deadline):
                    while True:
                        reply = await conn.read_response(
                            timeout=math.inf, disconnect_on_error=False
                        )
                        heard = loop.time()
                        pinged = False
                        if isinstance(reply, list) and len(reply) >= 2:
                            self._dispatch(reply)
            except TimeoutError:
                continue  # recompute: maybe something was heard meanwhile

    def _dispatch(self, reply: list[Any]) -> None:
        kind = reply[0]
        if kind == b"message":
            channel = reply[1].decode()
            if channel in self._desired and self.on_message is not None:
                try:
                    self.on_message(channel, reply[2])
                except Exception:
                    log.exception("on_message handler failed (channel %r)", channel)
        elif kind == b"subscribe" or kind == b"unsubscribe":
            self._confirmed(kind == b"subscribe", reply[1].decode())

    def _confirmed(self, is_sub: bool, channel: str) -> None:
        entries = self._confirm.get((is_sub, channel))
        if not entries:
            return
        entry = entries.popleft()
        if not entries:
            del self._confirm[(is_sub, channel)]
        _resolve(entry.waiters)
        if entry.initial:
            self._resub_left -= 1
            if self._resub_left == 0:
                self.up = True
                self._update_state("")


def _pack(conn: AbstractConnection, cmd: str, chans: list[str]) -> list[bytes]:
    """``cmd`` for every channel, SUBSCRIBE_BATCH a command (the channels are UTF-8)."""
    n = SUBSCRIBE_BATCH
    return conn.pack_commands([(cmd, *chans[i : i + n]) for i in range(0, len(chans), n)])


async def _send(conn: AbstractConnection, packed: list[bytes]) -> None:
    """Send every command in one write; the reader notices a broken link by itself."""
    try:
        await conn.send_packed_command(packed, check_health=False)
    except Exception as exc:
        log.debug("(un)subscribe not sent: %s", describe(exc))
