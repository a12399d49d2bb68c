"""Who may do what (PROTOCOL.md, "Policy"), decided from a connection's JWT claims. No I/O.

Claims read (all optional):

- ``groups``: list of glob patterns naming the groups the connection may join
  (absent: any group).
- ``send_groups``: list of glob patterns naming groups it may send to without having
  joined them (absent: none).
- ``can_broadcast``: ``true`` to allow sending to ``all`` (default false).
- ``send_clients``: ``false`` to refuse sending to ``client:`` addresses (default true).
- ``presence``: ``false`` to refuse presence questions (default true).

A claim of the wrong type narrows rather than widens: a malformed ``groups`` or
``send_groups`` (not a list of strings, including ``null``) allows no group, and a
non-boolean ``can_broadcast``, ``presence`` or ``send_clients`` counts as false. Only the first
``MAX_PATTERNS`` patterns of a list are used.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping, Sequence
from enum import StrEnum
from functools import lru_cache
from typing import Any, Generic, TypeVar

MAX_PATTERNS = 100
LOOKUP_CACHE = 10_000  # names remembered by a FirstMatch
T = TypeVar("T")


class Action(StrEnum):
    JOIN = "join"
    SEND = "send"
    PRESENCE = "presence"
    LOGIN = "login"


def compile_glob(pattern: str) -> re.Pattern[str]:
    """A regex that fully matches what ``pattern`` matches (see ``glob_match``).

    Each segment between stars is committed at its leftmost match (an atomic group), which
    is exact for star-only globs and keeps matching linear: plain ``.*`` joins backtrack
    exponentially on patterns like ``*a*a*a*b``.
    """
    parts = [re.escape(part) for part in pattern.split("*")]
    if len(parts) == 1:
        return re.compile(parts[0], re.DOTALL)
    middle = "".join(f"(?>.*?{part})" for part in parts[1:-1])
    return re.compile(f"{parts[0]}{middle}.*{parts[-1]}", re.DOTALL)


@lru_cache(maxsize=256)
def _cached_glob(pattern: str) -> re.Pattern[str]:
    return compile_glob(pattern)


def glob_match(pattern: str, name: str) -> bool:
    """Whether ``name`` matches ``pattern``, where ``*`` stands for any run of characters
    (including ``:`` and none at all) and every other character is literal."""
    return _cached_glob(pattern).fullmatch(name) is not None


def _patterns(value: object) -> tuple[re.Pattern[str], ...]:
    """The compiled patterns of a claim; empty (matches nothing) when it is malformed."""
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        return ()
    return tuple(compile_glob(p) for p in value[:MAX_PATTERNS])


def _matches(patterns: tuple[re.Pattern[str], ...], name: str) -> bool:
    return any(p.fullmatch(name) is not None for p in patterns)


class Policy:
    """The permissions of one connection. ``Policy.from_claims(None)`` allows everything."""

    def __init__(
        self,
        *,
        anonymous: bool = False,
        join: tuple[re.Pattern[str], ...] | None = None,
        send: tuple[re.Pattern[str], ...] = (),
        can_broadcast: bool = False,
        presence: bool = True,
        send_clients: bool = True,
    ) -> None:
        self.anonymous = anonymous
        self.send_clients = send_clients
        self._join = join  # None: any group
        self._send = send
        self.can_broadcast = can_broadcast
        self.presence = presence

    @classmethod
    def from_claims(cls, claims: Mapping[str, Any] | None) -> Policy:
        """The policy for a token's claims, or for anonymous mode when ``claims`` is None."""
        if claims is None:
            return cls(anonymous=True)
        return cls(
            join=_patterns(claims["groups"]) if "groups" in claims else None,
            send=_patterns(claims.get("send_groups")),
            can_broadcast=claims.get("can_broadcast") is True,
            presence=claims.get("presence", True) is True,
            send_clients=claims.get("send_clients", True) is True,
        )

    def decide(self, action: Action, target: str, joined: Collection[str]) -> str | None:
        """None when ``action`` on ``target`` is allowed, else a short reason.

        ``target`` is an address string (``uid:x``, ``client:x``, ``group:g``, ``all``);
        ``joined`` holds the bare names of the groups the connection is in (``g``, not
        ``group:g``). Unknown actions and targets are refused.
        """
        if self.anonymous:
            return None
        if action == Action.LOGIN:
            return None
        if action == Action.PRESENCE:
            if not self.presence:
                return "presence queries not allowed"
            group = _group_name(target)
            # a token limited to some groups may only see the members of those it may join
            if group is None or self._join is None or group in joined:
                return None
            if _matches(self._join, group) or _matches(self._send, group):
                return None
            return "not allowed to see this group"
        if action == Action.JOIN:
            group = _group_name(target)
            if group is None:
                return "only groups can be joined"
            if self._join is None or _matches(self._join, group):
                return None
            return "not allowed to join this group"
        if action == Action.SEND:
            return self._decide_send(target, joined)
        return "action not allowed"

    def _decide_send(self, target: str, joined: Collection[str]) -> str | None:
        if target == "all":
            return None if self.can_broadcast else "sending to all not allowed"
        if target.startswith("uid:"):
            return None
        if target.startswith("client:"):
            return None if self.send_clients else "sending to clients not allowed"
        group = _group_name(target)
        if group is None:
            return "address not allowed"
        if group in joined or _matches(self._send, group):
            return None
        return "not allowed to send to this group"


def _group_name(target: str) -> str | None:
    prefix, colon, name = target.partition(":")
    return name if prefix == "group" and colon else None


class FirstMatch(Generic[T]):
    """Ordered (glob pattern, value) rules: ``lookup`` gives the value of the first pattern
    matching a name, or ``default``; answers are cached (bounded), as they are asked per
    message."""

    __slots__ = ("_cache", "_compiled", "_default")

    def __init__(self, rules: Sequence[tuple[str, T]], default: T) -> None:
        self._compiled = tuple((compile_glob(pattern), value) for pattern, value in rules)
        self._default = default
        self._cache: dict[str, T] = {}

    def lookup(self, name: str) -> T:
        try:
            return self._cache[name]
        except KeyError:
            pass
        found = self._default
        for regex, value in self._compiled:
            if regex.fullmatch(name) is not None:
                found = value
                break
        if len(self._cache) >= LOOKUP_CACHE:
            self._cache.clear()
        self._cache[name] = found
        return found
