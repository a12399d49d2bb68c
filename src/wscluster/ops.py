"""The state changes of a connection (bind a uid, join or leave a group), shared by client
frames, application handlers and remote cluster API calls.

Each operation changes the local registry synchronously (so requests apply in the order
they were made) and returns an awaitable barrier: it returns once the broker subscription
and the presence write behind the change hold, or undoes the local change and raises
``ProtocolError`` (``unavailable``; ``internal`` for an unexpected failure). ``join`` may
refuse at once (``forbidden``: too many groups); ``leave``, ``revoke`` and ``unbind`` never
fail (the local change is their barrier).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any

from . import frames
from .errors import BrokerUnavailable, Code, PresenceUnavailable, ProtocolError
from .gateway.connection import Connection
from .registry import Entry, Interest
from .tasks import quietly

if TYPE_CHECKING:
    from .node import Node

log = logging.getLogger("wscluster.node")


class Ops:
    def __init__(self, node: Node) -> None:
        self.node = node

    def entry(self, conn: Connection) -> Entry[Connection]:
        entry = self.node.registry.get(conn.cid)
        if entry is None:
            raise ProtocolError(Code.BAD_REQUEST, "the connection is closed")
        return entry

    def bind(self, conn: Connection, uid: str) -> Awaitable[None]:
        node = self.node
        entry = self.entry(conn)
        old = entry.uid
        waits: list[Awaitable[None]] = [node.subs.wait(f"uid:{uid}")]
        rollback = None
        if old != uid:
            node.subs.apply(node.registry.bind(conn.cid, uid))
            write = node.presence.bind(node.node_id, conn.cid, old, uid)
            waits.append(node.presence_write(write))
            rollback = self._undo(conn, lambda: node.registry.bind(conn.cid, old))
        # a repeated bind waits for the same barrier as the first one
        return self._barrier(waits, rollback)

    def unbind(self, conn: Connection) -> Awaitable[None]:
        node = self.node
        old = self.entry(conn).uid
        if old is None:
            return _done()
        # Local first: from here no message to the uid reaches this connection (the barrier).
        node.subs.apply(node.registry.bind(conn.cid, None))
        return self._settle(node.presence.bind(node.node_id, conn.cid, old, None))

    def join(self, conn: Connection, group: str, presence: bool = False) -> Awaitable[None]:
        node = self.node
        entry = self.entry(conn)
        address = f"group:{group}"
        if group in entry.groups:  # a repeat: same barrier as the first join
            if presence:
                node.watch_presence(conn.cid, group)
            return self._barrier([node.subs.wait(address)], None)
        if len(entry.groups) >= node.config.max_groups_per_connection:
            raise ProtocolError(Code.FORBIDDEN, "too many groups on this connection")
        if presence:
            node.watch_presence(conn.cid, group)
        node.subs.apply(node.registry.join(conn.cid, group))
        # published now, so a later leave (or close) is always announced after it
        node.publish_presence(group, "join", entry.uid, conn.cid)
        waits = [
            node.subs.wait(address),
            node.presence_write(node.presence.join(node.node_id, conn.cid, entry.uid, group)),
        ]
        rollback = self._undo(conn, lambda: self.drop_group(conn, group))
        return self._barrier(waits, rollback)

    def leave(self, conn: Connection, group: str) -> Awaitable[None]:
        node = self.node
        if group not in self.entry(conn).groups:
            return _done()
        self.drop_group(conn, group)  # local first: the barrier holds from here
        return self._settle(node.presence.leave(node.node_id, conn.cid, group))

    def revoke(self, conn: Connection, allowed: Callable[[str], bool]) -> Coroutine[Any, Any, None]:
        """Leave every joined group ``allowed`` refuses (what a new token's claims no longer
        grant), each as ``leave`` does, and tell the client with a ``left`` frame per group
        (after the messages of the group already queued for it). Like ``leave``'s, the barrier
        holds from the call: no later message of those groups reaches the connection; the
        returned awaitable waits for the presence writes."""
        entry = self.node.registry.get(conn.cid)
        if entry is None or conn.closing:
            return _done()
        gone = sorted(g for g in entry.groups if not allowed(g))
        writes = []
        for group in gone:
            writes.append(self.leave(conn, group))
            if not conn.raw:  # a raw client gets no frames of ours
                conn.reply(frames.encode({"type": "left", "group": group, "reason": "forbidden"}))
        return _all(writes)

    def drop_group(self, conn: Connection, group: str) -> None:
        node = self.node
        entry = node.registry.get(conn.cid)
        if entry is not None and group in entry.groups:
            node.unwatch_presence(conn.cid, group)
            node.subs.apply(node.registry.leave(conn.cid, group))
            node.publish_presence(group, "leave", entry.uid, conn.cid)

    # --- helpers ---------------------------------------------------------------------
    def _undo(self, conn: Connection, undo: Callable[[], object]) -> Callable[[], None]:
        """A rollback that runs only if nothing changed the connection's uid or groups since
        (a later request's state must never be undone by an earlier request's failure)."""
        entry = self.entry(conn)
        version = entry.version

        def rollback() -> None:
            current = self.node.registry.get(conn.cid)
            if current is entry and entry.version == version:
                result = undo()
                if isinstance(result, Interest):
                    self.node.subs.apply(result)

        return rollback

    def _settle(self, write: Coroutine[Any, Any, None]) -> Awaitable[None]:
        """leave/unbind: the local change is the barrier and they always succeed; the
        presence write starts now (in order with the others), is awaited (so queries see
        it) and is repaired by a resync if it fails."""
        return quietly(self.node.presence_write(write))

    async def _barrier(
        self, waits: Sequence[Awaitable[None]], rollback: Callable[[], None] | None
    ) -> None:
        outcome = await asyncio.gather(*waits, return_exceptions=True)
        failed = [o for o in outcome if isinstance(o, BaseException)]
        if not failed:
            return
        if rollback is not None:
            rollback()
        self.node.mark_presence_dirty()  # the mirror may hold the undone change
        unexpected = [
            o for o in failed if not isinstance(o, BrokerUnavailable | PresenceUnavailable)
        ]
        if unexpected:
            log.error("internal error: %r", unexpected[0])
            raise ProtocolError(Code.INTERNAL, "internal error")
        what = "broker" if any(isinstance(o, BrokerUnavailable) for o in failed) else (
            "presence store")
        raise ProtocolError(Code.UNAVAILABLE, f"{what} unavailable")


async def _done() -> None:
    return None


async def _all(waits: Sequence[Awaitable[None]]) -> None:
    for wait in waits:
        await wait
