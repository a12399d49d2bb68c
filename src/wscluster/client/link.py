"""One WebSocket connection of a ``Client`` (see ``core``): the picows listener, opening it."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import TYPE_CHECKING

import msgspec
from picows import (
    WSCloseCode,
    WSError,
    WSFrame,
    WSHandshakeError,
    WSListener,
    WSMsgType,
    WSTransport,
    ws_connect,
)

from .protocol import ConnectionClosed, Frame, HandshakeRefused, Pending, decode_frame, route

if TYPE_CHECKING:
    from .core import Client

log = logging.getLogger("wscluster.client")


class Link(WSListener):
    """One WebSocket connection: picows callbacks, its welcome and its requests in flight."""

    def __init__(self, client: Client) -> None:
        super().__init__()
        loop = asyncio.get_running_loop()
        self.client = client
        self.transport: WSTransport | None = None
        self.welcome: asyncio.Future[Frame | None] = loop.create_future()
        self.lost: asyncio.Future[None] = loop.create_future()
        self.pending = Pending()
        self.close_code: int | None = None
        self.close_reason = ""

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        try:
            if frame.msg_type is WSMsgType.TEXT:
                obj = decode_frame(frame.get_payload_as_memoryview())
                if obj is None:
                    log.warning("ignoring a text frame that is not a JSON object")
                elif obj.get("type") == "welcome" and not self.welcome.done():
                    self.welcome.set_result(obj)
                elif obj.get("type") == "left":
                    self.client._left(obj)
                else:
                    route(obj, self.pending, self.client._inbox.put, self.client._last_id)
            elif frame.msg_type is WSMsgType.CLOSE:
                close_code = frame.get_close_code()
                self.close_code = int(close_code.value) or 1005  # 1005: no status code
                self.close_reason = frame.get_close_reason() or ""
                if not transport.is_close_frame_sent:
                    transport.send_close(close_code)
                transport.disconnect()
        except Exception:  # a callback must never raise into picows
            log.exception("error while handling a frame")

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.pending.fail_all(ConnectionClosed(self.close_code, self.close_reason))
        if not self.welcome.done():
            self.welcome.set_result(None)
        if not self.lost.done():
            self.lost.set_result(None)
        self.client._link_lost(self)

    def send(self, frame: Frame) -> None:
        if self.transport is None or self.transport.is_disconnected or self.lost.done():
            raise ConnectionClosed(self.close_code, self.close_reason or "not connected")
        self.transport.send(WSMsgType.TEXT, msgspec.json.encode(frame))

    async def shutdown(self, grace: float) -> None:
        """Close politely (1000), then wait for the socket to be gone."""
        transport = self.transport
        if transport is None:
            return
        if not transport.is_disconnected:
            if not transport.is_close_frame_sent:
                transport.send_close(WSCloseCode.OK)
            transport.disconnect()
        try:
            await asyncio.wait_for(transport.wait_disconnected(), grace)
        except TimeoutError:
            transport.disconnect(graceful=False)
        except Exception:  # a local failure picows re-raises; the socket is closed anyway
            pass


async def open_link(client: Client) -> Link:
    """Connect a client and wait for ``welcome``; the link is not installed yet."""
    link = Link(client)
    headers = dict(client.headers)
    if client._token is not None:
        headers.setdefault("Authorization", f"Bearer {client._token}")
    client._connecting = link
    try:
        await ws_connect(
            lambda: link,
            client.url,
            use_aiofastnet=False,
            websocket_handshake_timeout=client._handshake_timeout,
            extra_headers=headers or None,
            enable_auto_ping=True,
            auto_ping_idle_timeout=30,
            auto_ping_reply_timeout=30,
            logger_name=logging.getLogger("wscluster.client.picows"),
        )
    except WSHandshakeError as exc:
        if exc.response is None:
            raise ConnectionClosed(None, f"handshake failed: {exc}") from exc
        raise HandshakeRefused(int(exc.response.status), _refusal(exc.raw_body)) from exc
    except (OSError, WSError) as exc:
        raise ConnectionClosed(None, f"cannot connect to {client.url}: {exc!r}") from exc
    finally:
        client._connecting = None
    client._connecting = link  # until installed, close() must be able to drop it
    try:
        welcome = await asyncio.wait_for(asyncio.shield(link.welcome), client._handshake_timeout)
        if welcome is None:
            raise ConnectionClosed(link.close_code, link.close_reason or "closed before welcome")
    except BaseException:
        client._connecting = None
        await link.shutdown(1.0)
        raise
    return link


def _refusal(body: bytes | None) -> str:
    """The reason in a refused handshake's JSON body, if it has one."""
    try:
        reason = json.loads(body or b"").get("error", "")
    except (ValueError, AttributeError):
        return ""
    return reason[:200] if isinstance(reason, str) else ""
