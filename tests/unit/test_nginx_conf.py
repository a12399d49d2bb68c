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

from wscluster import nginx
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
        assert m, f"cannot tokenize at {text[pos : pos + 40]!r}"
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

    # one group, every node in order, no stickiness, short rests (see test_failure_accounting)
    group = http.one("upstream")
    assert group.args == ["wscluster"]
    servers = [s for s in group.all("server") if "backup" not in s.args]
    assert [s.args[0] for s in servers] == upstreams
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

    # /ws and the rest: the group, the next node on error, timeout or 503, every server of
    # the group at most once (no proxy_next_upstream_tries: it would stop before the backups)
    for match in ("= /ws", "/"):
        loc = locs[match]
        assert loc.one("proxy_pass").args == ["http://wscluster"]
        assert set(loc.one("proxy_next_upstream").args) == {"error", "timeout", "http_503"}
        assert not loc.all("proxy_next_upstream_tries")
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


def test_failure_accounting() -> None:
    """A failed node (refused, timed out, or 503: full or draining) rests a few seconds only,
    so a restarted node gets clients soon; and the same nodes as backups without failure
    accounting, so nginx never answers 502 "no live upstreams" while a node could serve
    (without them: a 2-node rolling restart was 8 s of 502, test_rolling_restart_...)."""
    _, http, _ = conf(3)
    servers = http.one("upstream").all("server")
    addrs = [f"127.0.0.1:{p}" for p in PORTS]
    assert [(s.args[0], s.args[1:]) for s in servers] == [
        *((a, ["max_fails=1", "fail_timeout=5s"]) for a in addrs),
        *((a, ["backup", "max_fails=0"]) for a in addrs),
    ]
    assert (nginx.MAX_FAILS, nginx.FAIL_TIMEOUT) == (1, 5)  # the docs say 5 s
    # one node: nginx never rests the only server of a group, and a backup would be itself
    _, http, _ = conf(1)
    assert [s.args for s in http.one("upstream").all("server")] == [["127.0.0.1:8001"]]


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


def test_standalone_holds_many_websockets_and_ends() -> None:
    """Each proxied WebSocket is two connections and two descriptors in a worker: the
    default 512 connections (or a 1024 open-file limit, as for most users) capped nginx at
    a few hundred clients. And a graceful quit or reload must not wait forever for the
    WebSockets an old worker holds (tests/cluster/test_nginx.py runs both)."""
    root = parse(render(NginxOptions((parse_upstream("a:1"),), standalone=True)))
    conns = int(root.one("events").one("worker_connections").args[0])
    assert conns >= 16384
    assert int(root.one("worker_rlimit_nofile").args[0]) >= conns + 100
    assert root.one("worker_shutdown_timeout").args == ["10s"]


def test_snippet_is_http_content_only() -> None:
    text = render(NginxOptions((parse_upstream("a:1"),)))
    root = parse(text)
    assert {d.name for d in root.block or []} == {"log_format", "map", "upstream", "server"}
    # what it cannot set itself, its header tells (for the distribution's nginx.conf)
    head = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    for advice in (f"worker_rlimit_nofile {nginx.WORKER_RLIMIT_NOFILE};",
                   f"worker_shutdown_timeout {nginx.WORKER_SHUTDOWN_TIMEOUT}s;",
                   f"worker_connections {nginx.WORKER_CONNECTIONS};"):  # fmt: skip
        assert advice in head, advice


@pytest.mark.parametrize("standalone", [False, True])
def test_many_nodes(standalone: bool) -> None:
    """400 nodes: nginx reads its configuration in 4096-byte buffers and refuses a longer word
    (the header's command, a comment, and /nodes.json's body failed from about 105 nodes),
    and the upstream zone must hold every server (64k failed from about 65 servers, 32 nodes
    with their backups: "ngx_slab_alloc() failed: no memory in upstream zone").
    tests/cluster/test_nginx.py runs such a configuration."""
    n = 400
    ups = tuple(parse_upstream(f"10.0.{i // 200}.{i % 200 + 1}:8001") for i in range(n))
    o = NginxOptions(ups, server_name="a.example.com b.example.com", standalone=standalone)
    text = render(o)
    assert max(len(line) for line in text.splitlines()) < 2500
    root = parse(text)
    http = root.one("http") if standalone else root
    zone = http.one("upstream").one("zone").args
    assert zone[0] == "wscluster" and int(zone[1].removesuffix("k")) >= 4 * n
    # the command in the header, wrapped with `\`, is the command
    head = []
    for line in text.splitlines():
        if line.startswith("# Generated by: ") or (head and head[-1].endswith("\\")):
            head.append(line.removeprefix("# Generated by: ").lstrip("# ").rstrip())
    assert " ".join(h.removesuffix(" \\") for h in head) == nginx.command_line(o)
    # /nodes.json: the body built up in a variable, then returned
    loc = locations(http.one("server"))["= /nodes.json"]
    sets = loc.all("set")
    assert len(sets) > 1 and loc.one("return").args == ["200", "$wscluster_nodes"]
    body = sets[0].args[1] + "".join(d.args[1].removeprefix("${wscluster_nodes}") for d in sets[1:])
    assert body == nginx.nodes_json(n)
    assert all(d.args[0] == "$wscluster_nodes" for d in sets)
    assert all(d.args[1].startswith("${wscluster_nodes}{") for d in sets[1:])


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
    [("8080", "8080"), ("127.0.0.1:8080", "127.0.0.1:8080"), ("[::]:443", "[::]:443"),
     ("[0:0::1]:8080", "[::1]:8080"), ("localhost:8080", "localhost:8080")],
)  # fmt: skip
def test_listen_forms(listen: str, expected: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["nginx-conf", "--upstream", "127.0.0.1:8001", "--listen", listen]) == 0
    server = parse(capsys.readouterr().out).one("server")
    assert server.one("listen").args == [expected]


def test_listen_repeats(capsys: pytest.CaptureFixture[str]) -> None:
    """IPv4 and IPv6 both: nginx's `listen [::]:80` is IPv6 only (ipv6only=on)."""
    args = ["nginx-conf", "--upstream", "127.0.0.1:8001", "--listen", "80", "--listen", "[::]:80"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert [d.args for d in parse(text).one("server").all("listen")] == [["80"], ["[::]:80"]]
    assert "--listen 80 --listen [::]:80" in text.splitlines()[2]  # the command in the header
    done = cli("--upstream", "127.0.0.1:8001", env={"WSCLUSTER_LISTEN": "80,[::]:80"})
    assert done.returncode == 0, done.stderr
    assert done.stdout == text
    # in Python, one address may be a plain string (not read as its characters)
    assert NginxOptions((parse_upstream("a:1"),), listen="8080").listen == ("8080",)  # type: ignore[arg-type]


def test_ipv6_upstreams() -> None:
    ups = (parse_upstream("[::1]:8001"), parse_upstream("[2001:DB8::0001]:8002"))
    assert [str(u) for u in ups] == ["[::1]:8001", "[2001:db8::1]:8002"]
    server = parse(render(NginxOptions(ups))).one("server")
    locs = locations(server)
    assert locs["/n/1/"].one("proxy_pass").args == ["http://[::1]:8001/"]
    assert locs["/n/2/"].one("proxy_pass").args == ["http://[2001:db8::1]:8002/"]


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
        ["--upstream", "::1:8001"],  # IPv6 without brackets
        ["--upstream", "[::1]"],
        ["--upstream", "[1:2]:8001"],  # not an IPv6 address
        ["--upstream", "[:]:8001"],
        ["--upstream", "[fe80::1%eth0]:8001"],
        ["--upstream", "[::1]]:8001"],
        ["--upstream", "999.0.0.1:8001"],
        ["--upstream", "a..b:8001"],
        ["--upstream", "127.0.0.1:8001", "--listen", "[::]"],
        ["--upstream", "127.0.0.1:8001", "--listen", "[1:2]:80"],
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
