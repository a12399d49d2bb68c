"""``wscluster nginx-conf``: the nginx configuration that puts N nodes behind one public
address. Pure text generation (no I/O): :func:`render` takes :class:`NginxOptions`.

What the generated configuration does, and why, is in docs/deployment.md ("nginx in
front"); the text itself says it in comments too.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

from .nginx_parse import Upstream as Upstream  # the parsers are part of this module's API
from .nginx_parse import parse_listen as parse_listen
from .nginx_parse import parse_listens as parse_listens
from .nginx_parse import parse_upstream as parse_upstream
from .nginx_parse import parse_upstreams as parse_upstreams

UPSTREAM = "wscluster"  # the upstream group's name (and the prefix of every name we define)
CONNECTION_VAR = "$wscluster_connection_upgrade"  # prefixed: conf.d may define its own map
CONN_ZONE = "wscluster_conn"

# Failure accounting of the upstream group (see _upstream): a node that fails once (refuses
# or times out the connection, or answers 503 because it is full or draining) rests
# FAIL_TIMEOUT seconds, then one request tries it again.
MAX_FAILS = 1
FAIL_TIMEOUT = 5
# --standalone: each proxied WebSocket holds two connections (client and node), and a worker
# needs a file descriptor for each, plus a few for its logs and listening sockets.
WORKER_CONNECTIONS = 16384
WORKER_RLIMIT_NOFILE = WORKER_CONNECTIONS + 1024
# --standalone: after `nginx -s reload` or `-s quit`, an old worker still holding
# WebSockets closes them after this long (without it, a quit never ends while a client stays).
WORKER_SHUTDOWN_TIMEOUT = 10
# nginx reads a configuration in 4096-byte buffers: no word (a quoted string, a comment line)
# may be longer. Long texts are cut below this.
MAX_WORD = 2000
ZONE_KB_PER_NODE = 4  # the upstream zone: about 1 KiB per server, a node is two (backup)
NODES_VAR = "$wscluster_nodes"
# The access log's format: "combined" but for the request line without its query string
# (`?token=` may carry a JWT) and no Referer (a URL, which may carry one too).
LOG_FORMAT = "wscluster_noquery"
LOG_FORMAT_TEXT = (
    "'$remote_addr - $remote_user [$time_local] '",
    "'\"$request_method $uri $server_protocol\" $status $body_bytes_sent '",
    "'\"-\" \"$http_user_agent\"'",
)
DISTRIBUTION_ACCESS_LOG = "/var/log/nginx/access.log"  # Debian's, Red Hat's, Alpine's

_SERVER_NAME = re.compile(r"^[^\s;{}'\"\\$#]+$")


@dataclass(frozen=True)
class NginxOptions:
    upstreams: tuple[Upstream, ...]
    listen: tuple[str, ...] = ("80",)  # one `listen` each: "80", "127.0.0.1:8080", "[::]:80"
    server_name: str = "_"
    ping_interval: float = 25.0  # the nodes' --ping-interval, seconds
    limit_conn: int = 0  # concurrent WebSocket (and pinned) requests per client IP; 0: off
    standalone: bool = False  # a whole nginx.conf instead of a conf.d snippet

    def __post_init__(self) -> None:
        if not self.upstreams:
            raise ValueError("at least one --upstream HOST:PORT is needed")
        if isinstance(self.listen, str):  # one address, not its characters
            object.__setattr__(self, "listen", (self.listen,))
        if not self.listen:
            raise ValueError("at least one --listen is needed")
        for listen in self.listen:
            parse_listen(listen)
        names = self.server_name.split()
        if not names or not all(_SERVER_NAME.match(n) for n in names):
            raise ValueError(f"bad --server-name {self.server_name!r}")
        if not (math.isfinite(self.ping_interval) and self.ping_interval > 0):
            raise ValueError(f"--ping-interval must be > 0, not {self.ping_interval}")
        if self.limit_conn < 0:
            raise ValueError(f"--limit-conn must be >= 0, not {self.limit_conn}")

    @property
    def proxy_timeout(self) -> int:
        """Seconds nginx waits on an idle proxied connection: well above the ping interval,
        so a quiet but healthy WebSocket is never cut by nginx."""
        return max(60, math.ceil(3 * self.ping_interval))


def node_paths(n: int) -> list[str]:
    return [f"/n/{i}/" for i in range(1, n + 1)]


def nodes_json(n: int) -> str:
    """The body of ``/nodes.json`` as nginx answers it: labels and pinned paths only, never an
    upstream address."""
    nodes = [{"label": f"node {i}", "path": p} for i, p in enumerate(node_paths(n), 1)]
    return json.dumps({"nodes": nodes})


def command_line(o: NginxOptions) -> str:
    """The ``wscluster nginx-conf`` command that makes this text (for its header)."""
    return " ".join(_command(o))


def _command(o: NginxOptions) -> list[str]:
    """The command, an option and its value at a time."""
    parts = ["wscluster nginx-conf", *(f"--upstream {u}" for u in o.upstreams)]
    defaults = NginxOptions(o.upstreams)
    if o.listen != defaults.listen:
        parts += [f"--listen {listen}" for listen in o.listen]
    if o.server_name != defaults.server_name:
        parts.append(f"--server-name '{o.server_name}'")
    if o.ping_interval != defaults.ping_interval:
        parts.append(f"--ping-interval {o.ping_interval:g}")
    if o.limit_conn:
        parts.append(f"--limit-conn {o.limit_conn}")
    if o.standalone:
        parts.append("--standalone")
    return parts


def _wrapped(first: str, parts: list[str], width: int = 92) -> list[str]:
    """A command as comment lines of about ``width`` characters, continued with ``\\`` (nginx
    refuses a line longer than its buffer, even in a comment)."""
    lines, line = [], f"# {first}{parts[0]}"
    for part in parts[1:]:
        if len(line) + 1 + len(part) > width:
            lines.append(line + " \\")
            line = "#     " + part
        else:
            line += " " + part
    return [*lines, line]


def _header(o: NginxOptions) -> list[str]:
    n = len(o.upstreams)
    lines = [
        f"# nginx in front of {n} wscluster node{'s' if n > 1 else ''}: WebSocket clients at /ws,",
        "# the chat page at /, node <i> pinned under /n/<i>/ (i in --upstream order).",
        *_wrapped("Generated by: ", _command(o)),
        "#",
    ]
    if o.standalone:
        lines += [
            "# A complete nginx.conf. Every path in it (pid, logs, temp files) is relative to the",
            "# prefix directory, so it runs unprivileged from any directory DIR:",
            "#   mkdir -p DIR && wscluster nginx-conf ... --standalone > DIR/nginx.conf",
            "#   nginx -t -p DIR -c DIR/nginx.conf     # check",
            "#   nginx -p DIR -c DIR/nginx.conf        # start (-g 'daemon off;': foreground;",
            "#                                         # -e DIR/error.log: no built-in log path)",
            "#   nginx -p DIR -c DIR/nginx.conf -s reload    (or -s quit)",
            "# As a user other than root: a --listen port above 1023, and a hard open-file limit",
            f"# (ulimit -Hn) of at least {WORKER_RLIMIT_NOFILE} for worker_rlimit_nofile below.",
        ]
    else:
        lines += [
            "# A conf.d snippet, for inside the http {} block of the distribution's nginx.conf:",
            "#   wscluster nginx-conf ... > /etc/nginx/conf.d/wscluster.conf",
            "#   nginx -t && systemctl reload nginx",
            "# (`--standalone` prints a complete nginx.conf instead.) Outside http {}, in",
            "# /etc/nginx/nginx.conf, a snippet cannot set what many WebSockets need (each holds",
            "# two connections: Debian's worker_connections 768 is about 380 clients per worker):",
            f"#   worker_rlimit_nofile {WORKER_RLIMIT_NOFILE};"
            f"  worker_shutdown_timeout {WORKER_SHUTDOWN_TIMEOUT}s;    (top level)",
            f"#   events {{ worker_connections {WORKER_CONNECTIONS}; }}",
            f"# Requests are logged to {DISTRIBUTION_ACCESS_LOG} (edit access_log in server {{}}",
            "# if your distribution logs elsewhere) in a format without the query string, not",
            "# in the host's (\"combined\" logs it, and a client may send ?token=<JWT>).",
        ]
    lines += [
        "#",
        "# Every proxied location speaks HTTP/1.1 with the Upgrade/Connection headers (the nodes",
        "# answer only HTTP/1.1) and sets X-Forwarded-For to the client address (not appended:",
        "# nginx is the edge, and a node takes the first entry as the peer). The nodes' API",
        "# ports (--api-port) are never exposed: /api/ and /metrics answer 404 here.",
        "",
    ]
    return lines


def _proxy_headers(o: NginxOptions, websocket: bool) -> list[str]:
    t = o.proxy_timeout
    lines = [
        "proxy_http_version 1.1;",
        "proxy_set_header Upgrade $http_upgrade;",
        f"proxy_set_header Connection {CONNECTION_VAR};",
        "proxy_set_header Host $host;",
        "proxy_set_header X-Real-IP $remote_addr;",
        "proxy_set_header X-Forwarded-For $remote_addr;",
        "proxy_set_header X-Forwarded-Proto $scheme;",
        "proxy_connect_timeout 5s;",
        f"proxy_read_timeout {t}s;  # well above the nodes' ping interval ({o.ping_interval:g} s)",
        f"proxy_send_timeout {t}s;",
    ]
    if websocket:
        lines.append("proxy_buffering off;")
        if o.limit_conn:
            lines += [
                f"limit_conn {CONN_ZONE} {o.limit_conn};  # concurrent connections per client IP",
                "limit_conn_status 429;",
            ]
    return lines


def _location(match: str, body: list[str], comment: str | None = None) -> list[str]:
    head = [f"# {line}" for line in comment.splitlines()] if comment else []
    return [*head, f"location {match} {{", *(f"    {line}" for line in body), "}"]


def _server(o: NginxOptions) -> list[str]:
    n = len(o.upstreams)
    # no proxy_next_upstream_tries: every server of the group at most once (a name that
    # resolves to several addresses is several servers), the backups included
    balance = [
        f"proxy_pass http://{UPSTREAM};",
        "proxy_next_upstream error timeout http_503;",
    ]
    body: list[str] = [
        *(f"listen {parse_listen(listen)};" for listen in o.listen),
        f"server_name {o.server_name};",
        "server_tokens off;",
        *([] if o.standalone else [f"access_log {DISTRIBUTION_ACCESS_LOG} {LOG_FORMAT};"]),
        "client_max_body_size 1k;  # the public port serves only GETs and the WebSocket",
        "proxy_max_temp_file_size 0;  # small pages: never spool a response to disk",
        "",
    ]
    body += _location(
        "= /ws", [*balance, *_proxy_headers(o, websocket=True)],
        "WebSocket clients, balanced over every node (no stickiness); a node that is full or\n"
        "draining refuses the handshake with 503, and nginx tries the next one",
    )  # fmt: skip
    body.append("")
    body += _location(
        "/", [*balance, *_proxy_headers(o, websocket=False)],
        "the chat page, its files and /healthz: any node",
    )  # fmt: skip
    for i, (u, path) in enumerate(zip(o.upstreams, node_paths(n), strict=True), 1):
        body.append("")
        body += _location(
            path,
            [f"proxy_pass http://{u}/;", "proxy_next_upstream off;",
             *_proxy_headers(o, websocket=True)],
            f"node {i} pinned, prefix stripped ({path}ws -> /ws): no retry, a dead node is a 502",
        )  # fmt: skip
    body.append("")
    body += _location(
        "= /nodes.json",
        ["default_type application/json;", 'add_header Cache-Control "no-store";',
         *_return_200(nodes_json(n))],
        "the page's node chooser, answered by nginx (no upstream address in it)",
    )  # fmt: skip
    body.append("")
    body += _location("/api/", ["return 404;"], "the API port is never exposed")
    body += _location("= /metrics", ["return 404;"])
    return ["server {", *(f"    {line}" if line else "" for line in body), "}"]


def _return_200(body: str) -> list[str]:
    """``return 200 '<body>';``, or for a body longer than an nginx word can be, the body
    built up in a variable by pieces (``set``), then returned."""
    if len(body) <= MAX_WORD:
        return [f"return 200 '{body}';"]
    assert "'" not in body and "$" not in body and "\\" not in body
    pieces = [""]
    for item in re.split(r"(?<=\}, )", body):  # whole entries of the list where possible
        if pieces[-1] and len(pieces[-1]) + len(item) > MAX_WORD:
            pieces.append("")
        pieces[-1] += item
    assert all(len(piece) <= 2 * MAX_WORD for piece in pieces)
    name = NODES_VAR[1:]
    return [
        f"set {NODES_VAR} '{pieces[0]}';",
        *(f"set {NODES_VAR} '${{{name}}}{piece}';" for piece in pieces[1:]),
        f"return 200 {NODES_VAR};",
    ]


def _http(o: NginxOptions) -> list[str]:
    lines = [
        "# the access log without query strings (a client may send ?token=<JWT>) or Referer",
        f"log_format {LOG_FORMAT} {LOG_FORMAT_TEXT[0]}",
        *(f"{' ' * (len(LOG_FORMAT) + 12)}{part}" for part in LOG_FORMAT_TEXT[1:]),
    ]
    lines[-1] += ";"
    if o.standalone:
        lines.append(f"access_log access.log {LOG_FORMAT};")
    lines += [
        "",
        "# Connection: upgrade for WebSocket handshakes, close for plain requests",
        f"map $http_upgrade {CONNECTION_VAR} {{",
        "    default upgrade;",
        "    ''      close;",
        "}",
        "",
    ]
    if o.limit_conn:
        lines += [f"limit_conn_zone $binary_remote_addr zone={CONN_ZONE}:10m;", ""]
    lines += [*_upstream(o), "", *_server(o)]
    return lines


def _upstream(o: NginxOptions) -> list[str]:
    lines = [
        f"upstream {UPSTREAM} {{",
        f"    zone {UPSTREAM} {max(64, ZONE_KB_PER_NODE * len(o.upstreams))}k;"
        "  # connection counts and failures shared by all workers",
        "    least_conn;  # WebSockets are long-lived: fewest open connections wins",
    ]
    if len(o.upstreams) == 1:  # nginx never rests the only server of a group
        return [*lines, f"    server {o.upstreams[0]};", "}"]
    rest = f"max_fails={MAX_FAILS} fail_timeout={FAIL_TIMEOUT}s"
    return [
        *lines,
        "    # a node that refuses or times out the connection, or answers 503 (full or",
        f"    # draining), rests {FAIL_TIMEOUT} s; then one request tries it again (so a node",
        f"    # back from a restart gets clients within {FAIL_TIMEOUT} s)",
        *(f"    server {u} {rest};" for u in o.upstreams),
        "    # the same nodes, tried only while every node above rests: without them nginx would",
        "    # answer 502 then, even once a node is back (e.g. during a rolling restart)",
        *(f"    server {u} backup max_fails=0;" for u in o.upstreams),
        "}",
    ]


def render(o: NginxOptions) -> str:
    """The whole configuration text for these options."""
    lines = _header(o)
    if not o.standalone:
        lines += _http(o)
    else:
        lines += [
            "worker_processes auto;",
            "pid nginx.pid;",
            "error_log error.log warn;",
            f"worker_rlimit_nofile {WORKER_RLIMIT_NOFILE};  # one per connection, and some spare",
            f"worker_shutdown_timeout {WORKER_SHUTDOWN_TIMEOUT}s;"
            "  # after reload/quit, old workers drop their WebSockets",
            "",
            "events {",
            f"    worker_connections {WORKER_CONNECTIONS};  # each proxied WebSocket holds two",
            "}",
            "",
            "http {",
            "    default_type application/octet-stream;",
            "    client_body_temp_path client_body_temp;",
            "    proxy_temp_path proxy_temp;",
            "    fastcgi_temp_path fastcgi_temp;",
            "    uwsgi_temp_path uwsgi_temp;",
            "    scgi_temp_path scgi_temp;",
            "",
            *(f"    {line}" if line else "" for line in _http(o)),
            "}",
        ]
    return "\n".join(lines) + "\n"
