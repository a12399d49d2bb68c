"""A node's heartbeat: it keeps the node alive in the presence store, resyncs the store's
mirror of this node's connections when it may be wrong, and purges dead nodes (announcing
their members' presence ``leave`` and running the application's ``on_close`` for them)."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from .errors import PresenceUnavailable

if TYPE_CHECKING:
    from .node import Node

log = logging.getLogger("wscluster.node")


class Heartbeat:
    def __init__(self, node: Node) -> None:
        self.node = node
        self.dirty = True  # the store's mirror may be wrong: resync at the next beat
        self.ok_at = 0.0  # monotonic time of the last successful beat
        self.up = False

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
        try:  # a failed read must not make our own mirror look dirty
            dead = await asyncio.wait_for(node.presence.purge_dead(), cfg.request_timeout)
        except (PresenceUnavailable, TimeoutError, OSError) as exc:
            log.debug("purge skipped: %s", exc)
            return
        for gone in dead:
            node.metrics.purged.inc()
            log.warning("purged dead node %s (%d connections)", gone.node_id, len(gone.connections))
            for c in gone.connections:
                for group in c.groups:
                    node.publish_presence(group, "leave", c.uid, c.client_id)
            if node.app_runner is not None:
                node.app_runner.node_died(gone.connections)
