"""The Lua scripts of ``RedisPresence`` and its ordered batch writer: one queue, one
connection, one task (the data model and the guarantees: ``wscluster.presence.redis``).

A batch holds the writes of many connections and the node's heartbeat: one bad item never
fails it. A command with text that is not UTF-8 is not sent (``apply``), each command runs
under ``pcall`` in the script, a call too large is split, and a call the server refuses as a
whole runs again command by command; so an op fails only for what it holds itself, or when
the link fails. A full queue never refuses the heartbeat."""

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
from wscluster.routing import is_utf8
from wscluster.tasks import cancel_and_wait

log = logging.getLogger("wscluster.presence")

SCRIPT_CMDS = 5_000  # commands per script call (a writer batch is up to 4 calls)
SCRIPT_BYTES = 8 << 20  # a call holding more (large sessions) is split
MAX_QUEUED_OPS = 100_000  # writes waiting for a store that does not answer (heartbeats exempt)
ERRORS = (RedisError, OSError, TimeoutError)
LEFT_OUT = "ERR wscluster: an argument is not valid UTF-8 (not sent)"
_REMOVALS = frozenset({"SREM", "HDEL", "DEL"})  # of what no valid command could have stored

# KEYS[1] with ARGV[1] '1': a guard, do nothing (return nil) if that alive key exists.
# ARGV[2]: JSON list of commands [name, args...]; each takes the next key from KEYS, but
# HB (heartbeat, args: node id, ttl ms, stats JSON, score) takes two: alive and nodes.
# SESS (session write on a conn hash, args: replace '1'/'0', limit, n, then n field/JSON
# pairs to set, then fields to delete): 0 when the hash does not exist, -1 when the
# session would exceed limit bytes (then it writes nothing), else 1. JSON values stay text.
# Returns {position, result, ...} for each HB (1 when the node was known), each SESS and
# each error (a string). Every command runs under pcall: one that fails (a key of the wrong
# type, a refused heartbeat) fails alone, never the call.
_APPLY = """
local function failed(e)
  if type(e) == 'table' then return e.err or 'ERR script error' end
  return tostring(e)
end
local function heartbeat(alive, nodes, c)
  local known = redis.call('EXISTS', alive) == 1 or redis.call('ZSCORE', nodes, c[2]) ~= false
  redis.call('SET', alive, c[4], 'PX', c[3])
  redis.call('ZADD', nodes, 'NX', c[5], c[2])
  return known and 1 or 0
end
local function command(key, c)
  local r = redis.pcall(c[1], key, unpack(c, 2))
  if type(r) == 'table' and r.err then return r.err end
  return false
end
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
  local ok, r
  if c[1] == 'HB' then
    ok, r = pcall(heartbeat, KEYS[k], KEYS[k + 1], c)
    k = k + 2
  elseif c[1] == 'SESS' then
    ok, r = pcall(session, KEYS[k], c)
    k = k + 1
  else
    ok, r = pcall(command, KEYS[k], c)
    k = k + 1
  end
  if not ok then r = failed(r) end
  if r then out[#out + 1] = pos; out[#out + 1] = r end
end
return out
"""
HGETALLS = """
local out = {}
for i, key in ipairs(KEYS) do out[i] = redis.call('HGETALL', key) end
return out
"""

Cmd = tuple[Any, ...]
Part = range | list[int]  # positions in a batch of the commands of one script call


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
        if len(self._queue) >= MAX_QUEUED_OPS and not _heartbeat(op):
            # the store hangs: refuse rather than pile up (never the node's heartbeat, which
            # must not fail for what clients did)
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
        """Write ``batch`` (many connections' ops and maybe the heartbeat) in one go. What one
        op holds fails that op alone (``apply``); only the link failing fails them all."""
        assert self.client is not None
        try:
            replies = await apply(self.client, [c for op in batch for c in op.cmds], self.timeout)
        except BaseException as exc:
            if len(batch) > 1 and isinstance(exc, Exception) and not isinstance(exc, ERRORS):
                # not the link's failure but a bug of ours, maybe one op's: each op again
                log.error("presence write of %d ops failed (%r): each op again", len(batch), exc)
                for op in batch:
                    await self._flush([op])
                return
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
    key exists. One command never fails the others: one with an argument that is not UTF-8
    is not sent (a removal of it is None: nothing can have stored it; a write is an error),
    a command the server refuses is that command's error, and a script call the server
    refuses as a whole is run again one command per call."""
    out: list[Any] = [None] * len(cmds)
    calls = _calls(cmds, guard, out)
    replies = await execute(client, [call for _, call in calls], pipe_timeout, False)
    bad = next((i for i, r in enumerate(replies) if isinstance(r, ResponseError)), None)
    if bad is not None:
        replies[bad:] = await _again(client, cmds, calls[bad:], replies[bad:], guard,
                                     pipe_timeout)  # fmt: skip
    for (part, _), reply in zip(calls, replies, strict=True):
        if reply is None:
            return None
        for pos, value in zip(reply[::2], reply[1::2], strict=True):
            out[part[pos - 1]] = value
    return out


def _script(cmds: Sequence[Cmd], guard: str | None) -> Cmd:
    """One _APPLY call; ``UnicodeEncodeError`` (or ``TypeError``) when an argument cannot
    be sent."""
    keys: list[str] = [guard] if guard else []
    body: list[list[Any]] = []
    for cmd in cmds:
        nkeys = 2 if cmd[0] == "HB" else 1
        keys += cmd[1 : 1 + nkeys]
        body.append([cmd[0], *cmd[1 + nkeys :]])
    payload = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
    encoded = [k.encode() for k in keys]
    return ("EVAL", _APPLY, len(keys), *encoded, "1" if guard else "0", payload)


def _calls(cmds: Sequence[Cmd], guard: str | None, out: list[Any]) -> list[tuple[Part, Cmd]]:
    """The script calls for ``cmds``, each with the positions of its commands: up to
    SCRIPT_CMDS commands and SCRIPT_BYTES of payload a call. A command that cannot be sent
    is answered in ``out`` and left out."""
    n = SCRIPT_CMDS
    todo: list[Part] = [range(i, min(i + n, len(cmds))) for i in range(0, len(cmds), n)]
    calls: list[tuple[Part, Cmd]] = []
    while todo:
        part = todo.pop(0)
        try:
            call = _script(_pick(cmds, part), guard)
        except (UnicodeEncodeError, TypeError, ValueError):
            part = [i for i in part if _sendable(cmds[i], i, out)]
            if not part:
                continue
            call = _script(_pick(cmds, part), guard)
        if len(call[-1]) > SCRIPT_BYTES and len(part) > 1:
            half = len(part) // 2
            todo[:0] = [part[:half], part[half:]]
            continue
        calls.append((part, call))
    return calls


def _pick(cmds: Sequence[Cmd], part: Part) -> Sequence[Cmd]:
    if isinstance(part, range):
        return cmds[part.start : part.stop]
    return [cmds[i] for i in part]


def _sendable(cmd: Cmd, i: int, out: list[Any]) -> bool:
    """Whether ``cmd`` can be sent (its text is UTF-8); if not, its answer goes to out[i]."""
    if all(is_utf8(a) if isinstance(a, str) else type(a) in (int, float) for a in cmd):
        return True
    out[i] = None if cmd[0] in _REMOVALS else LEFT_OUT
    return False


async def _again(
    client: Redis, cmds: Sequence[Cmd], calls: list[tuple[Part, Cmd]], replies: list[Any],
    guard: str | None, pipe_timeout: float,
) -> list[Any]:  # fmt: skip
    """Script calls refused as a whole (``ResponseError`` in ``replies``, the first one
    among them), presumably for what one command holds: their commands again, one call
    each, so that only the culprit fails. The calls after the first refused one run again
    too, so that the store sees every write in order; their first replies stand."""
    log.warning("presence script call refused: %s; its commands again one by one", replies[0])
    again: list[Cmd] = []
    for (part, call), reply in zip(calls, replies, strict=True):
        if isinstance(reply, ResponseError):
            again += [_script([cmds[i]], guard) for i in part]
        else:
            again.append(call)
    answers = iter(await execute(client, again, pipe_timeout, False))
    out: list[Any] = []
    for (part, _), reply in zip(calls, replies, strict=True):
        if not isinstance(reply, ResponseError):
            next(answers)
            out.append(reply)
            continue
        merged: list[Any] | None = []
        for pos in range(1, len(part) + 1):
            answer = next(answers)
            if answer is None or merged is None:
                merged = None
            elif isinstance(answer, ResponseError):
                merged += [pos, str(answer)]
            elif answer:
                merged += [pos, answer[1]]
        out.append(merged)
    return out


async def execute(
    client: Redis, cmds: Sequence[Cmd], pipe_timeout: float, raise_on_error: bool = True
) -> list[Any]:
    """Run ``cmds`` in one pipeline per 100 (bounded in time); raise the first error, or
    with ``raise_on_error=False`` leave each command's error (``ResponseError``) in its
    place. A broken link or a timeout raises either way."""
    out: list[Any] = []
    for start in range(0, len(cmds), 100):
        pipe = client.pipeline(transaction=False)
        for cmd in cmds[start : start + 100]:
            pipe.execute_command(*cmd)
        async with asyncio.timeout(pipe_timeout):
            out.extend(await pipe.execute(raise_on_error=raise_on_error))
    return out


def _heartbeat(op: _Op) -> bool:
    return len(op.cmds) == 1 and op.cmds[0][0] == "HB"
