"""`wscluster nginx-conf`: the generated text parsed as nginx reads it (directives and blocks),
then every requirement checked on the parse, for 1 and 3 upstreams; options via the CLI.
(nginx itself checks and runs the text in tests/cluster/test_nginx.py.)"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass

import pytest

from wscluster.cli import main
from wscluster.nginx import NginxOptions, parse_upstream, render

PORTS = (8001, 8002, 8003)


@dataclass
class D:
    """One nginx directive: its name, its arguments (quotes removed), its block if any."""

    name: str
    args: list[str]
    block: list[D] | None = None

    def all(self, name: str) -> list[D]:
        return [d for d in self.block or [] if d.name == name]

    def one(self, name: str) -> D:
        found = self.all(name)
        assert len(found) == 1, f"{name}: {len(found)} in {self.name} {self.args}"
        return found[0]

    def has(self, name: str, *args: str) -> bool:
        return any(d.args == list(args) for d in self.all(name))

    def walk(self) -> list[D]:
        out = []
        for d in self.block or []:
            out.append(d)
            out += d.walk()
        return out


_TOKEN = re.compile(
    r"""\s+|#[^\n]*|'((?:[^'\\]|\\.)*)'|"((?:[^"\\]|\\.)*)"|([{};])|([^\s{};'"#]+)"""
)


def parse(text: str) -> D:
    """nginx's configuration syntax: words and quoted strings, `;` ends a directive,
    `{ … }` its block, `#` starts a comment (outside quotes)."""
    root = D("<root>", [], [])
    stack = [root]
    words: list[str] = []
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        assert m, f"cannot tokenize at {text[pos:pos + 40]!r}"
        pos = m.end()
        single, double, punct, word = m.groups()
        if single is not None or double is not None:
            words.append(single if single is not None else double)
        elif word is not None:
            words.append(word)
        elif punct == ";":
            assert words, "empty directive"
            block = stack[-1].block
            assert block is not None
            block.append(D(words[0], words[1:]))
            words = []
        elif punct == "{":
            d = D(words[0], words[1:], [])
            block = stack[-1].block
            assert block is not None
            block.append(d)
            stack.append(d)
            words = []
        elif punct == "}":
            assert not words and len(stack) > 1, "unbalanced }"
            stack.pop()
    assert not words and len(stack) == 1, "unterminated directive or block"
    return root


def conf(n: int = 3, **kw: object) -> tuple[str, D, D]:
    """(text, http context, server block) of the generated configuration."""
    ups = tuple(parse_upstream(f"127.0.0.1:{p}") for p in PORTS[:n])
    text = render(NginxOptions(ups, **kw))  # type: ignore[arg-type]
    root = parse(text)
    http = root.one("http") if kw.get("standalone") else root
    return text, http, http.one("server")


def locations(server: D) -> dict[str, D]:
    return {" ".join(d.args): d for d in server.all("location")}


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "wscluster", "nginx-conf", *args],
        capture_output=True, text=True, timeout=30, env={**os.environ, **(env or {})},
    )  # fmt: skip


@pytest.mark.parametrize("standalone", [False, True])
@pytest.mark.parametrize("n", [1, 3])
def test_requirements(n: int, standalone: bool) -> None:
    text, http, server = conf(n, standalone=standalone)
    upstreams = [f"127.0.0.1:{p}" for p in PORTS[:n]]

    # a comment header saying what it is and how to install or run it
    head = text.splitlines()[:12]
    assert all(line.startswith("#") for line in head[:3])
    assert "wscluster" in head[0] and "--upstream 127.0.0.1:8001" in "\n".join(head)
    how = "nginx -p DIR -c DIR/nginx.conf" if standalone else "/etc/nginx/conf.d/wscluster.conf"
    assert how in "\n".join(head)

    # the Connection header comes from a map on $http_upgrade: upgrade, or close when absent
    (m,) = http.all("map")
    assert m.args[0] == "$http_upgrade"
    conn_var = m.args[1]
    assert m.has("default", "upgrade") and m.has("", "close")

    # one group, every node in order, no stickiness, sane failure accounting
    group = http.one("upstream")
    assert group.args == ["wscluster"]
    servers = group.all("server")
    assert [s.args[0] for s in servers] == upstreams
    for s in servers:
        opts = dict(a.split("=", 1) for a in s.args[1:])
        assert 1 <= int(opts["max_fails"]) <= 5
        assert opts["fail_timeout"].endswith("s") and 1 <= int(opts["fail_timeout"][:-1]) <= 60
    names = {d.name for d in group.walk()}
    assert not names & {"ip_hash", "hash", "sticky", "random"}
    assert "least_conn" in names

    locs = locations(server)
    pinned = [f"/n/{i}/" for i in range(1, n + 1)]
    assert set(locs) == {"= /ws", "/", "= /nodes.json", "/api/", "= /metrics", *pinned}

    # every proxied location: HTTP/1.1, upgrade headers, the client's address, long timeouts
    proxied = [loc for loc in locs.values() if loc.all("proxy_pass")]
    assert len(proxied) == 2 + n
    for loc in proxied:
        assert loc.has("proxy_http_version", "1.1"), loc.args
        headers = {d.args[0]: d.args[1] for d in loc.all("proxy_set_header")}
        assert headers == {
            "Upgrade": "$http_upgrade", "Connection": conn_var, "Host": "$host",
            "X-Real-IP": "$remote_addr", "X-Forwarded-For": "$remote_addr",
            "X-Forwarded-Proto": "$scheme",
        }, loc.args  # fmt: skip
        for name in ("proxy_read_timeout", "proxy_send_timeout"):
            (value,) = loc.one(name).args
            assert value.endswith("s") and int(value[:-1]) >= max(60, 3 * 25), (name, value)

    # /ws and the rest: the group, the next node on error, timeout or 503, each node once
    for match in ("= /ws", "/"):
        loc = locs[match]
        assert loc.one("proxy_pass").args == ["http://wscluster"]
        assert set(loc.one("proxy_next_upstream").args) == {"error", "timeout", "http_503"}
        assert loc.one("proxy_next_upstream_tries").args == [str(n)]
    assert locs["= /ws"].has("proxy_buffering", "off")

    # /n/<i>/: node i itself, prefix stripped (the trailing /), never another node
    for i, (path, addr) in enumerate(zip(pinned, upstreams, strict=True)):
        loc = locs[path]
        assert loc.one("proxy_pass").args == [f"http://{addr}/"], i
        assert loc.has("proxy_next_upstream", "off")
        assert loc.has("proxy_buffering", "off")

    # nothing proxies anywhere else (in particular not to an API port)
    targets = {d.args[0] for d in server.walk() if d.name == "proxy_pass"}
    assert targets == {"http://wscluster", *(f"http://{a}/" for a in upstreams)}

    # /nodes.json from nginx itself, exactly the chooser's list, no address leaked
    nodes = locs["= /nodes.json"]
    assert nodes.has("default_type", "application/json")
    status, body = nodes.one("return").args
    assert status == "200"
    assert json.loads(body) == {
        "nodes": [{"label": f"node {i}", "path": f"/n/{i}/"} for i in range(1, n + 1)]
    }
    assert body == json.dumps(json.loads(body))
    assert "127.0.0.1" not in body and "800" not in body

    # the API is never exposed
    assert locs["/api/"].block == [D("return", ["404"])]
    assert locs["= /metrics"].block == [D("return", ["404"])]

    assert server.has("client_max_body_size", "1k")
    assert server.has("listen", "80") and server.has("server_name", "_")
    assert not [d for d in server.walk() if d.name.startswith("limit_conn")]


def test_standalone_is_complete_and_relative() -> None:
    _, http, _ = conf(2, standalone=True)
    root = parse(render(NginxOptions((parse_upstream("a:1"),), standalone=True)))
    top = {d.name for d in root.block or []}
    assert {"worker_processes", "pid", "error_log", "events", "http"} <= top
    assert "user" not in top  # as root, workers are nginx's default user; unprivileged, itself
    paths = [root.one("pid").args[0], root.one("error_log").args[0],
             http.one("access_log").args[0]]  # fmt: skip
    temps = [d for d in http.block or [] if d.name.endswith("_temp_path")]
    assert {d.name for d in temps} == {
        f"{k}_temp_path" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    }
    for path in paths + [d.args[0] for d in temps]:
        assert not path.startswith("/"), path  # relative to nginx -p DIR


def test_snippet_is_http_content_only() -> None:
    root = parse(render(NginxOptions((parse_upstream("a:1"),))))
    assert {d.name for d in root.block or []} == {"map", "upstream", "server"}


def test_timeouts_follow_the_ping_interval() -> None:
    for ping, expected in ((25, 75), (5, 60), (40, 120), (33.3, 100)):
        _, _, server = conf(2, ping_interval=ping)
        for loc in server.walk():
            if loc.name == "proxy_read_timeout" or loc.name == "proxy_send_timeout":
                assert loc.args == [f"{expected}s"], (ping, loc)


def test_limit_conn() -> None:
    _, http, server = conf(3, limit_conn=20)
    (zone,) = http.all("limit_conn_zone")
    assert zone.args[0] == "$binary_remote_addr"
    name = zone.args[1].removeprefix("zone=").split(":")[0]
    locs = locations(server)
    for match in ("= /ws", "/n/1/", "/n/2/", "/n/3/"):  # the WebSocket locations
        assert locs[match].one("limit_conn").args == [name, "20"], match
        assert locs[match].has("limit_conn_status", "429")
    assert not locs["/"].all("limit_conn")


@pytest.mark.parametrize(
    ("listen", "expected"),
    [("8080", "8080"), ("127.0.0.1:8080", "127.0.0.1:8080"), ("[::]:443", "[::]:443")],
)
def test_listen_forms(listen: str, expected: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["nginx-conf", "--upstream", "127.0.0.1:8001", "--listen", listen]) == 0
    server = parse(capsys.readouterr().out).one("server")
    assert server.one("listen").args == [expected]


def test_cli_prints_the_config() -> None:
    args = ["--upstream", "127.0.0.1:8001", "--upstream", "127.0.0.1:8002,127.0.0.1:8003",
            "--server-name", "chat.example.com", "--limit-conn", "5",
            "--ping-interval", "30"]  # fmt: skip
    done = cli(*args)
    assert done.returncode == 0, done.stderr
    ups = tuple(parse_upstream(f"127.0.0.1:{p}") for p in PORTS)
    expected = NginxOptions(ups, server_name="chat.example.com", limit_conn=5, ping_interval=30)
    assert done.stdout == render(expected)
    # the environment, as for every option (repeatable ones comma-separated)
    env = {"WSCLUSTER_UPSTREAM": "127.0.0.1:8001,127.0.0.1:8002,127.0.0.1:8003",
           "WSCLUSTER_SERVER_NAME": "chat.example.com", "WSCLUSTER_LIMIT_CONN": "5",
           "WSCLUSTER_PING_INTERVAL": "30"}  # fmt: skip
    done = cli(env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout == render(expected)


@pytest.mark.parametrize(
    "bad",
    [
        [],  # --upstream is required
        ["--upstream", "127.0.0.1"],
        ["--upstream", ":8001"],
        ["--upstream", "127.0.0.1:"],
        ["--upstream", "127.0.0.1:0"],
        ["--upstream", "127.0.0.1:65536"],
        ["--upstream", "127.0.0.1:http"],
        ["--upstream", "bad host:8001"],
        ["--upstream", "h;evil:8001"],
        ["--upstream", "127.0.0.1:8001,"],
        ["--upstream", "127.0.0.1:8001", "--listen", "0"],
        ["--upstream", "127.0.0.1:8001", "--listen", "127.0.0.1:99999"],
        ["--upstream", "127.0.0.1:8001", "--listen", "eighty"],
        ["--upstream", "127.0.0.1:8001", "--limit-conn", "-1"],
        ["--upstream", "127.0.0.1:8001", "--ping-interval", "0"],
        ["--upstream", "127.0.0.1:8001", "--server-name", "a;b"],
    ],
)
def test_bad_options_exit_2(bad: list[str]) -> None:
    done = cli(*bad)
    assert done.returncode == 2, (bad, done.stdout, done.stderr)
    assert done.stdout == ""
    assert "error" in done.stderr
