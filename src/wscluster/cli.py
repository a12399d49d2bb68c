"""Command line: ``wscluster serve | up | send | status | nginx-conf``. Every option also reads
``WSCLUSTER_<OPTION>`` from the environment (upper case, dashes as underscores)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import fields
from typing import TYPE_CHECKING, Any

from . import __version__, gctune, nginx
from .config import NodeConfig, _loopback
from .preflight import BROKER_SCHEMES, busy_port, unreachable

if TYPE_CHECKING:
    from .app import App
    from .workers import Supervisor

DEFAULT_BROKER = "redis://127.0.0.1:6379/0"
BROKER_HELP = "broker URL: " + ", ".join(f"{s}://" for s in BROKER_SCHEMES)
_SECRETS = frozenset({"jwt_secret", "api_key"})  # never shown, even when set in the environment
log = logging.getLogger("wscluster.cli")


class _Help(argparse.HelpFormatter):
    """Every option's help ends with its default (when it has one)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        d = action.default
        if (action.option_strings and d is not None and d is not False and d != ()
                and d is not argparse.SUPPRESS and "default" not in text
                and action.dest not in _SECRETS):  # fmt: skip
            text += " (default: %(default)s)"
        return text


def _env(name: str, default: Any) -> Any:
    return os.environ.get("WSCLUSTER_" + name.upper().replace("-", "_"), default)


def _flag(name: str) -> bool:
    return str(_env(name, "")).lower() in ("1", "true", "yes", "on")


def _add(p: argparse.ArgumentParser, name: str, default: Any, kind: Any = str, **kw: Any) -> None:
    p.add_argument(f"--{name}", default=_env(name, default), type=kind, **kw)


def _bool(p: argparse.ArgumentParser, name: str, help: str) -> None:
    """An on/off switch (also on when WSCLUSTER_<NAME> is 1, true, yes or on)."""
    p.add_argument(f"--{name}", action="store_true", default=_flag(name), help=help)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wscluster", description=__doc__)
    parser.add_argument("--version", action="version", version=f"wscluster {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    d = NodeConfig()
    s = sub.add_parser("serve", help="run one gateway node", formatter_class=_Help)
    _add(s, "host", d.host, help="address of the public (WebSocket) port")
    _add(s, "port", d.port, int, help="public port: WebSockets, the page, /healthz")
    _add(s, "api-host", d.api_host, help="address of the HTTP API port")
    _add(s, "api-port", None, int, help="HTTP API port (default: port + 1000)")
    _add(s, "broker", DEFAULT_BROKER, help=BROKER_HELP)
    _add(s, "broker-timeout", d.broker_timeout, float,
         help="seconds to wait for the broker at start before exiting 1")
    _bool(s, "wait-for-broker", "at start, wait for the broker for ever (logging each retry)")
    _add(s, "presence", None, help="presence store URL: redis://, rediss://, unix:// or "
         "memory:// (default: the broker URL)")
    _add(s, "namespace", d.namespace, help="prefix of the cluster's channels and keys")
    _add(s, "node-name", None, help="name in node ids (default: <host name>:<port>)")
    _add(s, "node-id", None, help=argparse.SUPPRESS)  # `up`: the exact id, to recognize it
    _bool(s, "anonymous", "accept any client; `login` takes a uid")
    _add(s, "jwt-secret", None, help="HS256 secret: clients need a token signed with it")
    _add(s, "jwt-public-key", None, help="PEM file: RS256 (RSA) or ES256 (EC P-256) tokens")
    _add(s, "jwt-audience", None, help="required `aud` of tokens")
    _add(s, "jwt-issuer", None, help="required `iss` of tokens")
    _add(s, "jwt-leeway", d.jwt_leeway, float, help="seconds of clock skew allowed on exp/nbf")
    _add(s, "jwt-max-lifetime", d.jwt_max_lifetime, float,
         help="seconds from now to a token's exp, at most: longer ones are refused (0: no cap)")
    _add(s, "allowed-origins", None, help="comma-separated origins allowed to connect")
    _bool(s, "allow-missing-origin", "with --allowed-origins: accept handshakes without Origin")
    _add(s, "app", None, help="module:attribute of a wscluster.App to run")
    _add(s, "api-key", None, help="key every /api/ and /metrics request must carry "
         "(Authorization: Bearer KEY); required when --api-host is not a loopback address")
    _bool(s, "api-insecure", "serve the API on a non-loopback --api-host without --api-key")
    _add(s, "max-connections", d.max_connections, int, help="WebSocket connections at once")
    _add(s, "max-message-size", d.max_message_size, int, help="bytes of one client message")
    _add(s, "max-frame-size", d.max_frame_size, int,
         help="bytes of one frame: over it, close 1009 (between it and --max-message-size: "
         "error too_large)")
    _add(s, "fragment-timeout", d.fragment_timeout, float,
         help="seconds a client has to finish a fragmented message, else close 1008 (0: none)")
    _add(s, "max-outbox", d.max_outbox, int, help="bytes queued per client before 1013")
    _add(s, "max-connections-per-ip", d.max_connections_per_ip, int,
         help="connections open at once from one client address (0: no limit)")
    _add(s, "handshake-rate-per-ip", d.handshake_rate_per_ip, float,
         help="handshakes per second from one client address (0: no limit)")
    _add(s, "trusted-proxies", None, help="comma-separated addresses or CIDRs of proxies whose "
         "X-Forwarded-For names the client (for the per-address limits)")
    _add(s, "max-connections-per-uid", d.max_connections_per_uid, int, help="0: no limit")
    _add(s, "max-session-size", d.max_session_size, int, help="bytes of session per connection")
    _add(s, "rate-limit", d.rate_limit, float, help="client frames per second (0: no limit)")
    _add(s, "rate-burst", d.rate_burst, int, help="client frames allowed in a burst")
    _add(s, "send-rate-bytes", d.send_rate_bytes, int,
         help="bytes per second of messages one client may send; over it the node reads it "
         "more slowly (0: no limit)")
    _add(s, "send-burst-bytes", d.send_burst_bytes, int, help="bytes a client may send in a burst")
    _add(s, "ping-rate", d.ping_rate, float,
         help="pings per second a client may send, WebSocket or app-level (0: no limit)")
    _add(s, "ping-burst", d.ping_burst, int, help="pings allowed in a burst")
    _add(s, "ping-interval", d.ping_interval, float, help="seconds between pings to clients")
    _add(s, "node-heartbeat", d.node_heartbeat, float,
         help="seconds between this node's presence heartbeats")
    _add(s, "node-ttl", d.node_ttl, float,
         help="seconds without a heartbeat after which a node counts as dead")
    _add(s, "drain-timeout", d.drain_timeout, float,
         help="seconds SIGTERM gives clients to leave before closing the rest")
    _add(s, "max-publish-queue", d.max_publish_queue, int,
         help="bytes waiting for the broker; above it sends get rate_limited")
    _add(s, "max-inflight", d.max_inflight, int,
         help="requests of one connection awaiting I/O before its reading pauses")
    _add(s, "request-timeout", d.request_timeout, float,
         help="seconds a send/join/login waits for the broker or presence store")
    _add(s, "transport", "asyncio", choices=["asyncio", "aiofastnet"],
         help="socket transport of the public port (measured: see docs/performance.md)")
    _add(s, "log-level", "INFO", help="DEBUG, INFO, WARNING or ERROR")
    _add(s, "workers", 1, int, help="worker processes (nodes) sharing --port through "
         "SO_REUSEPORT, worker i with API port api-port+i; 0: one per CPU")
    _bool(s, "reuse-port", argparse.SUPPRESS)  # set by --workers on its workers
    _multi(s, "history", "PATTERN=N/Ts: keep the last N messages of matching streams for T "
           "seconds, e.g. 'group:room:*=1000/300s' (repeatable); written as the cluster's "
           "rules, 'none' clears them; without it the node follows the cluster's")
    _add(s, "max-replay", d.max_replay, int, help="messages replayed per stream per resume")
    _add(s, "check-interval", d.check_interval, float,
         help="seconds between history position checks and broker liveness probes")
    _multi(s, "outbox-policy", "PATTERN=close|drop-oldest: what a full outbox does to "
           "messages of matching streams (repeatable; default close, with 1013)")

    u = sub.add_parser("up", help="start a local cluster: a broker and N nodes",
                       formatter_class=_Help)  # fmt: skip
    _add(u, "nodes", 3, int, help="node processes")
    _add(u, "base-port", 8000, int, help="node i listens on base-port+i, its API on +1000")
    _add(u, "host", "127.0.0.1", help="address of the nodes' public ports")
    # not from WSCLUSTER_BROKER / WSCLUSTER_PRESENCE: they are what `up` prints for send and
    # status; a second `up` in that shell starts its own broker
    u.add_argument("--broker", default=None, help=BROKER_HELP + " (default: start an embedded one)")
    u.add_argument("--presence", default=None,
                   help="presence store (default: the broker, or an embedded valkey)")
    _bool(u, "nats", "start an embedded nats-server as the broker")
    _add(u, "namespace", "wsc", help="prefix of the cluster's channels and keys")
    _add(u, "app", None, help="module:attribute of a wscluster.App to run on every node")
    _add(u, "jwt-secret", None, help="HS256 tokens for clients (else anonymous)")
    _add(u, "jwt-public-key", None, help="RS256/ES256 tokens for clients")
    _add(u, "allowed-origins", None, help="comma-separated origins allowed to connect")
    _add(u, "api-key", None, help="key required by every node's /api/")
    _add(u, "nginx", 0, int, help="also run nginx (nginx-conf's config) in front, on this port")
    _multi(u, "history", "PATTERN=N/Ts history rules for every node (default with Redis: "
           "'group:*=1000/600s' and 'uid:*=1000/3600s'; 'none' for no history)")
    _add(u, "log-level", "INFO", help="DEBUG, INFO, WARNING or ERROR")

    for name, helptext in (("send", "push a message to an address"),
                           ("status", "show the cluster's nodes and connections")):  # fmt: skip
        c = sub.add_parser(name, help=helptext)
        _add(c, "broker", DEFAULT_BROKER, help=BROKER_HELP)
        _add(c, "broker-timeout", 10.0, float, help="seconds to wait for the broker")
        _add(c, "presence", None, help="presence store URL (default: the broker URL)")
        _add(c, "namespace", "wsc")
        if name == "send":
            to = _env("to", None)
            c.add_argument("--to", default=to, required=to is None,
                           help="client:<id> | uid:<uid> | group:<g> | all")  # fmt: skip
            c.add_argument("data", help="JSON value (text that is not JSON is sent as a string)")
            _multi(c, "history", "rules of this sender's own, instead of the cluster's "
                   "(default: the cluster's, which the nodes hold)")

    g = sub.add_parser("nginx-conf", help="print an nginx config for the nodes (conf.d snippet)")
    g.add_argument("--upstream", action="extend", type=_checked(nginx.parse_upstreams),
                   default=None, metavar="HOST:PORT",
                   help="a node's public port; once per node, in order (required)")  # fmt: skip
    g.add_argument("--listen", action="extend", type=_checked(nginx.parse_listens),
                   default=None, metavar="[ADDRESS:]PORT",
                   help="PORT or ADDRESS:PORT, e.g. [::]:80; repeatable (default: 80)")  # fmt: skip
    _add(g, "server-name", "_")
    _add(g, "ping-interval", 25.0, float, help="the nodes' --ping-interval (sets the timeouts)")
    _add(g, "limit-conn", 0, int, help="WebSocket connections per client IP (0: no limit)")
    _bool(g, "standalone", "a complete nginx.conf, its paths relative to nginx -p DIR")
    return parser


def _multi(p: argparse.ArgumentParser, name: str, helptext: str) -> None:
    """A repeatable option; its environment variable takes comma-separated values."""
    env = _env(name, "")
    default = tuple(v.strip() for v in env.split(",") if v.strip()) if env else ()
    p.add_argument(f"--{name}", action="append", default=None, help=helptext)
    p.set_defaults(**{name.replace("-", "_") + "_env": default})


def _checked(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse type from a parser raising ValueError, keeping its message."""

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return convert


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, str(level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def node_config(args: argparse.Namespace) -> NodeConfig:
    names = {f.name for f in fields(NodeConfig)}
    values = {k: v for k, v in vars(args).items() if k in names and v is not None}
    for multi in ("history", "outbox_policy"):
        if multi in names and hasattr(args, multi + "_env"):
            given = getattr(args, multi)
            values[multi] = tuple(given) if given is not None else getattr(args, multi + "_env")
    return NodeConfig(**values)


async def _serve(config: NodeConfig, app: App | None) -> int:
    from .node import Node

    node = Node(config, app)
    try:
        await node.start()
    except OSError as exc:  # a port taken since the preflight
        print(f"wscluster serve: cannot start: {exc.strerror or exc}", file=sys.stderr)
        return 1
    gctune.tune()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: asyncio.ensure_future(node.drain()))
    await node.wait_stopped()
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    _setup_logging(args.log_level)
    supervisor: Supervisor | None = None
    try:
        config = node_config(args)
        workers = args.workers if args.workers != 0 else (os.cpu_count() or 1)
        if workers < 0:
            raise ValueError("--workers must be >= 0 (0: one per CPU)")
        config.reuse_port = config.reuse_port or workers > 1  # checks the platform has it
        config.validate()
        app = load_app_spec(config.app)
        if config.jwt:
            from .gate import make_verifier

            try:
                make_verifier(config)  # a bad key file fails here, before anything starts
            except OSError as exc:
                raise ValueError(f"--jwt-public-key {config.jwt_public_key}: "
                                 f"{exc.strerror or exc}") from None  # fmt: skip
        if workers > 1:
            from .workers import Supervisor

            supervisor = Supervisor(config, workers, args, build_parser())
    except (ValueError, TypeError) as exc:
        print(f"wscluster serve: {exc}", file=sys.stderr)
        return 2
    problem = _preflight(config, workers)
    if problem is not None:
        print(f"wscluster serve: {problem}", file=sys.stderr)
        return 1
    if config.anonymous and not _loopback(config.host):
        log.warning("--anonymous on %s: anyone who reaches port %d can connect and log in as "
                    "any uid (use JWTs, or --host 127.0.0.1 for a local test)",
                    config.host, config.port)  # fmt: skip
    if supervisor is not None:  # --workers N: this process only runs the N nodes
        return supervisor.run()
    import uvloop

    return uvloop.run(_serve(config, app))


def _preflight(config: NodeConfig, workers: int) -> str | None:
    """Why the node cannot start (a port taken, the broker not there), else None."""
    api = config.effective_api_port
    taken = busy_port([(config.host, config.port)], reuse_port=config.reuse_port)
    taken = taken or busy_port([(config.api_host, api + i) for i in range(max(workers, 1))])
    if taken is not None:
        return taken
    down = unreachable(config.broker, config.presence, config.broker_timeout,
                       forever=config.wait_for_broker)  # fmt: skip
    if down is None:
        return None
    option, url, why = down
    return (f"{option} {url} is not reachable after {config.broker_timeout:g} s ({why}); "
            "or pass --wait-for-broker to wait for it")


def load_app_spec(spec: str | None) -> App | None:
    if spec is None:
        return None
    from .app import load_app

    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # `--app myapp:app` finds ./myapp.py, as uvicorn does
    return load_app(spec)


def cmd_nginx_conf(args: argparse.Namespace) -> int:
    try:
        upstreams = args.upstream
        if upstreams is None:
            env = _env("upstream", "")
            if not env:
                raise ValueError("--upstream HOST:PORT is required (once per node)")
            upstreams = nginx.parse_upstreams(env)
        listen = args.listen
        if listen is None:
            listen = nginx.parse_listens(_env("listen", "80"))
        options = nginx.NginxOptions(
            tuple(upstreams), listen=tuple(listen), server_name=args.server_name,
            ping_interval=args.ping_interval, limit_conn=args.limit_conn,
            standalone=args.standalone,
        )  # fmt: skip
    except ValueError as exc:
        print(f"wscluster nginx-conf: error: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(nginx.render(options))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "nginx-conf":
        return cmd_nginx_conf(args)
    if args.command == "serve":
        return cmd_serve(args)
    if args.command == "up":
        from .up import cmd_up

        _setup_logging(args.log_level)
        return cmd_up(args)
    _setup_logging("WARNING")
    from .oneshot import run

    return asyncio.run(run(args))
