"""RabbitMQ broker (AMQP 0-9-1, ``amqp://`` and ``amqps://``) over aio-pika: two connections,
one to publish and one to subscribe, and one direct exchange ``wscluster`` for every channel.

Routing: a channel is a routing key of that exchange. Routing keys hold at most 255 bytes, so a
longer channel (or one starting with ``#``) is sent under ``#`` + its SHA-256, with the channel
itself in the ``wsc-channel`` header; the receiver maps the key back to the channel it
subscribed and checks that header. Each broker instance owns one exclusive, auto-deleted,
server-named queue, bound once per subscribed channel; a bind-ok is the subscribe barrier
(binds are pipelined without waiting, then one waited bind confirms them all, since a channel
runs its methods in order).

Guarantee: **at-most-once**, **FIFO per publisher** (one AMQP channel and one writer task
publish in ``publish_nowait`` call order, and RabbitMQ keeps one channel's order into a queue;
a future resolves once the broker confirmed that message: publisher confirms, awaited per
batch). Messages are transient, never persisted. Lost:

- while the publishing link is down, ``publish_nowait`` fails at once (no buffering while
  down); messages queued or unconfirmed when it breaks, or unconfirmed after
  ``publish_timeout``, fail with ``BrokerUnavailable`` (such a message may still be routed);
- while the subscribing link is down, messages on its channels are lost for this node: its
  queue dies with its connection. It reconnects with jittered backoff, declares a new queue,
  binds every remembered channel, and only then reports ``on_state(True)``. A closed channel
  or a consumer cancelled by the broker (its queue deleted) counts as a lost link;
- when this node reads too slowly: its queue keeps at most 100 000 messages / 64 MiB and then
  drops the oldest (``x-overflow: drop-head``), so a slow node loses its own backlog without
  RabbitMQ holding unbounded data and without touching the publishers (``reject-publish``
  would nack their messages, even those that every other node received). Consuming is
  ``no_ack``: a prefetch does not apply to it; aiormq's bounded frame buffer and TCP give the
  backpressure, and the queue's bound is what limits the server's memory.

Limits: payloads up to 16 MiB (RabbitMQ 4's default ``max_message_size``); unsubscribing costs
one round trip per channel (AMQP has no no-wait unbind); aiormq writes each message on its
own, so one publisher does about 5 000 messages/s (100 bytes, one core). While RabbitMQ blocks
publishers (memory or disk alarm), publishes fail after ``publish_timeout``. A silent link is
detected by AMQP heartbeats (``heartbeat=2`` unless the URL sets one: dead within about 10 s)
and a publish by its ``publish_timeout``. Transitions are logged on ``wscluster.broker``
("broker lost: ...", "broker back after X s"), payloads never.
"""

from __future__ import annotations

from yarl import URL

from wscluster.broker.pair import PairBroker
from wscluster.broker.rabbitmq_link import (
    EXCHANGE,
    MAX_BATCH,
    MAX_PAYLOAD,
    QUEUE_ARGS,
    Publisher,
    Subscriber,
    routing_key,
)

__all__ = [
    "EXCHANGE",
    "HEARTBEAT",
    "MAX_BATCH",
    "MAX_PAYLOAD",
    "QUEUE_ARGS",
    "RabbitMQBroker",
    "routing_key",
]


HEARTBEAT = 2  # seconds, unless the URL sets ?heartbeat=


class RabbitMQBroker(PairBroker):
    """The ``Broker`` role over RabbitMQ (``amqp://``, ``amqps://``)."""

    _pub: Publisher
    _sub: Subscriber

    def __init__(
        self,
        url: str,
        *,
        connect_timeout: float = 5.0,
        publish_timeout: float = 5.0,
        max_pending_bytes: int = 64 << 20,
    ) -> None:
        parsed = URL(url)
        if "heartbeat" not in parsed.query:
            parsed = parsed.update_query(heartbeat=HEARTBEAT)
        port = parsed.port or (5671 if parsed.scheme == "amqps" else 5672)
        super().__init__(f"{parsed.host}:{port}{parsed.path}", connect_timeout)
        link_url = str(parsed)
        self._pub = Publisher(
            link_url, connect_timeout, publish_timeout, max_pending_bytes, self._update_state
        )
        self._sub = Subscriber(link_url, connect_timeout, self._update_state)

    def _why_down(self) -> str:
        return self._pub.last_error or self._sub.last_error or ""
