"""The JavaScript client (clients/js) on a private 3-node cluster with history: runs its Node
tests (unit tests on a fake WebSocket, then integration tests against these nodes, resume and
offline delivery included; the last one kills the third node) with WSCLUSTER_TEST_CLUSTER
naming the cluster."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import skip_or_fail
from wscluster.embedded import EmbeddedRedis

from .conftest import Cluster

MakeCluster = Callable[..., Cluster]
JS_DIR = Path(__file__).resolve().parents[2] / "clients" / "js"
# the rules clients/js/test/cluster.js gives a cluster it starts itself
HISTORY = ["--history", "group:*=1000/300s", "--history", "uid:*=1000/300s"]


def _node_major(node: str) -> int:
    done = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=30)
    try:
        return int(done.stdout.strip().lstrip("v").split(".")[0])
    except ValueError:
        return 0


@pytest.mark.timeout(240)
def test_js_client_node_tests(valkey: EmbeddedRedis, make_cluster: MakeCluster) -> None:
    node = shutil.which("node")
    if node is None:
        skip_or_fail("node not found")
    assert node is not None
    if _node_major(node) < 20:
        skip_or_fail("the JavaScript client's tests need node >= 20")
    tests = sorted(str(p.relative_to(JS_DIR)) for p in JS_DIR.glob("test/*.test.js"))
    assert len(tests) >= 3, tests  # unit, resume (unit) and integration
    cluster = make_cluster(valkey.url, 3, HISTORY)
    env = {
        **os.environ,
        "WSCLUSTER_TEST_CLUSTER": json.dumps({"ws": cluster.ws_urls, "api": cluster.api_urls}),
    }
    try:
        done = subprocess.run(
            [node, "--experimental-websocket", "--test", *tests],
            cwd=JS_DIR, env=env, capture_output=True, text=True, timeout=180,
        )  # fmt: skip
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"node tests still running after 180 s:\n{exc.stdout!r}\n{exc.stderr!r}")
    if done.returncode != 0:
        logs = "\n".join(f"--- node{n.index} log ---\n{n.log()[-4000:]}" for n in cluster.nodes)
        pytest.fail(
            f"node --test exited with {done.returncode}\n--- stdout ---\n{done.stdout}\n"
            f"--- stderr ---\n{done.stderr}\n{logs}"
        )
    assert "# fail 0" in done.stdout
    lines = done.stdout.splitlines()
    passed = [int(line.split()[-1]) for line in lines if line.startswith("# pass ")]
    assert passed and passed[0] >= 65, done.stdout[-2000:]  # every test ran, none was skipped
    assert "# skipped 0" in done.stdout
