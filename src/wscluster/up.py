"""``wscluster up``: a local cluster in one command (an embedded broker and N node processes),
stopped as a whole with Ctrl-C."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.request

from .embedded import (
    ChildServer,
    EmbeddedNats,
    EmbeddedRedis,
    EmbeddedRedisError,
    die_with_parent,
)
from .localnginx import LocalNginx
from .naming import new_node_id
from .preflight import busy_port, check_urls, unreachable

log = logging.getLogger("wscluster.up")


def _wait_healthy(url: str, proc: subprocess.Popen[bytes], node_id: str, timeout: float) -> bool:
    """Whether the node ``node_id`` (ours, not another process on its port) answers healthy
    at ``url`` within ``timeout`` seconds while ``proc`` runs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200 and json.loads(resp.read()).get("node") == node_id:
                    return True
        except (OSError, ValueError, AttributeError):
            pass
        time.sleep(0.1)
    return False


def _preflight(args: argparse.Namespace) -> str | None:
    """A usage mistake (exit 2) or a port taken (exit 1) found before anything starts."""
    check_urls(args.broker, args.presence)
    ports = [(args.host, args.base_port + i) for i in range(1, args.nodes + 1)]
    ports += [("127.0.0.1", args.base_port + i + 1000) for i in range(1, args.nodes + 1)]
    if args.nginx:
        ports.append((args.host, args.nginx))
    return busy_port(ports)


def _embedded(server: ChildServer, started: list[ChildServer]) -> str:
    started.append(server)
    server.start()
    log.info("embedded %s on %s (pid %s)", server.name, server.url, server.pid)
    return server.url


def _auth(args: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
    """The nodes' authentication options: anonymous unless a JWT key is given. Secrets go
    through the environment, not the command line (where `ps` shows them)."""
    from .config import NodeConfig

    config = NodeConfig(anonymous=not (args.jwt_secret or args.jwt_public_key),
                        jwt_secret=args.jwt_secret, jwt_public_key=args.jwt_public_key,
                        allowed_origins=args.allowed_origins, presence="memory://")  # fmt: skip
    config.validate()
    argv = ["--anonymous"] if config.anonymous else []
    if args.jwt_public_key:
        argv += ["--jwt-public-key", os.path.abspath(args.jwt_public_key)]
    if args.allowed_origins:
        argv += ["--allowed-origins", args.allowed_origins]
    env = {"WSCLUSTER_JWT_SECRET": args.jwt_secret} if args.jwt_secret else {}
    if args.api_key:
        env["WSCLUSTER_API_KEY"] = args.api_key
    return argv, env


def cmd_up(args: argparse.Namespace) -> int:
    try:
        auth_args, auth_env = _auth(args)
        taken = _preflight(args)
    except ValueError as exc:
        print(f"wscluster up: {exc}", file=sys.stderr)
        return 2
    if taken is not None:
        print(f"wscluster up: {taken} (another cluster? pass --base-port)", file=sys.stderr)
        return 1
    down = unreachable(args.broker, args.presence, 10.0, fail_on_refused=True)
    if down is not None:
        print("wscluster up: {} {} is not reachable ({})".format(*down), file=sys.stderr)
        return 1
    if args.app is not None:
        from .cli import load_app_spec

        try:
            load_app_spec(args.app)  # fail here, not in N node processes
        except ValueError as exc:
            print(f"wscluster up: {exc}", file=sys.stderr)
            return 2
    started: list[ChildServer] = []
    broker, presence = args.broker, args.presence
    try:
        if broker is None:
            broker = _embedded(EmbeddedNats() if args.nats else EmbeddedRedis(), started)
        if presence is None and not broker.startswith(("redis", "unix", "memory")):
            presence = _embedded(EmbeddedRedis(), started)  # presence always needs Redis
    except EmbeddedRedisError as exc:
        print(f"wscluster up: {exc}", file=sys.stderr)
        for server in started:
            server.cleanup()
        return 1
    procs: list[subprocess.Popen[bytes]] = []
    ids = [new_node_id(f"node{i}") for i in range(1, args.nodes + 1)]
    front: LocalNginx | None = None
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    history = history_rules(args, broker)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        for i in range(1, args.nodes + 1):
            port = args.base_port + i
            cmd = [
                sys.executable, "-m", "wscluster", "serve", *auth_args,
                "--host", args.host, "--port", str(port), "--api-port", str(port + 1000),
                "--broker", broker, "--namespace", args.namespace,
                *(["--presence", presence] if presence else []),
                "--node-name", f"node{i}", "--node-id", ids[i - 1],
                "--log-level", args.log_level,
                *(["--app", args.app] if args.app else []),
                *(a for rule in history for a in ("--history", rule)),
            ]  # fmt: skip
            env = {k: v for k, v in os.environ.items() if k not in _PRINTED_ENV}
            env.update(auth_env)
            procs.append(subprocess.Popen(cmd, preexec_fn=die_with_parent, env=env))
        for i, proc in enumerate(procs, 1):
            health = f"http://{args.host}:{args.base_port + i}/healthz"
            if not _wait_healthy(health, proc, ids[i - 1], 15):
                print(f"wscluster up: node {i} did not become healthy", file=sys.stderr)
                return 1
        if args.nginx:
            upstreams = [f"{args.host}:{args.base_port + i}" for i in range(1, args.nodes + 1)]
            front = LocalNginx(args.host, args.nginx, upstreams, ping_interval=25.0)
            try:
                front.start()
            except (RuntimeError, OSError, ValueError) as exc:
                print(f"wscluster up: --nginx: {exc}", file=sys.stderr)
                return 1
        _banner(args, broker, presence, history)
        reported: set[int] = set()
        while not stopping and any(p.poll() is None for p in procs):
            for i, proc in enumerate(procs, 1):
                if proc.poll() is not None and i not in reported:
                    reported.add(i)
                    print(f"wscluster up: node{i} exited with {proc.returncode}; "
                          "the others keep serving", file=sys.stderr)  # fmt: skip
            time.sleep(0.2)
        return 0 if stopping else 1
    finally:
        if front is not None:
            front.stop()
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for server in started:
            server.cleanup()
        print("wscluster up: stopped", file=sys.stderr)


# what the banner exports for send and status; a node of `up` takes --broker/--presence only
_PRINTED_ENV = frozenset({"WSCLUSTER_BROKER", "WSCLUSTER_PRESENCE", "WSCLUSTER_NAMESPACE"})
DEMO_HISTORY = ("group:*=1000/600s", "uid:*=1000/3600s")


def history_rules(args: argparse.Namespace, broker: str) -> tuple[str, ...]:
    """The nodes' history rules: as given, else the demo's when the broker is Redis."""
    given = tuple(args.history or args.history_env or ())
    if given == ("none",):
        return ()
    if given:
        return given
    return DEMO_HISTORY if broker.startswith(("redis", "unix")) else ()


def _banner(
    args: argparse.Namespace, broker: str, presence: str | None, history: tuple[str, ...]
) -> None:
    exports = [f"export WSCLUSTER_BROKER={shlex.quote(broker)}"]
    if presence:
        exports.append(f"export WSCLUSTER_PRESENCE={shlex.quote(presence)}")
    if args.namespace != "wsc":
        exports.append(f"export WSCLUSTER_NAMESPACE={shlex.quote(args.namespace)}")
    # paths that work without an activated virtual environment
    python = shlex.quote(sys.executable)
    script = os.path.join(os.path.dirname(sys.executable), "wscluster")
    cli = shlex.quote(script) if os.path.exists(script) else "wscluster"
    lines = [f"wscluster is up: {args.nodes} nodes, broker {broker}", ""]
    for i in range(1, args.nodes + 1):
        port = args.base_port + i
        lines.append(f"  node{i}: ws://{args.host}:{port}/ws   page http://{args.host}:{port}/"
                     f"   api http://127.0.0.1:{port + 1000}/api/")  # fmt: skip
    ws = f"ws://{args.host}:{args.base_port + 1}/ws"
    if history:
        lines.append(f"  history: {', '.join(history)} (clients resume what they missed)")
    if args.jwt_secret or args.jwt_public_key:
        try_it = [f"  {python} -m websockets '{ws}?token=<a JWT whose sub is alice>'",
                  "    (clients authenticate with tokens: see docs/auth.md)"]
    else:
        try_it = [f"  {python} -m websockets {ws}"]
    if args.app is not None:  # an application may speak its own protocol
        try_it.append(f"    (application {args.app} on every node)")
    elif not (args.jwt_secret or args.jwt_public_key):
        try_it.append('    then type: {"type": "login", "uid": "alice"}')
    if args.nginx:
        front = f"http://{args.host}:{args.nginx}"
        lines += ["", f"  nginx: {front}/ (any node; WebSockets at /ws), node i pinned at "
                      f"{front}/n/<i>/"]  # fmt: skip
    if not (args.jwt_secret or args.jwt_public_key) and args.app is None:
        pages = [f"http://{args.host}:{args.base_port + i}/" for i in (1, min(2, args.nodes))]
        if args.nginx:
            pages = [f"http://{args.host}:{args.nginx}/n/{i}/" for i in (1, min(2, args.nodes))]
        lines += ["", f"Chat page: open {pages[0]} and {pages[-1]} in two tabs,",
                  "  pick two names, and chat across nodes."]  # fmt: skip
    lines += [
        "",
        "Try it:",
        *try_it,
        "  and in another shell (send and status read WSCLUSTER_BROKER):",
        *(f"  {line}" for line in exports),
        f"  {cli} send --to all '{{\"text\": \"system message\"}}'",
        f"  {cli} send --to uid:alice '{{\"text\": \"hi\"}}'",
        f"  {cli} status",
        "",
        "Ctrl-C stops everything.",
    ]
    print("\n".join(lines), flush=True)
