"""Issue 15 ("the first hour"): configuration mistakes are one line on stderr with the right
exit code, busy ports are found before anything starts, `serve`'s help and defaults."""

from __future__ import annotations

import argparse
import json
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

import wscluster
from wscluster.cli import build_parser
from wscluster.embedded import free_port

CLI = [sys.executable, "-m", "wscluster"]
SERVE = [*CLI, "serve", "--anonymous", "--host", "127.0.0.1"]


def _run(argv: list[str], timeout: float = 30) -> tuple[int, str, str, float]:
    began = time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    return done.returncode, done.stdout, done.stderr, time.monotonic() - began


def _one_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture
def busy() -> Iterator[socket.socket]:
    """A port on 127.0.0.1 that something else listens on."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    yield s
    s.close()


def _busy_port(s: socket.socket) -> int:
    return int(s.getsockname()[1])


def test_serve_on_a_busy_port_is_one_line_exit_1(busy: socket.socket) -> None:
    port = _busy_port(busy)
    code, _, err, _ = _run([*SERVE, "--port", str(port), "--api-port", str(free_port()),
                            "--broker", "memory://"])  # fmt: skip
    assert code == 1
    assert f"127.0.0.1:{port}" in _one_line(err)


def test_serve_on_a_busy_api_port_is_one_line_exit_1(busy: socket.socket) -> None:
    port = _busy_port(busy)
    code, _, err, _ = _run([*SERVE, "--port", str(free_port()), "--api-port", str(port),
                            "--broker", "memory://"])  # fmt: skip
    assert code == 1
    assert f"127.0.0.1:{port}" in _one_line(err)


def test_up_on_a_busy_port_stops_before_starting_anything(busy: socket.socket) -> None:
    port = _busy_port(busy)
    code, out, err, took = _run([*CLI, "up", "--nodes", "2", "--base-port", str(port - 2)])
    assert code == 1
    assert f"127.0.0.1:{port}" in _one_line(err)
    assert "is up" not in out and took < 10
    with socket.create_connection(("127.0.0.1", port), timeout=2):  # the other one still serves
        pass


@pytest.mark.parametrize("presence", [[], ["--presence", "redis://127.0.0.1:6379/0"]],
                         ids=["alone", "with-presence"])  # fmt: skip
@pytest.mark.parametrize(("url", "problem"), [("localhost:6379", "scheme"),
                                              ("redsi://x", "unknown scheme 'redsi'")])  # fmt: skip
def test_a_bad_broker_url_names_broker_and_the_problem(
    url: str, problem: str, presence: list[str]
) -> None:
    code, _, err, _ = _run([*SERVE, "--port", str(free_port()), "--broker", url, *presence])
    assert code == 2
    line = _one_line(err)
    assert "--broker" in line and problem in line and url in line
    assert "also pass" not in line and "--presence" not in line


def test_an_unreachable_broker_at_start_exits_1_naming_it() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    code, _, err, took = _run([*SERVE, "--port", str(free_port()), "--broker", url,
                               "--broker-timeout", "1"])  # fmt: skip
    assert code == 1 and took < 8, err
    assert "Traceback" not in err
    assert url in err.strip().splitlines()[-1]


@pytest.mark.parametrize("command", [["send", "--to", "all", "hi"], ["status"]])
def test_send_and_status_fail_fast_on_a_closed_port(command: list[str]) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    code, _, err, took = _run([*CLI, command[0], "--broker", url, *command[1:]])
    assert code == 1 and took < 8, err
    assert url in _one_line(err)
    assert "retrying in the background" not in err


def test_serve_help_has_help_and_a_default_for_every_option() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    serve = sub.choices["serve"]
    text = re.sub(r"\s+", " ", serve.format_help())
    for action in serve._actions:
        if not action.option_strings or action.help == "==SUPPRESS==":
            continue
        assert action.help, action.option_strings
        if action.dest in ("jwt_secret", "api_key", "help"):
            continue
        default = action.default
        if default not in (None, False, ()) and action.dest != "help":
            assert f"default: {default}" in text, action.option_strings
    assert "redis://" in text and "nats://" in text and "amqp://" in text


def test_version() -> None:
    code, out, _, _ = _run([*CLI, "--version"])
    assert code == 0 and wscluster.__version__ in out


def test_node_name_from_host_name_and_the_anonymous_warning() -> None:
    port, api = free_port(), free_port()
    proc = subprocess.Popen(
        [*CLI, "serve", "--anonymous", "--host", "0.0.0.0", "--port", str(port),
         "--api-port", str(api), "--broker", "memory://"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline, body = time.monotonic() + 15, None
        while body is None:
            assert time.monotonic() < deadline and proc.poll() is None
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as r:
                    body = json.loads(r.read())
            except OSError:
                time.sleep(0.1)
        host = re.sub(r"[^A-Za-z0-9_:\-]", "_", socket.gethostname())
        assert re.fullmatch(rf"{re.escape(host)}:{port}-[0-9a-f]{{8}}", body["node"]), body
        assert "0_0_0_0" not in body["node"]
        with urllib.request.urlopen(f"http://127.0.0.1:{api}/healthz", timeout=2) as r:
            assert r.status == 200  # the API stays on loopback
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=20)
    warnings = [line for line in err.splitlines() if "WARNING" in line and "--anonymous" in line]
    assert warnings and "0.0.0.0" in warnings[0], err


def test_up_waits_for_its_own_node_not_another_one() -> None:
    from wscluster.up import _wait_healthy

    class Other(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps({"ok": True, "node": "node1-0badcafe"}).encode()
            self.send_response(200)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Other)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/healthz"
        assert not _wait_healthy(url, sleeper, "node1-12345678", 1.0)
        assert _wait_healthy(url, sleeper, "node1-0badcafe", 1.0)
    finally:
        sleeper.kill()
        sleeper.wait()
        server.shutdown()
        server.server_close()
