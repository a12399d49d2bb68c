"""The public port: WebSocket clients at /ws, plus GET / (demo page) and GET /healthz, all
served by picows (plain responses for the two HTTP paths)."""

from __future__ import annotations

import asyncio
import logging
from importlib import resources
from typing import TYPE_CHECKING

import msgspec
from picows import (
    WSAutoPingStrategy,
    WSUpgradeRequest,
    WSUpgradeResponse,
    WSUpgradeResponseWithListener,
    ws_create_server,
)

from ..gate import Refusal
from .connection import Connection

if TYPE_CHECKING:
    from ..node import Node

class _PeerNoise(logging.Filter):
    """picows logs every connection at INFO and every client protocol error at ERROR: a
    client could flood the log. Keep only records that carry an exception (a bug of ours)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.exc_info is not None


logging.getLogger("picows").addFilter(_PeerNoise())
# picows logs each connection through a child Logger it makes itself ("picows.server.<fd>"),
# and a parent's filters never see a child's records; handed a LoggerAdapter, it logs
# through the adapter's logger instead, where the filter applies.
_server_log = logging.getLogger("picows.server")
_server_log.addFilter(_PeerNoise())
_PICOWS_LOGGER = logging.LoggerAdapter(_server_log, {})

_READ_BUFFER = 2048


def _static(name: str) -> bytes:
    try:
        return (resources.files("wscluster") / "static" / name).read_bytes()
    except (FileNotFoundError, OSError):
        return b"<!doctype html><title>wscluster</title><p>wscluster node</p>"


def health_body(node: Node) -> tuple[int, bytes]:
    ok, reason = node.health()
    body = msgspec.json.encode(
        {"ok": ok, "reason": reason, "node": node.node_id, "connections": len(node.registry)}
    )
    return (200 if ok else 503), body


class PublicServer:
    def __init__(self, node: Node) -> None:
        self.node = node
        self.server: asyncio.Server | None = None
        self._page = _static("index.html")

    def factory(self, request: WSUpgradeRequest) -> Connection | WSUpgradeResponseWithListener:
        node = self.node
        path = request.path.split(b"?", 1)[0]
        if path == b"/ws":
            status = node.accepting()
            if status is not None:
                return _refuse(node, status, "node is full or draining, try another node")
            _, _, query = request.path.partition(b"?")
            verdict = node.gate.check(
                "/ws", query.decode("latin-1"), request.headers
            )
            if isinstance(verdict, Refusal):
                return _refuse(node, verdict.status, verdict.reason)
            return Connection(node, verdict)
        if request.method != b"GET":
            return _plain(405, b"method not allowed", "text/plain")
        if path == b"/healthz":
            status, body = health_body(node)
            return _plain(status, body, "application/json")
        if path in (b"/", b"/index.html"):
            return _plain(200, self._page, "text/html; charset=utf-8")
        return _plain(404, b"not found", "text/plain")

    async def start(self) -> None:
        cfg = self.node.config
        self.server = await ws_create_server(
            self.factory,
            cfg.host,
            cfg.port,
            websocket_handshake_timeout=5,
            enable_auto_ping=True,
            auto_ping_idle_timeout=cfg.ping_interval,
            auto_ping_reply_timeout=cfg.ping_interval,
            auto_ping_strategy=WSAutoPingStrategy.PING_WHEN_IDLE,
            max_frame_size=cfg.max_frame_size,
            read_buffer_init_size=_READ_BUFFER,
            use_aiofastnet=cfg.transport == "aiofastnet",
            reuse_address=True,
            backlog=4096,
            logger_name=_PICOWS_LOGGER,
        )

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None


def _refuse(node: Node, status: int, reason: str) -> WSUpgradeResponseWithListener:
    node.metrics.refused.labels(status=str(status)).inc()
    body = msgspec.json.encode({"error": reason})
    return _plain(status, body, "application/json")


def _plain(status: int, body: bytes, content_type: str) -> WSUpgradeResponseWithListener:
    headers = {"Content-Type": content_type, "Cache-Control": "no-store"}
    if status == 200:
        response = WSUpgradeResponse.create_ok_response(body, headers)
    else:
        response = WSUpgradeResponse.create_error_response(status, body, headers)
    return WSUpgradeResponseWithListener(response, None)


async def start_public(node: Node) -> PublicServer:
    server = PublicServer(node)
    await server.start()
    return server
