"""Where the csrc/ thin kernels beat the CPU BLAS, measured once per CPU, thread count and torch, cached on disk.

A low-rank layer's products are thin: one side has r columns, r = 4-40 at ratios 16-64. How fast the BLAS runs
such products differs by an order of magnitude between CPUs, so the bounds of thin_native cannot be constants:

* Intel Xeon VM (2026-12-01, one thread): MKL runs x A near half the memory bandwidth; the native kernels won at
  ranks <= 8 (x A from 128 rows; dy B^T up to rank 10) and lost from rank 12 up. (dh A^T and h^T dy on the
  kernels came later and were not measured there: the fixed table keeps them on torch.)
* AMD EPYC VM (2026-12-02, one thread): MKL takes a slow path on this CPU. x A, 1024 x 1536 at rank 4: 1341 us
  against 176 native (7.6x); at rank 19 still 1.9x; h B at rank 19, 3072 outputs: 2187 against 1242 us; h^T dy
  1.4-3.6x at 16-1024 rows, ranks 4-38; x^T dh 1.7-3.9x over torch's faster layout from 64 rows, ranks 4-76.

So the first thin decision on a CPU times each product both ways on a small ladder of ranks and row counts
(one to three seconds) and keeps, per product and rank, the fewest rows from which the native kernel wins at that row
count and every larger one measured. The same table decides the layout of the backward's dA (both layouts are
torch). `TNK_THIN_BOUNDS=fixed` skips the measurement and uses the Xeon rules above (the tests do, so that what
they count does not depend on the machine); `measure_bounds()` measures again and replaces the cached entry.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

import torch

from ...plan.calibrate import _timeit, cache_dir, cpu_model, read_json, write_json_atomic

# The products, each native kernel against what torch runs in its place:
#   project    x A, A [in, r] as stored (the kernel copies A^T)        against x @ A
#   project_t  dy B^T, B^T a free view of the contiguous B            against dy @ B.t()
#   expand     h B + bias                                             against mm(h, B).add_(bias) (addmm at < 8 rows)
#   expand_t   dh A^T, the backward's dx (the kernel copies A^T)      against dh @ A.t()
#   reduce     h^T dy, the backward's dB (and with [h, 1] also dbias)  against h.t() @ dy
#   grad_a     dA = x^T dh on thin_reduce, in the parameter's layout  against the faster torch layout below
#   grad_a_t   dA as (dh^T x)^T                                       against x^T dh (both torch)
KINDS = ("project", "project_t", "expand", "expand_t", "reduce", "grad_a", "grad_a_t")
MAX_RANK = 128  # no thin decision above this rank: every product there is a plain GEMM for the BLAS
_RANKS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 128)
_ROWS = (1, 16, 128, 512)
_WIDTH = 1024  # the long side of every measured product (in or out features)
_MARGIN = 0.97  # the kernel must be 3% faster to be chosen: a tie is noise, and torch is the safer default
NEVER = 1 << 62


@dataclass(frozen=True)
class ThinBounds:
    """min_rows[kind][rank]: the fewest rows from which the native side wins, for ranks 0..MAX_RANK (NEVER: it
    does not win at any row count measured)."""

    min_rows: dict[str, tuple[int, ...]]
    source: str  # "fixed", "measured" or "disk"

    def wins(self, kind: str, rows: int, rank: int) -> bool:
        return rank <= MAX_RANK and rows >= self.min_rows[kind][rank]


def fixed_bounds() -> ThinBounds:
    """The rules measured on the Xeon VM (2026-12-01), before the bounds were measured per machine."""

    def table(rule) -> tuple[int, ...]:
        return tuple(rule(r) for r in range(MAX_RANK + 1))

    return ThinBounds(
        {
            "project": table(lambda r: 128 if r <= 8 else NEVER),
            "project_t": table(lambda r: 1 if r <= 10 else NEVER),
            "expand": table(lambda r: 1 if r <= 8 else NEVER),
            "expand_t": table(lambda r: NEVER),
            "reduce": table(lambda r: NEVER),
            "grad_a": table(lambda r: NEVER),
            "grad_a_t": table(lambda r: 64 if r <= 4 else max(128, 6 * r)),
        },
        "fixed",
    )


def _operands(kind: str, rows: int, rank: int):
    """(native call, torch call) for one product at one shape; for grad_a, torch's two layouts."""
    from . import thin_native

    ext = thin_native._ext
    g = torch.Generator().manual_seed(rows * 1000 + rank)
    wide = torch.randn(rows, _WIDTH, generator=g)
    thin = torch.randn(rows, rank, generator=g)
    a = torch.randn(_WIDTH, rank, generator=g)
    b = torch.randn(rank, _WIDTH, generator=g)
    bias = torch.randn(_WIDTH, generator=g)
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
    return (lambda: (thin.t() @ wide).t()), (lambda: wide.t() @ thin)


def _native_wins(kind: str, rows: int, rank: int, rounds: int = 2) -> bool:
    native, *references = _operands(kind, rows, rank)
    t_native = t_reference = float("inf")
    cpu = torch.device("cpu")
    for _ in range(rounds):  # interleaved: a burst of load spoils one round of both, not one side
        t_native = min(t_native, _timeit(native, cpu, budget_s=0.002, min_calls=3, max_calls=30))
        for reference in references:
            t_reference = min(t_reference, _timeit(reference, cpu, budget_s=0.002, min_calls=3, max_calls=30))
    return t_native < _MARGIN * t_reference


def measure_bounds() -> ThinBounds:
    """Time every product both ways on the ladder (one to three seconds on one core) and return the table."""
    min_rows = {}
    for kind in KINDS:
        per_rank = {}
        for rank in _RANKS:
            wins = [_native_wins(kind, rows, rank) for rows in _ROWS]
            # the fewest rows from which it wins at that count and every larger one: the choice is monotone in rows
            start = NEVER
            for rows, won in zip(reversed(_ROWS), reversed(wins), strict=True):
                if not won:
                    break
                start = rows
            per_rank[rank] = start
        # a rank between two measured ones takes the next measured rank's bound (wider is slower for the kernels)
        table, upper = [], iter(_RANKS)
        bound = next(upper)
        for r in range(MAX_RANK + 1):
            while r > bound:
                bound = next(upper)
            table.append(per_rank[bound])
        min_rows[kind] = tuple(table)
    return ThinBounds(min_rows, "measured")


# ------------------------------------------------------------------------------------------------ the cache
_LOCK = threading.Lock()
_BY_THREADS: dict[int, ThinBounds] = {}  # per torch thread count: both the kernels and the BLAS scale with it


def _key() -> str:
    return f"cpu:{cpu_model()}:{torch.get_num_threads()}threads|torch{torch.__version__}"


def _path() -> str:
    return os.path.join(cache_dir(), "thin_bounds.json")


def _from_json(d: dict) -> ThinBounds:
    table = {k: tuple(int(v) for v in d[k]) for k in KINDS}
    if any(len(v) != MAX_RANK + 1 for v in table.values()):
        raise ValueError("thin bounds of another layout")
    return ThinBounds(table, "disk")


def _store(bounds: ThinBounds) -> None:
    data = read_json(_path())
    data[_key()] = {k: list(v) for k, v in bounds.min_rows.items()}
    try:
        write_json_atomic(_path(), data)
    except OSError:
        pass  # a read-only home must not break the forward pass: the table stays in memory


@torch.compiler.assume_constant_result  # read once while torch.compile traces, not a graph break
def _threads() -> int:
    return torch.get_num_threads()


def bounds() -> ThinBounds:
    """This machine's table: in memory, else from the disk cache, else measured (once) and stored. Fixed rules
    when TNK_THIN_BOUNDS=fixed or the native extension is not built (the kernels are then never called)."""
    threads = _threads()
    found = _BY_THREADS.get(threads)
    if found is not None:
        return found
    with _LOCK:
        if threads in _BY_THREADS:
            return _BY_THREADS[threads]
        from . import thin_native

        if os.environ.get("TNK_THIN_BOUNDS") == "fixed" or not thin_native._HAS_THIN:
            found = fixed_bounds()
        else:
            try:
                found = _from_json(read_json(_path())[_key()])
            except (KeyError, TypeError, ValueError):
                found = measure_bounds()
                _store(found)
        _BY_THREADS[threads] = found
        return found


def remeasure() -> ThinBounds:
    """Measure again (e.g. in a quiet moment of a busy machine), replace the cached entry, and use it from now on."""
    found = measure_bounds()
    _store(found)
    use(found)
    return found


def use(table: ThinBounds | None) -> None:
    """Decide with `table` from now on, at the current thread count (None: look it up again at the next
    decision). For tests and A/B runs. Layers' remembered routes carry choices made with the old table, so they
    are forgotten too (clear_plans starts a new plan generation)."""
    from ...plan.cache import clear_plans

    if table is None:
        _BY_THREADS.pop(torch.get_num_threads(), None)
    else:
        _BY_THREADS[torch.get_num_threads()] = table
    clear_plans()
