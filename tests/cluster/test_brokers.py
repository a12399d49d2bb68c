"""The node over every broker backend: two node processes, Redis for presence."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import pytest

from wscluster import Cluster as WSCluster
from wscluster.embedded import EmbeddedRedis

from .conftest import Cluster
from .wsclient import WS

BROKERS = [
    name
    for name in ("nats", "rabbitmq")
    if importlib.util.find_spec(f"wscluster.broker.{name}") is not None
]
URL_FIXTURE = {"nats": "nats_url", "rabbitmq": "amqp_url"}


@pytest.mark.parametrize("broker", BROKERS)
async def test_cross_node_routing_over(
    broker: str, request: pytest.FixtureRequest, valkey: EmbeddedRedis,
    make_cluster: Callable[..., Cluster], unique: str,
) -> None:  # fmt: skip
    url = request.getfixturevalue(URL_FIXTURE[broker])
    c = make_cluster(url, 2, ["--presence", valkey.url])
    a = await WS.open(c.ws_urls[0], f"a{unique}")
    b = await WS.open(c.ws_urls[1], f"b{unique}")
    await b.ok({"type": "join", "group": f"g{unique}"})
    await a.ok({"type": "send", "to": f"uid:b{unique}", "data": 1})
    assert (await b.next(type="message"))["data"] == 1
    for i in range(200):  # per-sender order through this broker
        await a.send_raw(f'{{"type": "send", "to": "group:g{unique}", "data": {i}}}')
    assert [(await b.next(type="message"))["data"] for _ in range(200)] == list(range(200))
    await b.ok({"type": "send", "to": f"client:{a.client_id}", "data": "back"})
    assert (await a.next(type="message"))["data"] == "back"
    await a.ok({"type": "send", "to": "all", "data": "everyone"})
    assert (await b.next(type="message"))["data"] == "everyone"
    got = await a.ok({"type": "presence", "to": f"group:g{unique}"})
    assert got["uids"] == [f"b{unique}"]
    # a backend process changes b's groups and uid through this broker (control requests
    # and their replies), with the barrier of b's own requests; sessions go to the store
    async with WSCluster(url, namespace=c.namespace, presence_url=valkey.url) as api:
        assert await api.join(b.client_id, f"h{unique}") is True
        await api.send(f"group:h{unique}", "joined by the backend")
        assert (await b.next(type="message"))["data"] == "joined by the backend"
        assert await api.bind_uid(b.client_id, f"n{unique}") is True
        await api.send(f"uid:n{unique}", "bound by the backend")
        assert (await b.next(type="message"))["data"] == "bound by the backend"
        ghost = b.client_id.rsplit(".", 1)[0] + ".999999"
        assert await api.leave(ghost, f"h{unique}") is False
        assert await api.set_session(b.client_id, {"k": broker}) is True
        assert await api.get_session(b.client_id) == {"k": broker}
