"""Slow-consumer rules: what a full outbox does to the messages of a stream. No I/O.

``--outbox-policy PATTERN=close|drop-oldest`` (repeatable, the first matching rule wins,
default ``close``). PATTERN matches address strings (``group:ticker:*``, ``uid:*``; ``*`` is
the only special character). A message of a ``drop-oldest`` stream is *droppable*: when its
connection's outbox is full, the oldest queued droppable messages are dropped and the
connection stays open; any other message over a full outbox closes it with 1013
(gateway/connection.py).
"""

from __future__ import annotations

from .policy import FirstMatch

MAX_RULES = 100
ACTIONS = {"close": False, "drop-oldest": True}  # action -> droppable
_KINDS = ("uid:", "group:", "client:", "all")


def parse_rule(text: str) -> tuple[str, bool]:
    """``group:ticker:*=drop-oldest`` -> (pattern, droppable); ValueError saying what is
    wrong."""
    pattern, eq, action = text.strip().rpartition("=")
    pattern, action = pattern.strip(), action.strip()
    if not eq or not pattern:
        raise ValueError(f"--outbox-policy {text!r}: expected PATTERN=close|drop-oldest, "
                         "e.g. 'group:ticker:*=drop-oldest'")  # fmt: skip
    if action not in ACTIONS:
        raise ValueError(f"--outbox-policy {text!r}: the action must be close or drop-oldest")
    literal = pattern.split("*", 1)[0]  # what every match starts with
    if not any(literal.startswith(k) or k.startswith(literal) for k in _KINDS):
        raise ValueError(f"--outbox-policy {text!r}: the pattern matches no address (they "
                         "are uid:..., group:..., client:... or all)")  # fmt: skip
    return pattern, ACTIONS[action]


class OutboxRules:
    """The ordered ``--outbox-policy`` rules; ``drop`` is cached (asked per delivery)."""

    __slots__ = ("_table", "rules")

    def __init__(self, specs: tuple[str, ...] | list[str] = ()) -> None:
        if len(specs) > MAX_RULES:
            raise ValueError(f"at most {MAX_RULES} --outbox-policy rules")
        self.rules = tuple(parse_rule(s) for s in specs)
        self._table = FirstMatch(self.rules, False)

    def __bool__(self) -> bool:
        return bool(self.rules)

    def drop(self, stream: str) -> bool:
        """Whether the messages of ``stream`` (an address string) are droppable: the first
        matching rule says ``drop-oldest``. No rule, or a ``close`` rule first: False."""
        return bool(self.rules) and self._table.lookup(stream)
