"""The purge of dead nodes for ``RedisPresence``: a claim is a lease, connections are handed
out in batches and each batch is removed only after its handlers ran (the guarantees:
``presence.base``; the data model: ``presence.redis``).

Two keys beyond the data model: ``purging``, the set of dead nodes whose purge began and has
not finished, and ``purge:<node>``, the lease: the purger's token with a PX TTL. A claim
moves the node from ``nodes`` to ``purging``: off ``nodes``, so that the node, should it
come back, hears from its heartbeat that it was forgotten and resyncs; in ``purging``, so
that a purge whose purger died is found again and taken over once its lease expired. Every
script first checks the node's alive key: a node alive again ends its purge (the remaining
entries are its own again).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from redis.asyncio import Redis

from wscluster.naming import Names
from wscluster.presence.base import PURGE_BATCH, ConnInfo, DeadNode, OnBatch, renewing
from wscluster.presence.redis_writer import Cmd, apply, execute

log = logging.getLogger("wscluster.presence")

# Every script: KEYS[1] alive, KEYS[2] purging, KEYS[3] the lease; ARGV[1] node, ARGV[2]
# the caller's token. A node alive again leaves purging and loses its lease: 0.
_ALIVE = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('SREM', KEYS[2], ARGV[1]); redis.call('DEL', KEYS[3]); return 0
end
"""
# KEYS[4] nodes; ARGV[3] lease ms. 1: claimed or renewed, 2: taken over (the lease of the
# previous purger expired), 0: someone else holds it, or nothing is left to purge.
CLAIM = _ALIVE + """
local owner = redis.call('GET', KEYS[3])
if owner and owner ~= ARGV[2] then return 0 end
local took = 1
if not owner then
  if redis.call('ZREM', KEYS[4], ARGV[1]) == 0 then
    if redis.call('SISMEMBER', KEYS[2], ARGV[1]) == 0 then return 0 end
    took = 2
  end
  redis.call('SADD', KEYS[2], ARGV[1])
end
redis.call('SET', KEYS[3], ARGV[2], 'PX', ARGV[3])
return took
"""
# KEYS[4] the node's index, KEYS[5..] conn hashes; ARGV[3] lease ms, ARGV[4..] their cids.
# Renews the lease and returns each conn hash (0 for a cid no longer in the index: another
# purger removed it already), or -1 when the lease is not the caller's.
READ = _ALIVE + """
if redis.call('GET', KEYS[3]) ~= ARGV[2] then return -1 end
redis.call('PEXPIRE', KEYS[3], ARGV[3])
local out = {}
for i = 5, #KEYS do
  if redis.call('HEXISTS', KEYS[4], ARGV[i - 1]) == 1 then
    out[#out + 1] = redis.call('HGETALL', KEYS[i])
  else
    out[#out + 1] = 0
  end
end
return out
"""
# KEYS[4] the node's index. 1: the purge is over (the node leaves purging, the lease goes),
# 2: connections are left in the index, -1: the lease is not the caller's.
FINISH = _ALIVE + """
if redis.call('GET', KEYS[3]) ~= ARGV[2] then return -1 end
if redis.call('EXISTS', KEYS[4]) == 1 then return 2 end
redis.call('SREM', KEYS[2], ARGV[1]); redis.call('DEL', KEYS[3])
return 1
"""

ConnFromHash = Callable[[str, dict[str, str], str], ConnInfo]  # cid, conn hash, index uid
RemoveCmds = Callable[[str, ConnInfo], list[Cmd]]  # node, connection


class Purger:
    """The purges of one ``RedisPresence``, under one random token."""

    def __init__(self, names: Names, timeout: float, conn: ConnFromHash,
                 remove: RemoveCmds) -> None:
        self.names = names
        self.timeout = timeout
        self.token = os.urandom(8).hex()
        self._conn = conn
        self._remove = remove
        self._mine: set[str] = set()  # nodes this instance is purging now

    async def run(self, r: Redis, on_batch: OnBatch | None, lease: float) -> list[DeadNode]:
        n, ms = self.names, str(max(1, round(lease * 1000)))
        members, purging = await execute(
            r, [("ZRANGE", n.nodes_key(), 0, -1), ("SMEMBERS", n.purging_key())], self.timeout
        )
        ids = sorted(set(members).union(purging).difference(self._mine))
        if not ids:
            return []
        (alive,) = await execute(r, [("MGET", *map(n.alive_key, ids))], self.timeout)
        dead = [x for x, v in zip(ids, alive, strict=True) if v is None]
        self._mine.update(dead)  # a concurrent call of this instance leaves them alone
        out = []
        try:
            for node_id in dead:  # claimed one by one: a lease runs while its node is purged
                (claim,) = await execute(r, [self._claim(node_id, ms)], self.timeout)
                if not claim:
                    continue
                if claim == 2:
                    log.warning("taking over the purge of dead node %s (its purger stopped)",
                                node_id)  # fmt: skip
                else:
                    log.info("purging dead node %s", node_id)
                done = await self._purge(r, node_id, on_batch, ms, lease)
                if done is not None:
                    out.append(done)
        finally:
            self._mine.difference_update(dead)
        return out

    def _keys(self, node_id: str) -> tuple[str, str, str]:
        n = self.names
        return n.alive_key(node_id), n.purging_key(), n.purge_lease_key(node_id)

    def _claim(self, node_id: str, ms: str) -> Cmd:
        keys = (*self._keys(node_id), self.names.nodes_key())
        return ("EVAL", CLAIM, len(keys), *keys, node_id, self.token, ms)

    async def _purge(self, r: Redis, node_id: str, on_batch: OnBatch | None, ms: str,
                     lease: float) -> DeadNode | None:
        keys = self._keys(node_id)
        index_key = self.names.node_conns_key(node_id)

        async def renew() -> bool:
            return bool((await execute(r, [self._claim(node_id, ms)], self.timeout))[0])

        handed: list[ConnInfo] = []
        while True:  # the index is read once; new entries (a node that wrote while dead) loop
            (index,) = await execute(r, [("HGETALL", index_key)], self.timeout)
            cids = sorted(index)
            for start in range(0, len(cids), PURGE_BATCH):
                chunk = cids[start : start + PURGE_BATCH]
                conn_keys = [self.names.conn_key(c) for c in chunk]
                (got,) = await execute(r, [("EVAL", READ, 4 + len(chunk), *keys, index_key,
                                            *conn_keys, node_id, self.token, ms, *chunk)],
                                       self.timeout)  # fmt: skip
                if isinstance(got, int):
                    _stopped(node_id, got)
                    return None
                batch = [self._conn(cid, _pairs(h), index[cid])
                         for cid, h in zip(chunk, got, strict=True) if h != 0]  # fmt: skip
                if on_batch is not None and batch:
                    # the handlers may outlast the lease: renew it meanwhile
                    await renewing(on_batch(node_id, batch), renew, lease / 3)
                cmds = [cmd for c in batch for cmd in self._remove(node_id, c)]
                if await apply(r, cmds, self.timeout, guard=keys[0]) is None:
                    await renew()  # alive again: drops the claim and the lease
                    _stopped(node_id, 0)
                    return None
                handed += batch
            fin = (await execute(r, [("EVAL", FINISH, 4, *keys, index_key, node_id,
                                      self.token)], self.timeout))[0]  # fmt: skip
            if fin == 1:
                return DeadNode(node_id, handed)
            if fin != 2:
                _stopped(node_id, fin)
                return None


def _pairs(flat: list[Any]) -> dict[str, str]:
    return dict(zip(flat[::2], flat[1::2], strict=True))


def _stopped(node_id: str, why: int) -> None:
    if why == 0:
        log.warning("node %s came back alive while being purged: left to its resync", node_id)
    else:
        log.warning("lost the lease on the purge of dead node %s: left to its new purger",
                    node_id)  # fmt: skip
