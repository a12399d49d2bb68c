"""`wscluster up` as the README runs it: embedded broker, nodes, banner, Ctrl-C, no orphans."""

from __future__ import annotations

import asyncio
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest

from .wsclient import WS


def _children(pid: int) -> set[int]:
    """Every descendant of pid (from /proc)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    found, todo = set(), [pid]
    while todo:
        p = todo.pop()
        kids = {c for c, pp in parents.items() if pp == p}
        found |= kids
        todo.extend(kids)
    return found


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


async def _ctrl_c_stops_everything(proc: subprocess.Popen[str], family: set[int]) -> None:
    """SIGINT (Ctrl-C) to `up`: it exits 0 and leaves none of its processes behind."""
    proc.send_signal(signal.SIGINT)
    assert await asyncio.to_thread(proc.wait, 30) == 0
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in family):
        assert time.monotonic() < deadline, "processes left behind by `up`"
        await asyncio.sleep(0.1)


def _reap(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
    if proc.stdout:
        proc.stdout.close()


async def _banner(proc: subprocess.Popen[str]) -> str:
    """What `up` prints until it is ready (the banner ends with the Ctrl-C line)."""
    assert proc.stdout is not None
    banner = ""
    deadline = time.monotonic() + 30
    while "Ctrl-C" not in banner:
        assert time.monotonic() < deadline and proc.poll() is None, banner
        banner += await asyncio.to_thread(proc.stdout.readline)
    return banner


@pytest.mark.parametrize("flags", [[], ["--nats"]], ids=["redis", "nats"])
async def test_up_starts_a_cluster_and_ctrl_c_stops_everything(flags: list[str]) -> None:
    base = random.randrange(20000, 31000, 10)  # below the ephemeral port range
    proc = subprocess.Popen(
        [sys.executable, "-m", "wscluster", "up", "--nodes", "2", "--base-port", str(base),
         *flags],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        banner = await _banner(proc)
        urls = re.findall(r"ws://127\.0\.0\.1:\d+/ws", banner)
        assert urls[:2] == [f"ws://127.0.0.1:{base + 1}/ws", f"ws://127.0.0.1:{base + 2}/ws"]
        send_line = re.search(r"^ +(\S*wscluster send .*--to uid:alice.*)$", banner, re.M)
        assert re.search(r"wscluster send .*--to all ", banner)
        page = f"http://127.0.0.1:{base + 1}/"
        assert f"Chat page: open {page} and http://127.0.0.1:{base + 2}/" in banner
        assert send_line is not None and re.search(r"wscluster status$", banner, re.M)
        assert "--history" not in send_line.group(1)  # the cluster holds its rules
        exports = dict(re.findall(r"^ +export (WSCLUSTER_\w+)=(\S+)$", banner, re.M))
        assert exports["WSCLUSTER_BROKER"].startswith("nats://" if flags else "redis://")
        assert ("WSCLUSTER_PRESENCE" in exports) == bool(flags)
        a = await WS.open(urls[0], "alice")
        b = await WS.open(urls[1], "bob")
        await b.ok({"type": "send", "to": "uid:alice", "data": "across"})
        assert (await a.next(type="message"))["data"] == "across"
        # the banner's own command, pasted as printed
        argv = shlex.split(send_line.group(1))
        assert os.path.exists(argv[0]), argv  # the venv's own script: no activation needed
        env = {k: v for k, v in os.environ.items() if not k.startswith("WSCLUSTER_")}
        sent = await asyncio.to_thread(subprocess.run, argv, capture_output=True, timeout=30,
                                       env={**env, **exports})  # fmt: skip
        assert sent.returncode == 0, sent.stderr
        assert (await a.next(type="message"))["data"] == {"text": "hi"}
        await a.close()
        await b.close()
        family = _children(proc.pid)
        assert len(family) >= 3  # broker (+ presence store) + 2 nodes
        await _ctrl_c_stops_everything(proc, family)
    finally:
        _reap(proc)


async def test_up_with_an_app_runs_it_on_every_node() -> None:
    """`wscluster up --app module:attr` from the repository root (as examples/ says)."""
    import websockets

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    base = random.randrange(20000, 31000, 10)
    app = "examples.swoole_chat.app:app"
    proc = subprocess.Popen(
        [sys.executable, "-m", "wscluster", "up", "--nodes", "2", "--base-port", str(base),
         "--app", app],
        cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        banner = await _banner(proc)
        assert app in banner and '"login", "uid"' not in banner
        for port in (base + 1, base + 2):  # the app's own protocol on both nodes
            async with websockets.connect(f"ws://127.0.0.1:{port}/ws") as ws:
                assert await asyncio.wait_for(ws.recv(), 5) == '{"type":"open"}'
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
        if proc.stdout is not None:
            proc.stdout.close()
    bad = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "wscluster", "up", "--app", "nope_xyz:app"],
        cwd=repo, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert bad.returncode == 2 and "cannot import" in bad.stderr


async def test_up_with_jwt_authenticates_every_node() -> None:
    """`up --jwt-secret --api-key`: nodes refuse clients without a token, accept a signed
    one, and keep the secrets off their command lines."""
    import jwt
    import websockets

    secret, key = "k" * 40, "api-key-for-test"
    base = random.randrange(20000, 31000, 10)
    proc = subprocess.Popen(
        [sys.executable, "-m", "wscluster", "up", "--nodes", "2", "--base-port", str(base),
         "--jwt-secret", secret, "--api-key", key],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        banner = await _banner(proc)
        assert "?token=" in banner
        for pid in _children(proc.pid):  # secrets travel in the environment, not in argv
            argv = _cmdline(pid)
            assert secret.encode() not in argv and key.encode() not in argv
        with pytest.raises(websockets.InvalidStatus) as refused:
            await websockets.connect(f"ws://127.0.0.1:{base + 2}/ws")
        assert refused.value.response.status_code == 401
        token = jwt.encode({"sub": "alice", "exp": int(time.time()) + 60}, secret, "HS256")
        ws = await WS.open(f"ws://127.0.0.1:{base + 2}/ws?token={token}")
        assert ws.welcome["uid"] == "alice"
        await ws.close()
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
        if proc.stdout is not None:
            proc.stdout.close()
    bad = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "wscluster", "up", "--jwt-secret", "short"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert bad.returncode == 2 and "32 bytes" in bad.stderr


async def test_up_with_nginx_in_front() -> None:
    """`wscluster up --nginx PORT`: the classic setup (nginx + nodes) in one command; pinned
    pages reach their node, and Ctrl-C stops nginx too."""
    import aiohttp

    from wscluster.embedded import free_port
    from wscluster.localnginx import nginx_binary

    from ..conftest import skip_or_fail

    if nginx_binary() is None:
        skip_or_fail("nginx is not installed (apt-get install nginx)")
    base, front = random.randrange(20000, 31000, 10), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "wscluster", "up", "--nodes", "2", "--base-port", str(base),
         "--nginx", str(front)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        banner = await _banner(proc)
        url = f"http://127.0.0.1:{front}"
        assert f"open {url}/n/1/ and {url}/n/2/ in two tabs" in banner
        async with aiohttp.ClientSession() as http, http.get(f"{url}/nodes.json") as r:
            assert [n["path"] for n in (await r.json())["nodes"]] == ["/n/1/", "/n/2/"]
        a = await WS.open(f"ws://127.0.0.1:{front}/n/1/ws", "alice")
        b = await WS.open(f"ws://127.0.0.1:{front}/n/2/ws", "bob")
        assert a.welcome["node"].startswith("node1-") and b.welcome["node"].startswith("node2-")
        await b.ok({"type": "send", "to": "uid:alice", "data": "through nginx"})
        assert (await a.next(type="message"))["data"] == "through nginx"
        await a.close()
        await b.close()
        family = _children(proc.pid)
        assert any(b"nginx" in _cmdline(p) for p in family)
        await _ctrl_c_stops_everything(proc, family)
    finally:
        _reap(proc)
