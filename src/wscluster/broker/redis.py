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
never. redis-py's ``PubSub`` is not used: the broker owns its reader and resubscription
(redis_sub.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from wscluster.broker.base import MessageHandler, StateHandler
from wscluster.broker.redis_conn import PING_AFTER, PING_TIMEOUT, Connector
from wscluster.broker.redis_pub import MAX_BATCH, MAX_BATCH_BYTES, Publisher
from wscluster.broker.redis_sub import SUBSCRIBE_BATCH, Subscriber
from wscluster.broker.state import LinkState

__all__ = [
    "MAX_BATCH",
    "MAX_BATCH_BYTES",
    "PING_AFTER",
    "PING_TIMEOUT",
    "SUBSCRIBE_BATCH",
    "RedisBroker",
]

log = logging.getLogger("wscluster.broker")


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
        self._connector = Connector(url, connect_timeout)
        self._where = self._connector.where  # for logs: never the password
        self._connect_timeout = connect_timeout
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        self._pub = Publisher(
            self._connector, publish_timeout, max_pending_bytes, self._update_state
        )
        self._sub = Subscriber(self._connector, self._update_state, self._pub.check_now)
        self._state = LinkState(self._where)

    # --- Broker API -----------------------------------------------------------------
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
            raise RuntimeError("RedisBroker.start() may be called once")
        self._sub.on_message, self._state.on_state = on_message, on_state
        self._tasks = [
            asyncio.create_task(self._pub.run(), name="wsc-broker-pub"),
            asyncio.create_task(self._sub.run(), name="wsc-broker-sub"),
        ]
        await self._state.wait_first(self._connect_timeout, lambda: "")

    def publish_nowait(self, channel: str, payload: bytes) -> asyncio.Future[None]:
        return self._pub.publish_nowait(channel, payload)

    async def publish(self, channel: str, payload: bytes) -> None:
        await self.publish_nowait(channel, payload)

    async def subscribe(self, channels: Sequence[str]) -> None:
        await self._sub.subscribe(channels)

    async def unsubscribe(self, channels: Sequence[str]) -> None:
        await self._sub.unsubscribe(channels)

    async def close(self) -> None:
        if self._closing:
            return
        self._closing = self._pub.closing = self._sub.closing = True
        self._pub.up = self._sub.up = self._state.connected = False
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._pub.fail_publishes("broker closed")
        self._sub.fail_waiters("broker closed")

    # --- state ------------------------------------------------------------------------
    def _update_state(self, reason: str = "") -> None:
        up = self._pub.up and self._sub.up and not self._closing
        self._state.set(up, reason)
