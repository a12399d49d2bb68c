"""The Presence role: a cluster-wide mirror of every node's connections.

The node that holds a socket is the authority on it; the store mirrors it for questions
about the whole cluster (is a uid online, who is in a group, counts, live nodes).

Contract every implementation keeps (tests/contract/test_presence.py):

- Writes from one node are applied in the order they were made; each write's awaitable
  returns once it is applied.
- Node liveness is a heartbeat with a TTL. Readers never report a connection of a node whose
  heartbeat is older than the TTL, whether or not it was purged yet.
- ``purge_dead`` removes the entries of expired nodes; each dead node is claimed (returned
  with its connections) by exactly one caller, however many survivors call it concurrently.
- ``heartbeat`` returns False when the store did not know the node (the store restarted
  empty, or the node was purged after a long pause): the node must then call ``resync``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(slots=True)
class ConnInfo:
    client_id: str
    uid: str | None = None
    groups: list[str] = field(default_factory=list)


@dataclass(slots=True)
class GroupInfo:
    uids: list[str]  # distinct uids bound to members, sorted
    count: int  # connections in the group


@dataclass(slots=True)
class NodeInfo:
    node_id: str
    stats: dict[str, Any]  # at least {"connections": n}; whatever the node reported


@dataclass(slots=True)
class DeadNode:
    node_id: str
    connections: list[ConnInfo]


class Presence(Protocol):
    async def start(self) -> None: ...

    async def close(self) -> None: ...

    # --- writes by the owning node ---------------------------------------------------
    async def add(self, node_id: str, conn: ConnInfo) -> None:
        """A connection opened (uid and groups may already be set)."""
        ...

    async def bind(self, node_id: str, cid: str, old_uid: str | None, uid: str | None) -> None:
        """A connection's uid changed (None: unbound); groups keep it, with the new uid."""
        ...

    async def join(self, node_id: str, cid: str, uid: str | None, group: str) -> None: ...

    async def leave(self, node_id: str, cid: str, group: str) -> None: ...

    async def remove(
        self, node_id: str, cid: str, uid: str | None, groups: Iterable[str]
    ) -> None:
        """A connection closed."""
        ...

    async def heartbeat(self, node_id: str, ttl: float, stats: dict[str, Any]) -> bool:
        """Refresh liveness (and the node's stats); False when the store did not know the
        node, in which case the caller must ``resync``."""
        ...

    async def resync(
        self, node_id: str, conns: Sequence[ConnInfo], ttl: float, stats: dict[str, Any]
    ) -> None:
        """Replace whatever the store holds for this node by ``conns`` and mark it alive."""
        ...

    async def remove_node(self, node_id: str) -> None:
        """Graceful stop: forget the node and all its connections now."""
        ...

    async def purge_dead(self) -> list[DeadNode]:
        """Claim and purge expired nodes; each is returned by exactly one caller."""
        ...

    # --- reads (dead nodes filtered out) ---------------------------------------------
    async def is_online(self, uid: str) -> bool: ...

    async def client_ids(self, uid: str) -> list[str]: ...

    async def group_members(self, group: str) -> GroupInfo: ...

    async def nodes(self) -> list[NodeInfo]:
        """Live nodes with the stats of their last heartbeat."""
        ...
