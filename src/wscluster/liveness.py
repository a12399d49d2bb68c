"""Loss detection that does not wait for the next message: every ``--check-interval`` a node
compares its history positions with the store's (streams.py), and, when its broker link was
quiet for that long, publishes a probe to its own channel. A probe that does not come back
within the interval (at least 2 s) means a link that is connected but deaf: the subscriber
is restarted, the node reports itself degraded (/healthz 503, a warning in the log) until a
probe comes back, and the resubscription is followed by an eager position check."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import TYPE_CHECKING

from . import envelope
from .errors import PresenceUnavailable

if TYPE_CHECKING:
    from .node import Node

log = logging.getLogger("wscluster.node")


class Liveness:
    def __init__(self, node: Node) -> None:
        self.node = node
        self.heard = time.monotonic()  # the last broker message, of any kind
        self.degraded: str | None = None  # why the node is degraded, or None
        self._token = ""
        self._echo: asyncio.Future[None] | None = None

    def on_probe(self, token: str) -> None:
        if token == self._token and self._echo is not None and not self._echo.done():
            self._echo.set_result(None)

    def on_broker_up(self) -> None:
        """The broker link is (back) up: messages may have been missed while it was down."""
        if self.node.streams is not None:
            self.node.spawn(self._check(eager=True))

    async def run(self) -> None:
        interval = self.node.config.check_interval
        while True:
            await asyncio.sleep(interval)
            try:
                await self._probe(interval)
                await self._check(eager=False)
            except Exception:  # never let loss detection stop silently
                log.exception("liveness check failed")

    async def _check(self, eager: bool) -> None:
        streams = self.node.streams
        if streams is None:
            return
        try:
            await streams.check(eager)
        except PresenceUnavailable as exc:
            log.debug("position check skipped: %s", exc)

    async def _probe(self, interval: float) -> None:
        node = self.node
        if not node.broker.connected or time.monotonic() - self.heard < interval:
            if self.degraded is not None and node.broker.connected:
                self._back()
            return
        self._token = os.urandom(8).hex()
        self._echo = asyncio.get_running_loop().create_future()
        channel = node.names.node_channel(node.node_id)
        node.broker.publish_nowait(channel, envelope.probe(self._token)).add_done_callback(
            _consume
        )
        try:
            await asyncio.wait_for(self._echo, max(2.0, interval))
        except TimeoutError:
            if not node.broker.connected:
                return  # a known outage, handled by the broker
            node.metrics.probe_failures.inc()
            self.degraded = "broker link deaf (probe did not come back)"
            log.warning("degraded: %s; restarting the subscriber", self.degraded)
            restart = getattr(node.broker, "restart_subscriber", None)
            if restart is not None:
                restart()
            return
        if self.degraded is not None:
            self._back()

    def _back(self) -> None:
        log.info("no longer degraded: the broker link delivers again")
        self.degraded = None


def _consume(fut: asyncio.Future[None]) -> None:
    if not fut.cancelled():
        fut.exception()
