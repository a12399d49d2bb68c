"""One chaos scenario: the cluster, its publishers and counting subscribers, the load, the
settling, the figures (one JSON line) and the leak gates.

The fast tier runs with every ``pytest``; ``WSCLUSTER_SOAK=1`` runs the same scenarios
longer, heavier and with more rounds of each disturbance. ``WSCLUSTER_CHAOS_OUT=FILE``
also appends every scenario's JSON line to FILE.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import statistics
import time
from dataclasses import dataclass
from typing import Any

import aiohttp

from tests.cluster.conftest import Cluster, NodeProc

from .account import Account, account
from .client import CountingClient
from .load import Publisher

SOAK = os.environ.get("WSCLUSTER_SOAK") == "1"


@dataclass(frozen=True)
class Profile:
    rate: float  # messages per second, all publishers of a scenario together
    phase: float  # seconds of steady load before, between and after disturbances
    rounds: int  # disturbances per scenario
    subscribers: int  # counting subscribers per node that holds some
    timeout: float  # seconds, for pytest-timeout


FAST = Profile(rate=300, phase=1.5, rounds=1, subscribers=3, timeout=120)
# one Python process reads every subscriber: fan-out (rate x subscribers) stays near 10k/s
HEAVY = Profile(rate=1000, phase=10, rounds=4, subscribers=5, timeout=900)
PROFILE = HEAVY if SOAK else FAST

NODE_ARGS = [
    "--history", "group:*=10000/300s", "--history", "uid:*=10000/300s",
    "--check-interval", "1", "--node-heartbeat", "0.5", "--node-ttl", "3",
    # a client kept out for the whole of a Redis outage misses more than the default 1000
    # messages of a soak stream: that must stay replayable (0 lost with AOF)
    "--max-replay", "10000",
]  # fmt: skip


def spread(values: list[float]) -> dict[str, float | int]:
    """p50/p99/max in milliseconds (and how many)."""
    if not values:
        return {"n": 0}
    ms = sorted(v * 1000 for v in values)
    p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
    return {"n": len(ms), "p50": round(statistics.median(ms)), "p99": round(p99),
            "max": round(ms[-1])}  # fmt: skip


async def get_json(url: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as http, http.get(url) as r:
        return r.status, await r.json(content_type=None)


async def metric(nodes: list[NodeProc], name: str) -> float:
    """The sum of a metric's samples (all labels) over the nodes' /metrics."""
    total = 0.0
    async with aiohttp.ClientSession() as http:
        for node in nodes:
            async with http.get(f"{node.api_url}/metrics") as r:
                for row in (await r.text()).splitlines():
                    if row.startswith((f"{name} ", f"{name}{{")):
                        total += float(row.rsplit(" ", 1)[1])
    return total


async def wait_for(what: str, check: Any, timeout: float, every: float = 0.05) -> float:
    """Poll the async predicate ``check`` until true; the seconds it took."""
    t0 = time.monotonic()
    while not await check():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"{what}: not within {timeout} s")
        await asyncio.sleep(every)
    return time.monotonic() - t0


class Chaos:
    def __init__(self, scenario: str, cluster: Cluster, seed: int) -> None:
        self.scenario = scenario
        self.cluster = cluster
        self.seed = seed
        self.rng = random.Random(seed)
        self.subs: list[CountingClient] = []
        self.pubs: list[Publisher] = []
        self.t0 = time.monotonic()

    async def subscriber(self, name: str, node: int, groups: list[str]) -> CountingClient:
        c = CountingClient(name, self.cluster.ws_urls, node, f"{name}-{self.cluster.namespace}",
                           groups, random.Random(self.rng.random()))  # fmt: skip
        await c.start()
        c.since = {p.pid: p.sent for p in self.pubs}
        self.subs.append(c)
        return c

    def publisher(self, name: str, node: int, to: str, rate: float) -> Publisher:
        p = Publisher(f"{name}-{self.cluster.namespace}", self.cluster.ws_urls, node, to, rate,
                      random.Random(self.rng.random()))  # fmt: skip
        self.pubs.append(p)
        return p

    def uid(self, client: CountingClient) -> str:
        return f"uid:{client.uid}"

    async def resumed(self, clients: list[CountingClient], n: int, timeout: float = 15) -> None:
        """Wait until each client has reconnected ``n`` times in all and is connected."""

        async def done() -> bool:
            return all(len(c.reconnects) >= n and c.connected
                       and (not c.reconnects or c.reconnects[-1].up is not None)
                       for c in clients)  # fmt: skip

        await wait_for(f"{len(clients)} clients resumed", done, timeout)

    async def steady_load(self, group: str, uid_of: int = 0) -> None:
        """The usual load: PROFILE.subscribers subscribers of ``group`` on nodes 1 and 2,
        a publisher on node 0 into the group (80% of PROFILE.rate) and one to the uid of
        subscriber ``uid_of`` (20%), started."""
        for node in (1, 2):
            for i in range(PROFILE.subscribers):
                await self.subscriber(f"s{node}.{i}", node, [group])
        self.publisher("pg", 0, f"group:{group}", PROFILE.rate * 0.8)
        self.publisher("pu", 0, self.uid(self.subs[uid_of]), PROFILE.rate * 0.2)
        self.start_load()

    def start_load(self) -> None:
        for p in self.pubs:
            p.start()

    async def stop_load(self, settle: float = 3.0, limit: float = 20.0) -> None:
        """Stop the publishers, then wait until every subscriber has every acked message,
        or nothing more arrived for ``settle`` seconds."""
        await asyncio.gather(*(p.stop() for p in self.pubs))
        t0 = last_change = time.monotonic()
        seen = -1
        while time.monotonic() - t0 < limit:
            total = self.total()
            if total.missing == 0:
                return
            if total.delivered != seen:
                seen, last_change = total.delivered, time.monotonic()
            elif time.monotonic() - last_change > settle:
                return
            await asyncio.sleep(0.1)

    def total(self, clients: list[CountingClient] | None = None) -> Account:
        acc = Account()
        for c in self.subs if clients is None else clients:
            acc.add(account(c, self.pubs))
        return acc

    def figures(self, clients: list[CountingClient] | None = None) -> dict[str, Any]:
        clients = self.subs if clients is None else clients
        acc = self.total(clients)
        resumes: dict[str, int] = {}
        gaps: dict[str, int] = {}
        for c in clients:
            for ack in c.resume_acks:
                for entry in (ack.get("streams") or {}).values():
                    key = "recovered" if entry.get("recovered") else str(entry.get("reason"))
                    resumes[key] = resumes.get(key, 0) + 1
            for ev in c.log:
                if getattr(ev, "kind", None) == "gap":
                    gaps[ev.reason] = gaps.get(ev.reason, 0) + 1  # type: ignore[union-attr]
        return {
            "subscribers": len(clients), "expected": acc.expected, "delivered": acc.delivered,
            "missing": acc.missing, "reported": acc.reported, "lost": acc.lost,
            "dup": acc.dup, "disorder": acc.disorder, "lost_seqs": acc.lost_seqs,
            "unacked_delivered": acc.unacked_delivered,
            "dropped_dups": sum(c.dropped for c in clients),
            "anomalies": sum(len(c.anomalies) for c in clients),
            "anomaly_samples": [f"{c.name}: {a}" for c in clients for a in c.anomalies][:3],
            "errors": sum(e.get("code") != "unavailable" for c in clients for e in c.errors),
            "unavailable": sum(e.get("code") == "unavailable" for c in clients for e in c.errors),
            "reconnects": sum(len(c.reconnects) for c in clients),
            "resume": resumes, "gaps": gaps,
        }  # fmt: skip

    def report(self, **extra: Any) -> dict[str, Any]:
        """Print the scenario's JSON line and return it."""
        pubs = self.pubs
        line = {
            "scenario": self.scenario, "seed": self.seed, "soak": SOAK,
            "seconds": round(time.monotonic() - self.t0, 1),
            "published": sum(p.sent for p in pubs), "acked": sum(len(p.acked) for p in pubs),
            "refused": sum(len(p.refused) for p in pubs),
            "unanswered": sum(len(p.unknown) for p in pubs),
            **self.figures(), **extra,
        }  # fmt: skip
        text = json.dumps(line)
        print(text, flush=True)
        if out := os.environ.get("WSCLUSTER_CHAOS_OUT"):
            with open(out, "a") as f:
                f.write(text + "\n")
        return line

    def explain(self, line: dict[str, Any], clients: list[CountingClient] | None = None) -> str:
        """The figures, then what went wrong per client (for assertion messages)."""
        rows = [json.dumps(line)]
        for c in self.subs if clients is None else clients:
            a = account(c, self.pubs)
            if not a.exact or c.anomalies or c.errors:
                rows.append(f"{c.name} nodes={c.nodes} {a} anomalies={c.anomalies[:5]} "
                            f"errors={c.errors[:3]} resume_acks={c.resume_acks[:3]}")  # fmt: skip
        return "\n".join(rows)

    async def close(self) -> None:
        """Close every client and publisher (again: it does no harm)."""
        for c in self.subs:
            await c.stop()
        await asyncio.gather(*(p.close() for p in self.pubs))

    async def leak_gates(self) -> dict[str, float]:
        """Connection counts, processes and tasks back to what they must be; the seconds the
        counts took to settle."""
        live = [n for n in self.cluster.nodes if n.proc is not None and n.proc.poll() is None]
        api = live[0].api_url
        conns = sum(c.connected for c in self.subs) + sum(p.connected for p in self.pubs)

        async def stats_say(n: int) -> bool:
            _, stats = await get_json(f"{api}/api/stats")
            return bool(stats["connections"] == n and len(stats["nodes"]) == len(live))

        open_s = await wait_for(f"stats counting {conns} connections", lambda: stats_say(conns),
                                10, 0.1)  # fmt: skip
        await self.close()
        closed_s = await wait_for("stats counting 0 connections", lambda: stats_say(0), 10, 0.1)
        stray = node_pids(self.cluster.namespace) - {n.proc.pid for n in live if n.proc}
        assert not stray, f"stray node processes: {stray}"
        tasks = [t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith("chaos-")]
        assert not tasks, f"tasks left running: {tasks}"
        return {"open_s": round(open_s, 2), "closed_s": round(closed_s, 2)}


def node_pids(namespace: str) -> set[int]:
    """Processes whose command line names the cluster's namespace (its node processes)."""
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if namespace.encode() in f.read().split(b"\0"):
                        found.add(int(entry))
            except OSError:
                continue
    return found
