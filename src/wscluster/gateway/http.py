"""The API port (aiohttp): the push API for backends, presence, stats, health, metrics.
Bound to 127.0.0.1 unless --api-host says otherwise; --api-key guards every /api/ route."""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import msgspec
from aiohttp import web

from ..cluster import Cluster
from ..errors import BrokerUnavailable, Code, PresenceUnavailable, ProtocolError, bad_request
from ..routing import Kind, parse_address
from .websocket import health_body

if TYPE_CHECKING:
    from ..node import Node

log = logging.getLogger("wscluster.api")
MAX_HISTORY = 1000  # messages per GET /api/history
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
NODE: web.AppKey[Node] = web.AppKey("node")
CLUSTER: web.AppKey[Cluster] = web.AppKey("cluster")


def _error(status: int, code: Code, message: str) -> web.Response:
    body = msgspec.json.encode({"error": {"code": code.value, "message": message}})
    return web.Response(status=status, body=body, content_type="application/json")


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=msgspec.json.encode(obj),
                        content_type="application/json")  # fmt: skip


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    node = request.app[NODE]
    key = node.config.api_key
    if key is not None and (request.path.startswith("/api/") or request.path == "/metrics"):
        if not _key_matches(request.headers.get("Authorization", ""), key):
            return _error(401, Code.FORBIDDEN, "missing or wrong API key")
    try:
        return await handler(request)
    except web.HTTPRequestEntityTooLarge:
        return _error(413, Code.TOO_LARGE, "request body too large")
    except web.HTTPException as exc:
        if exc.status in (404, 405):  # the documented error shape, not aiohttp's text
            return _error(exc.status, Code.BAD_REQUEST, exc.reason)
        raise
    except ProtocolError as exc:
        status = 413 if exc.code is Code.TOO_LARGE else 400
        return _error(status, exc.code, exc.message)
    except BrokerUnavailable:
        return _error(503, Code.UNAVAILABLE, "broker unavailable")
    except (PresenceUnavailable, TimeoutError):
        return _error(503, Code.UNAVAILABLE, "presence store unavailable")
    except Exception:
        log.exception("internal error on %s", request.path)
        return _error(500, Code.INTERNAL, "internal error")


def _key_matches(given: str, key: str) -> bool:
    """Constant-time compare of an Authorization header with ``Bearer <key>``. A header that
    is not valid UTF-8 (aiohttp keeps such bytes as surrogates) is a wrong key, not a 500."""
    try:
        raw = given.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return False
    return hmac.compare_digest(raw, f"Bearer {key}".encode())


async def _body(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    try:
        obj = msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:
        raise ProtocolError(Code.BAD_JSON, str(exc)) from None
    except RecursionError:
        raise ProtocolError(Code.BAD_JSON, "JSON nested too deeply") from None
    if not isinstance(obj, dict):
        raise bad_request("body must be a JSON object")
    return obj


async def api_send(request: web.Request) -> web.Response:
    body = await _body(request)
    if "data" not in body:
        raise bad_request("'data' is required")
    exclude = body.get("exclude", [])
    if not isinstance(exclude, list):
        raise bad_request("'exclude' must be a list of client ids")
    parse_address(body.get("to"))
    pos = await request.app[CLUSTER].send(body["to"], body["data"], exclude=exclude)
    return _json({"ok": True, **(pos.as_dict() if pos is not None else {})})


async def api_close(request: web.Request) -> web.Response:
    body = await _body(request)
    code = body.get("code", 4001)
    if not isinstance(code, int) or isinstance(code, bool):
        raise bad_request("'code' must be an integer")
    await request.app[CLUSTER].close(body.get("to"), code)  # type: ignore[arg-type]
    return _json({"ok": True})


async def api_presence(request: web.Request) -> web.Response:
    address = parse_address(request.query.get("to"))
    cluster = request.app[CLUSTER]
    if address.kind is Kind.UID:
        return _json({"online": await cluster.is_online(address.name)})
    if address.kind is Kind.GROUP:
        info = await cluster.presence.group_members(address.name)
        return _json({"uids": info.uids, "count": info.count})
    raise bad_request("presence takes ?to=uid:<uid> or ?to=group:<name>")


async def api_history(request: web.Request) -> web.Response:
    """``?stream=uid:…|group:…&limit=N`` (1-1000, default 50): the newest N messages."""
    stream = request.query.get("stream")
    if stream is None:
        raise bad_request("?stream= is required")
    text = request.query.get("limit", "50")
    if not (text.isascii() and text.isdigit() and 1 <= int(text) <= MAX_HISTORY):
        raise bad_request(f"limit must be an integer from 1 to {MAX_HISTORY}")
    page = await request.app[CLUSTER].history_page(stream, int(text))
    return _json(page.as_dict())


def _str(body: dict[str, Any], field: str) -> str:
    value = body.get(field)
    if not isinstance(value, str):
        raise bad_request(f"'{field}' must be a string")
    return value


async def api_bind(request: web.Request) -> web.Response:
    body = await _body(request)
    cluster = request.app[CLUSTER]
    ok = await cluster.bind_uid(_str(body, "client_id"), _str(body, "uid"))
    return _json({"ok": ok})


async def api_unbind(request: web.Request) -> web.Response:
    body = await _body(request)
    return _json({"ok": await request.app[CLUSTER].unbind_uid(_str(body, "client_id"))})


async def api_join(request: web.Request) -> web.Response:
    body = await _body(request)
    cluster = request.app[CLUSTER]
    return _json({"ok": await cluster.join(_str(body, "client_id"), _str(body, "group"))})


async def api_leave(request: web.Request) -> web.Response:
    body = await _body(request)
    cluster = request.app[CLUSTER]
    return _json({"ok": await cluster.leave(_str(body, "client_id"), _str(body, "group"))})


async def api_get_session(request: web.Request) -> web.Response:
    cid = request.query.get("client_id")
    if cid is None:
        raise bad_request("'client_id' is required")
    return _json({"session": await request.app[CLUSTER].get_session(cid)})


async def api_set_session(request: web.Request) -> web.Response:
    body = await _body(request)
    cid, values = _str(body, "client_id"), body.get("session")
    if not isinstance(values, dict):
        raise bad_request("'session' must be a JSON object")
    merge = body.get("merge", False)
    if not isinstance(merge, bool):
        raise bad_request("'merge' must be a boolean")
    cluster = request.app[CLUSTER]
    write = cluster.update_session if merge else cluster.set_session
    return _json({"ok": await write(cid, values)})


async def api_stats(request: web.Request) -> web.Response:
    return _json(await request.app[CLUSTER].stats())


async def healthz(request: web.Request) -> web.Response:
    status, body = health_body(request.app[NODE])
    return web.Response(status=status, body=body, content_type="application/json")


async def metrics(request: web.Request) -> web.Response:
    body = request.app[NODE].metrics.render()
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4"})


class ApiServer:
    def __init__(self, node: Node) -> None:
        self.node = node
        app = web.Application(middlewares=[errors_middleware],
                              client_max_size=node.config.max_frame_size)  # fmt: skip
        app[NODE] = node
        app[CLUSTER] = node.cluster
        app.router.add_post("/api/send", api_send)
        app.router.add_post("/api/close", api_close)
        app.router.add_get("/api/presence", api_presence)
        app.router.add_get("/api/stats", api_stats)
        app.router.add_get("/api/history", api_history)
        app.router.add_post("/api/bind", api_bind)
        app.router.add_post("/api/unbind", api_unbind)
        app.router.add_post("/api/join", api_join)
        app.router.add_post("/api/leave", api_leave)
        app.router.add_get("/api/session", api_get_session)
        app.router.add_post("/api/session", api_set_session)
        app.router.add_get("/healthz", healthz)
        app.router.add_get("/metrics", metrics)
        self.runner = web.AppRunner(app, access_log=None, handle_signals=False)

    async def start(self) -> None:
        cfg = self.node.config
        await self.runner.setup()
        site = web.TCPSite(self.runner, cfg.api_host, cfg.effective_api_port,
                           reuse_address=True)  # fmt: skip
        await site.start()

    async def close(self) -> None:
        await self.runner.cleanup()


async def start_api(node: Node) -> ApiServer:
    server = ApiServer(node)
    await server.start()
    return server
