"""The invariants, counted per subscriber and per publisher (no I/O).

For every publisher whose address a subscriber listens to, the messages the application saw
from it must be in ``seq`` order and each seen once; a message the cluster acked and the
subscriber never saw is **missing** (only those sent after the subscriber's join/login
acks count: ``CountingClient.since``). A missing message is **reported** when a loss report of
that stream (``recovered: false`` or ``gap``) was delivered between the publisher's message
before it and the one after it, and **lost** (a silent loss) otherwise.
"""

from __future__ import annotations

import bisect
import itertools
from collections import Counter
from dataclasses import dataclass, field

from .client import CountingClient, Loss, Msg
from .load import Publisher


@dataclass
class Account:
    expected: int = 0  # acked messages to the subscriber's streams
    delivered: int = 0
    missing: int = 0
    reported: int = 0  # missing, covered by a loss report
    lost: int = 0  # missing, silently
    dup: int = 0
    disorder: int = 0  # deliveries with a seq below the one before (same publisher)
    unacked_delivered: int = 0  # delivered although answered with an error
    lost_seqs: dict[str, list[int]] = field(default_factory=dict)  # publisher -> first few

    def add(self, other: Account) -> None:
        for name in ("expected", "delivered", "missing", "reported", "lost", "dup", "disorder",
                     "unacked_delivered"):  # fmt: skip
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for pub, seqs in other.lost_seqs.items():
            self.lost_seqs.setdefault(pub, []).extend(seqs)

    @property
    def exact(self) -> bool:
        """Every acked message exactly once, in order."""
        return self.missing == self.dup == self.disorder == 0

    @property
    def no_silent_loss(self) -> bool:
        """Every message at most once, in order; every loss reported."""
        return self.lost == self.dup == self.disorder == 0


def account(client: CountingClient, pubs: list[Publisher]) -> Account:
    total = Account()
    losses: dict[str, list[int]] = {}
    for i, ev in enumerate(client.log):
        if isinstance(ev, Loss):
            losses.setdefault(ev.stream, []).append(i)
    for pub in pubs:
        if pub.to in client.streams:
            since = client.since.get(pub.pid, 0)
            total.add(_one(client.log, pub, since, losses.get(pub.to, [])))
    return total


def _one(log: list[Msg | Loss], pub: Publisher, since: int, losses: list[int]) -> Account:
    where = [i for i, ev in enumerate(log) if isinstance(ev, Msg) and ev.pub == pub.pid]
    seqs = [log[i].seq for i in where]  # type: ignore[union-attr]
    acked = {s for s in pub.acked if s > since}  # sent after the subscriber's acks
    acc = Account(expected=len(acked), delivered=len(seqs))
    counts = Counter(seqs)
    acc.dup = sum(n - 1 for n in counts.values())
    acc.disorder = sum(1 for a, b in itertools.pairwise(seqs) if b < a)
    acc.unacked_delivered = sum(1 for s in counts if s in pub.refused)
    missing = sorted(acked - counts.keys())
    acc.missing = len(missing)
    lost = []
    for s in missing:
        k = bisect.bisect_left(seqs, s)  # seqs are sorted unless `disorder` already fails
        before = where[k - 1] if k > 0 else -1
        after = where[k] if k < len(where) else len(log)
        j = bisect.bisect_right(losses, before)
        if j < len(losses) and losses[j] < after:
            acc.reported += 1
        else:
            lost.append(s)
    acc.lost = len(lost)
    if lost:
        acc.lost_seqs[pub.pid] = lost[:10]
    return acc
