"""Garbage-collector settings for a node process (``wscluster serve``).

A node keeps tens of thousands of long-lived objects per thousand connections (transports,
listeners, registry entries). With CPython's default thresholds (a young collection every
700 allocations, the older generations scanned whenever the heap grew by a quarter) the
collector re-scans that heap while connections pour in: during a 15,000-connection ramp it
took ~40 % of the node's CPU (handshakes/s 3.7k -> 5.8k with the settings below, measured
with ``python -m bench idle``).

So after start-up the objects that live as long as the process are moved out of the
collector's sight (``gc.freeze``), and young collections run every 50,000 allocations
instead of 700. Reference cycles are still collected: garbage waits a little longer (a few
MB at most), nothing else changes. Only the CLI calls this: an application embedding a
``Node`` in its own process keeps its own settings.
"""

from __future__ import annotations

import gc

YOUNG = 50_000  # allocations between young collections (CPython's default: 700)
MIDDLE = 20  # young collections between middle ones (default 10)
OLD = 100  # middle collections between full ones (default 10; also bounded by heap growth)


def tune() -> None:
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG, MIDDLE, OLD)
