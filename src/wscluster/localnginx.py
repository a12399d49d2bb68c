"""nginx in front of ``wscluster up``'s nodes (``up --nginx PORT``): the standalone config of
``wscluster nginx-conf`` in a temporary prefix, nginx in the foreground, dying with ``up``."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

from . import nginx
from .embedded import die_with_parent


def nginx_binary() -> str | None:
    found = shutil.which("nginx")
    if found is None and Path("/usr/sbin/nginx").exists():
        found = "/usr/sbin/nginx"
    return found


class LocalNginx:
    """One nginx, listening on ``host:port``, balancing over ``upstreams`` (``HOST:PORT``)."""

    def __init__(self, host: str, port: int, upstreams: list[str], ping_interval: float) -> None:
        self.host, self.port = host, port
        self.options = nginx.NginxOptions(
            upstreams=tuple(nginx.parse_upstream(u) for u in upstreams),
            listen=(f"{host}:{port}",), ping_interval=ping_interval, standalone=True,
        )  # fmt: skip
        self.proc: subprocess.Popen[bytes] | None = None
        self._dir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/"

    def start(self, timeout: float = 10.0) -> None:
        """Start nginx and wait until it answers; RuntimeError says why it could not."""
        binary = nginx_binary()
        if binary is None:
            raise RuntimeError("nginx is not installed (Debian: apt-get install nginx)")
        self._dir = tempfile.TemporaryDirectory(prefix="wscluster-nginx-")
        prefix = Path(self._dir.name)
        (prefix / "logs").mkdir()
        (prefix / "nginx.conf").write_text(nginx.render(self.options))
        with open(prefix / "logs" / "stderr.log", "wb") as err:
            self.proc = subprocess.Popen(
                [binary, "-p", str(prefix), "-c", str(prefix / "nginx.conf"),
                 "-g", "daemon off;"],
                stdout=subprocess.DEVNULL, stderr=err, preexec_fn=die_with_parent,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                why = (prefix / "logs" / "stderr.log").read_text(errors="replace").strip()
                self.stop()
                raise RuntimeError(f"nginx exited: {why.splitlines()[-1] if why else '?'}")
            try:
                with urllib.request.urlopen(self.url + "nodes.json", timeout=1):
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"nginx did not answer on {self.url} within {timeout:g} s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # fast shutdown: open WebSockets are closed at once
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None
