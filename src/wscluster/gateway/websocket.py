"""The public port: WebSocket clients at /ws, plus the chat page's static files, GET
/nodes.json (the live nodes, for the page's node chooser) and GET /healthz, all served by
picows (plain responses for the HTTP paths)."""

from __future__ import annotations

import asyncio
import logging
import time
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

from ..gate import SUBPROTOCOL, Refusal, selected_subprotocol
from .connection import Connection

if TYPE_CHECKING:
    from ..node import Node


class _PeerNoise(logging.Filter):
    """picows logs every connection at INFO and every client protocol error at ERROR: a
    client could flood the log. Keep only records that carry an exception (a bug of ours)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.exc_info is not None


log = logging.getLogger("wscluster.public")
logging.getLogger("picows").addFilter(_PeerNoise())
# picows logs each connection through a child Logger it makes itself ("picows.server.<fd>"),
# and a parent's filters never see a child's records; handed a LoggerAdapter, it logs
# through the adapter's logger instead, where the filter applies.
_server_log = logging.getLogger("picows.server")
_server_log.addFilter(_PeerNoise())
_PICOWS_LOGGER = logging.LoggerAdapter(_server_log, {})

_READ_BUFFER = 2048
_SELECTED = {"Sec-WebSocket-Protocol": SUBPROTOCOL}


# The chat page (static/, read once at start): path -> (file, content type).
_PAGE_FILES = {
    b"/": ("index.html", "text/html; charset=utf-8"),
    b"/index.html": ("index.html", "text/html; charset=utf-8"),
    b"/chat.js": ("chat.js", "text/javascript; charset=utf-8"),
    b"/chat.css": ("chat.css", "text/css; charset=utf-8"),
    b"/view.js": ("view.js", "text/javascript; charset=utf-8"),
    b"/nodes.js": ("nodes.js", "text/javascript; charset=utf-8"),
    b"/rooms.js": ("rooms.js", "text/javascript; charset=utf-8"),
    b"/store.js": ("store.js", "text/javascript; charset=utf-8"),
    b"/wscluster.js": ("wscluster.js", "text/javascript; charset=utf-8"),
    b"/wscluster-backoff.js": ("wscluster-backoff.js", "text/javascript; charset=utf-8"),
    b"/wscluster-connection.js": ("wscluster-connection.js", "text/javascript; charset=utf-8"),
    b"/wscluster-errors.js": ("wscluster-errors.js", "text/javascript; charset=utf-8"),
    b"/wscluster-events.js": ("wscluster-events.js", "text/javascript; charset=utf-8"),
    b"/wscluster-streams.js": ("wscluster-streams.js", "text/javascript; charset=utf-8"),
}
_NODES_REFRESH = 2.0  # seconds between reads of the live nodes for /nodes.json


def _static(name: str) -> bytes:
    try:
        return (resources.files("wscluster") / "static" / name).read_bytes()
    except (FileNotFoundError, OSError):
        log.warning("static file %s is missing from the package", name)
        return b""


def nodes_body(node_id: str, nodes: list[tuple[str, int]]) -> bytes:
    """``/nodes.json`` as a node answers it: each live node's id and public port, sorted by
    id (nginx answers the same path with ``path`` entries instead of ports)."""
    return msgspec.json.encode(
        {"self": node_id, "nodes": [{"label": n, "node": n, "port": p} for n, p in sorted(nodes)]}
    )


def health_body(node: Node) -> tuple[int, bytes]:
    ok, reason = node.health()
    status = "ok" if ok else reason.partition(":")[0] if reason.startswith("degraded") else (
        "draining" if reason == "draining" else "unavailable")  # fmt: skip
    body = msgspec.json.encode(
        {"ok": ok, "status": status, "reason": reason, "node": node.node_id,
         "connections": len(node.registry)}
    )  # fmt: skip
    return (200 if ok else 503), body


class PublicServer:
    def __init__(self, node: Node) -> None:
        self.node = node
        self.server: asyncio.Server | None = None
        self._files = {path: (_static(name), ctype) for path, (name, ctype) in _PAGE_FILES.items()}
        self._nodes = nodes_body(node.node_id, [(node.node_id, node.config.port)])
        self._nodes_at = 0.0
        self._nodes_task: asyncio.Task[None] | None = None

    def factory(self, request: WSUpgradeRequest) -> Connection | WSUpgradeResponseWithListener:
        node = self.node
        path = request.path.split(b"?", 1)[0]
        if path == b"/ws":
            status = node.accepting()
            if status is not None:
                return _refuse(node, status, "node is full or draining, try another node")
            _, _, query = request.path.partition(b"?")
            if "websocket" not in request.headers.get("Upgrade", "").lower():
                diagnosis = node.gate.diagnose(query.decode("latin-1"), request.headers)
                body = msgspec.json.encode({"error": diagnosis.reason})
                return _plain(diagnosis.status, body, "application/json")
            verdict = node.gate.check("/ws", query.decode("latin-1"), request.headers)
            if isinstance(verdict, Refusal):
                return _refuse(node, verdict.status, verdict.reason)
            if selected_subprotocol(request.headers) is None:
                return Connection(node, verdict)
            # offered "wscluster.v1" (a browser sending its token as "bearer.<JWT>"): select
            # it, or the browser fails the connection; the bearer entry is never echoed
            accept = WSUpgradeResponse.create_101_response(_SELECTED)
            return WSUpgradeResponseWithListener(accept, Connection(node, verdict))
        if request.method != b"GET":
            return _plain(405, b"method not allowed", "text/plain")
        if path == b"/healthz":
            status, body = health_body(node)
            return _plain(status, body, "application/json")
        if path == b"/nodes.json":
            self._refresh_nodes()
            return _plain(200, self._nodes, "application/json")
        page = self._files.get(path)
        if page is not None and page[0]:
            return _plain(200, *page)
        return _plain(404, b"not found", "text/plain")

    def _refresh_nodes(self) -> None:
        """Serve the cached node list; re-read it in the background when it is stale."""
        now = time.monotonic()
        if now - self._nodes_at < _NODES_REFRESH or self._nodes_task is not None:
            return
        self._nodes_at = now
        self._nodes_task = asyncio.get_running_loop().create_task(self._read_nodes())

    async def _read_nodes(self) -> None:
        node = self.node
        try:
            infos = await asyncio.wait_for(node.presence.nodes(), node.config.request_timeout)
            live = [(i.node_id, int(i.stats.get("ws_port", 0))) for i in infos]
            self._nodes = nodes_body(node.node_id, [(n, p) for n, p in live if p > 0])
        except Exception as exc:  # the last list stays; the page works without it
            log.debug("reading the live nodes failed: %r", exc)
        finally:
            self._nodes_task = None

    async def start(self) -> None:
        self._refresh_nodes()
        cfg = self.node.config
        self.server = await ws_create_server(
            self.factory,
            cfg.host,
            cfg.port,
            websocket_handshake_timeout=5,
            enable_auto_ping=True,
            enable_auto_pong=False,  # the connection answers pings itself, within a rate
            auto_ping_idle_timeout=cfg.ping_interval,
            auto_ping_reply_timeout=cfg.ping_interval,
            auto_ping_strategy=WSAutoPingStrategy.PING_WHEN_IDLE,
            max_frame_size=cfg.max_frame_size,
            read_buffer_init_size=_READ_BUFFER,
            use_aiofastnet=cfg.transport == "aiofastnet",
            reuse_address=True,
            reuse_port=cfg.reuse_port,
            backlog=4096,
            logger_name=_PICOWS_LOGGER,
        )

    async def close(self) -> None:
        if self._nodes_task is not None:
            self._nodes_task.cancel()
        if self.server is not None:
            self.server.close()
            self.server = None


def _refuse(node: Node, status: int, reason: str) -> WSUpgradeResponseWithListener:
    node.metrics.refused.labels(status=str(status)).inc()
    body = msgspec.json.encode({"error": reason})
    return _plain(status, body, "application/json")


# Every plain response: the page runs only its own files (so even an escaping bug could not
# run a script from a message), may talk only to its own origin, and is never framed.
_SAFE_HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": (
        "default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:; "
        "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
    ),
}


def _plain(status: int, body: bytes, content_type: str) -> WSUpgradeResponseWithListener:
    headers = {"Content-Type": content_type, **_SAFE_HEADERS}
    if status == 200:
        response = WSUpgradeResponse.create_ok_response(body, headers)
    else:
        response = WSUpgradeResponse.create_error_response(status, body, headers)
    return WSUpgradeResponseWithListener(response, None)


async def start_public(node: Node) -> PublicServer:
    server = PublicServer(node)
    await server.start()
    return server
