"""The chat of a classic Swoole tutorial (two servers, Redis + RabbitMQ), wire-compatible:
its web client works unchanged against any node of the cluster. See README.md."""

from __future__ import annotations

import json
import logging
from typing import Any

from wscluster import App, Code, Conn, ProtocolError

log = logging.getLogger("examples.swoole_chat")
app = App(raw=True)  # no `welcome`, no ack/error frames: the client speaks only this


def php_json(value: Any) -> str:
    # PHP's json_encode() with default flags, byte for byte for these frames: compact,
    # non-ASCII as lower-case \uXXXX (surrogate pairs above U+FFFF), "/" as "\/". A JS
    # client parses plain UTF-8 too; exact bytes keep clients that compare or log frames.
    # ("/" occurs only inside strings in compact JSON, so the replace is safe.)
    return json.dumps(value, ensure_ascii=True, separators=(",", ":")).replace("/", "\\/")


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # json_decode() refuses NaN and Infinity


@app.on_connect
def connect(conn: Conn) -> None:
    conn.push(php_json({"type": "open"}))


@app.on_message
async def message(conn: Conn, frame: str | bytes) -> str | None:
    try:
        data = json.loads(frame, parse_constant=_no_constant)
    except (ValueError, RecursionError):
        data = None
    kind = data.get("type") if isinstance(data, dict) else None
    if kind == "login":
        name = data["userName"] if isinstance(data, dict) else None
        try:
            await conn.bind(name)  # re-login moves the connection to the new name
        except ProtocolError as exc:  # bad_request (not a 1-128 char string) or unavailable
            (log.debug if exc.code == Code.BAD_REQUEST else log.warning)("login: %s", exc)
            return None
        return php_json({"type": "message", "content": f"hello, welcome {name}"})
    if kind == "sendto":
        assert isinstance(data, dict)
        text = php_json({"type": "message", "content": data.get("content")})
        conn.push(text)  # the sender's copy: this connection only, as Swoole pushes to its fd
        to = data.get("to")
        if to != data.get("from") and isinstance(to, str) and 0 < len(to) <= 128:
            # every device of `to`, on every node; never a second copy to this connection
            await app.cluster.send_verbatim(f"uid:{to}", text.encode(), exclude=[conn.client_id])
        return None
    log.debug("ignored frame from %s: %.80r", conn.client_id, frame)
    return None
