"""The JavaScript client (clients/js) on a private 3-node cluster with history: runs its Node
tests (unit tests on a fake WebSocket, then integration tests against these nodes, resume and
offline delivery included; the last one kills the third node) with WSCLUSTER_TEST_CLUSTER
naming the cluster, and WSCLUSTER_TEST_JWT a node of its own that needs a JWT (the token in
the handshake's subprotocol)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import skip_or_fail
from wscluster.embedded import EmbeddedRedis

from .conftest import Cluster, NodeProc

MakeCluster = Callable[..., Cluster]
JS_DIR = Path(__file__).resolve().parents[2] / "clients" / "js"
# the rules clients/js/test/cluster.js gives a cluster it starts itself
HISTORY = ["--history", "group:*=1000/300s", "--history", "uid:*=1000/300s"]
JWT_SECRET = "js-client-test-secret-0123456789abcdefgh"


def _node_major(node: str) -> int:
    done = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=30)
    try:
        return int(done.stdout.strip().lstrip("v").split(".")[0])
    except ValueError:
        return 0


@pytest.mark.timeout(240)
def test_js_client_node_tests(
    valkey: EmbeddedRedis, make_cluster: MakeCluster, tmp_path: Path
) -> None:
    node = shutil.which("node")
    if node is None:
        skip_or_fail("node not found")
    assert node is not None
    if _node_major(node) < 20:
        skip_or_fail("the JavaScript client's tests need node >= 20")
    tests = sorted(str(p.relative_to(JS_DIR)) for p in JS_DIR.glob("test/*.test.js"))
    assert len(tests) >= 3, tests  # unit, resume (unit) and integration
    cluster = make_cluster(valkey.url, 3, HISTORY)
    jwt_args = ["--broker", valkey.url, "--namespace", f"t{uuid.uuid4().hex[:10]}",
                "--jwt-secret", JWT_SECRET]  # fmt: skip
    jwt_node = NodeProc(9, jwt_args, tmp_path)
    env = {
        **os.environ,
        "WSCLUSTER_TEST_CLUSTER": json.dumps({"ws": cluster.ws_urls, "api": cluster.api_urls}),
        "WSCLUSTER_TEST_JWT": json.dumps({"ws": jwt_node.ws_url, "secret": JWT_SECRET}),
    }
    try:
        jwt_node.start()
        done = subprocess.run(
            [node, "--experimental-websocket", "--test", *tests],
            cwd=JS_DIR, env=env, capture_output=True, text=True, timeout=180,
        )  # fmt: skip
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"node tests still running after 180 s:\n{exc.stdout!r}\n{exc.stderr!r}")
    finally:
        jwt_node.kill()
    if done.returncode != 0:
        nodes = [*cluster.nodes, jwt_node]
        logs = "\n".join(f"--- node{n.index} log ---\n{n.log()[-4000:]}" for n in nodes)
        pytest.fail(
            f"node --test exited with {done.returncode}\n--- stdout ---\n{done.stdout}\n"
            f"--- stderr ---\n{done.stderr}\n{logs}"
        )
    assert "# fail 0" in done.stdout
    lines = done.stdout.splitlines()
    passed = [int(line.split()[-1]) for line in lines if line.startswith("# pass ")]
    assert passed and passed[0] >= 71, done.stdout[-2000:]  # every test ran, none was skipped
    assert "# skipped 0" in done.stdout
