"""The Lua scripts of ``RedisPresence`` and its ordered batch writer: one queue, one
connection, one task (the data model and the guarantees: ``wscluster.presence.redis``)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from wscluster.errors import PresenceUnavailable
from wscluster.tasks import cancel_and_wait

log = logging.getLogger("wscluster.presence")

SCRIPT_CMDS = 5_000  # commands per script call (a writer batch is up to 4 calls)
MAX_QUEUED_OPS = 100_000  # writes waiting for a store that does not answer
ERRORS = (RedisError, OSError, TimeoutError)

# KEYS[1] with ARGV[1] '1': a guard, do nothing (return nil) if that alive key exists.
# ARGV[2]: JSON list of commands [name, args...]; each takes the next key from KEYS, but
# HB (heartbeat, args: node id, ttl ms, stats JSON, score) takes two: alive and nodes.
# SESS (session write on a conn hash, args: replace '1'/'0', limit, n, then n field/JSON
# pairs to set, then fields to delete): 0 when the hash does not exist, -1 when the
# session would exceed limit bytes (then it writes nothing), else 1. JSON values stay text.
# Returns {position, result, ...} for each HB (1 when the node was known), each SESS and
# each error.
_APPLY = """
local function chunked(cmd, key, args)
  for i = 1, #args, 1000 do
    redis.call(cmd, key, unpack(args, i, math.min(i + 999, #args)))
  end
end
local function session(key, c)
  local h = redis.pcall('HGETALL', key)
  if h.err then return h.err end
  if #h == 0 then return 0 end
  local n, new, size, set, del = tonumber(c[4]), {}, 0, {}, {}
  for i = 5, 4 + 2 * n, 2 do
    new[c[i]] = true; size = size + #c[i] - 2 + #c[i + 1]
    set[#set + 1] = c[i]; set[#set + 1] = c[i + 1]
  end
  for i = 5 + 2 * n, #c do new[c[i]] = false end
  for i = 1, #h, 2 do
    local f = h[i]
    if string.sub(f, 1, 2) == 's:' then
      if c[2] == '1' and not new[f] or new[f] == false then del[#del + 1] = f
      elseif new[f] == nil then size = size + #f - 2 + #h[i + 1] end
    end
  end
  if size > tonumber(c[3]) then return -1 end
  chunked('HDEL', key, del)
  chunked('HSET', key, set)
  return 1
end
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
  elseif c[1] == 'SESS' then
    out[#out + 1] = pos; out[#out + 1] = session(KEYS[k], c)
    k = k + 1
  else
    local r = redis.pcall(c[1], KEYS[k], unpack(c, 2))
    if type(r) == 'table' and r.err then out[#out + 1] = pos; out[#out + 1] = r.err end
    k = k + 1
  end
end
return out
"""
# KEYS: alive, nodes. ARGV: node id. 1 when this caller claimed the dead node.
CLAIM = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
return redis.call('ZREM', KEYS[2], ARGV[1])
"""
HGETALLS = """
local out = {}
for i, key in ipairs(KEYS) do out[i] = redis.call('HGETALL', key) end
return out
"""

Cmd = tuple[Any, ...]


@dataclass(slots=True, eq=False)
class _Op:
    node_id: str
    fut: asyncio.Future[Any]
    cmds: list[Cmd] = field(default_factory=list)
    run: Callable[[int], Awaitable[Any]] | None = None  # exclusive op: run(seq), alone
    seq: int = 0  # enqueue order


def unavailable(exc: BaseException) -> PresenceUnavailable:
    err = PresenceUnavailable(f"presence store error: {exc!r}")
    err.__cause__ = exc
    return err


class BatchWriter:
    """The writes of a ``RedisPresence``: one queue, one connection, one writer task."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.client: Redis | None = None  # the writer task's client
        self.dirty: dict[str, int] = {}  # node -> seq of its last failed write
        self._task: asyncio.Task[None] | None = None
        self._queue: deque[_Op] = deque()
        self._wake = asyncio.Event()
        self._seq = 0

    @property
    def started(self) -> bool:
        return self._task is not None

    def start(self, client: Redis) -> None:
        self.client = client
        self._task = asyncio.create_task(self._writer(), name="wscluster-presence-writer")

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            await cancel_and_wait([task])
        while self._queue:
            op = self._queue.popleft()
            if not op.fut.done():
                op.fut.set_exception(PresenceUnavailable("presence closed"))
        if self.client is not None:
            await self.client.aclose()
        self.client = None

    async def submit(self, node_id: str, cmds: list[Cmd] | None = None,
                     run: Callable[[int], Awaitable[Any]] | None = None, size: int = 0) -> Any:
        if self._task is None:
            raise PresenceUnavailable("RedisPresence is not started")
        self._seq += 1
        op = _Op(node_id, asyncio.get_running_loop().create_future(), cmds or [], run, self._seq)
        if len(self._queue) >= MAX_QUEUED_OPS:  # the store hangs: refuse rather than pile up
            self._mark_dirty(op)
            raise PresenceUnavailable("presence write queue full")
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
        if op.node_id not in self.dirty:
            log.warning("presence of node %s may be stale: it will resync", op.node_id)
        self.dirty[op.node_id] = max(op.seq, self.dirty.get(op.node_id, 0))

    def _fail(self, op: _Op, exc: BaseException) -> None:
        self._mark_dirty(op)
        if not isinstance(exc, ERRORS):
            log.error("presence write failed: %r", exc)
        if not op.fut.done():
            op.fut.set_exception(unavailable(exc))

    async def _writer(self) -> None:
        while True:
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            batch: list[_Op] = []
            ncmds = 0
            while self._queue and self._queue[0].run is None and ncmds < 4 * SCRIPT_CMDS:
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
        assert self.client is not None
        try:
            replies = await apply(self.client, [c for op in batch for c in op.cmds], self.timeout)
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


async def apply(
    client: Redis, cmds: Sequence[Cmd], pipe_timeout: float, guard: str | None = None
) -> list[Any] | None:
    """Run write ``cmds`` in order with _APPLY; per command: None, an HB or SESS result (an
    int) or an error message (a str). With ``guard`` (an alive key), None when the guard
    key exists."""
    calls: list[Cmd] = []
    for start in range(0, len(cmds), SCRIPT_CMDS):
        keys: list[str] = [guard] if guard else []
        body: list[list[Any]] = []
        for cmd in cmds[start : start + SCRIPT_CMDS]:
            nkeys = 2 if cmd[0] == "HB" else 1
            keys += cmd[1 : 1 + nkeys]
            body.append([cmd[0], *cmd[1 + nkeys :]])
        payload = json.dumps(body, ensure_ascii=False, separators=(",", ":"))
        calls.append(("EVAL", _APPLY, len(keys), *keys, "1" if guard else "0", payload))
    out: list[Any] = [None] * len(cmds)
    replies = await execute(client, calls, pipe_timeout)
    for start, reply in zip(range(0, len(cmds), SCRIPT_CMDS), replies, strict=True):
        if reply is None:
            return None
        for pos, value in zip(reply[::2], reply[1::2], strict=True):
            out[start + pos - 1] = value
    return out


async def execute(client: Redis, cmds: Sequence[Cmd], pipe_timeout: float) -> list[Any]:
    """Run ``cmds`` in one pipeline per 100 (bounded in time); raise the first error."""
    out: list[Any] = []
    for start in range(0, len(cmds), 100):
        pipe = client.pipeline(transaction=False)
        for cmd in cmds[start : start + 100]:
            pipe.execute_command(*cmd)
        async with asyncio.timeout(pipe_timeout):
            out.extend(await pipe.execute())
    return out
