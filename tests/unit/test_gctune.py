"""gctune: a node process freezes its start-up heap and collects young objects less often."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from wscluster import gctune


@pytest.fixture
def restore_gc() -> Iterator[None]:
    before = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*before)


def test_tune_freezes_the_heap_and_raises_the_thresholds(restore_gc: None) -> None:
    kept = [object() for _ in range(10)]  # something alive at start-up
    gc.unfreeze()
    gctune.tune()
    assert gc.get_freeze_count() > len(kept)
    assert gc.get_threshold() == (gctune.YOUNG, gctune.MIDDLE, gctune.OLD)
    assert gctune.YOUNG > 700  # CPython's default


def test_cycles_are_still_collected(restore_gc: None) -> None:
    gctune.tune()

    class Node:
        other: object = None

    a, b = Node(), Node()
    a.other, b.other = b, a
    del a, b
    assert gc.collect() >= 2  # the cycle is found by a collection after tuning
