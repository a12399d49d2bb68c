"""Names (uids, group names) and other strings the cluster writes to its broker and store must be
UTF-8: a lone surrogate ("x\\ud800", which a JSON escape or Python code can produce) is
refused where it enters; control characters and astral characters are names like any other
(docs/protocol-notes.md). Issue 14."""

from __future__ import annotations

import time
from typing import Any

import jwt
import pytest

from wscluster.auth import AuthError, JwtVerifier
from wscluster.errors import Code, ProtocolError
from wscluster.frames import FrameError, parse
from wscluster.presence.base import encode_session
from wscluster.routing import Kind, check_name, is_utf8, parse_address

SECRET = "unit-test-secret-0123456789abcdefghij"
LONE = ["\ud800", "x\ud800", "\udc00y", "a\udbff\udbffb", "\ud800\u0041", "\udfff" * 5]
FINE = ["a", "\x00", "a\x00b", "tab\there", "\n", "\x7f\x85", "\u2028", "名前", "\U0001f600",
        "\ufffd", "\uffff", "\U0010ffff", "x" * 128, "\U0001f600" * 128]  # fmt: skip


@pytest.mark.parametrize("name", LONE)
def test_a_lone_surrogate_is_not_a_name(name: str) -> None:
    assert not is_utf8(name)
    for what in ("uid", "group"):
        with pytest.raises(ProtocolError) as info:
            check_name(name, what)
        assert info.value.code is Code.BAD_REQUEST
        assert what in info.value.message and "UTF-8" in info.value.message


@pytest.mark.parametrize("name", FINE)
def test_every_character_of_utf8_is_fine(name: str) -> None:
    assert is_utf8(name)
    assert check_name(name, "uid") == name


@pytest.mark.parametrize("bad", [None, 5, b"x", "", "x" * 129, "\U0001f600" * 129])
def test_type_and_length_are_still_checked(bad: Any) -> None:
    with pytest.raises(ProtocolError):
        check_name(bad, "uid")


@pytest.mark.parametrize("to", ["uid:x\ud800", "group:\udc00", "client:n\ud800.1",
                                "client:node-1.\ud800"])  # fmt: skip
def test_addresses_with_a_lone_surrogate_are_bad_request(to: str) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_address(to)
    assert info.value.code is Code.BAD_REQUEST


def test_control_characters_in_addresses_are_taken_verbatim() -> None:
    assert parse_address("uid:a\x00b").name == "a\x00b"
    assert parse_address("group:\n").kind is Kind.GROUP


def _token(sub: Any) -> str:
    return jwt.encode({"sub": sub, "exp": int(time.time()) + 60}, SECRET, algorithm="HS256")


@pytest.mark.parametrize("sub", ["x\ud800", "\udfff", "a\ud83d"])
def test_jwt_sub_with_a_lone_surrogate_is_an_invalid_claim(sub: str) -> None:
    token = _token(sub)
    assert jwt.decode(token, SECRET, algorithms=["HS256"])["sub"] == sub  # PyJWT takes it
    with pytest.raises(AuthError) as info:
        JwtVerifier(secret=SECRET).verify(token)
    assert info.value.reason == "invalid claim: sub"


@pytest.mark.parametrize("sub", ["a\x00b", "\U0001f600", "line\nbreak"])
def test_jwt_sub_with_other_characters_is_fine(sub: str) -> None:
    assert JwtVerifier(secret=SECRET).verify(_token(sub)).uid == sub


@pytest.mark.parametrize(
    "frame",
    [
        b'{"type":"login","uid":"x\\ud800","id":1}',
        b'{"type":"join","group":"\\udc00","id":1}',
        b'{"type":"send","to":"uid:x\\ud800","data":1,"id":1}',
        b'{"type":"presence","to":"group:a\\ud800b","id":1}',
    ],
)
def test_frames_with_a_lone_surrogate_escape_are_refused(frame: bytes) -> None:
    """The JSON escape would decode to a lone surrogate: msgspec refuses the frame."""
    with pytest.raises(FrameError) as info:
        parse(frame)
    assert info.value.code in (Code.BAD_JSON, Code.BAD_REQUEST)


def test_frames_with_escaped_pairs_and_control_characters_are_fine() -> None:
    assert parse(b'{"type":"login","uid":"\\ud83d\\ude00"}').name == "\U0001f600"
    assert parse(b'{"type":"join","group":"a\\u0000b"}').name == "a\x00b"


@pytest.mark.parametrize(
    "values", [{"x\ud800": 1}, {"k": "x\ud800"}, {"k": {"a": ["\udc00"]}}, {"k": {"\ud800": 1}}]
)
def test_session_keys_and_values_with_a_lone_surrogate_are_bad_request(
    values: dict[str, Any],
) -> None:
    with pytest.raises(ProtocolError) as info:
        encode_session(values, replace=True, limit=1 << 20)
    assert info.value.code is Code.BAD_REQUEST
