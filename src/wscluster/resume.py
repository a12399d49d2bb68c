"""The ``resume`` frame (PROTOCOL: "History, offsets and resume"): join + replay + live with
no race between them.

For each stream, while the frame is processed (synchronously, before any other message can
be delivered) the connection starts buffering the stream's live messages (streams.py) and
joins the group; once the join holds, the history after the client's position is read and
sent, then the buffered live messages that are newer, and from then on live messages flow
directly, never at or below the last offset sent (the connection's floor).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

from . import envelope, history
from .errors import Code, PresenceUnavailable, ProtocolError, bad_request
from .gateway.connection import SLOW_CONSUMER_CLOSE, Connection
from .policy import Action

if TYPE_CHECKING:
    from . import frames
    from .handlers import Handlers
    from .node import Node

PAGE_BYTES = 256 * 1024  # envelopes per page of a replay (a quarter of --max-outbox if less)
PAGE_COUNT = 1000  # messages per page, however small


class Resume:
    def __init__(self, node: Node, handlers: Handlers) -> None:
        self.node = node
        self.handlers = handlers

    def handle(self, conn: Connection, cmd: frames.Command) -> None:
        node = self.node
        positions = cmd.positions
        assert positions is not None
        if len(positions) > node.config.max_groups_per_connection + 1:
            raise bad_request("more streams than groups allowed per connection")
        if cmd.recent > node.config.max_replay:
            raise bad_request(f"'recent' is at most --max-replay ({node.config.max_replay})")
        # each stream is a join and a read: charged like that many frames (into debt if need
        # be: a resume after a reconnect goes through, then the client waits)
        conn.charge(len(positions) - 1)
        entry = node.ops.entry(conn)
        streams = node.streams
        results: dict[str, dict[str, Any]] = {}
        work: list[tuple[str, Awaitable[None] | None, bool]] = []
        for stream, _ in positions.items():
            kind, _, name = stream.partition(":")
            barrier: Awaitable[None] | None = None
            if kind == "uid":
                if entry.uid != name:
                    code = Code.NOT_LOGGED_IN if entry.uid is None else Code.FORBIDDEN
                    results[stream] = {"error": code.value}
                    continue
            else:
                try:
                    self.handlers.allow(conn, Action.JOIN, stream, entry)
                    barrier = node.ops.join(conn, name, stream in cmd.watch)
                except ProtocolError as exc:
                    results[stream] = {"error": exc.code.value}
                    continue
            tracked = streams is not None and streams.tracked(stream)
            if streams is not None and tracked:
                streams.buffers.setdefault(conn.cid, {})[stream] = []
            work.append((stream, barrier, tracked))

        async def run() -> dict[str, Any]:
            # Every stream keeps buffering until all are replayed; then the buffers are
            # flushed and the ack built in one step (no await in between), so the ack's
            # offsets are exactly the last ones sent before it.
            done: list[tuple[str, dict[str, Any], str, int]] = []
            for stream, barrier, tracked in work:
                if conn.closing:  # gone: read nothing more (its buffers are dropped below)
                    done.append((stream, _gone(), "", 0))
                    continue
                try:
                    if barrier is not None:
                        await barrier
                    result, epoch, last = await self._replay(
                        conn, stream, positions[stream], tracked, cmd.recent
                    )
                except ProtocolError as exc:
                    result, epoch, last = {"error": exc.code.value}, "", 0
                done.append((stream, result, epoch, last))
            for stream, result, epoch, last in done:
                epoch, last = self._flush(conn, stream, epoch, last)
                if "recovered" in result and result.get("reason") != "no_history":
                    result.update(epoch=epoch, offset=last, replayed=result.pop("replayed"))
                results[stream] = result
            return {"streams": results}

        self.handlers.reply(conn, cmd.id, run())

    async def _replay(
        self, conn: Connection, stream: str, position: tuple[str, int], tracked: bool,
        recent: int = 0,
    ) -> tuple[dict[str, Any], str, int]:  # fmt: skip
        """Send what the history has after ``position``: the verdict, and the position the
        stream's buffered live messages continue from.

        The replay goes page by page, each read from the store only once the connection
        has room for it (a client that never reads costs the node one page, not the whole
        history); the first read fixes the verdict and the window's end (``top``), later
        ones read on up to it. It stops as soon as the connection closes. ``recent``: a stream
        at ``[null, 0]`` replays at most that many (the newest), not up to --max-replay."""
        node, streams = self.node, self.node.streams
        if streams is None or not tracked:
            return {"recovered": False, "reason": "no_history"}, "", 0
        epoch, offset = position
        cfg = node.config
        limit = cfg.max_replay
        if recent and not epoch and offset == 0:
            limit = min(limit, recent)
        page = {"count": min(limit, PAGE_COUNT), "budget": max(1, min(cfg.max_outbox // 4,
                PAGE_BYTES))}  # fmt: skip
        try:
            await streams.ensure(stream)
            if not await self._room(conn):
                return _gone(), "", 0
            read = await streams.store.read(stream, epoch, offset, limit, **page)
        except PresenceUnavailable:
            return {"recovered": False, "reason": "unavailable", "replayed": 0}, "", 0
        ok, reason = history.judge(epoch, offset, read.epoch, read.top, read.oldest, limit)
        window, top = read.epoch, read.top
        last = offset if epoch and epoch == window else 0  # the last offset read
        replayed, later = 0, False
        while not conn.closing:
            entries = read.entries
            if later and (read.epoch != window or not entries):
                # lost since the first page: the store restarted, or trimmed or expired the
                # rest of the window while the client was reading
                ok, reason = False, "epoch_changed" if read.epoch != window else "too_old"
                break
            if later and entries[0][0] > last + 1:
                ok, reason = False, "too_old"  # trimmed meanwhile: what is left is sent
            sent, last = self._page(conn, entries, last, window)
            replayed += sent
            if last >= top or not entries:  # done, or nothing of the window is retained
                break
            del read, entries  # nothing of the page is kept while the client reads it
            later = True
            try:
                if not await self._room(conn):
                    break
                read = await streams.store.read(stream, window, last, limit, upto=top, **page)
            except PresenceUnavailable:
                ok, reason, top = False, "unavailable", last  # what was sent, and no further
                break
        node.metrics.replayed.inc(replayed)
        result: dict[str, Any] = {"recovered": ok, "replayed": replayed}
        if reason is not None:
            result["reason"] = reason
        return result, window, top

    def _page(
        self, conn: Connection, entries: list[tuple[int, bytes]], last: int, epoch: str
    ) -> tuple[int, int]:
        """Push a page's messages after offset ``last`` (not those whose sender excluded the
        connection): how many, and the last offset of the page."""
        sent = 0
        for off, raw in entries:
            if off <= last:
                continue
            last = off
            try:
                env = envelope.decode(raw)
            except envelope.EnvelopeError:
                continue
            if conn.cid not in env.exclude:
                conn.reply(history.splice(env.payload, off, epoch))
                sent += 1
        return sent, last

    async def _room(self, conn: Connection) -> bool:
        """Wait until the connection can take another page: once this turn's frames are
        written, while its transport is over its high-water mark. False when it is closing,
        or when it read nothing for a heartbeat interval (then it is closed 1013, a slow
        consumer)."""
        await asyncio.sleep(0)  # the end-of-turn flush writes the last page first
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.node.config.ping_interval
        while conn.congested and not conn.closing:
            left = deadline - loop.time()
            if left <= 0:
                conn.close(SLOW_CONSUMER_CLOSE, "slow consumer")
                break
            try:
                await asyncio.wait_for(conn.drained(), left)
            except TimeoutError:
                pass
        return not conn.closing

    def _flush(self, conn: Connection, stream: str, epoch: str, last: int) -> tuple[str, int]:
        """Send the buffered live messages newer than ``[epoch, last]``, stop buffering and
        set the connection's floor; the position it ends at."""
        streams = self.node.streams
        if streams is None:
            return epoch, last
        mine = streams.buffers.get(conn.cid)
        buffered = mine.pop(stream, None) if mine is not None else None
        if mine is not None and not mine:
            del streams.buffers[conn.cid]
        outbox = self.node.outbox
        drop = outbox.drop(stream) if outbox else False
        for off, ep, frame, kind in buffered or ():
            if ep == epoch and off <= last:
                continue
            conn.push(frame, kind, drop)
            epoch, last = ep, off
        if epoch and not conn.closing:
            streams.floors.setdefault(conn.cid, {})[stream] = (epoch, last)
        return epoch, last


def _gone() -> dict[str, Any]:
    """The verdict of a stream not replayed because the connection closed (never sent)."""
    return {"recovered": False, "replayed": 0}
