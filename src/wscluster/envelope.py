"""The internal envelope that travels over the broker between nodes. No I/O.

Version 1, MessagePack, array-like (compact and fast). A ``DELIVER`` envelope carries the
exact bytes every local receiver gets (``payload``): the publisher encodes the client frame
once and every node writes those bytes as they are. Applications that speak their own wire
format publish their own bytes the same way (``verbatim``): the node never looks inside.
"""

from __future__ import annotations

import time
from enum import IntEnum

import msgspec

from .routing import Address

VERSION = 1


class Op(IntEnum):
    DELIVER = 1  # push payload to the receivers of `to`
    CLOSE = 2  # close the connections of `to` with `code`
    PRESENCE = 3  # push payload to the members of group `to` that watch presence
    CONTROL = 4  # apply a ControlRequest (payload) to the connection `client:<id>` in `to`
    REPLY = 5  # the ControlReply (payload) to a CONTROL; `to` is the asker's reply channel
    PROBE = 6  # a node's liveness probe to itself; `to` is its token


class Envelope(msgspec.Struct, array_like=True, frozen=True):
    v: int
    op: int
    to: str
    payload: bytes = b""
    binary: bool = False  # send payload as a binary WebSocket frame
    exclude: tuple[str, ...] = ()  # client ids that must not receive it
    code: int = 0  # close code for CLOSE


class Sender(msgspec.Struct):
    uid: str | None
    client_id: str


class MessageFrame(msgspec.Struct, tag_field="type", tag="message"):
    """The server -> client ``message`` frame (``data`` kept as raw JSON, never re-encoded)."""

    to: str
    data: msgspec.Raw
    ts: int
    # `from` is a Python keyword: the rename makes the wire name "from".
    from_: Sender | None = msgspec.field(name="from", default=None)


_frame_encoder = msgspec.json.Encoder()
_envelope_encoder = msgspec.msgpack.Encoder()
_envelope_decoder = msgspec.msgpack.Decoder(Envelope)


class EnvelopeError(ValueError):
    """A broker message that is not a valid envelope of a version we speak."""


def message_frame(to: Address | str, data: msgspec.Raw, sender: Sender | None) -> bytes:
    """Encode the client-facing ``message`` frame once."""
    ts = time.time_ns() // 1_000_000
    return _frame_encoder.encode(MessageFrame(str(to), data, ts, sender))


def carbon(frame: bytes) -> bytes:
    """The sender's copy of a ``message`` frame (``"carbon": true``, its ``to`` kept): stored
    in and delivered to the sender's own ``uid:`` stream, which its envelope is addressed to."""
    return frame[:-1] + b',"carbon":true}'


def deliver(
    to: Address | str, payload: bytes, *, exclude: tuple[str, ...] = (), binary: bool = False
) -> bytes:
    return _envelope_encoder.encode(
        Envelope(VERSION, Op.DELIVER, str(to), payload, binary=binary, exclude=exclude)
    )


class PresenceFrame(msgspec.Struct, tag_field="type", tag="presence"):
    group: str
    event: str  # "join" | "leave"
    uid: str | None
    client_id: str


def presence_event(
    group: str, event: str, uid: str | None, cid: str, *, exclude: tuple[str, ...] = ()
) -> bytes:
    frame = _frame_encoder.encode(PresenceFrame(group, event, uid, cid))
    env = Envelope(VERSION, Op.PRESENCE, f"group:{group}", frame, exclude=exclude)
    return _envelope_encoder.encode(env)


class ControlRequest(msgspec.Struct, array_like=True, frozen=True):
    action: str  # bind | unbind | join | leave
    arg: str  # the uid or group ('' for unbind)
    reply_to: str  # broker channel of the asker
    request_id: int


class ControlReply(msgspec.Struct, array_like=True, frozen=True):
    request_id: int
    status: str  # "ok", "gone" (no such connection) or an error code


_request_decoder = msgspec.msgpack.Decoder(ControlRequest)
_reply_decoder = msgspec.msgpack.Decoder(ControlReply)


def control(to: Address | str, request: ControlRequest) -> bytes:
    payload = _envelope_encoder.encode(request)
    return _envelope_encoder.encode(Envelope(VERSION, Op.CONTROL, str(to), payload))


def reply(channel: str, answer: ControlReply) -> bytes:
    payload = _envelope_encoder.encode(answer)
    return _envelope_encoder.encode(Envelope(VERSION, Op.REPLY, channel, payload))


def decode_request(payload: bytes) -> ControlRequest:
    try:
        return _request_decoder.decode(payload)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise EnvelopeError(str(exc)) from None


def decode_reply(payload: bytes) -> ControlReply:
    try:
        return _reply_decoder.decode(payload)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise EnvelopeError(str(exc)) from None


def close(to: Address | str, code: int) -> bytes:
    return _envelope_encoder.encode(Envelope(VERSION, Op.CLOSE, str(to), code=code))


def decode(raw: bytes) -> Envelope:
    try:
        env = _envelope_decoder.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise EnvelopeError(str(exc)) from None
    if env.v != VERSION:
        raise EnvelopeError(f"unsupported envelope version {env.v}")
    return env


def probe(token: str) -> bytes:
    return _envelope_encoder.encode(Envelope(VERSION, Op.PROBE, token))
