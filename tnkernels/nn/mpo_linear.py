"""MPOLinear: a drop-in replacement for nn.Linear (and GPT-2's Conv1D) whose weight is an MPO (tensor train)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.utils import skip_init

from .._int_pair import check_index, int_tuple
from ..decompose import (
    RatioUnreachableError,
    auto_modes,
    check_ratio,
    mpo_bonds_for_ratio,
    mpo_decompose,
    mpo_num_params,
)
from ..ops import (
    MIXED_DTYPE_BACKENDS,
    check_backend,
    check_input_dtype,
    check_input_width,
    check_mpo_cores,
    low_rank_route,
    mpo_to_dense,
    preload,
    refuse_jit_script,
    run_low_rank_route,
    run_mpo_linear,
)
from ..ops.modes import needs_autograd
from ..ops.mpo.torch_low_rank import is_low_rank_chain
from ..plan import explain as explain_plan
from ..plan.backends import auto_mpo_backend
from ..plan.cache import plan_generation
from .call_memo import MemoizedCalls, memo_applies
from .hf_compat import is_hf_conv1d, linear_weight
from .no_dense_weight import ExplainsMissingWeight

DEFAULT_NUM_CORES = 2


_CORE_KEYS = tuple(tuple(str(k) for k in range(n)) for n in range(65))  # a ParameterList's names: "0", "1", ...


class MPOLinear(MemoizedCalls, ExplainsMissingWeight, nn.Module):
    """y = x @ W.T + b with W[out, in] stored as MPO cores G_k of shape (r_{k-1}, i_k, j_k, r_k).

    Build one from a trained layer with `MPOLinear.from_linear`, or directly (random init scaled like nn.Linear's).

    Args:
        in_features, out_features: as in nn.Linear.
        in_modes, out_modes: factorizations of the feature sizes (same length N = number of cores).
        bonds: the N-1 internal bond dimensions.
        bias: whether to learn a bias.
        backend: "auto" | "torch" | "triton" | "native", passed to tnkernels.mpo_linear.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        in_modes: Sequence[int],
        out_modes: Sequence[int],
        bonds: Sequence[int],
        bias: bool = True,
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        where = type(self).__name__
        in_modes, out_modes = int_tuple(in_modes, "in_modes", where), int_tuple(out_modes, "out_modes", where)
        bonds = int_tuple(bonds, "bonds", where)
        check_backend(backend, where)
        if len(in_modes) != len(out_modes) or len(bonds) != len(in_modes) - 1:
            raise ValueError(
                "MPOLinear: need len(in_modes) == len(out_modes) == len(bonds) + 1, "
                f"got {in_modes}, {out_modes}, {bonds}"
            )
        if math.prod(in_modes) != in_features or math.prod(out_modes) != out_features:
            raise ValueError(
                f"MPOLinear: modes {in_modes} x {out_modes} multiply to "
                f"{math.prod(in_modes)} x {math.prod(out_modes)}, "
                f"not in_features={in_features} x out_features={out_features}"
            )
        if any(b < 1 for b in bonds):
            raise ValueError(f"MPOLinear: bonds must be >= 1, got {bonds}")
        self.in_features, self.out_features = in_features, out_features
        self.in_modes, self.out_modes, self.bonds = in_modes, out_modes, bonds
        self.backend = backend
        preload("mpo_linear", backend)  # now, not in a first call that torch.compile may be tracing
        full = (1, *bonds, 1)
        factory = {"device": device, "dtype": dtype}
        self.cores = nn.ParameterList(
            nn.Parameter(torch.empty(full[k], i, j, full[k + 1], **factory))
            for k, (i, j) in enumerate(zip(in_modes, out_modes))
        )
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear's default init has Var(W) = 1 / (3 in_features). W is a sum over internal bonds of products of
        # one entry per core, so Var(W) = prod(bonds) * prod(core variances); spread that evenly over the cores.
        n = len(self.cores)
        target = 1.0 / (3.0 * self.in_features)
        std = (target / math.prod(self.bonds)) ** (1.0 / (2 * n))
        for g in self.cores:
            nn.init.normal_(g, std=std)
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    # ----------------------------------------------------------------------------------------------- construction
    @classmethod
    def from_linear(
        cls,
        linear: nn.Module,
        *,
        in_modes: Sequence[int] | None = None,
        out_modes: Sequence[int] | None = None,
        num_cores: int | None = None,
        max_bond: int | Sequence[int] | None = None,
        ratio: float | None = None,
        rel_tol: float | None = None,
        backend: str = "auto",
        prefer: str | None = None,
    ) -> MPOLinear:
        """Decompose a trained nn.Linear (or transformers' Conv1D, weight stored [in, out]) by TT-SVD.

        Rank selection: `ratio` (dense/tensorized parameters), or `max_bond` and/or `rel_tol`; none of them keeps
        the full bonds (exact). Modes default to `auto_modes` with `num_cores` cores (default 2); with neither
        modes nor num_cores given, sizes auto_modes cannot split in two take the low-rank split (in, 1) x (1, out).
        With `ratio` and no modes / num_cores, tnkernels.plan.choose_mpo_structure picks cores, modes and
        bonds among balanced splits of 2..5 cores and the low-rank split (in, 1) x (1, out): prefer="speed"
        (the default) the fastest predicted structure whose error is not clearly worse than the balanced
        2-core split's (usually the low-rank split, two GEMMs of dense/ratio FLOPs); prefer="accuracy" the
        most accurate one.
        """
        where = f"MPOLinear.from_linear({type(linear).__name__})"
        if not (isinstance(linear, nn.Linear) or is_hf_conv1d(linear)):
            raise TypeError(f"{where}: expected nn.Linear or transformers' Conv1D")
        check_backend(backend, where)  # before the decomposition, not after it
        if num_cores is not None:
            num_cores = check_index(num_cores, "num_cores", where)  # 0 used to mean the default, 2; True 1
        weight = linear_weight(linear)
        out_features, in_features = weight.shape
        if prefer is not None and prefer not in ("speed", "accuracy"):
            raise ValueError(f"{where}: prefer must be 'speed' or 'accuracy', got {prefer!r}")
        free = in_modes is None and out_modes is None and num_cores is None
        if prefer is not None and not (free and ratio is not None):
            raise ValueError(f"{where}: prefer= picks the structure for ratio=; drop modes and num_cores")
        if free and ratio is not None and max_bond is None and rel_tol is None:
            in_modes, out_modes, max_bond, ratio = _planned_structure(weight, ratio, prefer or "speed", where)
        in_modes, out_modes = _resolve_modes(in_features, out_features, in_modes, out_modes, num_cores, where)
        if ratio is not None and (max_bond is not None or rel_tol is not None):
            raise ValueError(f"{where}: give either ratio or max_bond/rel_tol, not both")
        if ratio is not None:
            check_ratio(ratio, f"{where}: ratio")
            max_bond = mpo_bonds_for_ratio(in_modes, out_modes, ratio)
        cores = mpo_decompose(weight, in_modes, out_modes, max_bond=max_bond, rel_tol=rel_tol)
        bonds = tuple(g.shape[3] for g in cores[:-1])
        bias = getattr(linear, "bias", None)
        # skip_init: every parameter is overwritten below, so the random init would be wasted work.
        layer = skip_init(
            cls,
            in_features,
            out_features,
            in_modes=in_modes,
            out_modes=out_modes,
            bonds=bonds,
            bias=bias is not None,
            backend=backend,
            device=weight.device,
            dtype=weight.dtype,
        )
        with torch.no_grad():
            for p, g in zip(layer.cores, cores):
                p.copy_(g)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    # ------------------------------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # At one row the whole call takes ~10 us, so the attribute lookups count: ParameterList's own iterator
        # converts every index to a string key (~3 us for two cores), and nn.Module.__getattr__ (self.cores,
        # self.bias) costs ~0.4 us a name. The dicts behind them hold the same objects (a bias assigned later as
        # a Parameter lands in _parameters too; bias=False leaves None in __dict__) unless a parameter is
        # pruned or parametrized (torch.nn.utils), which moves it out of _parameters: then the slow lookups.
        cores = self._current_cores()
        p = self._parameters
        bias = p["bias"] if "bias" in p else self.bias  # not in the dict: None, or pruned / parametrized
        try:  # a try costs nothing in Python 3.11 until it catches
            memo = self._memo_for_calls if memo_applies(x) else None
        except AttributeError:
            if isinstance(x, torch.Tensor):
                raise
            raise TypeError(f"{type(self).__name__}: input must be a torch.Tensor, got {type(x).__name__}") from None
        if memo is not None:  # the memo may already know how this call runs (call_memo.py)
            needs_grad = needs_autograd(x, cores, bias)
            known, route = memo.get(x, cores, needs_grad)
            if route is not None:
                return run_low_rank_route(x, route, cores, bias)
        shapes = tuple(g.shape for g in cores)
        if shapes != getattr(self, "_checked_shapes", None):  # first call, or the cores were replaced
            self._check_cores(cores)
            self._checked_shapes = shapes
        if x.dim() == 0 or x.shape[-1] != self.in_features:  # the check's own call only when it will raise
            where = type(self).__name__
            check_input_width(x, self.in_features, where, f" (the layer's in_features={self.in_features})")
        if x.dtype != cores[0].dtype or not x.is_floating_point():  # the check's own call only when it may raise
            check_input_dtype(x, cores[0], type(self).__name__, mixed_ok=self.backend in MIXED_DTYPE_BACKENDS)
        y = run_mpo_linear(x, list(cores), bias, self.backend)
        if memo is not None and not known:  # after the call: one that raised is not remembered
            generation = plan_generation()  # before the route is derived (CallMemo.put)
            memo.put(x, cores, needs_grad, low_rank_route(x, list(cores), self.backend, needs_grad), generation)
        return y

    dense_method = "to_linear"  # named in the error for code that reads .weight (no_dense_weight.py)

    def _current_cores(self) -> tuple[torch.Tensor, ...]:
        holder = self._modules["cores"]
        if type(holder) is nn.ParameterList and not holder._forward_pre_hooks:
            params = holder._parameters
            # in order only if the names are: prune.remove / remove_parametrizations re-add a core at the end
            if len(params) < len(_CORE_KEYS) and tuple(params) == _CORE_KEYS[len(params)]:
                return tuple(params.values())
        # torch.nn.utils.parametrize swaps the list's class; prune keeps "<i>_orig" and a mask and recomputes
        # "<i>" in a forward pre-hook, which never runs because the list is never called: run it here. Then the
        # cores by index, whatever the dict's order.
        for hook in tuple(holder._forward_pre_hooks.values()):
            hook(holder, ())
        return tuple(holder[k] for k in range(len(holder)))

    def __prepare_scriptable__(self):  # torch.jit.script calls this first: a clear refusal, not a compile error
        refuse_jit_script(type(self).__name__)

    def _check_cores(self, cores: list[torch.Tensor]) -> None:
        where = type(self).__name__
        check_mpo_cores(cores, where)
        n_in, n_out = math.prod([g.shape[1] for g in cores]), math.prod([g.shape[2] for g in cores])
        if (n_in, n_out) != (self.in_features, self.out_features):
            raise ValueError(
                f"{where}: the cores map {n_in} -> {n_out} features but the layer has in_features="
                f"{self.in_features}, out_features={self.out_features}; replace cores only with cores of the same "
                "modes (or build a new layer)"
            )

    def explain(self, rows: int, *, needs_grad: bool = False) -> str:
        """How a call on `rows` rows (batch x tokens) runs: the backend `backend` resolves to, then the torch
        backend's plan (steps, FLOPs, bytes, predicted time and the alternatives: tnkernels.plan.explain)."""
        rows = check_index(rows, "rows", f"{type(self).__name__}.explain")
        g = self.cores[0]
        backend = self.backend
        if backend == "auto":
            low_rank = len(self.cores) == 2 and is_low_rank_chain(tuple(c.shape for c in self.cores))
            backend = auto_mpo_backend(g.device.type, rows, g.dtype, needs_grad, low_rank)
        runs = {
            "torch": "the torch backend's plan",
            "native": "the native kernel (one C++ call for the chain); backend='torch' would run",
            "triton": "the Triton kernels (one per core step); backend='torch' would run",
        }[backend]
        head = f"{type(self).__name__}({self.in_features} -> {self.out_features}, backend={self.backend!r}) at {rows}"
        return f"{head} rows, {'training' if needs_grad else 'no grad'}: runs {runs}:\n" + explain_plan(
            list(self.cores), rows, needs_grad=needs_grad
        )

    # ------------------------------------------------------------------------------------------- conversions
    def to_dense(self) -> torch.Tensor:
        """The dense weight W[out_features, in_features]."""
        return mpo_to_dense(list(self.cores))

    def to_linear(self) -> nn.Linear:
        g = self.cores[0]
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=g.device, dtype=g.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.to_dense())
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    def to_conv1d(self) -> nn.Module:
        """transformers' Conv1D (GPT-2's layer, weight stored [in, out]) with this layer's dense weight: how a layer
        tensorized from a Conv1D goes back, so that save_pretrained / from_pretrained read it the right way round
        (to_linear's nn.Linear holds the transpose, which a GPT-2 from_pretrained would load into a square Conv1D
        as is). Conv1D always has a bias: zeros when this layer has none."""
        try:
            from transformers.pytorch_utils import Conv1D
        except ImportError as exc:
            raise ImportError("MPOLinear.to_conv1d needs transformers: pip install transformers") from exc
        g = self.cores[0]
        conv = Conv1D(self.out_features, self.in_features).to(device=g.device, dtype=g.dtype)
        with torch.no_grad():
            conv.weight.copy_(self.to_dense().t())
            conv.bias.copy_(self.bias if self.bias is not None else torch.zeros_like(conv.bias))
        return conv

    @property
    def num_weight_params(self) -> int:
        return mpo_num_params(self.in_modes, self.out_modes, self.bonds)

    @property
    def compression_ratio(self) -> float:
        return self.in_features * self.out_features / self.num_weight_params

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, in_modes={self.in_modes}, "
            f"out_modes={self.out_modes}, bonds={self.bonds}, ratio={self.compression_ratio:.2f}, "
            f"bias={self.bias is not None}, backend={self.backend!r}"
        )


def _planned_structure(weight: torch.Tensor, ratio: float, prefer: str, where: str):
    """(in_modes, out_modes, bonds, None) chosen by the planner. When no structure reaches the ratio, the
    RatioUnreachableError that tensorize turns into "left dense" (before 2026-12-02 the default path's auto_modes
    raised a plain ValueError for sizes it cannot split, e.g. a Linear(256, 1) head or Swin V2's Linear(2, 512), and
    tensorize(model, ratio=...) stopped there). Any other ValueError: (None, None, None, ratio), and the default
    path raises its usual error."""
    from ..plan import choose_mpo_structure

    check_ratio(ratio, f"{where}: ratio")
    out_features, in_features = weight.shape
    floats = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    dtype = weight.dtype if weight.dtype in floats else torch.float32
    try:
        s = choose_mpo_structure(
            out_features, in_features, ratio, prefer=prefer, weight=weight, dtype=dtype, device=weight.device,
        )  # fmt: skip
    except RatioUnreachableError as exc:
        raise RatioUnreachableError(f"{where}: {str(exc).removeprefix('choose_mpo_structure: ')}") from None
    except ValueError:
        return None, None, None, ratio
    return s.in_modes, s.out_modes, list(s.bonds), None


def _resolve_modes(
    in_features: int,
    out_features: int,
    in_modes: Sequence[int] | None,
    out_modes: Sequence[int] | None,
    num_cores: int | None,
    where: str,
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    in_modes = int_tuple(in_modes, "in_modes", where) if in_modes is not None else None
    out_modes = int_tuple(out_modes, "out_modes", where) if out_modes is not None else None
    given = in_modes if in_modes is not None else out_modes
    n = len(given) if given is not None else (num_cores if num_cores is not None else DEFAULT_NUM_CORES)
    if num_cores is not None and given is not None and len(given) != num_cores:
        raise ValueError(f"{where}: num_cores={num_cores} disagrees with the {len(given)} modes given")
    try:
        in_m = tuple(in_modes) if in_modes is not None else auto_modes(in_features, n)
        out_m = tuple(out_modes) if out_modes is not None else auto_modes(out_features, n)
    except ValueError as exc:
        if given is None and num_cores is None:
            # Nothing asked for a balanced split: sizes auto_modes cannot split in two (Swin V2's Linear(2, 512), a
            # 256 -> 1 head, a prime vocabulary) take the low-rank split, the 2-core MPO every size has. Before
            # 2026-12-02 tensorize(model) or tensorize(model, rel_tol=...) stopped at the first such layer.
            return (in_features, 1), (1, out_features)
        raise ValueError(f"{where}: {exc}") from exc
    if math.prod(in_m) != in_features:
        raise ValueError(
            f"{where}: in_modes {in_m} multiply to {math.prod(in_m)}, but the layer has in_features={in_features}"
        )
    if math.prod(out_m) != out_features:
        raise ValueError(
            f"{where}: out_modes {out_m} multiply to {math.prod(out_m)}, but the layer has out_features={out_features}"
        )
    if len(in_m) != len(out_m):
        raise ValueError(f"{where}: in_modes {in_m} and out_modes {out_m} need the same number of cores")
    return in_m, out_m
