"""Runs an application's handlers on a node. Handlers of one connection run one after the
other, in frame order (on_connect first, on_close last), so the sends they make keep the
per-sender order; each call counts against the connection's in-flight bound, so a slow
handler pauses reading that socket instead of queueing without limit. An exception in a
handler is logged and counted, answers ``internal`` to that client, and harms nothing else.
on_message runs only for a connection that was welcomed and that the server has not closed
(refused by on_connect or the per-uid limit, kicked, token expired): a refused client's
frames never reach the application.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
from collections.abc import Callable
from collections.abc import Set as AbstractSet
from typing import TYPE_CHECKING, Any

import msgspec

from .app import App, Closed
from .conn import Conn, push
from .errors import Code, ProtocolError
from .gateway.connection import Connection
from .policy import Action
from .presence.base import ConnInfo

if TYPE_CHECKING:
    from .node import Node

log = logging.getLogger("wscluster.app")
DEAD_NODE_CONCURRENCY = 64  # on_close calls at once for the connections of a dead node


class AppRunner:
    def __init__(self, node: Node, app: App) -> None:
        self.node = node
        self.app = app
        self._dead_slots = asyncio.Semaphore(DEAD_NODE_CONCURRENCY)

    # --- per connection, in order --------------------------------------------------------
    def attach(self, conn: Connection) -> None:
        """A connection was registered (before its ``welcome``, which may wait for the bind
        of its uid): give it its Conn and put on_connect at the head of its handler chain.
        on_connect runs once the connection is welcomed (``welcomed``), so frames the
        client sends before that reach on_message after on_connect, with the uid bound."""
        conn.app = Conn(self.node, conn)
        # core frames too wait in the chain until on_connect (and what queued behind it) ran:
        # a client's first `send` to a group its on_connect joins must not be refused
        conn.holding = self.app.connect_hook is not None
        gate: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        conn.app_gate = gate  # welcomed?
        hook = self.app.connect_hook
        self._queue(conn, lambda: hook(conn.app) if hook is not None else None,
                    "on_connect", None, gate)  # fmt: skip

    def welcomed(self, conn: Connection, ok: bool = True) -> None:
        """The connection was welcomed (run on_connect), or refused or closed before (then
        on_connect never runs). Only the first call for a connection counts (a close after
        the welcome calls it again, to no effect)."""
        gate = conn.app_gate
        if gate is not None and not gate.done():
            gate.set_result(ok)

    def message(self, conn: Connection, frame_id: Any, payload: bytes) -> None:
        hook = self.app.message_hook
        assert hook is not None
        frame = msgspec.json.decode(payload)
        self._queue(conn, lambda: hook(conn.app, frame), "on_message", frame_id, conn.app_gate)

    def held(self, conn: Connection, work: Callable[[], None]) -> None:
        """Run a core frame's handler (``work``, synchronous) in the chain, after on_connect
        and whatever was queued before it; skipped if the connection was never welcomed or
        is closing (by the server or the client) meanwhile."""
        prev, gate = conn.app_tail, conn.app_gate
        conn.sending()

        async def run() -> None:
            try:
                if await _my_turn(prev, gate) and not conn.closing:
                    work()
            finally:
                conn.sent()

        self._chain(conn, asyncio.ensure_future(run()))

    def _chain(self, conn: Connection, task: asyncio.Future[None]) -> None:
        conn.app_tail = task
        task.add_done_callback(functools.partial(_drained, conn))
        self.node.spawn(task)

    def raw_message(self, conn: Connection, payload: bytes, binary: bool = False) -> None:
        hook = self.app.message_hook
        if hook is None:
            return
        data: str | bytes = payload if binary else payload.decode("utf-8", "replace")
        self._queue(conn, lambda: hook(conn.app, data), "on_message", None, conn.app_gate)

    def closed(
        self, conn: Connection, uid: str | None, groups: AbstractSet[str], session: dict[str, Any]
    ) -> None:
        self.welcomed(conn, False)  # closed before its welcome: no on_connect
        hook = self.app.close_hook
        if hook is None:
            return
        code = conn.close_code or 1006
        info = Closed(conn.cid, uid, frozenset(groups), code, session, False, conn.request.state)
        self._queue(conn, lambda: hook(info), "on_close", None)

    def authorize(self, conn: Connection, action: Action, target: str) -> bool | None:
        hook = self.app.authorize_hook
        if hook is None:
            return None
        try:
            verdict = hook(conn.app, action, target)
        except Exception:
            log.exception("authorize failed: refusing %s %s", action, target[:64])
            self.node.metrics.app_errors.labels(hook="authorize").inc()
            return False
        return None if verdict is None else bool(verdict)

    # --- connections of a dead node (fired by the survivor that purged it) ----------------
    async def node_died(self, conns: list[ConnInfo]) -> None:
        """Run on_close for connections of a dead node; returns once every call returned,
        failed or timed out (the purge removes them from the store only then)."""
        hook = self.app.close_hook
        if hook is None:
            return
        calls = []
        for c in conns:  # a dead node may have had thousands: a bounded number at a time
            info = Closed(c.client_id, c.uid, frozenset(c.groups), 1006, c.session, True)
            calls.append(self._bounded(functools.partial(hook, info)))
        await asyncio.gather(*calls)

    async def _bounded(self, call: Callable[[], Any]) -> None:
        async with self._dead_slots:
            await self._guard(call, "on_close")

    # --- helpers -----------------------------------------------------------------------
    def _queue(
        self, conn: Connection, call: Callable[[], Any], what: str, frame_id: Any,
        gate: asyncio.Future[bool] | None = None,
    ) -> None:  # fmt: skip
        """Run ``call`` after the connection's previous handler (and, with ``gate``, only
        once the gate says True: the connection was welcomed)."""
        prev = conn.app_tail
        answer = frame_id is not None and not conn.raw
        conn.sending()

        async def run() -> None:
            try:
                if not await _my_turn(prev, gate):
                    return  # never welcomed: neither on_connect nor on_message runs
                if what == "on_message" and conn.server_closed:
                    return  # refused (e.g. by on_connect), kicked or expired: not handled
                result = await self._call(conn, call, what, answer, frame_id)
                if result is _FAILED or what != "on_message" or conn.closing:
                    return
                self._answer(conn, frame_id, result, answer)
            finally:
                conn.sent()

        self._chain(conn, asyncio.ensure_future(run()))

    async def _call(
        self, conn: Connection, call: Callable[[], Any], what: str, answer: bool, frame_id: Any
    ) -> Any:
        try:
            return await asyncio.wait_for(_result(call()), self.app.message_timeout)
        except ProtocolError as exc:
            if what == "on_message" and not conn.raw:  # the answer the app chose (AppError)
                conn.error(frame_id if answer else None, exc.code, exc.message, charge=False)
            elif conn.closing:  # e.g. a session write after the client left: not a failure
                log.debug("%s of %s after the close: %s", what, conn.cid, exc)
            else:  # nobody to answer it to: on_connect, on_close, raw mode
                self.node.metrics.app_errors.labels(hook=what).inc()
                log.warning("%s of %s: %s", what, conn.cid, exc)
        except Exception as exc:
            self.node.metrics.app_errors.labels(hook=what).inc()
            if isinstance(exc, TimeoutError):
                log.error("%s of %s took longer than %ss", what, conn.cid, self.app.message_timeout)
            else:
                log.exception("%s of %s failed", what, conn.cid)
            if what == "on_message" and not conn.raw:
                conn.error(frame_id, Code.INTERNAL, "internal error")
        return _FAILED

    def _answer(self, conn: Connection, frame_id: Any, result: Any, answer: bool) -> None:
        """Write on_message's result: the ack (or, in raw mode, the value itself). A result
        that cannot be encoded is the handler's failure: ``internal``, never no answer."""
        try:
            if answer:
                conn.ack(frame_id, result=result)
            elif conn.raw and result is not None:
                _write_raw(conn, result)
        except (TypeError, ValueError, msgspec.MsgspecError):
            self.node.metrics.app_errors.labels(hook="on_message").inc()
            log.exception("on_message of %s returned a value that is not JSON", conn.cid)
            if answer:
                conn.error(frame_id, Code.INTERNAL, "internal error")

    async def _guard(self, call: Callable[[], Any], what: str) -> None:
        try:
            await asyncio.wait_for(_result(call()), self.app.message_timeout)
        except Exception:
            self.node.metrics.app_errors.labels(hook=what).inc()
            log.exception("%s failed", what)


async def _my_turn(prev: asyncio.Future[None] | None, gate: asyncio.Future[bool] | None) -> bool:
    """Wait for the connection's previous handler, then for its welcome (False: never)."""
    if prev is not None and not prev.done():
        await asyncio.wait([prev])
    return gate is None or await gate


def _drained(conn: Connection, task: asyncio.Future[None]) -> None:
    if conn.app_tail is task:  # nothing queued behind it: core frames need not wait any more
        conn.holding = False


class _Failed:
    pass


_FAILED: Any = _Failed()


async def _result(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


def _write_raw(conn: Connection, result: Any) -> None:
    if isinstance(result, str | bytes):
        push(conn, result)
    else:
        conn.reply(msgspec.json.encode(result))
