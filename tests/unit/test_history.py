"""history.py: rules, the store's framing, splicing offsets into frames, the resume verdict;
frames.py: validation of `resume`."""

from __future__ import annotations

import json

import pytest

from wscluster import frames, history
from wscluster.errors import Code


@pytest.mark.parametrize(
    ("spec", "keep", "ttl"),
    [("group:room:*=1000/300s", 1000, 300.0), ("uid:*=100/1h", 100, 3600.0),
     ("group:a=1/0.5", 1, 0.5), ("uid:x*y=5/2d", 5, 172800.0), ("group:*=3/10m", 3, 600.0)],
)  # fmt: skip
def test_rules_parse(spec: str, keep: int, ttl: float) -> None:
    rule = history.parse_rule(spec)
    assert (rule.keep, rule.ttl) == (keep, ttl)
    assert rule.meta_ttl_ms >= rule.ttl_ms


@pytest.mark.parametrize(
    "spec",
    ["", "group:*", "group:*=10", "group:*=0/10s", "group:*=10/0s", "all=10/10s",
     "client:*=1/1s", "group:*=10/10y", "group:*=-1/10s", "=10/10s", "group:*=10/31d",
     "group:*=2000000/10s"],
)  # fmt: skip
def test_rules_refuse(spec: str) -> None:
    with pytest.raises(ValueError, match="--history"):
        history.parse_rule(spec)


def test_rules_first_match_wins_and_only_streams() -> None:
    rules = history.Rules(["group:vip:*=5/1s", "group:*=10/1s"])
    vip, other = history.parse_rule("group:vip:*=5/1s"), history.parse_rule("group:*=10/1s")
    assert rules.match("group:vip:1") == vip
    assert rules.match("group:room") == other
    assert rules.match("uid:vip:1") is None
    assert rules.match("all") is None
    assert not history.Rules([])
    for i in range(20_000):  # the cache is bounded, answers stay right
        assert rules.match(f"group:vip:{i}") == vip


def test_split_and_refuse_garbage() -> None:
    assert history.split(b"#12:ab12:\x93rest") == (12, "ab12", b"\x93rest")
    for bad in (b"#", b"#1", b"#1:ab", b"#x:ab:", b"#0:ab:", b"#1::x", b'#1:a"b:x', b"#-1:a:x"):
        with pytest.raises(history.FramingError):
            history.split(bad)


def test_splice_keeps_json_valid() -> None:
    frame = b'{"type":"message","to":"group:g","data":{"a":[1,"}"]},"ts":1}'
    out = json.loads(history.splice(frame, 7, "e1"))
    assert out["offset"] == 7 and out["epoch"] == "e1" and out["data"] == {"a": [1, "}"]}
    assert history.splice(b"raw bytes", 1, "e") == b"raw bytes"


@pytest.mark.parametrize(
    ("reader", "store", "verdict"),
    [
        (("e", 5), ("e", 5, 1), (True, None)),  # nothing missed
        (("e", 5), ("e", 9, 1), (True, None)),  # 4 missed, all retained
        (("e", 5), ("e", 9, 7), (False, "too_old")),  # 6 trimmed
        (("e", 5), ("e", 9, 0), (False, "too_old")),  # expired
        (("e", 5), ("e", 2000, 1), (False, "too_many")),
        (("e", 5), ("f", 3, 1), (False, "epoch_changed")),
        (("e", 5), ("", 0, 0), (False, "epoch_changed")),  # the store lost everything
        (("", 0), ("", 0, 0), (True, None)),  # everything retained: nothing
        (("", 0), ("e", 9, 1), (True, None)),
        (("", 0), ("e", 9, 3), (False, "too_old")),
    ],
)  # fmt: skip
def test_judge(
    reader: tuple[str, int], store: tuple[str, int, int], verdict: tuple[bool, str | None]
) -> None:
    assert history.judge(*reader, *store, 1000) == verdict


def test_resume_frame_validation() -> None:
    cmd = frames.parse(
        b'{"type":"resume","id":1,"streams":{"group:g":["e",3],"uid:u":[null,0]},'
        b'"presence":["group:g"]}'
    )
    assert cmd.positions == {"group:g": ("e", 3), "uid:u": ("", 0)}
    assert cmd.watch == frozenset({"group:g"})
    bad = [
        b'{"type":"resume","id":1}',
        b'{"type":"resume","id":1,"streams":{}}',
        b'{"type":"resume","id":1,"streams":[]}',
        b'{"type":"resume","id":1,"streams":{"all":["e",1]}}',
        b'{"type":"resume","id":1,"streams":{"client:n-1.1":["e",1]}}',
        b'{"type":"resume","id":1,"streams":{"group:g":["e"]}}',
        b'{"type":"resume","id":1,"streams":{"group:g":["e",-1]}}',
        b'{"type":"resume","id":1,"streams":{"group:g":["e",true]}}',
        b'{"type":"resume","id":1,"streams":{"group:g":["e",1.5]}}',
        b'{"type":"resume","id":1,"streams":{"group:g":[7,1]}}',
        b'{"type":"resume","id":1,"streams":{"group:g":["' + b"e" * 65 + b'",1]}}',
        b'{"type":"resume","id":1,"streams":{"group:":["e",1]}}',
        b'{"type":"resume","id":1,"streams":{"group:g":["e",1]},"presence":"group:g"}',
        b'{"type":"resume","id":1,"streams":{"group:g":["e",1]},"presence":["group:h"]}',
        b'{"type":"resume","id":1,"streams":{"group:g":["e",1]},"presence":[["x"]]}',
        b'{"type":"resume","id":1,"streams":{"uid:u":["e",1]},"presence":["uid:u"]}',
    ]
    for payload in bad:
        with pytest.raises(frames.FrameError) as info:
            frames.parse(payload)
        assert info.value.code is Code.BAD_REQUEST and info.value.frame_id == 1, payload
