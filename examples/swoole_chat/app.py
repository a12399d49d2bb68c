"""The chat of a classic Swoole tutorial (two servers, Redis + RabbitMQ), wire-compatible:
its web client works unchanged against any node of the cluster. See README.md."""

from __future__ import annotations

import json
import logging
import re
from typing import Any

from wscluster import App, Code, Conn, ProtocolError

log = logging.getLogger("examples.swoole_chat")
app = App(raw=True)  # no `welcome`, no ack/error frames: the client speaks only this
_NON_ASCII = re.compile(r"[^\x00-\x7f]+")


def php_json(value: Any) -> str:
    # PHP's json_encode() with its default flags, byte for byte for string content: compact,
    # "/" as "\/", non-ASCII as lower-case \uXXXX (surrogate pairs above U+FFFF), control
    # characters escaped but DEL raw. A JS client would parse plain UTF-8 just as well; exact
    # bytes keep clients that compare or log frames working. (Compact JSON has "/" and
    # non-ASCII only inside strings, so rewriting them over the whole text is safe.)
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    text = _NON_ASCII.sub(lambda m: json.dumps(m.group())[1:-1], text)
    return text.replace("/", "\\/")


def _refuse(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON")  # json_decode() refuses NaN and Infinity too


@app.on_connect
def connect(conn: Conn) -> None:
    conn.push(php_json({"type": "open"}))


@app.on_message
async def message(conn: Conn, frame: str | bytes) -> str | None:
    try:
        data = json.loads(frame, parse_constant=_refuse)
    except (ValueError, RecursionError):
        data = None
    if not isinstance(data, dict):
        data = {}
    name = data.get("userName")
    if data.get("type") == "login" and isinstance(name, str):
        try:
            await conn.bind(name)  # a re-login moves the connection to the new name
        except ProtocolError as exc:  # not a 1-128 character string, or broker unavailable
            log.log(logging.DEBUG if exc.code == Code.BAD_REQUEST else logging.WARNING,
                    "login of %s refused: %s", conn.client_id, exc)  # fmt: skip
            return None
        return php_json({"type": "message", "content": f"hello, welcome {name}"})
    if data.get("type") == "sendto":
        text = php_json({"type": "message", "content": data.get("content")})
        conn.push(text)  # the sender's copy: this connection only (Swoole pushes to its fd)
        to = data.get("to")
        if isinstance(to, str) and to != data.get("from"):
            try:  # every connection bound to `to`, on every node; never twice to this one
                await app.cluster.send_verbatim(f"uid:{to}", text.encode(),
                                                exclude=[conn.client_id])  # fmt: skip
            except ProtocolError:  # `to` cannot be a user name (empty, over 128 characters)
                log.debug("sendto %.80r: nobody can have that name", to)
        return None
    log.debug("ignored a frame from %s: %.80r", conn.client_id, frame)
    return None
