"""The results table (with wscluster / peer ratios) and the JSON file."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HIGHER, LOWER = "higher", "lower"


def _msg_figures(unit: str) -> list[tuple[str, str, str]]:
    return [
        ("fixed_rate.deliveries_per_s", f"fixed rate: {unit}/s", HIGHER),
        ("fixed_rate.latency_ms.p50", "fixed rate: p50 ms", LOWER),
        ("fixed_rate.latency_ms.p99", "fixed rate: p99 ms", LOWER),
        ("fixed_rate.latency_ms.max", "fixed rate: max ms", LOWER),
        ("flat_out.deliveries_per_s", f"flat out: {unit}/s", HIGHER),
        ("flat_out.sends_per_s", "flat out: sends acked/s", HIGHER),
        ("flat_out.latency_ms.p99", "flat out: p99 ms", LOWER),
        ("lost", "lost", LOWER),
    ]


FIGURES: dict[str, list[tuple[str, str, str]]] = {
    "fanout": _msg_figures("deliveries"),
    "private": _msg_figures("messages"),
    "rooms": _msg_figures("deliveries"),
    "idle": [
        ("handshakes_per_s", "handshakes/s", HIGHER),
        ("rss_per_conn_kib", "RSS per connection, KiB (node 0)", LOWER),
        ("connect_failures", "connect failures", LOWER),
    ],
    "storm": [
        ("time_to_100pct_s", "time to 100 % reconnected, s", LOWER),
        ("time_to_99pct_s", "time to 99 %, s", LOWER),
        ("reconnects_per_s", "reconnects/s", HIGHER),
        ("reconnect_failed", "reconnect failures", LOWER),
    ],
}


def pick(result: dict[str, Any], path: str) -> Any:
    value: Any = result
    for key in path.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One result from several runs of the same scenario and system: every number is the
    median of that number over the runs (each taken alone: a median row may mix runs);
    anything else, and anything missing from some run, comes from the first run. The runs
    themselves are kept under ``runs``, and the spread of each table figure under
    ``spread`` (path -> [min, max])."""
    if len(runs) == 1:
        return runs[0]
    merged = _median_tree(runs)
    for curve in ("timeline", "cdf"):  # the chart draws the first run's curves
        if curve in runs[0]:
            merged[curve] = runs[0][curve]
    merged["runs"] = [{k: v for k, v in r.items() if k not in ("timeline", "cdf")} for r in runs]
    spread: dict[str, list[float]] = {}
    for path, _label, _better in FIGURES.get(runs[0].get("scenario", ""), []):
        vals = [v for v in (pick(r, path) for r in runs) if _number(v)]
        if vals:
            spread[path] = [min(vals), max(vals)]
    merged["spread"] = spread
    return merged


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _median_tree(values: list[Any]) -> Any:
    first = values[0]
    if isinstance(first, dict):
        if not all(isinstance(v, dict) for v in values):
            return first
        return {k: _median_tree([v[k] for v in values]) if all(k in v for v in values) else x
                for k, x in first.items() if k not in ("timeline", "cdf", "runs", "spread")}
    if _number(first) and all(_number(v) for v in values):
        ordered = sorted(values)
        mid = len(ordered) // 2
        if len(ordered) % 2:
            return ordered[mid]
        return (ordered[mid - 1] + ordered[mid]) / 2
    return first


def ratio(mine: Any, theirs: Any, better: str) -> str:
    if not isinstance(mine, int | float) or not isinstance(theirs, int | float):
        return "-"
    if theirs == 0:
        return "=" if mine == 0 else "-"
    r = mine / theirs
    if abs(r - 1) < 0.02:  # a tie
        return f"{r:.2f}x"
    win = r > 1 if better == HIGHER else r < 1
    return f"{r:.2f}x {'+' if win else '-'}"


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:,.2f}".rstrip("0").rstrip(".")
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def table(results: list[dict[str, Any]]) -> list[list[str]]:
    """Rows of: scenario, figure, one column per system, then wscluster/peer per peer."""
    systems = list(dict.fromkeys(r["system"] for r in results))
    peers = [s for s in systems if s != "wscluster"]
    head = ["scenario", "figure", *systems, *(f"wscluster/{p}" for p in peers)]
    rows = [head]
    for scenario, figures in FIGURES.items():
        by = {r["system"]: r for r in results if r["scenario"] == scenario}
        if not by:
            continue
        for path, label, better in figures:
            vals = {s: pick(by[s], path) if s in by else None for s in systems}
            ratios = [ratio(vals.get("wscluster"), vals[p], better) for p in peers]
            rows.append([scenario, label, *(_fmt(vals[s]) for s in systems), *ratios])
        cpu_row = []
        for s in systems:
            cpu = by[s].get("cpu_s", {}) if s in by else {}
            server = sum(v for k, v in cpu.items() if not k.startswith(("load", "bench")))
            load = sum(v for k, v in cpu.items() if k.startswith(("load", "bench")))
            cpu_row.append(f"{server:.1f} / {load:.1f}" if cpu else "-")
        rows.append([scenario, "CPU s: servers+redis / load", *cpu_row, *(["" for _ in peers])])
    return rows


def render(rows: list[list[str]]) -> str:
    """A Markdown table (pasteable into docs/performance.md)."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]

    def line(r: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(rows[0]), sep, *(line(r) for r in rows[1:])])


def cpu_lines(results: list[dict[str, Any]]) -> str:
    out = []
    for r in results:
        cpu = " ".join(f"{k} {v:.1f}" for k, v in r.get("cpu_s", {}).items())
        out.append(f"{r['scenario']:<8} {r['system']:<16} wall {r.get('wall_s', 0):>6.1f} s  "
                   f"cpu s: {cpu}")  # fmt: skip
        for crash in r.get("crashed", []):
            out.append(f"    CRASHED: {crash}")
    return "\n".join(out)


def meta(argv: list[str], extra: dict[str, Any]) -> dict[str, Any]:
    info: dict[str, Any] = {
        "argv": argv, "time": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "cpus": os.cpu_count(), "python": platform.python_version(),
        "platform": platform.platform(), "loadavg_at_start": os.getloadavg(),
    }  # fmt: skip
    try:
        with open("/proc/meminfo") as f:
            info["mem_total_kib"] = int(f.readline().split()[1])
        with open("/proc/cpuinfo") as f:
            models = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        info["cpu_model"] = models[0] if models else None
    except OSError:
        pass
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=Path(__file__).parent, timeout=5)  # fmt: skip
        info["git"] = rev.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    info.update(extra)
    info["executable"] = sys.executable
    return info


def write(results_dir: Path, doc: dict[str, Any]) -> Path:
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return path
