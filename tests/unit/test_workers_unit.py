"""The --workers supervisor when a worker cannot even be started (no process: Popen fails):
it retries with backoff like a worker that died at once, then gives up with exit code 1."""

from __future__ import annotations

import logging
import time

import pytest

from wscluster import workers
from wscluster.cli import build_parser, node_config


def test_a_worker_that_cannot_be_started_is_retried_then_given_up(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(workers, "BOOT_FAILURES", 3)
    parser = build_parser()
    args = parser.parse_args(["serve", "--workers", "2", "--anonymous", "--port", "18999",
                              "--broker", "memory://unit"])  # fmt: skip
    sup = workers.Supervisor(node_config(args), 2, args, parser)
    for worker in sup.workers:
        worker.argv[0] = "/nonexistent/python"
        worker.backoff = workers.Backoff(base=0.01, cap=0.02)
    started = time.monotonic()
    with caplog.at_level(logging.INFO, logger="wscluster.workers"):
        assert sup._watch() == 1
    assert time.monotonic() - started < 5
    assert all(w.proc is None for w in sup.workers)
    failures = [r for r in caplog.records if "could not be started" in r.getMessage()]
    assert len(failures) >= 3
    assert any("giving up" in r.getMessage() for r in caplog.records)
