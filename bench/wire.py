"""Client side of the two wire protocols, on raw picows connections.

``wsc``: wscluster's JSON frames (docs/protocol.md). ``sio``: Socket.IO v5 over Engine.IO v4
on a bare WebSocket (``0{open}``, ``40`` connect, ``42[event, data]``, ``42<id>[...]`` with an
ack ``43<id>[...]``, ping ``2`` / pong ``3``). Both speak the same four operations to the
servers (login, join, send with ack, receive "message"), so the client costs the same for
every system measured.
"""

from __future__ import annotations

import array
import asyncio
import time
from typing import Any

import msgspec
from picows import WSCloseCode, WSListener, WSMsgType, WSTransport, ws_connect


class Payload(msgspec.Struct):
    s: int  # sequence number
    t: float  # send time (time.time())
    p: int  # phase: 0 fixed rate, 1 flat out


class WscIn(msgspec.Struct):
    type: str
    id: Any = None
    code: Any = None
    data: Payload | None = None


class SioBody(msgspec.Struct):
    data: Payload | None = None


_wsc_decode = msgspec.json.Decoder(WscIn).decode
_sio_decode = msgspec.json.Decoder(tuple[str, SioBody]).decode
_encode = msgspec.json.encode


class Sink:
    """Per load process: what its connections received and what its senders got acked."""

    def __init__(self) -> None:
        self.count = [0, 0]
        self.first = [0.0, 0.0]
        self.last = [0.0, 0.0]
        self.lat = [array.array("d"), array.array("d")]
        self.origin = 0.0  # time.time() of the scenario's start, for the timeline
        self.timeline = array.array("I")  # deliveries per 100 ms since origin
        self.received = 0
        # senders
        self.inflight = 0
        self.acked = 0
        self.expected = 0  # deliveries the acked sends promise
        self.errors: dict[str, int] = {}
        self.wake: asyncio.Event | None = None
        self.closes: dict[str, int] = {}  # close codes sent by the servers

    def record(self, data: Payload) -> None:
        now = time.time()
        p = data.p
        if not self.count[p]:
            self.first[p] = now
        self.count[p] += 1
        self.received += 1
        self.last[p] = now
        self.lat[p].append((now - data.t) * 1000.0)
        b = int((now - self.origin) * 10)
        tl = self.timeline
        if b >= len(tl):
            tl.extend([0] * (b + 64 - len(tl)))
        tl[b] += 1

    def acked_send(self, client: Client, ok: bool, code: Any) -> None:
        self.inflight -= 1
        if ok:
            self.acked += 1
            self.expected += client.fan
        else:
            key = str(code)
            self.errors[key] = self.errors.get(key, 0) + 1
        if self.wake is not None:
            self.wake.set()


class Client(WSListener):
    """One connection. ``to``/``fan``: where its sends go and how many receive each one."""

    proto = ""

    def __init__(self, sink: Sink, to: str | None = None, fan: int = 0) -> None:
        super().__init__()
        loop = asyncio.get_running_loop()
        self.sink = sink
        self.transport: WSTransport | None = None
        self.ready: asyncio.Future[None] = loop.create_future()
        self.closed = False
        self.requests: dict[int, asyncio.Future[tuple[bool, Any]]] = {}
        self.next_id = 0
        self.to = to
        self.fan = fan

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.closed = True
        if not self.ready.done():
            self.ready.set_exception(ConnectionError("closed before ready"))
        for fut in self.requests.values():
            if not fut.done():
                fut.set_exception(ConnectionError("closed"))
        self.requests.clear()

    def _close_frame(self, transport: WSTransport, frame: Any) -> None:
        code = frame.get_close_code()
        key = str(int(code))
        self.sink.closes[key] = self.sink.closes.get(key, 0) + 1
        transport.send_close(code)
        transport.disconnect()

    def _answer(self, rid: Any, ok: bool, code: Any) -> None:
        fut = self.requests.pop(rid, None) if isinstance(rid, int) else None
        if fut is not None:
            if not fut.done():
                fut.set_result((ok, code))
        elif isinstance(rid, int):
            self.sink.acked_send(self, ok, code)

    def _send_text(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.send(WSMsgType.TEXT, data)

    async def request(self, op: str, arg: str, timeout: float = 60) -> tuple[bool, Any]:
        self.next_id += 1
        rid = self.next_id
        fut: asyncio.Future[tuple[bool, Any]] = asyncio.get_running_loop().create_future()
        self.requests[rid] = fut
        self._send_text(self.encode_request(op, arg, rid))
        return await asyncio.wait_for(fut, timeout)

    def send_data(self, seq: int, phase: int) -> None:
        """A timestamped message to ``self.to``; its ack goes to the sink."""
        self.next_id += 1
        self.sink.inflight += 1
        self._send_text(self.encode_send(self.next_id, seq, time.time(), phase))

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.send_close(WSCloseCode.OK)
            self.transport.disconnect()

    def encode_request(self, op: str, arg: str, rid: int) -> bytes:
        raise NotImplementedError

    def encode_send(self, rid: int, seq: int, t: float, phase: int) -> bytes:
        raise NotImplementedError


class WscClient(Client):
    proto = "wsc"

    def on_ws_frame(self, transport: WSTransport, frame: Any) -> None:
        kind = frame.msg_type
        if kind is WSMsgType.TEXT:
            try:
                msg = _wsc_decode(frame.get_payload_as_memoryview())
            except msgspec.DecodeError:  # a frame of another shape: not ours to measure
                return
            t = msg.type
            if t == "message":
                if msg.data is not None:
                    self.sink.record(msg.data)
            elif t == "ack" or t == "pong":
                self._answer(msg.id, True, None)
            elif t == "error":
                self._answer(msg.id, False, msg.code)
            elif t == "welcome" and not self.ready.done():
                self.ready.set_result(None)
        elif kind is WSMsgType.CLOSE:
            self._close_frame(transport, frame)

    def encode_request(self, op: str, arg: str, rid: int) -> bytes:
        key = "uid" if op == "login" else "group"
        return _encode({"type": op, key: arg, "id": rid})

    def encode_send(self, rid: int, seq: int, t: float, phase: int) -> bytes:
        to = _encode(self.to)
        return b'{"type":"send","to":%s,"id":%d,"data":{"s":%d,"t":%.6f,"p":%d}}' % (
            to, rid, seq, t, phase)  # fmt: skip


class SioClient(Client):
    proto = "sio"

    def on_ws_frame(self, transport: WSTransport, frame: Any) -> None:
        kind = frame.msg_type
        if kind is WSMsgType.TEXT:
            b = frame.get_payload_as_bytes()
            if b[:3] == b"42[":
                try:
                    event, body = _sio_decode(b[2:])
                except msgspec.DecodeError:
                    return
                if event == "message" and body.data is not None:
                    self.sink.record(body.data)
            elif b[:2] == b"43":
                end = b.find(b"[", 2)
                if end > 2:
                    self._answer(int(b[2:end]), True, None)
            elif b == b"2":
                transport.send(WSMsgType.TEXT, b"3")
            elif b[:2] == b"40":
                if not self.ready.done():
                    self.ready.set_result(None)
            elif b[:2] == b"44":
                if not self.ready.done():
                    self.ready.set_exception(ConnectionError(f"connect refused: {b[:200]!r}"))
            elif b[:1] == b"0":
                transport.send(WSMsgType.TEXT, b"40")  # Engine.IO open: connect namespace "/"
            elif b[:1] == b"1":
                transport.disconnect()
        elif kind is WSMsgType.CLOSE:
            self._close_frame(transport, frame)

    def encode_request(self, op: str, arg: str, rid: int) -> bytes:
        return b"42%d%s" % (rid, _encode([op, arg]))

    def encode_send(self, rid: int, seq: int, t: float, phase: int) -> bytes:
        to = _encode(self.to)
        return b'42%d["send",{"to":%s,"data":{"s":%d,"t":%.6f,"p":%d}}]' % (
            rid, to, seq, t, phase)  # fmt: skip


CLIENTS: dict[str, type[Client]] = {"wsc": WscClient, "sio": SioClient}


async def connect(proto: str, url: str, sink: Sink, to: str | None = None, fan: int = 0,
                  source: str | None = None, timeout: float = 30) -> Client:  # fmt: skip
    """Open a connection and wait for ``welcome`` (wsc) or the namespace connect (sio)."""
    cls = CLIENTS[proto]
    client = cls(sink, to, fan)
    kw: dict[str, Any] = {"local_addr": (source, 0)} if source else {}
    try:
        await ws_connect(lambda: client, url, use_aiofastnet=False, read_buffer_init_size=2048,
                         websocket_handshake_timeout=timeout, **kw)  # fmt: skip
    except BaseException:
        if client.ready.done() and not client.ready.cancelled():
            client.ready.exception()  # retrieved: no "never retrieved" warning
        raise
    try:
        await asyncio.wait_for(client.ready, timeout)
    except BaseException:
        client.close()
        raise
    return client
