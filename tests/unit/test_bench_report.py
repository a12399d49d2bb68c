"""bench/report.py's median of repeated runs (pure)."""

from __future__ import annotations

from typing import Any

from bench.report import median_of, table


def run(rate: float, p99: float, lost: int, **extra: Any) -> dict[str, Any]:
    return {
        "scenario": "fanout", "system": "wscluster", "crashed": [],
        "fixed_rate": {"deliveries_per_s": rate, "latency_ms": {"p99": p99}, "lost": lost},
        "flat_out": {"deliveries_per_s": rate * 10}, "lost": lost,
        "timeline": {"deliveries": [rate]}, **extra,
    }  # fmt: skip


def test_one_run_is_itself() -> None:
    only = run(1.0, 2.0, 0)
    assert median_of([only]) is only


def test_every_number_is_its_own_median() -> None:
    runs = [run(100.0, 9.0, 0), run(300.0, 1.0, 2), run(200.0, 5.0, 0)]
    merged = median_of(runs)
    assert merged["fixed_rate"]["deliveries_per_s"] == 200.0
    assert merged["fixed_rate"]["latency_ms"]["p99"] == 5.0
    assert merged["flat_out"]["deliveries_per_s"] == 2000.0
    assert merged["lost"] == 0
    assert merged["spread"]["fixed_rate.latency_ms.p99"] == [1.0, 9.0]
    assert merged["spread"]["lost"] == [0, 2]
    assert [r["fixed_rate"]["deliveries_per_s"] for r in merged["runs"]] == [100.0, 300.0, 200.0]
    assert all("timeline" not in r for r in merged["runs"])
    assert merged["timeline"] == {"deliveries": [100.0]}  # the chart draws the first run
    assert merged["crashed"] == []


def test_even_count_averages_the_middle_two() -> None:
    merged = median_of([run(100.0, 4.0, 0), run(200.0, 6.0, 0)])
    assert merged["fixed_rate"]["deliveries_per_s"] == 150.0
    assert merged["fixed_rate"]["latency_ms"]["p99"] == 5.0


def test_values_missing_from_a_run_come_from_the_first() -> None:
    a, b = run(100.0, 4.0, 0, note="first"), run(200.0, 6.0, 0)
    del b["flat_out"]
    merged = median_of([a, b, run(300.0, 8.0, 0)])
    assert merged["flat_out"] == {"deliveries_per_s": 1000.0}
    assert merged["note"] == "first"


def test_table_shows_the_median() -> None:
    rows = table([median_of([run(100.0, 9.0, 0), run(300.0, 1.0, 0), run(200.0, 5.0, 0)])])
    by_label = {r[1]: r[2] for r in rows[1:]}
    assert by_label["fixed rate: deliveries/s"] == "200"
    assert by_label["fixed rate: p99 ms"] == "5"
