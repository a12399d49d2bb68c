"""JwtVerifier, token_from and OriginPolicy: pure unit tests, no network."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from multidict import CIMultiDict

from wscluster.auth import AuthError, Claims, JwtVerifier, OriginPolicy, token_from

SECRET = "test-secret-that-is-at-least-32-bytes-long"


def _pem(key: Any) -> str:
    data: bytes = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return data.decode()


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module")
def hs() -> JwtVerifier:
    return JwtVerifier(secret=SECRET)


@pytest.fixture(scope="module")
def rs(rsa_key: rsa.RSAPrivateKey) -> JwtVerifier:
    return JwtVerifier(public_key=_pem(rsa_key))


@pytest.fixture(scope="module")
def es(ec_key: ec.EllipticCurvePrivateKey) -> JwtVerifier:
    return JwtVerifier(public_key=_pem(ec_key))


class Rel(int):
    """A time relative to when the token is made (parametrize lists are built at import,
    possibly minutes before the test runs)."""


def claims(**extra: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {"sub": "alice", "exp": now + 300}
    base.update({k: now + int(v) if isinstance(v, Rel) else v for k, v in extra.items()})
    return {k: v for k, v in base.items() if v is not ...}


def hs_token(payload: dict[str, Any], secret: str = SECRET) -> str:
    return jwt.encode(payload, secret, algorithm="HS256")


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64json(value: Any) -> str:
    return b64(json.dumps(value).encode())


def hand_hs256(header: dict[str, Any], payload: Any, secret: bytes) -> str:
    """An HS256 token made without PyJWT (which refuses PEM keys as HMAC secrets)."""
    signing_input = f"{b64json(header)}.{b64json(payload)}"
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(mac)}"


def refused(verifier: JwtVerifier, token: str) -> str:
    with pytest.raises(AuthError) as info:
        verifier.verify(token)
    assert not token or token not in info.value.reason
    assert str(info.value) == info.value.reason
    return info.value.reason


def test_valid_hs256(hs: JwtVerifier) -> None:
    payload = claims(groups=["room:*"])
    result = hs.verify(hs_token(payload))
    assert result == Claims(uid="alice", exp=float(payload["exp"]), raw=payload)
    assert isinstance(result.exp, float)
    assert hs.algorithm == "HS256"


def test_valid_rs256_and_es256(
    rs: JwtVerifier,
    es: JwtVerifier,
    rsa_key: rsa.RSAPrivateKey,
    ec_key: ec.EllipticCurvePrivateKey,
) -> None:
    assert rs.verify(jwt.encode(claims(sub="bob"), rsa_key, algorithm="RS256")).uid == "bob"
    assert es.verify(jwt.encode(claims(sub="名前"), ec_key, algorithm="ES256")).uid == "名前"
    assert (rs.algorithm, es.algorithm) == ("RS256", "ES256")
    assert isinstance(rs._key, rsa.RSAPublicKey)  # the loaded key object, not the PEM
    assert isinstance(es._key, ec.EllipticCurvePublicKey)


def test_sub_of_128_characters_and_float_exp_are_fine(hs: JwtVerifier) -> None:
    exp = time.time() + 60.5
    result = hs.verify(hs_token(claims(sub="u" * 128, exp=exp)))
    assert result.uid == "u" * 128
    assert result.exp == exp


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        ({"exp": Rel(-10)}, "token expired"),
        ({"nbf": Rel(3600)}, "token not yet valid"),
        ({"iat": Rel(3600)}, "token not yet valid"),
        ({"iat": "yesterday"}, "invalid claim: iat"),
        ({"exp": ...}, "missing claim: exp"),
        ({"exp": None}, "missing claim: exp"),
        ({"exp": "soon"}, "malformed token"),
        ({"exp": "9999999999"}, "invalid claim: exp"),  # PyJWT itself takes int("...")
        ({"exp": 10**400}, "invalid claim: exp"),  # an int PyJWT accepts, too big for float
        ({"nbf": "later"}, "malformed token"),
        ({"sub": ...}, "missing claim: sub"),
        ({"sub": None}, "missing claim: sub"),
        ({"sub": ""}, "invalid claim: sub"),
        ({"sub": "u" * 129}, "invalid claim: sub"),
        ({"sub": 42}, "invalid claim: sub"),
        ({"sub": ["alice"]}, "invalid claim: sub"),
        ({"sub": {"id": "alice"}}, "invalid claim: sub"),
        ({"sub": True}, "invalid claim: sub"),
    ],
)
def test_refused_claims(extra: dict[str, Any], reason: str, hs: JwtVerifier) -> None:
    assert refused(hs, hs_token(claims(**extra))) == reason


IDP = "https://idp.example"


@pytest.mark.parametrize(
    ("options", "extra", "reason"),
    [
        ({"audience": "wsc"}, {"aud": "wsc"}, None),
        ({"audience": "wsc"}, {"aud": ["other", "wsc"]}, None),
        ({"audience": "wsc"}, {"aud": "other"}, "wrong audience"),
        ({"audience": "wsc"}, {"aud": [1]}, "wrong audience"),
        ({"audience": "wsc"}, {}, "missing claim: aud"),
        ({}, {"aud": "anything"}, None),  # aud is only checked when configured
        ({"issuer": IDP}, {"iss": IDP}, None),
        ({"issuer": IDP}, {"iss": "https://evil.example"}, "wrong issuer"),
        ({"issuer": IDP}, {}, "missing claim: iss"),
        ({}, {"iss": "whoever"}, None),
        ({}, {"exp": Rel(-5)}, "token expired"),
        ({"leeway": 30}, {"exp": Rel(-5)}, None),
        ({"leeway": 30}, {"nbf": Rel(5)}, None),
        ({}, {"nbf": Rel(-60), "iat": Rel(-60)}, None),
    ],
)
def test_verifier_options(
    options: dict[str, Any], extra: dict[str, Any], reason: str | None
) -> None:
    verifier = JwtVerifier(secret=SECRET, **options)
    token = hs_token(claims(**extra))
    if reason is None:
        assert verifier.verify(token).uid == "alice"
    else:
        assert refused(verifier, token) == reason


def test_bad_signatures(hs: JwtVerifier, rs: JwtVerifier, es: JwtVerifier) -> None:
    other_secret = "another-secret-that-is-also-32-bytes-long"
    assert refused(hs, hs_token(claims(), secret=other_secret)) == "bad signature"
    other_rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    assert refused(rs, jwt.encode(claims(), other_rsa, algorithm="RS256")) == "bad signature"
    other_ec = ec.generate_private_key(ec.SECP256R1())
    assert refused(es, jwt.encode(claims(), other_ec, algorithm="ES256")) == "bad signature"


def test_tampered_payload(hs: JwtVerifier) -> None:
    header, _, signature = hs_token(claims()).split(".")
    forged = f"{header}.{b64json(claims(sub='mallory'))}.{signature}"
    assert refused(hs, forged) == "bad signature"


@pytest.mark.parametrize("alg", ["none", "None", "NONE"])
def test_alg_none_is_refused(alg: str, hs: JwtVerifier, rs: JwtVerifier, es: JwtVerifier) -> None:
    token = f"{b64json({'alg': alg, 'typ': 'JWT'})}.{b64json(claims())}."
    for verifier in (hs, rs, es):
        assert refused(verifier, token) == "algorithm not allowed"


def test_hs_rs_confusion_is_refused(rs: JwtVerifier, rsa_key: rsa.RSAPrivateKey) -> None:
    pem = _pem(rsa_key)
    with pytest.raises(jwt.InvalidKeyError):  # PyJWT will not even sign this
        jwt.encode(claims(), pem, algorithm="HS256")
    token = hand_hs256({"alg": "HS256", "typ": "JWT"}, claims(), pem.encode())
    assert refused(rs, token) == "algorithm not allowed"


def test_the_algorithm_is_pinned_by_the_key(
    hs: JwtVerifier,
    rs: JwtVerifier,
    es: JwtVerifier,
    rsa_key: rsa.RSAPrivateKey,
    ec_key: ec.EllipticCurvePrivateKey,
) -> None:
    cases = [
        (hs, jwt.encode(claims(), rsa_key, algorithm="RS256")),
        (hs, hand_hs256({"typ": "JWT"}, claims(), SECRET.encode())),  # no alg at all
        (rs, jwt.encode(claims(), rsa_key, algorithm="RS512")),
        (rs, jwt.encode(claims(), rsa_key, algorithm="PS256")),
        (rs, jwt.encode(claims(), ec_key, algorithm="ES256")),
        (es, jwt.encode(claims(), rsa_key, algorithm="RS256")),
    ]
    for verifier, token in cases:
        assert refused(verifier, token) == "algorithm not allowed"


@pytest.mark.parametrize(
    "token",
    [
        "",
        "garbage",
        "a.b.c",
        "a.b",
        "....",
        "eyJhbGciOiJIUzI1NiJ9.!!!.sig",
        "tökén.with.unicode",
        hand_hs256({"alg": "HS256"}, ["not", "an", "object"], SECRET.encode()),
        f"{b64json(['header'])}.{b64json(claims())}.",
        f"{b64(b'[' * 5000)}.{b64json(claims())}.",
    ],
)
def test_malformed_tokens(token: str, hs: JwtVerifier) -> None:
    assert refused(hs, token) == "malformed token"


def test_signature_is_checked_before_the_payload_is_parsed(hs: JwtVerifier) -> None:
    unsigned = f"{b64json({'alg': 'HS256'})}.{b64(b'not json')}."
    assert refused(hs, unsigned) == "bad signature"


def test_signed_payload_that_is_not_json(hs: JwtVerifier) -> None:
    signing_input = f"{b64json({'alg': 'HS256'})}.{b64(b'not json')}"
    mac = hmac.new(SECRET.encode(), signing_input.encode(), hashlib.sha256).digest()
    assert refused(hs, f"{signing_input}.{b64(mac)}") == "malformed token"


@pytest.mark.parametrize("token", [None, b"a.b.c", 42])
def test_non_string_tokens(token: Any, hs: JwtVerifier) -> None:
    with pytest.raises(AuthError) as info:
        hs.verify(token)
    assert info.value.reason == "malformed token"


def test_oversized_token_is_refused_before_decoding(hs: JwtVerifier) -> None:
    token = hs_token(claims(padding="x" * 9000))
    assert len(token) > 8 * 1024
    assert refused(hs, token) == "token too long"
    assert refused(hs, "x" * 8193) == "token too long"
    token = hs_token(claims(padding="x" * 5000))
    assert len(token) <= 8 * 1024
    assert hs.verify(token).raw["padding"] == "x" * 5000


def _private_pem(key: rsa.RSAPrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def _rsa(bits: int = 2048) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


@pytest.mark.parametrize(
    ("make_kwargs", "message"),
    [
        (dict, "exactly one"),
        (lambda: {"secret": SECRET, "public_key": _pem(_rsa())}, "exactly one"),
        (lambda: {"secret": "short"}, "at least 32 bytes"),
        (lambda: {"secret": _pem(_rsa())}, "unusable JWT secret"),
        (lambda: {"secret": SECRET, "leeway": -1.0}, "leeway"),
        (lambda: {"secret": SECRET, "leeway": float("nan")}, "leeway"),
        (lambda: {"secret": SECRET, "audience": ""}, "non-empty"),
        (lambda: {"secret": SECRET, "issuer": ""}, "non-empty"),
        (lambda: {"public_key": "not a key"}, "not a PEM public key"),
        (lambda: {"public_key": _private_pem(_rsa())}, "not a PEM public key"),
        (lambda: {"public_key": _pem(_rsa(1024))}, "1024 bits"),
        (lambda: {"public_key": _pem(ec.generate_private_key(ec.SECP384R1()))}, "secp384r1"),
        (
            lambda: {"public_key": _pem(ed25519.Ed25519PrivateKey.generate())},
            "unsupported public key type",
        ),
    ],
)
def test_bad_configuration(make_kwargs: Callable[[], dict[str, Any]], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        JwtVerifier(**make_kwargs())


def test_from_file(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    path = tmp_path / "key.pem"
    path.write_text(_pem(rsa_key))
    verifier = JwtVerifier.from_file(path, audience="wsc", leeway=5)
    token = jwt.encode(claims(aud="wsc"), rsa_key, algorithm="RS256")
    assert verifier.verify(token).uid == "alice"
    assert JwtVerifier.from_file(str(path)).algorithm == "RS256"


def test_from_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot read JWT public key file"):
        JwtVerifier.from_file(tmp_path / "missing.pem")
    with pytest.raises(ValueError, match="cannot read JWT public key file"):
        JwtVerifier.from_file(tmp_path)  # a directory
    binary = tmp_path / "binary.pem"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ValueError, match="cannot read JWT public key file"):
        JwtVerifier.from_file(binary)
    bad = tmp_path / "bad.pem"
    bad.write_text("-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----\n")
    with pytest.raises(ValueError, match=r"bad\.pem.*not a PEM public key"):
        JwtVerifier.from_file(bad)


@pytest.mark.parametrize(
    ("query", "headers", "expected"),
    [
        ("token=abc.def.ghi", {}, "abc.def.ghi"),
        ("x=1&token=t1&token=t2", {}, "t1"),
        ("?token=t", {}, "t"),
        ("token=a%2Eb", {}, "a.b"),
        ("", {"Authorization": "Bearer abc"}, "abc"),
        ("", {"Authorization": "bearer  abc "}, "abc"),
        ("", {"Authorization": "BEARER abc"}, "abc"),
        ("", {"authorization": "Bearer abc"}, "abc"),
        ("", {"AUTHORIZATION": "Bearer abc"}, "abc"),
        ("", CIMultiDict({"aUtHoRiZaTiOn": "Bearer abc"}), "abc"),
        ("token=from-query", {"Authorization": "Bearer from-header"}, "from-query"),
        ("token=", {"Authorization": "Bearer from-header"}, "from-header"),
        ("", {}, None),
        ("token=", {}, None),
        ("other=1", {"Host": "x"}, None),
        ("", {"Authorization": "Basic dXNlcjpwYXNz"}, None),
        ("", {"Authorization": "Bearer"}, None),
        ("", {"Authorization": "Bearer   "}, None),
        ("", {"Authorization": ""}, None),
    ],
)
def test_token_from(query: str, headers: Mapping[str, str], expected: str | None) -> None:
    assert token_from(query, headers) == expected


APP = ["https://app.example", "http://localhost:8000"]


@pytest.mark.parametrize(
    ("allowed", "allow_missing", "origin", "expected"),
    [
        (APP, False, "https://app.example", True),
        (APP, False, "http://localhost:8000", True),
        (APP, False, "https://evil.example", False),
        (APP, False, "http://app.example", False),
        (APP, False, "https://app.example:443", False),  # default ports are not implied
        (APP, False, "http://localhost:8001", False),
        (APP, False, "https://app.example.evil.example", False),
        (APP, False, "null", False),
        (APP, False, "https://app.example/", True),
        (APP, False, "HTTPS://APP.Example", True),
        (APP, False, "https://app.example//", False),
        (["https://App.Example/"], False, "https://app.example", True),
        ([" https://a.example ", ""], False, "https://a.example", True),
        (APP, False, None, False),
        (APP, False, "", False),
        (APP, True, None, True),
        (APP, True, "", True),
        (APP, True, "https://evil.example", False),
        ([], False, "https://app.example", False),
        ([], False, None, False),
    ],
)
def test_origin_policy(
    allowed: list[str], allow_missing: bool, origin: str | None, expected: bool
) -> None:
    assert OriginPolicy(allowed, allow_missing=allow_missing).allows(origin) is expected
