"""`wscluster nginx-conf` run by a real nginx in front of real nodes: nginx accepts the text
(also inside a copy of the distribution's /etc/nginx), and through it the page, the pinned
paths, /nodes.json, the closed API paths, balancing without stickiness, cross-node delivery,
skipping a full, dead or draining node, rolling restarts without a failed handshake, quiet
and large WebSockets, reload and quit, many WebSockets for an unprivileged nginx, IPv6."""

from __future__ import annotations

import asyncio
import json
import math
import os
import pwd
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import websockets

from tests.conftest import skip_or_fail
from wscluster import nginx
from wscluster.embedded import EmbeddedRedis, free_port

from .conftest import Cluster
from .wsclient import WS

MakeCluster = Callable[..., Cluster]
StartNginx = Callable[..., "Nginx"]


@pytest.fixture
def nginx_bin() -> str:
    found = shutil.which("nginx")
    if found is None and os.path.exists("/usr/sbin/nginx"):  # sbin is not on every PATH
        found = "/usr/sbin/nginx"
    if found is None:
        skip_or_fail("nginx not installed (apt-get install nginx)")
    assert found is not None
    return found


def generate(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "wscluster", "nginx-conf", *args],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout


def nginx_check(nginx: str, prefix: Path) -> None:
    done = subprocess.run(
        [nginx, "-t", "-p", str(prefix), "-c", str(prefix / "nginx.conf")],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "test is successful" in done.stderr


@pytest.mark.parametrize("n", [1, 3])
def test_nginx_accepts_the_config(nginx_bin: str, tmp_path: Path, n: int) -> None:
    ups = [a for p in range(n) for a in ("--upstream", f"127.0.0.1:{18001 + p}")]
    standalone = tmp_path / "standalone"
    standalone.mkdir()
    (standalone / "nginx.conf").write_text(
        generate(*ups, "--standalone", "--listen", "127.0.0.1:18080", "--limit-conn", "10")
    )
    nginx_check(nginx_bin, standalone)
    # the conf.d snippet, inside a minimal http {} as Debian's nginx.conf includes it
    snippet = tmp_path / "snippet"
    (snippet / "conf.d").mkdir(parents=True)
    text = generate(*ups, "--listen", "18081")  # its access log: in the prefix, not /var/log
    (snippet / "conf.d" / "wscluster.conf").write_text(
        text.replace(nginx.DISTRIBUTION_ACCESS_LOG, "access.log")
    )
    (snippet / "nginx.conf").write_text(
        "pid nginx.pid;\nerror_log error.log;\nevents {}\n"
        "http {\n    access_log off;\n    client_body_temp_path body;\n"
        "    proxy_temp_path proxy;\n    fastcgi_temp_path fastcgi;\n"
        "    uwsgi_temp_path uwsgi;\n    scgi_temp_path scgi;\n"
        "    include conf.d/*.conf;\n}\n"
    )
    nginx_check(nginx_bin, snippet)


class Nginx:
    """nginx in the foreground from its own prefix directory, with a generated standalone
    config; ``base`` is ``http://HOST:PORT`` of its first --listen."""

    def __init__(self, binary: str, prefix: Path, proc: subprocess.Popen[bytes], base: str):
        self.binary, self.prefix, self.proc, self.base = binary, prefix, proc, base

    def signal(self, *args: str) -> None:
        """`nginx -s reload|quit|stop` for this instance."""
        done = subprocess.run(
            [self.binary, "-p", str(self.prefix), "-c", str(self.prefix / "nginx.conf"),
             "-s", *args],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr

    def errors(self) -> str:
        return _read(self.prefix / "stderr.log") + _read(self.prefix / "error.log")

    def workers(self) -> dict[int, str]:
        """The master's children: pid -> process title ("nginx: worker process", "… is
        shutting down")."""
        found = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                stat = _read(entry / "stat")
                if stat and int(stat.rsplit(")", 1)[1].split()[1]) == self.proc.pid:
                    found[int(entry.name)] = _read(entry / "cmdline").replace("\0", " ").strip()
        return found

    def reload(self) -> None:
        """`nginx -s reload`, returning once new workers run and the old ones stopped
        accepting."""
        old = set(self.workers())
        self.signal("reload")
        deadline = time.monotonic() + 10
        while True:
            now = self.workers()
            if set(now) - old and all("shutting down" in now[p] for p in old & set(now)):
                return
            assert time.monotonic() < deadline, now
            time.sleep(0.05)


@pytest.fixture
def start_nginx(nginx_bin: str, tmp_path: Path) -> Iterator[StartNginx]:
    """start_nginx(cluster, *options) -> Nginx: the standalone config for the cluster's public
    ports (or ``upstreams``), listening on a free port of 127.0.0.1 (or ``listen``), run in
    the foreground, stopped at the end. ``edit``: {old: new} replacements in the text (each
    old must be there). ``user``: run as that user (from a directory it owns); ``nofile``:
    with that soft open-file limit."""
    procs: list[subprocess.Popen[bytes]] = []
    made: list[str] = []

    def start(
        cluster: Cluster, *options: str, upstreams: list[str] | None = None,
        listen: list[str] | None = None, edit: dict[str, str] | None = None,
        user: str | None = None, nofile: int | None = None,
    ) -> Nginx:  # fmt: skip
        if user is None:
            prefix = tmp_path / f"nginx{len(procs)}"
            prefix.mkdir()
        else:  # pytest's tmp_path is private to its owner
            prefix = Path(tempfile.mkdtemp(prefix="wscluster-nginx-"))
            made.append(str(prefix))
            os.chown(prefix, pwd.getpwnam(user).pw_uid, pwd.getpwnam(user).pw_gid)
        if upstreams is None:
            upstreams = [f"127.0.0.1:{node.port}" for node in cluster.nodes]
        if listen is None:
            listen = [f"127.0.0.1:{free_port()}"]
        args = [a for u in upstreams for a in ("--upstream", u)]
        args += [a for addr in listen for a in ("--listen", addr)]
        conf = generate(*args, "--standalone", *options)
        for old, new in (edit or {}).items():
            assert old in conf, old
            conf = conf.replace(old, new)
        (prefix / "nginx.conf").write_text(conf)
        cmd = [nginx_bin, "-p", str(prefix), "-c", str(prefix / "nginx.conf"),
               "-g", "daemon off;"]  # fmt: skip
        if nofile is not None:
            cmd = ["sh", "-c", f'ulimit -Sn {nofile} && exec "$@"', "sh", *cmd]
        kw: dict[str, Any] = {}
        if user is not None:
            kw = {"user": user, "group": pwd.getpwnam(user).pw_gid, "cwd": str(prefix)}
        log = open(prefix / "stderr.log", "wb")  # handed to the child
        proc = subprocess.Popen(cmd, stdout=log, stderr=log, **kw)
        log.close()
        procs.append(proc)
        host, _, port = listen[0].rpartition(":")
        n = Nginx(nginx_bin, prefix, proc, f"http://{host}:{port}")
        deadline = time.monotonic() + 10
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"nginx exited {proc.returncode}:\n{n.errors()}")
            try:
                socket.create_connection((host.strip("[]"), int(port)), 0.5).close()
                return n
            except OSError:
                assert time.monotonic() < deadline, "nginx not listening within 10 s"
                time.sleep(0.05)

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()  # SIGTERM: fast shutdown of master and workers
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
    for path in made:
        shutil.rmtree(path, ignore_errors=True)


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def ws(base: str, path: str) -> str:
    return base.replace("http://", "ws://", 1) + path


def node_name(w: WS) -> str:
    """`node0`, `node1`: the name tests/cluster/conftest.py gives node i (the id adds `-<hex>`)."""
    return str(w.welcome["node"]).rsplit("-", 1)[0]


async def refused(url: str) -> int:
    with pytest.raises(websockets.InvalidStatus) as info:
        await WS.open(url)
    return info.value.response.status_code


async def test_through_nginx(
    valkey: EmbeddedRedis, make_cluster: MakeCluster, start_nginx: StartNginx, unique: str
) -> None:
    c = make_cluster(valkey.url, 2)
    base = start_nginx(c).base
    async with aiohttp.ClientSession() as http:
        for path in ("/", "/n/1/", "/n/2/"):
            async with http.get(base + path) as r:
                assert r.status == 200, path
                assert r.headers["Content-Type"].startswith("text/html"), path
                assert "<html" in (await r.text()).lower(), path
        async with http.get(base + "/n/1") as r:  # the bare prefix: redirected to /n/1/
            assert r.status == 200 and r.url.path == "/n/1/"
        async with http.get(base + "/healthz") as r:
            assert r.status == 200 and (await r.json())["ok"] is True
        async with http.get(base + "/nodes.json") as r:
            assert r.status == 200
            assert r.headers["Content-Type"] == "application/json"
            assert await r.read() == json.dumps({"nodes": [
                {"label": "node 1", "path": "/n/1/"}, {"label": "node 2", "path": "/n/2/"},
            ]}).encode()  # fmt: skip
        async with http.post(base + "/api/send", json={"to": "all", "data": 1}) as r:
            assert r.status == 404
        for path in ("/api/stats", "/metrics"):
            async with http.get(base + path) as r:
                assert r.status == 404, path

    # pinned: /n/<i>/ws is node i (in --upstream order), the prefix stripped
    a = await WS.open(ws(base, "/n/1/ws"))
    b = await WS.open(ws(base, "/n/2/ws"))
    assert (node_name(a), node_name(b)) == ("node0", "node1")
    # a message from a client on node 1 to one on node 2, both through nginx
    await a.ok({"type": "login", "uid": f"alice{unique}", "id": 1})
    await b.ok({"type": "login", "uid": f"bob{unique}", "id": 1})
    await a.ok({"type": "send", "to": f"uid:bob{unique}", "data": {"hi": unique}, "id": 2})
    msg = await b.next(type="message")
    assert msg["data"] == {"hi": unique} and msg["from"]["uid"] == f"alice{unique}"

    # /ws: spread over both nodes, no stickiness for one client address
    spread = [await WS.open(ws(base, "/ws")) for _ in range(6)]
    seen = [node_name(w) for w in spread]
    assert set(seen) == {"node0", "node1"}, seen
    for w in (a, b, *spread):
        await w.close()


async def test_full_node_is_skipped(
    valkey: EmbeddedRedis, make_cluster: MakeCluster, start_nginx: StartNginx
) -> None:
    c = make_cluster(valkey.url, 2)
    full = c.nodes[0]
    full.args = [*full.args, "--max-connections", "1"]  # node 1 of nginx: room for one
    c.restart(0)
    base = start_nginx(c).base
    held = await WS.open(ws(base, "/n/1/ws"))
    assert node_name(held) == "node0"
    assert await refused(full.ws_url) == 503  # really full
    assert await refused(ws(base, "/n/1/ws")) == 503  # pinned: no retry elsewhere
    # least_conn sends some handshakes to the full node first: its 503 moves them on
    others = [await WS.open(ws(base, "/ws")) for _ in range(6)]
    assert {node_name(w) for w in others} == {"node1"}
    for w in (held, *others):
        await w.close()


async def test_dead_node_is_skipped(
    valkey: EmbeddedRedis, make_cluster: MakeCluster, start_nginx: StartNginx
) -> None:
    c = make_cluster(valkey.url, 2)
    base = start_nginx(c, "--limit-conn", "4").base
    c.kill(0)  # SIGKILL
    conns = [await WS.open(ws(base, "/ws")) for _ in range(4)]
    assert {node_name(w) for w in conns} == {"node1"}
    assert await refused(ws(base, "/ws")) == 429  # --limit-conn: 4 per client address
    await conns.pop().close()
    await asyncio.sleep(0.1)  # nginx sees the close
    # pinned to the dead node: a 502, so the page falls back to /ws
    assert await refused(ws(base, "/n/1/ws")) == 502
    async with aiohttp.ClientSession() as http, http.get(base + "/n/1/") as r:
        assert r.status == 502
    async with aiohttp.ClientSession() as http, http.get(base + "/") as r:
        assert r.status == 200
    second = await WS.open(ws(base, "/n/2/ws"))
    assert node_name(second) == "node1"
    for w in (*conns, second):
        await w.close()


async def handshake(url: str) -> str:
    """One handshake: the node that welcomed it (`node0`…), else `HTTP <status>` or the error."""
    try:
        async with websockets.connect(url, open_timeout=10, compression=None) as conn:
            welcome = json.loads(await asyncio.wait_for(conn.recv(), 5))
            return str(welcome["node"]).rsplit("-", 1)[0]
    except websockets.InvalidStatus as exc:
        return f"HTTP {exc.response.status_code}"
    except Exception as exc:  # refused, reset, timed out: all failures here
        return type(exc).__name__


async def spread(url: str, nodes: set[str], tries: int = 40) -> list[str]:
    """Handshakes (each closed at once) until every one of ``nodes`` welcomed one; all the
    outcomes, failures included."""
    seen: list[str] = []
    while not nodes <= set(seen) and len(seen) < tries:
        seen.append(await handshake(url))
    return seen


async def test_drain_moves_clients_to_other_nodes(
    valkey: EmbeddedRedis, make_cluster: MakeCluster, start_nginx: StartNginx
) -> None:
    """SIGTERM a node with clients that came through nginx: during its drain every new /ws
    handshake lands on another node (none fails), and its clients, closed with 1012,
    reconnect through /ws to another node."""
    c = make_cluster(valkey.url, 2, ["--drain-timeout", "40"])
    base = start_nginx(c).base
    clients = [await WS.open(ws(base, "/ws")) for _ in range(6)]
    drained = [w for w in clients if node_name(w) == "node0"]
    assert len(drained) == 3  # least_conn alternates
    # Ballast, straight to node0 and opened after the nginx clients: the drain closes 500
    # connections a step, (drain timeout / 2) / 2 = 10 s apart, so node0 stays up (and
    # refuses handshakes with 503) for 10 s after its first 1012s.
    sem = asyncio.Semaphore(50)

    async def ballast() -> Any:
        async with sem:
            conn = await websockets.connect(c.nodes[0].ws_url, compression=None)
            await conn.recv()
            return conn

    extra = await asyncio.gather(*(ballast() for _ in range(500)))
    c.nodes[0].proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
    codes = []
    for w in drained:
        with pytest.raises(websockets.ConnectionClosed):
            await w.next(timeout=5)
        codes.append(w.conn.close_code)
    assert codes == [1012] * 3
    async with aiohttp.ClientSession() as http, http.get(c.nodes[0].http_url + "/healthz") as r:
        assert r.status == 503 and (await r.json())["reason"] == "draining"
    # the drained clients come back through /ws, and so do new ones, all on node1
    back = [await WS.open(ws(base, "/ws")) for _ in drained]
    assert {node_name(w) for w in back} == {"node1"}
    seen = await asyncio.gather(*(handshake(ws(base, "/ws")) for _ in range(30)))
    assert Counter(seen) == {"node1": 30}
    assert c.nodes[0].proc.poll() is None  # all of it during node0's drain  # type: ignore[union-attr]
    c.kill(0)  # the rest of the ballast closes at once
    for conn in extra:
        await conn.close()


async def test_rolling_restart_loses_no_handshake(
    valkey: EmbeddedRedis, make_cluster: MakeCluster, start_nginx: StartNginx
) -> None:
    """docs/deployment.md's rolling restart (SIGTERM, start, wait for /healthz, next node) on
    two nodes under a steady stream of /ws handshakes: none fails. With max_fails=3
    fail_timeout=10s and no backups, nginx still rested the restarted node when the other
    one went down, and answered 502 "no live upstreams" for ~8 s with both nodes up."""
    c = make_cluster(valkey.url, 2)
    base = start_nginx(c).base
    results: list[tuple[float, str]] = []
    stop = asyncio.Event()

    async def client() -> None:
        while not stop.is_set():
            results.append((time.monotonic(), await handshake(ws(base, "/ws"))))
            await asyncio.sleep(0.02)

    clients = [asyncio.create_task(client()) for _ in range(3)]
    await asyncio.sleep(0.5)
    for node in c.nodes:
        assert await asyncio.to_thread(node.terminate) == 0
        await asyncio.to_thread(node.start)  # back and healthy
    # and nginx uses the node restarted last again, within its rest (fail_timeout)
    back = time.monotonic()
    deadline = back + nginx.FAIL_TIMEOUT + 3

    def since_back() -> set[str]:
        return {r for t, r in results if t > back}

    while time.monotonic() < deadline and since_back() != {"node0", "node1"}:
        await asyncio.sleep(0.1)
    stop.set()
    await asyncio.gather(*clients)
    outcomes = Counter(r for _, r in results)
    assert set(outcomes) == {"node0", "node1"}, outcomes
    assert since_back() == {"node0", "node1"}, outcomes


async def test_quiet_websocket_outlives_the_read_timeout(
    valkey: EmbeddedRedis, make_cluster: MakeCluster, start_nginx: StartNginx
) -> None:
    """The nodes' pings keep a quiet WebSocket open through nginx for longer than
    proxy_read_timeout (cut to 2 s here to make it quick; the generated value, 3 ping
    intervals or more, is checked in tests/unit): node0 pings every 0.5 s, node1 (30 s)
    does not ping in time, and nginx cuts its quiet connection."""
    c = make_cluster(valkey.url, 2, ["--ping-interval", "0.5"])
    slow = c.nodes[1]
    slow.args = [*slow.args, "--ping-interval", "30"]
    c.restart(1)
    timeout = f"{max(60, math.ceil(3 * 0.5))}s;"
    n = start_nginx(c, "--ping-interval", "0.5", edit={
        f"proxy_read_timeout {timeout}": "proxy_read_timeout 2s;",
        f"proxy_send_timeout {timeout}": "proxy_send_timeout 2s;",
    })  # fmt: skip
    pinged = await WS.open(ws(n.base, "/n/1/ws"), ping_interval=None)
    unpinged = await WS.open(ws(n.base, "/n/2/ws"), ping_interval=None)
    await asyncio.sleep(5)  # quiet: no frame from either client
    await pinged.ok({"type": "ping"})
    with pytest.raises(websockets.ConnectionClosed):
        await unpinged.ok({"type": "ping"})


async def test_large_messages_through_nginx(
    valkey: EmbeddedRedis, make_cluster: MakeCluster, start_nginx: StartNginx, unique: str
) -> None:
    """Frames up to the nodes' frame limit (raised to 1 MiB here) pass through nginx whole
    (client_max_body_size 1k is for request bodies, not for an upgraded connection), and a
    bigger one is closed 1009 by the node, through nginx."""
    c = make_cluster(
        valkey.url, 2, ["--max-message-size", "1040000", "--max-frame-size", "1048576"]
    )
    base = start_nginx(c).base
    a = await WS.open(ws(base, "/ws"), uid=f"a{unique}")
    b = await WS.open(ws(base, "/ws"), uid=f"b{unique}")
    assert node_name(a) != node_name(b)
    for size in (65 * 1024, 1_000_000):
        data = unique * (size // len(unique))
        await a.ok({"type": "send", "to": f"uid:b{unique}", "data": data})
        assert (await b.next(type="message"))["data"] == data
    await a.send_raw(json.dumps({"type": "ping", "data": "x" * (1 << 20)}))
    with pytest.raises(websockets.ConnectionClosed):
        await a.next(timeout=5)
    assert a.conn.close_code == 1009
    await b.ok({"type": "ping"})


async def test_reload_and_quit_end_old_websockets(
    valkey: EmbeddedRedis, make_cluster: MakeCluster, start_nginx: StartNginx
) -> None:
    """`nginx -s reload`: the old worker keeps its WebSockets working, new ones go to the new
    workers, and the old ones are closed after worker_shutdown_timeout (10 s generated, 2 s
    here); `-s quit` ends nginx within it too. Without it, a quit never ended while a
    WebSocket stayed open, and every reload left a worker behind for good."""
    c = make_cluster(valkey.url, 1)
    n = start_nginx(c, edit={
        f"worker_shutdown_timeout {nginx.WORKER_SHUTDOWN_TIMEOUT}s;": "worker_shutdown_timeout 2s;"
    })  # fmt: skip
    old = await WS.open(ws(n.base, "/ws"))
    n.reload()
    await old.ok({"type": "ping"})  # still served by the old worker
    new = await WS.open(ws(n.base, "/ws"))
    with pytest.raises(websockets.ConnectionClosed):
        await old.next(timeout=2 + 3)
    await new.ok({"type": "ping"})
    n.signal("quit")
    await asyncio.to_thread(n.proc.wait, 2 + 5)
    with pytest.raises(websockets.ConnectionClosed):
        await new.next(timeout=1)


async def test_unprivileged_standalone_holds_many_websockets(
    valkey: EmbeddedRedis, make_cluster: MakeCluster, start_nginx: StartNginx
) -> None:
    """--standalone run by an ordinary user (nobody, when the tests run as root) from a
    directory it owns, with a low soft open-file limit (most users have 1024; 256 here, one
    worker): 400 WebSockets (800 descriptors) through it all work, thanks to
    worker_rlimit_nofile. Before, the worker ran out of descriptors (accept4: Too many open
    files) at about the soft limit / 2 clients."""
    user = "nobody" if os.geteuid() == 0 else None
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < nginx.WORKER_RLIMIT_NOFILE:
        skip_or_fail(f"hard open-file limit {hard} < worker_rlimit_nofile")
    c = make_cluster(valkey.url, 2)
    n = start_nginx(c, user=user, nofile=256,
                    edit={"worker_processes auto;": "worker_processes 1;"})  # fmt: skip
    sem = asyncio.Semaphore(50)

    async def one() -> Any:
        async with sem:
            conn = await websockets.connect(ws(n.base, "/ws"), open_timeout=5, compression=None)
            await asyncio.wait_for(conn.recv(), 5)
            return conn

    conns = await asyncio.gather(*(one() for _ in range(400)), return_exceptions=True)
    failed = [x for x in conns if isinstance(x, BaseException)]
    assert not failed, (len(failed), failed[:3], n.errors()[-2000:])
    for conn in conns:
        await conn.close()
    if user is not None:
        assert (n.prefix / "nginx.pid").stat().st_uid == pwd.getpwnam(user).pw_uid


TRICKY_PATHS = [
    "/api", "/API/", "/api/stats", "/api%2fstats", "/metrics", "/metrics/", "/Metrics",
    "/n/1/api/send", "/n/1/api/stats", "/n/1/metrics", "/n/1/../api/send", "/n/1/./api/stats",
    "/n/1/%2e%2e/api/stats", "/n/1%2f..%2fapi%2fstats", "/n/1/..%2fapi/stats", "/n/01/ws",
    "/n/3/ws", "/ws/../api/stats", "/n/1//api/stats", "/%2e%2e/api/stats", "/n/1/%61pi/stats",
]  # fmt: skip


async def test_no_api_through_nginx(
    valkey: EmbeddedRedis, make_cluster: MakeCluster, start_nginx: StartNginx
) -> None:
    """Tricky paths reach no API: nginx answers 404 (or 400) itself, or a node's public port
    does (it has no /api/), for GET and POST. Sent as written (no client normalization)."""
    c = make_cluster(valkey.url, 2)
    host, port = start_nginx(c).base.removeprefix("http://").split(":")
    answers = {}
    for method in ("GET", "POST"):
        for path in TRICKY_PATHS:
            reader, writer = await asyncio.open_connection(host, int(port))
            body = '{"to": "all", "data": 1}' if method == "POST" else ""
            writer.write(f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                         f"Content-Length: {len(body)}\r\n\r\n{body}".encode())  # fmt: skip
            answers[method, path] = (await reader.readline()).decode().split()[1]
            writer.close()
    # a node's public port answers 405 to a POST that is not the WebSocket path
    wrong = {k: v for k, v in answers.items() if v not in ("404", "400", "405")}
    assert not wrong, wrong


async def test_forwarded_headers_are_nginx_s(
    start_nginx: StartNginx, make_cluster: MakeCluster, valkey: EmbeddedRedis
) -> None:
    """What a node sees behind nginx: X-Forwarded-For and X-Real-IP are the client's address
    whatever the client sent (a node takes X-Forwarded-For as the peer); Host is the client's,
    harmless (the nodes do not use it). An upstream that records the request stands in for
    the node."""
    seen: list[bytes] = []

    async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(record, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    c = make_cluster(valkey.url, 1)
    base = start_nginx(c, upstreams=[f"127.0.0.1:{port}"]).base
    spoof = {"X-Forwarded-For": "6.6.6.6", "X-Real-IP": "6.6.6.6", "Host": "evil.example"}
    async with aiohttp.ClientSession() as http:
        for path in ("/", "/n/1/chat.js"):
            async with http.get(base + path, headers=spoof) as r:
                assert r.status == 200
    server.close()
    for request in seen:
        headers = [line.split(b": ", 1) for line in request.split(b"\r\n")[1:] if line]
        by_name = {k.decode().lower(): v.decode() for k, v in headers}
        assert [k for k, _ in headers].count(b"X-Forwarded-For") == 1
        assert by_name["x-forwarded-for"] == by_name["x-real-ip"] == "127.0.0.1"
        assert by_name["host"] == "evil.example"
    assert [r.split(b" ")[1] for r in seen] == [b"/", b"/chat.js"]


async def test_ipv6(
    valkey: EmbeddedRedis, make_cluster: MakeCluster, start_nginx: StartNginx
) -> None:
    """An IPv6 upstream ([::1]:PORT) and --listen on both 127.0.0.1 and [::1]."""
    try:
        socket.create_server(("::1", 0), family=socket.AF_INET6).close()
    except OSError:
        skip_or_fail("no IPv6 loopback")
    c = make_cluster(valkey.url, 2)
    v6 = c.nodes[0]
    v6.args = [*v6.args, "--host", "::1"]  # the last --host wins
    v6.kill()
    v6.start(wait=False)
    deadline = time.monotonic() + 20
    async with aiohttp.ClientSession() as http:
        while True:
            try:
                async with http.get(f"http://[::1]:{v6.port}/healthz") as r:
                    if r.status == 200:
                        break
            except aiohttp.ClientError:
                pass
            assert time.monotonic() < deadline, v6.log()
            await asyncio.sleep(0.1)
    port = free_port()
    n = start_nginx(
        c, upstreams=[f"[::1]:{v6.port}", f"127.0.0.1:{c.nodes[1].port}"],
        listen=[f"127.0.0.1:{port}", f"[::1]:{port}"],
    )  # fmt: skip
    v4 = await WS.open(f"ws://127.0.0.1:{port}/n/1/ws")
    assert node_name(v4) == "node0"
    seen = await spread(f"ws://[::1]:{port}/ws", {"node0", "node1"})
    assert set(seen) == {"node0", "node1"}, seen
    await v4.close()
    assert n.proc.poll() is None


def test_snippet_in_the_distribution_nginx_conf(nginx_bin: str, tmp_path: Path) -> None:
    """The conf.d snippet inside a copy of the distribution's /etc/nginx (its nginx.conf
    unchanged but for absolute paths), Debian's default site removed as docs/deployment.md
    says; then with the main-context settings the snippet's header recommends."""
    if not Path("/etc/nginx/nginx.conf").is_file():
        skip_or_fail("no /etc/nginx/nginx.conf")
    etc = tmp_path / "etc-nginx"
    shutil.copytree("/etc/nginx", etc, symlinks=True)
    text = (etc / "nginx.conf").read_text()
    text = text.replace("/etc/nginx", str(etc)).replace("/var/log/nginx", str(tmp_path))
    text = "\n".join(
        f"pid {tmp_path}/nginx.pid;" if line.strip().startswith("pid ") else line
        for line in text.splitlines()
    )
    (etc / "nginx.conf").write_text(text)
    default = etc / "sites-enabled" / "default"
    if default.is_symlink() or default.exists():
        default.unlink()
    ups = ["--upstream", "127.0.0.1:8001", "--upstream", "127.0.0.1:8002"]
    snippet = generate(*ups, "--listen", "18082", "--listen", "[::]:18082")
    (etc / "conf.d").mkdir(exist_ok=True)
    (etc / "conf.d" / "wscluster.conf").write_text(snippet.replace("/var/log/nginx", str(tmp_path)))

    def check() -> None:
        done = subprocess.run(
            [nginx_bin, "-t", "-p", str(etc), "-c", str(etc / "nginx.conf"),
             "-e", str(tmp_path / "error.log")],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        warnings = [w for w in done.stderr.splitlines() if "[warn]" in w and '"user"' not in w]
        assert not warnings, done.stderr

    check()
    # the header's advice, applied as it says
    advice = [line.removeprefix("#").strip() for line in snippet.splitlines()[:14]]
    top = next(line for line in advice if line.startswith("worker_rlimit_nofile"))
    events = next(line for line in advice if line.startswith("events {"))
    conns = events.removeprefix("events {").removesuffix("}").strip()
    text = (etc / "nginx.conf").read_text()
    lines = []
    for line in text.splitlines():
        if line.strip().startswith("worker_connections"):
            line = f"\t{conns}"
        lines.append(line)
        if line.strip().startswith("worker_processes"):
            lines.append(top.split("(")[0].strip())
    (etc / "nginx.conf").write_text("\n".join(lines) + "\n")
    assert "worker_rlimit_nofile" in (etc / "nginx.conf").read_text()
    check()


async def test_many_nodes(
    valkey: EmbeddedRedis, make_cluster: MakeCluster, start_nginx: StartNginx
) -> None:
    """400 upstreams (two real nodes, then closed ports): nginx accepts and runs the text (it
    refused it from about 65 nodes: upstream zone full, about 32 once every node is listed
    twice; from about 105: a word longer than its buffer), serves the whole /nodes.json, and
    balances over the live nodes."""
    c = make_cluster(valkey.url, 2)
    closed = [free_port() for _ in range(398)]  # nothing listens there (anymore)
    ups = [f"127.0.0.1:{node.port}" for node in c.nodes] + [f"127.0.0.1:{p}" for p in closed]
    n = start_nginx(c, upstreams=ups)
    async with aiohttp.ClientSession() as http, http.get(n.base + "/nodes.json") as r:
        assert r.status == 200
        assert await r.text() == nginx.nodes_json(400)
    seen = await spread(ws(n.base, "/ws"), {"node0", "node1"})
    assert set(seen) == {"node0", "node1"}, seen
    assert node_name(await WS.open(ws(n.base, "/n/2/ws"))) == "node1"
