"""``wscluster send`` and ``wscluster status``: one request through the broker, failing fast
with one line when the broker or presence store is not there."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from typing import TYPE_CHECKING

import msgspec

from .preflight import check_urls, redact, unreachable

if TYPE_CHECKING:
    from .cluster import Cluster


def _fail(args: argparse.Namespace, message: str, code: int) -> int:
    print(f"wscluster {args.command}: {message}", file=sys.stderr)
    return code


async def run(args: argparse.Namespace) -> int:
    from .cluster import Cluster
    from .errors import BrokerUnavailable, PresenceUnavailable, ProtocolError

    try:
        check_urls(args.broker, args.presence)
        if not args.broker_timeout > 0:
            raise ValueError("--broker-timeout must be a positive number of seconds")
        history: tuple[str, ...] = tuple(
            getattr(args, "history", None) or getattr(args, "history_env", None) or ()
        )
        cluster = Cluster(args.broker, namespace=args.namespace, presence_url=args.presence,
                          history=history)  # fmt: skip
    except ValueError as exc:
        return _fail(args, str(exc), 2)
    down = await asyncio.to_thread(unreachable, args.broker, args.presence,
                                   args.broker_timeout, fail_on_refused=True)  # fmt: skip
    if down is not None:
        return _fail(args, "{} {} is not reachable: {}".format(*down), 1)
    # a one-shot command does not retry in the background: its broker log lines are noise
    logging.getLogger("wscluster.broker").setLevel(logging.CRITICAL)
    async with cluster:
        if not cluster.broker.connected:
            return _fail(args, f"--broker {redact(args.broker)} did not answer", 1)
        try:
            if args.command == "send":
                await _send(args, cluster)
            else:
                await _status(cluster)
        except ProtocolError as exc:
            return _fail(args, f"{exc.code}: {exc.message}", 2)
        except (BrokerUnavailable, PresenceUnavailable) as exc:
            return _fail(args, f"unavailable: {exc}", 1)
    return 0


async def _send(args: argparse.Namespace, cluster: Cluster) -> None:
    try:
        data = msgspec.json.decode(args.data)
    except msgspec.DecodeError:
        data = args.data
    pos = await cluster.send(args.to, data)
    stored = f" (epoch {pos.epoch}, offset {pos.offset})" if pos is not None else ""
    print(f"sent to {args.to}{stored}")


async def _status(cluster: Cluster) -> None:
    stats = await cluster.stats()
    print(f"{'node':<40} {'connections':>11} {'ws port':>8} {'api port':>8}  broker")
    for n in stats["nodes"]:
        broker = "up" if n.get("broker_connected") else "DOWN"
        ports = f"{n.get('ws_port', '-'):>8} {n.get('api_port', '-'):>8}"
        print(f"{n['node']:<40} {n['connections']:>11} {ports}  {broker}")
    print(f"{len(stats['nodes'])} nodes, {stats['connections']} connections")
