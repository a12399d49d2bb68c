"""A node's heartbeat: it keeps the node alive in the presence store, resyncs the store's
mirror of this node's connections when it may be wrong, and purges dead nodes (announcing
their members' presence ``leave`` and running the application's ``on_close`` for them).

A purge runs in its own task, one at a time, so that a long one (thousands of connections,
slow on_close handlers) never delays the heartbeat that keeps this node alive. The store
forgets a batch of a dead node's connections only after its events were fired, so a purge
cut short (this node dies, the store fails) is resumed by a survivor, events included."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from .errors import PresenceUnavailable
from .presence.base import ConnInfo

if TYPE_CHECKING:
    from .node import Node

log = logging.getLogger("wscluster.node")


class Heartbeat:
    def __init__(self, node: Node) -> None:
        self.node = node
        self.dirty = True  # the store's mirror may be wrong: resync at the next beat
        self.ok_at = 0.0  # monotonic time of the last successful beat
        self.up = False
        self._purge: asyncio.Task[None] | None = None

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.node.config.node_heartbeat)
            try:
                await self.once()
            except Exception:  # never let liveness stop silently
                log.exception("heartbeat failed")

    async def once(self) -> None:
        node, cfg = self.node, self.node.config
        try:
            known = await asyncio.wait_for(
                node.presence.heartbeat(node.node_id, cfg.node_ttl, node.stats()),
                cfg.request_timeout,
            )
            if not known or self.dirty:
                self.dirty = False
                await asyncio.wait_for(
                    node.presence.resync(node.node_id, node.snapshot(), cfg.node_ttl, node.stats()),
                    cfg.request_timeout * 4,
                )
                log.info("presence resynced: %d connections", len(node.registry))
            if not self.up:
                log.info("presence store reachable")
                self.up = True
            self.ok_at = time.monotonic()
            node.metrics.presence_up.set(1)
        except (PresenceUnavailable, TimeoutError, OSError) as exc:
            self.dirty = True
            if self.up:
                log.warning("presence store unreachable: %s", exc or type(exc).__name__)
                self.up = False
            node.metrics.presence_up.set(0)
            return
        if self._purge is None or self._purge.done():
            self._purge = asyncio.ensure_future(self._purge_dead())
            node.spawn(self._purge)  # stop() waits for it briefly; cut short, it resumes

    async def _purge_dead(self) -> None:
        node = self.node
        try:  # a failure must not make our own mirror look dirty; the lease lets it resume
            dead = await node.presence.purge_dead(self._fire, lease=node.config.node_ttl)
        except (PresenceUnavailable, TimeoutError, OSError) as exc:
            log.debug("purge interrupted: %s", exc)
            return
        for gone in dead:
            node.metrics.purged.inc()
            log.warning("purged dead node %s (%d connections)", gone.node_id, len(gone.connections))

    async def _fire(self, node_id: str, conns: list[ConnInfo]) -> None:
        """A batch of a dead node's connections: presence ``leave`` for their groups, then
        on_close; the store forgets the batch once this returns."""
        node = self.node
        sent = [node.publish_presence(group, "leave", c.uid, c.client_id)
                for c in conns for group in c.groups]  # fmt: skip
        if node.app_runner is not None:
            await node.app_runner.node_died(conns)
        if sent:  # handed to the broker before the batch is forgotten (a broker down: lost)
            await asyncio.wait(sent, timeout=node.config.request_timeout)
