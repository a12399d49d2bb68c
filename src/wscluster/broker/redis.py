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
import os
from typing import Any

from wscluster.broker.pair import PairBroker
from wscluster.broker.redis_conn import PING_AFTER, PING_TIMEOUT, Connector
from wscluster.broker.redis_history import APPEND
from wscluster.broker.redis_pub import MAX_BATCH, MAX_BATCH_BYTES, Publisher
from wscluster.broker.redis_sub import SUBSCRIBE_BATCH, Subscriber

__all__ = [
    "MAX_BATCH",
    "MAX_BATCH_BYTES",
    "PING_AFTER",
    "PING_TIMEOUT",
    "SUBSCRIBE_BATCH",
    "RedisBroker",
]



class RedisBroker(PairBroker):
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
        super().__init__(self._connector.where, connect_timeout)
        pub = Publisher(self._connector, publish_timeout, max_pending_bytes, self._update_state)
        pub.script = APPEND
        self._pub = self._publisher = pub
        self._sub = self._subscriber = Subscriber(
            self._connector, self._update_state, pub.check_now
        )
        self._epoch_prefix = os.urandom(6).hex()
        self._appends = 0

    def append_nowait(
        self, channel: str, meta_key: str, stream_key: str, payload: bytes, keep: int,
        ttl_ms: int, meta_ttl_ms: int,
    ) -> asyncio.Future[Any]:  # fmt: skip
        """Append to a stream's history and publish with its offset and epoch, atomically and
        in publish order; the future gets ``[offset, epoch]`` (broker.redis_history)."""
        self._appends += 1
        epoch = f"{self._epoch_prefix}{self._appends:x}"  # used only if the stream has none
        args = (channel, payload, keep, ttl_ms, meta_ttl_ms, epoch)
        return self._publisher.script_nowait((meta_key, stream_key), args, len(payload))

    def restart_subscriber(self) -> None:
        """Drop the subscribing link (it reconnects and resubscribes): a link that answers
        PING but no longer delivers messages (the node's liveness probe found it deaf)."""
        self._subscriber.restart()
