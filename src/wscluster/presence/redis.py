"""Redis presence (Redis or Valkey: one primary, or Sentinel; not Redis Cluster).

Data model, every key built by ``wscluster.naming.Names``: ``nodes`` zset of known node
ids; ``alive:<node>`` the node's stats JSON with a PX TTL, set by each heartbeat (a node is
alive while it exists: the server's clock decides, machines' clocks need not agree);
``nc:<node>`` hash cid -> uid ('' when none), the index of a node's connections;
``conn:<cid>`` hash with field ``uid``, a field ``g:<group>`` per joined group and a field
``s:<key>`` (its JSON text) per session key; ``uid:<uid>`` set of cids; ``grp:<group>``
hash cid -> uid. The session lives in the conn hash, so whatever deletes the connection
deletes its session, and a session write (a Lua check-and-set, in the writer's queue) only
ever writes into an existing hash: no session key can outlive its connection.

Guarantees:

- An instance's writes go through one queue to one connection. A writer task sends all
  that is queued as Lua script calls of up to 5,000 commands (one pipeline, one round trip,
  each call atomic), so writes apply in call order and thousands cost a few round trips. A
  write returns once applied, or raises ``PresenceUnavailable`` when the server is
  unreachable or silent for ``timeout`` s. A failed write (or one whose caller gave up)
  makes its node's next ``heartbeat`` return False, so that the node ``resync``-s.
- Readers drop every connection whose node (from its cid) has no alive key: a killed node
  vanishes from every answer when its TTL runs out, purged or not.
- ``purge_dead`` claims a dead node with a lease, in a script that first checks it is still
  dead and moves it from ``nodes`` to ``purging``: one caller holds it, however many try,
  and renews it while it purges. It reads the connections a batch at a time, hands each
  batch out, then removes it with a script that does nothing once the node is alive again
  (a paused node that comes back is told by its heartbeat to ``resync``). A purge whose
  lease expired is taken over from ``purging``: see ``presence.redis_purge``.
- ``resync`` rewrites only the uid and g: fields of the connections it keeps, never their
  s: fields. A failed session write is not repaired by a resync: its caller must retry.
- A connection enters its node's index first and leaves it last, so whatever a crash
  leaves behind stays reachable from ``nc:<node>``, and a purge that stops halfway is
  resumed from it.

Limits: one writer instance per node id (it keeps each connection's uid and groups). A
group is read with one HGETALL, a uid with one SMEMBERS, then one MGET of alive keys: fine
for groups of tens of thousands, not millions. Scripts and MGET span several nodes' keys.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ResponseError

from wscluster.errors import PresenceUnavailable
from wscluster.naming import Names, node_of_client
from wscluster.presence.base import (
    PURGE_LEASE,
    ConnInfo,
    DeadNode,
    GroupInfo,
    NodeInfo,
    OnBatch,
    decode_session,
    encode_session,
    too_large,
)
from wscluster.presence.redis_purge import Purger
from wscluster.presence.redis_writer import (
    ERRORS,
    HGETALLS,
    SCRIPT_CMDS,
    BatchWriter,
    Cmd,
    apply,
    execute,
    unavailable,
)

log = logging.getLogger("wscluster.presence")
READ_CONNECTIONS = 16  # concurrent presence reads per process; more wait for a free one

_UID = "uid"  # conn hash field: the uid ('' when none)
_G = "g:"  # conn hash field prefix: one field per joined group
_S = "s:"  # conn hash field prefix: one field per session key, holding its JSON text


_NO_GROUPS: frozenset[str] = frozenset()


@dataclass(slots=True)
class _Local:
    uid: str | None
    groups: set[str] | frozenset[str] = _NO_GROUPS  # shared while empty (~200 B/connection)

    def add(self, group: str) -> None:
        if isinstance(self.groups, set):
            self.groups.add(group)
        else:
            self.groups = {group}


class RedisPresence:
    """The ``Presence`` role on a Redis-compatible server."""

    def __init__(self, url: str, names: Names, *, timeout: float = 5.0) -> None:
        self.url = url
        self.names = names
        self.timeout = timeout
        self._writer = BatchWriter(timeout)  # all writes, in call order
        self._r: Redis | None = None  # readers and purge
        self._local: dict[str, dict[str, _Local]] = {}  # node -> cid -> uid and groups
        self._purger = Purger(names, timeout, _conn_info, self._purge_cmds)

    def _client(self, socket_timeout: float | None, connections: int) -> Redis:
        # A blocking pool: a burst of reads waits for a free connection (up to the timeout)
        # instead of failing with "too many connections".
        pool = BlockingConnectionPool.from_url(
            self.url, decode_responses=True, socket_timeout=socket_timeout,
            socket_connect_timeout=self.timeout, retry=Retry(NoBackoff(), 0),
            max_connections=connections, timeout=self.timeout,
        )
        return Redis.from_pool(pool)  # the client owns the pool: aclose() closes it

    async def start(self) -> None:
        if not self._writer.started:
            # the writer bounds a pipeline as a whole (cheaper than a timeout per reply); a
            # cancelled read closes its connection, it never desyncs it
            self._r = self._client(self.timeout, READ_CONNECTIONS)
            self._writer.start(self._client(None, 2))

    async def close(self) -> None:
        await self._writer.close()
        if self._r is not None:
            await self._r.aclose()
        self._r = None

    # --- command builders -------------------------------------------------------------
    def _heartbeat_cmd(self, node_id: str, ttl: float, stats: dict[str, Any]) -> Cmd:
        n, ttl_ms = self.names, max(1, round(ttl * 1000))
        stats_json = json.dumps(stats, separators=(",", ":"))
        return ("HB", n.alive_key(node_id), n.nodes_key(), node_id, str(ttl_ms), stats_json,
                repr(time.time()))

    def _add_cmds(self, node_id: str, conn: ConnInfo) -> list[Cmd]:
        n, cid, u = self.names, conn.client_id, conn.uid or ""
        fields: list[str] = [_UID, u]
        for group in conn.groups:
            fields += [_G + group, ""]
        # Lua's unpack() takes < 8000 values: a connection in thousands of groups takes
        # several HSETs
        cmds: list[Cmd] = [("HSET", n.node_conns_key(node_id), cid, u)]
        cmds += [("HSET", n.conn_key(cid), *fields[i : i + 2000])
                 for i in range(0, len(fields), 2000)]
        if conn.uid:
            cmds.append(("SADD", n.uid_key(conn.uid), cid))
        return cmds + [("HSET", n.group_key(g), cid, u) for g in conn.groups]

    def _remove_cmds(self, node_id: str, cid: str, uids: Iterable[str | None],
                     groups: Iterable[str]) -> list[Cmd]:
        n = self.names
        cmds: list[Cmd] = [("SREM", n.uid_key(u), cid) for u in set(uids) if u]
        cmds += [("HDEL", n.group_key(g), cid) for g in set(groups)]
        return [*cmds, ("DEL", n.conn_key(cid)), ("HDEL", n.node_conns_key(node_id), cid)]

    def _purge_cmds(self, node_id: str, conn: ConnInfo) -> list[Cmd]:
        return self._remove_cmds(node_id, conn.client_id, [conn.uid], conn.groups)

    # --- writes -----------------------------------------------------------------------
    async def add(self, node_id: str, conn: ConnInfo) -> None:
        self._local.setdefault(node_id, {})[conn.client_id] = _Local(conn.uid, _groups(conn.groups))
        await self._writer.submit(node_id, self._add_cmds(node_id, conn))

    async def bind(self, node_id: str, cid: str, old_uid: str | None, uid: str | None) -> None:
        n, u = self.names, uid or ""
        loc = self._local.setdefault(node_id, {}).setdefault(cid, _Local(old_uid))
        cmds: list[Cmd] = [("HSET", n.node_conns_key(node_id), cid, u),
                           ("HSET", n.conn_key(cid), _UID, u)]
        cmds += [("SREM", n.uid_key(x), cid) for x in {old_uid, loc.uid} if x and x != uid]
        if uid:
            cmds.append(("SADD", n.uid_key(uid), cid))
        cmds += [("HSET", n.group_key(g), cid, u) for g in loc.groups]
        loc.uid = uid
        await self._writer.submit(node_id, cmds)

    async def join(self, node_id: str, cid: str, uid: str | None, group: str) -> None:
        n, u = self.names, uid or ""
        self._local.setdefault(node_id, {}).setdefault(cid, _Local(uid)).add(group)
        await self._writer.submit(node_id, [("HSET", n.node_conns_key(node_id), cid, u),
                                    ("HSET", n.conn_key(cid), _UID, u, _G + group, ""),
                                    ("HSET", n.group_key(group), cid, u)])

    async def leave(self, node_id: str, cid: str, group: str) -> None:
        n = self.names
        loc = self._local.get(node_id, {}).get(cid)
        if loc is not None and isinstance(loc.groups, set):
            loc.groups.discard(group)
        await self._writer.submit(node_id, [("HDEL", n.group_key(group), cid),
                                    ("HDEL", n.conn_key(cid), _G + group)])

    async def remove(self, node_id: str, cid: str, uid: str | None,
                     groups: Iterable[str]) -> None:
        loc = self._local.get(node_id, {}).pop(cid, None) or _Local(None)
        cmds = self._remove_cmds(node_id, cid, (uid, loc.uid), loc.groups.union(groups))
        await self._writer.submit(node_id, cmds)

    async def heartbeat(self, node_id: str, ttl: float, stats: dict[str, Any]) -> bool:
        replies = await self._writer.submit(node_id, [self._heartbeat_cmd(node_id, ttl, stats)])
        return bool(replies[0]) and node_id not in self._writer.dirty

    async def resync(self, node_id: str, conns: Sequence[ConnInfo], ttl: float,
                     stats: dict[str, Any]) -> None:
        async def run(seq: int) -> None:
            w = self._writer.client
            assert w is not None
            n, new = self.names, {c.client_id: c for c in conns}
            # alive first: a purger's guarded scripts leave this node alone from here on
            cmds = [self._heartbeat_cmd(node_id, ttl, stats)]
            for old in await self._read_node(w, node_id):
                cid, cur = old.client_id, new.get(old.client_id)
                if cur is None:
                    cmds += self._remove_cmds(node_id, cid, [old.uid], old.groups)
                    continue
                if old.uid and old.uid != cur.uid:
                    cmds.append(("SREM", n.uid_key(old.uid), cid))
                for g in set(old.groups).difference(cur.groups):
                    cmds += [("HDEL", n.group_key(g), cid), ("HDEL", n.conn_key(cid), _G + g)]
            for conn in conns:
                cmds += self._add_cmds(node_id, conn)
            replies = await apply(w, cmds, self.timeout)
            if replies and (error := next((r for r in replies if isinstance(r, str)), None)):
                raise ResponseError(error)
            if self._writer.dirty.get(node_id, seq) < seq:  # later failures still need a resync
                del self._writer.dirty[node_id]
            log.info("resynced node %s: %d connections", node_id, len(conns))

        # the local copy changes in call order, like the queue
        self._local[node_id] = {c.client_id: _Local(c.uid, _groups(c.groups)) for c in conns}
        await self._writer.submit(node_id, run=run, size=len(conns))

    async def remove_node(self, node_id: str) -> None:
        async def run(seq: int) -> None:
            w = self._writer.client
            assert w is not None
            n = self.names
            await execute(w, [("DEL", n.alive_key(node_id)), ("ZREM", n.nodes_key(), node_id)],
                          self.timeout)
            await self._drop_node(w, node_id)
            if self._writer.dirty.get(node_id, seq) < seq:
                del self._writer.dirty[node_id]

        size = len(self._local.pop(node_id, ()))
        await self._writer.submit(node_id, run=run, size=size)

    async def set_session(
        self, node_id: str, cid: str, values: Mapping[str, Any], *, replace: bool, limit: int
    ) -> bool:
        store, delete = encode_session(values, replace=replace, limit=limit)
        args = [str(len(store))]
        for key, value in store.items():
            args += [_S + key, value]
        args += [_S + key for key in delete]
        cmd = ("SESS", self.names.conn_key(cid), "1" if replace else "0", str(limit), *args)
        (result,) = await self._writer.submit(node_id, [cmd])
        if result == -1:
            raise too_large(limit)
        return bool(result == 1)

    # --- purge ------------------------------------------------------------------------
    async def _read_node(self, client: Redis, node_id: str) -> list[ConnInfo]:
        """The connections the store holds for ``node_id``."""
        key = self.names.node_conns_key(node_id)
        (index,) = await execute(client, [("HGETALL", key)], self.timeout)
        cids = sorted(index)
        calls = [
            ("EVAL", HGETALLS, len(chunk), *chunk)
            for chunk in ([self.names.conn_key(c) for c in cids[i : i + SCRIPT_CMDS]]
                          for i in range(0, len(cids), SCRIPT_CMDS))
        ]
        flat = [h for reply in await execute(client, calls, self.timeout) for h in reply]
        return [_conn_info(cid, dict(zip(h[::2], h[1::2], strict=True)), index[cid])
                for cid, h in zip(cids, flat, strict=True)]  # fmt: skip

    async def _drop_node(self, client: Redis, node_id: str) -> None:
        """Remove a node's connections (none if it came back alive meanwhile)."""
        conns = await self._read_node(client, node_id)
        cmds = [cmd for c in conns for cmd in self._purge_cmds(node_id, c)]
        await apply(client, cmds, self.timeout, guard=self.names.alive_key(node_id))

    async def purge_dead(
        self, on_batch: OnBatch | None = None, *, lease: float = PURGE_LEASE
    ) -> list[DeadNode]:
        if self._r is None:
            raise PresenceUnavailable("RedisPresence is not started")
        try:
            out = await self._purger.run(self._r, on_batch, lease)
        except ERRORS as exc:  # the lease stays: this or another caller resumes the purge
            raise unavailable(exc) from exc
        for dead in out:
            log.info("purged dead node %s (%d connections)", dead.node_id, len(dead.connections))
        return out

    # --- reads ------------------------------------------------------------------------
    async def _query(self, *cmds: Cmd) -> list[Any]:
        if self._r is None:
            raise PresenceUnavailable("RedisPresence is not started")
        try:
            return await execute(self._r, cmds, self.timeout)
        except ERRORS as exc:
            raise unavailable(exc) from exc

    async def _live_nodes(self, node_ids: Iterable[str | None]) -> dict[str, Any]:
        """The alive ones of ``node_ids``, with their stats JSON."""
        ids = sorted({x for x in node_ids if x})
        if not ids:
            return {}
        values = (await self._query(("MGET", *map(self.names.alive_key, ids))))[0]
        return {x: v for x, v in zip(ids, values, strict=True) if v is not None}

    async def _live(self, cids: Iterable[str]) -> list[str]:
        cids = list(cids)
        live = await self._live_nodes(map(node_of_client, cids))
        return [c for c in cids if node_of_client(c) in live]

    async def get_session(self, cid: str) -> dict[str, Any] | None:
        node = node_of_client(cid)
        if node is None:
            return None
        fields, alive = await self._query(("HGETALL", self.names.conn_key(cid)),
                                          ("EXISTS", self.names.alive_key(node)))
        return _session(fields) if fields and alive else None

    async def is_online(self, uid: str) -> bool:
        return bool(await self.client_ids(uid))

    async def client_ids(self, uid: str) -> list[str]:
        (cids,) = await self._query(("SMEMBERS", self.names.uid_key(uid)))
        return sorted(await self._live(cids))

    async def group_members(self, group: str) -> GroupInfo:
        members: dict[str, str] = (await self._query(("HGETALL", self.names.group_key(group))))[0]
        live = await self._live(members)
        return GroupInfo(sorted({members[c] for c in live if members[c]}), len(live))

    async def nodes(self) -> list[NodeInfo]:
        (members,) = await self._query(("ZRANGE", self.names.nodes_key(), 0, -1))
        live = await self._live_nodes(members)
        return [NodeInfo(x, json.loads(v)) for x, v in sorted(live.items())]

    async def history_rules(self) -> list[str] | None:
        (raw,) = await self._query(("GET", self.names.history_rules_key()))
        return _rules(raw)

    async def set_history_rules(self, specs: Sequence[str]) -> list[str] | None:
        value = json.dumps(list(specs))
        (old,) = await self._query(("GETSET", self.names.history_rules_key(), value))
        return _rules(old)


def _rules(raw: str | None) -> list[str] | None:
    """Stored rules (a JSON list of strings); something else there counts as none stored."""
    try:
        value = json.loads(raw) if raw is not None else None
    except ValueError:
        return None
    ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    return value if ok else None


def _conn_info(cid: str, fields: dict[str, str], index_uid: str) -> ConnInfo:
    """A connection from its conn hash (and its uid in the node's index, for a hash that a
    crash left without it)."""
    groups = sorted(f[2:] for f in fields if f.startswith(_G))
    return ConnInfo(cid, fields.get(_UID, index_uid) or None, groups, _session(fields))


def _session(fields: dict[str, str]) -> dict[str, Any]:
    """The session held in a conn hash's fields."""
    return decode_session({f[2:]: v for f, v in fields.items() if f.startswith(_S)})


def _groups(groups: Iterable[str]) -> set[str] | frozenset[str]:
    return set(groups) or _NO_GROUPS
