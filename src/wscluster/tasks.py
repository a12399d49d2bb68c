"""Stopping background tasks for sure, and awaiting writes whose failure needs no answer.

redis-py wraps socket I/O in ``asyncio.wait_for``; on Python 3.11 a cancellation that arrives
just as the wrapped operation completes is swallowed, and a task looping forever (a
publisher, a reader) then never stops. So cancel again until every task has finished.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Iterable
from typing import Any

from .errors import PresenceUnavailable


async def cancel_and_wait(tasks: Iterable[asyncio.Future[Any]], step: float = 0.1) -> None:
    """Cancel ``tasks`` until all are done; their exceptions are retrieved (not raised)."""
    tasks = list(tasks)
    pending = {t for t in tasks if not t.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=step)
    for task in tasks:
        if not task.cancelled():
            task.exception()  # retrieved, as gather(return_exceptions=True) would


async def quietly(write: Awaitable[None]) -> None:
    """Await a presence write whose failure needs no answer: it marked the mirror dirty,
    and the next heartbeat resyncs it."""
    with contextlib.suppress(PresenceUnavailable):
        await write
