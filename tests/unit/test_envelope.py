import msgspec
import pytest

from wscluster import envelope
from wscluster.routing import parse_address


def test_deliver_round_trip_keeps_payload_bytes() -> None:
    frame = envelope.message_frame(
        parse_address("group:g"), msgspec.Raw(b'{"x": [1, 2]}'), envelope.Sender("a", "n.1")
    )
    decoded = msgspec.json.decode(frame)
    assert decoded["type"] == "message" and decoded["to"] == "group:g"
    assert decoded["from"] == {"uid": "a", "client_id": "n.1"}
    assert decoded["data"] == {"x": [1, 2]}
    assert isinstance(decoded["ts"], int) and decoded["ts"] > 1_600_000_000_000
    env = envelope.decode(envelope.deliver("group:g", frame, exclude=("n.2",)))
    assert env.op == envelope.Op.DELIVER and env.payload == frame
    assert env.exclude == ("n.2",) and env.to == "group:g" and not env.binary


def test_backend_messages_have_null_from() -> None:
    frame = envelope.message_frame("all", msgspec.Raw(b'"hi"'), None)
    assert msgspec.json.decode(frame)["from"] is None


def test_close_and_presence_envelopes() -> None:
    env = envelope.decode(envelope.close("uid:x", 4001))
    assert env.op == envelope.Op.CLOSE and env.code == 4001
    env = envelope.decode(envelope.presence_event("g", "join", None, "n.1"))
    assert env.op == envelope.Op.PRESENCE and env.to == "group:g"
    assert msgspec.json.decode(env.payload) == {
        "type": "presence", "group": "g", "event": "join", "uid": None, "client_id": "n.1"
    }


@pytest.mark.parametrize("raw", [b"", b"\x00\x01", b"junk", msgspec.msgpack.encode([2, 1, "all"])])
def test_bad_or_future_envelopes_are_rejected(raw: bytes) -> None:
    with pytest.raises(envelope.EnvelopeError):
        envelope.decode(raw)
