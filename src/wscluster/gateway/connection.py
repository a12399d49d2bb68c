"""One client connection: the picows listener. I/O edge only; protocol decisions are the
node's (see handlers.py). What a client may send is checked in inbound.py, frames are
written by outbound.py, and the limits on reading are token buckets (../buckets.py)."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any, Protocol

from picows import WSCloseCode, WSFrame, WSMsgType, WSTransport

from .. import frames
from ..buckets import Bucket
from ..errors import Code
from . import outbound
from .inbound import TOO_LARGE, Assembler, Violation, check_utf8, close_code_valid
from .limits import ABUSE_CLOSE, ReadLimits
from .outbound import Backlog

if TYPE_CHECKING:
    from ..app import Request
    from ..config import NodeConfig
    from ..metrics import Metrics
    from ..policy import Policy

__all__ = ["ABUSE_CLOSE", "SLOW_CONSUMER_CLOSE", "Connection", "ConnectionHost"]

SLOW_CONSUMER_CLOSE = 1013
_ABORT_AFTER = 2.0  # seconds between our close frame and dropping the TCP link


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


class Connection(ReadLimits):
    """A client connection. ``cid`` is set by the node on open.

    Frames pushed in one turn of the event loop are written together when the node flushes
    (one system call for all of them, instead of one per frame: fan-out bursts and acks)."""

    __slots__ = (
        "_abuse", "_asm", "_backlog", "_drain_waiters", "_frag_timer", "_out", "_out_drop",
        "admitting", "app", "app_gate", "app_tail", "cid", "close_code", "congested", "expiry",
        "holding", "host", "peer", "policy", "raw", "request", "server_closed",
    )  # fmt: skip

    def __init__(self, host: ConnectionHost, request: Request) -> None:
        super().__init__(host.config)
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
        self.peer: str | None = None  # the client address counted by --max-connections-per-ip
        self.app: Any = None  # the application's handle (wscluster.conn.Conn), if any
        self.app_tail: asyncio.Future[None] | None = None  # last queued app handler
        self.app_gate: asyncio.Future[bool] | None = None  # on_connect may run (welcomed)
        self.congested = False
        self._backlog: Backlog | None = None  # held while congested (see push); else None
        self._out: list[tuple[WSMsgType, bytes, bool]] | None = None  # this turn's (flush)
        self._out_drop = False  # _out holds a droppable frame
        self._drain_waiters: list[asyncio.Future[None]] | None = None  # see drained()
        self._asm: Assembler | None = None  # made at the first fragmented message
        self._frag_timer: asyncio.TimerHandle | None = None  # --fragment-timeout
        self._abuse: Bucket | None = None  # errors caused (made at the first one)

    # --- picows callbacks ------------------------------------------------------------
    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        self.host.on_open(self)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        kind = frame.msg_type
        if frame.rsv1 or frame.rsv2 or frame.rsv3:  # no extension is ever negotiated
            self.close(1002, "reserved bits set")
        elif kind is WSMsgType.CLOSE:
            self._peer_closed(transport, frame)
        elif kind is WSMsgType.PING or kind is WSMsgType.PONG:  # unsolicited pongs count too
            if self.count_ping() and kind is WSMsgType.PING:
                transport.send_pong(frame.get_payload_as_bytes())
        elif self.closing:
            return  # data after our close frame is dropped unread
        elif frame.fin and kind is not WSMsgType.CONTINUATION and self._asm is None:
            payload = frame.get_payload_as_bytes()  # a whole message: the usual case
            binary = kind is WSMsgType.BINARY
            if not binary:
                try:
                    check_utf8(payload)
                except Violation as exc:
                    self.close(exc.code, exc.reason)
                    return
            self._data(payload, binary)
        else:
            self._fragment(kind, frame)

    def _fragment(self, kind: WSMsgType, frame: WSFrame) -> None:
        """A frame of a fragmented message, or one out of place."""
        asm = self._asm
        if asm is None:
            asm = self._asm = Assembler(self.host.config.max_message_size)
        try:
            got = asm.feed(kind.value, bool(frame.fin), frame.get_payload_as_memoryview())
        except Violation as exc:
            self.close(exc.code, exc.reason)
            return
        if not asm.open:  # the message ended (or was refused): free what it held
            self._asm = None
            if self._frag_timer is not None:
                self._frag_timer.cancel()
                self._frag_timer = None
        elif self._frag_timer is None and self.host.config.fragment_timeout > 0:
            self._frag_timer = asyncio.get_running_loop().call_later(
                self.host.config.fragment_timeout, self.close, ABUSE_CLOSE,
                "message not finished in time")  # fmt: skip
        if isinstance(got, tuple):
            self._data(*got)
        elif got is TOO_LARGE:
            if self.raw:
                self.close(1009, "message too big")
            else:
                size = self.host.config.max_message_size
                self.error(None, Code.TOO_LARGE, f"message over {size} bytes")

    def _peer_closed(self, transport: WSTransport, frame: WSFrame) -> None:
        """The client started the closing handshake (or answered ours): answer it."""
        if not self.closing:
            self.closing = True
            code = frame.get_close_code()
            self.close_code = _code(code)
            if frame.payload_size < 2:  # no code given
                answer = WSCloseCode.OK
            elif close_code_valid(self.close_code):
                answer = code
            else:  # 0, 1005, 1006, 5000...: codes no peer may send (RFC 6455 7.4)
                answer = WSCloseCode.PROTOCOL_ERROR
            transport.send_close(answer)
        transport.disconnect()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.closing = True
        self._backlog = None
        self._out = None
        self._asm = None
        if self.close_code is None:
            self.close_code = _code(WSCloseCode.ABNORMAL_CLOSURE)
        for timer in (self.expiry, self._frag_timer, self._wake):
            if timer is not None:
                timer.cancel()
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
        tr = transport.underlying_transport
        while not self.congested:  # a write over the high mark calls pause_writing at once
            held = backlog.pop()
            if held is None:
                self._backlog = None
                return
            outbound.write(tr, *held)

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

    @property
    def config(self) -> NodeConfig:
        return self.host.config

    # --- inbound ---------------------------------------------------------------------
    def _data(self, payload: bytes, binary: bool) -> None:
        self.host.metrics.frames_in.inc()
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
            out.append((kind, payload, droppable))
            self._out_drop = self._out_drop or droppable
        elif self._backlog is not None or (droppable and self.congested):
            self._hold(payload, kind, droppable)
        else:
            self._out = [(kind, payload, droppable)]
            self._out_drop = droppable
            self.host.want_flush(self)

    def flush(self) -> None:
        """Write this turn's frames, several in one writev."""
        out, self._out = self._out, None
        transport = self.transport
        if out is None or transport is None or self.closing:
            return
        if self._out_drop:
            self._flush_droppable(out)
            return
        tr = transport.underlying_transport
        if len(out) == 1:
            outbound.write(tr, out[0][0], out[0][1])
        else:
            outbound.write_all(tr, out)
        if self.congested and tr.get_write_buffer_size() > self.host.config.max_outbox:
            self.close(SLOW_CONSUMER_CLOSE, "slow consumer")

    def _flush_droppable(self, out: list[tuple[WSMsgType, bytes, bool]]) -> None:
        """This turn's frames when some may be dropped: each goes to the transport until it
        is congested, then to the backlog (where the oldest droppable ones go first), so a
        burst of a drop-oldest stream never piles up in the transport's buffer."""
        assert self.transport is not None
        tr = self.transport.underlying_transport
        wrote_kept = False
        for kind, payload, droppable in out:
            if self._backlog is not None or (droppable and self.congested):
                self._hold(payload, kind, droppable)
                if self.closing:
                    return
            else:
                outbound.write(tr, kind, payload)
                wrote_kept = wrote_kept or not droppable
        limit = self.host.config.max_outbox
        if wrote_kept and self.congested and tr.get_write_buffer_size() > limit:
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
        abuse = self._abuse
        if abuse is None:
            cfg = self.host.config
            abuse = self._abuse = Bucket(cfg.abuse_rate, cfg.abuse_burst, now)
        if not abuse.charge(1.0, now):
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
        tr = transport.underlying_transport
        backlog, self._backlog = self._backlog, None
        out, self._out = self._out, None
        self._asm = None
        if code != SLOW_CONSUMER_CLOSE:  # what was pushed goes before the close
            if out:
                outbound.write_all(tr, out)
            while backlog is not None and (held := backlog.pop()) is not None:
                outbound.write(tr, *held)
        transport.send_close(WSCloseCode(code), outbound.close_reason(reason))
        if self._paused:  # read again to see the peer's close frame (data is dropped)
            self._paused = 0
            tr.resume_reading()
        asyncio.get_running_loop().call_later(_ABORT_AFTER, tr.abort)


def _code(code: object) -> int:
    value = getattr(code, "value", code)
    return value if isinstance(value, int) else 1006
