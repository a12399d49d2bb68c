import msgspec
import pytest

from wscluster import frames
from wscluster.errors import Code


def err(payload: bytes) -> frames.FrameError:
    with pytest.raises(frames.FrameError) as info:
        frames.parse(payload)
    return info.value


def test_valid_frames() -> None:
    cmd = frames.parse(b'{"type": "send", "to": "uid:bob", "data": {"t": 1}, "id": 7}')
    assert cmd.type == "send" and cmd.id == 7 and str(cmd.address) == "uid:bob"
    assert bytes(cmd.raw.data) == b'{"t": 1}'
    assert frames.parse(b'{"type": "join", "group": "g", "presence": true, "id": "x"}').name == "g"
    assert frames.parse(b'{"type": "login", "uid": "alice"}').name == "alice"
    assert frames.parse(b'{"type": "ping"}').id is None
    assert frames.parse(b'{"type": "custom", "whatever": 1}').type == "custom"
    assert frames.parse(b'{"type": "send", "to": "all", "data": null}').raw.data


@pytest.mark.parametrize(
    ("payload", "code", "frame_id"),
    [
        (b"{not json", Code.BAD_JSON, None),
        (b'{"type": "\xff"}', Code.BAD_JSON, None),
        (b'{"type": "send", "to": "all", "data": "\xff\xfe", "id": 1}', Code.BAD_JSON, None),
        (b'{"type": "ping", "data": ' + b"[" * 5000 + b"]" * 5000 + b"}", Code.BAD_JSON, None),
        (b"[1, 2]", Code.BAD_REQUEST, None),
        (b'"text"', Code.BAD_REQUEST, None),
        (b'{"id": 3}', Code.BAD_REQUEST, 3),
        (b'{"type": 5, "id": 3}', Code.BAD_REQUEST, 3),
        (b'{"type": "ping", "id": true}', Code.BAD_REQUEST, None),
        (b'{"type": "ping", "id": 1.5}', Code.BAD_REQUEST, None),
        (b'{"type": "ping", "id": "' + b"x" * 65 + b'"}', Code.BAD_REQUEST, None),
        (b'{"type": "send", "to": "uid:b", "id": 1}', Code.BAD_REQUEST, 1),
        (b'{"type": "send", "to": "nope", "data": 1, "id": 2}', Code.BAD_REQUEST, 2),
        (b'{"type": "join", "group": "", "id": 4}', Code.BAD_REQUEST, 4),
        (b'{"type": "join", "group": "g", "presence": "yes"}', Code.BAD_REQUEST, None),
        (b'{"type": "login", "id": "a"}', Code.BAD_REQUEST, "a"),
        (b'{"type": "login", "token": 5}', Code.BAD_REQUEST, None),
        (b'{"type": "presence", "to": "all", "id": 9}', Code.BAD_REQUEST, 9),
    ],
)
def test_invalid_frames(payload: bytes, code: Code, frame_id: object) -> None:
    e = err(payload)
    assert e.code is code
    assert e.frame_id == frame_id


def test_replies_are_json() -> None:
    assert msgspec.json.decode(frames.ack(3, uid="a")) == {"type": "ack", "id": 3, "uid": "a"}
    assert msgspec.json.decode(frames.error(None, "bad_json", "m"))["id"] is None
    assert msgspec.json.decode(frames.pong("p")) == {"type": "pong", "id": "p"}
