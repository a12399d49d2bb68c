"""Redis presence (Redis or Valkey: one primary, or Sentinel; not Redis Cluster).

Data model, every key built by ``wscluster.naming.Names``: ``nodes`` zset of known node
ids; ``alive:<node>`` the node's stats JSON with a PX TTL, set by each heartbeat (a node is
alive while it exists: the server's clock decides, machines' clocks need not agree);
``nc:<node>`` hash cid -> uid ('' when none), the index of a node's connections;
``conn:<cid>`` hash with field ``uid`` and a field ``g:<group>`` per joined group;
``uid:<uid>`` set of cids; ``grp:<group>`` hash cid -> uid.

Guarantees:

- An instance's writes go through one queue to one connection. A writer task sends all
  that is queued as Lua script calls of up to 5,000 commands (one pipeline, one round trip,
  each call atomic), so writes apply in call order and thousands cost a few round trips. A
  write returns once applied, or raises ``PresenceUnavailable`` when the server is
  unreachable or silent for ``timeout`` s. A failed write (or one whose caller gave up)
  makes its node's next ``heartbeat`` return False, so that the node ``resync``-s.
- Readers drop every connection whose node (from its cid) has no alive key: a killed node
  vanishes from every answer when its TTL runs out, purged or not.
- ``purge_dead`` claims a dead node with ZREM in a script that first checks it is still
  dead: one caller wins, however many try. The winner reads the node's connections, then
  removes them with scripts that do nothing once the node is alive again (a paused node
  that comes back is told by its heartbeat to ``resync``).
- A connection enters its node's index first and leaves it last, so whatever a crash
  leaves behind stays reachable from ``nc:<node>``. If a purger dies after its claim, the
  node's leftovers are never reported again and readers filter them out: they cost memory.

Limits: one writer instance per node id (it keeps each connection's uid and groups). A
group is read with one HGETALL, a uid with one SMEMBERS, then one MGET of alive keys: fine
for groups of tens of thousands, not millions. Scripts and MGET span several nodes' keys.
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
from redis.exceptions import RedisError, ResponseError

from wscluster.errors import PresenceUnavailable
from wscluster.naming import Names, node_of_client
from wscluster.presence.base import ConnInfo, DeadNode, GroupInfo, NodeInfo

log = logging.getLogger("wscluster.presence")

_UID = "uid"  # conn hash field: the uid ('' when none)
_G = "g:"  # conn hash field prefix: one field per joined group
_SCRIPT_CMDS = 5_000  # commands per script call (a writer batch is up to 4 calls)
_ERRORS = (RedisError, OSError, TimeoutError)

# KEYS[1] with ARGV[1] '1': a guard, do nothing (return nil) if that alive key exists.
# ARGV[2]: JSON list of commands [name, args...]; each takes the next key from KEYS, but
# HB (heartbeat, args: node id, ttl ms, stats JSON, score) takes two: alive and nodes.
# Returns {position, result, ...} for each HB (1 when the node was known) and each error.
_APPLY = """
local k, out = 1, {}
if ARGV[1] == '1' then
  if redis.call('EXISTS', KEYS[1]) == 1 then return false end
  k = 2
end
for pos, c in ipairs(cjson.decode(ARGV[2])) do
  if c[1] == 'HB' then
    local known = redis.call('EXISTS', KEYS[k]) == 1
      or redis.call('ZSCORE', KEYS[k + 1], c[2]) ~= false
    redis.call('SET', KEYS[k], c[4], 'PX', c[3])
    redis.call('ZADD', KEYS[k + 1], 'NX', c[5], c[2])
    out[#out + 1] = pos; out[#out + 1] = known and 1 or 0
    k = k + 2
  else
    local r = redis.pcall(c[1], KEYS[k], unpack(c, 2))
    if type(r) == 'table' and r.err then out[#out + 1] = pos; out[#out + 1] = r.err end
    k = k + 1
  end
end
return out
"""
# KEYS: alive, nodes. ARGV: node id. 1 when this caller claimed the dead node.
_CLAIM = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
return redis.call('ZREM', KEYS[2], ARGV[1])
"""
_HGETALLS = """
local out = {}
for i, key in ipairs(KEYS) do out[i] = redis.call('HGETALL', key) end
return out
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
    run: Callable[[int], Awaitable[Any]] | None = None  # exclusive op: run(seq), alone
    seq: int = 0  # enqueue order


def _unavailable(exc: BaseException) -> PresenceUnavailable:
    err = PresenceUnavailable(f"presence store error: {exc!r}")
    err.__cause__ = exc
    return err


class RedisPresence:
    """The ``Presence`` role on a Redis-compatible server."""

    def __init__(self, url: str, names: Names, *, timeout: float = 5.0) -> None:
        self.url = url
        self.names = names
        self.timeout = timeout
        self._w: Redis | None = None  # the writer task's client
        self._r: Redis | None = None  # readers and purge
        self._task: asyncio.Task[None] | None = None
        self._queue: deque[_Op] = deque()
        self._wake = asyncio.Event()
        self._local: dict[str, dict[str, _Local]] = {}  # node -> cid -> uid and groups
        self._dirty: dict[str, int] = {}  # node -> seq of its last failed write
        self._seq = 0

    def _client(self, socket_timeout: float | None) -> Redis:
        return Redis.from_url(
            self.url, decode_responses=True, socket_timeout=socket_timeout,
            socket_connect_timeout=self.timeout, retry=Retry(NoBackoff(), 0),
        )

    async def start(self) -> None:
        if self._task is None:
            # the writer bounds a pipeline as a whole (cheaper than a timeout per reply); a
            # cancelled read closes its connection, it never desyncs it
            self._w, self._r = self._client(None), self._client(self.timeout)
            self._task = asyncio.create_task(self._writer(), name="wscluster-presence-writer")

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
    async def _submit(self, node_id: str, cmds: list[Cmd] | None = None,
                      run: Callable[[int], Awaitable[Any]] | None = None, size: int = 0) -> Any:
        if self._task is None:
            raise PresenceUnavailable("RedisPresence is not started")
        self._seq += 1
        op = _Op(node_id, asyncio.get_running_loop().create_future(), cmds or [], run, self._seq)
        self._queue.append(op)
        self._wake.set()
        try:  # exclusive ops (run) take several round trips, more with more connections
            return await asyncio.wait_for(op.fut, self.timeout * (3 + size / 5000 if run else 1))
        except TimeoutError:
            self._mark_dirty(op)
            raise PresenceUnavailable("presence store did not answer in time") from None
        except asyncio.CancelledError:
            self._mark_dirty(op)
            raise

    def _mark_dirty(self, op: _Op) -> None:
        if op.node_id not in self._dirty:
            log.warning("presence of node %s may be stale: it will resync", op.node_id)
        self._dirty[op.node_id] = max(op.seq, self._dirty.get(op.node_id, 0))

    def _fail(self, op: _Op, exc: BaseException) -> None:
        self._mark_dirty(op)
        if not isinstance(exc, _ERRORS):
            log.error("presence write failed: %r", exc)
        if not op.fut.done():
            op.fut.set_exception(_unavailable(exc))

    async def _writer(self) -> None:
        while True:
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            batch: list[_Op] = []
            ncmds = 0
            while self._queue and self._queue[0].run is None and ncmds < 4 * _SCRIPT_CMDS:
                op = self._queue.popleft()
                if not op.fut.done():  # else its caller gave up, and its node is dirty
                    batch.append(op)
                    ncmds += len(op.cmds)
            if batch:
                await self._flush(batch)
            elif self._queue and (op := self._queue.popleft()).run and not op.fut.done():
                try:
                    result = await op.run(op.seq)
                except BaseException as exc:  # a cancelled writer (close) fails its op too
                    self._fail(op, exc)
                    if not isinstance(exc, Exception):
                        raise
                else:
                    if not op.fut.done():
                        op.fut.set_result(result)

    async def _flush(self, batch: list[_Op]) -> None:
        assert self._w is not None
        try:
            replies = await self._apply(self._w, [c for op in batch for c in op.cmds])
        except BaseException as exc:
            log.warning("presence write of %d ops failed: %r", len(batch), exc)
            for op in batch:
                self._fail(op, exc)
            if not isinstance(exc, Exception):
                raise
            return
        assert replies is not None
        i = 0
        for op in batch:
            mine, i = replies[i : i + len(op.cmds)], i + len(op.cmds)
            error = next((r for r in mine if isinstance(r, str)), None)
            if error is not None:
                self._fail(op, ResponseError(error))
            elif not op.fut.done():
                op.fut.set_result(mine)

    async def _apply(
        self, client: Redis, cmds: Sequence[Cmd], guard: str | None = None
    ) -> list[Any] | None:
        """Run write ``cmds`` in order with _APPLY; per command: None, an HB result or an
        error message. With ``guard`` (an alive key), None when the guard key exists."""
        calls: list[Cmd] = []
        for start in range(0, len(cmds), _SCRIPT_CMDS):
            keys: list[str] = [guard] if guard else []
            body: list[list[Any]] = []
            for cmd in cmds[start : start + _SCRIPT_CMDS]:
                nkeys = 2 if cmd[0] == "HB" else 1
                keys += cmd[1 : 1 + nkeys]
                body.append([cmd[0], *cmd[1 + nkeys :]])
            payload = json.dumps(body, ensure_ascii=False, separators=(",", ":"))
            calls.append(("EVAL", _APPLY, len(keys), *keys, "1" if guard else "0", payload))
        out: list[Any] = [None] * len(cmds)
        replies = await self._execute(client, calls)
        for start, reply in zip(range(0, len(cmds), _SCRIPT_CMDS), replies, strict=True):
            if reply is None:
                return None
            for pos, value in zip(reply[::2], reply[1::2], strict=True):
                out[start + pos - 1] = value
        return out

    async def _execute(self, client: Redis, cmds: Sequence[Cmd]) -> list[Any]:
        """Run ``cmds`` in one pipeline per 100 (bounded in time); raise the first error."""
        out: list[Any] = []
        for start in range(0, len(cmds), 100):
            pipe = client.pipeline(transaction=False)
            for cmd in cmds[start : start + 100]:
                pipe.execute_command(*cmd)
            async with asyncio.timeout(self.timeout):
                out.extend(await pipe.execute())
        return out

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
        cmds: list[Cmd] = [("HSET", n.node_conns_key(node_id), cid, u),
                           ("HSET", n.conn_key(cid), *fields)]
        if conn.uid:
            cmds.append(("SADD", n.uid_key(conn.uid), cid))
        return cmds + [("HSET", n.group_key(g), cid, u) for g in conn.groups]

    def _remove_cmds(self, node_id: str, cid: str, uids: Iterable[str | None],
                     groups: Iterable[str]) -> list[Cmd]:
        n = self.names
        cmds: list[Cmd] = [("SREM", n.uid_key(u), cid) for u in set(uids) if u]
        cmds += [("HDEL", n.group_key(g), cid) for g in set(groups)]
        return [*cmds, ("DEL", n.conn_key(cid)), ("HDEL", n.node_conns_key(node_id), cid)]

    # --- writes -----------------------------------------------------------------------
    async def add(self, node_id: str, conn: ConnInfo) -> None:
        self._local.setdefault(node_id, {})[conn.client_id] = _Local(conn.uid, set(conn.groups))
        await self._submit(node_id, self._add_cmds(node_id, conn))

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
        await self._submit(node_id, cmds)

    async def join(self, node_id: str, cid: str, uid: str | None, group: str) -> None:
        n, u = self.names, uid or ""
        self._local.setdefault(node_id, {}).setdefault(cid, _Local(uid)).groups.add(group)
        await self._submit(node_id, [("HSET", n.node_conns_key(node_id), cid, u),
                                    ("HSET", n.conn_key(cid), _UID, u, _G + group, ""),
                                    ("HSET", n.group_key(group), cid, u)])

    async def leave(self, node_id: str, cid: str, group: str) -> None:
        n = self.names
        loc = self._local.get(node_id, {}).get(cid)
        if loc is not None:
            loc.groups.discard(group)
        await self._submit(node_id, [("HDEL", n.group_key(group), cid),
                                    ("HDEL", n.conn_key(cid), _G + group)])

    async def remove(self, node_id: str, cid: str, uid: str | None,
                     groups: Iterable[str]) -> None:
        loc = self._local.get(node_id, {}).pop(cid, None) or _Local(None)
        cmds = self._remove_cmds(node_id, cid, (uid, loc.uid), loc.groups.union(groups))
        await self._submit(node_id, cmds)

    async def heartbeat(self, node_id: str, ttl: float, stats: dict[str, Any]) -> bool:
        replies = await self._submit(node_id, [self._heartbeat_cmd(node_id, ttl, stats)])
        return bool(replies[0]) and node_id not in self._dirty

    async def resync(self, node_id: str, conns: Sequence[ConnInfo], ttl: float,
                     stats: dict[str, Any]) -> None:
        async def run(seq: int) -> None:
            assert self._w is not None
            n, new = self.names, {c.client_id: c for c in conns}
            # alive first: a purger's guarded scripts leave this node alone from here on
            cmds = [self._heartbeat_cmd(node_id, ttl, stats)]
            for old in await self._read_node(self._w, node_id):
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
            replies = await self._apply(self._w, cmds)
            if replies and (error := next((r for r in replies if isinstance(r, str)), None)):
                raise ResponseError(error)
            if self._dirty.get(node_id, seq) < seq:  # later failures still need a resync
                del self._dirty[node_id]
            log.info("resynced node %s: %d connections", node_id, len(conns))

        # the local copy changes in call order, like the queue
        self._local[node_id] = {c.client_id: _Local(c.uid, set(c.groups)) for c in conns}
        await self._submit(node_id, run=run, size=len(conns))

    async def remove_node(self, node_id: str) -> None:
        async def run(seq: int) -> None:
            assert self._w is not None
            n = self.names
            await self._execute(self._w, [("DEL", n.alive_key(node_id)),
                                          ("ZREM", n.nodes_key(), node_id)])
            await self._drop_node(self._w, node_id)
            if self._dirty.get(node_id, seq) < seq:
                del self._dirty[node_id]

        size = len(self._local.pop(node_id, ()))
        await self._submit(node_id, run=run, size=size)

    # --- purge ------------------------------------------------------------------------
    async def _read_node(self, client: Redis, node_id: str) -> list[ConnInfo]:
        """The connections the store holds for ``node_id``."""
        (index,) = await self._execute(client, [("HGETALL", self.names.node_conns_key(node_id))])
        cids = sorted(index)
        calls = [
            ("EVAL", _HGETALLS, len(chunk), *chunk)
            for chunk in ([self.names.conn_key(c) for c in cids[i : i + _SCRIPT_CMDS]]
                          for i in range(0, len(cids), _SCRIPT_CMDS))
        ]
        flat = [h for reply in await self._execute(client, calls) for h in reply]
        out = []
        for cid, h in zip(cids, flat, strict=True):
            fields = dict(zip(h[::2], h[1::2], strict=True))
            uid = fields.get(_UID, index[cid]) or None
            out.append(ConnInfo(cid, uid, sorted(f[2:] for f in fields if f.startswith(_G))))
        return out

    async def _drop_node(self, client: Redis, node_id: str) -> list[ConnInfo] | None:
        """Remove a node's connections; None when it came back alive meanwhile."""
        conns = await self._read_node(client, node_id)
        cmds = [cmd for c in conns
                for cmd in self._remove_cmds(node_id, c.client_id, [c.uid], c.groups)]
        if await self._apply(client, cmds, guard=self.names.alive_key(node_id)) is not None:
            return conns
        log.warning("node %s came back alive while being purged: left to its resync", node_id)
        return None

    async def purge_dead(self) -> list[DeadNode]:
        n, out = self.names, []
        members = (await self._query(("ZRANGE", n.nodes_key(), 0, -1)))[0]
        live = set(await self._live_nodes(members))
        dead = [m for m in members if m not in live]
        claims = await self._query(*(("EVAL", _CLAIM, 2, n.alive_key(d), n.nodes_key(), d)
                                     for d in dead))
        for node_id in (d for d, won in zip(dead, claims, strict=True) if won):
            try:
                assert self._r is not None
                conns = await self._drop_node(self._r, node_id)
            except _ERRORS as exc:
                raise _unavailable(exc) from exc
            if conns is not None:
                log.info("purged dead node %s (%d connections)", node_id, len(conns))
                out.append(DeadNode(node_id, conns))
        return out

    # --- reads ------------------------------------------------------------------------
    async def _query(self, *cmds: Cmd) -> list[Any]:
        if self._r is None:
            raise PresenceUnavailable("RedisPresence is not started")
        try:
            return await self._execute(self._r, cmds)
        except _ERRORS as exc:
            raise _unavailable(exc) from exc

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
