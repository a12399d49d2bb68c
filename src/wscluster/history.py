"""History rules and the framing of offset-carrying messages. No I/O.

``--history PATTERN=N/Ts`` keeps the last N messages of every stream (``uid:<uid>`` or
``group:<name>``) matching PATTERN for T seconds. A message published on such a stream gets
an offset (per stream, +1 each) and the stream's epoch, assigned by the store atomically with
the append (broker/redis_history.py); the node splices both into the client frame.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import msgspec

from . import envelope
from .policy import FirstMatch

MAX_RULES = 100
MAX_KEEP = 1_000_000
MAX_TTL = 30 * 86400.0
META_TTL = 86400.0  # an idle stream keeps its epoch and offset this long after its history
_RULE_RE = re.compile(r"^(?P<pattern>[^=]+)=(?P<n>\d+)/(?P<t>\d+(?:\.\d+)?)(?P<unit>[smhd]?)$")
_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


@dataclass(frozen=True, slots=True)
class Rule:
    pattern: str
    keep: int  # messages
    ttl: float  # seconds

    @property
    def ttl_ms(self) -> int:
        return max(1, int(self.ttl * 1000))

    @property
    def meta_ttl_ms(self) -> int:
        return int(max(self.ttl, META_TTL) * 1000)


def parse_rule(text: str) -> Rule:
    """``group:room:*=1000/300s`` -> Rule; ValueError saying what is wrong."""
    m = _RULE_RE.match(text.strip())
    if m is None:
        raise ValueError(f"--history {text!r}: expected PATTERN=N/T[s|m|h|d], e.g. "
                         "'group:room:*=1000/300s'")  # fmt: skip
    pattern = m["pattern"].strip()
    if not pattern.startswith(("uid:", "group:")):
        raise ValueError(f"--history {text!r}: the pattern must start with uid: or group:")
    keep = int(m["n"])
    ttl = float(m["t"]) * _UNITS[m["unit"]]
    if not 1 <= keep <= MAX_KEEP:
        raise ValueError(f"--history {text!r}: N must be 1-{MAX_KEEP}")
    if not 0 < ttl <= MAX_TTL:
        raise ValueError(f"--history {text!r}: T must be above 0 and at most 30 days")
    return Rule(pattern, keep, ttl)


NONE = "none"  # ``--history none``: no rules (a node clears the cluster's)


def specs_of(specs: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """The rule texts of a ``--history`` list, stripped; ``none`` alone stands for none."""
    clean = tuple(s.strip() for s in specs)
    return () if clean == (NONE,) else clean


@dataclass(frozen=True, slots=True)
class Position:
    """Where a stored message went: its stream's epoch and its offset in it."""

    epoch: str
    offset: int

    def as_dict(self) -> dict[str, str | int]:
        return {"epoch": self.epoch, "offset": self.offset}


@dataclass(frozen=True, slots=True)
class HistoryPage:
    """The newest messages of a stream (``Cluster.history_page``, ``GET /api/history``)."""

    stream: str
    epoch: str  # "" when nothing is stored
    offset: int  # the stream's last offset
    messages: list[dict[str, Any]]  # message frames, oldest first

    def as_dict(self) -> dict[str, Any]:
        return {"stream": self.stream, "epoch": self.epoch, "offset": self.offset,
                "messages": self.messages}  # fmt: skip


def frames_of(entries: list[tuple[int, bytes]], epoch: str) -> list[dict[str, Any]]:
    """The client frames of stored envelopes, with their offsets (binary ones and frames that
    are not JSON objects are left out)."""
    out: list[dict[str, Any]] = []
    for offset, raw in entries:
        try:
            env = envelope.decode(raw)
            frame = None if env.binary else msgspec.json.decode(splice(env.payload, offset, epoch))
        except (envelope.EnvelopeError, msgspec.DecodeError):
            continue
        if isinstance(frame, dict):
            out.append(frame)
    return out


def position(reply: object) -> Position | None:
    """The position in the append script's reply (``[offset, epoch]``), else None (a plain
    publish: not stored)."""
    if isinstance(reply, list | tuple) and len(reply) == 2:
        epoch = reply[1].decode() if isinstance(reply[1], bytes) else str(reply[1])
        return Position(epoch, int(reply[0]))
    return None


class Rules:
    """The ordered ``--history`` rules; ``match`` is cached (the hot path asks per message)."""

    __slots__ = ("_table", "rules", "specs")

    def __init__(self, specs: tuple[str, ...] | list[str] = ()) -> None:
        specs = specs_of(specs)
        if len(specs) > MAX_RULES:
            raise ValueError(f"at most {MAX_RULES} --history rules")
        self.specs = specs
        self.rules = tuple(parse_rule(s) for s in specs)
        self._table: FirstMatch[Rule | None] = FirstMatch(
            [(r.pattern, r) for r in self.rules], None
        )

    def __bool__(self) -> bool:
        return bool(self.rules)

    def match(self, stream: str) -> Rule | None:
        """The first rule matching the stream (an address string), or None."""
        return self._table.lookup(stream)


# --- framing ---------------------------------------------------------------------------
# The store publishes ``#<offset>:<epoch>:<envelope>`` (a '#' is never the first byte of a
# msgpack array, so plain envelopes and these are told apart by the first byte).
MARK = b"#"[0]


class FramingError(ValueError):
    pass


def split(payload: bytes) -> tuple[int, str, bytes]:
    """``#<offset>:<epoch>:<envelope>`` -> (offset, epoch, envelope bytes)."""
    first = payload.find(b":", 1)
    second = payload.find(b":", first + 1) if first > 0 else -1
    if second < 0:
        raise FramingError("malformed history framing")
    try:
        offset = int(payload[1:first])
        epoch = payload[first + 1 : second].decode("ascii")
    except (ValueError, UnicodeDecodeError):
        raise FramingError("malformed history framing") from None
    if offset < 1 or not epoch.isalnum() or not epoch.isascii():
        raise FramingError("malformed history framing")
    return offset, epoch, payload[second + 1 :]


def splice(frame: bytes, offset: int, epoch: str) -> bytes:
    """Add ``offset`` and ``epoch`` to a JSON object frame (anything else is kept as is)."""
    if not frame.endswith(b"}"):
        return frame
    return b'%s,"offset":%d,"epoch":"%s"}' % (frame[:-1], offset, epoch.encode())


def judge(epoch: str, offset: int, store_epoch: str, top: int, oldest: int, limit: int) -> (
    tuple[bool, str | None]
):  # fmt: skip
    """Whether a reader at ``[epoch, offset]`` can be brought up to date from what the store
    holds (its epoch, last and oldest retained offsets) with at most ``limit`` messages, and
    if not, why (``epoch_changed``, ``too_many``, ``too_old``)."""
    if not store_epoch:
        return (not epoch, None if not epoch else "epoch_changed")
    if epoch and epoch != store_epoch:
        return False, "epoch_changed"
    after = offset if epoch else 0
    missed = top - after
    if missed <= 0:
        return True, None
    if missed > limit:
        return False, "too_many"
    if oldest == 0 or oldest > after + 1:
        return False, "too_old"
    return True, None
