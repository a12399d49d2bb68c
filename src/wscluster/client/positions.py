"""Stream positions of a client and the pushed-frame filter built on them. No I/O.

A stream is a ``uid:<uid>`` or ``group:<name>`` address with history; its messages carry an
``offset`` (+1 per message) and an ``epoch`` (a new epoch: the history before it was lost).
A position ``(epoch, offset)`` is the last one the application got (docs/protocol.md,
"History, offsets and resume").
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping
from typing import Any

Frame = dict[str, Any]
Position = tuple[str | None, int]  # epoch None: nothing known (resume replays all retained)
STREAM_PREFIXES = ("uid:", "group:")


def parse_position(stream: object, value: object) -> Position:
    """An application's ``[epoch, offset]`` (``[None, 0]``: everything retained) for a stream,
    e.g. restored from its storage; ValueError when either is malformed."""
    if not isinstance(stream, str) or not stream.startswith(STREAM_PREFIXES):
        raise ValueError(f"not a stream (uid:<uid> or group:<name>): {stream!r}")
    if not isinstance(value, list | tuple) or len(value) != 2:
        raise ValueError(f"position of {stream} is not [epoch, offset]: {value!r}")
    epoch, offset = value
    if not (epoch is None or isinstance(epoch, str)) or type(offset) is not int or offset < 0:
        raise ValueError(f"position of {stream} is not [epoch, offset >= 0]: {value!r}")
    return (epoch or None, offset)


def position_in(frame: Mapping[str, Any]) -> Position | None:
    """The position a frame carries (a message, a join/login/resume ack, a gap), if any; the
    epoch ``""`` (a stream not written yet) is None."""
    epoch, offset = frame.get("epoch"), frame.get("offset")
    if isinstance(epoch, str) and type(offset) is int:
        return (epoch or None, offset)
    return None


def stream_of(frame: Frame) -> str | None:
    """The stream of a pushed frame that moves a position: a message with an offset, a gap."""
    field = {"message": "to", "gap": "stream"}.get(str(frame.get("type")))
    stream = frame.get(field) if field else None
    sender = frame.get("from")
    if field == "to" and frame.get("carbon") is True and isinstance(sender, dict):
        uid = sender.get("uid")  # a carbon is stored in its sender's stream
        stream = f"uid:{uid}" if isinstance(uid, str) else None
    if isinstance(stream, str) and stream.startswith(STREAM_PREFIXES) and position_in(frame):
        return stream
    return None


class Positions:
    """The last position per stream."""

    def __init__(self, initial: Mapping[str, object] | None = None) -> None:
        self._pos = {stream: parse_position(stream, v) for stream, v in (initial or {}).items()}

    def __contains__(self, stream: object) -> bool:
        return stream in self._pos

    def get(self, stream: str) -> Position | None:
        return self._pos.get(stream)

    def snapshot(self) -> dict[str, list[str | int | None]]:
        """``{stream: [epoch, offset]}``: what to store and pass back as ``positions=``."""
        return {stream: [epoch, offset] for stream, (epoch, offset) in self._pos.items()}

    def advance(self, stream: str, pos: Position) -> bool:
        """Take ``pos`` if it is past the stream's position (a new epoch is; no epoch, e.g. a
        resume ack's from before anything was stored, is not); False when it is not (a
        message at it is a duplicate)."""
        current = self._pos.get(stream)
        if current is not None and (
            (current[0] == pos[0] and pos[1] <= current[1]) or (pos[0] is None and current[0])
        ):
            return False
        self._pos[stream] = pos
        return True

    def fill(self, stream: str, ack: Mapping[str, Any]) -> None:
        """Take the position of a join or login ack only when the stream has none yet (a
        resume, not this ack, decides for a stream the client already follows)."""
        pos = position_in(ack)
        if pos is not None:
            self._pos.setdefault(stream, pos)

    def set(self, stream: str, pos: Position) -> None:
        self._pos[stream] = pos

    def forget(self, stream: str) -> None:
        self._pos.pop(stream, None)


def in_offset_order(frames: list[Frame]) -> list[Frame]:
    """Held frames of one stream in delivery order: by epoch in the order they first came,
    then by offset, a gap after the message at its offset."""
    ranks: dict[object, int] = {}
    for frame in frames:
        ranks.setdefault(frame.get("epoch"), len(ranks))
    return sorted(
        frames, key=lambda f: (ranks[f.get("epoch")], f["offset"], f.get("type") == "gap")
    )


class Inbox:
    """Pushed frames on their way to the application (``deliver``). A message at or below its
    stream's position is dropped (counted in ``duplicates``); a gap moves the position. The
    frames of streams under a ``hold`` (a resume in flight) that are not the next message of
    their stream (offset + 1 in the same epoch: those pass at once, with the held ones they
    bring in line) wait until ``release``, which delivers them in offset order, or
    ``discard``. So a resume's replay flows through, and only live messages ahead of it
    wait. At most ``max_held`` frames wait; more are dropped (counted in ``overflowed``):
    with the replay flowing, that takes over ``max_held`` live messages ahead of a hole, or
    a replay that cannot be placed (a new epoch, or a resume from ``[None, 0]``) that big."""

    def __init__(
        self, positions: Positions, deliver: Callable[[Frame], None], max_held: int = 10000
    ) -> None:
        if max_held < 1:
            raise ValueError("max_held must be >= 1")
        self.positions = positions
        self.max_held = max_held
        self.duplicates = 0
        self.overflowed = 0
        self._deliver = deliver
        self._holds: dict[str, int] = {}  # stream -> the hold it is under
        self._held: dict[str, list[Frame]] = {}
        self._count = 0
        self._hold_ids = itertools.count(1)

    @property
    def held(self) -> int:
        return self._count

    def put(self, frame: Frame) -> None:
        stream = stream_of(frame)
        if stream is None:
            self._deliver(frame)
        elif stream not in self._holds:
            self._pass(stream, frame)
        elif (ahead := self._ahead(stream, frame)) == 1:  # the next message: no need to wait
            self._pass(stream, frame)
            self._drain(stream)
        elif ahead is not None and ahead <= 0:  # at or below the position: seen already
            self.duplicates += 1
        elif self._count >= self.max_held:
            self.overflowed += 1
        else:
            self._held[stream].append(frame)
            self._count += 1

    def _ahead(self, stream: str, frame: Frame) -> int | None:
        """How far a message of the stream's current epoch is past its position (1: the
        next one); None for anything else (a gap, another epoch, no known position)."""
        pos, got = self.positions.get(stream), position_in(frame)
        if pos is None or got is None or pos[0] is None or got[0] != pos[0]:
            return None
        return got[1] - pos[1] if frame.get("type") == "message" else None

    def _drain(self, stream: str) -> None:
        """Deliver the held frames of ``stream`` that are now next in line."""
        held = self._held[stream]
        while held:
            nxt = next((f for f in held if self._ahead(stream, f) == 1), None)
            if nxt is None:
                return
            held.remove(nxt)
            self._count -= 1
            self._pass(stream, nxt)

    def hold(self, streams: Iterable[str]) -> int:
        """Hold the frames of ``streams`` from now on (a stream held already starts over);
        returns the hold's id for ``release``/``discard``."""
        hold_id = next(self._hold_ids)
        for stream in streams:
            self._count -= len(self._held.get(stream, ()))
            self._holds[stream] = hold_id
            self._held[stream] = []
        return hold_id

    def release(self, hold_id: int, results: Mapping[str, object] | None = None) -> None:
        """End a hold: deliver its frames in offset order without duplicates, then take the
        positions of ``results`` (a resume ack's ``streams``)."""
        for stream, frames in self._end(hold_id).items():
            for frame in in_offset_order(frames):
                self._pass(stream, frame)
            entry = (results or {}).get(stream)
            pos = position_in(entry) if isinstance(entry, Mapping) else None
            if pos is not None:
                self.positions.advance(stream, pos)

    def discard(self, hold_id: int) -> None:
        """End a hold dropping its frames (its link is gone: a later resume replays them)."""
        self._end(hold_id)

    def _end(self, hold_id: int) -> dict[str, list[Frame]]:
        ended = {}
        for stream in [s for s, h in self._holds.items() if h == hold_id]:
            del self._holds[stream]
            ended[stream] = self._held.pop(stream)
            self._count -= len(ended[stream])
        return ended

    def _pass(self, stream: str, frame: Frame) -> None:
        pos = position_in(frame)
        assert pos is not None  # stream_of checked it
        if not self.positions.advance(stream, pos) and frame.get("type") == "message":
            self.duplicates += 1
            return
        self._deliver(frame)
