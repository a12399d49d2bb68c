"""The ``resume`` of a ``Client`` (see ``core``): the frames of the streams wait from before
the request until its ack, then go to the application in offset order without duplicates;
the ack's results update the client's groups, and an automatic resume (on connect with
``positions=``, after every reconnect) reports them as ``recovered`` frames."""

from __future__ import annotations

import logging
from collections.abc import Collection, Container, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from .positions import Position
from .protocol import TRANSIENT_ERRORS, Frame, ServerError

if TYPE_CHECKING:
    from .core import Client
    from .link import Link

log = logging.getLogger("wscluster.client")


def wanted(client: Client, groups: Iterable[str]) -> dict[str, Position]:
    """The streams to resume: the client's uid and ``groups``, those it has a position for."""
    names = [f"group:{group}" for group in groups]
    if client.uid is not None:
        names.append(f"uid:{client.uid}")
    return {s: pos for s in names if (pos := client._positions.get(s)) is not None}


async def resume_on(
    client: Client,
    link: Link,
    hold_id: int,
    streams: Mapping[str, Position],
    presence: Collection[str],
    budget: float,
) -> Frame:
    """Send one ``resume`` for ``streams`` (whose frames wait under ``hold_id``) on ``link``
    and deliver the waiting frames once it is acked. The positions become the ones asked
    for while it is in flight (so what is replayed is not taken for duplicates)."""
    frame: Frame = {"type": "resume", "streams": {s: list(p) for s, p in streams.items()}}
    if presence:
        frame["presence"] = list(presence)
    before = {stream: client._positions.get(stream) for stream in streams}
    for stream, pos in streams.items():
        client._positions.set(stream, pos)
    try:
        ack = await client._request_on(link, frame, budget)
    except ServerError as exc:  # refused as a whole: nothing changed, what waits came live
        for stream, old in before.items():
            if old is None:
                client._positions.forget(stream)
            else:
                client._positions.set(stream, old)
        if exc.code in TRANSIENT_ERRORS:  # to be tried again: keep what it should replay
            client._inbox.discard(hold_id)
        else:
            client._inbox.release(hold_id)
        raise
    except BaseException:  # no answer: what waits may have a hole; a later resume replays it
        client._inbox.discard(hold_id)
        raise
    results = ack.get("streams")
    client._inbox.release(hold_id, results if isinstance(results, dict) else None)
    return ack


def report(client: Client, results: Mapping[str, Any]) -> None:
    """Queue a ``recovered`` frame per stream of an automatic resume's ack: its entry (e.g.
    ``"recovered": false, "reason": "too_old"``) with ``type`` and ``stream``."""
    for stream, entry in results.items():
        if isinstance(entry, dict):
            client._queue.put({**entry, "type": "recovered", "stream": stream})


def apply_groups(client: Client, results: Mapping[str, Any], presence: Collection[str]) -> None:
    """A resume ack's effect on the joined groups: joined, or refused (and forgotten)."""
    for stream, entry in results.items():
        if not isinstance(stream, str) or not stream.startswith("group:"):
            continue
        if isinstance(entry, dict) and "error" not in entry:
            client._groups[stream[6:]] = stream in presence
        else:
            log.warning("cannot resume %r: %s", stream, entry)
            client._groups.pop(stream[6:], None)
            client._positions.forget(stream)


async def restore_streams(
    client: Client, link: Link, hold_id: int, groups: Mapping[str, bool], only: Container[str]
) -> dict[str, bool]:
    """After the login on a new link: resume the uid's stream and the ``groups`` (name ->
    presence) that have a position (those in ``only``), report the results; returns the
    groups left to join."""
    streams = {s: pos for s, pos in wanted(client, groups).items() if s in only}
    if not streams:
        client._inbox.release(hold_id)
        return dict(groups)
    presence = [f"group:{g}" for g, p in groups.items() if p and f"group:{g}" in streams]
    try:
        ack = await resume_on(client, link, hold_id, streams, presence, client.request_timeout)
    except ServerError as exc:  # e.g. a node without resume: every group is joined plainly
        if exc.code in TRANSIENT_ERRORS:
            raise
        log.warning("resume refused on %s: %s", client.url, exc)
        report(client, {stream: {"error": exc.code} for stream in streams})
        return dict(groups)
    results = ack.get("streams")
    results = results if isinstance(results, dict) else {}
    report(client, results)
    apply_groups(client, results, presence)
    return {g: p for g, p in groups.items() if f"group:{g}" not in streams}
