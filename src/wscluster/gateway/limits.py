"""The limits on reading one connection: the frame rate, pings, requests in flight, drain.
Each can pause reading (the kernel's buffers then push back on the client, which slows only
itself); reading resumes when no reason is left. Mixed into Connection, whose slots hold
the state."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from picows import WSListener, WSTransport

from ..buckets import Bucket

if TYPE_CHECKING:
    from ..config import NodeConfig

ABUSE_CLOSE = 1008
PINGS_OVER_CLOSE = 10.0  # seconds over the ping limit before the connection is closed 1008
# why reading is paused (a bit each): requests in flight, a bucket in debt, drain
_INFLIGHT, _DEBT, _FROZEN = 1, 2, 4


class ReadLimits(WSListener):
    """The base of Connection: its read-side state and the methods that keep it."""

    __slots__ = ("_paused", "_pings", "_pings_over", "_rate", "_sent_bytes", "_wake", "closing",
                 "inflight", "transport")  # fmt: skip

    def __init__(self, cfg: NodeConfig) -> None:
        super().__init__()
        self.transport: WSTransport | None = None
        self.closing = False
        self.inflight = 0  # requests waiting for the broker or presence store
        self._paused = 0  # why reading is paused: _INFLIGHT | _DEBT | _FROZEN
        now = time.monotonic()
        self._rate = Bucket(cfg.rate_limit, cfg.rate_burst, now) if cfg.rate_limit > 0 else None
        self._pings: Bucket | None = None  # made at the first ping (most clients send none)
        self._sent_bytes: Bucket | None = None  # --send-rate-bytes, made at the first send
        self._pings_over = 0.0  # since when pings come faster than allowed (0: they do not)
        self._wake: asyncio.TimerHandle | None = None  # reading resumes when debts are repaid

    @property
    def config(self) -> NodeConfig:
        raise NotImplementedError

    def close(self, code: int, reason: str = "") -> None:
        raise NotImplementedError

    def take_token(self) -> bool:
        """One frame against the rate limit (``--rate-limit`` per second, ``--rate-burst``):
        False when it is spent (the frame is refused)."""
        rate = self._rate
        return rate is None or rate.take(time.monotonic())

    def charge(self, n: int) -> None:
        """``n`` more tokens for a frame that does the work of many (a resume of n + 1
        streams). It is done even if that leaves the bucket in debt; then reading pauses
        until the debt is repaid."""
        rate = self._rate
        if rate is None or n <= 0:
            return
        now = time.monotonic()
        if not rate.charge(n, now):
            self._owe(now)

    def charge_bytes(self, n: int) -> None:
        """``n`` bytes a ``send`` frame puts on its receivers' links, against
        ``--send-rate-bytes`` (after ``--send-burst-bytes``): the message goes out, and over
        the budget reading pauses until it is repaid (no error: the sender just slows down),
        so a few senders cannot fill a receiver that reads at a fair speed."""
        cfg = self.config
        if cfg.send_rate_bytes <= 0:
            return
        now = time.monotonic()
        budget = self._sent_bytes
        if budget is None:
            budget = self._sent_bytes = Bucket(cfg.send_rate_bytes, cfg.send_burst_bytes, now)
        if not budget.charge(n, now):
            self._owe(now)

    def count_ping(self) -> bool:
        """A ping (WebSocket or ``{"type": "ping"}``) against ``--ping-rate``: over it,
        reading pauses until the bucket is repaid; over it for PINGS_OVER_CLOSE seconds,
        the connection is closed 1008. Whether to answer (False: it was closed)."""
        cfg = self.config
        if cfg.ping_rate <= 0 or self.closing:
            return not self.closing
        now = time.monotonic()
        pings = self._pings
        if pings is None:
            pings = self._pings = Bucket(cfg.ping_rate, cfg.ping_burst, now)
        if pings.charge(1.0, now):
            # Within the limit. After a pause, reading resumes with one token in the bucket:
            # a client still over the limit is back in debt at its next ping. Only a spare
            # token shows that it slowed down.
            if pings.tokens >= 1.0:
                self._pings_over = 0.0
            return True
        if not self._pings_over:
            self._pings_over = now
        elif now - self._pings_over >= PINGS_OVER_CLOSE:
            self.close(ABUSE_CLOSE, "too many pings")
            return False
        self._owe(now)
        return True

    def _owe(self, now: float) -> None:
        """A bucket is in debt: stop reading until every bucket is out of it."""
        self._pause(_DEBT)
        if self._wake is None:
            self._wake = asyncio.get_running_loop().call_later(self._debt_time(now), self._repaid)

    def _debt_time(self, now: float) -> float:
        buckets = (self._rate, self._pings, self._sent_bytes)
        wait = max(b.debt_time(now) for b in buckets if b is not None)
        if self._pings_over and self._pings is not None and self._pings.tokens < 0:
            wait = min(wait, max(0.0, self._pings_over + PINGS_OVER_CLOSE - now))
        return wait

    def _repaid(self) -> None:
        self._wake = None
        if self.closing:
            return
        now = time.monotonic()
        pings = self._pings
        if pings is not None and pings.debt_time(now) > 0 and self._pings_over:
            if now - self._pings_over >= PINGS_OVER_CLOSE:
                self.close(ABUSE_CLOSE, "too many pings")
                return
        wait = self._debt_time(now)
        if wait > 0:
            self._wake = asyncio.get_running_loop().call_later(wait, self._repaid)
        else:
            self._resume(_DEBT)

    def _pause(self, why: int) -> None:
        was, self._paused = self._paused, self._paused | why
        if not was and self.transport is not None and not self.closing:
            self.transport.underlying_transport.pause_reading()

    def _resume(self, why: int) -> None:
        if not self._paused & why:
            return
        self._paused &= ~why
        if not self._paused and self.transport is not None and not self.closing:
            self.transport.underlying_transport.resume_reading()

    # --- backpressure on the sender --------------------------------------------------
    def sending(self) -> None:
        self.inflight += 1
        if self.inflight >= self.config.max_inflight:
            self._pause(_INFLIGHT)

    def sent(self) -> None:
        """A request finished its I/O (a send was handed to the broker, a join confirmed, or
        either failed): maybe resume reading."""
        self.inflight -= 1
        if self.inflight <= self.config.max_inflight // 2:
            self._resume(_INFLIGHT)

    def freeze(self) -> None:
        """Read no more frames (drain): what is in flight still gets its answer."""
        self._pause(_FROZEN)
