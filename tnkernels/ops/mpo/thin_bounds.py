"""Where the csrc/ thin kernels beat the CPU BLAS, measured on this machine per product shape, cached on disk.

A low-rank layer's products are thin: one side has r columns, r = 4-40 at ratios 16-64. How fast the BLAS runs
such products differs by an order of magnitude between CPUs, and on one CPU between widths, so the bounds of
thin_native cannot be constants:

* Intel Xeon VM (2026-12-01, one thread): MKL runs x A near half the memory bandwidth; the native kernels won at
  ranks <= 8 (x A from 128 rows; dy B^T up to rank 10) and lost from rank 12 up. (dh A^T, h^T dy and x^T dh on
  the kernels came later and were not measured there: the fixed table keeps them on torch.)
* AMD EPYC VM (2026-12-02, one thread): MKL takes a slow path on this CPU. x A, 1024 x 1536 at rank 4: 1341 us
  against 176 native (7.6x); h B at rank 19, 3072 outputs: 2187 against 1242 us; h^T dy 1.4-3.6x at 16-1024
  rows, ranks 4-38; x^T dh 1.7-3.9x over torch's faster layout from 64 rows, ranks 4-76. But x A at rank 16-24
  depends on the width: with 1024 inputs MKL is 2-10x faster than the kernel below 512 rows, with 1536 inputs
  the kernel wins 1.1-2.3x from 64 rows (rank 19).

So a table entry is one product at one rank and width, measured the first time a layer needs it: the product
timed both ways at 1, 16, 128 and 512 rows (0.05-1 s, once per machine), keeping the fewest rows from which the
native kernel wins at that count and every larger one. Entries are stored under $TNK_CACHE_DIR per CPU model,
thread count and torch version. The same table decides the layout of the backward's dA when torch runs it.
`TNK_THIN_BOUNDS=fixed` uses the Xeon rules above instead (the tests do, so that what they count does not depend
on the machine's BLAS); `forget()` drops the measured entries so that they are measured again.
"""

from __future__ import annotations

import os
import threading

import torch

from ...plan.calibrate import MachineStore, _timeit

# The products, each native kernel against what torch runs in its place; "width" is the long side:
#   project    x A, A [in, r] as stored (the kernel copies A^T)    width in     against x @ A
#   project_t  dy B^T, B^T a free view of the contiguous B        width out    against dy @ B.t()
#   expand     h B + bias                                         width out    against mm(h, B).add_(bias) (addmm
#                                                                              below 8 rows)
#   expand_t   dh A^T, the backward's dx (the kernel copies A^T)  width in     against dh @ A.t()
#   reduce     h^T dy, the backward's dB (with [h, 1]: + dbias)    width out    against h.t() @ dy
#   grad_a     dA = x^T dh on thin_reduce, in the layout of A     width in     against both torch layouts below
#   grad_a_t   dA as (dh^T x)^T, copied into A's layout           width in     against x^T dh (both torch)
KINDS = ("project", "project_t", "expand", "expand_t", "reduce", "grad_a", "grad_a_t")
MAX_RANK = 128  # no thin decision above this rank: every product there is a plain GEMM for the BLAS
_ROWS = (1, 16, 128, 512)
_MARGIN = 0.97  # the kernel must be 3% faster to be chosen: a tie is noise, and torch is the safer default
NEVER = 1 << 62


class FixedBounds:
    """The rules measured on the Xeon VM (2026-12-01), before the bounds were measured per machine; no width."""

    source = "fixed"
    _RULES = {
        "project": lambda r: 128 if r <= 8 else NEVER,
        "project_t": lambda r: 1 if r <= 10 else NEVER,
        "expand": lambda r: 1 if r <= 8 else NEVER,
        "expand_t": lambda r: NEVER,
        "reduce": lambda r: NEVER,
        "grad_a": lambda r: NEVER,
        "grad_a_t": lambda r: 64 if r <= 4 else max(128, 6 * r),
    }

    def wins(self, kind: str, rows: int, rank: int, width: int) -> bool:
        return rank <= MAX_RANK and rows >= self._RULES[kind](rank)


class MeasuredBounds:
    """Entries (kind, rank, width) -> fewest winning rows, measured on first use and stored on disk."""

    source = "measured"

    def __init__(self, entries: dict[tuple[str, int, int], int]) -> None:
        self._entries = dict(entries)
        self._lock = threading.Lock()

    def min_rows(self, kind: str, rank: int, width: int) -> int:
        key = (kind, rank, width)
        found = self._entries.get(key)
        if found is None:
            with self._lock:
                found = self._entries.get(key)
                if found is None:
                    # another process may have measured it since this table was loaded: read the store again
                    found = _STORE.get_or_measure(
                        "|".join(map(str, key)),
                        lambda: measure_entry(kind, rank, width),
                        valid=lambda rows: type(rows) is int,
                    )
                    self._entries[key] = found
        return found

    def wins(self, kind: str, rows: int, rank: int, width: int) -> bool:
        return rank <= MAX_RANK and rows >= self.min_rows(kind, rank, width)


# ------------------------------------------------------------------------------------------- measurement
def _operands(kind: str, rows: int, rank: int, width: int):
    """(native call, torch call, ...) for one product at one shape; for grad_a, both torch layouts."""
    from . import thin_native

    ext = thin_native._ext
    g = torch.Generator().manual_seed(rows * 1000 + rank)
    wide = torch.randn(rows, width, generator=g)
    thin = torch.randn(rows, rank, generator=g)
    a = torch.randn(width, rank, generator=g)
    b = torch.randn(rank, width, generator=g)
    bias = torch.randn(width, generator=g)
    if kind == "project":
        return (lambda: ext.thin_project(wide, a)), (lambda: wide @ a)
    if kind == "project_t":
        return (lambda: ext.thin_project(wide, b.t())), (lambda: wide @ b.t())
    if kind == "expand":
        if rows >= 8:
            return (lambda: ext.thin_expand(thin, b, bias)), (lambda: torch.mm(thin, b).add_(bias))
        return (lambda: ext.thin_expand(thin, b, bias)), (lambda: torch.addmm(bias, thin, b))
    if kind == "expand_t":
        return (lambda: ext.thin_expand(thin, a.t())), (lambda: thin @ a.t())
    if kind == "reduce":
        return (lambda: ext.thin_reduce(thin, wide)), (lambda: thin.t() @ wide)
    if kind == "grad_a":  # the torch layouts as they reach the parameter: the transposed one is copied
        native = lambda: ext.thin_reduce(thin, wide, True)  # noqa: E731
        return native, (lambda: wide.t() @ thin), (lambda: (thin.t() @ wide).t().contiguous())
    return (lambda: (thin.t() @ wide).t().contiguous()), (lambda: wide.t() @ thin)


def _native_wins(kind: str, rows: int, rank: int, width: int, rounds: int = 2) -> bool:
    native, *references = _operands(kind, rows, rank, width)
    t_native = t_reference = float("inf")
    cpu = torch.device("cpu")
    for _ in range(rounds):  # interleaved: a burst of load spoils one round of both, not one side
        t_native = min(t_native, _timeit(native, cpu, budget_s=0.002, min_calls=3, max_calls=30))
        for reference in references:
            t_reference = min(t_reference, _timeit(reference, cpu, budget_s=0.002, min_calls=3, max_calls=30))
    return t_native < _MARGIN * t_reference


def measure_entry(kind: str, rank: int, width: int) -> int:
    """The fewest rows of the ladder from which the native side wins at that count and every larger one (the
    choice is taken as monotone in rows: the kernels' fixed costs, a copy of A^T, fade with more rows)."""
    if rank > MAX_RANK:
        return NEVER
    start = NEVER
    for rows in reversed(_ROWS):
        if not _native_wins(kind, rows, rank, width):
            break
        start = rows
    return start


# ------------------------------------------------------------------------------------------------ the cache
_LOCK = threading.Lock()
_BY_THREADS: dict[int, FixedBounds | MeasuredBounds] = {}  # the kernels and the BLAS both scale with threads


_STORE = MachineStore("thin_bounds.json")
_FIXED = FixedBounds()


def _load_entries() -> dict[tuple[str, int, int], int]:
    entries = {}
    for text, min_rows in _STORE.load().items():
        try:
            kind, rank, width = text.split("|")
            if kind in KINDS:
                entries[(kind, int(rank), int(width))] = int(min_rows)
        except (ValueError, TypeError):
            continue  # an entry of another layout is measured again
    return entries


@torch.compiler.assume_constant_result  # read once while torch.compile traces, not a graph break
def _threads() -> int:
    return torch.get_num_threads()


def bounds() -> FixedBounds | MeasuredBounds:
    """This machine's table at the current thread count: measured entries (from disk where stored), or the fixed
    rules when TNK_THIN_BOUNDS=fixed, while torch.compile traces, or when the native extension is not built (the
    kernels are then never called)."""
    if torch.compiler.is_compiling():  # nothing is measured while dynamo traces
        return _FIXED
    threads = _threads()
    found = _BY_THREADS.get(threads)
    if found is not None:
        return found
    with _LOCK:
        if threads not in _BY_THREADS:
            from . import thin_native

            if os.environ.get("TNK_THIN_BOUNDS") == "fixed" or not thin_native._HAS_THIN:
                _BY_THREADS[threads] = _FIXED
            else:
                _BY_THREADS[threads] = MeasuredBounds(_load_entries())
        return _BY_THREADS[threads]


def forget() -> None:
    """Drop this machine's stored entries (e.g. measured while the machine was busy): they are measured again as
    layers need them."""
    _STORE.drop()
    use(None)


def use(table: FixedBounds | MeasuredBounds | None) -> None:
    """Decide with `table` from now on, at the current thread count (None: look it up again at the next
    decision). For tests and A/B runs. Layers' remembered routes carry choices made with the old table, so they
    are forgotten too (clear_plans starts a new plan generation)."""
    from ...plan.cache import clear_plans

    if table is None:
        _BY_THREADS.pop(torch.get_num_threads(), None)
    else:
        _BY_THREADS[torch.get_num_threads()] = table
    clear_plans()
