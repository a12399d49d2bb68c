"""The two links of ``RabbitMQBroker``, each one AMQP connection with one channel (the
guarantees: ``broker.rabbitmq``): the publishing link (publisher confirms, one ordered writer)
and the subscribing link (one exclusive queue, its bindings reconciled with the remembered
channels after every (re)connect)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections import deque
from collections.abc import Callable
from typing import Any, ClassVar

import aio_pika
from aio_pika.abc import AbstractConnection
from aiormq import DeliveryError, spec
from aiormq.abc import AbstractChannel, DeliveredMessage

from wscluster.backoff import Backoff
from wscluster.broker.base import MessageHandler, refuse_bad
from wscluster.broker.state import fail_all
from wscluster.errors import BrokerUnavailable
from wscluster.routing import is_utf8

log = logging.getLogger("wscluster.broker")

EXCHANGE = "wscluster"  # one direct exchange (transient, never auto-deleted) for every channel
MAX_KEY_BYTES = 255  # AMQP shortstr: the longest routing key
CHANNEL_HEADER = "wsc-channel"  # the original channel of a hashed routing key
QUEUE_ARGS: dict[str, Any] = {  # the node's queue: bounded, the oldest messages dropped first
    "x-max-length": 100_000,
    "x-max-length-bytes": 64 << 20,
    "x-overflow": "drop-head",
}
MAX_BATCH = 1_000  # messages published before awaiting their confirms together
MAX_BATCH_BYTES = 4 << 20  # payload bytes per batch (at least one message is sent)
MAX_PAYLOAD = 16 << 20  # RabbitMQ 4's default max_message_size; larger ones fail at once
CLOSE_TIMEOUT = 2.0  # seconds to close a connection politely


def routing_key(channel: str) -> str:
    """The channel itself, or ``#`` + its SHA-256 when it is longer than a routing key may be
    (or starts with ``#``, so that the mapping stays injective)."""
    if not channel.startswith("#") and len(channel.encode()) <= MAX_KEY_BYTES:
        return channel
    return "#" + hashlib.sha256(channel.encode()).hexdigest()


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class Link:
    """One connection and channel, reopened with jittered backoff; ``run`` is its task."""

    role: ClassVar[str] = "link"
    confirms: ClassVar[bool] = False

    def __init__(self, url: str, connect_timeout: float, update_state: Callable[[str], None]):
        self._url = url
        self._timeout = connect_timeout
        self._update_state = update_state
        self.closing = False  # set by RabbitMQBroker.close
        self.up = False
        self.last_error = ""  # why the last attempt failed, for the logs
        self._gen = 0  # connection generation: close callbacks of older ones are ignored
        self._broken: str | None = None
        self._kick = asyncio.Event()

    async def run(self) -> None:
        backoff = Backoff(base=0.05, cap=2.0)
        while True:
            conn: AbstractConnection | None = None
            self._gen += 1
            self._broken = None
            try:
                conn = await aio_pika.connect(  # bounded by its timeout, cleaned up on failure
                    self._url,
                    timeout=self._timeout,
                    client_properties={"connection_name": f"wsc-{self.role}"},
                )
                conn.close_callbacks.add(self._watch(self._gen, "connection closed"))
                async with asyncio.timeout(self._timeout):
                    channel = await conn.channel(publisher_confirms=self.confirms)
                    channel.close_callbacks.add(self._watch(self._gen, "channel closed"))
                    raw = await channel.get_underlay_channel()
                    await raw.exchange_declare(EXCHANGE, exchange_type="direct")
                    await self._setup(raw)
                backoff.reset()
                await self._serve(raw)
            except Exception as exc:
                self.up = False
                self.last_error = reason = describe(exc)
                log.debug("broker %s link failed: %s", self.role, reason)
                self._lost(reason)
                self._update_state(reason)
            finally:
                self._gen += 1
                if conn is not None:
                    await self._drop(conn)
            await asyncio.sleep(backoff.next())

    def _watch(self, gen: int, what: str) -> Callable[..., None]:
        def closed(_sender: object, exc: BaseException | None = None, *_: object) -> None:
            if gen == self._gen and self._broken is None:
                self.up = False  # publish_nowait fails fast from now on
                self._broken = what + (f" ({describe(exc)})" if exc else "")
                self._kick.set()

        return closed

    def _check(self) -> None:
        if self._broken is not None:
            raise ConnectionError(self._broken)

    @staticmethod
    async def _drop(conn: AbstractConnection) -> None:
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await conn.close()
        except Exception as exc:  # closing a broken link may fail; it is gone either way
            log.debug("closing broker connection: %s", describe(exc))

    async def _setup(self, raw: AbstractChannel) -> None:
        """Declare what the link needs (bounded by the connect timeout)."""

    async def _serve(self, raw: AbstractChannel) -> None:
        raise NotImplementedError

    def _lost(self, reason: str) -> None:
        """The link broke (or could not be opened): forget what depended on it."""


_Item = tuple[str, bytes, asyncio.Future[None]]


class Publisher(Link):
    """The ordered writer: batches of basic.publish, then their confirms awaited together."""

    role = "pub"
    confirms = True

    def __init__(
        self,
        url: str,
        connect_timeout: float,
        publish_timeout: float,
        max_pending_bytes: int,
        update_state: Callable[[str], None],
    ) -> None:
        super().__init__(url, connect_timeout, update_state)
        self._publish_timeout = publish_timeout
        self._max_pending = max_pending_bytes
        self.pending_bytes = 0
        self._queue: deque[_Item] = deque()
        self._inflight: deque[_Item] = deque()

    def publish_nowait(self, channel: str, payload: bytes) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        size = len(payload)
        if not self.up or self.closing:
            fut.set_exception(BrokerUnavailable("broker not connected"))
        elif not is_utf8(channel):  # fails alone, now, not the batch it would join
            fut.set_exception(BrokerUnavailable("publish refused: channel not valid UTF-8"))
        elif self.pending_bytes + size > self._max_pending:
            fut.set_exception(BrokerUnavailable("publish queue full"))
        elif size > MAX_PAYLOAD:
            fut.set_exception(BrokerUnavailable(f"message larger than {MAX_PAYLOAD} bytes"))
        else:
            self.pending_bytes += size
            self._queue.append((channel, payload, fut))
            self._kick.set()
        return fut

    def fail_publishes(self, reason: str) -> None:
        self.pending_bytes = 0
        fail_all(reason, self._inflight, self._queue)

    def _lost(self, reason: str) -> None:
        self.fail_publishes(f"broker connection lost: {reason}")

    async def _serve(self, raw: AbstractChannel) -> None:
        self._check()  # the link may have closed during the setup
        self.up = True
        self._update_state("")
        queue, inflight = self._queue, self._inflight
        while True:
            while not queue and self._broken is None:
                self._kick.clear()
                await self._kick.wait()
            self._check()
            size = 0
            while queue and len(inflight) < MAX_BATCH and size < MAX_BATCH_BYTES:
                item = queue.popleft()
                size += len(item[1])
                inflight.append(item)
            sends = [self._send(raw, channel, data) for channel, data, _ in inflight]
            try:
                async with asyncio.timeout(self._publish_timeout):  # for the whole batch
                    results = await asyncio.gather(*sends, return_exceptions=True)
            except TimeoutError:
                raise TimeoutError(f"no confirm within {self._publish_timeout} s") from None
            failure: BaseException | None = None
            for result in results:  # in publishing order
                _, data, fut = inflight.popleft()
                self.pending_bytes -= len(data)
                if fut.done():
                    continue
                if isinstance(result, DeliveryError):  # nack: this message only
                    fut.set_exception(BrokerUnavailable("publish refused by the broker"))
                elif isinstance(result, ValueError | TypeError):  # not sent: this one only
                    fut.set_exception(BrokerUnavailable(f"publish refused: {describe(result)}"))
                elif isinstance(result, BaseException):
                    failure = failure or result
                    fut.set_exception(BrokerUnavailable(f"publish failed: {describe(result)}"))
                else:
                    fut.set_result(None)
            if failure is not None:
                raise ConnectionError(f"publish failed: {describe(failure)}")

    @staticmethod
    async def _send(raw: AbstractChannel, channel: str, data: bytes) -> None:
        key = routing_key(channel)
        props = None  # aiormq's default: transient (delivery_mode 1)
        if key.startswith("#"):
            props = spec.Basic.Properties(delivery_mode=1, headers={CHANNEL_HEADER: channel})
        await raw.basic_publish(data, exchange=EXCHANGE, routing_key=key, properties=props)


class Subscriber(Link):
    """One exclusive, server-named queue; ``_serve`` reconciles its bindings with the
    remembered channels in rounds (binds pipelined, then one barrier round trip)."""

    role = "sub"

    def __init__(self, url: str, connect_timeout: float, update_state: Callable[[str], None]):
        super().__init__(url, connect_timeout, update_state)
        self.on_message: MessageHandler | None = None
        self._desired: dict[str, str] = {}  # routing key -> channel
        self._dirty: set[str] = set()  # keys whose binding may differ from _desired
        self._version = 0  # bumped by every (un)subscribe call
        self._waiters: list[tuple[int, bool, asyncio.Future[None]]] = []
        self._queue = ""
        self._raw: AbstractChannel | None = None

    async def subscribe(self, channels: list[str]) -> None:
        if self.closing:
            raise BrokerUnavailable("broker closed")
        for channel in await refuse_bad(self.subscribe, channels):
            key = routing_key(channel)
            self._desired[key] = channel
            self._dirty.add(key)
        if self._dirty and not await self._wait(True):  # remembered even when not confirmed
            raise BrokerUnavailable(f"subscription not confirmed in {self._timeout} s")

    async def unsubscribe(self, channels: list[str]) -> None:
        for channel in dict.fromkeys(channels):
            if not is_utf8(channel):
                continue  # never subscribed
            key = routing_key(channel)
            if self._desired.get(key) == channel:
                del self._desired[key]
                self._dirty.add(key)
        # Not waited for while down: the next queue starts without bindings. On timeout the link
        # is in trouble, and delivery is already filtered by the remembered channels.
        if self._dirty and self.up and not self.closing:
            with contextlib.suppress(BrokerUnavailable):
                await self._wait(False)

    async def _wait(self, is_sub: bool) -> bool:
        self._version += 1
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append((self._version, is_sub, fut))
        self._kick.set()
        done, _ = await asyncio.wait([fut], timeout=self._timeout)
        if not done:
            fut.cancel()
            self._waiters = [w for w in self._waiters if not w[2].done()]
            return False
        fut.result()  # BrokerUnavailable when the broker was closed
        return True

    def fail_waiters(self, reason: str) -> None:
        waiters, self._waiters = self._waiters, []
        for _, _, fut in waiters:
            if not fut.done():
                fut.set_exception(BrokerUnavailable(reason))

    def _resolve(self, version: int, subscribers_only: bool) -> None:
        kept = []
        for entry in self._waiters:
            v, is_sub, fut = entry
            if fut.done():
                continue
            if v <= version and (is_sub or not subscribers_only):
                fut.set_result(None)
            else:
                kept.append(entry)
        self._waiters = kept

    async def _setup(self, raw: AbstractChannel) -> None:
        declared = await raw.queue_declare(exclusive=True, auto_delete=True, arguments=QUEUE_ARGS)
        self._queue = declared.queue or ""
        self._raw = raw
        # e.g. its queue was deleted: the channel stays open, but nothing arrives any more
        cancelled = self._watch(self._gen, "consumer cancelled by the broker")
        raw.on_consumer_cancel_callbacks.add(lambda _frame: cancelled(None))
        await raw.basic_consume(self._queue, self._deliver, no_ack=True)

    async def _serve(self, raw: AbstractChannel) -> None:
        bound: set[str] = set()  # the new queue has no bindings
        self._dirty = set(self._desired)
        while True:
            while self.up and not self._dirty and self._broken is None:  # once up: idle
                self._kick.clear()
                await self._kick.wait()
            self._check()
            version, dirty, self._dirty = self._version, self._dirty, set()
            add = [k for k in dirty if k in self._desired and k not in bound]
            drop = [k for k in dirty if k not in self._desired and k in bound]
            if add:
                bound.update(add)
                async with asyncio.timeout(self._timeout + len(add) / 1000):
                    for key in add[:-1]:  # no-wait binds, then one round trip as a barrier:
                        await raw.queue_bind(self._queue, EXCHANGE, key, nowait=True)
                    await raw.queue_bind(self._queue, EXCHANGE, add[-1])  # methods run in order
            self._resolve(version, subscribers_only=bool(drop))
            if not self.up:
                self.up = True
                self._update_state("")
            for key in drop:  # AMQP has no no-wait unbind: one round trip each
                bound.discard(key)
                async with asyncio.timeout(self._timeout):
                    await raw.queue_unbind(self._queue, EXCHANGE, key)
            if drop:
                self._resolve(version, subscribers_only=False)

    async def _deliver(self, message: DeliveredMessage) -> None:
        key = message.routing_key or ""
        channel = self._desired.get(key)
        if channel is None or self.on_message is None or self.closing:
            return  # unsubscribed meanwhile
        if key.startswith("#"):
            headers = message.header.properties.headers or {}
            if headers.get(CHANNEL_HEADER) != channel:
                return
        try:
            self.on_message(channel, message.body)
        except Exception:
            log.exception("on_message handler failed (channel %r)", channel)
