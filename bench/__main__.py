"""wscluster benchmark suite: wscluster and its peers, side by side, in one run.

    python -m bench                                   # every scenario, wscluster only
    python -m bench fanout private --peer python-socketio --peer socketio-node
    python -m bench --quick                           # small sizes, seconds per scenario
    python -m bench fanout --url ws://h:8001/ws,ws://h:8002/ws --pids 1234,1235

For each scenario and each system it starts a private valkey and the servers (wscluster:
--nodes `wscluster serve` processes; python-socketio: 2 processes with AsyncRedisManager;
socketio-node: 2 Node socket.io processes with @socket.io/redis-adapter, installed with npm
into bench/peers/node on first use), drives them from separate load processes speaking each
system's wire protocol on raw picows connections, then stops everything. Results: a table
with wscluster/peer ratios, bench/results/<time>.json and a PNG chart next to it.

scenarios:
  fanout   --members clients spread over the nodes join one group; a publisher on node 1
           sends --fanout-rate msg/s for --duration s, then flat out (--window in flight)
           for --flat s: deliveries/s, publish->receive latency, lost
  private  --pairs sender->receiver pairs on different nodes (send to uid:<receiver>)
  rooms    --rooms groups of --room-size members; members send to their own room
  idle     --idle idle connections to node 0: handshakes/s, server RSS per connection
  storm    --storm clients (logged in, one group each) close at once and reconnect at once:
           time until 100 % are connected, logged in and joined again
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
from pathlib import Path
from typing import Any

SCENARIOS = ("fanout", "private", "rooms", "idle", "storm")
PEER_NAMES = ("python-socketio", "socketio-node", "picows-echo", "floor")
RESULTS = Path(__file__).resolve().parent / "results"
# flat out: sends in flight per sending process. Large enough that the servers, not the
# round trip, limit the rate (private at 64 in flight measured the ack latency, not the peers)
WINDOWS = {"fanout": 64, "private": 1024, "rooms": 1024}

# the sizes (real runs) and a small preset (--quick: smoke runs, seconds each)
FULL = {"members": 2000, "fanout_rate": 5.0, "pairs": 500, "private_rate": 1000.0,
        "rooms": 1000, "room_size": 10, "rooms_rate": 1000.0, "idle": 10000, "storm": 10000,
        "duration": 10.0, "flat": 5.0}  # fmt: skip
QUICK = {"members": 300, "fanout_rate": 20.0, "pairs": 100, "private_rate": 200.0,
         "rooms": 30, "room_size": 10, "rooms_rate": 100.0, "idle": 1000, "storm": 1000,
         "duration": 2.0, "flat": 1.0}  # fmt: skip


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("scenarios", nargs="*", metavar="scenario",
                    help=f"any of {', '.join(SCENARIOS)} (default: all)")  # fmt: skip
    ap.add_argument("--peer", action="append", default=[], choices=PEER_NAMES,
                    help="also measure this peer (repeatable); picows-echo: idle only (a bare "
                         "picows server); floor: fanout only (the kernel's cost alone, "
                         "bench/floor.py)")
    ap.add_argument("--quick", action="store_true",
                    help=f"small sizes (the defaults below become: {_fmt(QUICK)})")
    g = ap.add_argument_group("systems")
    g.add_argument("--nodes", type=int, default=2, help="wscluster nodes (default 2)")
    g.add_argument("--peer-nodes", type=int, default=2, help="server processes per peer (2)")
    g.add_argument("--url", help="comma-separated ws:// URLs of a running wscluster: start none")
    g.add_argument("--pids", default="", help="with --url: node PIDs, for CPU and RSS")
    g.add_argument("--node-args", default="", help="extra `wscluster serve` options")
    g.add_argument("--pysio-mode", choices=["asgi", "aiohttp"], default="asgi",
                   help="python-socketio under uvicorn (asgi, default) or aiohttp.web")
    s = ap.add_argument_group("sizes (defaults: the issue's; --quick makes them small)")
    s.add_argument("--members", type=int, help=f"fanout group size ({FULL['members']})")
    s.add_argument("--fanout-rate", type=float,
                   help=f"fanout fixed rate, msg/s ({FULL['fanout_rate']:g}: 10k deliveries/s)")
    s.add_argument("--pairs", type=int, help=f"private pairs ({FULL['pairs']})")
    s.add_argument("--private-rate", type=float,
                   help=f"private fixed rate, msg/s in total ({FULL['private_rate']:g})")
    s.add_argument("--rooms", type=int, help=f"rooms ({FULL['rooms']})")
    s.add_argument("--room-size", type=int, help=f"members per room ({FULL['room_size']})")
    s.add_argument("--rooms-rate", type=float,
                   help=f"rooms fixed rate, msg/s in total ({FULL['rooms_rate']:g})")
    s.add_argument("--idle", type=int, help=f"idle connections to node 0 ({FULL['idle']})")
    s.add_argument("--storm", type=int, help=f"storm clients ({FULL['storm']})")
    s.add_argument("--duration", type=float, help=f"fixed-rate seconds ({FULL['duration']:g})")
    s.add_argument("--flat", type=float, help=f"flat-out seconds ({FULL['flat']:g})")
    windows = ", ".join(f"{k} {v}" for k, v in WINDOWS.items())
    s.add_argument("--window", type=int,
                   help=f"flat out: unacked sends in flight per sending process ({windows})")
    ld = ap.add_argument_group("load generator")
    ld.add_argument("--load-procs", type=int, default=2, help="receiving processes (2)")
    ld.add_argument("--send-procs", type=int, default=1, help="sending processes (1)")
    ld.add_argument("--concurrency", type=int, default=256,
                    help="handshakes in flight per process while connecting (256)")
    ld.add_argument("--storm-concurrency", type=int, default=2048,
                    help="storm: reconnects in flight per process (2048)")
    ld.add_argument("--storm-timeout", type=float, default=120.0,
                    help="storm: give up on a client after this many seconds (120)")
    ld.add_argument("--source-ips", type=int, default=8,
                    help="spread clients over 127.0.0.2..N+1 (ephemeral ports; 0: kernel's)")
    ld.add_argument("--load-cpus", default="auto",
                    help="CPUs for load processes, e.g. 2,3; auto: upper half on >=4 CPUs")
    ld.add_argument("--server-cpus", default="auto",
                    help="CPUs for servers and valkey; auto: lower half on >=4 CPUs")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run each scenario this many times (systems alternating) and report "
                         "the median of each figure, with its min-max in the JSON (1)")  # fmt: skip
    o = ap.add_argument_group("output")
    o.add_argument("--results-dir", type=Path, default=RESULTS, help="where the JSON goes")
    o.add_argument("--no-chart", action="store_true", help="skip the PNG chart")
    return ap


def _fmt(d: dict[str, Any]) -> str:
    return ", ".join(f"{k.replace('_', '-')} {v:g}" for k, v in d.items())


def _cpus(spec: str, upper: bool) -> list[int] | None:
    if spec == "auto":
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 4:  # on 2-3 cores a split starves one side: let the kernel schedule
            return None
        half = len(cpus) // 2
        return cpus[half:] if upper else cpus[:half]
    if spec in ("", "none"):
        return None
    return [int(c) for c in spec.split(",")]


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.repeat < 1:
        parser().error("--repeat must be at least 1")
    bad = [s for s in args.scenarios if s not in SCENARIOS and s != "all"]
    if bad:
        parser().error(f"unknown scenario {bad[0]!r}: choose from {', '.join(SCENARIOS)}")
    scenarios = [s for s in SCENARIOS if not args.scenarios or "all" in args.scenarios
                 or s in args.scenarios]  # fmt: skip
    args.load_cpus = _cpus(args.load_cpus, upper=True)
    args.server_cpus = _cpus(args.server_cpus, upper=False)
    args.windows = {s: args.window or w for s, w in WINDOWS.items()}
    args.sources = [f"127.0.0.{2 + i}" for i in range(args.source_ips)]
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # inherited by every child

    from . import chart, report
    from .scenarios import run_scenario
    from .systems import PEERS, External, FanoutFloor, System, WsCluster

    def systems() -> list[System]:
        biggest = max(args.members, args.pairs, args.rooms * args.room_size, args.idle,
                      args.storm) + 1000  # fmt: skip
        out: list[System]
        if args.url:
            pids = [int(p) for p in args.pids.split(",") if p]
            out = [External(args.url.split(","), pids)]
        else:
            out = [WsCluster(args.nodes, args.server_cpus, args.node_args, biggest)]
        for name in dict.fromkeys(args.peer):
            cls = PEERS[name]
            kw: dict[str, Any] = {"mode": args.pysio_mode} if name == "python-socketio" else {}
            nodes = 1 if name == "picows-echo" else args.nodes if name == "floor" else (
                args.peer_nodes)  # fmt: skip
            out.append(cls(nodes, args.server_cpus, **kw))
        return out

    results: list[dict[str, Any]] = []
    for scenario in scenarios:
        runs: dict[str, list[dict[str, Any]]] = {}
        for round_ in range(args.repeat):  # systems alternate within a round: same noise
            for system in systems():
                if scenario not in system.scenarios:
                    continue
                try:
                    system.start()
                    if isinstance(system, FanoutFloor):
                        result = system.measure(args)
                    else:
                        result = run_scenario(scenario, system, args)
                except Exception as exc:
                    result = {"scenario": scenario, "system": system.name, "error": repr(exc)}
                    print(f"{scenario} {system.name}: FAILED {exc!r}", file=sys.stderr,
                          flush=True)  # fmt: skip
                finally:
                    system.stop()
                result["round"] = round_ + 1
                runs.setdefault(system.name, []).append(result)
                short = {k: v for k, v in result.items() if k not in ("timeline", "cdf")}
                print(json.dumps(short), flush=True)
        for done in runs.values():
            failed = [r for r in done if "error" in r]
            results.append(failed[0] if failed else report.median_of(done))

    rows = report.table([r for r in results if "error" not in r])
    print()
    if len(rows) > 1:
        print(report.render(rows))
        print()
    print(report.cpu_lines([r for r in results if "error" not in r]))
    info = report.meta(sys.argv[1:] if argv is None else argv, {
        "scenarios": scenarios, "peers": list(dict.fromkeys(args.peer)),
        "sizes": {k: getattr(args, k) for k in FULL},
        "window": args.windows,
        "load_procs": args.load_procs, "send_procs": args.send_procs,
        "load_cpus": args.load_cpus, "server_cpus": args.server_cpus, "fd_limit": hard,
        "repeat": args.repeat,
    })  # fmt: skip
    path = report.write(args.results_dir, {"meta": info, "results": results,
                                           "table": rows})  # fmt: skip
    print(f"\nresults: {path}")
    if not args.no_chart:
        png = chart.draw([r for r in results if "error" not in r], path.with_suffix(".png"),
                         f"python -m bench {' '.join(info['argv'])}  ({info['time']})")
        skipped = "skipped (matplotlib is not installed: pip install -e '.[bench]')"
        print(f"chart:   {png or skipped}")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
