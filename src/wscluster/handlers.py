"""The core client commands of PROTOCOL.md, applied to a node: login, logout, join, leave,
send, presence, ping. Local state changes happen synchronously in frame order; the broker
and presence I/O behind an ack runs afterwards, and the ack waits for it (barriers)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any

from . import envelope, frames
from .errors import BrokerUnavailable, Code, PresenceUnavailable, ProtocolError
from .gateway.connection import Connection
from .registry import Entry, Interest
from .routing import Kind, channel_for

if TYPE_CHECKING:
    from .node import Node

log = logging.getLogger("wscluster.node")


class Handlers:
    def __init__(self, node: Node) -> None:
        self.node = node
        self._table = {
            "send": self.send,
            "ping": self.ping,
            "login": self.login,
            "logout": self.logout,
            "join": self.join,
            "leave": self.leave,
            "presence": self.presence,
        }

    def handle(self, conn: Connection, payload: bytes) -> None:
        try:
            cmd = frames.parse(payload)
        except frames.FrameError as exc:
            conn.error(exc.frame_id, exc.code, exc.message)
            return
        if len(payload) > self.node.config.max_message_size:
            conn.error(cmd.id, Code.TOO_LARGE, f"over {self.node.config.max_message_size} bytes")
            return
        handler = self._table.get(cmd.type)
        if handler is None:
            conn.error(cmd.id, Code.UNKNOWN_TYPE, f"unknown type {cmd.type[:64]!r}")
            return
        try:
            handler(conn, cmd)
        except ProtocolError as exc:
            conn.error(cmd.id, exc.code, exc.message)
        except Exception:
            log.exception("internal error handling %r", cmd.type[:64])
            conn.error(cmd.id, Code.INTERNAL, "internal error")

    # --- commands --------------------------------------------------------------------
    def ping(self, conn: Connection, cmd: frames.Command) -> None:
        conn.reply(frames.pong(cmd.id))

    def send(self, conn: Connection, cmd: frames.Command) -> None:
        node = self.node
        uid = self._entry(conn).uid
        if uid is None:
            raise ProtocolError(Code.NOT_LOGGED_IN, "login before sending")
        address = cmd.address
        assert address is not None
        if node.broker.pending_bytes > node.config.max_publish_queue:
            raise ProtocolError(Code.RATE_LIMITED, "node overloaded, slow down")
        frame = envelope.message_frame(address, cmd.raw.data, envelope.Sender(uid, conn.cid))
        fut = node.broker.publish_nowait(
            channel_for(node.names, address), envelope.deliver(address, frame)
        )
        conn.sending()
        frame_id = cmd.id

        def done(f: asyncio.Future[None]) -> None:
            conn.sent()
            exc = f.exception() if not f.cancelled() else BrokerUnavailable("cancelled")
            if exc is None:
                node.metrics.published.inc()
                conn.ack(frame_id)
            elif isinstance(exc, BrokerUnavailable):
                conn.error(frame_id, Code.UNAVAILABLE, "broker unavailable")
            else:
                log.error("publish failed: %r", exc)
                conn.error(frame_id, Code.INTERNAL, "internal error")

        fut.add_done_callback(done)

    def login(self, conn: Connection, cmd: frames.Command) -> None:
        node = self.node
        if cmd.raw.token is not None or not node.config.anonymous:
            raise ProtocolError(Code.FORBIDDEN, "login with a uid needs anonymous mode")
        uid = cmd.name
        assert uid is not None
        entry = self._entry(conn)
        old = entry.uid
        waits: list[Awaitable[None]] = [node.subs.wait(f"uid:{uid}")]
        rollback = None
        if old != uid:
            node.subs.apply(node.registry.bind(conn.cid, uid))
            write = node.presence.bind(node.node_id, conn.cid, old, uid)
            waits.append(node.presence_write(write))
            rollback = self._undo(conn, lambda: node.registry.bind(conn.cid, old))
        # a repeated login waits for the same barrier as the first one
        self._finish(conn, cmd.id, waits, {"uid": uid}, rollback)

    def logout(self, conn: Connection, cmd: frames.Command) -> None:
        node = self.node
        entry = self._entry(conn)
        old = entry.uid
        if old is None:
            conn.ack(cmd.id)
            return
        # Local first: from here no message to the uid reaches this connection (the barrier).
        node.subs.apply(node.registry.bind(conn.cid, None))
        self._always_ack(conn, cmd.id, node.presence.bind(node.node_id, conn.cid, old, None))

    def join(self, conn: Connection, cmd: frames.Command) -> None:
        node = self.node
        group = cmd.name
        assert group is not None
        entry = self._entry(conn)
        address = f"group:{group}"
        if group in entry.groups:  # a repeat: same barrier as the first join
            if cmd.raw.presence:
                node.watch_presence(conn.cid, group)
            self._finish(conn, cmd.id, [node.subs.wait(address)], {}, None)
            return
        if len(entry.groups) >= node.config.max_groups_per_connection:
            raise ProtocolError(Code.FORBIDDEN, "too many groups on this connection")
        if cmd.raw.presence:
            node.watch_presence(conn.cid, group)
        node.subs.apply(node.registry.join(conn.cid, group))
        # published now, so a later leave (or close) is always announced after it
        node.publish_presence(group, "join", entry.uid, conn.cid)
        waits = [
            node.subs.wait(address),
            node.presence_write(node.presence.join(node.node_id, conn.cid, entry.uid, group)),
        ]
        rollback = self._undo(conn, lambda: self._leave(conn, group, event=True))
        self._finish(conn, cmd.id, waits, {}, rollback)

    def leave(self, conn: Connection, cmd: frames.Command) -> None:
        node = self.node
        group = cmd.name
        assert group is not None
        if group not in self._entry(conn).groups:
            conn.ack(cmd.id)
            return
        self._leave(conn, group, event=True)  # local first: the barrier holds from here
        self._always_ack(conn, cmd.id, node.presence.leave(node.node_id, conn.cid, group))

    def presence(self, conn: Connection, cmd: frames.Command) -> None:
        address = cmd.address
        assert address is not None
        presence = self.node.presence

        async def query() -> dict[str, object]:
            if address.kind is Kind.UID:
                return {"online": await presence.is_online(address.name)}
            info = await presence.group_members(address.name)
            return {"uids": info.uids, "count": info.count}

        async def run() -> None:
            try:
                result = await asyncio.wait_for(query(), self.node.config.request_timeout)
            except (PresenceUnavailable, TimeoutError):
                conn.error(cmd.id, Code.UNAVAILABLE, "presence store unavailable")
            else:
                conn.ack(cmd.id, **result)

        self._spawn(conn, run())

    # --- helpers ---------------------------------------------------------------------
    def _spawn(self, conn: Connection, coro: Coroutine[Any, Any, None]) -> None:
        """Run the I/O behind a request; it counts against the connection's in-flight bound
        (reading pauses when too many are pending), like sends do."""
        conn.sending()

        async def tracked() -> None:
            try:
                await coro
            finally:
                conn.sent()

        self.node.spawn(tracked())

    def _entry(self, conn: Connection) -> Entry[Connection]:
        entry = self.node.registry.get(conn.cid)
        assert entry is not None  # frames only arrive on open connections
        return entry

    def _leave(self, conn: Connection, group: str, *, event: bool) -> None:
        node = self.node
        entry = node.registry.get(conn.cid)
        if entry is not None and group in entry.groups:
            node.unwatch_presence(conn.cid, group)
            node.subs.apply(node.registry.leave(conn.cid, group))
            if event:
                node.publish_presence(group, "leave", entry.uid, conn.cid)

    def _undo(self, conn: Connection, undo: Callable[[], object]) -> Callable[[], None]:
        """A rollback that runs only if nothing changed the connection's uid or groups since
        (a later request's state must never be undone by an earlier request's failure)."""
        entry = self._entry(conn)
        version = entry.version

        def rollback() -> None:
            current = self.node.registry.get(conn.cid)
            if current is entry and entry.version == version:
                result = undo()
                if isinstance(result, Interest):
                    self.node.subs.apply(result)

        return rollback

    def _always_ack(self, conn: Connection, frame_id: frames.FrameId,
                    write: Awaitable[None]) -> None:  # fmt: skip
        """leave/logout: the local change is the barrier and they are always acked; the
        presence write is awaited (so queries see it) and repaired by a resync if it fails."""

        async def run() -> None:
            with contextlib.suppress(PresenceUnavailable):
                await self.node.presence_write(write)
            conn.ack(frame_id)

        self._spawn(conn, run())

    def _finish(
        self,
        conn: Connection,
        frame_id: frames.FrameId,
        waits: Sequence[Awaitable[None]],
        result: dict[str, object],
        rollback: Callable[[], None] | None,
    ) -> None:
        """Ack once every wait succeeded; on failure undo the local change (so an error
        changes nothing) and answer ``unavailable``."""

        async def run() -> None:
            outcome = await asyncio.gather(*waits, return_exceptions=True)
            failed = [o for o in outcome if isinstance(o, BaseException)]
            if not failed:
                conn.ack(frame_id, **result)
                return
            if rollback is not None:
                rollback()
            self.node.mark_presence_dirty()  # the mirror may hold the undone change
            unexpected = [
                o for o in failed if not isinstance(o, BrokerUnavailable | PresenceUnavailable)
            ]
            if unexpected:
                log.error("internal error: %r", unexpected[0])
                conn.error(frame_id, Code.INTERNAL, "internal error")
            else:
                what = "broker" if any(isinstance(o, BrokerUnavailable) for o in failed) else (
                    "presence store")
                conn.error(frame_id, Code.UNAVAILABLE, f"{what} unavailable")

        self._spawn(conn, run())

