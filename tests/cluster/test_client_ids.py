"""Client ids cannot be guessed (issue: ids were `<node>.<hex counter>`, node ids are public
in /nodes.json, so a client reached strangers by counting), and a token can forbid sending to
`client:` addresses at all (`"send_clients": false`)."""

from __future__ import annotations

import time
from typing import Any

import jwt

from wscluster.embedded import EmbeddedRedis

from .conftest import Cluster
from .wsclient import WS

SECRET = "client-ids-test-secret-0123456789abcdef"


def token(sub: str, **claims: Any) -> str:
    now = int(time.time())
    return jwt.encode({"sub": sub, "iat": now, "exp": now + 300, **claims}, SECRET, "HS256")


async def test_neighbouring_ids_reach_nobody(
    valkey: EmbeddedRedis, make_cluster: Any, unique: str
) -> None:
    """An attacker connected between its victims knows its own id; with a counter, the ids
    next to it were theirs. Now they are 64 random bits: the neighbours are nobody."""
    c: Cluster = make_cluster(valkey.url, 1, ["--jwt-secret", SECRET])
    url = c.ws_urls[0]
    before = [await WS.open(f"{url}?token={token(f'v{i}{unique}')}") for i in range(3)]
    attacker = await WS.open(f"{url}?token={token(f'x{unique}')}")
    after = [await WS.open(f"{url}?token={token(f'w{i}{unique}')}") for i in range(3)]
    node, _, secret = attacker.client_id.rpartition(".")
    assert len(secret) >= 16, attacker.client_id  # at least 64 bits after the node id
    victims = before + after
    assert all(v.client_id.rpartition(".")[0] == node for v in victims)
    guesses = {f"{node}.{int(secret, 16) + d:x}" for d in range(-8, 9) if d}
    guesses |= {f"{node}.{n:x}" for n in range(1, 17)}
    for guess in sorted(guesses):
        reply = await attacker.request({"type": "send", "to": f"client:{guess}", "data": 1})
        assert reply["type"] == "ack"  # a well-formed address with no receiver: accepted
    for victim in victims:
        await victim.nothing(0.5)
    # the real id still works: ids are unguessable, not unusable
    await attacker.ok({"type": "send", "to": f"client:{victims[0].client_id}", "data": 2})
    assert (await victims[0].next(type="message"))["data"] == 2


async def test_send_clients_false_forbids_client_addresses(
    valkey: EmbeddedRedis, make_cluster: Any, unique: str
) -> None:
    c: Cluster = make_cluster(valkey.url, 1, ["--jwt-secret", SECRET])
    url = c.ws_urls[0]
    target = await WS.open(f"{url}?token={token(f't{unique}')}")
    limited = await WS.open(f"{url}?token={token(f'l{unique}', send_clients=False)}")
    reply = await limited.request({"type": "send", "to": f"client:{target.client_id}", "data": 1})
    assert (reply["type"], reply.get("code")) == ("error", "forbidden")
    await limited.ok({"type": "send", "to": f"uid:t{unique}", "data": 2})  # uid: still fine
    assert (await target.next(type="message"))["data"] == 2
    await target.nothing(0.3)
    malformed = await WS.open(f"{url}?token={token(f'm{unique}', send_clients='yes')}")
    reply = await malformed.request({"type": "send", "to": f"client:{target.client_id}", "data": 3})
    assert reply.get("code") == "forbidden"  # a claim of the wrong type narrows
