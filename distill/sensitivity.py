"""Per-layer sensitivity scan: compress one layer at a time and measure what it costs.

This is the paper's layer-sensitivity figure and the input of the rank-budget allocator (distill/budget.py):
for each selected layer and each compression ratio, a deep copy of the model gets only that layer tensorized
(through the public ``tnkernels.tensorize`` with a one-entry ``rules`` dict), and ``eval_fn(copy)`` is
recorded. The parameter count the tensorization actually produced is recorded too, so the allocator budgets
with real integer ranks rather than the nominal ratio."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from ._atomic import atomic_write_json, read_json

_FORMAT = "tnkernels.sensitivity/1"


def layer_rule_pattern(name: str) -> str:
    """The fnmatch pattern matching exactly the module called `name` (``[`` would otherwise open a set)."""
    return "".join(
        "[[]" if c == "[" else "[]]" if c == "]" else "[*]" if c == "*" else "[?]" if c == "?" else c for c in name
    )


@dataclass
class SensitivityTable:
    """eval_fn results with one layer compressed at a time, indexed [layer][ratio].

    Attributes:
        layers: qualified module names (rows).
        ratios: the requested compression ratios (columns), ascending.
        baseline: eval_fn on the uncompressed model.
        values: values[i][j] = eval_fn with only layers[i] compressed at ratios[j]; None where that
            layer could not be compressed at that ratio (see ``notes``).
        params_dense: weight parameters of each layer before compression.
        params_after: params_after[i][j] = weight parameters the tensorized layer really has (None: skipped).
        rel_errors: relative weight reconstruction error reported by tensorize (None where unknown).
        higher_is_better: True for accuracy-like metrics, False for errors/losses.
        metric: a label for plots and reports.
        notes: "layer@ratio" -> why that cell is empty.
        seconds: wall-clock time of the scan.
    """

    layers: list[str]
    ratios: list[float]
    baseline: float
    values: list[list[float | None]]
    params_dense: dict[str, int]
    params_after: list[list[int | None]]
    rel_errors: list[list[float | None]] = field(default_factory=list)
    higher_is_better: bool = True
    metric: str = "accuracy"
    notes: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def __post_init__(self) -> None:
        if not self.rel_errors:
            self.rel_errors = [[None] * len(self.ratios) for _ in self.layers]
        n, m = len(self.layers), len(self.ratios)
        if len(set(self.layers)) != n:
            raise ValueError("SensitivityTable: layer names must be unique")
        for what, grid in (
            ("values", self.values),
            ("params_after", self.params_after),
            ("rel_errors", self.rel_errors),
        ):
            if len(grid) != n or any(len(row) != m for row in grid):
                raise ValueError(f"SensitivityTable: {what} must be {n} rows x {m} columns (layers x ratios)")
        missing = [name for name in self.layers if name not in self.params_dense]
        if missing:
            raise ValueError(f"SensitivityTable: params_dense lacks layers {missing}")

    def loss(self, layer: str, ratio: float) -> float | None:
        """Predicted loss of compressing `layer` at `ratio`: how much worse the metric got than the baseline.

        Improvements (a compressed layer scoring better than the dense model) are measurement noise for
        budgeting purposes and clamp to 0: the allocator never compresses a layer further "because it helps".
        """
        v = self.values[self._row(layer)][self._col(ratio)]
        if v is None:
            return None
        delta = (self.baseline - v) if self.higher_is_better else (v - self.baseline)
        return max(0.0, float(delta))

    def options(self, layer: str) -> list[tuple[float, int, float]]:
        """(nominal ratio, parameters after, predicted loss) for every ratio measured for `layer`."""
        i = self._row(layer)
        out = []
        for j, r in enumerate(self.ratios):
            if self.values[i][j] is None or self.params_after[i][j] is None:
                continue
            out.append((r, int(self.params_after[i][j]), self.loss(layer, r)))
        return out

    def _row(self, layer: str) -> int:
        try:
            return self.layers.index(layer)
        except ValueError:
            raise ValueError(f"SensitivityTable: unknown layer {layer!r}; known: {self.layers}") from None

    def _col(self, ratio: float) -> int:
        for j, r in enumerate(self.ratios):
            if math.isclose(r, ratio, rel_tol=1e-9):
                return j
        raise ValueError(f"SensitivityTable: ratio {ratio} was not scanned; scanned: {self.ratios}")

    def to_dict(self) -> dict:
        return {
            "format": _FORMAT,
            "metric": self.metric,
            "higher_is_better": self.higher_is_better,
            "baseline": self.baseline,
            "layers": list(self.layers),
            "ratios": list(self.ratios),
            "values": self.values,
            "params_dense": dict(self.params_dense),
            "params_after": self.params_after,
            "rel_errors": self.rel_errors,
            "notes": dict(self.notes),
            "seconds": self.seconds,
        }

    def to_json(self, path: str | Path) -> Path:
        """Write the table as JSON, atomically (tmp file + rename)."""
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def from_json(cls, path: str | Path) -> SensitivityTable:
        d = read_json(path, "SensitivityTable.from_json")
        if not isinstance(d, dict) or d.get("format") != _FORMAT:
            raise ValueError(
                f"SensitivityTable.from_json: {str(path)!r} is not a sensitivity table "
                f"(expected format {_FORMAT!r}); write one with `tnk sensitivity` or sensitivity_scan"
            )
        try:
            return cls(
                layers=list(d["layers"]),
                ratios=[float(r) for r in d["ratios"]],
                baseline=float(d["baseline"]),
                values=d["values"],
                params_dense={k: int(v) for k, v in d["params_dense"].items()},
                params_after=d["params_after"],
                rel_errors=d.get("rel_errors") or [],
                higher_is_better=bool(d["higher_is_better"]),
                metric=str(d.get("metric", "metric")),
                notes=dict(d.get("notes", {})),
                seconds=float(d.get("seconds", 0.0)),
            )
        except KeyError as e:
            raise ValueError(f"SensitivityTable.from_json: {str(path)!r} lacks field {e}") from None

    def to_markdown(self) -> str:
        """The table as markdown: one row per layer, the metric per ratio (baseline in the header)."""
        head = "| layer (dense params) | " + " | ".join(f"{r:g}x" for r in self.ratios) + " |"
        lines = [
            f"{self.metric}, baseline {self.baseline:.4g}",
            "",
            head,
            "|---|" + "---|" * len(self.ratios),
        ]
        for i, name in enumerate(self.layers):
            cells = ["-" if v is None else f"{v:.4g}" for v in self.values[i]]
            lines.append(f"| {name} ({self.params_dense[name]}) | " + " | ".join(cells) + " |")
        return "\n".join(lines)


def _weight_params(module: nn.Module) -> int:
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor):
        raise ValueError(
            f"sensitivity_scan: module {type(module).__name__} has no weight to compress; "
            f"scan Linear / Conv2d / Conv1D layers only"
        )
    return w.numel()


def sensitivity_scan(
    model: nn.Module,
    layer_names: Sequence[str],
    ratios: Sequence[float],
    eval_fn: Callable[[nn.Module], float],
    *,
    progress: bool = True,
    higher_is_better: bool = True,
    metric: str | None = None,
    rel_tol: float | None = None,
) -> SensitivityTable:
    """Compress one layer at a time at each ratio and record ``eval_fn`` on the result.

    Args:
        model: the dense model; it is never modified (each measurement works on a deep copy).
        layer_names: qualified names of Linear / Conv2d / HF Conv1D modules to scan.
        ratios: compression ratios (> 1) to try for each layer.
        eval_fn: model -> float, e.g. test accuracy or the relative output error against the teacher.
        progress: show a tqdm bar over (layer, ratio) cells.
        higher_is_better: True when eval_fn is accuracy-like, False when it is an error.
        metric: label for plots and reports; default "accuracy" or "error" per higher_is_better.
        rel_tol: passed through to tensorize (None: rank from the ratio only).

    A (layer, ratio) cell that tensorize cannot produce (ValueError, e.g. the ratio is unreachable for that
    shape) is left empty and the reason stored in ``table.notes``; the allocator does not offer it.
    """
    import tnkernels  # the public API only; imported here so `distill.budget` works without building kernels

    names = list(layer_names)
    if not names:
        raise ValueError("sensitivity_scan: layer_names is empty; pass the qualified names of the layers to scan")
    if len(set(names)) != len(names):
        raise ValueError("sensitivity_scan: layer_names has duplicates")
    modules = dict(model.named_modules())
    unknown = [n for n in names if n not in modules]
    if unknown:
        raise ValueError(
            f"sensitivity_scan: unknown layer names {unknown}; "
            f"see [n for n, _ in model.named_modules()] for valid names"
        )
    rs = sorted(float(r) for r in ratios)
    if not rs or any(not math.isfinite(r) or r <= 1.0 for r in rs):
        raise ValueError(f"sensitivity_scan: ratios must be finite and > 1 (got {list(ratios)})")
    if len(set(rs)) != len(rs):
        raise ValueError("sensitivity_scan: ratios has duplicates")
    if not callable(eval_fn):
        raise TypeError("sensitivity_scan: eval_fn must be a callable model -> float")

    t0 = time.perf_counter()
    baseline = float(eval_fn(model))
    params_dense = {n: _weight_params(modules[n]) for n in names}
    values = [[None] * len(rs) for _ in names]
    after = [[None] * len(rs) for _ in names]
    errs = [[None] * len(rs) for _ in names]
    notes: dict[str, str] = {}

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(names) * len(rs), desc="sensitivity", unit="cell")
    try:
        for i, name in enumerate(names):
            for j, r in enumerate(rs):
                if bar is not None:
                    bar.set_postfix_str(f"{name} @ {r:g}x")
                student = copy.deepcopy(model)
                rule = {"ratio": r} if rel_tol is None else {"ratio": r, "rel_tol": rel_tol}
                try:
                    report = tnkernels.tensorize(student, rules={layer_rule_pattern(name): rule})
                except ValueError as e:
                    notes[f"{name}@{r:g}"] = str(e)
                else:
                    row = next((row for row in report.rows if row.name == name), None)
                    if row is None or row.status != "tensorized" or row.params_after >= row.params_before:
                        notes[f"{name}@{r:g}"] = "tensorize left the layer dense" + (
                            f" ({row.status})" if row is not None else ""
                        )
                    else:
                        after[i][j] = int(row.params_after)
                        errs[i][j] = None if row.rel_error is None else float(row.rel_error)
                        values[i][j] = float(eval_fn(student))
                del student
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return SensitivityTable(
        layers=names,
        ratios=rs,
        baseline=baseline,
        values=values,
        params_dense=params_dense,
        params_after=after,
        rel_errors=errs,
        higher_is_better=higher_is_better,
        metric=metric or ("accuracy" if higher_is_better else "error"),
        notes=notes,
        seconds=time.perf_counter() - t0,
    )
