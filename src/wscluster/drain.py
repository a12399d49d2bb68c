"""Draining a node (SIGTERM): stop reading, answer what was read, then close every client
with 1012 in batches (a spread-out reconnect hint), stragglers with 1001 at the timeout."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .node import Node

log = logging.getLogger("wscluster.node")


async def drain_connections(node: Node) -> None:
    cfg = node.config
    log.info("draining %d connections (timeout %.1fs)", len(node.registry), cfg.drain_timeout)
    deadline = time.monotonic() + cfg.drain_timeout
    conns = [e.conn for _, e in node.registry.items()]
    # Stop reading first, so every request already taken gets its answer before 1012.
    for conn in conns:
        conn.freeze()
    settle = time.monotonic() + cfg.drain_timeout / 4
    while any(c.inflight for c in conns) and time.monotonic() < settle:  # noqa: ASYNC110
        await asyncio.sleep(0.02)
    step = max(0.05, (cfg.drain_timeout / 2) / max(1, len(conns) // cfg.drain_batch + 1))
    for i in range(0, len(conns), cfg.drain_batch):
        late = time.monotonic() >= deadline
        for conn in conns[i : i + cfg.drain_batch]:
            if late:  # out of time: no reconnect hint, just going away
                conn.close(1001, "node stopping")
            else:
                retry = int(random.uniform(0.2, 1.0) * 500 * max(1.0, cfg.drain_timeout))
                conn.close(1012, f'{{"retry_ms": {retry}}}')
        if i + cfg.drain_batch < len(conns):
            await asyncio.sleep(step)
    while len(node.registry) and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.05)
