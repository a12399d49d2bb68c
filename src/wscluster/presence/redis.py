"""Redis presence (any Redis-compatible server: Redis, Valkey, one primary or Sentinel).

Data model (every key built by ``wscluster.naming.Names``):

- ``nodes`` zset: known node ids; ``alive:<node>``: the node's stats JSON with a PX TTL, set
  by every heartbeat. A node is alive while that key exists, so the server's clock decides
  and machines' clocks never need to agree.
- ``nc:<node>`` hash cid -> uid ('' when none): the index of the node's connections.
- ``conn:<cid>`` hash: field ``uid``, and one field ``g:<group>`` per joined group.
- ``uid:<uid>`` set of cids; ``grp:<group>`` hash cid -> uid ('' when none).

Guarantees:

- The writes of one instance go through one queue and one connection; a writer task sends
  whatever is queued as one pipeline, so writes apply in call order and thousands of them
  cost a few round trips. Each write returns when applied, or raises
  ``PresenceUnavailable`` when the server is unreachable or silent for ``timeout`` seconds.
  A write that failed (or whose caller gave up) leaves the node "dirty": its next
  ``heartbeat`` returns False, so the node ``resync``-s the store with its registry.
- Readers drop every connection whose node (taken from the cid) has no alive key: a killed
  node disappears from every answer as soon as its TTL runs out, purged or not.
- ``purge_dead`` claims a dead node with ZREM (in a script that first checks that the node
  is still dead): one caller wins, however many run it. The winner reads the node's
  connections and removes them in guarded script chunks, which do nothing once the node
  is alive again (a node that was only paused comes back through ``resync``).
- A connection is written to its node's index first and removed from it last, so whatever
  a crash leaves behind stays reachable from ``nc:<node>``. If a purger dies after its
  claim, the node's leftovers are filtered out by readers and never reported again (they
  only use memory); ``resync`` of a live node clears whatever its index holds.

Limits: one writer instance per node id (it keeps a local copy of each connection's uid
and groups). A group is read with one HGETALL and a uid with one SMEMBERS, plus one MGET
of the alive keys: fine for groups of tens of thousands, not for millions. MGET spans
nodes' keys, so Redis Cluster is not supported (use one primary per cluster namespace).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from wscluster.errors import PresenceUnavailable
from wscluster.naming import Names, node_of_client
from wscluster.presence.base import ConnInfo, DeadNode, GroupInfo, NodeInfo

log = logging.getLogger("wscluster.presence")

_UID = "uid"  # conn hash field: the uid ('' when none)
_G = "g:"  # conn hash field prefix: one field per joined group
_MAX_PIPELINE = 10_000  # commands per pipeline
_CHUNK = 500  # connections per purge script call
_ERRORS = (RedisError, OSError, TimeoutError)

# KEYS: alive, nodes. ARGV: node id, ttl ms, stats JSON, first-seen score. 1 when known.
_HEARTBEAT = """
local known = redis.call('EXISTS', KEYS[1]) == 1 or redis.call('ZSCORE', KEYS[2], ARGV[1]) ~= false
redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[2])
redis.call('ZADD', KEYS[2], 'NX', ARGV[4], ARGV[1])
if known then return 1 end
return 0
"""
# KEYS: alive, nodes. ARGV: node id. 1 when this caller claimed the dead node.
_CLAIM = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
return redis.call('ZREM', KEYS[2], ARGV[1])
"""
# KEYS: alive, node index, then per connection: [uid set], group hashes..., conn hash.
# ARGV per connection: cid, '1' when it has a uid set key, number of groups.
_DROP = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local k = 3
for i = 1, #ARGV, 3 do
  local cid = ARGV[i]
  if ARGV[i + 1] == '1' then redis.call('SREM', KEYS[k], cid); k = k + 1 end
  for _ = 1, tonumber(ARGV[i + 2]) do redis.call('HDEL', KEYS[k], cid); k = k + 1 end
  redis.call('DEL', KEYS[k]); k = k + 1
  redis.call('HDEL', KEYS[2], cid)
end
return 1
"""

Cmd = tuple[Any, ...]


@dataclass(slots=True)
class _Local:
    uid: str | None
    groups: set[str] = field(default_factory=set)


@dataclass(slots=True, eq=False)
class _Op:
    node_id: str
    fut: asyncio.Future[Any]
    cmds: list[Cmd] = field(default_factory=list)
    run: Callable[[], Awaitable[Any]] | None = None  # exclusive op, run alone in order


class RedisPresence:
    """The ``Presence`` role on a Redis-compatible server."""

    def __init__(self, url: str, names: Names, *, timeout: float = 5.0) -> None:
        self.url = url
        self.names = names
        self.timeout = timeout
        self._w: Redis | None = None  # writer: used by the writer task only
        self._r: Redis | None = None  # readers and purge
        self._task: asyncio.Task[None] | None = None
        self._queue: deque[_Op] = deque()
        self._wake = asyncio.Event()
        self._local: dict[str, dict[str, _Local]] = {}  # node -> cid -> uid and groups
        self._dirty: set[str] = set()

    def _client(self) -> Redis:
        return Redis.from_url(
            self.url,
            decode_responses=True,
            socket_timeout=self.timeout,
            socket_connect_timeout=self.timeout,
            retry=Retry(NoBackoff(), 0),
        )

    async def start(self) -> None:
        if self._task is not None:
            return
        self._w, self._r = self._client(), self._client()
        self._task = asyncio.create_task(self._writer(), name="wscluster-presence-writer")
        try:
            async with asyncio.timeout(self.timeout):
                await self._r.ping()
        except _ERRORS as exc:
            log.warning("presence store %s unreachable at start: %r", self.url, exc)

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        while self._queue:
            op = self._queue.popleft()
            if not op.fut.done():
                op.fut.set_exception(PresenceUnavailable("presence closed"))
        for client in (self._w, self._r):
            if client is not None:
                await client.aclose()
        self._w = self._r = None

    # --- the writer -------------------------------------------------------------------
    async def _submit(self, op: _Op, limit: float | None = None) -> Any:
        if self._task is None:
            raise PresenceUnavailable("RedisPresence is not started")
        self._queue.append(op)
        self._wake.set()
        try:
            return await asyncio.wait_for(op.fut, limit or self.timeout)
        except TimeoutError:
            self._mark_dirty(op.node_id)
            raise PresenceUnavailable("presence store did not answer in time") from None
        except asyncio.CancelledError:
            self._mark_dirty(op.node_id)
            raise

    def _write(self, node_id: str, cmds: list[Cmd]) -> Awaitable[Any]:
        return self._submit(_Op(node_id, asyncio.get_running_loop().create_future(), cmds))

    def _mark_dirty(self, node_id: str) -> None:
        if node_id not in self._dirty:
            log.warning("presence of node %s may be stale: it will resync", node_id)
            self._dirty.add(node_id)

    def _fail(self, op: _Op, exc: Exception) -> None:
        self._mark_dirty(op.node_id)
        if not isinstance(exc, _ERRORS):
            log.error("presence write failed", exc_info=exc)
        if not op.fut.done():
            err = PresenceUnavailable(f"presence store error: {exc!r}")
            err.__cause__ = exc
            op.fut.set_exception(err)

    async def _writer(self) -> None:
        while True:
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            batch: list[_Op] = []
            ncmds = 0
            while self._queue and self._queue[0].run is None and ncmds < _MAX_PIPELINE:
                op = self._queue.popleft()
                if not op.fut.done():  # a caller that gave up: its node is dirty
                    batch.append(op)
                    ncmds += len(op.cmds)
            if batch:
                await self._flush(batch)
            elif self._queue:
                op = self._queue.popleft()
                if op.run is not None and not op.fut.done():
                    try:
                        result = await op.run()
                    except Exception as exc:
                        self._fail(op, exc)
                    else:
                        if not op.fut.done():
                            op.fut.set_result(result)

    async def _flush(self, batch: list[_Op]) -> None:
        assert self._w is not None
        pipe = self._w.pipeline(transaction=False)
        for op in batch:
            for cmd in op.cmds:
                pipe.execute_command(*cmd)
        try:
            async with asyncio.timeout(self.timeout):
                replies = await pipe.execute(raise_on_error=False)
        except Exception as exc:
            log.warning("presence write of %d ops failed: %r", len(batch), exc)
            for op in batch:
                self._fail(op, exc)
            return
        i = 0
        for op in batch:
            mine = replies[i : i + len(op.cmds)]
            i += len(op.cmds)
            error = next((r for r in mine if isinstance(r, Exception)), None)
            if error is not None:
                log.error("presence write refused: %r", error)
                self._fail(op, error)
            elif not op.fut.done():
                op.fut.set_result(mine)

    async def _execute(self, client: Redis, cmds: Sequence[Cmd]) -> list[Any]:
        """Run ``cmds`` in order, in pipelines of bounded size; raise on the first error."""
        out: list[Any] = []
        for start in range(0, len(cmds), _MAX_PIPELINE):
            pipe = client.pipeline(transaction=False)
            for cmd in cmds[start : start + _MAX_PIPELINE]:
                pipe.execute_command(*cmd)
            async with asyncio.timeout(self.timeout):
                out.extend(await pipe.execute())
        return out

    # --- command builders -------------------------------------------------------------
    def _loc(self, node_id: str, cid: str, uid: str | None) -> _Local:
        conns = self._local.setdefault(node_id, {})
        loc = conns.get(cid)
        if loc is None:
            loc = conns[cid] = _Local(uid)
        return loc

    def _heartbeat_cmd(self, node_id: str, ttl: float, stats: dict[str, Any]) -> Cmd:
        n = self.names
        ttl_ms = max(1, round(ttl * 1000))
        stats_json = json.dumps(stats, separators=(",", ":"))
        return ("EVAL", _HEARTBEAT, 2, n.alive_key(node_id), n.nodes_key(), node_id,
                ttl_ms, stats_json, time.time())  # fmt: skip

    def _add_cmds(self, node_id: str, conn: ConnInfo) -> list[Cmd]:
        n, cid, u = self.names, conn.client_id, conn.uid or ""
        fields: list[str] = [_UID, u]
        for group in conn.groups:
            fields += [_G + group, ""]
        cmds: list[Cmd] = [
            ("HSET", n.node_conns_key(node_id), cid, u),
            ("HSET", n.conn_key(cid), *fields),
        ]
        if conn.uid:
            cmds.append(("SADD", n.uid_key(conn.uid), cid))
        cmds += [("HSET", n.group_key(g), cid, u) for g in conn.groups]
        return cmds

    def _remove_cmds(self, node_id: str, cid: str, uids: Iterable[str | None],
                     groups: Iterable[str]) -> list[Cmd]:  # fmt: skip
        n = self.names
        cmds: list[Cmd] = [("SREM", n.uid_key(u), cid) for u in set(uids) if u]
        cmds += [("HDEL", n.group_key(g), cid) for g in set(groups)]
        cmds += [("DEL", n.conn_key(cid)), ("HDEL", n.node_conns_key(node_id), cid)]
        return cmds

    # --- writes -----------------------------------------------------------------------
    async def add(self, node_id: str, conn: ConnInfo) -> None:
        self._local.setdefault(node_id, {})[conn.client_id] = _Local(conn.uid, set(conn.groups))
        await self._write(node_id, self._add_cmds(node_id, conn))

    async def bind(self, node_id: str, cid: str, old_uid: str | None, uid: str | None) -> None:
        n, u = self.names, uid or ""
        loc = self._loc(node_id, cid, old_uid)
        cmds: list[Cmd] = [("HSET", n.node_conns_key(node_id), cid, u),
                           ("HSET", n.conn_key(cid), _UID, u)]  # fmt: skip
        cmds += [("SREM", n.uid_key(x), cid) for x in {old_uid, loc.uid} if x and x != uid]
        if uid:
            cmds.append(("SADD", n.uid_key(uid), cid))
        cmds += [("HSET", n.group_key(g), cid, u) for g in loc.groups]
        loc.uid = uid
        await self._write(node_id, cmds)

    async def join(self, node_id: str, cid: str, uid: str | None, group: str) -> None:
        n, u = self.names, uid or ""
        self._loc(node_id, cid, uid).groups.add(group)
        await self._write(node_id, [
            ("HSET", n.node_conns_key(node_id), cid, u),
            ("HSET", n.conn_key(cid), _UID, u, _G + group, ""),
            ("HSET", n.group_key(group), cid, u),
        ])  # fmt: skip

    async def leave(self, node_id: str, cid: str, group: str) -> None:
        n = self.names
        loc = self._local.get(node_id, {}).get(cid)
        if loc is not None:
            loc.groups.discard(group)
        await self._write(node_id, [("HDEL", n.group_key(group), cid),
                                    ("HDEL", n.conn_key(cid), _G + group)])  # fmt: skip

    async def remove(
        self, node_id: str, cid: str, uid: str | None, groups: Iterable[str]
    ) -> None:
        loc = self._local.get(node_id, {}).pop(cid, None) or _Local(None)
        cmds = self._remove_cmds(node_id, cid, (uid, loc.uid), loc.groups.union(groups))
        await self._write(node_id, cmds)

    async def heartbeat(self, node_id: str, ttl: float, stats: dict[str, Any]) -> bool:
        replies = await self._write(node_id, [self._heartbeat_cmd(node_id, ttl, stats)])
        return bool(replies[0]) and node_id not in self._dirty

    async def resync(
        self, node_id: str, conns: Sequence[ConnInfo], ttl: float, stats: dict[str, Any]
    ) -> None:
        async def run() -> None:
            assert self._w is not None
            new = {c.client_id: c for c in conns}
            # alive first: a purger's guarded chunks stop touching this node from here on
            cmds = [self._heartbeat_cmd(node_id, ttl, stats)]
            for old in await self._read_node(self._w, node_id):
                cur = new.get(old.client_id)
                if cur is None:
                    cmds += self._remove_cmds(node_id, old.client_id, [old.uid], old.groups)
                    continue
                if old.uid and old.uid != cur.uid:
                    cmds.append(("SREM", self.names.uid_key(old.uid), old.client_id))
                for g in set(old.groups).difference(cur.groups):
                    cmds += [("HDEL", self.names.group_key(g), old.client_id),
                             ("HDEL", self.names.conn_key(old.client_id), _G + g)]  # fmt: skip
            for conn in conns:
                cmds += self._add_cmds(node_id, conn)
            await self._execute(self._w, cmds)
            self._local[node_id] = {c.client_id: _Local(c.uid, set(c.groups)) for c in conns}
            self._dirty.discard(node_id)
            log.info("resynced node %s: %d connections", node_id, len(conns))

        fut = asyncio.get_running_loop().create_future()
        await self._submit(_Op(node_id, fut, run=run), self.timeout * (2 + len(conns) / 5000))

    async def remove_node(self, node_id: str) -> None:
        async def run() -> None:
            assert self._w is not None
            n = self.names
            await self._execute(self._w, [("DEL", n.alive_key(node_id)),
                                          ("ZREM", n.nodes_key(), node_id)])  # fmt: skip
            await self._drop_node(self._w, node_id)
            self._local.pop(node_id, None)
            self._dirty.discard(node_id)

        fut = asyncio.get_running_loop().create_future()
        await self._submit(_Op(node_id, fut, run=run), self.timeout * 4)

    # --- purge ------------------------------------------------------------------------
    async def _read_node(self, client: Redis, node_id: str) -> list[ConnInfo]:
        """The connections the store holds for ``node_id``."""
        (index,) = await self._execute(client, [("HGETALL", self.names.node_conns_key(node_id))])
        cids = sorted(index)
        hashes = await self._execute(client, [("HGETALL", self.names.conn_key(c)) for c in cids])
        out = []
        for cid, h in zip(cids, hashes, strict=True):
            uid = h.get(_UID, index[cid]) or None
            out.append(ConnInfo(cid, uid, sorted(f[2:] for f in h if f.startswith(_G))))
        return out

    async def _drop_node(self, client: Redis, node_id: str) -> list[ConnInfo] | None:
        """Remove a non-alive node's connections; None when it came back alive meanwhile."""
        n = self.names
        conns = await self._read_node(client, node_id)
        cmds: list[Cmd] = []
        for start in range(0, len(conns), _CHUNK):
            keys = [n.alive_key(node_id), n.node_conns_key(node_id)]
            args: list[str | int] = []
            for c in conns[start : start + _CHUNK]:
                keys += [n.uid_key(c.uid)] if c.uid else []
                keys += [n.group_key(g) for g in c.groups] + [n.conn_key(c.client_id)]
                args += [c.client_id, "1" if c.uid else "0", len(c.groups)]
            cmds.append(("EVAL", _DROP, len(keys), *keys, *args))
        if all(await self._execute(client, cmds)):
            return conns
        log.warning("node %s came back alive while being purged: left to its resync", node_id)
        return None

    async def purge_dead(self) -> list[DeadNode]:
        client, n = self._reader(), self.names
        try:
            (members,) = await self._execute(client, [("ZRANGE", n.nodes_key(), 0, -1)])
            dead = [m for m, alive in zip(members, await self._alive(members), strict=True)
                    if not alive]  # fmt: skip
            claims = await self._execute(client, [
                ("EVAL", _CLAIM, 2, n.alive_key(d), n.nodes_key(), d) for d in dead
            ])  # fmt: skip
            out = []
            for node_id in (d for d, won in zip(dead, claims, strict=True) if won):
                conns = await self._drop_node(client, node_id)
                if conns is not None:
                    log.info("purged dead node %s (%d connections)", node_id, len(conns))
                    out.append(DeadNode(node_id, conns))
            return out
        except _ERRORS as exc:
            raise PresenceUnavailable(f"presence store error: {exc!r}") from exc

    # --- reads ------------------------------------------------------------------------
    def _reader(self) -> Redis:
        if self._r is None:
            raise PresenceUnavailable("RedisPresence is not started")
        return self._r

    async def _alive(self, node_ids: Sequence[str]) -> list[bool]:
        if not node_ids:
            return []
        (values,) = await self._execute(
            self._reader(), [("MGET", *(self.names.alive_key(x) for x in node_ids))]
        )
        return [v is not None for v in values]

    async def _read(self, cmd: Cmd) -> Any:
        try:
            (reply,) = await self._execute(self._reader(), [cmd])
        except _ERRORS as exc:
            raise PresenceUnavailable(f"presence store error: {exc!r}") from exc
        return reply

    async def _live_filter(self, cids: Iterable[str]) -> list[str]:
        cids = list(cids)
        node_ids = sorted({x for x in map(node_of_client, cids) if x})
        try:
            live = {x for x, ok in zip(node_ids, await self._alive(node_ids), strict=True) if ok}
        except _ERRORS as exc:
            raise PresenceUnavailable(f"presence store error: {exc!r}") from exc
        return [c for c in cids if node_of_client(c) in live]

    async def is_online(self, uid: str) -> bool:
        return bool(await self.client_ids(uid))

    async def client_ids(self, uid: str) -> list[str]:
        cids = await self._read(("SMEMBERS", self.names.uid_key(uid)))
        return sorted(await self._live_filter(cids))

    async def group_members(self, group: str) -> GroupInfo:
        members: dict[str, str] = await self._read(("HGETALL", self.names.group_key(group)))
        live = await self._live_filter(members)
        return GroupInfo(sorted({members[c] for c in live if members[c]}), len(live))

    async def nodes(self) -> list[NodeInfo]:
        members = sorted(await self._read(("ZRANGE", self.names.nodes_key(), 0, -1)))
        if not members:
            return []
        values = await self._read(("MGET", *(self.names.alive_key(x) for x in members)))
        return [NodeInfo(m, json.loads(v)) for m, v in zip(members, values, strict=True) if v]
