"""Redis (or Valkey) broker: PUBLISH and SUBSCRIBE over two dedicated connections.

Guarantee: **at-most-once**, **FIFO per publisher** (one connection and one writer task send
pipelined PUBLISH commands in ``publish_nowait`` call order). Lost during an outage:

- while the publishing link is down, ``publish_nowait`` fails at once (no buffering while
  down); messages queued or in flight when it breaks fail with ``BrokerUnavailable`` (such a
  message may have reached the server, but no future resolves for a dropped message);
- while the subscribing link is down, messages published on its channels are lost for this
  node (pub/sub keeps no history). It reconnects with jittered backoff and resubscribes every
  remembered channel; ``on_state(True)`` fires once all of them are confirmed.

A silent link is PINGed after 1 s and declared dead 3 s later (half-dead TCP). Transitions
are logged on ``wscluster.broker`` ("broker lost: ...", "broker back after X s"), payloads
never. redis-py's ``PubSub`` is not used: this module owns its reader and resubscription.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

from redis.asyncio.connection import AbstractConnection, Connection, parse_url
from redis.exceptions import ResponseError

from wscluster.backoff import Backoff
from wscluster.broker.base import MessageHandler, StateHandler
from wscluster.errors import BrokerUnavailable

log = logging.getLogger("wscluster.broker")

SUBSCRIBE_BATCH = 500  # channels per SUBSCRIBE / UNSUBSCRIBE command
MAX_BATCH = 10_000  # PUBLISH commands per pipeline
MAX_BATCH_BYTES = 4 << 20  # payload bytes per pipeline (at least one message is sent)
PING_AFTER = 1.0  # seconds of silence on a link before a health PING
PING_TIMEOUT = 3.0  # seconds to wait for the answer before declaring the link dead

_Item = tuple[str, bytes, asyncio.Future[None]]


class _Confirm(NamedTuple):
    """One expected (un)subscribe confirmation for a channel, and who waits for it."""

    waiters: list[asyncio.Future[None]]
    initial: bool = False  # part of the resubscription after a (re)connect


def _resolve(futures: Iterable[asyncio.Future[None]]) -> None:
    for fut in futures:
        if not fut.done():
            fut.set_result(None)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class RedisBroker:
    """The ``Broker`` role over Redis pub/sub (``redis://``, ``rediss://``, ``unix://``)."""

    def __init__(
        self,
        url: str,
        *,
        connect_timeout: float = 5.0,
        publish_timeout: float = 5.0,
        max_pending_bytes: int = 64 << 20,
    ) -> None:
        opts: dict[str, Any] = dict(parse_url(url))
        self._conn_cls: type[AbstractConnection] = opts.pop("connection_class", Connection)
        for pool_only in ("max_connections", "timeout"):
            opts.pop(pool_only, None)
        opts.update(protocol=2, decode_responses=False, socket_connect_timeout=connect_timeout)
        if issubclass(self._conn_cls, Connection):
            opts["socket_keepalive"] = True
        self._conn_opts = opts
        where = opts.get("path") or f"{opts.get('host', 'localhost')}:{opts.get('port', 6379)}"
        self._where = str(where)  # for logs: never the password
        self._connect_timeout = connect_timeout
        self._publish_timeout = publish_timeout
        self._max_pending = max_pending_bytes
        self._on_message: MessageHandler | None = None
        self._on_state: StateHandler | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        # publishing
        self._queue: deque[_Item] = deque()
        self._inflight: deque[_Item] = deque()
        self._pending_bytes = 0
        self._wakeup = asyncio.Event()
        self._pub_check = False
        self._pub_up = False
        # subscribing
        self._desired: set[str] = set()
        self._confirm: dict[tuple[bool, str], deque[_Confirm]] = {}
        self._orphans: dict[str, list[asyncio.Future[None]]] = {}
        self._sub_conn: AbstractConnection | None = None
        self._resub_left = 0
        self._sub_up = False
        # state
        self._connected = False
        self._up = asyncio.Event()
        self._down_since: float | None = None

    # --- Broker API -----------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def pending_bytes(self) -> int:
        return self._pending_bytes

    async def start(
        self, on_message: MessageHandler | None = None, on_state: StateHandler | None = None
    ) -> None:
        if self._tasks or self._closing:
            raise RuntimeError("RedisBroker.start() may be called once")
        self._on_message, self._on_state = on_message, on_state
        self._tasks = [
            asyncio.create_task(self._pub_loop(), name="wsc-broker-pub"),
            asyncio.create_task(self._sub_loop(), name="wsc-broker-sub"),
        ]
        try:
            async with asyncio.timeout(self._connect_timeout):
                await self._up.wait()
        except TimeoutError:
            self._down_since = asyncio.get_running_loop().time() - self._connect_timeout
            msg = "broker lost: %s not reachable within %.1f s, retrying in the background"
            log.warning(msg, self._where, self._connect_timeout)

    def publish_nowait(self, channel: str, payload: bytes) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        size = len(payload)
        if not self._pub_up or self._closing:
            fut.set_exception(BrokerUnavailable("broker not connected"))
        elif self._pending_bytes + size > self._max_pending:
            fut.set_exception(BrokerUnavailable("publish queue full"))
        else:
            self._pending_bytes += size
            self._queue.append((channel, payload, fut))
            self._wakeup.set()
        return fut

    async def publish(self, channel: str, payload: bytes) -> None:
        await self.publish_nowait(channel, payload)

    async def subscribe(self, channels: Sequence[str]) -> None:
        if self._closing:
            raise BrokerUnavailable("broker closed")
        todo = list(dict.fromkeys(channels))
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
            raise BrokerUnavailable(f"subscription not confirmed in {self._connect_timeout} s")

    async def unsubscribe(self, channels: Sequence[str]) -> None:
        todo = [ch for ch in dict.fromkeys(channels) if ch in self._desired]
        if not todo:
            return
        self._desired.difference_update(todo)
        for ch in todo:
            _resolve(self._orphans.pop(ch, ()))
        conn = self._sub_conn
        if self._closing or conn is None or not conn.is_connected:
            return  # nothing to undo: the next resubscription leaves these channels out
        # On timeout the link is in trouble: delivery is already filtered by the desired set.
        await self._all_within_timeout(await self._request(conn, False, todo))

    async def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._pub_up = self._sub_up = self._connected = False
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._fail_publishes("broker closed")
        waiting = [w for q in self._confirm.values() for c in q for w in c.waiters]
        waiting += [w for ws in self._orphans.values() for w in ws]
        self._confirm.clear()
        self._orphans.clear()
        for fut in waiting:
            if not fut.done():
                fut.set_exception(BrokerUnavailable("broker closed"))

    # --- connections and state --------------------------------------------------------
    def _new_conn(self, name: str, socket_timeout: float | None) -> AbstractConnection:
        opts = {**self._conn_opts, "client_name": name, "socket_timeout": socket_timeout}
        return self._conn_cls(**opts)

    async def _connect(self, conn: AbstractConnection) -> None:
        async with asyncio.timeout(self._connect_timeout):
            await conn.connect_check_health(check_health=False, retry_socket_connect=False)

    @staticmethod
    async def _drop(conn: AbstractConnection) -> None:
        try:
            await conn.disconnect()
        except Exception as exc:  # closing a broken socket may fail; it is gone either way
            log.debug("closing broker connection: %s", _describe(exc))

    def _update_state(self, reason: str = "") -> None:
        up = self._pub_up and self._sub_up and not self._closing
        if up == self._connected:
            return
        self._connected = up
        now = asyncio.get_running_loop().time()
        if up:
            self._up.set()
            if self._down_since is not None:
                log.info("broker back after %.1f s", now - self._down_since)
            self._down_since = None
        else:
            self._up.clear()
            self._down_since = now
            log.warning("broker lost: %s (%s)", reason, self._where)
        if self._on_state is not None:
            try:
                self._on_state(up)
            except Exception:
                log.exception("on_state handler failed")

    # --- publishing ------------------------------------------------------------------
    def _fail_publishes(self, reason: str) -> None:
        items = [*self._inflight, *self._queue]
        self._inflight.clear()
        self._queue.clear()
        self._pending_bytes = 0
        for _, _, fut in items:
            if not fut.done():
                fut.set_exception(BrokerUnavailable(reason))

    async def _pub_loop(self) -> None:
        backoff = Backoff(base=0.05, cap=2.0)
        while True:
            conn = self._new_conn("wsc-pub", self._publish_timeout)
            try:
                await self._connect(conn)
                backoff.reset()
                self._pub_up = True
                self._update_state()
                await self._pub_serve(conn)
            except Exception as exc:
                self._pub_up = False
                self._fail_publishes(f"broker connection lost: {_describe(exc)}")
                self._update_state(_describe(exc))
            finally:
                await self._drop(conn)
            await asyncio.sleep(backoff.next())

    async def _pub_serve(self, conn: AbstractConnection) -> None:
        queue, inflight = self._queue, self._inflight
        while True:
            if not queue and not self._pub_check:
                self._wakeup.clear()
                try:
                    async with asyncio.timeout(PING_AFTER):
                        await self._wakeup.wait()
                except TimeoutError:
                    self._pub_check = True
            if self._pub_check:  # idle, or the subscribing link just broke: check this one
                self._pub_check = False
                await conn.send_command("PING", check_health=False)
                if await conn.read_response(timeout=PING_TIMEOUT) is None:
                    raise ConnectionError(f"no answer to PING within {PING_TIMEOUT} s")
                continue
            size = 0
            while queue and len(inflight) < MAX_BATCH and size < MAX_BATCH_BYTES:
                item = queue.popleft()
                size += len(item[1])
                inflight.append(item)
            packed = conn.pack_commands([("PUBLISH", ch, data) for ch, data, _ in inflight])
            await conn.send_packed_command(packed, check_health=False)
            async with asyncio.timeout(self._publish_timeout):  # for the whole batch
                while inflight:
                    try:
                        await conn.read_response(timeout=math.inf)
                        error = None
                    except ResponseError as exc:  # refused by the server: this message only
                        error = BrokerUnavailable(f"publish refused: {exc}")
                    _, data, fut = inflight.popleft()
                    self._pending_bytes -= len(data)
                    if fut.done():
                        continue
                    if error is None:
                        fut.set_result(None)
                    else:
                        fut.set_exception(error)

    # --- subscribing -----------------------------------------------------------------
    async def _request(
        self, conn: AbstractConnection, is_sub: bool, chans: list[str]
    ) -> list[asyncio.Future[None]]:
        """(UN)SUBSCRIBE ``chans``; the futures resolve with the confirmations (in order)."""
        loop = asyncio.get_running_loop()
        futs: list[asyncio.Future[None]] = [loop.create_future() for _ in chans]
        for ch, fut in zip(chans, futs, strict=True):
            self._confirm.setdefault((is_sub, ch), deque()).append(_Confirm([fut]))
        await self._send_batched(conn, "SUBSCRIBE" if is_sub else "UNSUBSCRIBE", chans)
        return futs

    async def _all_within_timeout(self, futs: list[asyncio.Future[None]]) -> bool:
        try:
            async with asyncio.timeout(self._connect_timeout):
                await asyncio.gather(*futs)
        except TimeoutError:
            return False
        return True

    async def _send_batched(self, conn: AbstractConnection, cmd: str, chans: list[str]) -> None:
        """Send every command in one write; the reader notices a broken link by itself."""
        n = SUBSCRIBE_BATCH
        packed = conn.pack_commands([(cmd, *chans[i : i + n]) for i in range(0, len(chans), n)])
        try:
            await conn.send_packed_command(packed, check_health=False)
        except Exception as exc:
            log.debug("%s not sent: %s", cmd, _describe(exc))

    async def _sub_loop(self) -> None:
        backoff = Backoff(base=0.05, cap=2.0)
        while True:
            conn = self._new_conn("wsc-sub", None)
            try:
                await self._connect(conn)
                backoff.reset()
                self._sub_conn = conn
                await self._resubscribe(conn)
                await self._sub_read(conn)
            except Exception as exc:
                self._sub_lost()
                self._pub_check = True  # the publishing link probably broke too: look now
                self._wakeup.set()
                self._update_state(_describe(exc))
            finally:
                self._sub_lost()
                await self._drop(conn)
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
            await self._send_batched(conn, "SUBSCRIBE", chans)
        else:
            self._sub_up = True
            self._update_state()

    def _sub_lost(self) -> None:
        """Forget the link's pending confirmations; subscribe waiters wait for the next one."""
        self._sub_conn = None
        self._sub_up = False
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
            if channel in self._desired and self._on_message is not None:
                try:
                    self._on_message(channel, reply[2])
                except Exception:
                    log.exception("on_message handler failed (channel %s)", channel)
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
                self._sub_up = True
                self._update_state()
