"""The handshake checks of a node, in order (after the public server's own 503 when the node
is full or draining): Origin (403), JWT (401), the uid's connections on this node (429),
then the application's ``on_handshake``. Synchronous: picows decides the upgrade in a plain
callback. The JWT comes as ``?token=``, ``Authorization: Bearer`` or the subprotocol
``bearer.<JWT>`` (how browsers send it)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl

from multidict import CIMultiDict

from .app import Reject, Request
from .auth import AuthError, JwtVerifier, OriginPolicy, token_from
from .config import NodeConfig

log = logging.getLogger("wscluster.node")


_NOTHING: dict[str, str] = {}


@dataclass(frozen=True, slots=True)
class Refusal:
    status: int
    reason: str


# A browser cannot set headers on a WebSocket, and a token in the URL ends up in access logs:
# it offers the subprotocols [SUBPROTOCOL, BEARER + token] instead. The node selects
# SUBPROTOCOL (a browser fails a connection whose server selects none of the offered ones)
# and never echoes the token.
SUBPROTOCOL = "wscluster.v1"
BEARER = "bearer."
_PROTOCOL_HEADER = "Sec-WebSocket-Protocol"


def offered_subprotocols(headers: Mapping[str, str]) -> list[str]:
    """The subprotocols a handshake offers, in order: every ``Sec-WebSocket-Protocol`` line
    (``headers`` is picows's case-insensitive multidict, or any mapping), split at commas."""
    getall = getattr(headers, "getall", None)
    if getall is not None:
        values: list[str] = getall(_PROTOCOL_HEADER, [])
    else:
        values = [v for k, v in headers.items() if k.lower() == "sec-websocket-protocol"]
    return [p for value in values for p in (part.strip() for part in value.split(",")) if p]


def selected_subprotocol(headers: Mapping[str, str]) -> str | None:
    """What the node answers in ``Sec-WebSocket-Protocol``: SUBPROTOCOL when it is offered,
    else nothing (a client that offered only other ones, or none, gets none)."""
    return SUBPROTOCOL if SUBPROTOCOL in offered_subprotocols(headers) else None


def _token(query: str, headers: Mapping[str, str]) -> str | Refusal:
    """The one token of a handshake: ``?token=``, ``Authorization: Bearer`` or a ``bearer.``
    subprotocol. Two different ones are refused rather than one of them guessed at."""
    try:
        query_token = token_from(query, _NOTHING)
    except ValueError:  # e.g. more fields than parse_qs takes: not a 500
        return Refusal(401, "malformed query string")
    found = {t for t in (query_token, token_from("", headers)) if t}
    found.update(p[len(BEARER) :] for p in offered_subprotocols(headers) if p.startswith(BEARER))
    found.discard("")
    if len(found) > 1:
        return Refusal(401, "conflicting tokens")
    return found.pop() if found else Refusal(401, "missing token")


def _without_bearer(headers: Mapping[str, str]) -> Mapping[str, str]:
    """The headers an application sees: the ``bearer.`` subprotocol taken out (as ``token``
    is from the query), so that logging the headers does not log it."""
    offered = offered_subprotocols(headers)
    if not any(p.startswith(BEARER) for p in offered):
        return headers
    copy: CIMultiDict[str] = CIMultiDict(headers)
    copy.popall(_PROTOCOL_HEADER, None)
    rest = [p for p in offered if not p.startswith(BEARER)]
    if rest:
        copy[_PROTOCOL_HEADER] = ", ".join(rest)
    return copy


def make_verifier(config: NodeConfig) -> JwtVerifier | None:
    """The JWT verifier the options ask for (ValueError with a clear message if bad)."""
    kw = {"audience": config.jwt_audience, "issuer": config.jwt_issuer,
          "leeway": config.jwt_leeway, "max_lifetime": config.jwt_max_lifetime}  # fmt: skip
    if config.jwt_secret:
        return JwtVerifier(secret=config.jwt_secret, **kw)  # type: ignore[arg-type]
    if config.jwt_public_key:
        if not Path(config.jwt_public_key).is_file():
            raise ValueError(f"--jwt-public-key {config.jwt_public_key}: no such file")
        return JwtVerifier.from_file(config.jwt_public_key, **kw)  # type: ignore[arg-type]
    return None


class Gate:
    def __init__(
        self,
        config: NodeConfig,
        verifier: JwtVerifier | None,
        uid_count: Callable[[str], int],
        app_hook: Callable[[Request], Reject | None] | None,
        keep_request: bool = True,
    ) -> None:
        origins = config.origins
        self.origins = (
            OriginPolicy(origins, config.allow_missing_origin) if origins is not None else None
        )
        self.verifier = verifier
        self.per_uid = config.max_connections_per_uid
        self.uid_count = uid_count
        self.app_hook = app_hook
        self.keep_request = keep_request  # only an application reads them after the upgrade

    def diagnose(self, query: str, headers: Mapping[str, str]) -> Refusal:
        """A plain GET of the WebSocket path (no upgrade): say whether the token would pass,
        so a page can tell "needs a token" from "node down" (a browser sees any refused
        handshake as 1006). The Origin is not checked: a plain GET opens no socket, and a
        same-origin GET carries no Origin header; nothing but the token is looked at."""
        if self.verifier is not None:
            token = _token(query, headers)
            if isinstance(token, Refusal):
                return token
            try:
                self.verifier.verify(token)
            except AuthError as exc:
                return Refusal(401, exc.reason)
        return Refusal(426, "this is a WebSocket endpoint: upgrade to connect")

    def check(
        self, path: str, query: str, headers: Mapping[str, str]
    ) -> Request | Refusal:
        if self.origins is not None and not self.origins.allows(headers.get("Origin")):
            return Refusal(403, "origin not allowed")
        forwarded = headers.get("X-Forwarded-For")
        peer = forwarded.split(",", 1)[0].strip() or None if forwarded else None
        if self.keep_request:
            params = dict(parse_qsl(query, keep_blank_values=True))
            params.pop("token", None)  # never handed to the app, which might log it
            request = Request(path, params, _without_bearer(headers), peer)
        else:  # no application: keep nothing per connection that nobody reads
            request = Request(path, _NOTHING, _NOTHING, peer)
        request.forwarded = forwarded  # the per-address limits read it (peers.py)
        if self.verifier is not None:
            token = _token(query, headers)
            if isinstance(token, Refusal):
                return token
            try:
                claims = self.verifier.verify(token)
            except AuthError as exc:
                return Refusal(401, exc.reason)
            request.claims, request.uid = claims.raw, claims.uid
            if self.per_uid and self.uid_count(claims.uid) >= self.per_uid:
                return Refusal(429, "too many connections for this user")
        if self.app_hook is not None:
            try:
                verdict = self.app_hook(request)
            except Reject as exc:
                verdict = exc
            except Exception:
                log.exception("on_handshake failed")
                return Refusal(500, "internal error")
            if isinstance(verdict, Reject):
                return Refusal(verdict.status, verdict.reason)
        return request
