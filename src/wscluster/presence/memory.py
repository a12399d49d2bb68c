"""In-process presence: for tests, the embedded demo and single-process clusters.

``MemoryPresence(names, hub)`` instances created with the same ``hub`` and namespace share
one store, so several nodes living in one process see each other; different hubs or
namespaces are isolated.

Guarantees: every write is applied synchronously when its coroutine first runs, so writes
are applied in call order (tasks start in creation order) and are visible to every instance
of the hub as soon as they return. Liveness uses ``time.monotonic()`` deadlines: a node is
alive from its heartbeat until ``ttl`` seconds later; readers never report the connections
of a node that is not alive (or never heartbeated), purged or not. ``purge_dead`` claims
a node with a lease (a deadline and the instance's token) without awaiting, so one caller
at a time holds it; a caller whose ``on_batch`` fails or is cancelled leaves the lease to
expire, and the purge to the next caller (as a purger that died would in Redis).

Sessions are stored as JSON text, like in Redis, so that what is read back is the JSON
decoding of what was written, and the size limit counts the same bytes.

Limits: the state lives and dies with the process; nothing is shared between processes.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from wscluster.naming import Names, node_of_client
from wscluster.presence.base import (
    PURGE_BATCH,
    PURGE_LEASE,
    ConnInfo,
    DeadNode,
    GroupInfo,
    NodeInfo,
    OnBatch,
    decode_session,
    encode_session,
    renewing,
    session_size,
    too_large,
)

log = logging.getLogger("wscluster.presence")


@dataclass(slots=True)
class _Conn:
    uid: str | None
    groups: set[str] = field(default_factory=set)
    session: dict[str, str] = field(default_factory=dict)  # key -> JSON text


@dataclass(slots=True)
class _Node:
    deadline: float
    stats: dict[str, Any]


@dataclass(slots=True)
class _Lease:
    owner: str  # the purging instance's token
    deadline: float


@dataclass(slots=True)
class _State:
    nodes: dict[str, _Node] = field(default_factory=dict)  # "known" nodes (heartbeated)
    purging: dict[str, _Lease] = field(default_factory=dict)  # dead nodes being purged
    conns: dict[str, dict[str, _Conn]] = field(default_factory=dict)  # node -> cid -> conn
    uids: dict[str, set[str]] = field(default_factory=dict)  # uid -> cids
    groups: dict[str, dict[str, str | None]] = field(default_factory=dict)  # group -> cid -> uid
    rules: list[str] | None = None  # the cluster's history rules


_HUBS: dict[tuple[str, str], _State] = {}


class MemoryPresence:
    """The ``Presence`` role in process memory, shared by instances of the same hub."""

    def __init__(self, names: Names, hub: str = "default", *, timeout: float = 5.0) -> None:
        """``timeout`` is accepted, and unused, so that any presence takes the same options."""
        self.names = names
        self.hub = hub
        self._key = (hub, names.ns)
        self._token = os.urandom(8).hex()
        self._mine: set[str] = set()  # nodes this instance is purging now

    @property
    def _s(self) -> _State:
        state = _HUBS.get(self._key)
        if state is None:
            state = _HUBS[self._key] = _State()
        return state

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def flush(self) -> None:
        """Forget everything this hub holds for the namespace (as a store restarted empty)."""
        _HUBS.pop(self._key, None)

    # --- helpers ----------------------------------------------------------------------
    def _conn(self, node_id: str, cid: str, uid: str | None) -> _Conn:
        node = self._s.conns.setdefault(node_id, {})
        conn = node.get(cid)
        if conn is None:
            conn = node[cid] = _Conn(uid)
        return conn

    def _set_uid(self, cid: str, old: str | None, new: str | None) -> None:
        s = self._s
        if old is not None and old != new:
            cids = s.uids.get(old)
            if cids is not None:
                cids.discard(cid)
                if not cids:
                    del s.uids[old]
        if new is not None:
            s.uids.setdefault(new, set()).add(cid)

    def _leave(self, cid: str, group: str) -> None:
        members = self._s.groups.get(group)
        if members is not None:
            members.pop(cid, None)
            if not members:
                del self._s.groups[group]

    def _drop(self, node_id: str, cid: str, uid: str | None, groups: Iterable[str]) -> None:
        conn = self._s.conns.get(node_id, {}).pop(cid, None)
        all_groups = set(groups)
        if conn is not None:
            all_groups |= conn.groups
            self._set_uid(cid, conn.uid, None)
        self._set_uid(cid, uid, None)
        for group in all_groups:
            self._leave(cid, group)

    def _drop_node(self, node_id: str) -> None:
        s = self._s
        s.nodes.pop(node_id, None)
        for cid, conn in s.conns.pop(node_id, {}).items():
            self._set_uid(cid, conn.uid, None)
            for group in conn.groups:
                self._leave(cid, group)

    def _find(self, node_id: str, cid: str) -> _Conn | None:
        """The record of ``cid``, whichever node it was added to (Redis keys it by cid)."""
        conns = self._s.conns
        for node in (node_id, node_of_client(cid)):
            conn = conns.get(node or "", {}).get(cid)
            if conn is not None:
                return conn
        return next((n[cid] for n in conns.values() if cid in n), None)

    def _live(self) -> set[str]:
        now = time.monotonic()
        return {n for n, info in self._s.nodes.items() if info.deadline > now}

    # --- writes -----------------------------------------------------------------------
    async def add(self, node_id: str, conn: ConnInfo) -> None:
        c = self._conn(node_id, conn.client_id, conn.uid)
        self._set_uid(conn.client_id, c.uid, conn.uid)
        c.uid = conn.uid
        for group in conn.groups:
            c.groups.add(group)
            self._s.groups.setdefault(group, {})[conn.client_id] = conn.uid

    async def bind(self, node_id: str, cid: str, old_uid: str | None, uid: str | None) -> None:
        c = self._conn(node_id, cid, uid)
        if c.uid != old_uid:
            self._set_uid(cid, old_uid, None)
        self._set_uid(cid, c.uid, uid)
        c.uid = uid
        for group in c.groups:
            self._s.groups.setdefault(group, {})[cid] = uid

    async def join(self, node_id: str, cid: str, uid: str | None, group: str) -> None:
        c = self._conn(node_id, cid, uid)
        c.groups.add(group)
        self._s.groups.setdefault(group, {})[cid] = uid

    async def leave(self, node_id: str, cid: str, group: str) -> None:
        conn = self._s.conns.get(node_id, {}).get(cid)
        if conn is not None:
            conn.groups.discard(group)
        self._leave(cid, group)

    async def remove(
        self, node_id: str, cid: str, uid: str | None, groups: Iterable[str]
    ) -> None:
        self._drop(node_id, cid, uid, groups)

    async def heartbeat(self, node_id: str, ttl: float, stats: dict[str, Any]) -> bool:
        known = node_id in self._s.nodes
        self._s.nodes[node_id] = _Node(time.monotonic() + ttl, dict(stats))
        return known

    async def resync(
        self, node_id: str, conns: Sequence[ConnInfo], ttl: float, stats: dict[str, Any]
    ) -> None:
        old = self._s.conns.get(node_id, {})
        sessions = {cid: old[cid].session for cid in {c.client_id for c in conns} if cid in old}
        self._drop_node(node_id)
        self._s.nodes[node_id] = _Node(time.monotonic() + ttl, dict(stats))
        for conn in conns:
            await self.add(node_id, conn)
        for cid, session in sessions.items():  # kept connections keep their session
            self._s.conns[node_id][cid].session = session

    async def remove_node(self, node_id: str) -> None:
        self._drop_node(node_id)

    async def purge_dead(
        self, on_batch: OnBatch | None = None, *, lease: float = PURGE_LEASE
    ) -> list[DeadNode]:
        s, live = self._s, self._live()
        dead = sorted(set(s.nodes).union(s.purging).difference(live, self._mine))
        out = []
        for node_id in dead:
            if not self._claim(node_id, lease):
                continue
            self._mine.add(node_id)
            try:
                done = await self._purge(node_id, on_batch, lease)
            finally:
                self._mine.discard(node_id)
            if done is not None:
                log.info("purged dead node %s (%d connections)", node_id, len(done.connections))
                out.append(done)
        return out

    def _claim(self, node_id: str, lease: float) -> bool:
        """Claim, take over or renew the purge of a dead node (what Redis's CLAIM does)."""
        s, now = self._s, time.monotonic()
        if node_id in self._live():  # back: the rest of its entries are its own again
            s.purging.pop(node_id, None)
            return False
        cur = s.purging.get(node_id)
        if cur is not None and cur.owner != self._token and cur.deadline > now:
            return False
        # off the known nodes: should it come back, its heartbeat says it was forgotten
        if s.nodes.pop(node_id, None) is None and cur is None:
            return False
        s.purging[node_id] = _Lease(self._token, now + lease)
        return True

    async def _purge(self, node_id: str, on_batch: OnBatch | None,
                     lease: float) -> DeadNode | None:
        s, handed = self._s, []

        async def renew() -> bool:
            return self._claim(node_id, lease)

        while True:
            cids = sorted(s.conns.get(node_id, {}))
            for start in range(0, len(cids), PURGE_BATCH):
                if not self._claim(node_id, lease):  # back alive, or taken over
                    return None
                conns = s.conns.get(node_id, {})
                batch = [ConnInfo(cid, c.uid, sorted(c.groups), decode_session(c.session))
                         for cid in cids[start : start + PURGE_BATCH]
                         if (c := conns.get(cid)) is not None]  # fmt: skip
                if on_batch is not None and batch:
                    await renewing(on_batch(node_id, batch), renew, lease / 3)
                if node_id in self._live():
                    s.purging.pop(node_id, None)
                    return None
                for info in batch:
                    self._drop(node_id, info.client_id, info.uid, info.groups)
                handed += batch
            if not self._claim(node_id, lease):
                return None
            if not s.conns.get(node_id):
                s.conns.pop(node_id, None)
                del s.purging[node_id]
                return DeadNode(node_id, handed)

    async def set_session(
        self, node_id: str, cid: str, values: Mapping[str, Any], *, replace: bool, limit: int
    ) -> bool:
        store, delete = encode_session(values, replace=replace, limit=limit)
        conn = self._find(node_id, cid)
        if conn is None:
            return False
        gone = set(delete)
        new = {} if replace else {k: v for k, v in conn.session.items() if k not in gone}
        new.update(store)
        if session_size(new) > limit:
            raise too_large(limit)
        conn.session = new
        return True

    # --- reads ------------------------------------------------------------------------
    async def get_session(self, cid: str) -> dict[str, Any] | None:
        node = node_of_client(cid)
        conn = self._find(node or "", cid) if node in self._live() else None
        return None if conn is None else decode_session(conn.session)

    async def is_online(self, uid: str) -> bool:
        return bool(await self.client_ids(uid))

    async def client_ids(self, uid: str) -> list[str]:
        live = self._live()
        return sorted(c for c in self._s.uids.get(uid, ()) if node_of_client(c) in live)

    async def group_members(self, group: str) -> GroupInfo:
        live = self._live()
        members = [
            (cid, uid)
            for cid, uid in self._s.groups.get(group, {}).items()
            if node_of_client(cid) in live
        ]
        uids = sorted({uid for _, uid in members if uid is not None})
        return GroupInfo(uids, len(members))

    async def nodes(self) -> list[NodeInfo]:
        live = self._live()
        s = self._s
        return [NodeInfo(n, dict(s.nodes[n].stats)) for n in sorted(live)]

    async def history_rules(self) -> list[str] | None:
        rules = self._s.rules
        return None if rules is None else list(rules)

    async def set_history_rules(self, specs: Sequence[str]) -> list[str] | None:
        old, self._s.rules = self._s.rules, list(specs)
        return old
