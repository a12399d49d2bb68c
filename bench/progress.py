"""A progress bar: tqdm when installed (the ``bench`` extra), else a plain one on stderr.
Both stay silent when stderr is not a terminal."""

from __future__ import annotations

import sys
import time
from typing import Any


class Bar:
    def __init__(self, total: float, desc: str, unit: str = "") -> None:
        self.total = total
        self.desc = desc
        self.unit = unit
        self.n = 0.0
        self._last = 0.0
        self._tty = sys.stderr.isatty()
        self._tqdm: Any = None
        try:
            from tqdm import tqdm

            # a time-based bar (unit "s") shows seconds, not "s/s"
            fmt = "{l_bar}{bar}| {n:.1f}/{total:.1f} s{postfix}" if unit == "s" else None
            self._tqdm = tqdm(total=total, desc=desc, unit=unit, disable=None, leave=False,
                              dynamic_ncols=True, bar_format=fmt)  # fmt: skip
        except ImportError:
            pass

    def update_to(self, n: float, note: str = "") -> None:
        self.n = n
        if self._tqdm is not None:
            self._tqdm.n = n
            if note:
                self._tqdm.set_postfix_str(note, refresh=False)
            self._tqdm.refresh()
            return
        if not self._tty or time.monotonic() - self._last < 0.2:
            return
        self._last = time.monotonic()
        frac = min(1.0, n / self.total) if self.total else 1.0
        bar = "#" * int(frac * 30)
        sys.stderr.write(f"\r{self.desc}: [{bar:<30}] {n:,.0f}/{self.total:,.0f} {self.unit} "
                         f"{note}\x1b[K")  # fmt: skip
        sys.stderr.flush()

    def close(self) -> None:
        if self._tqdm is not None:
            self._tqdm.close()
        elif self._tty:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()
