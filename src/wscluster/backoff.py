"""Capped exponential backoff with full jitter (the AWS architecture blog's "full jitter")."""

from __future__ import annotations

import random


class Backoff:
    """``next()`` returns a delay uniform in [0, min(cap, base * 2**attempt)]."""

    def __init__(
        self, base: float = 0.1, cap: float = 5.0, rng: random.Random | None = None
    ) -> None:
        if base <= 0 or cap < base:
            raise ValueError("need 0 < base <= cap")
        self.base = base
        self.cap = cap
        self.attempt = 0
        self._rng = rng or random.Random()

    def next(self) -> float:
        ceiling = min(self.cap, self.base * (2 ** min(self.attempt, 32)))
        self.attempt += 1
        return self._rng.uniform(0, ceiling)

    def reset(self) -> None:
        self.attempt = 0
