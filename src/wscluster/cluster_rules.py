"""The cluster holds its history rules: a node started with ``--history`` writes them to the
presence store (``Names.history_rules_key``, no TTL, the last writer wins) before it reports
healthy; every node then follows what the store holds, re-read every ``--check-interval``, so
a node started without ``--history`` adopts the cluster's rules and a rolling change reaches
every node within one interval. Publishers (``Cluster``) read the same key (cluster.py).

A store that lost the key (it restarted empty) gets back the rules the node last knew."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .cluster import stores_history
from .errors import PresenceUnavailable
from .history import specs_of

if TYPE_CHECKING:
    from .node import Node

log = logging.getLogger("wscluster.node")


class ClusterRules:
    def __init__(self, node: Node) -> None:
        self.node = node
        self.given = specs_of(node.config.history) if node.config.history else None
        self.enabled = stores_history(node.broker)
        self.written = self.given is None or not self.enabled  # healthy only once written
        self.known: tuple[str, ...] | None = self.given  # what the store held last
        self._task: asyncio.Task[None] | None = None
        if self.given and self.enabled:  # in force until the store says otherwise
            node.cluster.adopt_rules(self.given)

    async def start(self) -> None:
        if self.enabled:
            await self.sync()
            self._task = asyncio.create_task(self._run())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.node.config.check_interval)
            try:
                await self.sync()
            except Exception:  # never let the rules stop following silently
                log.exception("history rules check failed")

    async def sync(self) -> None:
        """Write our rules (once), else read the cluster's; then follow them."""
        presence, timeout = self.node.presence, self.node.config.request_timeout
        try:
            if not self.written and self.given is not None:
                old = await asyncio.wait_for(presence.set_history_rules(self.given), timeout)
                self.written = True
                if old is None or tuple(old) != self.given:  # a change of others' rules warns
                    level = logging.INFO if old is None else logging.WARNING
                    log.log(level, "history rules of the cluster set by this node: %s",
                            _diff(old or (), self.given))  # fmt: skip
                stored: Sequence[str] | None = self.given
            else:
                stored = await asyncio.wait_for(presence.history_rules(), timeout)
                if stored is None and self.known is not None:
                    await asyncio.wait_for(presence.set_history_rules(self.known), timeout)
                    log.warning("history rules missing from the store: written again (%s)",
                                ", ".join(self.known) or "none")  # fmt: skip
                    stored = self.known
        except (PresenceUnavailable, TimeoutError, OSError) as exc:
            log.warning("history rules: presence store unavailable (%s)", exc)
            return
        if stored is not None:
            self.follow(tuple(stored))

    def follow(self, specs: tuple[str, ...]) -> None:
        self.known = specs
        cluster = self.node.cluster
        before = cluster.history_rules.specs
        try:
            changed = cluster.adopt_rules(specs)
        except ValueError as exc:
            log.warning("ignored the cluster's history rules: %s", exc)
            return
        if changed:
            log.warning("history rules now followed: %s", _diff(before, specs))
            if self.node.streams is not None:
                self.node.streams.retain()


def _diff(old: Sequence[str], new: Sequence[str]) -> str:
    """``+added -removed`` (or ``none``)."""
    parts = [f"+{r}" for r in new if r not in old] + [f"-{r}" for r in old if r not in new]
    return " ".join(parts) or ("unchanged" if new else "none")
