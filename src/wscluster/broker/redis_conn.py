"""Connections of ``RedisBroker``: one factory for its two links, and what both share."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from redis.asyncio.connection import AbstractConnection, Connection, parse_url

log = logging.getLogger("wscluster.broker")

PING_AFTER = 1.0  # seconds of silence on a link before a health PING
PING_TIMEOUT = 3.0  # seconds to wait for the answer before declaring the link dead


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class Connector:
    """Opens connections to the server of a ``redis://``, ``rediss://`` or ``unix://`` URL."""

    def __init__(self, url: str, connect_timeout: float) -> None:
        opts: dict[str, Any] = dict(parse_url(url))
        self._conn_cls: type[AbstractConnection] = opts.pop("connection_class", Connection)
        for pool_only in ("max_connections", "timeout"):
            opts.pop(pool_only, None)
        opts.update(protocol=2, decode_responses=False, socket_connect_timeout=connect_timeout)
        if issubclass(self._conn_cls, Connection):
            opts["socket_keepalive"] = True
        self._conn_opts = opts
        where = opts.get("path") or f"{opts.get('host', 'localhost')}:{opts.get('port', 6379)}"
        self.where = str(where)  # for logs: never the password
        self.connect_timeout = connect_timeout

    def new_conn(self, name: str, socket_timeout: float | None) -> AbstractConnection:
        opts = {**self._conn_opts, "client_name": name, "socket_timeout": socket_timeout}
        return self._conn_cls(**opts)

    async def connect(self, conn: AbstractConnection) -> None:
        async with asyncio.timeout(self.connect_timeout):
            await conn.connect_check_health(check_health=False, retry_socket_connect=False)

    @staticmethod
    async def drop(conn: AbstractConnection) -> None:
        try:
            await conn.disconnect()
        except Exception as exc:  # closing a broken socket may fail; it is gone either way
            log.debug("closing broker connection: %s", describe(exc))
