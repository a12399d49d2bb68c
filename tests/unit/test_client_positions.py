"""The client's stream positions and its pushed-frame inbox (wscluster.client.positions)."""

from __future__ import annotations

from typing import Any

import pytest

from wscluster.client.positions import (
    Inbox,
    Positions,
    in_offset_order,
    parse_position,
    position_in,
    stream_of,
)

Frame = dict[str, Any]


def msg(to: str, offset: int, epoch: str = "e1") -> Frame:
    return {"type": "message", "to": to, "from": None, "data": offset, "ts": 0,
            "offset": offset, "epoch": epoch}  # fmt: skip


def gap(stream: str, offset: int, epoch: str = "e1") -> Frame:
    return {"type": "gap", "stream": stream, "epoch": epoch, "offset": offset, "reason": "lost"}


def inbox(initial: dict[str, object] | None = None, max_held: int = 100) -> tuple[Inbox, list]:
    out: list[Frame] = []
    return Inbox(Positions(initial), out.append, max_held), out


def seen(out: list[Frame]) -> list[tuple[str, Any]]:
    return [(f.get("to") or f.get("stream") or f["type"], f.get("offset")) for f in out]


# -- positions ---------------------------------------------------------------------------


def test_parse_position() -> None:
    assert parse_position("uid:a", ["e", 7]) == ("e", 7)
    assert parse_position("group:g:1", ("e", 0)) == ("e", 0)
    assert parse_position("group:g", [None, 0]) == (None, 0)
    assert parse_position("group:g", ["", 3]) == (None, 3)  # "" is "no epoch" on the wire
    bad: list[tuple[object, object]] = [
        ("all", ["e", 1]), ("client:x", ["e", 1]), (7, ["e", 1]), ("uid:a", "e:1"),
        ("uid:a", ["e"]), ("uid:a", ["e", 1, 2]), ("uid:a", ["e", -1]), ("uid:a", ["e", 1.0]),
        ("uid:a", ["e", True]), ("uid:a", [5, 1]), ("uid:a", None),
    ]  # fmt: skip
    for stream, value in bad:
        with pytest.raises(ValueError):
            parse_position(stream, value)


def test_position_in_and_stream_of() -> None:
    assert position_in({"type": "ack", "epoch": "e", "offset": 4}) == ("e", 4)
    assert position_in({"type": "ack", "uid": "a"}) is None
    assert position_in({"epoch": "", "offset": 0}) == (None, 0)  # a stream not written yet
    assert position_in({"epoch": None, "offset": 4}) is None
    assert position_in({"epoch": "e", "offset": "4"}) is None
    assert stream_of(msg("group:g", 1)) == "group:g"
    assert stream_of(gap("uid:a", 3)) == "uid:a"
    no_history = {"type": "message", "to": "group:g", "from": None, "data": 1, "ts": 0}
    assert stream_of(no_history) is None
    assert stream_of({**msg("all", 1)}) is None  # `all` and `client:` have no history
    assert stream_of({"type": "presence", "group": "g", "offset": 1, "epoch": "e"}) is None


def test_advance_takes_only_later_positions() -> None:
    p = Positions({"group:g": ["e1", 5]})
    assert not p.advance("group:g", ("e1", 5))
    assert not p.advance("group:g", ("e1", 2))
    assert p.advance("group:g", ("e1", 6))
    assert p.advance("group:g", ("e2", 1))  # a new epoch replaces, whatever its offset
    assert p.get("group:g") == ("e2", 1)
    assert p.advance("uid:a", ("e1", 1))  # a first position
    q = Positions({"uid:a": [None, 0]})
    assert q.advance("uid:a", ("e1", 1))


def test_no_epoch_never_replaces_one() -> None:
    """A resume ack read before anything was stored says ``["", 0]`` while the live messages
    it let through already carried the epoch: the position stays."""
    box, out = inbox({"uid:a": [None, 0]})
    hold = box.hold(["uid:a"])
    box.put(msg("uid:a", 1))
    box.release(hold, {"uid:a": {"recovered": True, "epoch": "", "offset": 0, "replayed": 0}})
    assert box.positions.get("uid:a") == ("e1", 1)
    box.put(msg("uid:a", 1))
    assert seen(out) == [("uid:a", 1)] and box.duplicates == 1


def test_fill_only_without_a_position() -> None:
    p = Positions({"uid:a": ["e1", 5]})
    p.fill("uid:a", {"type": "ack", "epoch": "e1", "offset": 9})
    p.fill("group:g", {"type": "ack", "epoch": "e1", "offset": 9})
    p.fill("group:h", {"type": "ack"})  # no history: nothing
    assert p.snapshot() == {"uid:a": ["e1", 5], "group:g": ["e1", 9]}
    p.forget("uid:a")
    assert "uid:a" not in p and "group:g" in p


def test_snapshot_round_trips() -> None:
    p = Positions({"uid:a": ["e1", 5], "group:g": [None, 0]})
    p.advance("group:g", ("e9", 3))
    assert Positions(p.snapshot()).snapshot() == p.snapshot() == {
        "uid:a": ["e1", 5], "group:g": ["e9", 3]
    }  # fmt: skip
    with pytest.raises(ValueError):
        Positions({"all": ["e", 1]})


def test_in_offset_order() -> None:
    frames = [msg("g", 9, "e2"), msg("g", 4), gap("g", 7), msg("g", 7), msg("g", 1, "e2"),
              msg("g", 3)]  # fmt: skip
    order = [(f["epoch"], f["offset"], f["type"]) for f in in_offset_order(frames)]
    assert order == [("e2", 1, "message"), ("e2", 9, "message"), ("e1", 3, "message"),
                     ("e1", 4, "message"), ("e1", 7, "message"), ("e1", 7, "gap")]  # fmt: skip


# -- inbox -------------------------------------------------------------------------------


def test_inbox_drops_duplicates_and_passes_the_rest() -> None:
    box, out = inbox({"group:g": ["e1", 5]})
    for frame in (
        msg("group:g", 4),
        msg("group:g", 5),
        msg("group:g", 6),
        msg("group:g", 6),
        {"type": "presence", "group": "g"},
        msg("uid:a", 1),
        msg("group:g", 7),
    ):
        box.put(frame)  # fmt: skip
    assert seen(out) == [("group:g", 6), ("presence", None), ("uid:a", 1), ("group:g", 7)]
    assert box.duplicates == 3
    assert box.positions.snapshot() == {"group:g": ["e1", 7], "uid:a": ["e1", 1]}


def test_inbox_new_epoch_is_accepted() -> None:
    box, out = inbox({"group:g": ["e1", 50]})
    box.put(msg("group:g", 1, "e2"))
    box.put(msg("group:g", 50, "e1"))  # a late message of the old epoch: not a duplicate
    assert seen(out) == [("group:g", 1), ("group:g", 50)]
    assert box.duplicates == 0


def test_inbox_gap_moves_the_position_and_is_delivered() -> None:
    box, out = inbox({"group:g": ["e1", 5]})
    box.put(gap("group:g", 9))
    box.put(msg("group:g", 8))  # covered by the gap: a later one continues after 9
    box.put(msg("group:g", 10))
    box.put(gap("group:g", 3))  # behind the position: delivered, changes nothing
    assert seen(out) == [("group:g", 9), ("group:g", 10), ("group:g", 3)]
    assert box.positions.get("group:g") == ("e1", 10)


def test_hold_then_release_delivers_in_order_once() -> None:
    """Live messages that came before the replay wait; the replay passes at once and brings
    them in line; a live one after that passes too: all delivered in offset order, once."""
    box, out = inbox({"uid:a": ["e1", 6], "group:g": ["e1", 2]})
    hold = box.hold(["uid:a", "group:g"])
    for frame in (msg("uid:a", 9), msg("uid:a", 10), {"type": "presence", "group": "g"}):
        box.put(frame)
    assert seen(out) == [("presence", None)] and box.held == 2  # 7 and 8 are missing
    for frame in (
        msg("uid:a", 7),
        msg("group:g", 3),
        msg("uid:a", 8),
        msg("uid:a", 9),
        msg("uid:a", 10),
        msg("uid:a", 11),
        msg("group:x", 1),
    ):
        box.put(frame)  # fmt: skip
    assert seen(out)[1:] == [("uid:a", 7), ("group:g", 3), ("uid:a", 8), ("uid:a", 9),
                             ("uid:a", 10), ("uid:a", 11), ("group:x", 1)]  # fmt: skip
    assert box.duplicates == 2 and box.held == 0
    results = {
        "uid:a": {"recovered": True, "epoch": "e1", "offset": 10, "replayed": 4},
        "group:g": {"recovered": True, "epoch": "e1", "offset": 3, "replayed": 1},
    }
    box.release(hold, results)
    assert len(out) == 8
    assert box.positions.snapshot() == {"uid:a": ["e1", 11], "group:g": ["e1", 3],
                                        "group:x": ["e1", 1]}  # fmt: skip
    box.put(msg("uid:a", 11))
    box.put(msg("uid:a", 12))
    assert seen(out)[-1] == ("uid:a", 12) and box.duplicates == 3


def test_held_frames_wait_for_a_hole_then_release_sorts_them() -> None:
    box, out = inbox({"uid:a": ["e1", 6]})
    hold = box.hold(["uid:a"])
    for n in (10, 9, 8):
        box.put(msg("uid:a", n))
    assert out == [] and box.held == 3
    box.release(hold, {"uid:a": {"recovered": False, "reason": "too_old", "epoch": "e1",
                                 "offset": 10, "replayed": 0}})  # fmt: skip
    assert seen(out) == [("uid:a", 8), ("uid:a", 9), ("uid:a", 10)]


def test_release_after_an_epoch_change() -> None:
    box, out = inbox({"group:g": ["e1", 41]})
    hold = box.hold(["group:g"])
    for n in (3, 1, 2):
        box.put(msg("group:g", n, "e2"))
    entry = {"recovered": False, "reason": "epoch_changed", "epoch": "e2", "offset": 3}
    box.release(hold, {"group:g": entry})
    assert seen(out) == [("group:g", 1), ("group:g", 2), ("group:g", 3)]
    assert box.positions.get("group:g") == ("e2", 3)


def test_release_ignores_results_without_a_position() -> None:
    box, out = inbox({"group:g": ["e1", 4]})
    hold = box.hold(["group:g"])
    box.release(hold, {"group:g": {"error": "forbidden"}, "group:h": {"epoch": "x"}})
    assert box.positions.snapshot() == {"group:g": ["e1", 4]} and out == []


def test_discard_drops_what_waits() -> None:
    box, out = inbox({"group:g": ["e1", 4]})
    hold = box.hold(["group:g"])
    box.put(msg("group:g", 9))
    box.discard(hold)
    assert out == [] and box.held == 0
    assert box.positions.get("group:g") == ("e1", 4)  # a later resume replays 5..9
    box.put(msg("group:g", 5))
    assert seen(out) == [("group:g", 5)]


def test_a_new_hold_takes_over_a_stream() -> None:
    box, out = inbox()
    first = box.hold(["group:g", "group:h"])
    box.put(msg("group:g", 1))
    second = box.hold(["group:g"])  # starts over: what the first hold kept is dropped
    assert box.held == 0
    box.put(msg("group:g", 2))
    box.put(msg("group:h", 1))
    box.release(first)  # only group:h is still under it
    assert seen(out) == [("group:h", 1)]
    box.release(second)
    assert seen(out) == [("group:h", 1), ("group:g", 2)]
    box.release(second)  # released twice, or discarded after: nothing happens
    box.discard(second)
    assert len(out) == 2


def test_hold_is_bounded() -> None:
    """At most max_held frames wait (those not in line); more are dropped and counted."""
    box, out = inbox({"group:g": ["e1", 0]}, max_held=3)
    hold = box.hold(["group:g"])
    for n in range(2, 7):  # 1 is missing: they wait
        box.put(msg("group:g", n))
    assert box.held == 3 and box.overflowed == 2 and out == []
    box.release(hold)
    assert seen(out) == [("group:g", 2), ("group:g", 3), ("group:g", 4)]
    with pytest.raises(ValueError):
        Inbox(Positions(), out.append, 0)


def test_a_replay_in_line_is_never_held() -> None:
    """A resume's replay (offsets right after the position) flows through the hold, so a
    replay far larger than max_held loses nothing."""
    box, out = inbox({"group:g": ["e1", 0]}, max_held=2)
    hold = box.hold(["group:g"])
    box.put(msg("group:g", 5002))  # live ones that came before the replay
    box.put(msg("group:g", 5001))
    for n in range(1, 5001):
        box.put(msg("group:g", n))
    assert box.overflowed == 0 and box.held == 0
    assert [f["offset"] for f in out] == list(range(1, 5003))
    box.release(hold)
    assert len(out) == 5002


def test_release_takes_the_ack_position_when_nothing_came() -> None:
    box, out = inbox({"group:g": ["e1", 41]})
    hold = box.hold(["group:g"])
    box.release(hold, {"group:g": {"recovered": False, "reason": "epoch_changed",
                                   "epoch": "e2", "offset": 0, "replayed": 0}})  # fmt: skip
    assert box.positions.get("group:g") == ("e2", 0)
    box.put(msg("group:g", 1, "e2"))
    assert seen(out) == [("group:g", 1)]
