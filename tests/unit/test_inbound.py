"""The client-frame checks of gateway/inbound.py and the buckets of buckets.py:
pure unit tests (the same rules are checked on real nodes in tests/cluster/test_rfc6455.py,
test_fragments.py and test_flood.py)."""

from __future__ import annotations

import pytest

from wscluster.buckets import Bucket
from wscluster.gateway.inbound import (
    TOO_LARGE,
    Assembler,
    Violation,
    check_utf8,
    close_code_valid,
)

TEXT, BINARY, CONT = 1, 2, 0


def test_whole_messages_pass_through() -> None:
    asm = Assembler(10)
    assert asm.feed(TEXT, True, b'{"a": 1}') == (b'{"a": 1}', False)
    assert asm.feed(BINARY, True, b"\xff" * 50) == (b"\xff" * 50, True)  # size: the node's
    assert not asm.open


def test_fragments_are_joined() -> None:
    asm = Assembler(100)
    assert asm.feed(TEXT, False, b"ab") is None
    assert asm.open
    assert asm.feed(CONT, False, b"") is None
    assert asm.feed(CONT, True, memoryview(b"cd")) == (b"abcd", False)
    assert not asm.open


def test_utf8_split_across_fragments_is_fine() -> None:
    text = "é€😀".encode()
    asm = Assembler(100)
    for i, byte in enumerate(text):
        got = asm.feed(CONT if i else TEXT, i == len(text) - 1, bytes([byte]))
    assert got == (text, False)


@pytest.mark.parametrize("first", [b"ok\xff", b"\xc0\xaf", b"\xed\xa0\x80"])
def test_invalid_utf8_fails_in_the_fragment_that_has_it(first: bytes) -> None:
    asm = Assembler(100)
    with pytest.raises(Violation) as exc:
        asm.feed(TEXT, False, first)
    assert exc.value.code == 1007
    assert not asm.open


def test_truncated_utf8_at_the_end_fails() -> None:
    asm = Assembler(100)
    assert asm.feed(TEXT, False, b"ok\xe2\x82") is None  # may still be completed...
    with pytest.raises(Violation) as exc:
        asm.feed(CONT, True, b"")  # ...but the message ends
    assert exc.value.code == 1007


def test_invalid_utf8_in_binary_is_not_checked() -> None:
    asm = Assembler(100)
    assert asm.feed(BINARY, False, b"\xff") is None
    assert asm.feed(CONT, True, b"\xfe") == (b"\xff\xfe", True)


def test_whole_text_frame_is_checked() -> None:
    with pytest.raises(Violation) as exc:
        Assembler(10).feed(TEXT, True, b"\xff")
    assert exc.value.code == 1007
    check_utf8("ok é".encode())


def test_out_of_place_frames_are_protocol_errors() -> None:
    with pytest.raises(Violation) as exc:
        Assembler(10).feed(CONT, True, b"x")
    assert exc.value.code == 1002
    asm = Assembler(10)
    asm.feed(TEXT, False, b"x")
    with pytest.raises(Violation) as exc:
        asm.feed(TEXT, True, b"y")
    assert exc.value.code == 1002


def test_a_message_over_the_limit_is_refused_once_and_its_rest_dropped() -> None:
    asm = Assembler(10)
    assert asm.feed(TEXT, False, b"12345") is None
    assert asm.feed(CONT, False, b"123456") is TOO_LARGE
    assert asm.open  # its remaining fragments are read and dropped
    assert asm.feed(CONT, False, b"\xff" * 100) is None  # not kept, not checked
    assert asm.feed(CONT, True, b"x") is None
    assert not asm.open
    assert asm.feed(TEXT, True, b"next") == (b"next", False)


def test_a_final_fragment_over_the_limit_ends_the_message() -> None:
    asm = Assembler(4)
    asm.feed(TEXT, False, b"123")
    assert asm.feed(CONT, True, b"45") is TOO_LARGE
    assert not asm.open


@pytest.mark.parametrize("code", [1000, 1001, 1002, 1003, 1007, 1011, 1014, 3000, 4999])
def test_valid_close_codes(code: int) -> None:
    assert close_code_valid(code)


@pytest.mark.parametrize("code", [0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535])
def test_invalid_close_codes(code: int) -> None:
    assert not close_code_valid(code)


def test_bucket_take_refuses_when_empty_and_refills() -> None:
    b = Bucket(10.0, 2, now=0.0)
    assert b.take(0.0) and b.take(0.0)
    assert not b.take(0.0)
    assert b.take(0.1)  # one token back after 0.1 s
    assert not b.take(0.1)


def test_bucket_charge_goes_into_debt_and_says_when_it_is_repaid() -> None:
    b = Bucket(100.0, 200, now=0.0)
    assert not b.charge(999, 0.0)  # done anyway
    assert b.debt_time(0.0) == pytest.approx(8.0)  # until a whole token is back
    assert not b.take(5.0)  # still in debt
    assert b.debt_time(8.0) == 0.0
    assert b.tokens == pytest.approx(1.0)
    assert b.take(8.0)  # the next frame read passes
    assert b.charge(1.0, 100.0)
    assert b.tokens == pytest.approx(199.0)  # refilled up to the burst, not beyond
