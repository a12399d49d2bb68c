"""The node's side of history: per stream, the last offset this node delivered, so that
nothing is delivered twice or out of order and no hole goes unnoticed.

A message arriving with the next offset is delivered. One from the past is a duplicate and
dropped. One from further ahead means the broker link lost some: it is held (with every later
one) while the missing ones are read from the history, then all are delivered in order; what
the history no longer has is announced to the local receivers with a ``gap`` push. A new
epoch (the store lost the history) is announced the same way and the new epoch's messages
are delivered from its first retained one. A periodic position check (``check``) catches a
lost tail: the store's last offset seen at one check and still not delivered at the next.

Connections that are resuming get the stream's messages in a buffer instead (resume.py), and
connections that resumed never get an offset at or below what their resume sent (``floors``).
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from picows import WSMsgType

from . import envelope, frames, history
from .errors import PresenceUnavailable
from .gateway.connection import SLOW_CONSUMER_CLOSE
from .routing import Address, Kind, parse_address

if TYPE_CHECKING:
    from .broker.redis_history import RedisHistory
    from .node import Node

log = logging.getLogger("wscluster.node")

CHECK_MAX = 2000  # streams compared with the store per position check
MAX_HELD = 10_000  # messages held per stream while a repair runs (then: gap, deliver)
MAX_BUFFERED = 10_000  # live messages buffered per resuming stream (then: close 1013)
_Held = tuple[int, str, envelope.Envelope]
Buffered = tuple[int, str, bytes, WSMsgType]  # offset, epoch, frame, kind


@dataclass(slots=True)
class StreamState:
    epoch: str
    last: int  # the last offset delivered here (0: none of this epoch)
    held: list[_Held] | None = None  # a repair is running: later messages wait here
    seen_top: int = 0  # the store's last offset at the previous position check
    live_max: int = 0  # the highest offset received live in this epoch
    bumping: bool = False  # the store went back in time: a new epoch is being set
    address: Address = field(default_factory=lambda: Address(Kind.ALL, ""))


class Streams:
    def __init__(self, node: Node, store: RedisHistory) -> None:
        self.node = node
        self.store = store
        self.state: dict[str, StreamState] = {}
        self.buffers: dict[str, dict[str, list[Buffered]]] = {}  # cid -> stream -> buffer
        self.floors: dict[str, dict[str, tuple[str, int]]] = {}  # cid -> stream -> position
        self._check_from = 0  # where the next position check starts, on a node with many

    @property
    def rules(self) -> history.Rules:
        """The rules in force: the cluster's, which change (cluster_rules.py)."""
        return self.node.cluster.history_rules

    def tracked(self, stream: str) -> bool:
        return self.rules.match(stream) is not None

    def retain(self) -> None:
        """The rules changed: stop tracking the streams they no longer keep (a message
        stored anyway, by a publisher with rules of its own, starts tracking again)."""
        for stream in [s for s in self.state if not self.tracked(s)]:
            del self.state[stream]

    # --- live messages ---------------------------------------------------------------
    def on_message(self, payload: bytes) -> None:
        """A ``#<offset>:<epoch>:<envelope>`` message from the broker."""
        offset, epoch, raw = history.split(payload)
        env = envelope.decode(raw)
        if env.op != envelope.Op.DELIVER:
            raise envelope.EnvelopeError("history message that is not a delivery")
        address = parse_address(env.to)
        stream = env.to
        st = self.state.get(stream)
        if st is None:  # first message of a new subscription: it starts the count
            registry = self.node.registry
            size = registry.uid_size if address.kind is Kind.UID else registry.group_size
            if not size(address.name):
                return  # late, after the last local receiver left: nobody to track it for
            st = self.state[stream] = StreamState(epoch, offset - 1, address=address)
        if epoch == st.epoch and offset <= st.live_max:
            # pub/sub never repeats itself: the store went back in time
            log.warning("%s: offset %d again after %d: the store lost appends", stream,
                        offset, st.live_max)  # fmt: skip
            self._rolled_back(st)
            return
        self._accept(st, offset, epoch, env)
        if epoch == st.epoch:
            st.live_max = max(st.live_max, offset)

    def _accept(self, st: StreamState, offset: int, epoch: str, env: envelope.Envelope) -> None:
        if st.held is not None:
            if len(st.held) < MAX_HELD:
                st.held.append((offset, epoch, env))
                return
            log.warning("%s: repair too slow, %d messages held: giving up", env.to, MAX_HELD)
            self._release(st, unreadable=True)
        if epoch != st.epoch:
            self._adopt(st, epoch)
        if offset <= st.last:
            return  # a duplicate (delivered by a repair already)
        if offset > st.last + 1:
            st.held = [(offset, epoch, env)]
            self.node.spawn(self._repair(st))
            return
        self.deliver(st, offset, epoch, env)

    def deliver(self, st: StreamState, offset: int, epoch: str, env: envelope.Envelope) -> None:
        st.last = offset
        kind = WSMsgType.BINARY if env.binary else WSMsgType.TEXT
        frame = env.payload if env.binary else history.splice(env.payload, offset, epoch)
        stream = env.to
        skip = set(env.exclude)
        outbox = self.node.outbox
        drop = outbox.drop(stream) if outbox else False
        n = 0
        buffers, floors = self.buffers, self.floors
        for cid, conn in self.node.registry.receivers(st.address):
            if cid in skip:
                continue
            if buffers and (mine := buffers.get(cid)) is not None:
                buf = mine.get(stream)
                if buf is not None:
                    if len(buf) < MAX_BUFFERED:
                        buf.append((offset, epoch, frame, kind))
                    else:  # its resume is too slow to keep up: it will resume again
                        conn.close(SLOW_CONSUMER_CLOSE, "resume too slow")
                    continue
            if floors and (f := floors.get(cid)) is not None and (pos := f.get(stream)):
                if pos[0] == epoch and offset <= pos[1]:
                    continue
            conn.push(frame, kind, drop)
            n += 1
        if n:
            self.node.metrics.deliveries.inc(n)
            self.node.metrics.frames_out.inc(n)

    def _adopt(self, st: StreamState, epoch: str) -> None:
        """A new epoch: its messages count from 1; receivers hear of it when they may have
        missed some of the old one (not for a stream that had none)."""
        if st.epoch:
            self._gap(st, epoch, 0, "epoch_changed")
        st.epoch, st.last, st.live_max = epoch, 0, 0

    def _gap(self, st: StreamState, epoch: str, offset: int, reason: str) -> None:
        """Tell the local receivers that messages up to ``offset`` may be missing."""
        st.epoch, st.last = epoch, offset
        self.node.metrics.gaps.labels(reason=reason).inc()
        log.warning("%s: %s, receivers told (epoch %s offset %d)", st.address, reason, epoch,
                    offset)  # fmt: skip
        frame = frames.encode(
            {"type": "gap", "stream": str(st.address), "epoch": epoch, "offset": offset,
             "reason": reason}
        )  # fmt: skip
        stream = str(st.address)
        for cid, conn in self.node.registry.receivers(st.address):
            if stream not in self.buffers.get(cid, ()):
                conn.reply(frame)

    def _rolled_back(self, st: StreamState) -> None:
        """The store lost appends this node had delivered (offsets are being reused): tell
        the receivers, and start the stream over in a new epoch."""
        self._gap(st, st.epoch, st.last, "lost")  # for every message that cannot be delivered
        if not st.bumping:
            st.bumping = True
            self.node.spawn(self._bump(st, st.epoch))

    async def _bump(self, st: StreamState, epoch: str) -> None:
        try:
            await self.store.bump(str(st.address), epoch, os.urandom(8).hex())
        except PresenceUnavailable as exc:
            log.warning("%s: could not start a new epoch: %s", st.address, exc)
        finally:
            st.bumping = False

    # --- repair ----------------------------------------------------------------------
    async def _repair(self, st: StreamState) -> None:
        """Fill the hole before ``st.held`` (or up to the store's top) from the history."""
        rule = self.rules.match(str(st.address))
        limit = rule.keep if rule is not None else 1
        read = None
        for attempt in range(3):
            try:
                read = await self.store.read(str(st.address), st.epoch, st.last, limit)
                break
            except PresenceUnavailable as exc:
                log.warning("%s: history unreadable for a repair (%s)", st.address, exc)
                await asyncio.sleep(self.node.config.check_interval * (attempt + 1) / 2)
        if self.state.get(str(st.address)) is not st:
            return  # nobody here listens any more
        if read is None:
            self._release(st, unreadable=True)
            return
        if read.epoch and read.epoch != st.epoch:
            self._adopt(st, read.epoch)
        # What the history no longer has (trimmed or expired) is lost; a hole between this
        # read and the held messages is not: the next repair reads it (see _release).
        if read.entries:
            nxt = read.entries[0][0]
        else:
            nxt = read.top + 1 if read.top > st.last else st.last + 1
        if nxt > st.last + 1:
            self._gap(st, st.epoch, nxt - 1, "lost")
        self.node.metrics.repaired.inc(sum(1 for o, _ in read.entries if o > st.last))
        for offset, raw in read.entries:
            if offset > st.last:
                try:
                    self.deliver(st, offset, st.epoch, envelope.decode(raw))
                except envelope.EnvelopeError:
                    log.warning("%s: undecodable history entry %d", st.address, offset)
        self._release(st)

    def _release(self, st: StreamState, unreadable: bool = False) -> None:
        """Deliver what was held, in order. A hole before it is announced when the history
        could not be read; otherwise it starts a new repair (the read may predate messages
        lost just before the first held one, which the history has by now)."""
        held, st.held = st.held or [], None
        if unreadable and held and held[0][0] > st.last + 1 and held[0][1] == st.epoch:
            self._gap(st, st.epoch, held[0][0] - 1, "lost")
        for offset, epoch, env in held:
            self._accept(st, offset, epoch, env)

    # --- position check --------------------------------------------------------------
    async def check(self, eager: bool = False) -> None:
        """Compare every stream's last delivered offset with the store's: a tail still
        missing since the previous check (or any, when ``eager``) is repaired."""
        names = self._next_slice()
        before = [(self.state[s].epoch, self.state[s].last) for s in names]
        positions = await self.store.positions(names)
        for stream, (epoch, top), (was_epoch, was_last) in zip(
            names, positions, before, strict=True
        ):
            st = self.state.get(stream)
            if st is None or st.held is not None or st.epoch != was_epoch:
                continue  # changed while the store was read: the answer may predate it
            if not epoch and st.epoch:
                # The store has nothing for the stream (it restarted empty, or the stream
                # expired): no position to repair towards. The next append starts a new
                # epoch, and its first message tells the receivers (_accept), so a gap
                # names the epoch they continue in, never "".
                continue
            changed = epoch != st.epoch
            if changed:
                self._adopt(st, epoch)
            elif top < was_last:
                log.warning("%s: the store is at offset %d, behind %d: it lost appends",
                            stream, top, was_last)  # fmt: skip
                self._rolled_back(st)
                continue
            behind = top > st.last and (eager or changed or st.seen_top > st.last)
            st.seen_top = top
            if behind:
                st.held = []
                self.node.spawn(self._repair(st))

    def _next_slice(self) -> list[str]:
        """The streams to check this time: all of them, or the next CHECK_MAX in turn on a
        node with more (each is still checked every few intervals)."""
        names = [s for s, st in self.state.items() if st.held is None]
        if len(names) <= CHECK_MAX:
            return names
        start = self._check_from % len(names)
        self._check_from = start + CHECK_MAX
        return (names[start:] + names[:start])[:CHECK_MAX]

    async def ensure(self, stream: str) -> dict[str, Any]:
        """The stream's position once this node is subscribed (read from the store when the
        node knows none yet): ``{"epoch", "offset"}`` for an ack, or {} (no history, or the
        store did not answer)."""
        if not self.tracked(stream):
            return {}
        st = self.state.get(stream)
        if st is None:
            try:
                [(epoch, top)] = await self.store.positions([stream])
            except PresenceUnavailable:
                return {}
            st = self.state.get(stream)  # a live message may have come meanwhile
            if st is None:
                st = self.state[stream] = StreamState(epoch, top, address=parse_address(stream))
        return {"epoch": st.epoch, "offset": st.last}

    def drop(self, stream: str) -> None:
        """The node no longer listens to the stream."""
        self.state.pop(stream, None)

    def forget(self, cid: str) -> None:
        self.buffers.pop(cid, None)
        self.floors.pop(cid, None)
