"""The presence role: who is online where. ``create_presence(url, names)`` picks the backend.

- ``redis://``, ``rediss://``, ``unix://`` -> ``RedisPresence`` (see ``presence.redis``)
- ``memory://[hub]`` -> ``MemoryPresence``: in-process; instances of one hub share state
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from wscluster.naming import Names
from wscluster.presence.base import (
    SESSION_KEY_MAX,
    ConnInfo,
    DeadNode,
    GroupInfo,
    NodeInfo,
    Presence,
)

__all__ = [
    "SESSION_KEY_MAX",
    "ConnInfo",
    "DeadNode",
    "GroupInfo",
    "NodeInfo",
    "Presence",
    "create_presence",
]


def create_presence(url: str, names: Names, **kwargs: Any) -> Presence:
    """The presence backend for ``url``'s scheme (imported lazily); ValueError when unknown.

    ``kwargs`` go to the backend (``timeout=`` for Redis)."""
    scheme = urlsplit(url).scheme.lower()
    if scheme in ("redis", "rediss", "unix"):
        from wscluster.presence.redis import RedisPresence

        return RedisPresence(url, names, **kwargs)
    if scheme == "memory":
        from wscluster.presence.memory import MemoryPresence

        return MemoryPresence(names, urlsplit(url).netloc or "default", **kwargs)
    raise ValueError(f"unsupported presence URL scheme {scheme!r} in {url!r}")
