"""Asyncio client for a wscluster node (PROTOCOL.md, version 1), built on picows.

    async with Client("ws://127.0.0.1:8001/ws", uid="alice") as client:
        await client.join("room1")
        await client.send("group:room1", {"text": "hi"})
        async for frame in client:  # `message`, `presence`, `left`, unsolicited `error` frames
            print(frame)

Requests carry integer ids and are matched to their ``ack``/``pong``/``error`` by id.
When the link drops with a non-terminal close code the client reconnects (capped
exponential backoff, full jitter), logs in again, resumes the streams it has a position for
(its uid and groups with history, see ``positions``) and re-joins the other groups, in that
order, before it sets ``reconnected``. Requests in flight when the link broke fail with
:class:`ConnectionClosed`; requests made while reconnecting wait for the new link.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from typing import Any

from ..backoff import Backoff
from .link import Link, open_link
from .positions import Inbox, Positions, parse_position
from .protocol import (
    ConnectionClosed,
    Frame,
    HandshakeRefused,
    PushQueue,
    ServerError,
    retryable_status,
)
from .resume import apply_groups, restore_streams, resume_on
from .session import supervise

log = logging.getLogger("wscluster.client")


ReconnectCallback = Callable[["Client"], Awaitable[None] | None]


class Client:
    """A wscluster connection that survives node restarts (see the module docstring)."""

    def __init__(
        self,
        url: str,
        *,
        uid: str | None = None,
        token: str | None = None,
        reconnect: bool = True,
        backoff_base: float = 0.2,
        backoff_cap: float = 10.0,
        max_handshake_retries: int = 8,
        request_timeout: float = 10.0,
        max_queue: int = 10000,
        headers: dict[str, str] | None = None,
        positions: Mapping[str, object] | None = None,
        max_held: int = 10000,
    ) -> None:
        self.url = url
        self.reconnect = reconnect
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.max_handshake_retries = max_handshake_retries
        self.request_timeout = request_timeout
        self.headers = dict(headers or {})
        self.client_id: str | None = None
        self.node: str | None = None
        self.uid: str | None = None
        self.welcome: Frame | None = None
        self.closed_code: int | None = None
        self.reconnects = 0
        self.reconnected = asyncio.Event()  # set once the session is restored after a drop
        self.on_reconnect: ReconnectCallback | None = None
        self._initial_uid = uid
        self._token = token
        self._login: Frame | None = None  # the login frame to replay after a reconnect
        self._groups: dict[str, bool] = {}  # joined groups -> presence flag
        # the latest request that changes a group or the login, per key: an ack applies to
        # that bookkeeping only if no later request for the same key was made (join then
        # leave sent at once may be acked leave first)
        self._intents: dict[str, int] = {}
        self._intent_ids = itertools.count(1)
        self._backoff = Backoff(backoff_base, backoff_cap)  # kept across drops (session.py)
        self._installed_at = 0.0  # when the current link was installed (monotonic)
        self._queue = PushQueue(max_queue)
        # the last [epoch, offset] per stream with history; pushed frames pass the inbox
        self._positions = Positions(positions)
        self._inbox = Inbox(self._positions, self._queue.put, max_held)
        self._ids = itertools.count(1)
        self._last_id = 0
        self._link: Link | None = None
        self._connecting: Link | None = None
        self._ready = asyncio.Event()  # set while usable, and once finished (to wake waiters)
        self._finished: ConnectionClosed | None = None
        self._closing = False
        self._stop = asyncio.Event()
        self._supervisor: asyncio.Task[None] | None = None

    @property
    def dropped(self) -> int:
        """Pushed frames discarded because the queue (or, while resuming, the hold) was full."""
        return self._queue.dropped + self._inbox.overflowed

    @property
    def duplicates(self) -> int:
        """Messages not delivered because their offset was not past the stream's position."""
        return self._inbox.duplicates

    def positions(self) -> dict[str, list[str | int | None]]:
        """The last position per stream with history, ``{stream: [epoch, offset]}``: store it
        and pass it back as ``positions=`` to resume from there."""
        return self._positions.snapshot()

    @property
    def groups(self) -> dict[str, bool]:
        """Groups this client has joined (name -> presence flag); re-joined on reconnect."""
        return dict(self._groups)

    @property
    def connected(self) -> bool:
        return self._ready.is_set() and self._finished is None

    # -- lifecycle -------------------------------------------------------------------

    async def connect(self) -> Frame:
        """Open the connection, wait for ``welcome``, log in if a uid or token was given."""
        if self._closing or self._finished is not None:
            raise ConnectionClosed(self.closed_code, "client is closed")
        if self._link is not None and self.welcome is not None:
            return self.welcome
        backoff = Backoff(self.backoff_base, self.backoff_cap)
        refusals = 0
        seeded = list(self._positions.snapshot())  # from positions=: resumed after the login
        hold_id = self._inbox.hold(seeded)
        while True:
            try:
                link = await open_link(self)
                break
            except HandshakeRefused as exc:
                if not retryable_status(exc.status) or refusals >= self.max_handshake_retries:
                    raise
                refusals += 1
                await asyncio.sleep(backoff.next())
        try:
            welcome = self._install(link)
            if self._initial_uid is not None:
                await self.login(self._initial_uid)
            elif self._token is not None and (
                welcome.get("uid") is None or f"uid:{welcome['uid']}" not in self._positions
            ):  # (bound by the handshake: the login ack has the uid's position)
                await self.login(token=self._token)
            groups = [s.removeprefix("group:") for s in seeded if s.startswith("group:")]
            rest = await restore_streams(self, link, hold_id, dict.fromkeys(groups, False), seeded)
            for group in rest:  # the resume was refused as a whole
                await self.join(group)
        except BaseException:
            await self.close()
            raise
        self._supervisor = asyncio.create_task(supervise(self, link), name="wscluster-client")
        return welcome

    async def close(self) -> None:
        """Close the connection and stop reconnecting; pending requests fail."""
        if self._closing:
            return
        self._closing = True
        self._stop.set()
        self._finish(ConnectionClosed(self.closed_code, "closed by the client"))
        if self._connecting is not None and self._connecting.transport is not None:
            self._connecting.transport.disconnect()
        if self._link is not None:
            await self._link.shutdown(self._handshake_timeout)
        if self._supervisor is not None:
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(self._supervisor, self._handshake_timeout + 2)
        if self._connecting is not None:
            await self._connecting.shutdown(self._handshake_timeout)

    async def __aenter__(self) -> Client:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- requests --------------------------------------------------------------------

    async def request(self, frame: Frame) -> Frame:
        """Send any frame with a fresh integer ``id``; return its ack (or pong).

        Raises :class:`ServerError` on an ``error`` reply, :class:`ConnectionClosed` when
        the link breaks first, TimeoutError after ``request_timeout`` seconds.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.request_timeout
        link = await self._current_link()
        return await self._request_on(link, frame, deadline - loop.time())

    def send_nowait(self, frame: Frame) -> None:
        """Send a raw frame as is (fire and forget); raises ConnectionClosed when not connected."""
        if self._link is None or not self.connected:
            raise ConnectionClosed(self.closed_code, "not connected")
        self._link.send(frame)

    async def login(self, uid: str | None = None, *, token: str | None = None) -> Frame:
        """Bind this connection to ``uid`` (anonymous mode) or to the ``token``'s subject."""
        if (uid is None) == (token is None):
            raise ValueError("pass exactly one of uid and token")
        frame: Frame = {"type": "login", "uid": uid} if uid is not None else {"type": "login"}
        if token is not None:
            frame["token"] = token

        def apply(ack: Frame) -> None:
            self._login = frame
            if token is not None:
                self._token = token
            old, self.uid = self.uid, ack.get("uid", uid)
            if old is not None and old != self.uid:
                self._positions.forget(f"uid:{old}")
            if self.uid is not None:
                self._positions.fill(f"uid:{self.uid}", ack)

        return await self._tracked("login", frame, apply)

    async def logout(self) -> Frame:
        def apply(ack: Frame) -> None:
            if self.uid is not None:
                self._positions.forget(f"uid:{self.uid}")
            self._login = None
            self.uid = None

        return await self._tracked("login", {"type": "logout"}, apply)

    async def join(self, group: str, *, presence: bool = False) -> Frame:
        frame: Frame = {"type": "join", "group": group}
        if presence:
            frame["presence"] = True

        def apply(ack: Frame) -> None:
            self._groups[group] = presence
            self._positions.fill(f"group:{group}", ack)

        return await self._tracked(f"group:{group}", frame, apply)

    async def leave(self, group: str) -> Frame:
        def apply(ack: Frame) -> None:
            self._groups.pop(group, None)
            self._positions.forget(f"group:{group}")

        return await self._tracked(f"group:{group}", {"type": "leave", "group": group}, apply)

    async def resume(self, streams: Mapping[str, object], *, presence: Iterable[str] = ()) -> Frame:
        """Resume ``streams`` (``{stream: [epoch, offset]}``; ``[None, 0]``: everything
        retained; ``None``: from the client's own position, else everything): the groups are
        joined (with presence events for the ``group:`` streams in ``presence``), the missed
        messages are delivered in offset order, then the live ones. Returns the ack (one
        result per stream, e.g. ``{"recovered": False, "reason": "too_old", …}``)."""
        asked = {
            s: (self._positions.get(s) or (None, 0)) if v is None else parse_position(s, v)
            for s, v in streams.items()
        }
        watch = [s for s in presence if s in asked]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.request_timeout
        link = await self._current_link()
        hold_id = self._inbox.hold(asked)
        with self._latest(s for s in asked if s.startswith("group:")) as latest:
            ack = await resume_on(self, link, hold_id, asked, watch, deadline - loop.time())
        results = ack.get("streams")
        if isinstance(results, dict):
            apply_groups(self, {s: e for s, e in results.items() if s in latest}, watch)
        return ack

    async def _tracked(self, key: str, frame: Frame, apply: Callable[[Frame], object]) -> Frame:
        """Send a request that changes what a reconnect restores (the login, a group), and
        apply its ack to that bookkeeping only if no later request for the same key was made
        meanwhile: a join and a leave sent at once may be acked leave first."""
        with self._latest([key]) as latest:
            ack = await self.request(frame)
        if latest:
            apply(ack)
        return ack

    @contextlib.contextmanager
    def _latest(self, keys: Iterable[str]) -> Iterator[set[str]]:
        """Record a request for ``keys``; on exit the set holds those for which no later
        request was made meanwhile."""
        mine = {key: next(self._intent_ids) for key in keys}
        self._intents.update(mine)
        latest: set[str] = set()
        try:
            yield latest
        finally:
            for key, intent in mine.items():
                current = self._intents.get(key)
                if current in (intent, -intent):  # negated: overtaken by a `left` (_left)
                    del self._intents[key]
                    if current == intent:
                        latest.add(key)

    def _left(self, frame: Frame) -> None:
        """A ``left`` frame: the server made the connection leave a group (a new token does
        not allow it). Forget the group (not re-joined, not resumed) and its position; a
        request about it still in flight no longer changes that. Then queue the frame."""
        group = frame.get("group")
        key = f"group:{group}"
        if isinstance(group, str):
            self._groups.pop(group, None)
            self._positions.forget(key)
            if key in self._intents:
                self._intents[key] = -self._intents[key]
        self._inbox.put(frame)

    async def send(self, to: str, data: Any, *, carbon: bool = False) -> Frame:
        """``carbon``: a send to a ``uid:`` is also stored in this client's own uid stream."""
        frame: Frame = {"type": "send", "to": to, "data": data}
        if carbon:
            frame["carbon"] = True
        return await self.request(frame)

    async def presence(self, to: str) -> Frame:
        return await self.request({"type": "presence", "to": to})

    async def ping(self) -> Frame:
        return await self.request({"type": "ping"})

    # -- pushed frames ---------------------------------------------------------------

    async def recv(self, timeout: float | None = None) -> Frame:  # noqa: ASYNC109
        """Next pushed frame; ConnectionClosed once the client is finished and drained."""
        if timeout is None:
            return await self._queue.get()
        return await asyncio.wait_for(self._queue.get(), timeout)

    def __aiter__(self) -> Client:
        return self

    async def __anext__(self) -> Frame:
        try:
            return await self._queue.get()
        except ConnectionClosed:
            raise StopAsyncIteration from None

    # -- internals -------------------------------------------------------------------

    @property
    def _handshake_timeout(self) -> float:
        return min(self.request_timeout, 10.0)

    async def _current_link(self) -> Link:
        """The installed link, once usable (waiting for a reconnect up to request_timeout)."""
        if not self._ready.is_set():
            if self._link is None and self._supervisor is None:
                raise ConnectionClosed(None, "not connected: call connect() first")
            await asyncio.wait_for(self._ready.wait(), self.request_timeout)
        if self._finished is not None or self._link is None:
            exc = self._finished or ConnectionClosed(None, "not connected")
            raise ConnectionClosed(exc.code, exc.reason)
        return self._link

    async def _request_on(self, link: Link, frame: Frame, budget: float) -> Frame:
        frame_id = next(self._ids)
        self._last_id = frame_id
        out = dict(frame)
        out["id"] = frame_id
        fut = link.pending.add(frame_id)
        try:
            link.send(out)
            reply = await asyncio.wait_for(fut, max(budget, 0.0))
        finally:
            link.pending.pop(frame_id, None)
        if reply.get("type") == "error":
            code, message = reply.get("code"), reply.get("message")
            raise ServerError(str(code), str(message or ""), reply.get("id"))
        return reply

    def _install(self, link: Link) -> Frame:
        welcome = link.welcome.result()
        assert welcome is not None
        self._connecting = None
        self._link = link
        self._installed_at = time.monotonic()
        self.welcome = welcome
        self.client_id = welcome.get("client_id")
        self.node = welcome.get("node")
        self.uid = welcome.get("uid") if self._login is None else self.uid
        self._ready.set()
        return welcome

    def _link_lost(self, link: Link) -> None:
        if link is not self._link:
            return
        self.closed_code = link.close_code
        if self._finished is None:
            self._ready.clear()
            self.reconnected.clear()

    def _finish(self, exc: ConnectionClosed) -> None:
        if self._finished is None:
            self._finished = exc
            self._queue.close(exc)
            self._ready.set()  # wake waiting requests: they see _finished and raise


async def connect(url: str, **kwargs: Any) -> Client:
    """Create a :class:`Client` and connect it (``kwargs`` as for ``Client``)."""
    client = Client(url, **kwargs)
    await client.connect()
    return client
