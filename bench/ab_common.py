"""What the A/B scripts share: timing a call and the markdown table they print and write."""

from __future__ import annotations

import argparse
import datetime as dt
import os
import subprocess
import time
from pathlib import Path

import torch

from distill._atomic import atomic_write_text
from tnkernels.plan.calibrate import cpu_model

ROOT = Path(__file__).resolve().parents[1]


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a count of rounds or calls; 0 would time nothing and judge infinities)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def provenance() -> dict:
    """What a recorded result needs to be traced back to: the tnkernels version, the git commit of this checkout
    and whether it had uncommitted changes to tracked files (None outside a git checkout), and whether the native
    kernels are built."""
    import tnkernels

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return dict(
        tnkernels=tnkernels.__version__,
        git_commit=commit,
        git_dirty=None if status is None else bool(status),
        native=bool(tnkernels.native_available()),
    )


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
        """Write the report to `path` (if any), atomically, making its folder if needed."""
        if path is None:
            return
        atomic_write_text(path, "\n".join(self.lines) + "\n")
