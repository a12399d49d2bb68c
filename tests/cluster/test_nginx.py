"""`wscluster nginx-conf` run by a real nginx in front of real nodes: nginx accepts the text,
and through it the page, the pinned paths, /nodes.json, the closed API paths, balancing
without stickiness, cross-node delivery, and skipping a full or dead node all work."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp
import pytest
import websockets

from tests.conftest import skip_or_fail
from wscluster.embedded import EmbeddedRedis, free_port

from .conftest import Cluster
from .wsclient import WS

MakeCluster = Callable[..., Cluster]
StartNginx = Callable[..., str]


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
    (snippet / "conf.d" / "wscluster.conf").write_text(generate(*ups, "--listen", "18081"))
    (snippet / "nginx.conf").write_text(
        "pid nginx.pid;\nerror_log error.log;\nevents {}\n"
        "http {\n    access_log off;\n    client_body_temp_path body;\n"
        "    proxy_temp_path proxy;\n    fastcgi_temp_path fastcgi;\n"
        "    uwsgi_temp_path uwsgi;\n    scgi_temp_path scgi;\n"
        "    include conf.d/*.conf;\n}\n"
    )
    nginx_check(nginx_bin, snippet)


@pytest.fixture
def start_nginx(nginx_bin: str, tmp_path: Path) -> Iterator[StartNginx]:
    """start_nginx(cluster, *options) -> http://127.0.0.1:<port>: the standalone config for the
    cluster's public ports, run in the foreground from tmp_path, stopped at the end."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(cluster: Cluster, *options: str) -> str:
        port = free_port()
        prefix = tmp_path / f"nginx{len(procs)}"
        prefix.mkdir()
        ups = [a for node in cluster.nodes for a in ("--upstream", f"127.0.0.1:{node.port}")]
        conf = generate(*ups, "--standalone", "--listen", f"127.0.0.1:{port}", *options)
        (prefix / "nginx.conf").write_text(conf)
        log = open(prefix / "stderr.log", "wb")  # handed to the child
        proc = subprocess.Popen(
            [nginx_bin, "-p", str(prefix), "-c", str(prefix / "nginx.conf"),
             "-g", "daemon off;"],
            stdout=log, stderr=log,
        )  # fmt: skip
        log.close()
        procs.append(proc)
        deadline = time.monotonic() + 10
        while True:
            if proc.poll() is not None:
                errors = (prefix / "stderr.log").read_text() + _read(prefix / "error.log")
                raise RuntimeError(f"nginx exited {proc.returncode}:\n{errors}")
            try:
                socket.create_connection(("127.0.0.1", port), 0.5).close()
                return f"http://127.0.0.1:{port}"
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
    base = start_nginx(c)
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
    base = start_nginx(c)
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
    base = start_nginx(c, "--limit-conn", "4")
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
