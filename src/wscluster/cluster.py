"""The cluster API for backends: push to any address and ask presence questions without
holding a socket. ``Cluster`` is asyncio; ``SyncCluster`` (sync_cluster.py) wraps it for
Django/Flask code.

    async with Cluster("redis://127.0.0.1:6379/0", namespace="wsc") as cluster:
        await cluster.send("uid:alice", {"text": "hi"})
        print(await cluster.is_online("alice"))
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar, cast

import msgspec

from . import envelope
from .broker import create_broker
from .broker.base import Broker, HistoryBroker
from .control import ControlClient
from .errors import Code, PresenceUnavailable, ProtocolError, bad_request
from .history import HistoryPage, Position, Rules, frames_of, position
from .naming import Names, node_of_client
from .presence import create_presence
from .presence.base import NodeInfo, Presence
from .routing import Address, Kind, channel_for, check_name, is_utf8, parse_address

if TYPE_CHECKING:
    from .broker.redis_history import RedisHistory

T = TypeVar("T")
KICK = 4001
MAX_READ = 10_000  # messages per history read
log = logging.getLogger("wscluster.cluster")


class Cluster:
    def __init__(
        self,
        broker_url: str = "redis://127.0.0.1:6379/0",
        *,
        namespace: str = "wsc",
        presence_url: str | None = None,
        max_message_size: int = 64 * 1024,
        max_session_size: int = 16 * 1024,
        timeout: float = 5.0,
        history: Sequence[str] = (),
        check_interval: float = 5.0,
    ) -> None:
        """Messages to a stream with one of the cluster's history rules (the nodes keep them
        in the presence store; read at start and again every ``check_interval`` seconds) are
        stored and get an offset. ``history``: rules of this publisher's own, which replace
        the cluster's for its publishes (``["none"]``: store nothing)."""
        self.names = Names(namespace)
        self.broker: Broker = create_broker(broker_url)
        self.broker_url = broker_url
        self.history_store: RedisHistory | None = None  # opened by the first history read
        self._own: Rules | None = _history_rules(self.broker, history) if history else None
        self.history_rules = self._own or Rules()
        self.check_interval = check_interval
        self._rules_at: float | None = None  # monotonic time of the last read of the rules
        self._reading: asyncio.Future[None] | None = None
        presence_url = presence_url or broker_url
        if not presence_url.startswith(("redis", "unix", "memory")):
            raise ValueError("the presence store needs Redis: pass presence_url='redis://…'")
        self.presence: Presence = create_presence(presence_url, self.names)
        self.max_message_size = max_message_size
        self.max_session_size = max_session_size
        self.control = ControlClient(self.broker, self.names, timeout)
        self._owned = True
        self._started = False
        self._lock = asyncio.Lock()

    @classmethod
    def attach(
        cls, broker: Broker, presence: Presence, names: Names, *, max_message_size: int,
        max_session_size: int, timeout: float,
    ) -> Cluster:  # fmt: skip
        """A Cluster that shares a running node's broker and presence connections (the node
        passes control replies to ``control.on_reply``)."""
        self = cls.__new__(cls)
        self.names, self.broker, self.presence = names, broker, presence
        self.broker_url = ""
        self.history_store = None  # the node's store, if it has one (node.py)
        self._own, self.history_rules = None, Rules()  # the node sets and refreshes them
        self.check_interval = 0.0
        self._rules_at, self._reading = None, None
        self.max_message_size, self.max_session_size = max_message_size, max_session_size
        self.control = ControlClient(broker, names, timeout)
        self._owned, self._started, self._lock = False, True, asyncio.Lock()
        return self

    async def start(self) -> None:
        async with self._lock:
            if not self._started:
                await self.broker.start(on_message=self._on_message)
                await self.presence.start()
                self._started = True

    def _on_message(self, channel: str, payload: bytes) -> None:
        if channel != self.control.reply_channel:
            return
        try:
            env = envelope.decode(payload)
        except envelope.EnvelopeError:
            return
        if env.op == envelope.Op.REPLY:
            self.control.on_reply(env.payload)

    async def aclose(self) -> None:
        if self._owned and self._started:
            self._started = False
            await self.broker.close()
            await self.presence.close()
            if self.history_store is not None:
                await self.history_store.close()
                self.history_store = None

    async def __aenter__(self) -> Cluster:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # --- the cluster's history rules --------------------------------------------------
    def adopt_rules(self, specs: Sequence[str]) -> bool:
        """Follow these cluster rules (unless this publisher has its own): True if changed."""
        if self._own is not None or not stores_history(self.broker):
            return False
        if tuple(specs) == self.history_rules.specs:
            return False
        self.history_rules = Rules(tuple(specs))
        return True

    async def refresh_rules(self) -> None:
        """Read the cluster's rules now (a store that does not answer: keep the last ones)."""
        try:
            stored = await self.presence.history_rules()
            if stored is not None:
                self.adopt_rules(stored)
        except (PresenceUnavailable, ValueError, OSError) as exc:
            log.warning("could not read the cluster's history rules: %s", exc)
        finally:
            self._rules_at, self._reading = time.monotonic(), None

    async def _rules_fresh(self) -> None:
        """Read the rules before the first publish and once per ``check_interval`` (sends
        that come meanwhile wait for the read, and keep their order)."""
        if self._own is not None or not self._owned:
            return  # own rules, or attached to a node, which refreshes them (cluster_rules.py)
        at = self._rules_at
        if self._reading is None and (at is None or time.monotonic() - at >= self.check_interval):
            self._reading = asyncio.ensure_future(self.refresh_rules())
        if self._reading is not None:
            await asyncio.shield(self._reading)

    # --- pushing ---------------------------------------------------------------------
    async def send(self, to: str, data: Any, *, exclude: Iterable[str] = ()) -> Position | None:
        """Deliver ``data`` (any JSON value) to an address as a ``message`` frame with
        ``from: null``. Returns the message's ``Position(epoch, offset)`` when it was stored
        (a stream with a history rule), else None. Raises ProtocolError (bad_request,
        too_large) or BrokerUnavailable."""
        try:
            raw = msgspec.json.encode(data)
        except (TypeError, ValueError, msgspec.EncodeError) as exc:  # incl. not UTF-8
            raise bad_request(f"data is not JSON-serializable: {exc}") from None
        return await self.send_json(to, raw, exclude=exclude)

    async def send_json(
        self, to: str, data: bytes, *, exclude: Iterable[str] = ()
    ) -> Position | None:
        """Like ``send`` with ``data`` already encoded as JSON (not re-encoded)."""
        address = parse_address(to)
        if len(data) > self.max_message_size:
            raise ProtocolError(Code.TOO_LARGE, f"over {self.max_message_size} bytes")
        frame = envelope.message_frame(address, msgspec.Raw(data), None)
        return await self._deliver(
            address, envelope.deliver(address, frame, exclude=_ids(exclude))
        )

    async def send_verbatim(
        self, to: str, payload: bytes, *, binary: bool = False, exclude: Iterable[str] = ()
    ) -> Position | None:
        """Push ``payload`` to the receivers exactly as given (an application's own wire
        format); ``binary`` sends it as a binary WebSocket frame."""
        address = parse_address(to)
        if not isinstance(payload, bytes):
            raise bad_request("a verbatim payload is bytes")
        if len(payload) > self.max_message_size:
            raise ProtocolError(Code.TOO_LARGE, f"over {self.max_message_size} bytes")
        return await self._deliver(
            address, envelope.deliver(address, payload, exclude=_ids(exclude), binary=binary)
        )

    async def close(self, to: str, code: int = KICK) -> None:
        """Close the connections of a ``client:`` or ``uid:`` address (default 4001)."""
        address = parse_address(to)
        if address.kind not in (Kind.CLIENT, Kind.UID):
            raise bad_request("close takes a client: or uid: address")
        if not (code == 1000 or 3000 <= code <= 4999):
            raise bad_request("close code must be 1000 or 3000-4999")
        await self._publish(channel_for(self.names, address), envelope.close(address, code))

    async def _publish(self, channel: str, payload: bytes) -> None:
        await self.start()
        await self.broker.publish(channel, payload)

    async def _deliver(self, address: Address, payload: bytes) -> Position | None:
        await self.start()
        await self._rules_fresh()
        return position(await self.publish_nowait(address, payload))

    def publish_nowait(self, address: Address, payload: bytes) -> asyncio.Future[Any]:
        """Publish a DELIVER envelope to an address: through the history store when a
        ``history`` rule matches it (the message gets an offset), in publish order. The
        future's result gives the position (``history.position``)."""
        channel = channel_for(self.names, address)
        rule = self.history_rules.match(str(address)) if self.history_rules else None
        if rule is None:
            return self.broker.publish_nowait(channel, payload)
        stream = str(address)
        broker = cast(HistoryBroker, self.broker)
        return broker.append_nowait(
            channel, self.names.history_meta_key(stream), self.names.history_key(stream),
            payload, rule.keep, rule.ttl_ms, rule.meta_ttl_ms,
        )  # fmt: skip

    # --- history ---------------------------------------------------------------------
    async def history(self, stream: str, limit: int = 50) -> list[dict[str, Any]]:
        """The newest ``limit`` retained messages of a ``uid:`` or ``group:`` stream with a
        history rule, oldest first: the ``message`` frames as clients got them (with
        ``epoch`` and ``offset``; binary and non-JSON ones left out). [] for a stream
        without a rule or without messages."""
        return (await self.history_page(stream, limit)).messages

    async def history_page(self, stream: str, limit: int = 50) -> HistoryPage:
        """Like ``history``, with the stream's epoch and last offset (``GET /api/history``):
        epoch "" and offset 0 for a stream without a rule or never written."""
        address = parse_address(stream)
        if address.kind not in (Kind.UID, Kind.GROUP):
            raise bad_request("history takes a uid: or group: stream")
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_READ:
            raise bad_request(f"limit must be an integer from 1 to {MAX_READ}")
        stream = str(address)
        await self.start()
        await self._rules_fresh()
        store = self._store()
        if store is None or self.history_rules.match(stream) is None:
            return HistoryPage(stream, "", 0, [])
        read = await store.read(stream, "", 0, limit)
        return HistoryPage(stream, read.epoch, read.top, frames_of(read.entries, read.epoch))

    def _store(self) -> RedisHistory | None:
        if self.history_store is None and self.broker_url.startswith(("redis", "unix")):
            from .broker.redis_history import RedisHistory

            self.history_store = RedisHistory(self.broker_url, self.names, self.control.timeout)
        return self.history_store

    # --- a connection's uid and groups, from any process -----------------------------
    async def bind_uid(self, client_id: str, uid: str) -> bool:
        """Bind a connection to ``uid`` (re-binding moves it). True once every message sent
        afterwards to the uid reaches it; False when the connection does not exist."""
        return await self._control(client_id, "bind", check_name(uid, "uid"))

    async def unbind_uid(self, client_id: str) -> bool:
        return await self._control(client_id, "unbind", "")

    async def join(self, client_id: str, group: str) -> bool:
        """Make a connection join ``group``, with the barrier of a client's own ``join``."""
        return await self._control(client_id, "join", check_name(group, "group"))

    async def leave(self, client_id: str, group: str) -> bool:
        return await self._control(client_id, "leave", check_name(group, "group"))

    async def _control(self, client_id: str, action: str, arg: str) -> bool:
        cid = _client_id(client_id)
        await self.start()
        return await self.control.request(cid, action, arg)

    # --- sessions (GatewayWorker's getSession / setSession / updateSession) ---------------
    async def get_session(self, client_id: str) -> dict[str, Any] | None:
        """A connection's session data; None when the connection is not open."""
        await self.start()
        return await self.presence.get_session(_client_id(client_id))

    async def set_session(self, client_id: str, values: Mapping[str, Any]) -> bool:
        """Replace the session; False when the connection is not open. Raises
        ProtocolError(too_large) over ``max_session_size`` bytes."""
        return await self._session(client_id, values, replace=True)

    async def update_session(self, client_id: str, values: Mapping[str, Any]) -> bool:
        """Merge top-level keys into the session (a None value deletes the key)."""
        return await self._session(client_id, values, replace=False)

    async def _session(self, client_id: str, values: Mapping[str, Any], *, replace: bool) -> bool:
        cid = _client_id(client_id)
        if not isinstance(values, Mapping):
            raise bad_request("a session is a JSON object")
        await self.start()
        node_id = node_of_client(cid) or ""
        return await self.presence.set_session(
            node_id, cid, values, replace=replace, limit=self.max_session_size
        )

    # --- questions -------------------------------------------------------------------
    async def is_online(self, uid: str) -> bool:
        await self.start()
        return await self.presence.is_online(check_name(uid, "uid"))

    async def client_ids(self, uid: str) -> list[str]:
        await self.start()
        return await self.presence.client_ids(check_name(uid, "uid"))

    async def group_members(self, group: str) -> list[str]:
        """Distinct uids in a group."""
        await self.start()
        return (await self.presence.group_members(check_name(group, "group"))).uids

    async def group_count(self, group: str) -> int:
        """Connections in a group (anonymous ones included)."""
        await self.start()
        return (await self.presence.group_members(check_name(group, "group"))).count

    async def nodes(self) -> list[NodeInfo]:
        await self.start()
        return await self.presence.nodes()

    async def count(self) -> int:
        return sum(int(n.stats.get("connections", 0)) for n in await self.nodes())

    async def stats(self) -> dict[str, Any]:
        nodes = sorted(await self.nodes(), key=lambda n: n.node_id)
        listed = [{"node": n.node_id, **n.stats} for n in nodes]
        return {"nodes": listed, "connections": sum(int(n["connections"]) for n in listed)}


def _client_id(value: object) -> str:
    if not (isinstance(value, str) and node_of_client(value) and len(value) <= 200
            and is_utf8(value)):  # fmt: skip
        raise bad_request("not a client id")
    return value


def _ids(exclude: Iterable[str]) -> tuple[str, ...]:
    ids = tuple(exclude)
    if not all(isinstance(i, str) and is_utf8(i) for i in ids):
        raise bad_request("exclude must be a list of client ids")
    return ids


def stores_history(broker: Broker) -> bool:
    """Whether the broker appends to history as it publishes (Redis only)."""
    return hasattr(broker, "append_nowait")


def _history_rules(broker: Broker, specs: Sequence[str]) -> Rules:
    rules = Rules(tuple(specs))  # ("none",): no rules
    if rules and not stores_history(broker):
        raise ValueError("history (--history) needs a Redis broker")
    return rules
