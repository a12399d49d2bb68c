"""NATS broker: core NATS publish/subscribe (not JetStream) over one connection (nats-py).

Guarantee: **at-most-once**, **FIFO per publisher** (one writer task sends PUB commands in
``publish_nowait`` call order; ``on_message`` sees messages in the order the server sent
them, across channels too). Lost during an outage:

- while the link is down, ``publish_nowait`` fails at once (nothing is buffered while down);
  messages queued or in flight when it breaks fail with ``BrokerUnavailable`` (such a message
  may have reached the server, but no future resolves for a dropped message);
- messages published on this node's channels while its link is down are lost for this node
  (no history). It reconnects on a fresh connection with jittered backoff and resubscribes
  every remembered channel; ``on_state(True)`` fires once all are confirmed.

Acks: core NATS has none, and nats-py's ``flush()`` writes its PING *ahead of* commands still
in its buffer. So each batch, and each (un)subscribe, ends with a marker published on a
private inbox of the same connection; the server handles a connection's commands in order,
so when the marker is back, all before it was routed or registered (on that server).

Channel ``c`` is subject ``wsc.c<base64url(utf8(c)), unpadded>``: one token, injective.
Limits: ``max_payload`` (1 MiB by default; larger messages fail at once); channels up to
``MAX_CHANNEL_BYTES`` (a longer subject line would exceed ``max_control_line`` and make the
server drop the connection); ~4 KiB of memory per subscription; a frozen server is declared
lost after ~4 s of unanswered PINGs. Servers may be listed comma-separated. Transitions are
logged on ``wscluster.broker`` ("broker lost: ...", "broker back after X s"), payloads never.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from nats.aio.client import Client
from nats.errors import Error as NatsError

from wscluster.backoff import Backoff
from wscluster.broker.base import MessageHandler, StateHandler, refuse_bad
from wscluster.broker.nats_link import (
    LINK_ERRORS,
    MAX_BATCH,
    MAX_BATCH_BYTES,
    MAX_CHANNEL_BYTES,
    MAX_OUTSTANDING_PINGS,
    PING_INTERVAL,
    Item,
    Link,
    channel_subject,
    describe,
    refused,
    subject_channel,
)
from wscluster.broker.state import LinkState, fail_all
from wscluster.errors import BrokerUnavailable
from wscluster.tasks import cancel_and_wait

__all__ = ["MAX_CHANNEL_BYTES", "NatsBroker", "channel_subject", "subject_channel"]

log = logging.getLogger("wscluster.broker")

class NatsBroker:
    """The ``Broker`` role over core NATS (``nats://``, ``tls://``)."""

    def __init__(
        self,
        url: str,
        *,
        connect_timeout: float = 5.0,
        publish_timeout: float = 5.0,
        max_pending_bytes: int = 64 << 20,
    ) -> None:
        self._servers = [u.strip() for u in url.split(",") if u.strip()]
        where = (urlsplit(u if "://" in u else f"nats://{u}") for u in self._servers)
        self._where = ",".join(f"{p.hostname}:{p.port or 4222}" for p in where)  # no password
        self._connect_timeout = connect_timeout
        self._publish_timeout = publish_timeout
        self._max_pending = max_pending_bytes
        self._on_message: MessageHandler | None = None
        self._desired: dict[str, None] = {}
        self._queue: deque[Item] = deque()
        self._inflight: deque[Item] = deque()
        self._pending_bytes = 0
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._link: Link | None = None  # set while the connection is up
        self._link_ready = asyncio.Event()
        self._stopped = asyncio.Event()
        self._state = LinkState(self._where)
        self._last_error = "no answer"

    # --- Broker API -----------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self._state.connected

    @property
    def pending_bytes(self) -> int:
        return self._pending_bytes

    async def start(
        self, on_message: MessageHandler | None = None, on_state: StateHandler | None = None
    ) -> None:
        if self._task is not None or self._closing:
            raise RuntimeError("NatsBroker.start() may be called once")
        self._on_message, self._state.on_state = on_message, on_state
        self._task = asyncio.create_task(self._run(), name="wsc-broker-nats")
        await self._state.wait_first(self._connect_timeout, lambda: self._last_error)

    def publish_nowait(self, channel: str, payload: bytes) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        size = len(payload)
        link = self._link
        if link is None or link.lost.is_set() or self._closing:
            fut.set_exception(BrokerUnavailable("broker not connected"))
        elif size > link.nc.max_payload or (why := refused(channel)):  # alone, at once
            limit = link.nc.max_payload
            what = f"{size} bytes > {limit}" if size > limit else why
            fut.set_exception(BrokerUnavailable(f"publish refused: {what}"))
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
        todo = await refuse_bad(self.subscribe, channels, refused)
        if not todo:
            return
        self._desired.update(dict.fromkeys(todo))
        try:  # if the link is down, or breaks meanwhile, the next one resubscribes them all
            async with asyncio.timeout(self._connect_timeout):
                while True:
                    await self._link_ready.wait()
                    link = self._link
                    if self._closing:
                        raise BrokerUnavailable("broker closed")
                    if link is None:
                        continue
                    try:
                        await self._add_subs(link, todo)
                        return
                    except LINK_ERRORS as exc:
                        log.debug("subscribe interrupted: %s", describe(exc))
                    await link.lost.wait()
        except TimeoutError:
            raise BrokerUnavailable(
                f"subscription not confirmed within {self._connect_timeout} s"
            ) from None

    async def unsubscribe(self, channels: Sequence[str]) -> None:
        todo = [ch for ch in dict.fromkeys(channels) if ch in self._desired]
        for ch in todo:
            del self._desired[ch]
        link = self._link
        if not todo or link is None or self._closing:
            return  # the next link never subscribes them
        try:
            for ch in todo:
                sub = link.subs.pop(ch, None)
                if sub is not None:
                    await sub.unsubscribe()
            await link.barrier(self._connect_timeout)
        except LINK_ERRORS as exc:  # delivery is filtered by the desired set anyway
            log.debug("unsubscribe not confirmed: %s", describe(exc))

    async def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._state.connected = False
        self._link_ready.set()  # wake subscribe waiters so that they see the broker closed
        self._stopped.set()
        if self._link is not None:
            self._link.fail()  # ends _serve even if the cancellation below gets lost
        if self._task is not None:
            await cancel_and_wait([self._task])
        self._fail_publishes("broker closed")

    # --- the connection -------------------------------------------------------------
    async def _run(self) -> None:
        backoff = Backoff(base=0.05, cap=2.0)
        while not self._closing:  # checked, as nats-py may swallow a cancellation (wait_for)
            link = Link(self._deliver)
            nc = link.nc
            try:
                await nc.connect(**self._connect_options(link))
            except Exception as exc:
                self._last_error = describe(exc)
                log.debug("broker connect failed (%s): %s", self._where, self._last_error)
            else:
                backoff.reset()
                reason = "connection closed"
                try:
                    await self._serve(link)
                except Exception as exc:
                    reason = describe(exc)
                finally:
                    if link.lost.is_set() and nc.last_error:  # closed by the client
                        reason = describe(nc.last_error)
                    self._link_lost(link, reason)
            finally:
                await self._drop(nc)
            with contextlib.suppress(TimeoutError):  # the backoff, cut short by close()
                async with asyncio.timeout(backoff.next()):
                    await self._stopped.wait()

    def _connect_options(self, link: Link) -> dict[str, Any]:
        async def closed() -> None:
            link.fail()
            if self._link is link:
                self._link_ready.clear()

        async def error(exc: Exception) -> None:  # the reason of a lost link is logged later
            log.debug("nats client error (%s): %s", self._where, describe(exc))

        return {
            "servers": self._servers,
            "name": "wsc-broker",
            "allow_reconnect": False,  # a fresh connection per link: see _run
            "max_reconnect_attempts": 1,  # connect() gives up after two tries per server
            "reconnect_time_wait": 0,
            "connect_timeout": self._connect_timeout,
            "ping_interval": PING_INTERVAL,
            "max_outstanding_pings": MAX_OUTSTANDING_PINGS,
            "pending_size": 0,  # never buffer while disconnected
            "closed_cb": closed,
            "disconnected_cb": closed,
            "error_cb": error,
        }

    async def _serve(self, link: Link) -> None:
        await link.subscribe(link.inbox)
        if self._closing:
            return
        self._link = link
        self._link_ready.set()
        lost = asyncio.create_task(link.lost.wait())
        writer = asyncio.create_task(self._write(link), name="wsc-broker-nats-pub")
        try:
            await self._add_subs(link, list(self._desired))
            link.ready = True
            self._update_state("")
            await asyncio.wait((lost, writer), return_when=asyncio.FIRST_COMPLETED)
            if writer.done():
                writer.result()
        finally:
            await cancel_and_wait([lost, writer])

    def _link_lost(self, link: Link, reason: str) -> None:
        link.fail()
        if self._link is link:
            self._link = None
            self._link_ready.clear()
        self._fail_publishes(
            "broker closed" if self._closing else f"broker connection lost: {reason}"
        )
        self._update_state(reason)

    @staticmethod
    async def _drop(nc: Client) -> None:
        try:
            await nc.close()
        except Exception as exc:  # closing a broken connection may fail; it is gone either way
            log.debug("closing broker connection: %s", describe(exc))

    async def _add_subs(self, link: Link, channels: list[str]) -> None:
        """Subscribe the channels this link lacks, then wait until the server has them."""
        for ch in channels:
            if link.lost.is_set():
                raise ConnectionError("connection lost")
            if ch in link.subs or ch not in self._desired:
                continue
            link.subs[ch] = None
            sub = await link.subscribe(channel_subject(ch))
            link.subs[ch] = sub
            if ch not in self._desired:  # unsubscribed meanwhile
                link.subs.pop(ch, None)
                await sub.unsubscribe()
        await link.barrier(self._connect_timeout)

    def _deliver(self, channel: str, payload: bytes) -> None:
        if self._on_message is None or channel not in self._desired:
            return
        try:
            self._on_message(channel, payload)
        except Exception:
            log.exception("on_message handler failed (channel %r)", channel)

    # --- publishing -------------------------------------------------------------------
    async def _write(self, link: Link) -> None:
        """Send queued messages in order, a batch at a time, each batch closed by a marker."""
        queue, inflight, nc = self._queue, self._inflight, link.nc
        while True:
            if not queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            size = 0
            while queue and len(inflight) < MAX_BATCH and size < MAX_BATCH_BYTES:
                item = queue.popleft()
                size += len(item[1])
                inflight.append(item)
                try:
                    await nc.publish(channel_subject(item[0]), item[1])
                except (NatsError, ValueError, TypeError) as exc:
                    if isinstance(exc, NatsError) and nc.is_closed:
                        raise
                    if not item[2].done():  # refused (too large): this message only
                        item[2].set_exception(
                            BrokerUnavailable(f"publish refused: {describe(exc)}")
                        )
            await link.barrier(self._publish_timeout)
            while inflight:
                _, data, fut = inflight.popleft()
                self._pending_bytes -= len(data)
                if not fut.done():
                    fut.set_result(None)

    def _fail_publishes(self, reason: str) -> None:
        self._pending_bytes = 0
        fail_all(reason, self._inflight, self._queue)

    # --- state ------------------------------------------------------------------------
    def _update_state(self, reason: str) -> None:
        link = self._link
        up = link is not None and link.ready and not link.lost.is_set() and not self._closing
        self._state.set(up, reason)
