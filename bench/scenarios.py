"""The five scenarios, each run against one started system with a fresh set of load workers.

Workers ``0 .. load_procs-1`` hold receivers (group members, private receivers, idle
connections); workers ``load_procs ..`` hold senders (the fan-out publisher, private
senders), so a sender's timing is not disturbed by the receive load. In ``rooms`` every
member both sends and receives, spread over all workers.
"""

from __future__ import annotations

import argparse
import array
import resource
import time
from typing import Any

from .loadgen import CONNECTED, RECEIVED, Load, Spec
from .progress import Bar
from .systems import System, cpu_seconds, rss_kib

PHASES = ((0, "fixed_rate"), (1, "flat_out"))


def percentiles(samples: array.array[float]) -> dict[str, float | None]:
    if not samples:
        return {"p50": None, "p90": None, "p99": None, "max": None}
    s = sorted(samples)

    def pick(q: float) -> float:
        return round(s[min(len(s) - 1, int(q * len(s)))], 2)

    return {"p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99), "max": round(s[-1], 2)}


def plan(scenario: str, system: System, a: argparse.Namespace) -> list[list[Spec]]:
    urls, n = system.urls, len(system.urls)
    rx, tx = a.load_procs, a.send_procs
    per: list[list[Spec]] = [[] for _ in range(rx + tx)]
    if scenario == "fanout":
        for i in range(a.members):
            per[i % rx].append((urls[i % n], None, "bench", None, 0))
        per[rx].append((urls[1 % n], "publisher", None, "group:bench", a.members))
    elif scenario == "private":
        for i in range(a.pairs):
            per[i % rx].append((urls[i % n], f"r{i}", None, None, 0))
            per[rx + i % tx].append((urls[(i + 1) % n], f"s{i}", None, f"uid:r{i}", 1))
    elif scenario == "rooms":
        for k in range(a.rooms):
            for j in range(a.room_size):
                i = k * a.room_size + j
                per[i % len(per)].append(
                    (urls[i % n], f"m{i}", f"room{k}", f"group:room{k}", a.room_size))
    elif scenario == "idle":
        for i in range(a.idle):
            per[i % len(per)].append((urls[0], None, None, None, 0))
    elif scenario == "storm":
        for i in range(a.storm):  # logged in and in one group, restored on reconnect
            per[i % len(per)].append((urls[i % n], f"u{i}", f"g{i % 100}", None, 0))
    return per


class Run:
    """One scenario against one system: workers, CPU accounting, the result dict."""

    def __init__(self, scenario: str, system: System, a: argparse.Namespace) -> None:
        self.scenario, self.system, self.a = scenario, system, a
        self.specs = plan(scenario, system, a)
        self.load = Load(a.load_procs + a.send_procs, a.load_cpus)
        self.pids = {**system.procs, **{f"load{i}": p for i, p in enumerate(self.load.pids)}}
        self.cpu0 = {k: cpu_seconds(p) for k, p in self.pids.items()}
        self.self0 = _self_cpu()
        self.t0 = time.time()
        self.out: dict[str, Any] = {"scenario": scenario, "system": system.name,
                                    "nodes": len(system.urls)}  # fmt: skip

    def open(self) -> dict[str, Any]:
        total = sum(len(s) for s in self.specs)
        bar = Bar(total, f"{self.system.name} {self.scenario}: connect", "conn")
        kw: list[dict[str, Any] | None] = [
            {"proto": self.system.proto, "specs": s, "concurrency": self.a.concurrency,
             "sources": self.a.sources, "origin": self.t0} for s in self.specs]  # fmt: skip
        try:
            res = self.load.call("open", kw, tick=lambda: bar.update_to(
                self.load.total(CONNECTED)))  # fmt: skip
        finally:
            bar.close()
        connected = sum(r["connected"] for r in res)
        span = max(r["t1"] for r in res) - min(r["t0"] for r in res)
        self.out.update({
            "connections": connected, "connect_failures": total - connected,
            "connect_errors": [e for r in res for e in r["errors"]][:3],
            "connect_s": round(span, 2),
            "handshakes_per_s": round(connected / span, 1) if span > 0 else None,
        })  # fmt: skip
        return self.out

    def finish(self) -> dict[str, Any]:
        cpu = {}
        for k, p in self.pids.items():
            before, after = self.cpu0.get(k), cpu_seconds(p)
            if before is not None and after is not None:
                cpu[k] = round(after - before, 2)
        cpu["bench"] = round(_self_cpu() - self.self0, 2)
        self.out["wall_s"] = round(time.time() - self.t0, 1)
        self.out["cpu_s"] = cpu
        self.out["rss_mib"] = {k: round(r / 1024, 1) for k, p in self.system.procs.items()
                               if (r := rss_kib(p)) is not None}  # fmt: skip
        self.out["crashed"] = self.system.crashed()
        return self.out

    def close(self) -> None:
        try:
            self.load.all("close", timeout=60)
        except Exception:
            pass
        self.load.stop()


def _self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _wait(label: str, secs: float, load: Load, bar_total: float | None = None) -> Any:
    """A time-based progress bar's tick: shows elapsed seconds and the delivery rate."""
    bar = Bar(bar_total or secs, label, "s")
    start, last = time.monotonic(), [time.monotonic(), load.total(RECEIVED)]

    def tick() -> None:
        now, got = time.monotonic(), load.total(RECEIVED)
        if now - last[0] >= 0.5:
            rate = (got - last[1]) / (now - last[0])
            last[0], last[1] = now, got
            bar.update_to(min(now - start, bar.total), f"{rate:,.0f} deliveries/s")

    return bar, tick


def _settle(load: Load, expected: int, quiet: float = 2.0, cap: float = 30.0) -> None:
    """Wait until every promised delivery arrived, or nothing arrived for ``quiet`` s."""
    deadline = time.monotonic() + cap
    last, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        got = load.total(RECEIVED)
        if got >= expected:
            return
        if got != last:
            last, since = got, time.monotonic()
        elif time.monotonic() - since > quiet:
            return
        time.sleep(0.1)


def run_messages(run: Run) -> dict[str, Any]:
    a, load = run.a, run.load
    out = run.open()
    time.sleep(0.5)  # joins are acked barriers already; let presence writes settle
    rate = {"fanout": a.fanout_rate, "private": a.private_rate, "rooms": a.rooms_rate}
    total_rate = rate[run.scenario]
    window = a.windows[run.scenario]
    out["window"] = window
    senders = [sum(1 for s in spec if s[3] is not None) for spec in run.specs]
    n_senders = max(1, sum(senders))
    phases: list[dict[str, Any]] = []
    expected = 0
    for (phase, name), secs in zip(PHASES, (a.duration, a.flat), strict=True):
        flat = phase == 1
        kw = [None if not k else {"phase": phase, "rate": total_rate * k / n_senders,
                                  "duration": secs, "window": window, "flat": flat}
              for k in senders]  # fmt: skip
        bar, tick = _wait(f"{run.system.name} {run.scenario}: {name}", secs, load)
        try:
            res = [r for r in load.call("phase", kw, timeout=secs + 120, tick=tick) if r]
        finally:
            bar.close()
        expected += sum(r["expected"] for r in res)
        _settle(load, expected)
        phases.append({"start": min(r["start"] for r in res), "end": max(r["end"] for r in res),
                       "sent": sum(r["sent"] for r in res), "acked": sum(r["acked"] for r in res),
                       "expected": sum(r["expected"] for r in res),
                       "unacked": sum(r["unacked"] for r in res),
                       "errors": _merge(r["errors"] for r in res)})  # fmt: skip
    stats = load.all("stats")
    for (p, name), ph in zip(PHASES, phases, strict=True):
        count = sum(s["count"][p] for s in stats)
        lat: array.array[float] = array.array("d")
        for s in stats:
            lat.frombytes(s["lat"][p])
        lasts = [s["last"][p] for s in stats if s["count"][p]]
        span = (max(lasts) - ph["start"]) if lasts else 0.0
        secs = max(ph["end"] - ph["start"], 1e-9)
        out[name] = {
            "target_rate": None if p else total_rate, "sent": ph["sent"], "acked": ph["acked"],
            "send_errors": ph["errors"], "unacked": ph["unacked"],
            "sends_per_s": round(ph["acked"] / secs, 1),
            "deliveries": count, "expected": ph["expected"],
            "deliveries_per_s": round(count / span, 1) if span > 0 else 0.0,
            "latency_ms": percentiles(lat), "lost": ph["expected"] - count,
        }  # fmt: skip
    out["lost"] = sum(out[name]["lost"] for _, name in PHASES)
    out["closed_by_server"] = _merge(s["closes"] for s in stats)
    timeline = array.array("I")
    for s in stats:
        t = array.array("I")
        t.frombytes(s["timeline"])
        timeline.extend([0] * max(0, len(t) - len(timeline)))
        for i, v in enumerate(t):
            timeline[i] += v
    starts = [round(ph["start"] - run.t0, 2) for ph in phases]
    out["timeline"] = {"bucket_s": 0.1, "deliveries": list(timeline), "phase_starts": starts}
    return out


def run_idle(run: Run) -> dict[str, Any]:
    pids = run.system.server_pids
    before = [rss_kib(p) for p in pids]
    out = run.open()
    time.sleep(2.0)  # let the server settle (presence writes, buffers)
    after = [rss_kib(p) for p in pids]
    n = out["connections"]
    if pids and before[0] is not None and after[0] is not None and n:
        out["rss_before_mib"] = round(before[0] / 1024, 1)
        out["rss_after_mib"] = round(after[0] / 1024, 1)
        out["rss_per_conn_kib"] = round((after[0] - before[0]) / n, 2)
    return out


def run_storm(run: Run) -> dict[str, Any]:
    a, load = run.a, run.load
    out = run.open()
    time.sleep(1.0)
    total = out["connections"]
    bar = Bar(total, f"{run.system.name} storm: reconnect", "conn")
    try:
        res = load.all("storm", timeout=a.storm_timeout + 60, concurrency=a.storm_concurrency,
                       give_up=a.storm_timeout,
                       tick=lambda: bar.update_to(load.total(CONNECTED)))  # fmt: skip
    finally:
        bar.close()
    t0 = min(r["t0"] for r in res)
    times: list[float] = []
    for r in res:
        arr = array.array("d")
        arr.frombytes(r["times"])
        times.extend(r["t0"] + t - t0 for t in arr)
    times.sort()
    done = len(times)

    def pick(q: float) -> float | None:
        return round(times[min(done - 1, int(q * done))], 3) if done else None

    out.update({
        "reconnected": done, "reconnect_failed": sum(r["failed"] for r in res),
        "reconnect_errors": [e for r in res for e in r["errors"]][:3],
        "retries": sum(r["retries"] for r in res),
        "time_to_50pct_s": pick(0.5), "time_to_99pct_s": pick(0.99),
        "time_to_100pct_s": round(times[-1], 3) if done == total and done else None,
        "reconnects_per_s": round(done / times[-1], 1) if done and times[-1] > 0 else None,
        "cdf": [round(times[min(done - 1, int(q / 100 * done))], 3) for q in range(0, 101)]
        if done else [],
    })  # fmt: skip
    return out


def _merge(dicts: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = out.get(k, 0) + v
    return out


RUNNERS = {"fanout": run_messages, "private": run_messages, "rooms": run_messages,
           "idle": run_idle, "storm": run_storm}  # fmt: skip


def run_scenario(scenario: str, system: System, a: argparse.Namespace) -> dict[str, Any]:
    run = Run(scenario, system, a)
    try:
        RUNNERS[scenario](run)
        return run.finish()
    finally:
        run.close()
