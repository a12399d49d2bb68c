"""``Conn``: what application handlers get for a connection held by this node."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import msgspec
from picows import WSMsgType

from . import envelope
from .app import Request
from .errors import Code, ProtocolError
from .gateway.connection import Connection
from .routing import check_name

if TYPE_CHECKING:
    from .cluster import Cluster
    from .node import Node

KICK = 4001
_SENDABLE = frozenset({1000, 1001, 1002, 1003, *range(1007, 1015)})  # RFC 6455 7.4


class Conn:
    """A live connection on this node. The uid/group methods have the barrier semantics of
    the client's own ``login``/``join``: once they return, every message sent afterwards to
    that uid/group reaches this connection (they raise ``ProtocolError(unavailable)``
    when the broker or presence store cannot confirm it, and change nothing then)."""

    __slots__ = ("_conn", "_node", "state")

    def __init__(self, node: Node, conn: Connection) -> None:
        self._node = node
        self._conn = conn
        self.state: dict[str, Any] = conn.request.state  # local to this node, yours

    def __repr__(self) -> str:
        return f"<Conn {self.client_id} uid={self.uid!r}>"

    # --- what it is --------------------------------------------------------------------
    @property
    def client_id(self) -> str:
        return self._conn.cid

    @property
    def node_id(self) -> str:
        return self._node.node_id

    @property
    def uid(self) -> str | None:
        entry = self._node.registry.get(self._conn.cid)
        return entry.uid if entry is not None else None

    @property
    def groups(self) -> frozenset[str]:
        entry = self._node.registry.get(self._conn.cid)
        return frozenset(entry.groups) if entry is not None else frozenset()

    @property
    def claims(self) -> dict[str, Any] | None:
        """The verified JWT claims (None without JWT)."""
        return self._conn.request.claims

    @property
    def request(self) -> Request:
        return self._conn.request

    @property
    def closed(self) -> bool:
        return self._conn.closing

    @property
    def cluster(self) -> Cluster:
        return self._node.cluster

    # --- this connection ---------------------------------------------------------------
    def send(self, data: Any) -> None:
        """Push a ``message`` frame (``from: null``) to this connection only."""
        to = f"client:{self._conn.cid}"
        frame = envelope.message_frame(to, msgspec.Raw(msgspec.json.encode(data)), None)
        self._conn.reply(frame)

    def push(self, payload: str | bytes) -> None:
        """Write ``payload`` as it is: text for ``str``, a binary frame for ``bytes``."""
        push(self._conn, payload)

    def close(self, code: int = KICK, reason: str = "") -> None:
        """Close with ``code`` (1000-1003, 1007-1014 or 3000-4999: others may not be sent,
        and clients would fail the connection with 1006 instead); ``reason`` is cut to 120
        bytes."""
        if isinstance(code, bool) or not isinstance(code, int) or not (
            code in _SENDABLE or 3000 <= code <= 4999
        ):
            raise ValueError(f"close code {code!r} cannot be sent: use 1000-1003, 1007-1014 "
                             "or 3000-4999")  # fmt: skip
        self._conn.close(code, reason)

    def refresh(self, token: str) -> dict[str, Any]:
        """Adopt a fresh JWT for this connection (its claims, policy and expiry), as a core
        ``login`` with a token does: for raw-mode apps, whose clients cannot send one.
        Returns the claims; raises ``ProtocolError(forbidden)`` for a bad token or a node
        without a JWT key. It does not re-bind: call ``bind(claims["sub"])`` for that."""
        admission = self._node.admission
        claims = admission.verify(token)
        admission.apply_claims(self._conn, claims.raw)
        return claims.raw

    async def bind(self, uid: str) -> None:
        """Bind the connection to ``uid`` (GatewayWorker's bindUid); re-binding moves it."""
        await self._node.ops.bind(self._conn, check_name(uid, "uid"))

    async def unbind(self) -> None:
        await self._node.ops.unbind(self._conn)

    async def join(self, group: str, *, presence: bool = False) -> None:
        await self._node.ops.join(self._conn, check_name(group, "group"), presence)

    async def leave(self, group: str) -> None:
        await self._node.ops.leave(self._conn, check_name(group, "group"))

    # --- session: readable and writable from any node -----------------------------------
    async def get_session(self) -> dict[str, Any]:
        return await self.cluster.get_session(self._conn.cid) or {}

    async def set_session(self, values: Mapping[str, Any]) -> None:
        await self._write_session(values, replace=True)

    async def update_session(self, values: Mapping[str, Any]) -> None:
        """Merge top-level keys (a None value deletes the key)."""
        await self._write_session(values, replace=False)

    async def _write_session(self, values: Mapping[str, Any], *, replace: bool) -> None:
        cluster = self.cluster
        ok = await (cluster.set_session(self._conn.cid, values) if replace
                    else cluster.update_session(self._conn.cid, values))  # fmt: skip
        if not ok:
            raise ProtocolError(Code.BAD_REQUEST, "the connection is closed")


def push(conn: Connection, payload: str | bytes) -> None:
    """Write ``payload`` as it is: text for ``str``, a binary frame for ``bytes``."""
    if isinstance(payload, str):
        conn.reply(payload.encode())
    else:
        conn.push(payload, WSMsgType.BINARY)
