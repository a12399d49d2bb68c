"""The (un)subscriptions of one loop turn go to the broker together; one bad channel among
them fails only its own confirmation (issue 14): refused up front when it is not UTF-8, and
when the broker refuses some channels of a call (``ChannelRefused``) or fails a call for a
reason of its own (not ``BrokerUnavailable``), the others are confirmed anyway."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from wscluster.broker.base import ChannelRefused
from wscluster.errors import BrokerUnavailable
from wscluster.naming import Names
from wscluster.registry import Interest
from wscluster.subscriptions import Subscriptions

NS = Names("t")


class FakeBroker:
    """Records calls; ``refuse`` channels make a call raise ``ChannelRefused`` (after the
    others were subscribed), ``poison`` channels make it raise ``ValueError`` (a broker
    without per-channel checks), ``down`` makes every call ``BrokerUnavailable``."""

    def __init__(self, refuse: Sequence[str] = (), poison: Sequence[str] = ()) -> None:
        self.refuse, self.poison = set(refuse), set(poison)
        self.down = False
        self.calls: list[tuple[str, list[str]]] = []
        self.subscribed: set[str] = set()

    async def subscribe(self, channels: Sequence[str]) -> None:
        self.calls.append(("sub", list(channels)))
        await asyncio.sleep(0)
        if self.down:
            raise BrokerUnavailable("down")
        if self.poison.intersection(channels):
            raise ValueError("cannot encode")
        refused = [c for c in channels if c in self.refuse]
        self.subscribed.update(c for c in channels if c not in self.refuse)
        if refused:
            raise ChannelRefused(refused, "refused by the test")

    async def unsubscribe(self, channels: Sequence[str]) -> None:
        self.calls.append(("unsub", list(channels)))
        if self.poison.intersection(channels):
            raise ValueError("cannot encode")
        self.subscribed.difference_update(channels)


def _subs(broker: FakeBroker) -> Subscriptions:
    return Subscriptions(broker, NS, timeout=2)  # type: ignore[arg-type]


async def _outcomes(subs: Subscriptions, addresses: list[str]) -> list[str]:
    results = await asyncio.gather(*(subs.wait(a) for a in addresses), return_exceptions=True)
    return ["ok" if r is None else type(r).__name__ for r in results]


async def test_a_channel_that_is_not_utf8_is_refused_up_front() -> None:
    broker = FakeBroker()
    subs = _subs(broker)
    addresses = ["uid:alice", "uid:x\ud800", "group:room"]
    subs.apply(Interest(subscribe=addresses))
    assert await _outcomes(subs, addresses) == ["ok", "ChannelRefused", "ok"]
    assert broker.calls == [("sub", [NS.channel("uid:alice"), NS.channel("group:room")])]


async def test_channels_the_broker_refuses_fail_alone() -> None:
    broker = FakeBroker(refuse=[NS.channel("uid:bad")])
    subs = _subs(broker)
    addresses = ["uid:a", "uid:bad", "uid:b"]
    subs.apply(Interest(subscribe=addresses))
    assert await _outcomes(subs, addresses) == ["ok", "ChannelRefused", "ok"]
    assert len(broker.calls) == 1  # one call for the turn


async def test_an_unexpected_failure_is_retried_channel_by_channel() -> None:
    broker = FakeBroker(poison=[NS.channel("uid:bad")])
    subs = _subs(broker)
    addresses = ["uid:a", "uid:bad", "uid:b"]
    subs.apply(Interest(subscribe=addresses))
    assert await _outcomes(subs, addresses) == ["ok", "BrokerUnavailable", "ok"]
    assert broker.subscribed == {NS.channel("uid:a"), NS.channel("uid:b")}
    # and unsubscribing them together (the bad one with them) still unsubscribes the others
    subs.apply(Interest(unsubscribe=addresses))
    await asyncio.sleep(0.05)
    assert broker.subscribed == set()


async def test_a_broker_that_is_down_fails_the_whole_turn_once() -> None:
    broker = FakeBroker()
    broker.down = True
    subs = _subs(broker)
    addresses = [f"uid:u{i}" for i in range(50)]
    subs.apply(Interest(subscribe=addresses))
    outcomes = await _outcomes(subs, addresses)
    assert set(outcomes) == {"BrokerUnavailable"}
    assert len([c for c in broker.calls if c[0] == "sub"]) <= 2  # no retry per channel


@pytest.mark.parametrize("kinds", [[True, False, True], [False, True]])
async def test_runs_keep_their_order(kinds: list[bool]) -> None:
    broker = FakeBroker()
    subs = _subs(broker)
    for i, subscribe in enumerate(kinds):
        address = f"uid:u{i}"
        subs.apply(Interest(subscribe=[address]) if subscribe else Interest(unsubscribe=[address]))
    await asyncio.sleep(0.05)
    assert [c[0] for c in broker.calls] == ["sub" if k else "unsub" for k in kinds]
