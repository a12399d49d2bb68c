"""The handshake token as the gate reads it (no network): ``?token=``, ``Authorization:
Bearer`` and the WebSocket subprotocol ``bearer.<token>`` (how a browser sends it: it cannot
set headers, and a URL ends up in access logs); two different tokens are refused; which
subprotocol the node selects; what an application's ``on_handshake`` gets to see."""

from __future__ import annotations

import time
from collections.abc import Mapping

import jwt
import pytest
from multidict import CIMultiDict

from wscluster.app import Reject, Request
from wscluster.config import NodeConfig
from wscluster.gate import (
    SUBPROTOCOL,
    Gate,
    Refusal,
    make_verifier,
    offered_subprotocols,
    selected_subprotocol,
)

SECRET = "unit-test-secret-0123456789abcdefghijkl"


def token(sub: str, ttl: float = 60, key: str = SECRET) -> str:
    now = int(time.time())
    return jwt.encode({"sub": sub, "iat": now, "exp": now + int(ttl)}, key, algorithm="HS256")


def gate(hook: object = None, jwt_mode: bool = True) -> Gate:
    config = NodeConfig(jwt_secret=SECRET) if jwt_mode else NodeConfig(anonymous=True)
    return Gate(config, make_verifier(config), lambda uid: 0, hook,  # type: ignore[arg-type]
                keep_request=hook is not None)  # fmt: skip


def protocols(*values: str) -> CIMultiDict[str]:
    """Headers as picows hands them over: one Sec-WebSocket-Protocol line per value."""
    headers: CIMultiDict[str] = CIMultiDict()
    for value in values:
        headers.add("Sec-WebSocket-Protocol", value)
    return headers


def check(query: str, headers: Mapping[str, str], g: Gate | None = None) -> Request | Refusal:
    return (g or gate()).check("/ws", query, headers)


def test_token_as_subprotocol_is_the_only_token_needed() -> None:
    t = token("alice")
    for headers in (
        protocols(f"{SUBPROTOCOL}, bearer.{t}"),
        protocols(f"bearer.{t}, {SUBPROTOCOL}"),
        protocols(SUBPROTOCOL, f"bearer.{t}"),  # two header lines
        protocols(f"bearer.{t}"),  # without wscluster.v1 (not what a browser should do)
        {"sec-websocket-protocol": f"{SUBPROTOCOL},bearer.{t}"},  # a plain dict, any casing
    ):
        verdict = check("", headers)
        assert isinstance(verdict, Request), (headers, verdict)
        assert verdict.uid == "alice"


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("bearer.not-a-jwt", None),
        (f"bearer.{token('old', ttl=-60)}", "token expired"),
        (f"bearer.{token('x', key='another-secret-0123456789abcdefghijk')}", "bad signature"),
        ("bearer.", "missing token"),  # an empty one is no token
        (f"Bearer.{token('case')}", "missing token"),  # subprotocols are case-sensitive
        (SUBPROTOCOL, "missing token"),
        ("chat, superchat", "missing token"),
    ],
)
def test_bad_or_missing_subprotocol_token_is_a_401(value: str, reason: str | None) -> None:
    verdict = check("", protocols(f"{SUBPROTOCOL}, {value}"))
    assert isinstance(verdict, Refusal)
    assert verdict.status == 401
    if reason is not None:
        assert verdict.reason == reason
    secret = value.partition(".")[2]
    assert not secret or secret not in verdict.reason


def test_query_and_authorization_still_work() -> None:
    t = token("bob")
    for query, headers in (
        (f"token={t}", {}),
        ("", {"Authorization": f"Bearer {t}"}),
        (f"token={t}", protocols(SUBPROTOCOL)),  # offering only wscluster.v1 is fine
    ):
        verdict = check(query, headers)
        assert isinstance(verdict, Request) and verdict.uid == "bob", (query, headers)


def test_two_different_tokens_are_refused_the_same_one_twice_is_fine() -> None:
    """Which identity would win is not guessed: a handshake carrying two different tokens
    (in any two places) is refused, even when both are valid."""
    a, b = token("ann"), token("ben")
    conflicting: list[tuple[str, Mapping[str, str]]] = [
        (f"token={a}", protocols(f"{SUBPROTOCOL}, bearer.{b}")),
        ("", CIMultiDict({"Authorization": f"Bearer {a}",
                          "Sec-WebSocket-Protocol": f"{SUBPROTOCOL}, bearer.{b}"})),
        (f"token={a}", {"Authorization": f"Bearer {b}"}),
        ("", protocols(f"bearer.{a}, bearer.{b}")),
        ("", protocols(f"bearer.{a}", f"bearer.{b}")),
    ]  # fmt: skip
    for query, headers in conflicting:
        verdict = check(query, headers)
        assert verdict == Refusal(401, "conflicting tokens"), (query, headers)
    same: list[tuple[str, Mapping[str, str]]] = [
        (f"token={a}", protocols(f"{SUBPROTOCOL}, bearer.{a}")),
        (f"token={a}", {"Authorization": f"Bearer {a}"}),
        ("", protocols(f"bearer.{a}, bearer.{a}")),
    ]
    for query, headers in same:
        verdict = check(query, headers)
        assert isinstance(verdict, Request) and verdict.uid == "ann", (query, headers)


def test_anonymous_node_ignores_tokens() -> None:
    verdict = check("", protocols(f"{SUBPROTOCOL}, bearer.x, bearer.y"), gate(jwt_mode=False))
    assert isinstance(verdict, Request) and verdict.uid is None


def test_diagnosis_reads_the_subprotocol_too() -> None:
    g = gate()
    t = token("carol")
    assert g.diagnose("", protocols(f"{SUBPROTOCOL}, bearer.{t}")).status == 426
    assert g.diagnose("", protocols(f"bearer.{token('c', ttl=-60)}")) == Refusal(
        401, "token expired"
    )
    assert g.diagnose("", protocols(SUBPROTOCOL)) == Refusal(401, "missing token")
    assert g.diagnose(f"token={t}", protocols(f"bearer.{token('d')}")) == Refusal(
        401, "conflicting tokens"
    )


def test_selected_subprotocol() -> None:
    """The node selects wscluster.v1 when offered (a browser fails the connection when the
    server selects nothing of what it offered, or something it did not offer), and never
    anything else, least of all the bearer entry."""
    t = token("dan")
    assert selected_subprotocol(protocols(f"bearer.{t}, {SUBPROTOCOL}")) == SUBPROTOCOL
    assert selected_subprotocol(protocols(f"bearer.{t}", SUBPROTOCOL)) == SUBPROTOCOL
    assert selected_subprotocol({"SEC-WEBSOCKET-PROTOCOL": SUBPROTOCOL}) == SUBPROTOCOL
    others: list[Mapping[str, str]] = [protocols(f"bearer.{t}"), protocols("chat"), protocols(),
                                       {}, protocols("wscluster.v2"), protocols("WSCLUSTER.V1")]
    for headers in others:
        assert selected_subprotocol(headers) is None, headers
    assert offered_subprotocols(protocols(" a ,b,, c", "d")) == ["a", "b", "c", "d"]


def test_application_never_sees_the_bearer_entry() -> None:
    """Like ``?token=`` (removed from ``request.query``), the ``bearer.`` entry is removed
    from ``request.headers`` before ``on_handshake``: an application that logs the headers
    must not log the token. The other subprotocols stay."""
    seen: list[Request] = []

    def hook(request: Request) -> Reject | None:
        seen.append(request)
        return None

    t = token("eve")
    headers = protocols(f"{SUBPROTOCOL}, bearer.{t}, chat")
    headers.add("X-Other", "1")
    verdict = check(f"token={t}&room=1", headers, gate(hook))
    assert isinstance(verdict, Request) and verdict.uid == "eve"
    (request,) = seen
    assert request.query == {"room": "1"}
    assert t not in repr(dict(request.headers)) and t not in repr(request)
    assert offered_subprotocols(request.headers) == [SUBPROTOCOL, "chat"]
    assert request.headers.get("X-Other") == "1"
    assert t in headers.getone("Sec-WebSocket-Protocol")  # picows's own copy is untouched
    # only the bearer entry: no Sec-WebSocket-Protocol header is left
    seen.clear()
    assert isinstance(check("", protocols(f"bearer.{t}"), gate(hook)), Request)
    assert "Sec-WebSocket-Protocol" not in seen[0].headers
