"""Reconnect and session restore of a ``Client`` (see ``core``): its supervisor task."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from typing import TYPE_CHECKING

from .link import Link, open_link
from .protocol import (
    TRANSIENT_ERRORS,
    ConnectionClosed,
    Frame,
    HandshakeRefused,
    ServerError,
    is_terminal_close,
    retry_hint,
    retryable_status,
)
from .resume import restore_streams, wanted

if TYPE_CHECKING:
    from .core import Client

log = logging.getLogger("wscluster.client")

STABLE_SESSION = 5.0  # seconds a restored session must last to restart the backoff


async def supervise(client: Client, link: Link) -> None:
    try:
        await _watch(client, link)
    except Exception as exc:  # never leave waiters hanging on a dead supervisor
        log.exception("wscluster client supervisor failed")
        client._finish(ConnectionClosed(client.closed_code, f"reconnect failed: {exc!r}"))
    finally:
        if client._finished is None and not client._ready.is_set():
            client._finish(ConnectionClosed(client.closed_code, "supervisor stopped"))


async def _watch(client: Client, link: Link) -> None:
    """Wait for the link to drop; reconnect and restore the session, or finish."""
    while True:
        await link.lost
        if link.transport is not None:
            with contextlib.suppress(Exception):
                await link.transport.wait_disconnected()
        if client._closing:
            return
        code, reason = link.close_code, link.close_reason
        if not client.reconnect or is_terminal_close(code):
            client._finish(ConnectionClosed(code, reason))
            return
        hint = retry_hint(reason) if code == 1012 else None
        new_link = await _reconnect(client, hint)
        if new_link is None:
            return
        link = new_link
        client.reconnects += 1
        client.reconnected.set()
        await _call_on_reconnect(client)


async def _reconnect(client: Client, hint: float | None) -> Link | None:
    # One backoff across drops, restarted only by a session that lasted: a node that
    # welcomes and then closes at once must not be retried in a tight loop.
    backoff = client._backoff
    if time.monotonic() - client._installed_at >= STABLE_SESSION:
        backoff.reset()
    refusals = failures = hold_id = 0
    while True:
        delay = backoff.next() + (hint or 0.0)
        hint = None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(client._stop.wait(), delay)
        if client._closing:
            return None
        # the frames of the streams to resume wait from the welcome on, until the resume's
        # ack releases them; a failed attempt's are dropped (the next resume replays them)
        client._inbox.discard(hold_id)
        hold_id = client._inbox.hold(wanted(client, client._groups))
        try:
            link = await open_link(client)
        except HandshakeRefused as exc:
            if not retryable_status(exc.status) or refusals >= client.max_handshake_retries:
                client._finish(exc)
                return None
            refusals += 1
            continue
        except (ConnectionClosed, TimeoutError) as exc:
            failures += 1  # unreachable: keep trying (a node comes back, a balancer moves on)
            level = logging.WARNING if failures % 10 == 0 else logging.DEBUG
            log.log(level, "reconnect to %s failed %d times: %s", client.url, failures, exc)
            continue
        if client._closing:
            await link.shutdown(1.0)
            return None
        try:
            await _restore(client, link, hold_id)
        except (ConnectionClosed, TimeoutError) as exc:
            log.debug("session restore on %s failed: %s", client.url, exc)
            await link.shutdown(1.0)
            continue
        except ServerError as exc:
            await link.shutdown(1.0)
            if exc.code in TRANSIENT_ERRORS:  # e.g. the node's store is coming back
                log.info("session restore on %s failed: %s; retrying", client.url, exc)
                continue
            client._finish(ConnectionClosed(None, f"cannot restore the session: {exc}"))
            return None  # the server refuses our login now: give up
        if link.lost.done():
            continue
        client._install(link)
        return link


async def _restore(client: Client, link: Link, hold_id: int) -> None:
    """Replay the login, resume the streams with a position, re-join the other groups, on a
    fresh link (before it is installed)."""
    welcome = link.welcome.result() or {}
    login = client._login
    if login is not None and not ("token" in login and welcome.get("uid") is not None):
        ack = await client._request_on(link, login, client.request_timeout)
        client.uid = ack.get("uid", login.get("uid"))
        if client.uid is not None:
            client._positions.fill(f"uid:{client.uid}", ack)
    groups = dict(client._groups)
    rest = await restore_streams(client, link, hold_id, groups, wanted(client, groups))
    for group, presence in rest.items():
        frame: Frame = {"type": "join", "group": group}
        if presence:
            frame["presence"] = True
        try:
            ack = await client._request_on(link, frame, client.request_timeout)
        except ServerError as exc:
            if exc.code in TRANSIENT_ERRORS:
                raise
            log.warning("cannot re-join %r after reconnect: %s", group, exc)
            client._groups.pop(group, None)
        else:
            client._positions.fill(f"group:{group}", ack)


async def _call_on_reconnect(client: Client) -> None:
    callback = client.on_reconnect
    if callback is None:
        return
    try:
        result = callback(client)
        if inspect.isawaitable(result):
            await result
    except Exception:
        log.exception("on_reconnect callback failed")
