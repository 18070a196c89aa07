"""Progress of long work, on a terminal and in a log.

On a terminal: a tqdm bar. With no terminal attached (CI, a scheduler, ``nohup ... > log``) a bar
would print nothing useful, so one line goes to stderr at a bounded rate instead: at most one per
tenth of the work and one per 30 s, plus the last (``scan DICOM: 1200/20000 file (6%), 410 file/s``).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator

__all__ = ["progress"]


def progress(items: Iterable, desc: str, unit: str, *, total: int | None = None, enabled: bool = True,
             min_interval: float = 30.0) -> Iterator:
    """Iterate `items`, reporting progress (see the module doc); nothing when `enabled` is False."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    if not enabled:
        yield from items
        return
    if sys.stderr.isatty():
        from tqdm.auto import tqdm

        yield from tqdm(items, desc=desc, unit=unit, total=total)
        return
    t0 = last = time.monotonic()
    step = max(1, (total or 0) // 10)
    n = 0
    for n, x in enumerate(items, start=1):
        yield x
        now = time.monotonic()
        if n == total or n % step == 0 or now - last >= min_interval:
            last = now
            of = f"/{total} {unit} ({100 * n / total:.0f}%)" if total else f" {unit}"
            print(f"{desc}: {n}{of}, {n / max(now - t0, 1e-9):.0f} {unit}/s", file=sys.stderr, flush=True)
