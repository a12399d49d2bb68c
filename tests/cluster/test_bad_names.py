"""Names that are not UTF-8, from every source, against real node pairs and a real valkey
(issue 14). A lone surrogate such as "x\\ud800" is a Python str that no UTF-8 encoder takes:
JSON can carry it as an escape (a JWT's payload, parsed by PyJWT), an application can pass it
to the Python API. Each one is refused on its own (401 ``invalid claim: sub``, an ``error``
frame, HTTP 400, ``bad_request``) and nobody else notices: while a flood of them runs, two
users chat across the nodes without losing a message and stay online, both nodes stay
healthy, neither purges the other, and no log shows a traceback.

Two pairs of nodes are shared by the module: one with a JWT secret, one anonymous running
tests/cluster/apps/badnames.py. Control characters and astral characters are names like
any other (docs/protocol-notes.md): the last test uses them end to end.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
import websockets
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException

from wscluster.embedded import EmbeddedRedis

from .apps.badnames import OPS
from .conftest import NodeProc
from .wsclient import WS

pytestmark = pytest.mark.timeout(180)

SECRET = "bad-names-test-secret-0123456789abcdef"  # >= 32 bytes
BAD = "x\ud800"
FLOOD = 4.0  # seconds
REPO = Path(__file__).resolve().parents[2]
# a node whose heartbeat fails for 3 s is purged by the other one: the flood would show it
BEATS = ["--node-heartbeat", "0.5", "--node-ttl", "3"]
QUIET = ("Traceback", "purged dead node", "broker lost", "presence store unreachable",
         "may be stale", "internal error", "failed")  # fmt: skip


@dataclass
class Pair:
    nodes: list[NodeProc]
    jwt: bool
    marks: list[int] = field(default_factory=list)  # log sizes when the current test began

    def token(self, sub: str, ttl: int = 600) -> str:
        now = int(time.time())
        return jwt.encode({"sub": sub, "exp": now + ttl, "iat": now}, SECRET, algorithm="HS256")

    async def user(self, i: int, uid: str) -> WS:
        node = self.nodes[i]
        if self.jwt:
            return await WS.open(f"{node.ws_url}?token={self.token(uid)}")
        return await WS.open(node.ws_url, uid=uid)

    def mark(self) -> None:
        self.marks = [n.log_path.stat().st_size for n in self.nodes]

    def new_log_lines(self) -> list[str]:
        lines = []
        for node, start in zip(self.nodes, self.marks or [0] * len(self.nodes), strict=True):
            with open(node.log_path, "rb") as f:
                f.seek(start)
                text = f.read().decode(errors="replace")
            lines += [f"node{node.index}: {line}" for line in text.splitlines()]
        return lines


@pytest.fixture(scope="module")
def pairs(valkey: EmbeddedRedis, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Pair]]:
    tmp = tmp_path_factory.mktemp("badnames")

    def base() -> list[str]:
        return ["--broker", valkey.url, "--namespace", f"t{uuid.uuid4().hex[:10]}", *BEATS]

    jwt_args = [*base(), "--jwt-secret", SECRET]
    app_args = [*base(), "--app", "tests.cluster.apps.badnames:app"]
    env = {"PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    built = [
        Pair([NodeProc(0, jwt_args, tmp), NodeProc(1, jwt_args, tmp)], jwt=True),
        Pair([NodeProc(2, app_args, tmp, env), NodeProc(3, app_args, tmp, env)], jwt=False),
    ]
    nodes = [n for p in built for n in p.nodes]
    try:
        for node in nodes:
            node.start(wait=False)
        for node in nodes:
            node.wait_healthy()
        yield built
    finally:
        for node in nodes:
            node.kill()


@pytest.fixture
def jwt_pair(pairs: list[Pair]) -> Pair:
    pairs[0].mark()
    return pairs[0]


@pytest.fixture
def anon_pair(pairs: list[Pair]) -> Pair:
    pairs[1].mark()
    return pairs[1]


# --- the bystanders ------------------------------------------------------------------------


Attack = Callable[[asyncio.Event], Awaitable[Any]]


async def while_attacked(pair: Pair, unique: str, attack: Attack, seconds: float = FLOOD) -> Any:
    """Run ``attack(stop)`` for ``seconds`` while alice (node 0) and bob (node 1) send each
    other a message every 50 ms and both nodes' health and both users' presence are read
    every 200 ms; assert that none of them noticed, then return what the attack returned."""
    uids = [f"alice-{unique}", f"bob-{unique}"]
    users = [await pair.user(0, uids[0]), await pair.user(1, uids[1])]
    acked: list[list[int]] = [[], []]
    problems: list[str] = []
    stop = asyncio.Event()

    async def chat(me: int) -> None:
        n = 0
        while not stop.is_set():
            frame = {"type": "send", "to": f"uid:{uids[1 - me]}", "data": {"n": n}}
            try:
                reply = await users[me].request(frame, timeout=5)
            except TimeoutError:
                problems.append(f"{uids[me]}: send {n} not answered within 5 s")
                return
            if reply["type"] == "ack":
                acked[me].append(n)
            else:
                problems.append(f"{uids[me]}: send {n} answered {reply}")
            n += 1
            await asyncio.sleep(0.05)

    async def sample() -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
            while not stop.is_set():
                for node in pair.nodes:
                    try:
                        async with http.get(f"{node.http_url}/healthz") as r:
                            if r.status != 200:
                                problems.append(f"node{node.index} /healthz {r.status}")
                        for uid in uids:
                            url, query = f"{node.api_url}/api/presence", {"to": f"uid:{uid}"}
                            async with http.get(url, params=query) as r:
                                body = await r.json()
                            if body != {"online": True}:
                                problems.append(f"node{node.index}: {uid} presence {body}")
                    except (aiohttp.ClientError, TimeoutError) as exc:
                        problems.append(f"node{node.index}: {exc!r}")
                await asyncio.sleep(0.2)

    watchers = [asyncio.create_task(chat(0)), asyncio.create_task(chat(1)),
                asyncio.create_task(sample())]  # fmt: skip
    attacker: asyncio.Future[Any] = asyncio.ensure_future(attack(stop))
    await asyncio.sleep(seconds)
    stop.set()
    result = await asyncio.wait_for(attacker, 60)
    await asyncio.wait_for(asyncio.gather(*watchers), 30)
    for me in (0, 1):  # every acked message arrived, once, in order
        expected, got = acked[1 - me], list[int]()
        try:
            while len(got) < len(expected):
                got.append((await users[me].next(5, type="message"))["data"]["n"])
        except TimeoutError:
            pass
        if got != expected:
            problems.append(f"{uids[me]} got {len(got)} of {len(expected)} messages: {got[:20]}")
        if len(expected) < 10:
            problems.append(f"{uids[1 - me]} could send only {len(expected)} messages")
    await asyncio.sleep(1.0)  # a purge or a failure still on its way would show by now
    lines = [line for line in pair.new_log_lines() if any(word in line for word in QUIET)]
    problems += lines[:20]
    assert not problems, "\n".join(problems[:40])
    return result


# --- JWT `sub` -------------------------------------------------------------------------------


async def bad_handshakes(url: str, stop: asyncio.Event, **kw: Any) -> Counter[str]:
    """Open handshakes until ``stop``; count the outcomes (status and body, or what else)."""
    seen: Counter[str] = Counter()
    while not stop.is_set():
        try:
            conn = await websockets.connect(url, compression=None, open_timeout=5, **kw)
        except InvalidStatus as exc:
            body = json.loads(exc.response.body or b"null")
            seen[f"{exc.response.status_code} {json.dumps(body)}"] += 1
            continue
        except (OSError, TimeoutError, WebSocketException) as exc:
            seen[f"failed: {exc!r}"[:200]] += 1
            await asyncio.sleep(0.05)
            continue
        seen["accepted"] += 1
        await conn.close()
    return seen


REFUSED = '401 {"error": "invalid claim: sub"}'


async def test_bad_sub_handshakes_are_refused_alone(jwt_pair: Pair, unique: str) -> None:
    token = jwt_pair.token(BAD)
    assert "\\ud800" in jwt.utils.base64url_decode(token.split(".")[1]).decode()

    async def attack(stop: asyncio.Event) -> list[Counter[str]]:
        floods = []
        for node in jwt_pair.nodes:
            floods.append(bad_handshakes(f"{node.ws_url}?token={token}", stop))
            header = {"Authorization": f"Bearer {token}"}
            floods.append(bad_handshakes(node.ws_url, stop, additional_headers=header))
        return await asyncio.gather(*floods)

    outcomes = await while_attacked(jwt_pair, unique, attack)
    total: Counter[str] = sum(outcomes, Counter())
    assert set(total) == {REFUSED}, total
    assert total[REFUSED] >= 40, total
    assert all(c[REFUSED] > 0 for c in outcomes), outcomes


async def test_bad_sub_in_a_login_frame_is_forbidden_alone(jwt_pair: Pair, unique: str) -> None:
    token = jwt_pair.token(BAD)
    carol = await jwt_pair.user(0, f"carol-{unique}")
    async with aiohttp.ClientSession() as http:  # a plain GET of /ws says why, too
        async with http.get(jwt_pair.nodes[1].ws_url.replace("ws:", "http:"),
                            params={"token": token}) as r:  # fmt: skip
            assert (r.status, await r.json()) == (401, {"error": "invalid claim: sub"})

    async def attack(stop: asyncio.Event) -> Counter[str]:
        seen: Counter[str] = Counter()
        while not stop.is_set():
            reply = await carol.request({"type": "login", "token": token})
            seen[f"{reply['type']} {reply.get('code')} {reply.get('message')}"] += 1
            await asyncio.sleep(0.015)  # below --abuse-rate (100 errors/s): not closed 1008
        return seen

    seen = await while_attacked(jwt_pair, unique, attack)
    assert set(seen) == {"error forbidden invalid claim: sub"}, seen
    reply = await carol.ok({"type": "presence", "to": f"uid:carol-{unique}"})
    assert reply["online"] is True  # still bound to its own uid, still usable


# --- client frames, an application's Python API, the HTTP API ---------------------------------


def bad_frames(unique: str) -> list[str]:
    """Core frames naming a uid, group or stream with a lone surrogate (the JSON escape)."""
    frames = [
        {"type": "login", "uid": "x\\ud800"},
        {"type": "login", "uid": "x\\udfffy"},
        {"type": "join", "group": f"g{unique}\\ud800"},
        {"type": "join", "group": "g\\ud800", "presence": True},
        {"type": "leave", "group": "g\\udbff"},
        {"type": "send", "to": "uid:x\\ud800", "data": 1},
        {"type": "send", "to": "group:g\\ud800", "data": 1},
        {"type": "send", "to": "client:n\\ud800.1", "data": 1},
        {"type": "presence", "to": "uid:x\\ud800"},
        {"type": "presence", "to": "group:g\\ud800"},
        {"type": "resume", "streams": {"uid:x\\ud800": [None, 0]}},
    ]
    # json.dumps would escape the backslash: put the escape in by hand
    return [json.dumps(f).replace("\\\\u", "\\u") for f in frames]


async def test_bad_names_in_frames_are_refused_alone(anon_pair: Pair, unique: str) -> None:
    frames = bad_frames(unique)
    assert '"x\\ud800"' in frames[0]
    senders = [await anon_pair.user(i % 2, f"mallory{i}-{unique}") for i in range(8)]

    async def flood(ws: WS, stop: asyncio.Event) -> Counter[str]:
        seen: Counter[str] = Counter()
        while not stop.is_set():
            for frame in frames:
                await ws.send_raw(frame)
                reply = await ws.next(5, type="error")
                seen[reply["code"]] += 1
            await asyncio.sleep(0.15)  # below --abuse-rate (100 errors/s): not closed 1008
        return seen

    async def attack(stop: asyncio.Event) -> Counter[str]:
        return sum(await asyncio.gather(*(flood(ws, stop) for ws in senders)), Counter())

    seen = await while_attacked(anon_pair, unique, attack)
    assert set(seen) <= {"bad_json", "bad_request"}, seen
    assert sum(seen.values()) >= 100, seen
    for ws in senders:  # each still logged in as itself, still usable
        reply = await ws.ok({"type": "presence", "to": f"uid:{ws.welcome['uid'] or 'x'}"})
        assert "online" in reply


async def test_bad_names_from_the_application_are_refused_alone(
    anon_pair: Pair, unique: str
) -> None:
    app_users = [await anon_pair.user(i % 2, f"app{i}-{unique}") for i in range(2)]

    async def run_ops(ws: WS, stop: asyncio.Event) -> Counter[str]:
        seen: Counter[str] = Counter()
        while not stop.is_set():
            for op in OPS:
                reply = await ws.request({"type": "bad", "op": op}, timeout=15)
                result = reply.get("result") or {}
                seen[f"{op}: {result.get('code')} {result.get('message', '')}"[:160]] += 1
        return seen

    async def hook_uids(stop: asyncio.Event) -> Counter[str]:
        seen: Counter[str] = Counter()
        while not stop.is_set():
            for node in anon_pair.nodes:
                conn = await websockets.connect(f"{node.ws_url}?baduid=1", compression=None)
                try:
                    frame = await asyncio.wait_for(conn.recv(), 5)
                    seen[f"frame {str(frame)[:60]}"] += 1
                except ConnectionClosed as exc:
                    seen[f"closed {exc.rcvd.code if exc.rcvd else None}"] += 1
                finally:
                    await conn.close()
        return seen

    async def attack(stop: asyncio.Event) -> tuple[Counter[str], Counter[str]]:
        *ops, hooks = await asyncio.gather(*(run_ops(ws, stop) for ws in app_users),
                                           hook_uids(stop))  # fmt: skip
        return sum(ops, Counter()), hooks

    ops, hooks = await while_attacked(anon_pair, unique, attack)
    wrong = [k for k in ops if ": bad_request " not in k]
    assert not wrong, wrong
    assert {k.partition(":")[0] for k in ops} == set(OPS)
    assert set(hooks) == {"closed 1008"}, hooks
    for ws in app_users:
        reply = await ws.ok({"type": "presence", "to": f"uid:{ws.welcome['uid'] or 'x'}"})
        assert "online" in reply


async def test_bad_names_through_the_http_api_are_400(anon_pair: Pair, unique: str) -> None:
    victim = await anon_pair.user(1, f"victim-{unique}")
    cid = victim.client_id
    posts = [
        ("send", {"to": "uid:x\\ud800", "data": 1}),
        ("send", {"to": f"uid:victim-{unique}", "data": "x\\ud800"}),
        ("close", {"to": "uid:x\\ud800"}),
        ("bind", {"client_id": cid, "uid": "x\\ud800"}),
        ("join", {"client_id": cid, "group": "g\\ud800"}),
        ("leave", {"client_id": cid, "group": "g\\ud800"}),
        ("bind", {"client_id": "n\\ud800.1", "uid": "alice"}),
        ("session", {"client_id": cid, "session": {"k\\ud800": 1}}),
        ("session", {"client_id": cid, "session": {"k": "v\\ud800"}}),
        ("session", {"client_id": cid, "session": {"k": ["v\\udc00"]}, "merge": True}),
    ]
    bodies = [(f"/api/{path}", json.dumps(body).replace("\\\\u", "\\u")) for path, body in posts]
    api = anon_pair.nodes[0].api_url

    async def attack(stop: asyncio.Event) -> Counter[str]:
        seen: Counter[str] = Counter()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
            while not stop.is_set():
                for path, body in bodies:
                    async with http.post(api + path, data=body.encode()) as r:
                        seen[f"{path} {r.status}"] += 1
                # a query string cannot carry a surrogate: invalid UTF-8 becomes U+FFFD
                async with http.get(api + "/api/presence?to=uid:x%ED%A0%80") as r:
                    seen[f"presence {r.status} {await r.text()}"] += 1
                async with http.get(api + "/api/session?client_id=n%ED%A0%80.1") as r:
                    seen[f"session {r.status} {await r.text()}"] += 1
        return seen

    seen = await while_attacked(anon_pair, unique, attack)
    assert {k for k in seen if k.startswith("/api/")} == {f"{p} 400" for p, _ in bodies}, seen
    assert {k for k in seen if not k.startswith("/api/")} == {
        'presence 200 {"online":false}', 'session 200 {"session":null}'
    }, seen
    await victim.ok({"type": "ping"})
    await victim.nothing(0.2)  # none of the refused sends reached it


async def test_control_and_astral_characters_are_names(anon_pair: Pair, unique: str) -> None:
    """What the protocol allows still works: any character of UTF-8, control characters and
    NUL included (docs/protocol-notes.md), astral ones count as one character."""
    for name in (f"nul\x00{unique}", f"tab\t\n\x7f\x85{unique}", f"\U0001f600{unique}",
                 "\U0001f600" * 128):  # fmt: skip
        alice = await anon_pair.user(0, name)
        bob = await anon_pair.user(1, f"b{unique}")
        assert (await alice.ok({"type": "join", "group": name}))["type"] == "ack"
        await bob.ok({"type": "send", "to": f"uid:{name}", "data": 1})
        await bob.ok({"type": "send", "to": f"group:{name}", "data": 2})
        assert (await alice.next(type="message"))["to"] == f"uid:{name}"
        assert (await alice.next(type="message"))["to"] == f"group:{name}"
        assert (await bob.ok({"type": "presence", "to": f"uid:{name}"}))["online"] is True
        members = await bob.ok({"type": "presence", "to": f"group:{name}"})
        assert members["uids"] == [name]
        await alice.close()
        await bob.close()
    lines = [line for line in anon_pair.new_log_lines() if any(w in line for w in QUIET)]
    assert not lines, lines
