"""Client frames: decoding and validation (client -> server) and encoding of the server's
replies. Sans-I/O: bytes in, typed commands or protocol errors out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec

from .errors import Code, ProtocolError, bad_request
from .routing import Address, Kind, check_name, parse_address

MAX_ID_LEN = 64
CORE_TYPES = frozenset({"login", "logout", "join", "leave", "send", "presence", "ping", "resume"})
MAX_RESUME_STREAMS = 10_001  # the node's own bound (max groups per connection + 1) is lower
MAX_EPOCH = 64

FrameId = int | str | None


class RawFrame(msgspec.Struct):
    """A client frame as sent; types are checked by hand so errors can name the field."""

    type: Any = None
    id: Any = None
    to: Any = None
    data: msgspec.Raw = msgspec.Raw(b"")
    uid: Any = None
    token: Any = None
    group: Any = None
    presence: Any = None
    streams: Any = None
    recent: Any = None
    carbon: Any = None


_decoder = msgspec.json.Decoder(RawFrame)
_encoder = msgspec.json.Encoder()


class FrameError(ProtocolError):
    """A protocol error tied to the id of the frame that caused it."""

    def __init__(self, code: Code, message: str, frame_id: FrameId) -> None:
        super().__init__(code, message)
        self.frame_id = frame_id


@dataclass(slots=True)
class Command:
    """A validated core frame (or an application frame when ``type`` is not a core type)."""

    type: str
    id: FrameId
    raw: RawFrame
    address: Address | None = None  # send / presence
    name: str | None = None  # login uid / join+leave group
    positions: dict[str, tuple[str, int]] | None = None  # resume: stream -> (epoch, offset)
    watch: frozenset[str] = frozenset()  # resume: groups joined with presence events
    recent: int = 0  # resume: streams at [null, 0] replay at most this many (0: --max-replay)
    carbon: bool = False  # send to a uid: a copy goes to the sender's own uid stream


def _check_id(value: Any) -> FrameId:
    if value is None:
        return None
    if isinstance(value, bool):
        raise bad_request("'id' must be an integer or a string")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and len(value) <= MAX_ID_LEN:
        return value
    raise bad_request(f"'id' must be an integer or a string of at most {MAX_ID_LEN} characters")


def parse(payload: bytes, utf8_checked: bool = False) -> Command:
    """Decode one text frame. Raises FrameError with the frame's id where it is known.
    ``utf8_checked``: the transport already refused invalid UTF-8 (a WebSocket text frame
    that is not UTF-8 closes the connection with 1007, RFC 6455 8.1)."""
    if not utf8_checked:
        try:
            # msgspec checks UTF-8 only in what it decodes: `data` stays raw and is forwarded
            # as it is, so the whole frame is checked (invalid UTF-8 would break receivers).
            payload.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise FrameError(Code.BAD_JSON, f"not valid UTF-8 at byte {exc.start}", None) from None
    try:
        raw = _decoder.decode(payload)
    except msgspec.ValidationError as exc:
        raise FrameError(Code.BAD_REQUEST, f"frame must be a JSON object ({exc})", None) from None
    except msgspec.DecodeError as exc:
        raise FrameError(Code.BAD_JSON, str(exc), None) from None
    except RecursionError:
        raise FrameError(Code.BAD_JSON, "JSON nested too deeply", None) from None
    try:
        frame_id = _check_id(raw.id)
    except ProtocolError as exc:
        raise FrameError(exc.code, exc.message, None) from None
    try:
        return _validate(raw, frame_id)
    except ProtocolError as exc:
        raise FrameError(exc.code, exc.message, frame_id) from None


def _validate(raw: RawFrame, frame_id: FrameId) -> Command:
    kind = raw.type
    if not isinstance(kind, str) or not kind:
        raise bad_request("'type' must be a non-empty string")
    cmd = Command(kind, frame_id, raw)
    if kind == "send":
        cmd.address = parse_address(raw.to)
        if not raw.data:
            raise bad_request("'send' needs 'data'")
        if raw.carbon is not None and not isinstance(raw.carbon, bool):
            raise bad_request("'carbon' must be a boolean")
        if raw.carbon and cmd.address.kind is not Kind.UID:
            raise bad_request("'carbon' is for a send to a uid: address")
        cmd.carbon = bool(raw.carbon)
    elif kind == "join" or kind == "leave":
        cmd.name = check_name(raw.group, "group")
        if kind == "join" and raw.presence is not None and not isinstance(raw.presence, bool):
            raise bad_request("'presence' must be a boolean")
    elif kind == "login":
        if raw.token is not None:
            if not isinstance(raw.token, str) or not raw.token:
                raise bad_request("'token' must be a non-empty string")
        else:
            cmd.name = check_name(raw.uid, "uid")
    elif kind == "resume":
        cmd.positions = _positions(raw.streams)
        watch = raw.presence if raw.presence is not None else []
        if not isinstance(watch, list) or not all(
            isinstance(w, str) and w.startswith("group:") and w in cmd.positions for w in watch
        ):
            raise bad_request("'presence' must be a list of group streams of 'streams'")
        cmd.watch = frozenset(watch)
        if raw.recent is not None:
            recent = raw.recent
            if isinstance(recent, bool) or not isinstance(recent, int) or recent < 1:
                raise bad_request("'recent' must be an integer >= 1")
            cmd.recent = recent
    elif kind == "presence":
        cmd.address = parse_address(raw.to)
        if cmd.address.kind not in (Kind.UID, Kind.GROUP):
            raise bad_request("'presence' takes a uid: or group: address")
    return cmd


def _positions(streams: Any) -> dict[str, tuple[str, int]]:
    if not isinstance(streams, dict) or not streams:
        raise bad_request("'streams' must be an object of stream: [epoch, offset]")
    if len(streams) > MAX_RESUME_STREAMS:
        raise bad_request(f"at most {MAX_RESUME_STREAMS} streams")
    out: dict[str, tuple[str, int]] = {}
    for stream, position in streams.items():
        address = parse_address(stream)
        if address.kind not in (Kind.UID, Kind.GROUP):
            raise bad_request("resume takes uid: and group: streams")
        if not isinstance(position, list) or len(position) != 2:
            raise bad_request("a position is [epoch, offset]")
        epoch, offset = position
        if epoch is None:
            epoch = ""
        if not isinstance(epoch, str) or len(epoch) > MAX_EPOCH:
            raise bad_request(f"an epoch is a string of at most {MAX_EPOCH} characters or null")
        if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset < 2**53:
            raise bad_request("an offset is an integer >= 0")
        out[str(address)] = (epoch, offset)
    return out


# --- server -> client ------------------------------------------------------------------


def encode(obj: dict[str, Any]) -> bytes:
    return _encoder.encode(obj)


def ack(frame_id: FrameId, **result: Any) -> bytes:
    return _encoder.encode({"type": "ack", "id": frame_id, **result})


def error(frame_id: FrameId, code: str, message: str) -> bytes:
    return _encoder.encode({"type": "error", "id": frame_id, "code": code, "message": message})


def pong(frame_id: FrameId) -> bytes:
    return _encoder.encode({"type": "pong", "id": frame_id})
