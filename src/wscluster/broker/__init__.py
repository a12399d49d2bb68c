"""Broker backends, chosen by URL scheme (imported lazily, so a missing optional dependency
only matters to those who use that backend)."""

from __future__ import annotations

from typing import Any

from wscluster.broker.base import Broker, MessageHandler, StateHandler

__all__ = ["SCHEMES", "Broker", "MessageHandler", "StateHandler", "create_broker"]

SCHEMES = ("redis://", "rediss://", "unix://", "memory://", "nats://", "amqp://", "amqps://")


def create_broker(url: str, **kwargs: Any) -> Broker:
    """A broker for ``url``; ``kwargs`` go to the implementation's constructor
    (``connect_timeout``, ``publish_timeout``, ``max_pending_bytes``)."""
    scheme = url.partition("://")[0].lower() if "://" in url else ""
    if scheme in ("redis", "rediss", "unix"):
        from wscluster.broker.redis import RedisBroker

        return RedisBroker(url, **kwargs)
    if scheme == "memory":
        from wscluster.broker.memory import MemoryBroker

        return MemoryBroker(url, **kwargs)
    if scheme in ("nats", "tls"):
        from wscluster.broker.nats import NatsBroker

        return NatsBroker(url, **kwargs)
    if scheme in ("amqp", "amqps"):
        from wscluster.broker.rabbitmq import RabbitMQBroker

        return RabbitMQBroker(url, **kwargs)
    what = f"scheme {scheme}://" if scheme else "URL without a scheme"
    raise ValueError(f"unsupported broker {what}: use one of {', '.join(SCHEMES)}")
