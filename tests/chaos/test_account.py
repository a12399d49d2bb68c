"""The suite's own accounting, on made-up logs: a checker that counts wrong would hide
server bugs."""

from __future__ import annotations

import random

from .account import account
from .client import CountingClient, Loss, Msg
from .load import Publisher


def _pub(acked: range, refused: tuple[int, ...] = ()) -> Publisher:
    p = Publisher("p", [], 0, "group:g", 1.0, random.Random(0))
    p.acked = set(acked)
    p.refused = {s: "unavailable" for s in refused}
    return p


def _client(log: list[Msg | Loss], since: int = 0) -> CountingClient:
    c = CountingClient("c", [], 0, "u", ["g"], random.Random(0), since={"p": since})
    c.log = log
    return c


def _m(seq: int) -> Msg:
    return Msg("group:g", "p", seq, "e", seq)


def test_everything_once_in_order_is_exact() -> None:
    acc = account(_client([_m(s) for s in range(1, 6)]), [_pub(range(1, 6))])
    assert acc.exact and acc.expected == acc.delivered == 5


def test_a_silent_hole_is_lost_and_a_reported_one_is_not() -> None:
    gap = Loss("group:g", "gap", "lost", "e", 3)
    silent = _client([_m(1), _m(4), _m(5)])
    reported = _client([_m(1), gap, _m(4), _m(5)])
    elsewhere = _client([_m(1), _m(4), gap, _m(5)])  # a report after the hole covers nothing
    pubs = [_pub(range(1, 6))]
    assert (account(silent, pubs).lost, account(silent, pubs).lost_seqs) == (2, {"p": [2, 3]})
    assert (account(reported, pubs).reported, account(reported, pubs).lost) == (2, 0)
    assert account(elsewhere, pubs).lost == 2


def test_a_lost_tail_is_covered_only_by_a_later_report() -> None:
    pubs = [_pub(range(1, 4))]
    assert account(_client([_m(1)]), pubs).lost == 2
    acc = account(_client([_m(1), Loss("group:g", "resume", "epoch_changed", "f", 0)]), pubs)
    assert (acc.lost, acc.reported) == (0, 2) and acc.no_silent_loss and not acc.exact


def test_duplicates_disorder_and_what_counts() -> None:
    acc = account(_client([_m(1), _m(3), _m(2), _m(3)]), [_pub(range(1, 3), refused=(3,))])
    assert (acc.dup, acc.disorder, acc.unacked_delivered) == (1, 1, 1)
    late = account(_client([_m(5), _m(6)], since=4), [_pub(range(1, 7))])
    assert late.exact and late.expected == 2  # sent before the subscriber's acks: not owed
