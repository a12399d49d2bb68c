"""Token buckets for the limits of connections and client addresses. Sans-I/O: the caller
passes the time.

A bucket holds at most ``burst`` tokens and gains ``rate`` per second. ``take`` spends one
only when there is one (the frame limit: over it, the frame is refused). ``charge`` always
spends, and may leave the bucket in debt: the work is done (a resume after a reconnect must
go through), and the connection is not read until the debt is repaid, so a client that
keeps doing it slows only itself. Reading resumes when the bucket holds a whole token again.
"""

from __future__ import annotations


class Bucket:
    __slots__ = ("at", "burst", "rate", "tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.at = now

    def _refill(self, now: float) -> None:
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now

    def take(self, now: float) -> bool:
        """Spend one token if there is one."""
        self._refill(now)
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True

    def charge(self, n: float, now: float) -> bool:
        """Spend ``n`` tokens, into debt if need be; whether there were enough."""
        self._refill(now)
        enough = self.tokens >= n
        self.tokens -= n
        return enough

    def full(self, now: float) -> bool:
        """Whether it holds its whole burst (as if it had never been used)."""
        self._refill(now)
        return self.tokens >= self.burst

    def debt_time(self, now: float) -> float:
        """Seconds until a bucket in debt holds a whole token again, so that the next frame
        read passes (0 when it is not in debt)."""
        self._refill(now)
        return (1.0 - self.tokens) / self.rate if self.tokens < 0 else 0.0
