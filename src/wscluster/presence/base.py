"""The Presence role: a cluster-wide mirror of every node's connections.

The node that holds a socket is the authority on it; the store mirrors it for questions
about the whole cluster (is a uid online, who is in a group, counts, live nodes).

Contract every implementation keeps (tests/contract/test_presence.py):

- Writes from one node are applied in the order they were made; each write's awaitable
  returns once it is applied.
- Node liveness is a heartbeat with a TTL. Readers never report a connection of a node whose
  heartbeat is older than the TTL, whether or not it was purged yet.
- ``purge_dead`` removes the entries of expired nodes. A caller claims a dead node with a
  lease that it renews while it purges: one caller at a time purges a node, however many
  call concurrently, and a purge whose lease ran out (its purger died or stalled) is taken
  over by the next caller. The connections are handed to ``on_batch`` up to
  ``PURGE_BATCH`` at a time, and a batch is removed from the store only once ``on_batch``
  returned, so every connection is handed out at least once, and exactly once unless a
  purger stops between handing a batch out and removing it: the caller that takes over
  then hands that batch out again. A dead node stays in the store until all its
  connections are removed; one that heartbeats again stops its purge before the next
  batch (its heartbeat then returns False: what was removed, it restores by ``resync``).
- ``heartbeat`` returns False when the store did not know the node (the store restarted
  empty, or the node was purged after a long pause): the node must then call ``resync``.
- A connection's session (a dict of JSON values) lives in the connection's record: written
  by ``set_session`` only, from any process, gone with the record (``remove``,
  ``remove_node``, purge). ``purge_dead`` hands it out in ``ConnInfo.session``; ``resync``
  keeps the session of each connection it keeps; ``add`` ignores ``ConnInfo.session``. A
  session stays within the ``limit`` its writers pass (bytes: the sum over keys of the
  UTF-8 key plus its JSON value). Reads return None for a connection of a dead node.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgspec

from wscluster.errors import Code, ProtocolError, bad_request

log = logging.getLogger("wscluster.presence")
SESSION_KEY_MAX = 128  # characters in a session key
PURGE_BATCH = 200  # connections of a dead node handed out, then removed, at a time
PURGE_LEASE = 10.0  # default seconds a purge claim holds without being renewed


@dataclass(slots=True)
class ConnInfo:
    client_id: str
    uid: str | None = None
    groups: list[str] = field(default_factory=list)
    session: dict[str, Any] = field(default_factory=dict)  # see Presence.set_session


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


# ``purge_dead``'s callback: (dead node id, a batch of its connections); the batch is
# removed from the store once it returns
OnBatch = Callable[[str, list[ConnInfo]], Awaitable[None]]


class Presence(Protocol):
    async def start(self) -> None: ...

    async def close(self) -> None: ...

    # --- writes by the owning node ---------------------------------------------------
    async def add(self, node_id: str, conn: ConnInfo) -> None:
        """A connection opened (uid and groups may already be set; ``conn.session`` is
        ignored: see ``set_session``)."""
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
        """Replace whatever the store holds for this node by ``conns`` and mark it alive.

        The connections it keeps keep their session (``ConnInfo.session`` is ignored)."""
        ...

    async def remove_node(self, node_id: str) -> None:
        """Graceful stop: forget the node and all its connections now."""
        ...

    async def purge_dead(
        self, on_batch: OnBatch | None = None, *, lease: float = PURGE_LEASE
    ) -> list[DeadNode]:
        """Claim expired nodes (or take over purges whose lease of ``lease`` seconds ran
        out) and purge them: each batch of connections (uid, groups, session) goes to
        ``on_batch``, then is removed. Returns the nodes whose purge this call finished,
        each with the connections this call handed out."""
        ...

    # --- session: any process ---------------------------------------------------------
    async def set_session(
        self, node_id: str, cid: str, values: Mapping[str, Any], *, replace: bool, limit: int
    ) -> bool:
        """Write a connection's session; False (nothing written) when the store has no record
        of ``cid`` (closed, never opened, or its node purged; a dead node's connection not
        purged yet is still written, and its session handed to the purger).

        ``replace=True``: the session becomes exactly ``values``. ``replace=False``: each key
        of ``values`` is set, or deleted when its value is None; other keys stay. Keys are
        non-empty str of up to 128 characters, values anything ``msgspec.json`` encodes
        (read back as their JSON decoding), else ``ProtocolError(BAD_REQUEST)``. When the
        resulting session would exceed ``limit`` bytes: ``ProtocolError(TOO_LARGE)``, and
        nothing is written. ``node_id``: the node holding ``cid`` if known, else
        ``node_of_client(cid)``; it only orders the write after that node's earlier writes
        from this instance and names the node to resync if the write fails. The checks on
        ``values`` alone (BAD_REQUEST; TOO_LARGE when they exceed ``limit`` by themselves)
        come before the record is looked up."""
        ...

    async def get_session(self, cid: str) -> dict[str, Any] | None:
        """A connection's session (maybe empty); None when the store has no record of
        ``cid`` or its node (``node_of_client``) is not alive."""
        ...

    # --- reads (dead nodes filtered out) ---------------------------------------------
    async def is_online(self, uid: str) -> bool: ...

    async def client_ids(self, uid: str) -> list[str]: ...

    async def group_members(self, group: str) -> GroupInfo: ...

    async def nodes(self) -> list[NodeInfo]:
        """Live nodes with the stats of their last heartbeat."""
        ...

    # --- the cluster's history rules (a namespace-wide value, no TTL) -----------------
    async def history_rules(self) -> list[str] | None:
        """The rules the nodes last wrote (a list of ``--history`` texts, maybe empty: none),
        or None when the store holds none (never written, or the store restarted empty)."""
        ...

    async def set_history_rules(self, specs: Sequence[str]) -> list[str] | None:
        """Replace the cluster's rules (the last writer wins); returns the previous ones."""
        ...


def encode_session(
    values: Mapping[str, Any], *, replace: bool, limit: int
) -> tuple[dict[str, str], list[str]]:
    """Check a ``set_session`` call: (key -> JSON text to store, keys to delete).

    Raises TOO_LARGE already when the keys to store alone exceed ``limit``."""
    store: dict[str, str] = {}
    delete: list[str] = []
    size = 0
    for key, value in values.items():
        if not isinstance(key, str) or not 0 < len(key) <= SESSION_KEY_MAX:
            raise bad_request(f"session keys are strings of 1 to {SESSION_KEY_MAX} characters")
        try:
            key_size = len(key.encode())
        except UnicodeEncodeError:
            raise bad_request(f"session key {key!r} is not valid Unicode") from None
        if value is None and not replace:
            delete.append(key)
            continue
        try:
            encoded = msgspec.json.encode(value)
        except (TypeError, ValueError, RecursionError, msgspec.MsgspecError) as exc:
            raise bad_request(f"session value of {key!r} is not JSON: {exc}") from None
        size += key_size + len(encoded)
        store[key] = encoded.decode()
    if size > limit:
        raise too_large(limit)
    return store, delete


def decode_session(fields: Mapping[str, str]) -> dict[str, Any]:
    """A session from its stored form (key -> JSON text); a value that is not JSON (written
    by something else than ``set_session``) is left out rather than failing a purge."""
    out: dict[str, Any] = {}
    for key, value in fields.items():
        try:
            out[key] = msgspec.json.decode(value)
        except msgspec.DecodeError:
            log.warning("session key %r of a connection is not JSON: left out", key)
    return out


def session_size(fields: Mapping[str, str]) -> int:
    """The size a session counts against its limit: UTF-8 bytes of keys and JSON values."""
    return sum(len(k.encode()) + len(v.encode()) for k, v in fields.items())


def too_large(limit: int) -> ProtocolError:
    return ProtocolError(Code.TOO_LARGE, f"session larger than {limit} bytes")


async def renewing(work: Awaitable[None], renew: Callable[[], Awaitable[bool]],
                   every: float) -> None:
    """Await ``work`` (a purge batch's handlers, which may take long) while renewing a lease
    every ``every`` seconds. Renewal stops once ``renew`` says False (the lease is lost: the
    purge stops at its next step) and skips failures (the lease may run out: at worst the
    batch is handed out again); ``work`` is never cancelled for it."""
    task = asyncio.ensure_future(work)
    try:
        held = True
        while True:
            done, _ = await asyncio.wait([task], timeout=every if held else None)
            if done:
                return task.result()
            try:
                held = await renew()
            except Exception as exc:
                log.debug("lease renewal failed: %r", exc)
    finally:
        if not task.done():  # we are cancelled: so is the work
            task.cancel()
