"""The core client commands of PROTOCOL.md, applied to a node: login, logout, join, leave,
send, presence, ping. Local state changes happen synchronously in frame order; the broker
and presence I/O behind an ack runs afterwards, and the ack waits for it (barriers)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any

from . import envelope, frames
from .errors import BrokerUnavailable, Code, PresenceUnavailable, ProtocolError
from .gateway.connection import Connection
from .registry import Entry
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
        if old == uid:
            conn.ack(cmd.id, uid=uid)
            return
        node.subs.apply(node.registry.bind(conn.cid, uid))
        waits = [
            node.subs.wait(f"uid:{uid}"),
            node.presence_write(node.presence.bind(node.node_id, conn.cid, old, uid)),
        ]
        self._finish(conn, cmd.id, waits, {"uid": uid}, lambda: self._rebind(conn, uid, old))

    def logout(self, conn: Connection, cmd: frames.Command) -> None:
        node = self.node
        entry = self._entry(conn)
        old = entry.uid
        if old is None:
            conn.ack(cmd.id)
            return
        node.subs.apply(node.registry.bind(conn.cid, None))
        waits = [node.presence_write(node.presence.bind(node.node_id, conn.cid, old, None))]
        self._finish(conn, cmd.id, waits, {}, None)

    def join(self, conn: Connection, cmd: frames.Command) -> None:
        node = self.node
        group = cmd.name
        assert group is not None
        entry = self._entry(conn)
        if group in entry.groups:
            if cmd.raw.presence:
                node.watch_presence(conn.cid, group)
            conn.ack(cmd.id)
            return
        if len(entry.groups) >= node.config.max_groups_per_connection:
            raise ProtocolError(Code.FORBIDDEN, "too many groups on this connection")
        if cmd.raw.presence:
            node.watch_presence(conn.cid, group)
        node.subs.apply(node.registry.join(conn.cid, group))
        waits = [
            node.subs.wait(f"group:{group}"),
            node.presence_write(node.presence.join(node.node_id, conn.cid, entry.uid, group)),
        ]

        def joined() -> None:
            node.publish_presence(group, "join", entry.uid, conn.cid)

        self._finish(
            conn, cmd.id, waits, {}, lambda: self._leave(conn, group, event=False), joined
        )

    def leave(self, conn: Connection, cmd: frames.Command) -> None:
        node = self.node
        group = cmd.name
        assert group is not None
        entry = self._entry(conn)
        if group not in entry.groups:
            conn.ack(cmd.id)
            return
        self._leave(conn, group, event=True)
        waits = [node.presence_write(node.presence.leave(node.node_id, conn.cid, group))]
        self._finish(conn, cmd.id, waits, {}, None)

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

    def _rebind(self, conn: Connection, uid: str, old: str | None) -> None:
        node = self.node
        entry = node.registry.get(conn.cid)
        if entry is not None and entry.uid == uid:  # nothing rebound it meanwhile
            node.subs.apply(node.registry.bind(conn.cid, old))

    def _finish(
        self,
        conn: Connection,
        frame_id: frames.FrameId,
        waits: Sequence[Awaitable[None]],
        result: dict[str, object],
        rollback: Callable[[], None] | None,
        on_success: Callable[[], None] | None = None,
    ) -> None:
        """Ack once every wait succeeded; on failure undo the local change (so an error
        changes nothing) and answer ``unavailable``."""

        async def run() -> None:
            outcome = await asyncio.gather(*waits, return_exceptions=True)
            failed = [o for o in outcome if isinstance(o, BaseException)]
            if not failed:
                conn.ack(frame_id, **result)
                if on_success is not None:
                    on_success()
                return
            if rollback is not None:
                rollback()
            unexpected = [
                o for o in failed if not isinstance(o, BrokerUnavailable | PresenceUnavailable)
            ]
            if unexpected:
                log.error("internal error: %r", unexpected[0])
                conn.error(frame_id, Code.INTERNAL, "internal error")
            else:
                conn.error(frame_id, Code.UNAVAILABLE, "broker unavailable")

        self._spawn(conn, run())

