"""A test application (tests/cluster/test_bad_names.py) that hands the node's Python API names
that are not UTF-8 (a lone surrogate, which JSON cannot carry to it): each call must be
refused on its own with ``bad_request``, and nobody else may notice.

A frame ``{"type": "bad", "op": <name>}`` makes one such call and is acked with
``{"code": <the ProtocolError's code, "ok", or "exception">}``. ``?baduid=1`` makes
``on_handshake`` set such a uid on the request (the node must not bind it).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

from wscluster import App, Conn, ProtocolError, Request

BAD = "x\ud800"  # a lone surrogate: a Python str, but not UTF-8

app = App()


@app.on_handshake
def handshake(request: Request) -> None:
    if "baduid" in request.query:
        request.uid = BAD


def _calls(conn: Conn) -> dict[str, Callable[[], Coroutine[Any, Any, Any]]]:
    cluster = app.cluster
    nobody = f"group:nobody-{conn.client_id}"  # a valid address nobody listens to
    return {
        "bind": lambda: conn.bind(BAD),
        "join": lambda: conn.join(BAD),
        "leave": lambda: conn.leave(BAD),
        "session_key": lambda: conn.set_session({BAD: 1}),
        "session_value": lambda: conn.set_session({"k": BAD}),
        "session_nested": lambda: conn.update_session({"k": {"a": [1, BAD]}}),
        "send_uid": lambda: cluster.send(f"uid:{BAD}", 1),
        "send_group": lambda: cluster.send(f"group:{BAD}", 1),
        "send_client": lambda: cluster.send(f"client:n{BAD}.1", 1),
        "send_exclude": lambda: cluster.send(nobody, 1, exclude=[f"n{BAD}.1"]),
        "send_data": lambda: cluster.send(nobody, {"text": BAD}),
        "send_verbatim": lambda: cluster.send_verbatim(f"uid:{BAD}", b"x"),
        "close_uid": lambda: cluster.close(f"uid:{BAD}"),
        "cluster_bind": lambda: cluster.bind_uid(conn.client_id, BAD),
        "cluster_join": lambda: cluster.join(conn.client_id, BAD),
        "cluster_leave": lambda: cluster.leave(conn.client_id, BAD),
        "cluster_bind_cid": lambda: cluster.bind_uid(f"n{BAD}.1", "alice"),
        "set_session_cid": lambda: cluster.set_session(f"n{BAD}.1", {"k": 1}),
        "get_session_cid": lambda: cluster.get_session(f"n{BAD}.1"),
        "is_online": lambda: cluster.is_online(BAD),
        "client_ids": lambda: cluster.client_ids(BAD),
        "group_members": lambda: cluster.group_members(BAD),
    }


OPS = (
    "bind", "join", "leave", "session_key", "session_value", "session_nested", "send_uid",
    "send_group", "send_client", "send_exclude", "send_data", "send_verbatim", "close_uid",
    "cluster_bind", "cluster_join", "cluster_leave", "cluster_bind_cid", "set_session_cid",
    "get_session_cid", "is_online", "client_ids", "group_members",
)  # fmt: skip


@app.on_message
async def message(conn: Conn, frame: Any) -> dict[str, Any]:
    call = _calls(conn).get(frame.get("op"))
    if call is None:
        return {"code": "no such op"}
    try:
        await asyncio.wait_for(call(), 10)
    except ProtocolError as exc:
        return {"code": exc.code.value, "message": exc.message}
    except Exception as exc:  # a bug of the node: the test shows it
        return {"code": "exception", "message": repr(exc)}
    return {"code": "ok"}
