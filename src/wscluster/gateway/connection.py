"""One client connection: the picows listener. I/O edge only; protocol decisions are the
node's (see handlers.py)."""

from __future__ import annotations

import asyncio
import struct
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Protocol

from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport

from .. import frames
from ..errors import Code

if TYPE_CHECKING:
    from ..app import Request
    from ..config import NodeConfig
    from ..metrics import Metrics
    from ..policy import Policy

ABUSE_CLOSE = 1008
SLOW_CONSUMER_CLOSE = 1013
_ABORT_AFTER = 2.0  # seconds between our close frame and dropping the TCP link
# Codes a peer may not put on the wire (RFC 6455 7.4.1): answered with 1000 instead.
_NOT_ECHOED = frozenset({WSCloseCode.NO_INFO, WSCloseCode.ABNORMAL_CLOSURE})
HELD_COST = 128  # bytes charged per held message on top of its payload (tuple, int, header)


class ConnectionHost(Protocol):
    """What a connection needs from its node."""

    config: NodeConfig
    metrics: Metrics

    def on_open(self, conn: Connection) -> None: ...

    def on_text(self, conn: Connection, payload: bytes) -> None: ...

    def on_binary(self, conn: Connection, payload: bytes) -> bool:
        """Take a binary message (True), or refuse it (False: the client gets an error)."""
        ...

    def on_closed(self, conn: Connection) -> None: ...

    def want_flush(self, conn: Connection) -> None:
        """``conn`` has frames to write: call its ``flush`` once the current callbacks ran."""
        ...


class Connection(WSListener):
    """A client connection. ``cid`` is set by the node on open.

    Frames pushed in one turn of the event loop are written together when the node flushes
    (one system call for all of them, instead of one per frame: fan-out bursts and acks)."""

    __slots__ = (
        "_backlog", "_drain_waiters", "_frag", "_frag_binary", "_out", "_out_keep", "_rate",
        "_rate_time",
        "_token_time", "_tokens", "admitting", "app", "app_gate", "app_tail", "cid",
        "close_code", "closing", "congested", "expiry", "frozen", "holding", "host",
        "inflight", "policy", "raw", "reading_paused", "request", "server_closed", "transport",
    )  # fmt: skip

    def __init__(self, host: ConnectionHost, request: Request) -> None:
        super().__init__()
        self.host = host
        self.request = request
        self.cid = ""
        self.raw = False  # an App(raw=True) speaks its own protocol: no error frames
        self.policy: Policy | None = None  # None: anonymous, everything allowed
        self.expiry: asyncio.TimerHandle | None = None  # closes 1008 when the token expires
        self.close_code: int | None = None  # sent or received; None until then
        self.admitting = False  # its uid is being bound and checked: no welcome yet
        self.holding = False  # core frames queue behind the app's on_connect
        self.server_closed = False  # the server started the close (refused, kicked, expired)
        self.app: Any = None  # the application's handle (wscluster.conn.Conn), if any
        self.app_tail: asyncio.Future[None] | None = None  # last queued app handler
        self.app_gate: asyncio.Future[bool] | None = None  # on_connect may run (welcomed)
        self.transport: WSTransport | None = None
        self.closing = False
        self.congested = False
        self.inflight = 0  # requests waiting for the broker or presence store
        self.reading_paused = False
        self.frozen = False  # reading stopped for good (drain)
        self._backlog: Backlog | None = None  # held while congested (see push); else None
        self._out: list[tuple[WSMsgType, bytes]] | None = None  # pushed this turn (see flush)
        self._out_keep = False  # _out holds a frame that may not be dropped
        self._drain_waiters: list[asyncio.Future[None]] | None = None  # see drained()
        self._frag: bytearray | None = None
        self._frag_binary = False
        cfg = host.config
        self._tokens = float(cfg.abuse_burst)
        self._token_time = time.monotonic()
        self._rate = float(cfg.rate_burst)  # frame rate limit (token bucket)
        self._rate_time = self._token_time

    # --- picows callbacks ------------------------------------------------------------
    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        self.host.on_open(self)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        kind = frame.msg_type
        if kind is WSMsgType.TEXT or kind is WSMsgType.BINARY:
            if self._frag is not None:  # a new data frame inside a fragmented message
                self._frag = None
                self.error(None, Code.BAD_REQUEST, "new message inside a fragmented one")
                return
            if frame.fin:
                self._data(frame.get_payload_as_bytes(), kind is WSMsgType.BINARY)
            else:
                self._frag = bytearray(frame.get_payload_as_memoryview())
                self._frag_binary = kind is WSMsgType.BINARY
                self._check_frag()
        elif kind is WSMsgType.CONTINUATION:
            if self._frag is None:
                self.error(None, Code.BAD_REQUEST, "continuation frame without a message")
                return
            self._frag += frame.get_payload_as_memoryview()
            if self._check_frag() and frame.fin:
                data, self._frag = bytes(self._frag), None
                self._data(data, self._frag_binary)
        elif kind is WSMsgType.CLOSE:
            if not self.closing:  # the client started the closing handshake: answer it
                self.closing = True
                code = frame.get_close_code()
                self.close_code = _code(code)
                valid = isinstance(code, WSCloseCode) and code not in _NOT_ECHOED
                transport.send_close(code if valid else WSCloseCode.OK)
            transport.disconnect()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.closing = True
        self._backlog = None
        self._out = None
        if self.close_code is None:
            self.close_code = _code(WSCloseCode.ABNORMAL_CLOSURE)
        if self.expiry is not None:
            self.expiry.cancel()
        self._wake_drain_waiters()
        self.host.on_closed(self)

    def pause_writing(self) -> None:
        self.congested = True

    def resume_writing(self) -> None:
        """The transport's buffer drained below its low mark: write what was held back, in
        order, until it is full again."""
        self.congested = False
        self._wake_drain_waiters()
        backlog, transport = self._backlog, self.transport
        if backlog is None or transport is None:
            return
        while not self.congested:  # a write over the high mark calls pause_writing at once
            held = backlog.pop()
            if held is None:
                self._backlog = None
                return
            transport.send(*held)

    def drained(self) -> asyncio.Future[None]:
        """A future done when the transport's buffer next drains below its low-water mark, or
        when the connection closes (check ``closing``): a producer that pushes in pages (the
        replay of a resume) waits on it while the connection is ``congested``."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.closing or self.transport is None:
            fut.set_result(None)
            return fut
        if self._drain_waiters is None:
            self._drain_waiters = []
        self._drain_waiters.append(fut)
        return fut

    def _wake_drain_waiters(self) -> None:
        waiters, self._drain_waiters = self._drain_waiters, None
        for fut in waiters or ():
            if not fut.done():
                fut.set_result(None)

    # --- inbound ---------------------------------------------------------------------
    def _check_frag(self) -> bool:
        assert self._frag is not None
        if len(self._frag) > self.host.config.max_frame_size:
            self._frag = None
            self.close(1009, "message too big")
            return False
        return True

    def _data(self, payload: bytes, binary: bool) -> None:
        self.host.metrics.frames_in.inc()
        if self.closing:
            return
        if binary:
            if not self.host.on_binary(self, payload):
                self.error(None, Code.BAD_REQUEST, "binary frames are not accepted")
            return
        self.host.on_text(self, payload)

    # --- outbound --------------------------------------------------------------------
    def push(
        self, payload: bytes, kind: WSMsgType = WSMsgType.TEXT, droppable: bool = False
    ) -> None:
        """Queue one frame (already encoded) for the end of this loop turn (``flush``).
        Closes a client that stopped reading: 1013 when more than ``--max-outbox`` bytes wait
        for it. While the transport is congested, a ``droppable`` message (of a drop-oldest
        stream, see outbox.py) is held back instead, and so is every message after it until
        the backlog is written (the order is kept); past ``--max-outbox`` held bytes of
        droppable messages, the oldest are dropped."""
        if self.closing or self.transport is None:
            return
        out = self._out
        if out is not None:  # after this turn's earlier frames, whatever happened since
            out.append((kind, payload))
            self._out_keep = self._out_keep or not droppable
        elif self._backlog is not None or (droppable and self.congested):
            self._hold(payload, kind, droppable)
        else:
            self._out = [(kind, payload)]
            self._out_keep = not droppable
            self.host.want_flush(self)

    def flush(self) -> None:
        """Write this turn's frames: one frame as picows sends it, several in one writev."""
        out, self._out = self._out, None
        transport = self.transport
        if out is None or transport is None or self.closing:
            return
        if len(out) == 1:
            transport.send(*out[0])
        else:
            parts: list[bytes] = []
            for kind, payload in out:
                parts.append(_header(kind, len(payload)))
                parts.append(payload)
            transport.underlying_transport.writelines(parts)
        if self.congested and self._out_keep:  # a droppable frame after it would be held
            buffered = transport.underlying_transport.get_write_buffer_size()
            if buffered > self.host.config.max_outbox:
                self.close(SLOW_CONSUMER_CLOSE, "slow consumer")

    def _hold(self, payload: bytes, kind: WSMsgType, droppable: bool) -> None:
        backlog = self._backlog
        if backlog is None:
            backlog = self._backlog = Backlog()
        limit = self.host.config.max_outbox
        if droppable:
            dropped = backlog.add_droppable(kind, payload, limit)
            if dropped:
                self.host.metrics.outbox_dropped.inc(dropped)
            return
        backlog.add(kind, payload)
        assert self.transport is not None
        buffered = self.transport.underlying_transport.get_write_buffer_size()
        if backlog.kept_bytes + buffered > limit:
            self.close(SLOW_CONSUMER_CLOSE, "slow consumer")

    def reply(self, payload: bytes) -> None:
        self.push(payload)
        self.host.metrics.frames_out.inc()

    def ack(self, frame_id: frames.FrameId, **result: Any) -> None:
        if frame_id is not None:
            self.reply(frames.ack(frame_id, **result))

    def error(
        self, frame_id: frames.FrameId, code: Code, message: str, *, charge: bool | None = None
    ) -> None:
        """Answer an error frame (not in raw mode, whose clients do not speak ours). Errors
        caused by the client (``charge``; by default all but unavailable, internal and
        rate_limited) spend a token of the abuse bucket: when it is empty, close 1008."""
        self.host.metrics.errors.labels(code=code.value).inc()
        if not self.raw:
            self.reply(frames.error(frame_id, code.value, message))
        if charge is None:
            charge = code not in (Code.UNAVAILABLE, Code.INTERNAL, Code.RATE_LIMITED)
        if not charge:
            return
        now = time.monotonic()
        cfg = self.host.config
        self._tokens = min(
            float(cfg.abuse_burst), self._tokens + (now - self._token_time) * cfg.abuse_rate
        )
        self._token_time = now
        self._tokens -= 1
        if self._tokens < 0:
            self.close(ABUSE_CLOSE, "too many bad frames")

    def close(self, code: int, reason: str = "") -> None:
        """Start the closing handshake; the link is dropped when the peer answers with its
        close frame, or after a short grace period (bounded, even if it never reads)."""
        if self.closing or self.transport is None:
            return
        self.closing = True
        self.server_closed = True
        self.close_code = code
        self.host.metrics.closes.labels(code=str(code)).inc()
        transport = self.transport
        backlog, self._backlog = self._backlog, None
        out, self._out = self._out, None
        if code != SLOW_CONSUMER_CLOSE:  # what was pushed goes before the close
            for frame in out or ():
                transport.send(*frame)
            while backlog is not None and (held := backlog.pop()) is not None:
                transport.send(*held)
        transport.send_close(WSCloseCode(code), _reason(reason))
        if self.reading_paused:  # read again to see the peer's close frame (data is dropped)
            self.reading_paused = False
            transport.underlying_transport.resume_reading()
        asyncio.get_running_loop().call_later(_ABORT_AFTER, transport.underlying_transport.abort)

    def take_token(self) -> bool:
        """One frame against the rate limit (``--rate-limit`` per second, ``--rate-burst``)."""
        cfg = self.host.config
        if cfg.rate_limit <= 0:
            return True
        now = time.monotonic()
        refill = (now - self._rate_time) * cfg.rate_limit
        self._rate = min(float(cfg.rate_burst), self._rate + refill)
        self._rate_time = now
        if self._rate < 1.0:
            return False
        self._rate -= 1.0
        return True

    # --- backpressure on the sender --------------------------------------------------
    def sent(self) -> None:
        """A request finished its I/O (a send was handed to the broker, a join confirmed, or
        either failed): maybe resume reading."""
        self.inflight -= 1
        if self.frozen:
            return
        if self.reading_paused and self.inflight <= self.host.config.max_inflight // 2:
            self.reading_paused = False
            if self.transport is not None and not self.closing:
                self.transport.underlying_transport.resume_reading()

    def freeze(self) -> None:
        """Read no more frames (drain): what is in flight still gets its answer."""
        self.frozen = True
        if not self.reading_paused and self.transport is not None and not self.closing:
            self.reading_paused = True
            self.transport.underlying_transport.pause_reading()

    def sending(self) -> None:
        self.inflight += 1
        if not self.reading_paused and self.inflight >= self.host.config.max_inflight:
            self.reading_paused = True
            if self.transport is not None:
                self.transport.underlying_transport.pause_reading()


class Backlog:
    """The messages a congested connection holds back, in push order: the droppable ones
    (dropped oldest first past the bound) and the others (never dropped), merged by a
    sequence number when written."""

    __slots__ = ("droppable_bytes", "drops", "keeps", "kept_bytes", "seq")

    def __init__(self) -> None:
        self.drops: deque[tuple[int, WSMsgType, bytes]] = deque()
        self.keeps: deque[tuple[int, WSMsgType, bytes]] = deque()
        self.droppable_bytes = 0  # held bytes of droppable messages (charged HELD_COST each)
        self.kept_bytes = 0  # held bytes of the others
        self.seq = 0

    def add(self, kind: WSMsgType, payload: bytes) -> None:
        self.seq += 1
        self.keeps.append((self.seq, kind, payload))
        self.kept_bytes += len(payload) + HELD_COST

    def add_droppable(self, kind: WSMsgType, payload: bytes, limit: int) -> int:
        """Hold a droppable message, then drop the oldest ones (maybe this one) until they
        weigh at most ``limit`` bytes; how many were dropped."""
        self.seq += 1
        self.drops.append((self.seq, kind, payload))
        self.droppable_bytes += len(payload) + HELD_COST
        n = 0
        while self.droppable_bytes > limit:
            self.droppable_bytes -= len(self.drops.popleft()[2]) + HELD_COST
            n += 1
        return n

    def pop(self) -> tuple[WSMsgType, bytes] | None:
        """The oldest held message (droppable or not), or None when nothing is held."""
        drops, keeps = self.drops, self.keeps
        if keeps and (not drops or keeps[0][0] < drops[0][0]):
            _, kind, payload = keeps.popleft()
            self.kept_bytes -= len(payload) + HELD_COST
        elif drops:
            _, kind, payload = drops.popleft()
            self.droppable_bytes -= len(payload) + HELD_COST
        else:
            return None
        return kind, payload


_SHORT = struct.Struct("!BB")
_MEDIUM = struct.Struct("!BBH")
_LONG = struct.Struct("!BBQ")


def _header(kind: WSMsgType, size: int) -> bytes:
    """The header of an unmasked, final server frame (RFC 6455 5.2)."""
    first = 0x80 | kind.value
    if size < 126:
        return _SHORT.pack(first, size)
    if size < 65536:
        return _MEDIUM.pack(first, 126, size)
    return _LONG.pack(first, 127, size)


def _reason(reason: str) -> bytes | None:
    """A close reason that fits a control frame (123 bytes), cut at a character boundary:
    a reason that is not valid UTF-8 makes clients fail the connection (1006, not the code)."""
    if not reason:
        return None
    return reason.encode()[:120].decode("utf-8", "ignore").encode()


def _code(code: object) -> int:
    value = getattr(code, "value", code)
    return value if isinstance(value, int) else 1006
