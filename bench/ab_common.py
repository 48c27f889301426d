"""What the A/B scripts share: timing a call and the markdown table they print and write."""

from __future__ import annotations

import datetime as dt
import os
import time
from pathlib import Path

import torch

from tnkernels.plan.calibrate import cpu_model


def best_us(fn, min_time: float = 0.02, batches: int = 3) -> float:
    """Microseconds per call of fn: the fastest of `batches` batches, each of enough calls to last `min_time`
    (on a shared machine interference only adds time, so the fastest batch is the machine's own speed)."""
    fn()
    n = 1
    while True:
        start = time.perf_counter()
        for _ in range(n):
            fn()
        if time.perf_counter() - start >= min_time:
            break
        n *= 2
    best = float("inf")
    for _ in range(batches):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - start) / n)
    return best * 1e6


def best_single_call(fn, calls: int) -> float:
    """Seconds of the fastest of `calls` single calls of fn (for calls long enough to time one by one)."""
    best = float("inf")
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


class Table:
    """A markdown report: a title with the date, a line naming the machine, a header; rows printed as they come."""

    def __init__(self, title: str, threads: int, what: str, columns: list[str]) -> None:
        now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="minutes")
        self.lines = [
            f"# {title}, {now}",
            "",
            f"{cpu_model()}, {threads} thread(s), torch {torch.__version__}, load average "
            f"{os.getloadavg()[0]:.2f}. {what}",
            "",
            "| " + " | ".join(columns) + " |",
            "|" + "---|" * len(columns),
        ]
        print("\n".join(self.lines), flush=True)

    def row(self, *cells) -> None:
        line = "| " + " | ".join(str(c) for c in cells) + " |"
        self.lines.append(line)
        print(line, flush=True)

    def write(self, path: Path | None) -> None:
        """Write the report to `path` (if any): a temporary file, then rename."""
        if path is None:
            return
        tmp = path.with_suffix(".tmp")
        tmp.write_text("\n".join(self.lines) + "\n")
        tmp.replace(path)
