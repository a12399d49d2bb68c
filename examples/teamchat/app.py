"""A team chat behind JWT: every hook of wscluster.App in one small application. Clients
connect with ``?v=2&token=<JWT>``; each is in its own group ``user:<uid>`` and in ``lobby``,
which hears who comes online and goes offline (also when a node dies). See README.md."""

from __future__ import annotations

import time
from typing import Any

from wscluster import Action, App, AppError, Closed, Conn, Reject, Request

app = App()
ADMINS = frozenset({"admin"})  # the only uids that may send to `all`


@app.on_handshake
def handshake(request: Request) -> None:
    # sync, before the upgrade (the token is already verified: request.uid is its `sub`)
    if request.query.get("v") != "2":
        raise Reject(426, "upgrade your app: connect with ?v=2")
    request.state["device"] = request.headers.get("User-Agent", "unknown")[:64]


@app.on_connect
async def connect(conn: Conn) -> None:
    uid = conn.uid  # bound to the token's `sub` before `welcome`
    if uid is None:  # only on a node started with --anonymous: this app needs tokens
        conn.close(1008, "a token is required")
        return
    await conn.join(f"user:{uid}")  # barriers: once they return, messages sent there arrive
    await conn.join("lobby")
    await conn.update_session({"login_time": int(time.time()), "device": conn.state["device"]})
    await app.cluster.send("group:lobby", {"event": "online", "uid": uid},
                           exclude=[conn.client_id])  # fmt: skip
    conn.state["online"] = True  # not reached if the client left meanwhile (a call raised)


@app.on_message
async def message(conn: Conn, frame: dict[str, Any]) -> object:
    # the return value is the ack's `result`; AppError answers an `error` frame
    kind = frame["type"]
    if kind == "typing":
        room = frame.get("room")
        if not isinstance(room, str) or room not in conn.groups:
            raise AppError("forbidden", "join the room first")
        await app.cluster.send(f"group:{room}", {"typing": conn.uid, "room": room},
                               exclude=[conn.client_id])  # fmt: skip
        return None
    if kind == "whois":
        cid = frame.get("client_id")
        if not isinstance(cid, str):
            raise AppError("bad_request", "whois takes a client_id")
        # the session of a connection on any node; null when it is not connected (a
        # malformed id is answered bad_request by the cluster API itself)
        return await app.cluster.get_session(cid)
    raise AppError("unknown_type", f"teamchat has no {str(kind)[:32]!r}")


@app.on_close
async def close(closed: Closed) -> None:
    # once per connection, after its on_connect (if any); when its node died, on a survivor
    # (node_died, code 1006, and an empty state: that node's memory is gone)
    if closed.uid is None:  # it logged out, or never had a uid: nobody to announce
        return
    if not (closed.state.get("online") or closed.node_died):
        return  # it left before on_connect announced it: no `offline` without `online`
    await app.cluster.send("group:lobby", {"event": "offline", "uid": closed.uid,
                                           "node_died": closed.node_died})  # fmt: skip


@app.authorize
def authorize(conn: Conn, action: Action, target: str) -> bool | None:
    # sync, for core frames: True allows, False refuses (`forbidden`), None keeps the
    # token's policy (which refuses `all` to everyone without `can_broadcast`)
    if action is Action.SEND and target == "all":
        return conn.uid in ADMINS
    return None
