"""The client frames of PROTOCOL.md, applied to a node: login, logout, join, leave, send,
presence, ping, and application frames. Local state changes happen synchronously in frame
order (ops.py); the broker and presence I/O behind an ack runs afterwards, and the ack
waits for it (barriers). Policy and rate limits are checked before anything changes."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any

from . import envelope, frames, history
from .errors import BrokerUnavailable, Code, PresenceUnavailable, ProtocolError
from .gateway.connection import Connection
from .policy import Action
from .registry import Entry
from .resume import Resume
from .routing import Kind, parse_address

if TYPE_CHECKING:
    from .node import Node

log = logging.getLogger("wscluster.node")
Handler = Callable[[Connection, frames.Command], None]


class Handlers:
    def __init__(self, node: Node) -> None:
        self.node = node
        self.ops = node.ops
        self._table = {
            "send": self.send,
            "ping": self.ping,
            "login": self.login,
            "logout": self.logout,
            "join": self.join,
            "leave": self.leave,
            "presence": self.presence,
            "resume": Resume(node, self).handle,
        }

    def handle(self, conn: Connection, payload: bytes) -> None:
        if conn.raw:
            self.handle_raw(conn, payload)
            return
        node = self.node
        runner = node.app_runner
        try:
            cmd = frames.parse(payload, utf8_checked=True)  # gateway/inbound.py did
        except frames.FrameError as exc:
            conn.error(exc.frame_id, exc.code, exc.message)
            return
        if len(payload) > node.config.max_message_size:
            conn.error(cmd.id, Code.TOO_LARGE, f"over {node.config.max_message_size} bytes")
            return
        if cmd.type == "ping":  # always answered, within its own limit (--ping-rate)
            if not conn.count_ping():
                return
        elif not conn.take_token():
            conn.error(cmd.id, Code.RATE_LIMITED, "too many frames, slow down", charge=True)
            return
        handler = self._table.get(cmd.type)
        if conn.admitting and handler is not None and cmd.type != "ping":
            # not welcomed yet: no core action is taken (application frames wait instead)
            conn.error(cmd.id, Code.NOT_LOGGED_IN, "wait for the welcome", charge=False)
            return
        if handler is None:
            if runner is not None and runner.app.message_hook is not None:
                runner.message(conn, cmd.id, payload)
            else:
                conn.error(cmd.id, Code.UNKNOWN_TYPE, f"unknown type {cmd.type[:64]!r}")
        elif conn.holding and runner is not None and cmd.type != "ping":
            runner.held(conn, lambda: self._run(handler, conn, cmd))
        else:
            self._run(handler, conn, cmd)

    def handle_raw(self, conn: Connection, payload: bytes, binary: bool = False) -> None:
        """A frame of an ``App(raw=True)`` client (``conn.raw``): all of it goes to the app."""
        runner = self.node.app_runner
        assert runner is not None
        if len(payload) > self.node.config.max_message_size:
            conn.close(1009, "message too big")  # a raw client gets no error frames
        elif conn.take_token():
            runner.raw_message(conn, payload, binary)
        else:
            conn.error(None, Code.RATE_LIMITED, "slow down", charge=True)

    def _run(self, handler: Handler, conn: Connection, cmd: frames.Command) -> None:
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
        entry = self.ops.entry(conn)
        if entry.uid is None:
            raise ProtocolError(Code.NOT_LOGGED_IN, "login before sending")
        address = cmd.address
        assert address is not None
        to = str(address)
        self.allow(conn, Action.SEND, to, entry)
        if node.broker.pending_bytes > node.config.max_publish_queue:
            raise ProtocolError(Code.RATE_LIMITED, "node overloaded, slow down")
        frame = envelope.message_frame(to, cmd.raw.data, envelope.Sender(entry.uid, conn.cid))
        fut = node.cluster.publish_nowait(address, envelope.deliver(to, frame))
        conn.charge_bytes(len(frame))
        carbon = cmd.carbon and to != f"uid:{entry.uid}"
        if carbon:  # the copy: stored in (and delivered to) the sender's uid
            own, copy = f"uid:{entry.uid}", envelope.carbon(frame)
            sent = node.cluster.publish_nowait(parse_address(own), envelope.deliver(own, copy))
            conn.charge_bytes(len(copy))
            fut = asyncio.gather(fut, sent)  # the first error, else both replies
        conn.sending()
        frame_id = cmd.id

        def done(f: asyncio.Future[Any]) -> None:
            conn.sent()
            exc = f.exception() if not f.cancelled() else BrokerUnavailable("cancelled")
            if exc is None:
                node.metrics.published.inc()
                reply = f.result()[0] if carbon else f.result()  # the ack: X's position
                pos = history.position(reply)  # stored: the ack says where
                conn.ack(frame_id, **(pos.as_dict() if pos is not None else {}))
            elif isinstance(exc, BrokerUnavailable):
                conn.error(frame_id, Code.UNAVAILABLE, "broker unavailable")
            else:
                log.error("publish failed: %r", exc)
                conn.error(frame_id, Code.INTERNAL, "internal error")

        fut.add_done_callback(done)

    def login(self, conn: Connection, cmd: frames.Command) -> None:
        node = self.node
        token = cmd.raw.token
        claims = None
        if token is not None:
            claims = node.admission.verify(token)
            uid = claims.uid
        elif node.config.anonymous:
            assert cmd.name is not None
            uid = cmd.name
        else:
            raise ProtocolError(Code.FORBIDDEN, "login with a uid needs anonymous mode")
        self.allow(conn, Action.LOGIN, f"uid:{uid}")
        entry = self.ops.entry(conn)
        old = entry.uid
        if old != uid:
            node.admission.check_room(uid)
        barrier = self.ops.bind(conn, uid)

        async def run() -> dict[str, Any]:
            await barrier
            if old != uid:
                await node.admission.enforce_limit(conn, uid, old)
            if claims is not None:  # its claims, and the leave of groups they refuse
                await node.admission.adopt(conn, claims.raw)
            return {"uid": uid, **await self.position(f"uid:{uid}")}

        self.reply(conn, cmd.id, run())

    def logout(self, conn: Connection, cmd: frames.Command) -> None:
        self.reply(conn, cmd.id, _empty(self.ops.unbind(conn)))

    def join(self, conn: Connection, cmd: frames.Command) -> None:
        group = cmd.name
        assert group is not None
        self.allow(conn, Action.JOIN, f"group:{group}")
        barrier = self.ops.join(conn, group, bool(cmd.raw.presence))

        async def run() -> dict[str, Any]:
            await barrier
            result = await self.position(f"group:{group}")
            entry = self.node.registry.get(conn.cid)
            if entry is not None and group not in entry.groups:  # left since: if a login's
                self.allow(conn, Action.JOIN, f"group:{group}", entry)  # claims refuse it now
            return result

        self.reply(conn, cmd.id, run())

    def leave(self, conn: Connection, cmd: frames.Command) -> None:
        assert cmd.name is not None
        self.reply(conn, cmd.id, _empty(self.ops.leave(conn, cmd.name)))

    def presence(self, conn: Connection, cmd: frames.Command) -> None:
        address = cmd.address
        assert address is not None
        self.allow(conn, Action.PRESENCE, str(address))
        presence = self.node.presence

        async def query() -> dict[str, Any]:
            if address.kind is Kind.UID:
                return {"online": await presence.is_online(address.name)}
            info = await presence.group_members(address.name)
            return {"uids": info.uids, "count": info.count}

        async def run() -> dict[str, Any]:
            try:
                return await asyncio.wait_for(query(), self.node.config.request_timeout)
            except (PresenceUnavailable, TimeoutError):
                raise ProtocolError(Code.UNAVAILABLE, "presence store unavailable") from None

        self.reply(conn, cmd.id, run())

    # --- helpers ---------------------------------------------------------------------
    async def position(self, stream: str) -> dict[str, Any]:
        """``{"epoch", "offset"}`` of a stream with history (for join and login acks)."""
        streams = self.node.streams
        return {} if streams is None else await streams.ensure(stream)

    def allow(
        self, conn: Connection, action: Action, target: str, entry: Entry[Connection] | None = None
    ) -> None:
        """Raise ``forbidden`` unless the connection's policy (JWT claims) and the
        application's ``authorize`` hook allow the action (``entry``: the connection's, if
        the caller has it already)."""
        if entry is None:
            entry = self.ops.entry(conn)
        reason = conn.policy.decide(action, target, entry.groups) if conn.policy else None
        runner = self.node.app_runner
        verdict = runner.authorize(conn, action, target) if runner is not None else None
        if verdict is False or (verdict is None and reason is not None):
            raise ProtocolError(Code.FORBIDDEN, reason or f"{action} {target[:140]} not allowed")

    def reply(
        self, conn: Connection, frame_id: frames.FrameId,
        work: Coroutine[Any, Any, dict[str, Any]],
    ) -> None:  # fmt: skip
        """Run the I/O behind a request, then answer with its ack (result fields) or error.
        It counts against the connection's in-flight bound (reading pauses when too many
        are pending), like sends do."""
        conn.sending()

        async def run() -> None:
            try:
                result = await work
            except ProtocolError as exc:
                conn.error(frame_id, exc.code, exc.message)
            except Exception:
                log.exception("internal error")
                conn.error(frame_id, Code.INTERNAL, "internal error")
            else:
                conn.ack(frame_id, **result)
            finally:
                conn.sent()

        self.node.spawn(run())


async def _empty(barrier: Awaitable[None]) -> dict[str, Any]:
    await barrier
    return {}
