"""The public port's page files and /nodes.json, served by real node processes."""

from __future__ import annotations

import asyncio
import json
import re
import urllib.error
import urllib.request
from email.message import Message
from pathlib import Path

import pytest

from .conftest import Cluster

ROOT = Path(__file__).resolve().parents[2]


def get(url: str) -> tuple[int, str, bytes]:
    status, headers, body = get_full(url)
    return status, headers.get("Content-Type", ""), body


def get_full(url: str) -> tuple[int, Message, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers, err.read()


@pytest.mark.parametrize(
    ("path", "ctype", "source"),
    [
        ("/", "text/html", "src/wscluster/static/index.html"),
        ("/index.html", "text/html", "src/wscluster/static/index.html"),
        ("/chat.js", "text/javascript", "src/wscluster/static/chat.js"),
        ("/chat.css", "text/css", "src/wscluster/static/chat.css"),
        ("/view.js", "text/javascript", "src/wscluster/static/view.js"),
        ("/nodes.js", "text/javascript", "src/wscluster/static/nodes.js"),
        ("/rooms.js", "text/javascript", "src/wscluster/static/rooms.js"),
        ("/store.js", "text/javascript", "src/wscluster/static/store.js"),
        ("/wscluster.js", "text/javascript", "clients/js/wscluster.js"),
        *(
            (f"/wscluster-{m}.js", "text/javascript", f"clients/js/wscluster-{m}.js")
            for m in ("backoff", "connection", "errors", "events", "streams")
        ),
    ],
)
def test_page_files(cluster: Cluster, path: str, ctype: str, source: str) -> None:
    status, got_type, body = get(cluster.nodes[0].http_url + path)
    assert status == 200
    assert got_type.startswith(ctype)
    assert body == (ROOT / source).read_bytes()  # the page's client is the published one


def test_every_module_the_page_imports_is_served(cluster: Cluster) -> None:
    """Each `from "./x.js"` of a served module is served too (the client's modules included),
    so nothing the browser loads is a 404."""
    seen: set[str] = set()
    todo = ["/chat.js"]
    while todo:
        path = todo.pop()
        seen.add(path)
        status, ctype, body = get(cluster.nodes[0].http_url + path)
        assert status == 200 and ctype.startswith("text/javascript"), path
        for name in re.findall(r'from "\./([\w-]+\.js)"', body.decode()):
            if f"/{name}" not in seen:
                todo.append(f"/{name}")
    assert {"/wscluster.js", "/wscluster-streams.js", "/store.js", "/rooms.js"} <= seen, seen


def test_page_is_locked_down(cluster: Cluster) -> None:
    """Defence in depth: even if text from another user were ever parsed as HTML, the
    browser would run no script but the page's own files, and nothing could frame it."""
    status, headers, _ = get_full(cluster.nodes[0].http_url + "/")
    assert status == 200
    csp = headers["Content-Security-Policy"]
    assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert headers["X-Content-Type-Options"] == "nosniff"


def test_unknown_paths_are_404(cluster: Cluster) -> None:
    for path in ("/nope", "/static/chat.js", "/../pyproject.toml", "/api/send", "/ws/x"):
        status, _, _ = get(cluster.nodes[1].http_url + path)
        assert status == 404, path


async def test_nodes_json_lists_the_live_nodes(cluster: Cluster) -> None:
    want = {n.port for n in cluster.nodes}
    url = cluster.nodes[2].http_url + "/nodes.json"
    body: dict[str, object] = {}
    for _ in range(100):  # the list is re-read in the background at most every 2 s
        status, ctype, raw = await asyncio.to_thread(get, url)
        assert status == 200 and ctype.startswith("application/json")
        body = json.loads(raw)
        entries = body["nodes"]
        assert isinstance(entries, list)
        if {e["port"] for e in entries} == want:
            break
        await asyncio.sleep(0.1)
    entries = body["nodes"]
    assert isinstance(entries, list)
    assert {e["port"] for e in entries} == want, body
    assert str(body["self"]).startswith("node2-")
    assert sorted(e["node"] for e in entries) == [e["node"] for e in entries]
    assert all(e["label"] == e["node"] for e in entries)
