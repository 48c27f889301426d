"""Benchmark providers: the same layer (same modes and bonds) built by dense torch, tnkernels, naive einsum,
tltorch and torch-mpo. A provider that is not installed is skipped with the reason, never faked."""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from tnkernels.nn import MPOLinear, TuckerConv2d


@dataclass
class Provider:
    name: str
    module: nn.Module | None  # None when unavailable
    why: str = ""  # why unavailable


class NaiveEinsumMPO(nn.Module):
    """One torch.einsum over x and all cores, opt_einsum path optimization off: the naive baseline."""

    def __init__(self, cores: list[torch.Tensor], bias: torch.Tensor | None):
        super().__init__()
        self.cores = nn.ParameterList(nn.Parameter(c.detach().clone()) for c in cores)
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None
        n = len(cores)
        ins, outs, bonds = "acdefg"[:n], "hklmno"[:n], "pqstu"[: n + 1]
        terms = ["b" + ins] + [bonds[k] + ins[k] + outs[k] + bonds[k + 1] for k in range(n)]
        self.eq = ",".join(terms) + "->b" + outs
        self.in_modes = [c.shape[1] for c in cores]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        xs = x.reshape(-1, *self.in_modes)
        with _no_opt_einsum():
            # boundary bonds of size 1 are plain indices that get summed
            y = torch.einsum(self.eq, xs, *self.cores)
        y = y.reshape(*lead, -1)
        return y + self.bias if self.bias is not None else y


@contextlib.contextmanager
def _no_opt_einsum():
    flag = torch.backends.opt_einsum.enabled
    torch.backends.opt_einsum.enabled = False
    try:
        yield
    finally:
        torch.backends.opt_einsum.enabled = flag


def _tltorch_linear(in_modes, out_modes, bonds) -> Provider:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import tltorch
    except ImportError as exc:
        return Provider("tltorch", None, f"tltorch not installed ({exc}): pip install tensorly tensorly-torch")
    layer = tltorch.FactorizedLinear(
        in_tensorized_features=tuple(in_modes),
        out_tensorized_features=tuple(out_modes),
        factorization="blocktt",
        rank=[1, *bonds, 1],
        implementation="factorized",
        bias=True,
    )
    return Provider("tltorch", layer)


def _torch_mpo_linear(in_modes, out_modes, bonds) -> Provider:
    try:
        from torch_mpo.layers import TTLinear
    except ImportError as exc:
        return Provider(
            "torch-mpo",
            None,
            f"torch-mpo not installed ({exc}): pip install --no-deps --ignore-requires-python torch-mpo",
        )
    layer = TTLinear(
        math.prod(in_modes), math.prod(out_modes), inp_modes=list(in_modes), out_modes=list(out_modes),
        tt_ranks=[1, *bonds, 1],
    )  # fmt: skip
    return Provider("torch-mpo", layer)


def linear_providers(in_modes, out_modes, bonds, *, peers: bool = True, backend: str = "auto") -> list[Provider]:
    """dense, tnkernels, naive-einsum, tltorch, torch-mpo for one structure (random weights, timing only).

    tnkernels runs with `backend` (default "auto", what users get: the native kernel for small no-grad batches
    when it is built, else the planned torch path); plan checks pass "torch", whose plans they force."""
    n_in, n_out = math.prod(in_modes), math.prod(out_modes)
    dense = nn.Linear(n_in, n_out)
    tnk = MPOLinear(n_in, n_out, in_modes=in_modes, out_modes=out_modes, bonds=bonds, backend=backend)
    out = [Provider("dense", dense), Provider("tnkernels", tnk)]
    out.append(Provider("naive-einsum", NaiveEinsumMPO([c.data for c in tnk.cores], tnk.bias.data)))
    if peers:
        out += [_tltorch_linear(in_modes, out_modes, bonds), _torch_mpo_linear(in_modes, out_modes, bonds)]
    return out


def conv_providers(c_in: int, c_out: int, k: int, ranks: tuple[int, int], padding: int, *, peers: bool = True):
    """dense nn.Conv2d, tnkernels TuckerConv2d, tltorch FactorizedConv (Tucker, same channel ranks)."""
    dense = nn.Conv2d(c_in, c_out, k, padding=padding, bias=False)
    tnk = TuckerConv2d(c_in, c_out, k, ranks=ranks, padding=padding, bias=False, backend="torch")
    out = [Provider("dense", dense), Provider("tnkernels", tnk)]
    if peers:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                import tltorch
            layer = tltorch.FactorizedConv(
                c_in, c_out, k, order=2, rank=[ranks[0], ranks[1], k, k], factorization="tucker",
                implementation="factorized", padding=padding,
            )  # fmt: skip
            out.append(Provider("tltorch", layer))
        except ImportError as exc:
            why = f"tltorch not installed ({exc}): pip install tensorly tensorly-torch"
            out.append(Provider("tltorch", None, why))
    return out


def timer(
    fn: Callable[[], object], *, reps: int, warmup: int = 2, budget_s: float = 2.0, min_time_s: float = 0.02
) -> float:
    """Fastest call of `fn` in seconds over at least `reps` calls, after `warmup` calls.

    The minimum rather than the median: on a machine shared with other jobs, interference only adds time, and
    the minimum is the statistic least distorted by it (on a quiet machine the two agree closely). Calls are
    repeated until they add up to `min_time_s` (as timeit's autorange does), so a microsecond-scale call gets
    more than a handful of samples: 3 calls a round read one-row cells 3-15% slower than 20 ms worth of calls
    (one thread, 2026-12-01; dense 1536->384 at one row: 66.6-68.7 against 64.3-65.1 us). `budget_s` caps the
    time spent (at least 3 calls).
    """
    import time

    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        spent = time.perf_counter() - start
        if len(times) >= 3 and spent > budget_s:
            break
        if len(times) >= reps and spent >= min_time_s:
            break
    return min(times)


def saved_bytes(fn: Callable[[], torch.Tensor]) -> int:
    """Bytes of the tensors autograd saves for backward while running fn() (packed-tensor hook count)."""
    total = 0
    seen: set[int] = set()

    def pack(t):
        nonlocal total
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


# A forced plan kind predicted this many times slower than the best kind is not timed by the plan checks.
SKIP_FACTOR = 50.0


def forced_kind_predictions(shapes, rows: int) -> tuple[dict[str, float], list[str]]:
    """({kind: predicted forward seconds} for every plan kind that applies to this chain, the kinds worth timing).

    Kinds the model prices over SKIP_FACTOR times the best are left out: they cannot be the fastest, and some are
    absurd (sweeping a low-rank chain from the right builds a rows x in x out x rank intermediate: 346 MB at one
    row of the ResNet fc, hundreds of GB at 1024 rows)."""
    from tnkernels.plan import PLAN_KINDS, mpo_decision, options

    predicted = {}
    for kind in PLAN_KINDS:
        with options(force=kind):
            try:
                predicted[kind] = mpo_decision(shapes, rows, torch.float32, torch.device("cpu"), False).forward.seconds
            except ValueError:
                continue  # e.g. merge on a 2-core chain
    best = min(predicted.values())
    return predicted, [k for k, v in predicted.items() if v <= SKIP_FACTOR * best]
