"""A test application (tests/cluster/test_apps.py) that exercises every hook and records
each ``on_close`` call into Redis, so a test can count how often, and where, it fired.

Query parameters: ``?deny=1`` refuses the handshake (403); ``?huid=U`` sets the
request's uid in on_handshake (bound before ``welcome``); ``?user=U`` binds U and
``?room=R`` joins R in on_connect, which then greets with a ``message`` (``greeting``);
``?ban=1`` makes on_connect refuse the connection (close 1008, after an awaited "database
check" of 0.3 s); ``?close_delay=S`` makes on_close take S seconds before it records.
The whole query becomes ``conn.state["query"]``. A ``record`` frame does ``RPUSH
<namespace>:test:messages <client id>``.

Needs ``RECORDER_REDIS_URL`` in the environment; on_close does ``RPUSH
<namespace>:test:closed <json>`` for every ``Closed`` it receives, with the pid of the
node process that fired it. ``RECORDER_DEAD_CLOSE_DELAY=S`` makes on_close take S seconds
for the connections of a dead node (they carry no state, so no query either).
"""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

from redis.asyncio import Redis

from wscluster import App, AppError, Closed, Conn, Reject, Request

app = App()
_store: Redis | None = None


def closed_key(namespace: str) -> str:
    return f"{namespace}:test:closed"


def messages_key(namespace: str) -> str:
    return f"{namespace}:test:messages"


def _redis() -> Redis:
    global _store
    if _store is None:
        _store = Redis.from_url(os.environ["RECORDER_REDIS_URL"])
    return _store


@app.on_handshake
def handshake(request: Request) -> None:
    if request.query.get("deny") == "1":
        raise Reject(403, "denied by the application")
    request.state["query"] = dict(request.query)
    if request.query.get("huid"):  # bound when the connection opens, before `welcome`
        request.uid = request.query["huid"]


@app.on_connect
async def connect(conn: Conn) -> None:
    query = conn.state.get("query", {})
    if query.get("ban"):
        await asyncio.sleep(0.3)  # the documented pattern: an async check, then close 1008
        conn.close(1008, "banned")
        return
    conn.state["connected"] = True
    if query.get("user"):
        await conn.bind(query["user"])
    if query.get("room"):
        await conn.join(query["room"])
    conn.send({"greeting": True, "client_id": conn.client_id, "uid": conn.uid,
               "groups": sorted(conn.groups), "state": conn.state})  # fmt: skip


async def _control(frame: dict[str, Any]) -> bool:
    cluster = app.cluster
    action, cid = frame["action"], frame["cid"]
    if action == "join":
        return await cluster.join(cid, frame["arg"])
    if action == "leave":
        return await cluster.leave(cid, frame["arg"])
    if action == "bind":
        return await cluster.bind_uid(cid, frame["arg"])
    if action == "unbind":
        return await cluster.unbind_uid(cid)
    raise AppError("bad_request", f"no action {action!r}")


@app.on_message
async def message(conn: Conn, frame: dict[str, Any]) -> Any:
    kind = frame["type"]
    if kind == "echo":
        return frame
    if kind == "record":
        await _redis().rpush(messages_key(app.cluster.names.ns), conn.client_id)
        return {}
    if kind == "boom":
        raise RuntimeError("boom (a test of the on_message error path)")
    if kind == "slow":
        await asyncio.sleep(float(frame.get("seconds", 0.5)))
        return {"slept": frame.get("seconds", 0.5)}
    if kind == "whoami":
        return {"client_id": conn.client_id, "node": conn.node_id, "uid": conn.uid,
                "groups": sorted(conn.groups), "state": conn.state}  # fmt: skip
    if kind == "setsess":
        await conn.update_session(frame["values"])
        return {}
    if kind == "getsess":
        return {"session": await conn.get_session()}
    if kind == "kick":
        await app.cluster.close(frame["to"])
        return {}
    if kind == "relay":
        await app.cluster.send(frame["to"], frame["data"])
        return {}
    if kind == "control":
        return {"ok": await _control(frame)}
    raise AppError("unknown_type", f"the recorder app has no {kind!r}")


@app.on_close
async def close(closed: Closed) -> None:
    delay = closed.state.get("query", {}).get("close_delay")
    if closed.node_died:
        delay = os.environ.get("RECORDER_DEAD_CLOSE_DELAY")
    if delay:
        await asyncio.sleep(float(delay))  # e.g. a database write
    record = {
        "client_id": closed.client_id, "code": closed.code, "node_died": closed.node_died,
        "session": closed.session, "uid": closed.uid, "groups": sorted(closed.groups),
        "state": closed.state, "pid": os.getpid(),
    }  # fmt: skip
    await _redis().rpush(closed_key(app.cluster.names.ns), json.dumps(record))
