"""A gateway node: lifecycle, the broker -> local receivers path, liveness, drain."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Coroutine
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

from picows import WSMsgType

from . import control, envelope
from .admit import Admission
from .app import App, load_app
from .broker import create_broker
from .cluster import Cluster
from .cluster_rules import ClusterRules
from .config import NodeConfig
from .drain import drain_connections
from .errors import BrokerUnavailable, PresenceUnavailable
from .gate import Gate, make_verifier
from .gateway.connection import Connection
from .handlers import Handlers
from .heartbeat import Heartbeat
from .hooks import AppRunner
from .liveness import Liveness
from .metrics import Metrics
from .naming import Names, client_id, new_node_id, node_of_client
from .ops import Ops
from .outbox import OutboxRules
from .peers import REFUSED, PeerLimits
from .presence import create_presence
from .presence.base import ConnInfo
from .registry import Registry
from .routing import Address, Kind, parse_address
from .streams import Streams
from .subscriptions import Subscriptions
from .tasks import cancel_and_wait, quietly

log = logging.getLogger("wscluster.node")


class _Closable(Protocol):
    async def close(self) -> None: ...


class Node:
    def __init__(self, config: NodeConfig, app: App | None = None) -> None:
        config.validate()
        self.config = config
        self.names = Names(config.namespace)
        self.node_id = config.node_id or new_node_id(config.default_name)
        self.metrics = Metrics(self.node_id)
        self.registry: Registry[Connection] = Registry()
        self.broker = create_broker(config.broker)
        self.presence = create_presence(config.presence_url, self.names)
        self.subs = Subscriptions(self.broker, self.names, config.request_timeout)
        self.cluster = Cluster.attach(
            self.broker, self.presence, self.names, max_message_size=config.max_message_size,
            max_session_size=config.max_session_size, timeout=config.request_timeout,
        )  # fmt: skip
        self.streams: Streams | None = None
        self.rules = ClusterRules(self)  # the cluster's history rules, followed
        if self.rules.enabled:
            from .broker.redis_history import RedisHistory

            store = RedisHistory(config.broker, self.names, config.request_timeout)
            self.streams = Streams(self, store)
            self.cluster.history_store = store  # Cluster.history, GET /api/history
            self.subs.on_unsubscribe = self.streams.drop
        self.liveness = Liveness(self)
        self.outbox = OutboxRules(config.outbox_policy)
        self.cluster.control.local = self._local_control
        self.app = app if app is not None else (load_app(config.app) if config.app else None)
        self.app_runner = AppRunner(self, self.app) if self.app is not None else None
        if self.app is not None:
            self.app.bind_cluster(self.cluster)
        self.verifier = make_verifier(config)
        self.gate = Gate(config, self.verifier, self.registry.uid_size,
                         self.app.handshake_hook if self.app is not None else None,
                         keep_request=self.app is not None)  # fmt: skip
        self.ops = Ops(self)
        self.admission = Admission(self)
        c = config
        self.peers = PeerLimits(c.max_connections_per_ip, c.handshake_rate_per_ip,
                                c.trusted_proxies)  # fmt: skip
        self.handlers = Handlers(self)
        self.draining = False
        self.started_at = time.time()
        self._watchers: dict[str, set[str]] = {}  # group -> cids that get presence events
        self._tasks: set[asyncio.Task[Any]] = set()
        self._unflushed: list[Connection] = []  # connections with frames pushed this turn
        self.heartbeat = Heartbeat(self)
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._liveness_task: asyncio.Task[None] | None = None
        self._servers: list[_Closable] = []  # the public (picows) and API (aiohttp) servers
        self._stopped = asyncio.Event()

    # --- lifecycle -------------------------------------------------------------------
    async def start(self) -> None:
        from .gateway.http import start_api
        from .gateway.websocket import start_public

        await self.broker.start(on_message=self._on_broker, on_state=self._on_broker_state)
        self.metrics.broker_up.set(1 if self.broker.connected else 0)
        fixed = [self.names.all_channel(), self.names.node_channel(self.node_id),
                 self.cluster.control.reply_channel]  # fmt: skip
        try:
            await self.broker.subscribe(fixed)
        except BrokerUnavailable:
            log.warning("broker unavailable at start: %s; retrying in the background",
                        _redact(self.config.broker))  # fmt: skip
        await self.presence.start()
        await self.rules.start()
        await self.heartbeat.once()
        self._heartbeat_task = asyncio.create_task(self.heartbeat.run())
        self._liveness_task = asyncio.create_task(self.liveness.run())
        self._servers.append(await start_public(self))
        self._servers.append(await start_api(self))
        log.info(
            "node %s serving ws://%s:%d/ws (api http://%s:%d) broker=%s namespace=%s",
            self.node_id, self.config.host, self.config.port, self.config.api_host,
            self.config.effective_api_port, _redact(self.config.broker), self.config.namespace,
        )  # fmt: skip

    async def drain(self) -> None:
        """SIGTERM: refuse new handshakes, close clients in batches with 1012, stragglers
        with 1001 at the timeout, remove our presence, stop (see drain.py)."""
        if self.draining:
            return
        self.draining = True
        await drain_connections(self)
        await self.stop()

    async def stop(self) -> None:
        self.draining = True
        self.rules.stop()
        for task in (self._heartbeat_task, self._liveness_task):
            if task is not None:
                task.cancel()
        for server in self._servers:
            await server.close()
        self._servers.clear()
        for _, entry in self.registry.items():
            if entry.conn.transport is not None:
                entry.conn.transport.underlying_transport.abort()
        if self.app_runner is not None:  # let on_close handlers finish
            # Tasks spawn tasks (a close reads the session, then queues on_close): wait until
            # none is left, not only for those running now, within one deadline.
            loop = asyncio.get_running_loop()
            deadline = loop.time() + min(5.0, self.config.drain_timeout)
            await asyncio.sleep(0)
            while self._tasks and (left := deadline - loop.time()) > 0:
                await asyncio.wait(list(self._tasks), timeout=left)
        try:
            await asyncio.wait_for(self.presence.remove_node(self.node_id), 3)
        except (PresenceUnavailable, TimeoutError):
            log.warning("could not remove presence at stop; it expires with the node TTL")
        await cancel_and_wait(list(self._tasks))
        await self.broker.close()
        await self.presence.close()
        if self.streams is not None:
            await self.streams.store.close()
        log.info("node %s stopped", self.node_id)
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    def spawn(self, coro: Coroutine[Any, Any, Any] | asyncio.Future[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("task failed", exc_info=task.exception())

    # --- connections -----------------------------------------------------------------
    def accepting(self) -> int | None:
        """None when a new handshake is welcome, else the HTTP status to refuse it with."""
        if self.draining:
            return 503
        if len(self.registry) >= self.config.max_connections:
            return 503
        return None

    def on_open(self, conn: Connection) -> None:
        if self.peers.enabled:  # after the upgrade: the handshake hook sees no peer address
            assert conn.transport is not None
            peer = conn.transport.underlying_transport.get_extra_info("peername") or ("",)
            now = time.monotonic()
            conn.peer = self.peers.admit_peer(str(peer[0]), conn.request.forwarded, now)
            if conn.peer is None:
                conn.close(1013, REFUSED)
                return
        conn.cid = client_id(self.node_id)
        conn.raw = self.app is not None and self.app.raw
        self.registry.add(conn.cid, conn)
        self.metrics.connections.set(len(self.registry))
        self.metrics.connects.inc()
        add = self.presence.add(self.node_id, ConnInfo(conn.cid))
        self.presence_fire(add)
        self.admission.open(conn)

    def want_flush(self, conn: Connection) -> None:
        if not self._unflushed:
            asyncio.get_running_loop().call_soon(self._flush)
        self._unflushed.append(conn)

    def _flush(self) -> None:
        conns, self._unflushed = self._unflushed, []
        for conn in conns:
            try:
                conn.flush()
            except Exception:  # one broken transport must not keep the others' frames
                log.exception("writing to client %s failed", conn.cid)

    def on_text(self, conn: Connection, payload: bytes) -> None:
        self.handlers.handle(conn, payload)

    def on_binary(self, conn: Connection, payload: bytes) -> bool:
        if not conn.raw:
            return False
        self.handlers.handle_raw(conn, payload, binary=True)
        return True

    def on_closed(self, conn: Connection) -> None:
        if conn.peer is not None:
            self.peers.release(conn.peer)
        entry, interest = self.registry.remove(conn.cid)
        if entry is None:
            return
        self.metrics.connections.set(len(self.registry))
        self.subs.apply(interest)
        if self.streams is not None:
            self.streams.forget(conn.cid)
        for group in entry.groups:
            self.unwatch_presence(conn.cid, group)
            self.publish_presence(group, "leave", entry.uid, conn.cid)
        remove = self.presence.remove(self.node_id, conn.cid, entry.uid, entry.groups)
        runner = self.app_runner
        if runner is None or runner.app.close_hook is None:
            self.presence_fire(remove)
            return

        async def closed() -> None:  # read the session before the record goes
            try:
                session = await asyncio.wait_for(
                    self.presence.get_session(conn.cid), self.config.request_timeout
                )
            except (PresenceUnavailable, TimeoutError):
                session = None
            runner.closed(conn, entry.uid, entry.groups, session or {})
            await quietly(self.presence_write(remove))

        self.spawn(closed())

    def _local_control(self, cid: str, action: str, arg: str) -> Awaitable[str] | None:
        """Control requests for this node's own connections skip the broker: the status
        ("ok", "gone" or an error code), as the holder's node would answer it."""
        if node_of_client(cid) != self.node_id:
            return None
        return control.apply(self, cid, action, arg)

    # --- presence ----------------------------------------------------------------------
    def presence_write(self, write: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Start a presence write now, so writes reach the store in call order however late
        they are awaited (a join then leave read in one go is never written leave, join).
        A failure marks the mirror dirty (full resync later) and raises to whoever awaits."""
        task = asyncio.ensure_future(self._presence_write(write))
        task.add_done_callback(_ignore_failure)
        return task

    def presence_fire(self, write: Coroutine[Any, Any, None]) -> None:
        """A presence write nobody waits for (one task, in call order as presence_write's):
        a failure only marks the mirror dirty."""
        self.spawn(self._presence_write(write, quiet=True))

    async def _presence_write(self, write: Coroutine[Any, Any, None], quiet: bool = False) -> None:
        try:
            async with asyncio.timeout(self.config.request_timeout):
                await write
        except (PresenceUnavailable, TimeoutError) as exc:
            self.heartbeat.dirty = True
            if not quiet:
                raise PresenceUnavailable(str(exc)) from None

    def watch_presence(self, cid: str, group: str) -> None:
        self._watchers.setdefault(group, set()).add(cid)

    def unwatch_presence(self, cid: str, group: str) -> None:
        watchers = self._watchers.get(group)
        if watchers is not None:
            watchers.discard(cid)
            if not watchers:
                del self._watchers[group]

    def mark_presence_dirty(self) -> None:
        """The mirror may be wrong about this node: resync it at the next heartbeat."""
        self.heartbeat.dirty = True

    def publish_presence(
        self, group: str, event: str, uid: str | None, cid: str
    ) -> asyncio.Future[None]:
        """Announce a join/leave to the group's watchers (a joiner does not get its own);
        the future says when the broker took it (failures need not be retrieved)."""
        exclude = (cid,) if event == "join" else ()
        payload = envelope.presence_event(group, event, uid, cid, exclude=exclude)
        fut = self.broker.publish_nowait(self.names.channel(f"group:{group}"), payload)
        fut.add_done_callback(_ignore_failure)
        return fut

    def snapshot(self) -> list[ConnInfo]:
        return [ConnInfo(cid, e.uid, sorted(e.groups)) for cid, e in self.registry.items()]

    def stats(self) -> dict[str, Any]:
        return {
            "node": self.node_id,
            "connections": len(self.registry),
            "uids": sum(1 for _ in self.registry.uids()),
            "groups": sum(1 for _ in self.registry.groups()),
            "ws_port": self.config.port,
            "api_port": self.config.effective_api_port,
            "pid": os.getpid(),
            "started_at": int(self.started_at),
            "broker_connected": self.broker.connected,
            "draining": self.draining,
        }

    def health(self) -> tuple[bool, str]:
        if self.draining:
            return False, "draining"
        if not self.broker.connected:
            return False, "broker unreachable"
        if self.liveness.degraded is not None:
            return False, f"degraded: {self.liveness.degraded}"
        if not self.rules.written:
            return False, "history rules not yet written to the presence store"
        if time.monotonic() - self.heartbeat.ok_at > self.config.node_ttl / 2:
            return False, "presence store unreachable"
        return True, "ok"

    # --- broker -> local receivers -------------------------------------------------------
    def _on_broker_state(self, connected: bool) -> None:
        self.metrics.broker_up.set(1 if connected else 0)
        if connected:
            self.liveness.on_broker_up()

    def _on_broker(self, channel: str, payload: bytes) -> None:
        self.metrics.broker_in.inc()
        self.liveness.heard = time.monotonic()
        try:
            if payload[:1] == b"#":
                if self.streams is None:
                    raise envelope.EnvelopeError("history message on a node without history")
                self.streams.on_message(payload)
                return
            env = envelope.decode(payload)
            if env.op == envelope.Op.REPLY:
                self.cluster.control.on_reply(env.payload)
                return
            if env.op == envelope.Op.PROBE:
                self.liveness.on_probe(env.to)
                return
            address = parse_address(env.to)
        except (envelope.EnvelopeError, ValueError) as exc:
            self.metrics.bad_envelopes.inc()
            log.warning("dropped an undecodable broker message on %r: %s", channel, exc)
            return
        if env.op == envelope.Op.DELIVER:
            kind = WSMsgType.BINARY if env.binary else WSMsgType.TEXT
            self._deliver(address, env.payload, env.exclude, kind)
        elif env.op == envelope.Op.PRESENCE:
            watchers = self._watchers.get(address.name, ())
            for cid in list(watchers):
                entry = self.registry.get(cid)
                if entry is not None and cid not in env.exclude:
                    entry.conn.reply(env.payload)
        elif env.op == envelope.Op.CLOSE:
            for _, conn in self.registry.receivers(address):
                conn.close(env.code, "closed by the server")
        elif env.op == envelope.Op.CONTROL and address.kind is Kind.CLIENT:
            self.spawn(control.serve(self, env.to, env.payload))
        else:
            self.metrics.bad_envelopes.inc()

    def _deliver(
        self, address: Address, payload: bytes, exclude: tuple[str, ...], kind: WSMsgType
    ) -> None:
        n = 0
        drop = self.outbox.drop(str(address)) if self.outbox else False
        if exclude:
            skip = set(exclude)
            for cid, conn in self.registry.receivers(address):
                if cid not in skip:
                    conn.push(payload, kind, drop)
                    n += 1
        else:
            conns = self.registry.conns(address)
            for conn in conns:
                conn.push(payload, kind, drop)
            n = len(conns)
        if n:
            self.metrics.deliveries.inc(n)
            self.metrics.frames_out.inc(n)


def _ignore_failure(fut: asyncio.Future[None]) -> None:
    if not fut.cancelled():
        fut.exception()


def _redact(url: str) -> str:
    """A URL fit for logs: no user info, no query (which may carry a password)."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, host, parts.path, "", ""))
