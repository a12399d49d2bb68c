"""Applications: business handlers that run on every node (``wscluster serve --app mod:app``).

    app = wscluster.App()

    @app.on_handshake            # sync; may raise Reject(status, reason)
    def handshake(request): ...

    @app.on_connect              # after `welcome`; may bind the uid, join groups, send
    async def connect(conn): ...

    @app.on_message              # client frames whose `type` is not a core type
    async def message(conn, frame): return {"echo": frame}   # -> the ack's `result`

    @app.on_close                # once per connection, also for a dead node's connections
    async def close(closed): ...  # (then fired by a survivor: at least once, see guarantees)

    @app.authorize               # sync; True allow, False refuse, None keep the default
    def authorize(conn, action, target): ...

``App(raw=True)`` is for clients that speak their own protocol: no ``welcome``, every frame
(text as ``str``, binary as ``bytes``) goes to ``on_message``, whose return value (if not
None) is written back as it is, and ``conn.push`` / ``cluster.send_verbatim`` push bytes
verbatim across nodes.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import Code, ProtocolError
from .policy import Action

if TYPE_CHECKING:
    from .cluster import Cluster
    from .conn import Conn

__all__ = ["Action", "App", "AppError", "Closed", "Reject", "Request", "load_app"]


class Reject(Exception):
    """Raise (or return) from ``on_handshake`` to refuse the WebSocket upgrade."""

    def __init__(self, status: int = 403, reason: str = "forbidden") -> None:
        if not 400 <= status <= 599:
            raise ValueError("a refusal status must be 4xx or 5xx")
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason


class AppError(ProtocolError):
    """Raise from ``on_message`` to answer with a protocol error code instead of ``internal``
    (e.g. ``AppError("forbidden", "not your room")``)."""

    def __init__(self, code: str | Code, message: str) -> None:
        super().__init__(Code(code), message)


@dataclass(slots=True)
class Request:
    """The WebSocket handshake as ``on_handshake`` sees it. ``peer`` is the first
    ``X-Forwarded-For`` entry (a direct peer address is not available at this point).
    The hook may set ``uid`` (e.g. from a cookie) and put anything into ``state``, which
    becomes ``conn.state``."""

    path: str
    query: dict[str, str]
    headers: Mapping[str, str]
    peer: str | None
    claims: dict[str, Any] | None = None  # verified JWT claims, None without JWT
    uid: str | None = None  # the token's `sub`; bound when the connection opens
    state: dict[str, Any] = field(default_factory=dict)
    forwarded: str | None = None  # the whole X-Forwarded-For header, as the proxy sent it


@dataclass(frozen=True, slots=True)
class Closed:
    """A connection that closed: what ``on_close`` receives. ``code`` is the close code
    (1006 when there was no closing handshake, e.g. its node died); ``session`` is its
    session data as it was; ``node_died`` tells that a survivor fired it."""

    client_id: str
    uid: str | None
    groups: frozenset[str]
    code: int
    session: dict[str, Any]
    node_died: bool = False
    state: dict[str, Any] = field(default_factory=dict)  # conn.state (empty if node died)


HandshakeHook = Callable[[Request], "Reject | None"]
ConnectHook = Callable[["Conn"], "Awaitable[None] | None"]
MessageHook = Callable[["Conn", Any], Any]
CloseHook = Callable[[Closed], "Awaitable[None] | None"]
AuthorizeHook = Callable[["Conn", Action, str], "bool | None"]


class App:
    """The handlers of an application; one instance is loaded on every node."""

    def __init__(self, *, raw: bool = False, message_timeout: float = 30.0) -> None:
        self.raw = raw
        self.message_timeout = message_timeout  # an on_message call longer than this fails
        self.handshake_hook: HandshakeHook | None = None
        self.connect_hook: ConnectHook | None = None
        self.message_hook: MessageHook | None = None
        self.close_hook: CloseHook | None = None
        self.authorize_hook: AuthorizeHook | None = None
        self._cluster: Cluster | None = None

    @property
    def cluster(self) -> Cluster:
        """The cluster API of the node running this app (send, close, presence, sessions)."""
        if self._cluster is None:
            raise RuntimeError("the app is not running on a node yet")
        return self._cluster

    def bind_cluster(self, cluster: Cluster) -> None:
        self._cluster = cluster

    def on_handshake(self, fn: HandshakeHook) -> HandshakeHook:
        self.handshake_hook = fn
        return fn

    def on_connect(self, fn: ConnectHook) -> ConnectHook:
        self.connect_hook = fn
        return fn

    def on_message(self, fn: MessageHook) -> MessageHook:
        self.message_hook = fn
        return fn

    def on_close(self, fn: CloseHook) -> CloseHook:
        self.close_hook = fn
        return fn

    def authorize(self, fn: AuthorizeHook) -> AuthorizeHook:
        self.authorize_hook = fn
        return fn


def load_app(spec: str) -> App:
    """Import ``module:attribute`` (an App, or a callable returning one)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"--app takes module:attribute, got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"--app {spec}: cannot import {module_name}: {exc}") from None
    obj: Any = module
    for part in attr.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise ValueError(f"--app {spec}: {module_name} has no attribute {attr}")
    if inspect.isfunction(obj):  # a factory
        obj = obj()
    if not isinstance(obj, App):
        raise ValueError(f"--app {spec}: {attr} is not a wscluster.App")
    return obj
