"""The ``resume`` frame (PROTOCOL: "History, offsets and resume"): join + replay + live with
no race between them.

For each stream, while the frame is processed (synchronously, before any other message can
be delivered) the connection starts buffering the stream's live messages (streams.py) and
joins the group; once the join holds, the history after the client's position is read and
sent, then the buffered live messages that are newer, and from then on live messages flow
directly, never at or below the last offset sent (the connection's floor).
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

from . import envelope, history
from .errors import Code, PresenceUnavailable, ProtocolError, bad_request
from .gateway.connection import Connection
from .policy import Action

if TYPE_CHECKING:
    from . import frames
    from .handlers import Handlers
    from .node import Node


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
                try:
                    if barrier is not None:
                        await barrier
                    result, epoch, last = await self._replay(
                        conn, stream, positions[stream], tracked
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
        self, conn: Connection, stream: str, position: tuple[str, int], tracked: bool
    ) -> tuple[dict[str, Any], str, int]:
        """Send what the history has after ``position``: the verdict, and the position the
        stream's buffered live messages continue from."""
        node, streams = self.node, self.node.streams
        if streams is None or not tracked:
            return {"recovered": False, "reason": "no_history"}, "", 0
        epoch, offset = position
        limit = node.config.max_replay
        try:
            await streams.ensure(stream)
            read = await streams.store.read(stream, epoch, offset, limit)
        except PresenceUnavailable:
            return {"recovered": False, "reason": "unavailable", "replayed": 0}, "", 0
        ok, reason = history.judge(epoch, offset, read.epoch, read.top, read.oldest, limit)
        after = offset if epoch and epoch == read.epoch else 0
        replayed = 0
        for off, raw in read.entries:
            if off <= after:
                continue
            try:
                env = envelope.decode(raw)
            except envelope.EnvelopeError:
                continue
            if conn.cid not in env.exclude:
                conn.reply(history.splice(env.payload, off, read.epoch))
                replayed += 1
        node.metrics.replayed.inc(replayed)
        result: dict[str, Any] = {"recovered": ok, "replayed": replayed}
        if reason is not None:
            result["reason"] = reason
        return result, read.epoch, read.top

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
