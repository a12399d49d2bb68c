"""``wscluster serve --workers N``: this process supervises N worker processes, each a normal
node (``wscluster serve --workers 1``) with its own node id, all listening on the same public
port with SO_REUSEPORT (the kernel spreads new connections over them). Worker i gets the API
port ``api-port + i`` and the node name ``<node-name or host:port>/w<i>``; every other option
is the supervisor's own (so ``--max-connections`` is per worker).

SIGTERM or SIGINT is forwarded to every worker as SIGTERM (each drains as a single node does);
workers still running at ``--drain-timeout`` + 5 s are killed, then the supervisor exits 0. A
worker that dies is restarted with backoff; one that exits within 5 s of its start 3 times in
a row (a port in use, a broker it cannot reach...) stops the supervisor with its exit code.
The workers die with the supervisor, even when it is killed with SIGKILL."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time
from types import FrameType

from .backoff import Backoff
from .config import NodeConfig
from .embedded import die_with_parent

log = logging.getLogger("wscluster.workers")

BOOT_GRACE = 5.0  # seconds: a worker that exits sooner failed to start...
BOOT_FAILURES = 3  # ...and this many such failures in a row stop the supervisor
HEALTHY_RUN = 60.0  # seconds: a worker that ran this long restarts without delay
STOP_MARGIN = 5.0  # seconds after --drain-timeout before the workers still running are killed
_POLL = 0.1
_SET_PER_WORKER = frozenset({"workers", "reuse_port", "port", "api_port", "node_name",
                             "node_id"})


def _serve_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            serve: argparse.ArgumentParser = action.choices["serve"]
            return serve
    raise ValueError("the command line parser has no serve command")


def _default(action: argparse.Action) -> object:
    """An option's default as parsed (a default from the environment is a string)."""
    default = action.default
    if isinstance(default, str) and callable(action.type):
        try:
            return action.type(default)
        except (TypeError, ValueError):
            return default
    return default


def passed_options(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[str]:
    """The serve options of ``args`` that differ from their defaults, as command line words,
    except those set per worker. A worker inherits the environment, so what came from
    ``WSCLUSTER_*`` variables (secrets among them) stays out of its command line."""
    words: list[str] = []
    for action in _serve_parser(parser)._actions:
        if not action.option_strings or action.dest in _SET_PER_WORKER | {"help"}:
            continue
        value, flag = getattr(args, action.dest, None), action.option_strings[-1]
        if isinstance(action, argparse._StoreTrueAction):
            if value and not action.default:
                words.append(flag)
        elif isinstance(action, argparse._AppendAction):
            words += [f"{flag}={v}" for v in value or ()]
        elif value is not None and value != _default(action):
            words.append(f"{flag}={value}")
    return words


class _Worker:
    def __init__(self, index: int, argv: list[str], api: str, name: str) -> None:
        self.index = index
        self.argv = argv
        self.api = api  # its API base URL, for the log
        self.name = name
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0
        self.restart_at = 0.0
        self.early_exits = 0  # exits within BOOT_GRACE of the start, in a row
        self.backoff = Backoff(base=0.5, cap=10.0)


def _exit_code(returncode: int) -> int:
    """A worker's exit status as the supervisor's (killed by signal S: 128 + S, as a shell)."""
    return returncode if returncode > 0 else 128 - returncode if returncode < 0 else 1


class Supervisor:
    def __init__(
        self, config: NodeConfig, n: int, args: argparse.Namespace,
        parser: argparse.ArgumentParser,
    ) -> None:  # fmt: skip
        if config.port == 0:
            raise ValueError("--workers needs a fixed --port (not 0): the workers share it")
        api = config.effective_api_port
        if api == 0 or api + n - 1 > 65535:
            raise ValueError(f"--workers {n} uses API ports --api-port to --api-port + {n - 1}:"
                             f" {api}-{api + n - 1} is not a valid range")  # fmt: skip
        if api <= config.port < api + n:
            raise ValueError(f"the workers' API ports {api}-{api + n - 1} include the public "
                             f"--port {config.port}: pass another --api-port")  # fmt: skip
        self.config = config
        base = [sys.executable, "-m", "wscluster", "serve", *passed_options(args, parser),
                "--workers=1", "--reuse-port", f"--port={config.port}"]  # fmt: skip
        prefix = config.default_name
        self.workers: list[_Worker] = []
        for i in range(n):
            name = f"{prefix}/w{i}"
            argv = [*base, f"--api-port={api + i}", f"--node-name={name}"]
            self.workers.append(_Worker(i, argv, f"http://{config.api_host}:{api + i}", name))
        self._signals: list[int] = []

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signals.append(signum)

    def run(self) -> int:
        """Start the workers and watch them until a signal (0) or a failed start (its code)."""
        handled = (signal.SIGTERM, signal.SIGINT)
        previous = {sig: signal.signal(sig, self._on_signal) for sig in handled}
        log.info("supervisor pid %d: %d workers on ws://%s:%d/ws",
                 os.getpid(), len(self.workers), self.config.host,
                 self.config.port)  # fmt: skip
        try:
            code = self._watch()
            if code is None:
                log.info("%s: stopping the workers (each drains)",
                         signal.Signals(self._signals[0]).name)  # fmt: skip
            self._stop_all()
            return code or 0
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _watch(self) -> int | None:
        while not self._signals:
            now = time.monotonic()
            for worker in self.workers:
                if worker.proc is None:
                    if now >= worker.restart_at and (code := self._spawn(worker)) is not None:
                        return code
                    continue
                returncode = worker.proc.poll()
                if returncode is not None and not self._signals:
                    code = self._exited(worker, returncode, now)
                    if code is not None:
                        return code
            time.sleep(_POLL)
        return None

    def _spawn(self, worker: _Worker) -> int | None:
        """Start a worker; a start that fails (no process at all) counts as an exit at once."""
        worker.started = time.monotonic()
        try:
            worker.proc = subprocess.Popen(worker.argv, preexec_fn=die_with_parent)
        except OSError as exc:  # out of processes or memory, a vanished interpreter...
            log.error("worker %d could not be started: %s", worker.index, exc)
            return self._exited(worker, 1, worker.started)
        log.info("worker %d: pid %d, api %s/healthz, node name %s",
                 worker.index, worker.proc.pid, worker.api, worker.name)  # fmt: skip
        return None

    def _exited(self, worker: _Worker, returncode: int, now: float) -> int | None:
        """Schedule the restart of a worker that exited (or never started: no process);
        its exit code when we give up."""
        pid = worker.proc.pid if worker.proc is not None else 0
        lived, worker.proc = now - worker.started, None
        if lived < BOOT_GRACE:
            worker.early_exits += 1
        else:
            worker.early_exits = 0
            if lived >= HEALTHY_RUN:
                worker.backoff.reset()
        if worker.early_exits >= BOOT_FAILURES:
            log.error("worker %d exited with code %d within %.0f s of its start %d times in a "
                      "row (see its error above): giving up", worker.index, returncode,
                      BOOT_GRACE, worker.early_exits)  # fmt: skip
            return _exit_code(returncode)
        delay = worker.backoff.next()
        log.warning("worker %d (pid %d) exited unexpectedly with code %d after %.1f s; "
                    "restarting it in %.1f s", worker.index, pid, returncode, lived,
                    delay)  # fmt: skip
        worker.restart_at = now + delay
        return None

    def _stop_all(self) -> None:
        """SIGTERM every worker (it drains), wait for all, kill those left at the bound."""
        running = [w.proc for w in self.workers if w.proc is not None]
        for proc in running:
            proc.send_signal(signal.SIGTERM)  # a no-op for a worker already reaped
        deadline = time.monotonic() + self.config.drain_timeout + STOP_MARGIN
        for proc in running:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("worker pid %d still running %.0f s after SIGTERM: killing it",
                            proc.pid, self.config.drain_timeout + STOP_MARGIN)  # fmt: skip
                proc.kill()
                proc.wait()
        for worker in self.workers:
            worker.proc = None
