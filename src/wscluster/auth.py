"""Handshake authentication: JWT verification, token extraction and the Origin allowlist.

Pure code: no sockets, no asyncio. ``JwtVerifier.from_file`` is the one place that reads a
file, once, at startup.
"""

from __future__ import annotations

import math
import os
import time
import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import HMACAlgorithm

from .errors import ProtocolError
from .routing import check_name

MAX_TOKEN = 8 * 1024
"""Tokens longer than this (in characters) are refused before any decoding."""

MIN_SECRET_BYTES = 32
"""Shortest HS256 secret accepted (RFC 7518 section 3.2); PyJWT warns below it."""

MIN_RSA_BITS = 2048
"""Smallest RSA key accepted (PyJWT warns below it)."""


class AuthError(Exception):
    """A token was refused. ``reason`` is short, never contains the token, and may be sent."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Claims:
    """A verified token: its subject (the uid), its expiry and every claim it carried."""

    uid: str
    exp: float
    raw: dict[str, Any]


# Most specific first: several of these subclass DecodeError or InvalidTokenError.
_REASONS: tuple[tuple[type[jwt.PyJWTError], str], ...] = (
    (jwt.ExpiredSignatureError, "token expired"),
    (jwt.ImmatureSignatureError, "token not yet valid"),
    (jwt.InvalidAudienceError, "wrong audience"),
    (jwt.InvalidIssuerError, "wrong issuer"),
    (jwt.InvalidSignatureError, "bad signature"),
    (jwt.InvalidAlgorithmError, "algorithm not allowed"),
    (jwt.InvalidIssuedAtError, "invalid claim: iat"),
    (jwt.DecodeError, "malformed token"),
)


def _reason(exc: jwt.PyJWTError) -> str:
    if isinstance(exc, jwt.MissingRequiredClaimError):
        return f"missing claim: {exc.claim}"  # a claim name we asked for, never token text
    for kind, reason in _REASONS:
        if isinstance(exc, kind):
            return reason
    return "invalid token"


class JwtVerifier:
    """Checks JWTs against one key. The algorithm is fixed by the key, never by the token.

    ``secret`` selects HS256 (at least 32 bytes); ``public_key`` (PEM text) selects RS256
    for an RSA key (at least 2048 bits) or ES256 for an EC P-256 key. ``aud`` and ``iss``
    are checked only when ``audience`` / ``issuer`` are given; ``leeway`` (seconds) widens
    the ``exp``, ``nbf`` and ``iat`` checks. Bad configuration raises ``ValueError``.
    """

    def __init__(
        self,
        *,
        secret: str | None = None,
        public_key: str | None = None,
        audience: str | None = None,
        issuer: str | None = None,
        leeway: float = 0.0,
        max_lifetime: float = 0.0,
    ) -> None:
        if (secret is None) == (public_key is None):
            raise ValueError("give exactly one of a JWT secret or a JWT public key")
        if audience == "" or issuer == "":
            raise ValueError("JWT audience and issuer must be non-empty when given")
        if not math.isfinite(leeway) or leeway < 0:
            raise ValueError("JWT leeway must be a finite number of seconds >= 0")
        self._key: bytes | rsa.RSAPublicKey | ec.EllipticCurvePublicKey
        if secret is not None:
            self._key = _hmac_key(secret)
            self.algorithm = "HS256"
        else:
            assert public_key is not None
            self._key, self.algorithm = _public_key(public_key)
        self.audience = audience
        self.issuer = issuer
        self.leeway = float(leeway)
        # seconds from now to `exp` a token may have (0: no cap): a token that never expires
        # (exp 1e308) is a credential that can never be taken back
        self.max_lifetime = float(max_lifetime)

    @classmethod
    def from_file(
        cls,
        path: str | os.PathLike[str],
        *,
        audience: str | None = None,
        issuer: str | None = None,
        leeway: float = 0.0,
        max_lifetime: float = 0.0,
    ) -> JwtVerifier:
        """A verifier for the PEM public key stored in ``path``."""
        try:
            with open(path, encoding="utf-8") as f:
                pem = f.read(64 * 1024)
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"cannot read JWT public key file {os.fspath(path)!r}: {exc}") from exc
        try:
            return cls(public_key=pem, audience=audience, issuer=issuer, leeway=leeway,
                       max_lifetime=max_lifetime)  # fmt: skip
        except ValueError as exc:
            raise ValueError(f"JWT public key file {os.fspath(path)!r}: {exc}") from exc

    def verify(self, token: str) -> Claims:
        """The claims of a valid token; ``AuthError`` with a short reason otherwise."""
        if not isinstance(token, str) or not token:
            raise AuthError("malformed token")
        if len(token) > MAX_TOKEN:
            raise AuthError("token too long")
        if not token.isascii():  # compact JWS is base64url and dots only
            raise AuthError("malformed token")
        try:
            raw = jwt.decode(
                token,
                self._key,
                algorithms=[self.algorithm],
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway,
                options={
                    "require": ["exp", "sub"],
                    # PyJWT refuses a token with `aud` when no audience is configured.
                    "verify_aud": self.audience is not None,
                    # `sub` is checked below (as PyJWT < 2.10 does not); `jti` is not ours.
                    "verify_sub": False,
                    "verify_jti": False,
                },
            )
        except jwt.PyJWTError as exc:
            raise AuthError(_reason(exc)) from None
        except (ValueError, TypeError, OverflowError, RecursionError):
            raise AuthError("malformed token") from None
        try:
            uid = check_name(raw["sub"], "sub")
        except ProtocolError:
            raise AuthError("invalid claim: sub") from None
        exp = _numeric_date(raw["exp"])
        if self.max_lifetime > 0 and exp - time.time() > self.max_lifetime + self.leeway:
            raise AuthError("token lifetime too long")
        return Claims(uid=uid, exp=exp, raw=raw)


def _numeric_date(value: object) -> float:
    """``exp`` as a float; PyJWT also lets numeric strings through, which we refuse."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise AuthError("invalid claim: exp")
    try:
        result = float(value)
    except OverflowError:
        raise AuthError("invalid claim: exp") from None
    if not math.isfinite(result):
        raise AuthError("invalid claim: exp")
    return result


def _hmac_key(secret: str) -> bytes:
    key = secret.encode("utf-8")
    if len(key) < MIN_SECRET_BYTES:
        raise ValueError(f"JWT secret must be at least {MIN_SECRET_BYTES} bytes long")
    try:  # PyJWT refuses PEM/SSH keys as HMAC secrets (the HS/RS confusion attack)
        return HMACAlgorithm(HMACAlgorithm.SHA256).prepare_key(key)
    except jwt.InvalidKeyError as exc:
        raise ValueError(f"unusable JWT secret: {exc}") from None


def _public_key(pem: str) -> tuple[rsa.RSAPublicKey | ec.EllipticCurvePublicKey, str]:
    try:
        key = serialization.load_pem_public_key(pem.encode("utf-8"))
    except (ValueError, TypeError, UnicodeError) as exc:
        raise ValueError(f"not a PEM public key ({exc.__class__.__name__})") from None
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise ValueError(
                f"RSA public key is {key.key_size} bits; at least {MIN_RSA_BITS} are needed"
            )
        return key, "RS256"
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, ec.SECP256R1):
            raise ValueError(
                f"EC public key uses curve {key.curve.name}; only P-256 (ES256) is supported"
            )
        return key, "ES256"
    raise ValueError(
        f"unsupported public key type {type(key).__name__}; use RSA (RS256) or EC P-256 (ES256)"
    )


def token_from(query: str, headers: Mapping[str, str]) -> str | None:
    """The JWT of a handshake: ``?token=`` (first value) or ``Authorization: Bearer``.

    The query string wins when both are present. ``headers`` may be a case-insensitive
    multidict or a plain dict. Returns None when neither carries a non-empty token.
    """
    values = urllib.parse.parse_qs(query.removeprefix("?"), max_num_fields=100).get("token")
    if values and values[0]:
        return values[0]
    header = _authorization(headers)
    if header is None:
        return None
    scheme, _, rest = header.strip().partition(" ")
    token = rest.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


def _authorization(headers: Mapping[str, str]) -> str | None:
    value = headers.get("Authorization")
    if value is None:
        value = headers.get("authorization")
    if value is None:  # a plain dict with some other casing
        for name, candidate in headers.items():
            if name.lower() == "authorization":
                return candidate
    return value


def _normalise_origin(origin: str) -> str:
    origin = origin.strip().removesuffix("/")
    scheme, sep, rest = origin.partition("://")
    if not sep:
        return origin  # e.g. the opaque origin "null": compared verbatim
    host, slash, path = rest.partition("/")
    return f"{scheme.lower()}://{host.lower()}{slash}{path}"


class OriginPolicy:
    """An allowlist of browser origins (``scheme://host[:port]``) for the handshake.

    Matching is exact after lower-casing scheme and host and dropping one trailing "/";
    default ports are not implied (``https://a.example:443`` differs from
    ``https://a.example``). A request without an ``Origin`` (non-browser clients) passes
    only with ``allow_missing``. An empty allowlist refuses every origin: "no Origin check"
    is expressed by not building an ``OriginPolicy`` at all, which is the caller's choice.
    """

    def __init__(self, allowed: Iterable[str], allow_missing: bool = False) -> None:
        self.allowed = frozenset(_normalise_origin(o) for o in allowed if o.strip())
        self.allow_missing = allow_missing

    def allows(self, origin: str | None) -> bool:
        """Whether a handshake carrying this ``Origin`` header value may proceed."""
        if origin is None or not origin.strip():
            return self.allow_missing
        return _normalise_origin(origin) in self.allowed
