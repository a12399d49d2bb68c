"""The Broker role: publish/subscribe between nodes.

Contract every implementation keeps (tests/contract/test_broker.py checks it against a real
server):

- ``publish_nowait`` enqueues synchronously, so calls made in some order are handed to the
  broker in that order (per-publisher FIFO). The future it returns resolves once the message
  was accepted by the broker, or fails with ``BrokerUnavailable``; it never resolves for a
  message that was dropped.
- ``subscribe`` returns once the broker confirmed the subscription: any message published
  after that (by anyone) on those channels reaches ``on_message``. Subscriptions are
  remembered and restored after every reconnect, including ones whose wait failed.
- ``on_message(channel, payload)`` runs on the event loop and must not block.
- ``on_state(connected)`` is called on every transition between connected and disconnected
  (connected means: publishing works and every remembered subscription is in place).
- Delivery is at-most-once: a message published while a subscriber's link is down is lost
  for that subscriber. Each implementation's docstring states its own limits.
- One bad channel fails alone: a channel that is not UTF-8 (``routing.is_utf8``), or one the
  broker cannot carry (too long for NATS), fails its publish's future at once, and in a
  ``subscribe`` call raises ``ChannelRefused`` naming it once the call's other channels
  are confirmed. Such a channel is never remembered; in ``unsubscribe`` it is ignored. The
  links stay up: nothing a caller names can break a batch shared with other callers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, Protocol

from wscluster.errors import BrokerUnavailable
from wscluster.routing import is_utf8

MessageHandler = Callable[[str, bytes], None]
StateHandler = Callable[[bool], None]


class ChannelRefused(BrokerUnavailable):
    """Channels of a ``subscribe`` call refused for what they are (``channels``); the
    call's other channels are subscribed."""

    def __init__(self, channels: Iterable[str], reason: str) -> None:
        self.channels = tuple(channels)
        super().__init__(f"{len(self.channels)} channel(s) refused: {reason}")
        self.reason = reason


def utf8_refusal(channel: str) -> str | None:
    """Why a broker refuses ``channel``: None, unless it is not UTF-8 (a fast check)."""
    return None if is_utf8(channel) else "not valid UTF-8"


async def refuse_bad(
    subscribe: Callable[[list[str]], Awaitable[None]], channels: Iterable[str],
    why: Callable[[str], str | None] = utf8_refusal,
) -> list[str]:  # fmt: skip
    """The channels of a ``subscribe``, deduplicated, once none is refused. Refused ones fail
    alone: the others are subscribed (``subscribe`` again) and ``ChannelRefused`` names the
    refused ones, which are never remembered (a resubscription sends none of them)."""
    todo = list(dict.fromkeys(channels))
    bad = {ch: reason for ch in todo if (reason := why(ch))}
    if bad:
        await subscribe([ch for ch in todo if ch not in bad])
        raise ChannelRefused(bad, ", ".join(sorted(set(bad.values()))))
    return todo


class Broker(Protocol):
    @property
    def connected(self) -> bool:
        """True while publishing works and all subscriptions are in place."""
        ...

    @property
    def pending_bytes(self) -> int:
        """Bytes queued for publishing and not yet accepted by the broker (backpressure)."""
        ...

    async def start(
        self, on_message: MessageHandler | None = None, on_state: StateHandler | None = None
    ) -> None:
        """Begin connecting; waits up to the connect timeout for the first connection, and
        keeps retrying in the background (with jittered backoff) if it is not there yet."""
        ...

    def publish_nowait(self, channel: str, payload: bytes) -> asyncio.Future[None]:
        """Enqueue a message; the future resolves when the broker accepted it."""
        ...

    async def publish(self, channel: str, payload: bytes) -> None:
        """Publish and wait for the broker to accept it; raises BrokerUnavailable."""
        ...

    async def subscribe(self, channels: Sequence[str]) -> None:
        """Subscribe and wait for the confirmation; raises BrokerUnavailable on timeout."""
        ...

    async def unsubscribe(self, channels: Sequence[str]) -> None:
        """Stop listening; waits for the confirmation when connected."""
        ...

    async def close(self) -> None:
        """Stop all tasks and close connections; pending publishes fail."""
        ...


class HistoryBroker(Broker, Protocol):
    """A broker that also keeps history (Redis): append and publish in one step."""

    def append_nowait(
        self, channel: str, meta_key: str, stream_key: str, payload: bytes, keep: int,
        ttl_ms: int, meta_ttl_ms: int,
    ) -> asyncio.Future[Any]:  # fmt: skip
        """Like ``publish_nowait``, and the message gets the stream's next offset; the future
        resolves with ``[offset, epoch]`` once the store accepted both."""
        ...

    def restart_subscriber(self) -> None:
        """Drop and re-establish the subscribing link (it resubscribes everything)."""
        ...
