"""Between the upgrade and ``welcome``: the uid a connection arrives with (a JWT's ``sub``,
or one set by the application's handshake hook), its policy and token expiry, and the
per-uid connection limit."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from . import frames
from .auth import AuthError, Claims
from .errors import Code, PresenceUnavailable, ProtocolError
from .gateway.connection import Connection
from .policy import Action, Policy
from .routing import check_name

if TYPE_CHECKING:
    from .node import Node

log = logging.getLogger("wscluster.node")
POLICY_CLOSE = 1008
TRY_LATER = 1013


class Admission:
    def __init__(self, node: Node) -> None:
        self.node = node

    def open(self, conn: Connection) -> None:
        """The connection is registered: bind its uid (if any), then welcome it and run the
        application's on_connect. With a uid, the welcome waits for the bind's barrier."""
        node = self.node
        if node.app_runner is not None:  # frames from now on queue behind on_connect
            node.app_runner.attach(conn)
        request = conn.request
        if request.claims is not None:
            self.apply_claims(conn, request.claims)
        uid = request.uid
        if uid is None:
            self._welcome(conn, None)
            return
        try:
            check_name(uid, "uid")  # the application's on_handshake may set any uid
            self.check_room(uid)
            barrier = node.ops.bind(conn, uid)
        except ProtocolError as exc:
            conn.close(POLICY_CLOSE, exc.message)
            self._refused(conn)
            return

        conn.admitting = True  # until welcome: core frames other than ping wait for it

        async def admit() -> None:
            admitted = False
            try:
                await barrier
                await self.enforce_limit(conn, uid, None)
                admitted = True
            except ProtocolError as exc:
                code = POLICY_CLOSE if exc.code is Code.FORBIDDEN else TRY_LATER
                conn.close(code, exc.message)
                return
            finally:
                conn.admitting = False
                conn.sent()
                if not admitted:
                    self._refused(conn)
            self._welcome(conn, uid)

        conn.sending()
        node.spawn(admit())

    def _welcome(self, conn: Connection, uid: str | None) -> None:
        node = self.node
        if conn.closing:
            self._refused(conn)
            return
        entry = node.registry.get(conn.cid)
        uid = entry.uid if entry is not None else uid  # as bound now
        if not conn.raw:
            conn.reply(frames.encode({
                "type": "welcome", "client_id": conn.cid, "node": node.node_id, "uid": uid,
                "heartbeat": _number(node.config.ping_interval),
            }))  # fmt: skip
        if node.app_runner is not None:
            node.app_runner.welcomed(conn)

    def _refused(self, conn: Connection) -> None:
        """Not welcomed (refused, or closed first): the application's on_connect never runs."""
        if self.node.app_runner is not None:
            self.node.app_runner.welcomed(conn, False)

    def verify(self, token: str) -> Claims:
        """A token sent after the handshake (``login``, ``Conn.refresh``): its claims, or
        ``ProtocolError(forbidden)`` for a bad token or a node without a JWT key."""
        verifier = self.node.verifier
        if verifier is None:
            raise ProtocolError(Code.FORBIDDEN, "this node does not accept tokens")
        try:
            return verifier.verify(token)
        except AuthError as exc:
            raise ProtocolError(Code.FORBIDDEN, exc.reason) from None

    def adopt(self, conn: Connection, claims: dict[str, Any]) -> Coroutine[Any, Any, None]:
        """A token taken by a ``login``: apply its claims (``apply_claims``), then leave the
        joined groups the connection may no longer join — by the same check as ``join``: the
        new claims, and the application's ``authorize`` hook — each as ``leave`` does, with a
        ``left`` frame to the client (``Ops.revoke``). Await the result before the ack."""
        self.apply_claims(conn, claims)
        return self.node.ops.revoke(conn, lambda group: self._may_join(conn, group))

    def _may_join(self, conn: Connection, group: str) -> bool:
        try:
            self.node.handlers.allow(conn, Action.JOIN, f"group:{group}")
        except ProtocolError:
            return False
        return True

    def apply_claims(self, conn: Connection, claims: dict[str, Any]) -> None:
        """Adopt a verified token: its policy, and a close (1008) when it expires. The
        handshake accepted ``exp`` within ``--jwt-leeway``: the close honours it too. Not for
        a connection that closed meanwhile (a ``login`` refresh finishing after the close):
        its timer would keep the connection alive in memory until ``exp``."""
        if conn.closing:
            return
        conn.request.claims = claims
        conn.policy = Policy.from_claims(claims)
        if conn.expiry is not None:
            conn.expiry.cancel()
        leeway = self.node.config.jwt_leeway
        delay = max(0.0, float(claims["exp"]) + leeway - time.time())
        conn.expiry = asyncio.get_running_loop().call_later(
            delay, conn.close, POLICY_CLOSE, "token expired"
        )

    def check_room(self, uid: str) -> None:
        """Refuse (forbidden) when this node alone already holds the uid's limit."""
        limit = self.node.config.max_connections_per_uid
        if limit and self.node.registry.uid_size(uid) >= limit:
            raise ProtocolError(Code.FORBIDDEN, "too many connections for this user")

    async def enforce_limit(self, conn: Connection, uid: str, old: str | None) -> None:
        """After a bind's barrier: over the cluster-wide limit, undo the bind and refuse.
        Two connections racing on different nodes may both be refused; never both let in
        over the limit."""
        node = self.node
        limit = node.config.max_connections_per_uid
        if not limit:
            return
        try:
            timeout = node.config.request_timeout
            cids = await asyncio.wait_for(node.presence.client_ids(uid), timeout)
        except (PresenceUnavailable, TimeoutError):
            # a failed login changes nothing (protocol-notes.md): undo the bind here too
            await self._undo_bind(conn, uid, old)
            raise ProtocolError(Code.UNAVAILABLE, "presence store unavailable") from None
        if len(cids) <= limit:
            return
        await self._undo_bind(conn, uid, old)
        raise ProtocolError(Code.FORBIDDEN, "too many connections for this user")

    async def _undo_bind(self, conn: Connection, uid: str, old: str | None) -> None:
        node = self.node
        entry = node.registry.get(conn.cid)
        if entry is not None and entry.uid == uid:
            undo = node.ops.bind(conn, old) if old is not None else node.ops.unbind(conn)
            try:
                await undo
            except ProtocolError:
                log.warning("could not undo the bind of %s to %r", conn.cid, uid)


def _number(x: float) -> float | int:
    return int(x) if float(x).is_integer() else x
