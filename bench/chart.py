"""The PNG chart (matplotlib, from the ``bench`` extra): one row per scenario.

Message scenarios: deliveries/s over time (left) and latency p50/p90/p99/max per phase
(right, log scale). idle: handshakes/s and RSS per connection. storm: the share of clients
reconnected over time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

COLORS = {"wscluster": "tab:blue", "python-socketio": "tab:orange",
          "socketio-node": "tab:green", "picows-echo": "tab:gray"}  # fmt: skip
PCTS = ("p50", "p90", "p99", "max")
SMOOTH_S = 0.5  # the timeline's resolution


def draw(results: list[dict[str, Any]], path: Path, title: str) -> Path | None:
    """Write the chart; None (and nothing written) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    scenarios = list(dict.fromkeys(r["scenario"] for r in results))
    fig, axes = plt.subplots(len(scenarios), 2, figsize=(14, 3.6 * len(scenarios)),
                             squeeze=False)  # fmt: skip
    for row, scenario in zip(axes, scenarios, strict=True):
        runs = [r for r in results if r["scenario"] == scenario]
        if scenario in ("fanout", "private", "rooms"):
            _timeline(row[0], runs, scenario)
            _latency(row[1], runs, scenario)
        elif scenario == "idle":
            _bars(row[0], runs, "handshakes_per_s", "idle: handshakes/s")
            _bars(row[1], runs, "rss_per_conn_kib", "idle: RSS per connection (KiB, node 0)")
        else:
            _storm(row[0], runs)
            _bars(row[1], runs, "reconnects_per_s", "storm: reconnects/s")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / (3.6 * len(scenarios))))  # 0.4 in for the title
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _color(system: str) -> str:
    return COLORS.get(system, "tab:purple")


def _timeline(ax: Any, runs: list[dict[str, Any]], scenario: str) -> None:
    for r in runs:
        tl = r.get("timeline") or {}
        raw, bucket = tl.get("deliveries", []), tl.get("bucket_s", 0.1)
        k = max(1, round(SMOOTH_S / bucket))  # sum 100 ms buckets into SMOOTH_S
        counts = [sum(raw[i : i + k]) for i in range(0, len(raw), k)]
        step = bucket * k
        per_s = [c / step for c in counts]
        xs = [(i + 0.5) * step for i in range(len(per_s))]
        # phases start at different times per system: align each on its first phase
        x0 = (tl.get("phase_starts") or [0])[0]
        ax.plot([x - x0 for x in xs], per_s, label=r["system"], color=_color(r["system"]),
                linewidth=0.8)  # fmt: skip
        for s in (tl.get("phase_starts") or [])[1:]:
            ax.axvline(s - x0, color=_color(r["system"]), linestyle=":", linewidth=0.8)
    ax.set_title(f"{scenario}: deliveries/s (fixed rate, then flat out after the dotted line)",
                 fontsize=9)  # fmt: skip
    ax.set_xlabel("s")
    ax.set_xlim(left=0)
    ax.legend(fontsize=8)


def _latency(ax: Any, runs: list[dict[str, Any]], scenario: str) -> None:
    groups = [(ph, p) for ph in ("fixed_rate", "flat_out") for p in PCTS]
    width = 0.8 / max(1, len(runs))
    for i, r in enumerate(runs):
        vals = [((r.get(ph) or {}).get("latency_ms") or {}).get(p) or 0 for ph, p in groups]
        ax.bar([g + i * width for g in range(len(groups))], vals, width, label=r["system"],
               color=_color(r["system"]))  # fmt: skip
    ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))])
    ax.set_xticklabels([f"{'fixed' if ph == 'fixed_rate' else 'flat'}\n{p}" for ph, p in groups],
                       fontsize=8)  # fmt: skip
    ax.set_yscale("log")
    ax.set_ylabel("ms")
    ax.set_title(f"{scenario}: publish -> receive latency", fontsize=9)
    ax.legend(fontsize=8)


def _bars(ax: Any, runs: list[dict[str, Any]], key: str, title: str) -> None:
    names = [r["system"] for r in runs]
    vals = [r.get(key) or 0 for r in runs]
    ax.bar(names, vals, color=[_color(n) for n in names])
    for x, v in enumerate(vals):
        ax.annotate(f"{v:,.1f}", (x, v), ha="center", va="bottom", fontsize=8)
    ax.set_title(title, fontsize=9)


def _storm(ax: Any, runs: list[dict[str, Any]]) -> None:
    for r in runs:
        cdf = r.get("cdf") or []
        ax.plot(cdf, list(range(len(cdf))), label=r["system"], color=_color(r["system"]))
    ax.set_xlabel("s after every client closed")
    ax.set_ylabel("% reconnected")
    ax.set_title("storm: reconnected over time", fontsize=9)
    ax.legend(fontsize=8)
