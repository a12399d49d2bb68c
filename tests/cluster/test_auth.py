"""Authentication and authorization against real node processes and a real Redis: JWT at
the handshake (HS256, RS256, ES256), token expiry and re-login, the Origin allowlist, the
claims policy, the API key, the frame rate limit (and the abuse close) and the per-uid
connection limit.

The nodes are started once for the module (in parallel) and shared: every test uses its
own uids and groups.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
import websockets
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from websockets.exceptions import ConnectionClosed, ConnectionClosedError, InvalidStatus

from wscluster.embedded import EmbeddedRedis

from .conftest import NodeProc
from .wsclient import WS

SECRET = "hs256-test-secret-0123456789abcdefghij"  # >= 32 bytes
OTHER_SECRET = "another-secret-0123456789abcdefghijklmn"
AUDIENCE = "wsc-tests"
ISSUER = "https://issuer.example"
API_KEY = "api-key-0123456789"
ORIGINS = "http://a.example,https://b.example"
LEEWAY = 30  # seconds, on the ES256 node


# --- keys and tokens ---------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _segments(header: dict[str, Any], payload: dict[str, Any]) -> str:
    return f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(payload).encode())}"


def hmac_token(payload: dict[str, Any], key: bytes) -> str:
    """An HS256 token signed by hand (PyJWT refuses PEM keys as HMAC secrets)."""
    signing_input = _segments({"alg": "HS256", "typ": "JWT"}, payload)
    signature = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(signature)}"


def none_token(payload: dict[str, Any]) -> str:
    return _segments({"alg": "none", "typ": "JWT"}, payload) + "."


@dataclass
class Signer:
    """How one node kind's tokens are made: key, algorithm, and the claims it requires."""

    key: Any
    algorithm: str
    wrong_key: Any
    public_pem: bytes | None = None
    aud_iss: bool = False

    def claims(self, sub: str | None, ttl: float = 60, **extra: Any) -> dict[str, Any]:
        now = time.time()
        payload: dict[str, Any] = {"exp": int(now + ttl), "iat": int(now)}
        if sub is not None:
            payload["sub"] = sub
        if self.aud_iss:
            payload.update(aud=AUDIENCE, iss=ISSUER)
        payload.update(extra)
        return {k: v for k, v in payload.items() if v is not None}

    def sign(self, payload: dict[str, Any], key: Any = None) -> str:
        return jwt.encode(payload, self.key if key is None else key, algorithm=self.algorithm)

    def token(self, sub: str | None, ttl: float = 60, **extra: Any) -> str:
        return self.sign(self.claims(sub, ttl, **extra))


def _public_pem(private: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


# --- the nodes -----------------------------------------------------------------------------


@dataclass
class Nodes:
    hs: list[NodeProc]  # one cluster: HS256 (aud, iss), --api-key, --max-connections-per-uid 2
    rs: NodeProc  # same cluster: RS256 public key
    es: NodeProc  # same cluster: ES256 public key, --jwt-leeway
    strict: NodeProc  # anonymous, --allowed-origins
    lax: NodeProc  # anonymous, --allowed-origins --allow-missing-origin, per-uid limit 1
    limited: NodeProc  # anonymous, --rate-limit 5 --rate-burst 10
    signers: dict[str, Signer]

    @property
    def all(self) -> list[NodeProc]:
        return [*self.hs, self.rs, self.es, self.strict, self.lax, self.limited]


@pytest.fixture(scope="module")
def nodes(valkey: EmbeddedRedis, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nodes]:
    tmp = tmp_path_factory.mktemp("auth")
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    rsa_wrong = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    ec_wrong = ec.generate_private_key(ec.SECP256R1())
    rsa_pem, ec_pem = _public_pem(rsa_key), _public_pem(ec_key)
    (tmp / "rsa.pem").write_bytes(rsa_pem)
    (tmp / "ec.pem").write_bytes(ec_pem)

    def ns() -> list[str]:
        return ["--broker", valkey.url, "--namespace", f"t{uuid.uuid4().hex[:10]}"]

    jwt_ns = ns()
    hs_args = [*jwt_ns, "--jwt-secret", SECRET, "--jwt-audience", AUDIENCE,
               "--jwt-issuer", ISSUER, "--api-key", API_KEY,
               "--max-connections-per-uid", "2", "--node-heartbeat", "0.5"]  # fmt: skip
    es_args = [*jwt_ns, "--jwt-public-key", str(tmp / "ec.pem"), "--jwt-leeway", str(LEEWAY)]
    lax_args = [*ns(), "--allowed-origins", ORIGINS, "--allow-missing-origin",
                "--max-connections-per-uid", "1"]  # fmt: skip
    built = Nodes(
        hs=[NodeProc(0, hs_args, tmp), NodeProc(1, hs_args, tmp)],
        rs=NodeProc(2, [*jwt_ns, "--jwt-public-key", str(tmp / "rsa.pem")], tmp),
        es=NodeProc(3, es_args, tmp),
        strict=NodeProc(4, [*ns(), "--allowed-origins", ORIGINS], tmp),
        lax=NodeProc(5, lax_args, tmp),
        limited=NodeProc(6, [*ns(), "--rate-limit", "5", "--rate-burst", "10"], tmp),
        signers={
            "hs": Signer(SECRET, "HS256", OTHER_SECRET, aud_iss=True),
            "rs": Signer(rsa_key, "RS256", rsa_wrong, public_pem=rsa_pem),
            "es": Signer(ec_key, "ES256", ec_wrong, public_pem=ec_pem),
        },
    )
    try:
        for node in built.all:
            node.start(wait=False)
        for node in built.all:
            node.wait_healthy()
        yield built
    finally:
        for node in built.all:
            node.kill()


def node_of(nodes: Nodes, kind: str) -> NodeProc:
    return {"hs": nodes.hs[0], "rs": nodes.rs, "es": nodes.es}[kind]


# --- helpers -------------------------------------------------------------------------------


async def refused(url: str, **kw: Any) -> tuple[int, bytes]:
    """The HTTP status and body of a handshake the node must refuse."""
    with pytest.raises(InvalidStatus) as info:
        conn = await websockets.connect(url, compression=None, **kw)
        await conn.close()  # not reached when refused as expected
    return info.value.response.status_code, info.value.response.body


async def closed_without_welcome(url: str) -> ConnectionClosed:
    """Upgrade succeeds, then the server closes before any frame (no welcome)."""
    conn = await websockets.connect(url, compression=None)
    try:
        with pytest.raises(ConnectionClosed) as info:
            frame = await asyncio.wait_for(conn.recv(), 10)
            raise AssertionError(f"unexpected frame {frame!r}")
        return info.value
    finally:
        await conn.close()


async def error(ws: WS, frame: dict[str, Any], code: str) -> dict[str, Any]:
    reply = await ws.request(frame)
    assert reply["type"] == "error", reply
    assert reply["code"] == code, reply
    return reply


# --- 1. the JWT matrix ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["hs", "rs", "es"])
@pytest.mark.parametrize("via", ["query", "bearer"])
async def test_valid_token_binds_sub_before_welcome(
    nodes: Nodes, unique: str, kind: str, via: str
) -> None:
    sub = f"{kind}{via}{unique}"
    sender = await WS.open(f"{nodes.hs[1].ws_url}?token={nodes.signers['hs'].token(f's{sub}')}")
    token = nodes.signers[kind].token(sub)
    url = node_of(nodes, kind).ws_url
    if via == "query":
        ws = await WS.open(f"{url}?token={token}")
    else:
        ws = await WS.open(url, additional_headers={"Authorization": f"Bearer {token}"})
    assert ws.welcome["uid"] == sub
    # the welcome is a barrier: a message sent to the uid right now, from another node, arrives
    await sender.ok({"type": "send", "to": f"uid:{sub}", "data": {"n": 1}})
    msg = await ws.next(type="message")
    assert msg["to"] == f"uid:{sub}"
    assert msg["data"] == {"n": 1}
    assert msg["from"] == {"uid": f"s{sub}", "client_id": sender.client_id}


def _bad_tokens(nodes: Nodes, kind: str, sub: str) -> dict[str, str | None]:
    s = nodes.signers[kind]
    now = time.time()
    cases: dict[str, str | None] = {
        "no token": None,
        "garbage": "not-a-jwt",
        "expired": s.sign(s.claims(sub, exp=int(now - 4 * LEEWAY), iat=int(now - 600))),
        "nbf in the future": s.sign(s.claims(sub, nbf=int(now + 4 * LEEWAY))),
        "iat in the future": s.sign(s.claims(sub, iat=int(now + 4 * LEEWAY))),
        "bad signature": s.sign(s.claims(sub), key=s.wrong_key),
        "alg none": none_token(s.claims(sub)),
        "missing sub": s.sign(s.claims(None)),
        "missing exp": s.sign(s.claims(sub, exp=None)),
        "empty sub": s.sign(s.claims("")),
        "sub not a string": s.sign({**s.claims(sub), "sub": 5}),
        "sub too long": s.sign(s.claims("u" * 129)),
        "exp not a number": s.sign(s.claims(sub, exp=str(int(now + 60)))),
        "tampered payload": _tamper(s.token(sub), s.claims(f"{sub}x")),
    }
    if kind == "hs":
        cases["wrong aud"] = s.sign(s.claims(sub, aud="someone-else"))
        cases["wrong iss"] = s.sign(s.claims(sub, iss="https://evil.example"))
        cases["missing aud"] = s.sign(s.claims(sub, aud=None))
        rs = nodes.signers["rs"]
        cases["RS256 token to the HS256 node"] = rs.sign(s.claims(sub))
    else:
        assert s.public_pem is not None
        # the key-confusion attack: HS256 "signed" with the node's public key as secret
        cases["HS256 with the public PEM"] = hmac_token(s.claims(sub), s.public_pem)
        cases["HS256 with the node's secret"] = jwt.encode(s.claims(sub), SECRET, "HS256")
    return cases


def _tamper(token: str, payload: dict[str, Any]) -> str:
    header, _, signature = token.split(".")
    return f"{header}.{_b64(json.dumps(payload).encode())}.{signature}"


CASES = [
    "no token", "garbage", "expired", "nbf in the future", "iat in the future",
    "bad signature", "alg none", "missing sub", "missing exp", "empty sub", "sub not a string",
    "sub too long", "exp not a number", "tampered payload",
]  # fmt: skip
HS_ONLY = ["wrong aud", "wrong iss", "missing aud", "RS256 token to the HS256 node"]
KEY_ONLY = ["HS256 with the public PEM", "HS256 with the node's secret"]


@pytest.mark.parametrize(
    ("kind", "case"),
    [(k, c) for k in ("hs", "rs", "es") for c in CASES]
    + [("hs", c) for c in HS_ONLY]
    + [(k, c) for k in ("rs", "es") for c in KEY_ONLY],
)
async def test_bad_token_refused_401(nodes: Nodes, unique: str, kind: str, case: str) -> None:
    token = _bad_tokens(nodes, kind, f"bad{unique}")[case]
    url = node_of(nodes, kind).ws_url
    status, body = await refused(url if token is None else f"{url}?token={token}")
    assert status == 401, (case, body)
    assert set(json.loads(body)) == {"error"}
    if token is not None:
        assert token.encode() not in body
        for part in token.split("."):
            assert not part or part.encode() not in body, (case, body)
        # the same token in the Authorization header is refused the same way
        headers = {"Authorization": f"Bearer {token}"}
        status, body = await refused(url, additional_headers=headers)
        assert status == 401, (case, body)
        assert token.encode() not in body


@pytest.mark.parametrize("header", ["Basic abc", "Bearer", "Bearer  ", "Token x"])
async def test_malformed_authorization_header_401(nodes: Nodes, header: str) -> None:
    status, _ = await refused(nodes.hs[0].ws_url, additional_headers={"Authorization": header})
    assert status == 401


async def test_query_with_too_many_fields_is_a_401_not_a_500(nodes: Nodes, unique: str) -> None:
    """The token is looked up in at most 100 query fields: more is a bad handshake (401),
    not an exception whose text picows would send as a 500."""
    token = nodes.signers["hs"].token(f"q{unique}")
    status, body = await refused(f"{nodes.hs[0].ws_url}?token={token}" + "&x=1" * 100)
    assert status == 401, body
    assert json.loads(body) == {"error": "malformed query string"}


async def test_anonymous_node_ignores_token_and_jwt_node_refuses_uid_login(
    nodes: Nodes, unique: str
) -> None:
    anon = await WS.open(nodes.lax.ws_url)
    assert anon.welcome["uid"] is None
    token = nodes.signers["hs"].token(f"t{unique}")
    await error(anon, {"type": "login", "token": token}, "forbidden")
    await anon.ok({"type": "ping"})


async def test_leeway(nodes: Nodes, unique: str) -> None:
    """Within --jwt-leeway, a token just past its exp (or just before its nbf) is accepted, and
    the connection is not closed at once for an expiry the handshake forgave."""
    s = nodes.signers["es"]
    now = time.time()
    late = s.sign(s.claims(f"late{unique}", exp=int(now - 5)))
    early = s.sign(s.claims(f"early{unique}", nbf=int(now + 5)))
    ws_late = await WS.open(f"{nodes.es.ws_url}?token={late}")
    ws_early = await WS.open(f"{nodes.es.ws_url}?token={early}")
    assert ws_late.welcome["uid"] == f"late{unique}"
    assert ws_early.welcome["uid"] == f"early{unique}"
    await asyncio.sleep(1)
    await ws_late.ok({"type": "ping"})
    await ws_early.ok({"type": "ping"})
    # the HS node has no leeway: the same lateness is refused there
    hs = nodes.signers["hs"]
    status, _ = await refused(f"{nodes.hs[0].ws_url}?token={hs.token('x', ttl=-5)}")
    assert status == 401


# --- 2. token expiry and re-login ----------------------------------------------------------


async def test_token_expiry_and_refresh(nodes: Nodes, unique: str) -> None:
    s = nodes.signers["hs"]
    sub = f"exp{unique}"
    url = nodes.hs[0].ws_url
    exp = time.time() + 6  # room for a slow machine before the refresh
    short = s.sign(s.claims(sub, exp=exp))
    first = await WS.open(f"{url}?token={short}")
    second = await WS.open(f"{url}?token={short}")
    assert first.welcome["uid"] == second.welcome["uid"] == sub
    # refused logins change nothing and the connection stays usable
    bad = s.sign(s.claims(sub, ttl=600), key=s.wrong_key)
    reply = await error(second, {"type": "login", "token": bad}, "forbidden")
    assert bad not in reply["message"]
    await second.ok({"type": "ping"})
    await error(second, {"type": "login", "uid": sub}, "forbidden")
    await second.ok({"type": "ping"})
    await error(second, {"type": "login", "token": s.token(sub, ttl=-30)}, "forbidden")
    await second.ok({"type": "ping"})
    # a refresh: same sub, later exp (before the first one expires)
    assert time.time() < exp - 0.5, "the machine is too slow for this test"
    ack = await second.ok({"type": "login", "token": s.token(sub, ttl=600)})
    assert ack["uid"] == sub

    with pytest.raises(ConnectionClosed):
        await first.next(timeout=15)
    closed_at = time.time()
    assert first.conn.close_code == 1008
    assert first.conn.close_reason == "token expired"
    assert closed_at >= exp - 0.5  # not before the token expired (some timer slack)

    await asyncio.sleep(max(0.0, exp + 1 - time.time()))
    await second.ok({"type": "ping"})  # still open past the first token's exp
    sender = await WS.open(f"{nodes.hs[1].ws_url}?token={s.token(f's{sub}')}")
    await sender.ok({"type": "send", "to": f"uid:{sub}", "data": "still here"})
    assert (await second.next(type="message"))["data"] == "still here"


async def test_relogin_with_token_rebinds_uid(nodes: Nodes, unique: str) -> None:
    s = nodes.signers["hs"]
    old, new = f"old{unique}", f"new{unique}"
    ws = await WS.open(f"{nodes.hs[0].ws_url}?token={s.token(old)}")
    sender = await WS.open(f"{nodes.hs[1].ws_url}?token={s.token(f's{unique}')}")
    ack = await ws.ok({"type": "login", "token": s.token(new)})
    assert ack["uid"] == new
    # the ack is a barrier both ways: nothing more for the old uid, everything for the new
    await sender.ok({"type": "send", "to": f"uid:{old}", "data": "old"})
    await sender.ok({"type": "send", "to": f"uid:{new}", "data": "new"})
    msg = await ws.next(type="message")
    assert msg["data"] == "new"
    await ws.nothing()
    # the new token's claims replace the old ones: wider, then narrower
    await error(ws, {"type": "send", "to": "all", "data": 0}, "forbidden")
    await ws.ok({"type": "login", "token": s.token(new, can_broadcast=True, groups=[])})
    await ws.ok({"type": "send", "to": "all", "data": "wide"})
    await error(ws, {"type": "join", "group": f"g{unique}"}, "forbidden")
    await ws.ok({"type": "login", "token": s.token(new)})
    await error(ws, {"type": "send", "to": "all", "data": 0}, "forbidden")
    await ws.ok({"type": "join", "group": f"g{unique}"})


# --- 3. Origin -----------------------------------------------------------------------------


@pytest.mark.parametrize("origin", ["http://a.example", "https://b.example", "HTTP://A.Example/"])
async def test_allowed_origin_welcomed(nodes: Nodes, origin: str) -> None:
    for node in (nodes.strict, nodes.lax):
        ws = await WS.open(node.ws_url, origin=origin)
        assert ws.welcome["type"] == "welcome"


@pytest.mark.parametrize(
    "origin",
    ["http://c.example", "https://a.example", "http://b.example", "http://a.example:8080",
     "http://a.example.evil", "null"],
)  # fmt: skip
async def test_other_origin_403(nodes: Nodes, origin: str) -> None:
    for node in (nodes.strict, nodes.lax):
        status, body = await refused(node.ws_url, origin=origin)
        assert status == 403, body


async def test_origin_header_name_is_case_insensitive(nodes: Nodes) -> None:
    # a lower-case header name is the same header: not "missing" (which the lax node allows)
    status, _ = await refused(nodes.lax.ws_url, additional_headers={"origin": "http://c.example"})
    assert status == 403
    ws = await WS.open(nodes.strict.ws_url, additional_headers={"origin": "http://a.example"})
    assert ws.welcome["type"] == "welcome"


async def test_missing_origin(nodes: Nodes) -> None:
    status, _ = await refused(nodes.strict.ws_url)
    assert status == 403
    ws = await WS.open(nodes.lax.ws_url)  # --allow-missing-origin
    assert ws.welcome["uid"] is None


async def test_plain_get_of_ws_says_whether_the_token_passes(nodes: Nodes, unique: str) -> None:
    """A page cannot see why its handshake failed (1006): a plain GET of /ws tells it, without
    the Origin check (a same-origin GET has no Origin; a plain GET opens no socket)."""
    signer = nodes.signers["hs"]
    cases = [
        (nodes.hs[0].ws_url, None, 401, "missing token"),
        (f"{nodes.hs[0].ws_url}?token={signer.token(f'g{unique}')}", None, 426, "upgrade"),
        (f"{nodes.hs[0].ws_url}?token={signer.token(f'g{unique}', ttl=-600)}", None, 401, "expir"),
        (nodes.hs[0].ws_url, f"Bearer {signer.token(f'g{unique}')}", 426, "upgrade"),
        (nodes.strict.ws_url, None, 426, "upgrade"),  # --allowed-origins: no 403 here
    ]
    async with aiohttp.ClientSession() as http:
        for url, bearer, status, reason in cases:
            headers = {"Authorization": bearer} if bearer else {}
            async with http.get(url.replace("ws://", "http://"), headers=headers) as r:
                body = await r.json()
                assert (r.status, reason in body["error"]) == (status, True), (url, body)
    status, _ = await refused(nodes.strict.ws_url)  # the upgrade itself still needs the Origin
    assert status == 403


# --- 4. policy -----------------------------------------------------------------------------


async def test_policy_default_claims(nodes: Nodes, unique: str) -> None:
    s = nodes.signers["hs"]
    me, peer_uid, g = f"pol{unique}", f"peer{unique}", f"g{unique}"
    ws = await WS.open(f"{nodes.hs[0].ws_url}?token={s.token(me)}")
    peer = await WS.open(f"{nodes.hs[1].ws_url}?token={s.token(peer_uid)}")
    await ws.ok({"type": "send", "to": f"uid:{peer_uid}", "data": 1})
    await ws.ok({"type": "send", "to": f"client:{peer.client_id}", "data": 2})
    assert (await peer.next(type="message"))["data"] == 1
    assert (await peer.next(type="message"))["data"] == 2
    await error(ws, {"type": "send", "to": f"group:{g}", "data": 3}, "forbidden")
    await ws.ok({"type": "ping"})  # still usable
    await ws.ok({"type": "join", "group": g})  # any group may be joined by default
    await ws.ok({"type": "send", "to": f"group:{g}", "data": 4})
    assert (await ws.next(type="message"))["data"] == 4
    await error(ws, {"type": "send", "to": "all", "data": 5}, "forbidden")
    await ws.ok({"type": "ping"})
    ack = await ws.ok({"type": "presence", "to": f"uid:{peer_uid}"})
    assert ack["online"] is True
    await ws.ok({"type": "leave", "group": g})
    await error(ws, {"type": "send", "to": f"group:{g}", "data": 6}, "forbidden")
    await peer.nothing(0.2)


async def test_policy_can_broadcast(nodes: Nodes, unique: str) -> None:
    s = nodes.signers["hs"]
    ws = await WS.open(f"{nodes.hs[0].ws_url}?token={s.token(f'b{unique}', can_broadcast=True)}")
    other = await WS.open(f"{nodes.hs[1].ws_url}?token={s.token(f'o{unique}')}")
    await ws.ok({"type": "send", "to": "all", "data": unique})
    assert (await other.next(type="message"))["data"] == unique
    # a non-boolean grant is no grant
    odd = await WS.open(f"{nodes.hs[0].ws_url}?token={s.token(f'x{unique}', can_broadcast=1)}")
    await error(odd, {"type": "send", "to": "all", "data": 0}, "forbidden")


async def test_policy_groups_claim(nodes: Nodes, unique: str) -> None:
    s = nodes.signers["hs"]
    token = s.token(f"gr{unique}", groups=["room:*"])
    ws = await WS.open(f"{nodes.hs[0].ws_url}?token={token}")
    await ws.ok({"type": "join", "group": f"room:{unique}"})
    await error(ws, {"type": "join", "group": f"lobby{unique}"}, "forbidden")
    await error(ws, {"type": "join", "group": f"xroom:{unique}"}, "forbidden")
    await ws.ok({"type": "ping"})
    await ws.ok({"type": "send", "to": f"group:room:{unique}", "data": 1})
    assert (await ws.next(type="message"))["data"] == 1
    # presence: only the groups it may join (or has joined) are visible
    seen = await ws.ok({"type": "presence", "to": f"group:room:{unique}"})
    assert seen["uids"] == [f"gr{unique}"] and seen["count"] == 1
    await ws.ok({"type": "presence", "to": f"group:room:other{unique}"})
    await error(ws, {"type": "presence", "to": f"group:lobby{unique}"}, "forbidden")
    await ws.ok({"type": "presence", "to": f"uid:gr{unique}"})


async def test_policy_send_groups_claim(nodes: Nodes, unique: str) -> None:
    s = nodes.signers["hs"]
    listener = await WS.open(f"{nodes.hs[1].ws_url}?token={s.token(f'l{unique}')}")
    await listener.ok({"type": "join", "group": f"news:{unique}"})
    token = s.token(f"sg{unique}", send_groups=["news:*"])
    ws = await WS.open(f"{nodes.hs[0].ws_url}?token={token}")
    await ws.ok({"type": "send", "to": f"group:news:{unique}", "data": "extra"})
    assert (await listener.next(type="message"))["data"] == "extra"
    await error(ws, {"type": "send", "to": f"group:sport:{unique}", "data": 0}, "forbidden")
    await ws.ok({"type": "ping"})


async def test_policy_presence_claim(nodes: Nodes, unique: str) -> None:
    s = nodes.signers["hs"]
    ws = await WS.open(f"{nodes.hs[0].ws_url}?token={s.token(f'pr{unique}', presence=False)}")
    await error(ws, {"type": "presence", "to": f"uid:pr{unique}"}, "forbidden")
    await error(ws, {"type": "presence", "to": f"group:g{unique}"}, "forbidden")
    await ws.ok({"type": "ping"})


async def test_policy_anonymous_allows_everything(nodes: Nodes, unique: str) -> None:
    ws = await WS.open(nodes.lax.ws_url, f"an{unique}")
    other = await WS.open(nodes.lax.ws_url, f"ao{unique}")
    await other.ok({"type": "join", "group": f"lobby{unique}"})
    await ws.ok({"type": "send", "to": f"group:lobby{unique}", "data": "not joined"})
    assert (await other.next(type="message"))["data"] == "not joined"
    await ws.ok({"type": "send", "to": "all", "data": "everyone"})
    assert (await other.next(type="message"))["data"] == "everyone"
    await ws.ok({"type": "join", "group": f"any:{unique}"})
    ack = await ws.ok({"type": "presence", "to": f"group:lobby{unique}"})
    assert ack["uids"] == [f"ao{unique}"] and ack["count"] == 1


# --- 5. the API key ------------------------------------------------------------------------


async def test_api_key(nodes: Nodes, unique: str) -> None:
    s = nodes.signers["hs"]
    ws = await WS.open(f"{nodes.hs[0].ws_url}?token={s.token(f'k{unique}')}")
    url = f"{nodes.hs[1].api_url}/api/send"
    body = {"to": f"uid:k{unique}", "data": "from the backend"}
    async with aiohttp.ClientSession() as http:
        for headers in (
            {},
            {"Authorization": "Bearer wrong-key"},
            {"Authorization": API_KEY},  # no scheme
            {"Authorization": f"Basic {API_KEY}"},
            {"Authorization": f"Bearer {API_KEY}x"},
            {"Authorization": f"Bearer {s.token(f'k{unique}')}"},  # a client JWT is no API key
        ):
            async with http.post(url, json=body, headers=headers) as r:
                assert r.status == 401, headers
                answer = await r.json()
                assert answer["error"]["code"] == "forbidden"
                assert API_KEY not in json.dumps(answer)
        async with http.get(f"{nodes.hs[1].api_url}/api/stats") as r:
            assert r.status == 401
        async with http.get(f"{nodes.hs[1].api_url}/healthz") as r:
            assert r.status == 200  # not under /api/
        await ws.nothing(0.2)
        good = {"Authorization": f"Bearer {API_KEY}"}
        async with http.post(url, json=body, headers=good) as r:
            assert r.status == 200
            assert await r.json() == {"ok": True}
    msg = await ws.next(type="message")
    assert msg["data"] == "from the backend" and msg["from"] is None


async def test_api_key_header_that_is_not_utf8_is_a_401(nodes: Nodes) -> None:
    """An Authorization header with bytes that are not UTF-8 is a wrong key (401), not an
    unhandled exception (500, and a traceback in the node's log for every such request)."""
    api = nodes.hs[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", api.api_port)
    try:
        writer.write(b"GET /api/stats HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                     b"Authorization: Bearer \xff\xfe" + API_KEY.encode() + b"\r\n\r\n")
        status_line = await asyncio.wait_for(reader.readline(), 5)
    finally:
        writer.close()
    assert status_line.split()[1] == b"401", status_line
    await asyncio.sleep(0.2)
    assert "UnicodeEncodeError" not in api.log()


# --- 6. the rate limit ---------------------------------------------------------------------


async def test_rate_limit(nodes: Nodes) -> None:
    """Over the rate, frames are answered rate_limited and not processed; `ping` is exempt
    (the protocol answers every ping with a pong)."""
    ws = await WS.open(nodes.limited.ws_url)
    for i in range(1, 31):
        await ws.send_raw(json.dumps({"type": "leave", "group": "nope", "id": i}))
    replies = [json.loads(await asyncio.wait_for(ws.conn.recv(), 5)) for _ in range(30)]
    assert sorted(r["id"] for r in replies) == list(range(1, 31))  # each answered once
    acks = sorted(r["id"] for r in replies if r["type"] == "ack")
    limited = [r for r in replies if r["type"] == "error"]
    assert all(r["code"] == "rate_limited" for r in limited), limited
    assert 10 <= len(acks) <= 12, replies
    assert acks[:10] == list(range(1, 11))  # the burst
    assert len(acks) + len(limited) == 30
    for i in range(31, 61):  # the bucket is empty, pings are still answered
        await ws.send_raw(json.dumps({"type": "ping", "id": i}))
    pongs = [json.loads(await asyncio.wait_for(ws.conn.recv(), 5)) for _ in range(30)]
    assert [p["type"] for p in pongs] == ["pong"] * 30
    await asyncio.sleep(1.2)
    await ws.ok({"type": "leave", "group": "nope"})  # open, and the bucket refilled


async def test_rate_limit_abuse_closes_1008(nodes: Nodes) -> None:
    """Rate-limited frames are charged to the abuse bucket (1000 in a burst, 100/s): a client
    that keeps flooding is closed 1008."""
    ws = await WS.open(nodes.limited.ws_url)
    counts = {"ack": 0, "rate_limited": 0, "other": 0}

    async def read() -> None:
        try:
            while True:
                msg = json.loads(await ws.conn.recv())
                if msg["type"] == "ack":
                    counts["ack"] += 1
                elif msg.get("code") == "rate_limited":
                    counts["rate_limited"] += 1
                else:
                    counts["other"] += 1
        except ConnectionClosed:
            return

    reader = asyncio.create_task(read())
    frame = json.dumps({"type": "leave", "group": "nope", "id": 1})
    sent = 0
    try:
        for _ in range(3000):
            await ws.conn.send(frame)
            sent += 1
    except ConnectionClosed:
        pass
    await asyncio.wait_for(reader, 15)
    assert ws.conn.close_code == 1008, (ws.conn.close_code, counts, sent)
    assert ws.conn.close_reason == "too many bad frames"
    assert counts["other"] == 0
    # The burst's frames are processed (each `leave` is acked after its presence barrier; on a
    # loaded machine the abuse close can come first and those acks are never written) and
    # nothing beyond burst + refill is: that admitted frames really are acked is checked by
    # test_rate_limit.
    assert counts["ack"] <= 40, counts
    assert counts["rate_limited"] >= 1000, counts


# --- 7. the per-uid connection limit -------------------------------------------------------


async def test_per_uid_limit_across_nodes(nodes: Nodes, unique: str) -> None:
    s = nodes.signers["hs"]
    sub = f"alice{unique}"
    token = s.token(sub)
    a_url, b_url = (f"{n.ws_url}?token={token}" for n in nodes.hs)
    a1 = await WS.open(a_url)
    a2 = await WS.open(a_url)
    assert a1.welcome["uid"] == a2.welcome["uid"] == sub
    # a third on the same node: refused at the handshake (this node alone holds the limit)
    status, body = await refused(a_url)
    assert status == 429, body
    # a third on the other node: upgraded, then closed 1008 once the cluster-wide count is
    # read after the bind, before any welcome
    closed = await closed_without_welcome(b_url)
    assert closed.rcvd is not None and closed.rcvd.code == 1008, closed
    assert closed.rcvd.reason == "too many connections for this user"
    # the refused connection left no trace: alice's two connections still get her messages
    sender = await WS.open(f"{nodes.hs[1].ws_url}?token={s.token(f's{unique}')}")
    await sender.ok({"type": "send", "to": f"uid:{sub}", "data": 1})
    assert (await a1.next(type="message"))["data"] == 1
    assert (await a2.next(type="message"))["data"] == 1

    await a1.close()
    await asyncio.sleep(0.5)  # the presence record of a1 goes
    deadline = time.monotonic() + 10
    while True:
        try:
            b1 = await WS.open(b_url)
            break
        except ConnectionClosedError as exc:  # presence not settled yet
            assert exc.rcvd is not None and exc.rcvd.code == 1008
            assert time.monotonic() < deadline, "a1's close never freed a place"
            await asyncio.sleep(0.3)
    assert b1.welcome["uid"] == sub
    # full again: node A holds one connection only, so its handshake passes, then the
    # cluster-wide count refuses
    closed = await closed_without_welcome(a_url)
    assert closed.rcvd is not None and closed.rcvd.code == 1008


async def test_per_uid_limit_anonymous_login(nodes: Nodes, unique: str) -> None:
    bob = f"bob{unique}"
    first = await WS.open(nodes.lax.ws_url, bob)  # the lax node has a limit of 1
    second = await WS.open(nodes.lax.ws_url)
    await error(second, {"type": "login", "uid": bob}, "forbidden")
    await second.ok({"type": "ping"})
    ack = await second.ok({"type": "login", "uid": f"carol{unique}"})
    assert ack["uid"] == f"carol{unique}"
    await first.ok({"type": "login", "uid": bob})  # a repeated login of the holder is fine
    await first.close()
    await asyncio.sleep(0.3)
    await second.ok({"type": "login", "uid": bob})  # now bob's place is free


async def test_node_refuses_to_start_with_a_short_secret(
    tmp_path: Path, valkey: EmbeddedRedis
) -> None:
    node = NodeProc(9, ["--broker", valkey.url, "--jwt-secret", "short"], tmp_path)
    node.start(wait=False)
    assert node.proc is not None
    try:
        assert node.proc.wait(20) == 2
    finally:
        node.kill()
    assert "--jwt-secret must be at least 32 bytes" in node.log()


async def test_python_client_reports_why_its_handshake_was_refused(nodes: Nodes) -> None:
    """wscluster.client: a refused token is terminal (no retry loop) and says why."""
    from wscluster.client import Client, HandshakeRefused

    s = nodes.signers["hs"]
    client = Client(nodes.hs[0].ws_url, token=s.token("late", ttl=-30))
    with pytest.raises(HandshakeRefused) as refused:
        await asyncio.wait_for(client.connect(), 10)
    assert (refused.value.status, refused.value.reason) == (401, "token expired")
    assert "token expired" in str(refused.value)
    async with Client(nodes.hs[0].ws_url, token=s.token("fine")) as ok:
        assert (await ok.ping())["type"] == "pong"
