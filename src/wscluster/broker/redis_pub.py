"""The publishing link of ``RedisBroker``: one connection and one writer task send pipelined
PUBLISH commands in ``publish_nowait`` call order (the guarantees: ``broker.redis``)."""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Callable
from typing import Any

from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ResponseError

from wscluster.backoff import Backoff
from wscluster.broker.redis_conn import PING_AFTER, PING_TIMEOUT, Connector, describe
from wscluster.broker.state import fail_all
from wscluster.errors import BrokerUnavailable
from wscluster.routing import is_utf8

MAX_BATCH = 10_000  # PUBLISH commands per pipeline
MAX_BATCH_BYTES = 4 << 20  # payload bytes per pipeline (at least one message is sent)

# (command, payload bytes counted against the pending bound, future of the reply)
_Item = tuple[tuple[Any, ...], int, asyncio.Future[Any]]


class NoScript(ConnectionError):
    """The server forgot our script (SCRIPT FLUSH): reconnect, which loads it again."""


class Publisher:
    """The ordered pipelined writer; ``run`` is its task, ``up`` its link's state."""

    def __init__(
        self,
        connector: Connector,
        publish_timeout: float,
        max_pending_bytes: int,
        update_state: Callable[[str], None],
    ) -> None:
        self._connector = connector
        self._publish_timeout = publish_timeout
        self._max_pending = max_pending_bytes
        self._update_state = update_state
        self.closing = False  # set by RedisBroker.close
        self.up = False
        self.pending_bytes = 0
        self._queue: deque[_Item] = deque()
        self._inflight: deque[_Item] = deque()
        self._wakeup = asyncio.Event()
        self._check = False
        self.script: str | None = None  # loaded at every connect (broker.redis_history)
        self._sha = ""

    def publish_nowait(self, channel: str, payload: bytes) -> asyncio.Future[None]:
        return self._enqueue(("PUBLISH", channel, payload), len(payload), is_utf8(channel))

    def script_nowait(
        self, keys: tuple[str, ...], args: tuple[Any, ...], size: int
    ) -> asyncio.Future[Any]:
        """Run the history script (``scripts``) in publish order; the future gets its reply."""
        ok = all(is_utf8(a) for a in (*keys, *args) if isinstance(a, str))
        return self._enqueue(("EVALSHA", self._sha, len(keys), *keys, *args), size, ok)

    def _enqueue(self, command: tuple[Any, ...], size: int, text_ok: bool) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if not self.up or self.closing:
            fut.set_exception(BrokerUnavailable("broker not connected"))
        elif not text_ok:  # fails alone, now, not the batch it would join
            fut.set_exception(BrokerUnavailable("publish refused: a channel or key not UTF-8"))
        elif self.pending_bytes + size > self._max_pending:
            fut.set_exception(BrokerUnavailable("publish queue full"))
        else:
            self.pending_bytes += size
            self._queue.append((command, size, fut))
            self._wakeup.set()
        return fut

    def check_now(self) -> None:
        """PING the link at once (the subscribing link just broke)."""
        self._check = True
        self._wakeup.set()

    def fail_publishes(self, reason: str) -> None:
        self.pending_bytes = 0
        fail_all(reason, self._inflight, self._queue)

    async def run(self) -> None:
        backoff = Backoff(base=0.05, cap=2.0)
        while True:
            conn = self._connector.new_conn("wsc-pub", self._publish_timeout)
            try:
                await self._connector.connect(conn)
                if self.script is not None:
                    await conn.send_command("SCRIPT", "LOAD", self.script, check_health=False)
                    self._sha = (await conn.read_response()).decode()
                backoff.reset()
                self.up = True
                self._update_state("")
                await self._serve(conn)
            except Exception as exc:
                self.up = False
                self.fail_publishes(f"broker connection lost: {describe(exc)}")
                self._update_state(describe(exc))
            finally:
                await self._connector.drop(conn)
            await asyncio.sleep(backoff.next())

    async def _serve(self, conn: AbstractConnection) -> None:
        queue, inflight = self._queue, self._inflight
        while True:
            if not queue and not self._check:
                self._wakeup.clear()
                try:
                    async with asyncio.timeout(PING_AFTER):
                        await self._wakeup.wait()
                except TimeoutError:
                    self._check = True
            if self._check:  # idle, or the subscribing link just broke: check this one
                self._check = False
                await conn.send_command("PING", check_health=False)
                if await conn.read_response(timeout=PING_TIMEOUT) is None:
                    raise ConnectionError(f"no answer to PING within {PING_TIMEOUT} s")
                continue
            size = 0
            while queue and len(inflight) < MAX_BATCH and size < MAX_BATCH_BYTES:
                item = queue.popleft()
                size += item[1]
                inflight.append(item)
            packed = conn.pack_commands([command for command, _, _ in inflight])
            await conn.send_packed_command(packed, check_health=False)
            async with asyncio.timeout(self._publish_timeout):  # for the whole batch
                while inflight:
                    error, reply = None, None
                    try:
                        reply = await conn.read_response(timeout=math.inf)
                    except ResponseError as exc:  # refused by the server: this message only
                        error = BrokerUnavailable(f"publish refused: {exc}")
                        if str(exc).startswith("NOSCRIPT"):
                            raise NoScript("history script flushed from the server") from None
                    command, size, fut = inflight.popleft()
                    self.pending_bytes -= size
                    if fut.done():
                        continue
                    if error is None:
                        fut.set_result(reply if command[0] == "EVALSHA" else None)
                    else:
                        fut.set_exception(error)
