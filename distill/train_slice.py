"""Train one slice alone: tensorize a copy of the teacher's slice, then fit the teacher's slice output with MSE.

The student starts from the SVD-based decomposition (tnkernels.tensorize) and is trained on the stored teacher
features: MSE between the student's and the teacher's slice outputs (divided by the teacher output's variance when
`normalize`, so losses of different slices are comparable), AdamW, a cosine schedule, and early stopping on
held-out chunks of the calibration features (the best state is kept).

BatchNorm: the whole slice runs in eval mode while it trains. BN layers therefore normalize with the teacher's
running statistics, which stay frozen (no running-stat updates from a few hundred calibration images), while
their affine weight and bias train along with the tensor cores. Dropout is off for the same reason: the target
was produced by the teacher in eval mode.
"""

from __future__ import annotations

import copy
import fnmatch
import math
import numbers
import os
import time
import warnings
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ._atomic import atomic_save
from .capture import FeatureStore, _to
from .slices import SliceSpec, count_params, slice_modules

__all__ = [
    "SliceTrainConfig",
    "SliceResult",
    "tensorize_slice",
    "train_slice",
    "save_slice_checkpoint",
    "load_slice_checkpoint",
    "filter_rules",
    "check_fingerprint",
]

CHECKPOINT_FORMAT = "tnkernels-distill-slice/1"


@dataclass
class SliceTrainConfig:
    max_steps: int = 300
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    normalize: bool = True  # divide the MSE by the teacher output's variance
    eval_every: int = 25
    patience: int = 4  # evaluations without a relative improvement of min_delta before stopping
    min_delta: float = 1e-3
    val_fraction: float = 0.1  # share of stored chunks held out for early stopping
    time_budget_s: float | None = None  # per slice; stops training when exceeded
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        for k in ("max_steps", "batch_size", "eval_every", "patience"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:  # 2.5 or "100" failed later
                raise ValueError(f"SliceTrainConfig.{k} must be an int >= 1, got {v!r}")

        def number(k: str) -> float:
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
                raise ValueError(f"SliceTrainConfig.{k} must be a finite number, got {v!r}")
            return v

        if not (0.0 <= number("val_fraction") < 1.0):
            raise ValueError(f"SliceTrainConfig.val_fraction must be in [0, 1), got {self.val_fraction}")
        if number("lr") <= 0:
            raise ValueError(f"SliceTrainConfig.lr must be > 0, got {self.lr}")
        for k in ("weight_decay", "min_delta"):
            if number(k) < 0:
                raise ValueError(f"SliceTrainConfig.{k} must be >= 0, got {getattr(self, k)}")
        if self.time_budget_s is not None and number("time_budget_s") <= 0:
            raise ValueError(
                f"SliceTrainConfig.time_budget_s must be a positive number of seconds (or None: no limit), got "
                f"{self.time_budget_s}"
            )


@dataclass
class SliceResult:
    name: str
    params_before: int
    params_after: int
    init_loss: float  # held-out loss right after decomposition, before training
    best_loss: float  # held-out loss of the kept (best) state
    steps: int
    seconds: float
    history: list[dict] = field(default_factory=list)  # {step, train_loss, val_loss}
    layers: list[dict] = field(default_factory=list)  # tensorize report rows of this slice

    def to_dict(self) -> dict:
        return asdict(self)


def slice_seed(seed: int, name: str) -> int:
    """A per-slice seed that does not depend on which worker or in which order the slice runs."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**31 - 1)


def filter_rules(rules: dict | None, container: nn.Module) -> dict | None:
    """Keep only the rules whose pattern matches a module of this slice (tensorize rejects unmatched patterns)."""
    if rules is None:
        return None
    names = [n for n, _ in container.named_modules() if n]
    return {p: v for p, v in rules.items() if any(fnmatch.fnmatchcase(n, p) for n in names)}


def tensorize_slice(
    container: nn.Module, spec: SliceSpec, *, ratio: float | None = None, rules: dict | None = None
) -> list[dict]:
    """Tensorize the slice's layers in place (Tucker-2 for convs, MPO for linears); returns the report rows."""
    import tnkernels

    if ratio is None and rules is None:
        raise ValueError("distill: give a compression ratio (--ratio) or a budget (--budget FILE)")
    kept = filter_rules(rules, container)
    if rules is not None and not kept and ratio is None:
        return []  # the budget leaves this slice dense
    try:
        report = tnkernels.tensorize(container, ratio=ratio, rules=kept or None)
    except ValueError as exc:
        raise ValueError(f"slice {spec.name!r}: {exc}") from exc
    rows = []
    for r in getattr(report, "rows", []):
        rows.append(asdict(r) if hasattr(r, "__dataclass_fields__") else dict(r.__dict__))
    for row in rows:
        for k, v in row.items():
            if isinstance(v, tuple):
                row[k] = list(v)
    return rows


def _split_chunks(store: FeatureStore, val_fraction: float) -> frozenset[int]:
    n = store.num_chunks
    if n < 2 or val_fraction <= 0:
        return frozenset()
    n_val = min(max(1, round(val_fraction * n)), n - 1)
    return frozenset(range(n - n_val, n))  # the last chunks: deterministic, independent of the seed


@torch.no_grad()
def _eval_loss(modules, store: FeatureStore, val: frozenset[int], scale: float, device: str) -> float:
    # Summed on the device in float64 and read once: a float() per chunk waits for the GPU every chunk. (The
    # same float64 additions in the same order as the Python floats summed before: the same value.)
    total, count = None, 0
    for i, (x, y, kw) in enumerate(store.chunks()):
        if val and i not in val:
            continue
        out = _run(modules, x.float().to(device), _to(kw, device))
        part = ((out.float() - y.float().to(device)) ** 2).sum().double()
        total = part if total is None else total + part
        count += y.numel()
    return (0.0 if total is None else float(total)) / max(count, 1) / scale


def _run(modules, x, kw):
    from .slices import run_slice

    return run_slice(modules, x, kw)


def _freeze_stats(container: nn.Module) -> None:
    # Eval mode for the whole slice: BN uses (and keeps) the teacher's running statistics, dropout is off.
    container.eval()


def train_slice(
    container: nn.Module,
    spec: SliceSpec,
    store: FeatureStore,
    *,
    ratio: float | None = None,
    rules: dict | None = None,
    config: SliceTrainConfig | None = None,
    progress: bool = True,
    position: int = 0,
    tensorized: bool = False,
    params_before: int | None = None,
) -> SliceResult:
    """Tensorize (unless `tensorized`) and train the slice inside `container` in place; returns its result.

    `store` holds the slice's inputs and the teacher's outputs. Deterministic for a given config.seed and slice
    name on a given number of threads. With `tensorized`, pass the dense count as `params_before`.
    """
    from tqdm.auto import tqdm

    config = config or SliceTrainConfig()
    if store.num_samples == 0:
        raise ValueError(f"slice {spec.name!r}: no calibration features stored")
    if params_before is None:
        params_before = count_params(slice_modules(container, spec))
    layers = [] if tensorized else tensorize_slice(container, spec, ratio=ratio, rules=rules)
    dev = config.device
    container.to(dev)
    modules = slice_modules(container, spec)
    params_after = count_params(modules)
    params = [p for p in container.parameters() if p.requires_grad]
    t0 = time.perf_counter()
    seed = slice_seed(config.seed, spec.name)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    val = _split_chunks(store, config.val_fraction)
    scale = store.output_variance() if config.normalize else 1.0
    _freeze_stats(container)
    init_loss = _eval_loss(modules, store, val, scale, dev)
    best_loss, best_state, step, history = init_loss, copy.deepcopy(container.state_dict()), 0, []
    history.append({"step": 0, "train_loss": None, "val_loss": init_loss})
    if not params:
        return SliceResult(
            spec.name,
            params_before,
            params_after,
            init_loss,
            init_loss,
            0,
            time.perf_counter() - t0,
            history,
            layers,
        )
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1.0 + math.cos(math.pi * min(s, config.max_steps) / config.max_steps))
    )
    # `running` (the train loss since the last evaluation) stays on the device as a float64 sum: a float(loss)
    # every step would make the CPU wait for the GPU at every step instead of queueing the next one.
    bad_evals, running, n_running = 0, None, 0
    bar = tqdm(
        total=config.max_steps,
        desc=f"slice {spec.name}",
        disable=not progress,
        unit="step",
        position=position,
        leave=position == 0,
    )
    stop = False
    while not stop:
        for x, y, kw in store.batches(config.batch_size, gen, exclude=val):
            out = _run(modules, x.to(dev), _to(kw, dev))
            loss = nn.functional.mse_loss(out.float(), y.to(dev).float()) / scale
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            running = loss.detach().double() if running is None else running + loss.detach().double()
            n_running += 1
            bar.update(1)
            out_of_time = config.time_budget_s is not None and time.perf_counter() - t0 > config.time_budget_s
            if step % config.eval_every == 0 or step >= config.max_steps or out_of_time:
                train_loss = float(running) / n_running
                vl = _eval_loss(modules, store, val, scale, dev) if val else train_loss
                history.append({"step": step, "train_loss": train_loss, "val_loss": vl})
                bar.set_postfix(loss=f"{vl:.4g}", start=f"{init_loss:.4g}")
                running, n_running = None, 0
                if not (math.isfinite(train_loss) and math.isfinite(vl)):
                    # The parameters are not finite now: more steps cannot recover. Keep the best state, and say so
                    # (it used to spend `patience` more evaluations on NaN and return the best state silently).
                    warnings.warn(
                        f"slice {spec.name}: the loss became {train_loss if not math.isfinite(train_loss) else vl} "
                        f"by step {step}; keeping the best state (held-out loss {best_loss:.4g}); lower the "
                        "learning rate (--lr)",
                        RuntimeWarning,
                        stacklevel=2,
                    )
                    stop = True
                    break
                if vl < best_loss * (1.0 - config.min_delta):
                    best_loss, best_state, bad_evals = vl, copy.deepcopy(container.state_dict()), 0
                else:
                    bad_evals += 1
                if bad_evals >= config.patience or step >= config.max_steps or out_of_time:
                    stop = True
                    break
    bar.close()
    container.load_state_dict(best_state)
    return SliceResult(
        spec.name,
        params_before,
        params_after,
        init_loss,
        best_loss,
        step,
        time.perf_counter() - t0,
        history,
        layers,
    )


def save_slice_checkpoint(
    path: str | os.PathLike, container: nn.Module, spec: SliceSpec, result: SliceResult, fingerprint: str
) -> None:
    """Write the trained slice modules (pickled, so their tensorized structure survives) atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "fingerprint": fingerprint,
        "spec": [spec.name, list(spec.modules)],
        "modules": {n: container.get_submodule(n).cpu() for n in spec.modules},
        "result": result.to_dict(),
    }
    atomic_save(payload, path)


def load_slice_checkpoint(path: str | os.PathLike, spec: SliceSpec, fingerprint: str | None) -> dict | None:
    """The checkpoint payload, None if the file is absent; ValueError if it was made for another run setup.

    Checkpoints hold pickled modules written by this package, hence weights_only=False: load only your own.
    """
    path = Path(path)
    if not path.is_file():
        return None
    payload = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a distill slice checkpoint; remove it or choose another --out")
    if fingerprint is not None and payload["fingerprint"] != fingerprint:
        raise ValueError(
            f"{path}: was written by a run with another teacher, slices, ratio/budget or training "
            f"settings; use a fresh --out DIR (or delete {path.parent}) to start over"
        )
    if tuple(payload["spec"][1]) != spec.modules:
        raise ValueError(f"{path}: holds modules {payload['spec'][1]}, expected {list(spec.modules)}")
    return payload


def check_fingerprint(out, path, payload: dict, base: str, full: str | None) -> None:
    """ValueError unless checkpoint `payload` was written by this run: same settings (`base`, the digest of the
    teacher, slices, ratio/budget and training settings) and, once known, the same calibration data (`full`)."""
    fp = str(payload.get("fingerprint", ""))
    same_settings = fp.split("-")[0] == base
    if same_settings and (full is None or fp == full):
        return
    what = (
        "the calibration data differ"
        if same_settings
        else "the teacher, slices, ratio/budget or training settings differ"
    )
    raise ValueError(
        f"{out} holds the slices of another run ({what}: {path}); use a fresh --out DIR (distill(out_dir=...)), or "
        f"delete {out} to start over. A rerun with the same model, data and settings resumes where it stopped"
    )
