"""Changing a connection held by another node (bind/unbind a uid, join/leave a group) from
any process: a CONTROL envelope goes to the holder's node channel, the node applies it with
the same barrier as the client's own request, and answers on the asker's reply channel.

``ControlClient.request`` returns True once the change holds, False when no node holds
that connection (it closed, or never existed); it raises ``ProtocolError(unavailable)``
when the broker is down or the node did not answer within the timeout (e.g. it died), and
``ProtocolError`` with the node's code when the node refused the change.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from . import envelope
from .broker.base import Broker
from .errors import BrokerUnavailable, Code, ProtocolError
from .naming import Names, node_of_client
from .routing import check_name

if TYPE_CHECKING:
    from .node import Node

log = logging.getLogger("wscluster.control")
LocalHandler = Callable[[str, str, str], Awaitable[str] | None]  # a status, or not local


class ControlClient:
    def __init__(self, broker: Broker, names: Names, timeout: float) -> None:
        self.broker = broker
        self.names = names
        self.timeout = timeout
        self.reply_channel = names.reply_channel(secrets.token_hex(8))
        self.local: LocalHandler | None = None  # set by a node: its own connections
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[str]] = {}
        self._subscribed: asyncio.Future[None] | None = None

    async def request(self, cid: str, action: str, arg: str = "") -> bool:
        local = self.local(cid, action, arg) if self.local is not None else None
        if local is not None:  # the connection is (or was) on this very node
            return _outcome(await local, action)
        node_id = node_of_client(cid)
        if node_id is None:
            return False
        await self._subscribe()
        request_id = next(self._ids)
        fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = fut
        try:
            req = envelope.ControlRequest(action, arg, self.reply_channel, request_id)
            await self.broker.publish(
                self.names.node_channel(node_id), envelope.control(f"client:{cid}", req)
            )
            status = await asyncio.wait_for(fut, self.timeout)
        except (BrokerUnavailable, TimeoutError):
            raise ProtocolError(Code.UNAVAILABLE, f"no answer from the node of {cid}") from None
        finally:
            self._waiting.pop(request_id, None)
        return _outcome(status, action)

    def on_reply(self, payload: bytes) -> None:
        try:
            answer = envelope.decode_reply(payload)
        except envelope.EnvelopeError:
            return
        fut = self._waiting.get(answer.request_id)
        if fut is not None and not fut.done():
            fut.set_result(answer.status if answer.status in _STATUSES else Code.INTERNAL)

    async def _subscribe(self) -> None:
        if self._subscribed is None or (
            self._subscribed.done() and self._subscribed.exception() is not None
        ):
            self._subscribed = asyncio.ensure_future(self.broker.subscribe([self.reply_channel]))
        try:
            await asyncio.shield(self._subscribed)
        except BrokerUnavailable:
            raise ProtocolError(Code.UNAVAILABLE, "broker unavailable") from None


def _outcome(status: str, action: str) -> bool:
    """True: applied; False: no such connection; else the node's refusal, raised."""
    if status == "ok":
        return True
    if status == "gone":
        return False
    raise ProtocolError(Code(status), f"{action} refused by the node")


_STATUSES = frozenset({"ok", "gone", *(c.value for c in Code)})


async def apply(node: Node, cid: str, action: str, arg: str) -> str:
    """Apply a control action to a connection of ``node``: "ok", "gone" or an error code."""
    entry = node.registry.get(cid)
    if entry is None or entry.conn.closing:
        return "gone"
    conn = entry.conn
    try:  # the name is checked again: the asker may be another program
        if action == "bind":
            await node.ops.bind(conn, check_name(arg, "uid"))
        elif action == "unbind":
            await node.ops.unbind(conn)
        elif action == "join":
            await node.ops.join(conn, check_name(arg, "group"))
        elif action == "leave":
            await node.ops.leave(conn, check_name(arg, "group"))
        else:
            return Code.BAD_REQUEST.value
    except ProtocolError as exc:
        return exc.code.value
    return "ok"


async def serve(node: Node, to: str, payload: bytes) -> None:
    """A CONTROL envelope reached ``node``: apply it and answer the asker."""
    try:
        req = envelope.decode_request(payload)
    except envelope.EnvelopeError as exc:
        log.warning("dropped a bad control request: %s", exc)
        return
    status = await apply(node, to.partition(":")[2], req.action, req.arg)
    answer = envelope.reply(req.reply_to, envelope.ControlReply(req.request_id, status))
    try:
        await node.broker.publish(req.reply_to, answer)
    except BrokerUnavailable:
        log.warning("could not answer a control request: broker unavailable")
