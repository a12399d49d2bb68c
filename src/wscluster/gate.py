"""The handshake checks of a node, in order (after the public server's own 503 when the node
is full or draining): Origin (403), JWT (401), the uid's connections on this node (429),
then the application's ``on_handshake``. Synchronous: picows decides the upgrade in a plain
callback."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl

from .app import Reject, Request
from .auth import AuthError, JwtVerifier, OriginPolicy, token_from
from .config import NodeConfig

log = logging.getLogger("wscluster.node")


_NOTHING: dict[str, str] = {}


@dataclass(frozen=True, slots=True)
class Refusal:
    status: int
    reason: str


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
            try:
                token = token_from(query, headers)
            except ValueError:
                return Refusal(401, "malformed query string")
            if token is None:
                return Refusal(401, "missing token")
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
            request = Request(path, params, headers, peer)
        else:  # no application: keep nothing per connection that nobody reads
            request = Request(path, _NOTHING, _NOTHING, peer)
        request.forwarded = forwarded  # the per-address limits read it (peers.py)
        if self.verifier is not None:
            try:
                token = token_from(query, headers)
            except ValueError:  # e.g. more fields than parse_qs takes: not a 500
                return Refusal(401, "malformed query string")
            if token is None:
                return Refusal(401, "missing token")
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
