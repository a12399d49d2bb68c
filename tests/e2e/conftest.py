"""End-to-end fixtures: real node processes (from tests/cluster), nginx with the config
`wscluster nginx-conf` generates, and Debian's Chromium driven by Playwright."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cluster.conftest import (  # noqa: F401  (fixtures)
    _close_websockets,
    cluster,
    make_cluster,
    unique,
)
from tests.conftest import skip_or_fail
from wscluster.embedded import free_port

CHROMIUM = os.environ.get("WSCLUSTER_CHROMIUM", "/usr/bin/chromium")
# Chromium as root in a container: no sandbox; and no calls home (this network is closed).
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


def artifacts_dir() -> Path:
    """Where screenshots go (kept after the run; CI can upload the folder)."""
    path = Path(os.environ.get("WSCLUSTER_ARTIFACTS", "test-artifacts")) / "e2e"
    path.mkdir(parents=True, exist_ok=True)
    return path


def nginx_binary() -> str:
    found = shutil.which("nginx")
    if found is None and Path("/usr/sbin/nginx").exists():
        found = "/usr/sbin/nginx"
    if found is None:
        skip_or_fail("nginx is not installed (apt-get install nginx)")
    assert found is not None
    return found


def chromium_binary() -> str:
    if not Path(CHROMIUM).exists():
        skip_or_fail(f"{CHROMIUM} is not installed (apt-get install chromium)")
    return CHROMIUM


class Nginx:
    """nginx in the foreground with a generated standalone config, in its own prefix."""

    def __init__(self, prefix: Path, upstreams: list[str]) -> None:
        self.binary = nginx_binary()
        self.prefix = prefix
        self.port = free_port()
        conf = subprocess.run(
            [sys.executable, "-m", "wscluster", "nginx-conf", "--standalone",
             "--listen", f"127.0.0.1:{self.port}",
             *(a for u in upstreams for a in ("--upstream", u))],
            check=True, capture_output=True, text=True,
        ).stdout  # fmt: skip
        prefix.mkdir(parents=True, exist_ok=True)
        (prefix / "logs").mkdir(exist_ok=True)
        (prefix / "nginx.conf").write_text(conf)
        with open(prefix / "stderr.log", "wb") as err:  # the child keeps its own copy
            self.proc = subprocess.Popen(
                [self.binary, "-p", str(prefix), "-c", str(prefix / "nginx.conf"),
                 "-g", "daemon off;"],
                stdout=subprocess.DEVNULL, stderr=err,
            )  # fmt: skip
        self._wait()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _wait(self) -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited: {(self.prefix / 'stderr.log').read_text()}")
            try:
                with urllib.request.urlopen(f"{self.url}/nodes.json", timeout=1):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("nginx did not start")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture
def nginx_factory(tmp_path: Path) -> Iterator[object]:
    started: list[Nginx] = []

    def factory(upstreams: list[str]) -> Nginx:
        n = Nginx(tmp_path / f"nginx{len(started)}", upstreams)
        started.append(n)
        return n

    yield factory
    for n in started:
        n.stop()


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    """Debian's Chromium, headless, through Playwright (skipped when either is missing)."""
    pw = pytest.importorskip("playwright.async_api")
    executable = chromium_binary()
    async with pw.async_playwright() as p:
        b = await p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            await b.close()
