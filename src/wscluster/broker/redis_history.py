"""History on Redis: the append-and-publish script (run on the broker's publishing link, in
publish order) and the reads behind resume, gap repair and the position check.

Per stream two keys (naming.Names): a Redis stream holding the envelopes (entry id
``<offset>-0``, capped at the rule's N with MAXLEN, expiring T seconds after the last
append) and a hash holding the last offset ``o`` and the epoch ``e`` (expiring a day after
the last append, so a quiet stream keeps its position). An empty store (a Redis that
restarted without persistence) has no hash: the next append starts a new epoch at offset 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.exceptions import RedisError

from wscluster.errors import PresenceUnavailable
from wscluster.routing import is_utf8

POSITIONS_BATCH = 500  # streams per script call of the position check

# KEYS: meta keys. -> {epoch or '', last offset or 0, ...}: one command for many streams
# (a pipeline of HMGETs costs the node far more CPU per stream).
POSITIONS = """
local out = {}
for i, key in ipairs(KEYS) do
  local m = redis.call('HMGET', key, 'e', 'o')
  out[2 * i - 1] = m[1] or ''
  out[2 * i] = tonumber(m[2] or 0)
end
return out
"""

# KEYS: meta, stream. ARGV: channel, envelope, maxlen, ttl_ms, meta_ttl_ms, epoch candidate.
APPEND = """
local epoch = redis.call('HGET', KEYS[1], 'e')
if not epoch then
  epoch = ARGV[6]
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'e', epoch, 'o', 0)
end
local offset = redis.call('HINCRBY', KEYS[1], 'o', 1)
local added = redis.pcall('XADD', KEYS[2], 'MAXLEN', ARGV[3], string.format('%d-0', offset),
                          'f', ARGV[2])
if type(added) == 'table' and added.err then
  -- the stream is ahead of the counter: the store lost part of its writes; start over
  epoch = ARGV[6]
  offset = 1
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'e', epoch, 'o', 1)
  redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[3], '1-0', 'f', ARGV[2])
end
redis.call('PEXPIRE', KEYS[2], ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
redis.call('PUBLISH', ARGV[1], string.format('#%d:%s:', offset, epoch) .. ARGV[2])
return {offset, epoch}
"""

# KEYS: meta, stream. ARGV: the reader's epoch ('' for none), after, limit, count, budget,
# upto. -> {epoch or '', top, oldest retained offset or 0, entries (oldest first)}
# The window is (after, top], or its newest `limit` offsets (offsets are contiguous, so that
# is the same set as the newest `limit` entries); `upto` > 0 ends it there instead of at top
# and reads nothing in another epoch (a later page of a resume). One page holds at most
# `count` entries and, when `budget` > 0, at most `budget` bytes of envelopes (but at least
# one entry). The entries are fetched in steps sized from the ones already taken, so a page
# of large ones does not copy many more than it returns.
READ = """
local m = redis.call('HMGET', KEYS[1], 'e', 'o')
if not m[1] then return {'', 0, 0, {}} end
local top = tonumber(m[2])
local after, limit = tonumber(ARGV[2]), tonumber(ARGV[3])
local count, budget, upto = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local first = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)
local oldest = 0
if #first > 0 then oldest = tonumber(string.match(first[1][1], '^(%d+)')) end
local out = {}
if m[1] ~= ARGV[1] then
  if upto > 0 then return {m[1], top, oldest, out} end
  after = 0
end
local stop = top
if upto > 0 and upto < top then stop = upto end
local from = math.max(after, stop - limit) + 1
local size, step = 0, count
if budget > 0 then step = 1 end
while from <= stop and #out < count do
  local got = redis.call('XRANGE', KEYS[2], string.format('%d-0', from),
                         string.format('%d-0', stop), 'COUNT', math.min(step, count - #out))
  if #got == 0 then break end
  for _, entry in ipairs(got) do
    local n = #entry[2][2]
    if budget > 0 and #out > 0 and size + n > budget then return {m[1], top, oldest, out} end
    out[#out + 1] = entry
    size = size + n
  end
  from = tonumber(string.match(got[#got][1], '^(%d+)')) + 1
  if budget > 0 then step = math.ceil((budget - size) * #out / math.max(size, 1)) + 1 end
end
return {m[1], top, oldest, out}
"""

# KEYS: meta, stream. ARGV: the epoch that went back in time, a new epoch. A store that lost
# its last appends (a crash with AOF fsync every second) would give their offsets to other
# messages: the stream starts over in a new epoch instead, as after a loss.
BUMP = """
if redis.call('HGET', KEYS[1], 'e') ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[1], 'e', ARGV[2], 'o', 0)
return 1
"""


@dataclass(frozen=True, slots=True)
class Read:
    epoch: str  # '' when the store holds nothing for the stream
    top: int  # the last offset appended in this epoch (0: none)
    oldest: int  # the oldest offset still retained (0: none)
    entries: list[tuple[int, bytes]]  # (offset, envelope), oldest first


class RedisHistory:
    """Reads of the history store (its own small connection pool)."""

    def __init__(self, url: str, names: Any, timeout: float = 5.0) -> None:
        self._names = names
        # A read waits for a free connection (up to ``timeout``) instead of failing at once:
        # a burst of resumes, each reading page after page, often wants more than 16.
        pool = BlockingConnectionPool.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout, max_connections=16,
            timeout=timeout,
        )  # fmt: skip
        self._redis: Redis = Redis.from_pool(pool)
        self._read = self._redis.register_script(READ)
        self._bump = self._redis.register_script(BUMP)
        self._positions = self._redis.register_script(POSITIONS)

    async def close(self) -> None:
        await self._redis.aclose()

    async def read(
        self, stream: str, epoch: str, after: int, limit: int, *, count: int = 0,
        budget: int = 0, upto: int = 0,
    ) -> Read:  # fmt: skip
        """The entries after ``after`` (all retained ones when ``epoch`` is not the stream's),
        at most ``limit`` (the newest ones when more are there), oldest first.

        A paged reader (a resume) bounds each call by ``count`` entries and ``budget`` bytes
        of envelopes (at least one entry is returned); it takes ``top`` from the first call
        and reads the next pages with ``after`` = the last offset it got and ``upto`` = that
        top, which reads nothing once the stream is in another epoch."""
        keys = [self._names.history_meta_key(stream), self._names.history_key(stream)]
        args: list[str | int] = [epoch, after, limit, count or limit, budget, upto]
        try:
            raw = await self._read(keys=keys, args=args)
        except (RedisError, OSError) as exc:
            raise PresenceUnavailable(f"history store: {exc}") from None
        entries = [(_offset(entry_id), fields[1]) for entry_id, fields in raw[3]]
        return Read(_text(raw[0]), int(raw[1]), int(raw[2]), entries)

    async def bump(self, stream: str, epoch: str, new_epoch: str) -> bool:
        """Start the stream over in ``new_epoch`` if it is still in ``epoch``."""
        keys = [self._names.history_meta_key(stream), self._names.history_key(stream)]
        try:
            return bool(await self._bump(keys=keys, args=[epoch, new_epoch]))
        except (RedisError, OSError) as exc:
            raise PresenceUnavailable(f"history store: {exc}") from None

    async def positions(self, streams: list[str]) -> list[tuple[str, int]]:
        """(epoch or '', last offset) of each stream, in one round trip. A stream whose name
        is not UTF-8 is not asked for (it cannot be stored): ('', 0), the others go."""
        if not all(map(is_utf8, streams)):
            asked = [s for s in streams if is_utf8(s)]
            known = dict(zip(asked, await self.positions(asked), strict=True))
            return [known.get(s, ("", 0)) for s in streams]
        flat: list[Any] = []
        meta = self._names.history_meta_key
        try:
            for i in range(0, len(streams), POSITIONS_BATCH):
                keys = [meta(s) for s in streams[i : i + POSITIONS_BATCH]]
                flat += await self._positions(keys=keys)
        except (RedisError, OSError) as exc:
            raise PresenceUnavailable(f"history store: {exc}") from None
        return [(_text(flat[i]), int(flat[i + 1])) for i in range(0, len(flat), 2)]


def _offset(entry_id: bytes) -> int:
    return int(entry_id.partition(b"-")[0])


def _text(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else value
