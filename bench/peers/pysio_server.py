"""Peer for ``python -m bench --peer python-socketio``: python-socketio + AsyncRedisManager.

Events (each acked once handed to the manager, i.e. published to Redis):
  login(uid)        enter room "uid:<uid>"
  join(group)       enter room "group:<group>"
  send({to, data})  emit "message" {to, from, data, ts} to room ``to`` ("client:<sid>" -> sid)

    python bench/peers/pysio_server.py --port 8001 --redis redis://127.0.0.1:6379/0 [--mode aiohttp]
"""

from __future__ import annotations

import argparse
import inspect
import time
from typing import Any

import socketio


def build(redis_url: str, mode: str) -> tuple[Any, Any]:
    mgr = socketio.AsyncRedisManager(redis_url)
    sio = socketio.AsyncServer(
        async_mode=mode, client_manager=mgr, transports=["websocket"],
        cors_allowed_origins="*", logger=False, engineio_logger=False,
    )  # fmt: skip
    uids: dict[str, str] = {}

    async def enter(sid: str, room: str) -> None:
        res = sio.enter_room(sid, room)
        if inspect.isawaitable(res):  # async since python-socketio 5.x
            await res

    async def disconnect(sid: str, *_: Any) -> None:
        uids.pop(sid, None)

    async def login(sid: str, uid: Any) -> bool:
        uids[sid] = str(uid)
        await enter(sid, f"uid:{uid}")
        return True

    async def join(sid: str, group: Any) -> bool:
        await enter(sid, f"group:{group}")
        return True

    async def send(sid: str, msg: dict[str, Any]) -> bool:
        to = str(msg.get("to"))
        room = to[7:] if to.startswith("client:") else to
        out = {"to": to, "from": {"uid": uids.get(sid), "client_id": sid},
               "data": msg.get("data"), "ts": int(time.time() * 1000)}  # fmt: skip
        await sio.emit("message", out, room=room)
        return True

    for event, handler in (("disconnect", disconnect), ("login", login), ("join", join),
                           ("send", send)):  # fmt: skip
        sio.on(event, handler)
    return sio, mgr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--redis", required=True)
    ap.add_argument("--mode", choices=["asgi", "aiohttp"], default="asgi",
                    help="asgi: under uvicorn (uvloop, websockets); aiohttp: aiohttp.web")
    args = ap.parse_args()
    if args.mode == "asgi":
        import uvicorn

        sio, _ = build(args.redis, "asgi")

        async def health_asgi(scope: Any, receive: Any, send: Any) -> None:
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})

        app = socketio.ASGIApp(sio, other_asgi_app=health_asgi)
        uvicorn.run(
            app, host=args.host, port=args.port, loop="uvloop", ws="websockets",
            log_level="warning", lifespan="off", access_log=False, backlog=4096,
        )  # fmt: skip
    else:
        import uvloop
        from aiohttp import web

        uvloop.install()
        sio, _ = build(args.redis, "aiohttp")
        app = web.Application()
        sio.attach(app)

        async def health_http(_: web.Request) -> web.Response:
            return web.Response(text="ok")

        app.router.add_get("/healthz", health_http)
        web.run_app(app, host=args.host, port=args.port, print=None, backlog=4096)


if __name__ == "__main__":
    main()
