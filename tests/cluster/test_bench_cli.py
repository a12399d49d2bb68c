"""The benchmark suite still runs: a tiny fan-out against wscluster only (no peers, no chart),
with nothing beyond the `test` extra. CI does not run real benchmarks; this guards the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_fanout_quick(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "bench", "fanout", "--quick", "--members", "200", "--duration",
           "1", "--flat", "1", "--repeat", "2", "--no-chart",
           "--results-dir", str(tmp_path)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    [path] = tmp_path.glob("*.json")
    doc = json.loads(path.read_text())
    [result] = doc["results"]
    assert result["system"] == "wscluster" and "error" not in result, result
    assert result["connections"] == 201 and result["connect_failures"] == 0
    for phase in ("fixed_rate", "flat_out"):
        assert result[phase]["deliveries"] > 0, result[phase]
        assert result[phase]["lost"] == 0, result[phase]
    assert result["lost"] == 0
    assert result["crashed"] == []
    assert [r["round"] for r in result["runs"]] == [1, 2]  # --repeat 2: the median of two
    low, high = result["spread"]["fixed_rate.deliveries_per_s"]
    assert low <= result["fixed_rate"]["deliveries_per_s"] <= high
    assert not list(tmp_path.glob("*.png"))  # --no-chart


def test_bench_help_without_extras() -> None:
    proc = subprocess.run([sys.executable, "-m", "bench", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=30)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "fanout" in proc.stdout and "--peer" in proc.stdout
