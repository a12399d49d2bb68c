"""A raw-mode test application (tests/cluster/test_apps.py): no ``welcome``, no error
frames; text and binary frames reach on_message as they are.

- ``whoami`` -> the connection's client id (text)
- ``json`` -> ``{"json": true}`` (a returned dict is written as JSON text)
- ``push <client id> <text>`` -> ``<text>`` pushed verbatim to that connection (any node)
  through ``cluster.send_verbatim``; answers ``pushed``
- other text -> ``text:<the text>``; binary -> ``b"bytes:" + the bytes`` (binary frame)
"""

from __future__ import annotations

from typing import Any

from wscluster import App, Conn

app = App(raw=True)


@app.on_message
async def message(conn: Conn, data: str | bytes) -> Any:
    if isinstance(data, bytes):
        return b"bytes:" + data
    if data == "whoami":
        return conn.client_id
    if data == "json":
        return {"json": True}
    if data.startswith("push "):
        _, cid, text = data.split(" ", 2)
        await conn.cluster.send_verbatim(f"client:{cid}", text.encode())
        return "pushed"
    return f"text:{data}"
