"""A real nginx with either generated configuration logs every request without its query
string: a client that still sends ``?token=<JWT>`` leaves no token in the access log (the
conf.d snippet overrides the host's "combined" format, which logs ``$request``)."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp

from wscluster.embedded import EmbeddedRedis, free_port

from .conftest import Cluster
from .test_nginx import StartNginx, generate, nginx_bin, start_nginx  # noqa: F401  (fixtures)
from .wsclient import WS

MakeCluster = Callable[..., Cluster]
SECRET = "s3cr3t-t0k3n-in-the-query"


async def _traffic(base: str) -> None:
    """The page, a plain GET of /ws and WebSockets at /ws and /n/1/ws, each with ?token=."""
    ws_base = base.replace("http://", "ws://", 1)
    async with aiohttp.ClientSession() as http:
        for path in ("/", "/ws", "/n/1/"):
            async with http.get(f"{base}{path}?token={SECRET}&x=1") as r:
                await r.read()
    for path in ("/ws", "/n/1/ws"):
        w = await WS.open(f"{ws_base}{path}?token={SECRET}")
        await w.close()


def _logged(path: Path, lines: int) -> str:
    """The log once it has at least ``lines`` lines (a WebSocket is logged when it ends)."""
    deadline = time.monotonic() + 10
    while True:
        text = path.read_text() if path.exists() else ""
        if len(text.splitlines()) >= lines or time.monotonic() > deadline:
            return text
        time.sleep(0.05)


def _check(text: str) -> None:
    assert len(text.splitlines()) >= 5, text
    assert SECRET not in text and "token" not in text, text
    assert '"GET /ws HTTP/1.1" 101' in text, text
    assert '"GET /n/1/ws HTTP/1.1" 101' in text, text
    assert '"GET / HTTP/1.1" 200' in text, text


def _run(nginx: str, prefix: Path) -> subprocess.Popen[bytes]:
    cmd = [nginx, "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-g", "daemon off;"]
    with open(prefix / "stderr.log", "wb") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=log)


async def test_standalone_access_log_has_no_query(
    valkey: EmbeddedRedis, make_cluster: MakeCluster, start_nginx: StartNginx  # noqa: F811
) -> None:
    c = make_cluster(valkey.url, 1)
    n = start_nginx(c)
    await _traffic(n.base)
    _check(_logged(n.prefix / "access.log", 5))


async def test_conf_d_access_log_has_no_query(
    valkey: EmbeddedRedis, make_cluster: MakeCluster, nginx_bin: str, tmp_path: Path  # noqa: F811
) -> None:
    """The snippet inside an http {} that logs in "combined" (as Debian's does): the server's
    own access_log replaces it, so nothing of ours reaches the host's log."""
    c = make_cluster(valkey.url, 1)
    port = free_port()
    prefix = tmp_path / "confd"
    (prefix / "conf.d").mkdir(parents=True)
    snippet = generate("--upstream", f"127.0.0.1:{c.nodes[0].port}",
                       "--listen", f"127.0.0.1:{port}")  # fmt: skip
    assert "/var/log/nginx/access.log" in snippet
    ours = prefix / "ours.log"
    (prefix / "conf.d" / "wscluster.conf").write_text(
        snippet.replace("/var/log/nginx/access.log", str(ours))
    )
    (prefix / "nginx.conf").write_text(
        "pid nginx.pid;\nerror_log error.log;\nevents {}\n"
        "http {\n    access_log host.log combined;\n    client_body_temp_path body;\n"
        "    proxy_temp_path proxy;\n    fastcgi_temp_path fastcgi;\n"
        "    uwsgi_temp_path uwsgi;\n    scgi_temp_path scgi;\n"
        "    include conf.d/*.conf;\n}\n"
    )
    proc = _run(nginx_bin, prefix)
    try:
        deadline = time.monotonic() + 10
        while True:
            assert proc.poll() is None, (prefix / "stderr.log").read_text()
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                break
            except OSError:
                assert time.monotonic() < deadline, "nginx not listening within 10 s"
                await asyncio.sleep(0.05)
        await _traffic(f"http://127.0.0.1:{port}")
        _check(_logged(ours, 5))
        host = prefix / "host.log"
        assert not host.exists() or SECRET not in host.read_text()
    finally:
        proc.terminate()
        proc.wait(10)
