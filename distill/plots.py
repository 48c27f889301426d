"""The three figures of a distillation run, written as PNG atomically (matplotlib's Agg backend, no display).

- plot_accuracy_vs_ratio: accuracy against compression ratio, one line per method (slice-wise, global, ...),
  with the teacher as a horizontal reference.
- plot_slice_losses: the training loss curve of every slice, log scale.
- plot_sensitivity: the layer x ratio heat map of the sensitivity scan (metric drop when only that layer is
  compressed), the paper's layer-sensitivity figure.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # before pyplot: headless CI and workers have no display

import matplotlib.pyplot as plt  # noqa: E402

from ._atomic import atomic_write_bytes  # noqa: E402
from .sensitivity import SensitivityTable  # noqa: E402


def _png_path(path: str | Path) -> Path:
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"path: {str(path)!r} must end in .png")
    return path


def _save(fig, path: Path) -> Path:
    """Render to memory first, then write atomically, so a failed render leaves no partial PNG."""
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    finally:
        plt.close(fig)
    data = buf.getvalue()
    return atomic_write_bytes(path, lambda f: f.write(data))


def _points(name: str, series: Any) -> list[tuple[float, float]]:
    """Accept {ratio: accuracy} or [(ratio, accuracy), ...]; return sorted finite points."""
    items = series.items() if isinstance(series, Mapping) else series
    try:
        pts = sorted((float(r), float(a)) for r, a in items)
    except (TypeError, ValueError):
        raise ValueError(
            f"plot_accuracy_vs_ratio: results[{name!r}] must be {{ratio: accuracy}} or [(ratio, accuracy), ...]"
        ) from None
    if not pts:
        raise ValueError(f"plot_accuracy_vs_ratio: results[{name!r}] is empty")
    if any(not (math.isfinite(r) and math.isfinite(a)) for r, a in pts):
        raise ValueError(f"plot_accuracy_vs_ratio: results[{name!r}] has non-finite values")
    return pts


def plot_accuracy_vs_ratio(
    results: Mapping[str, Any],
    path: str | Path,
    *,
    teacher_accuracy: float | None = None,
    ylabel: str = "test accuracy",
    title: str | None = "Accuracy vs compression",
) -> Path:
    """One line per method: {"slice-wise": {2.0: 0.97, 4.0: 0.95}, "global": {...}}.

    A float value under the key "teacher" is treated like teacher_accuracy (a dashed horizontal line).
    """
    if not isinstance(results, Mapping) or not results:
        raise ValueError("plot_accuracy_vs_ratio: results must be a non-empty {method: {ratio: accuracy}} mapping")
    series = dict(results)
    if isinstance(series.get("teacher"), int | float):
        t = float(series.pop("teacher"))
        teacher_accuracy = t if teacher_accuracy is None else teacher_accuracy
    if not series:
        raise ValueError("plot_accuracy_vs_ratio: results has no method series besides the teacher")
    path = _png_path(path)
    curves = {name: _points(name, s) for name, s in series.items()}  # validate before opening a figure
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, pts in curves.items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=str(name))
    if teacher_accuracy is not None:
        ax.axhline(
            float(teacher_accuracy),
            color="k",
            linestyle="--",
            linewidth=1,
            label=f"teacher ({float(teacher_accuracy):.4g})",
        )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("compression ratio of the compressed layers (x)")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    return _save(fig, path)


def _curve(name: str, h: Any) -> tuple[list[float], list[float]]:
    """Accept [loss, ...] or [{"loss": ..., "step"/"epoch": ...}, ...] (train_slice histories)."""
    if isinstance(h, Mapping) and "history" in h:
        h = h["history"]
    if not isinstance(h, Sequence) or isinstance(h, str) or len(h) == 0:
        raise ValueError(f"plot_slice_losses: histories[{name!r}] must be a non-empty list of losses or dicts")
    xs, ys = [], []
    for k, e in enumerate(h):
        if isinstance(e, Mapping):
            if "loss" not in e:
                raise ValueError(f"plot_slice_losses: histories[{name!r}][{k}] has no 'loss' key")
            x = e.get("step", e.get("epoch", k))
            y = e["loss"]
        else:
            x, y = k, e
        xs.append(float(x))
        ys.append(float(y))
    return xs, ys


def plot_slice_losses(histories: Mapping[str, Any], path: str | Path, *, title: str | None = None) -> Path:
    """Loss curve per slice: {slice name: [loss per epoch] or [{"epoch"|"step": .., "loss": ..}, ...]}."""
    if not isinstance(histories, Mapping) or not histories:
        raise ValueError("plot_slice_losses: histories must be a non-empty {slice name: history} mapping")
    path = _png_path(path)
    curves = {str(n): _curve(str(n), h) for n, h in histories.items()}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    cmap = plt.get_cmap("viridis")
    positive = True
    for k, (name, (xs, ys)) in enumerate(curves.items()):
        ax.plot(xs, ys, color=cmap(k / max(1, len(curves) - 1)), label=name, linewidth=1.2)
        positive = positive and all(y > 0 for y in ys)
    if positive:  # MSE curves span decades; a log axis shows all slices at once
        ax.set_yscale("log")
    ax.set_xlabel("epoch / step")
    ax.set_ylabel("slice loss (MSE)")
    ax.set_title(title or f"Per-slice training loss ({len(curves)} slices)")
    ax.grid(True, alpha=0.3)
    ax.legend(
        fontsize=6 if len(curves) > 8 else 8,
        ncol=1 if len(curves) <= 16 else 2,
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
    )
    return _save(fig, path)


def plot_sensitivity(table: SensitivityTable, path: str | Path, *, title: str | None = None) -> Path:
    """Heat map of the predicted loss (metric drop vs the dense model), layers down, ratios across.

    Cells the scan could not produce are shown hatched grey.
    """
    if not isinstance(table, SensitivityTable):
        raise TypeError(f"plot_sensitivity: table must be a SensitivityTable, got {type(table).__name__}")
    path = _png_path(path)
    grid = [[table.loss(n, r) for r in table.ratios] for n in table.layers]
    nan = float("nan")
    data = [[nan if v is None else v for v in row] for row in grid]
    n_l, n_r = len(table.layers), len(table.ratios)
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * n_r + 2.5, 1.0 + 0.28 * n_l))
    ax.set_facecolor("0.85")
    finite = [v for row in data for v in row if not math.isnan(v)]
    vmax = max(finite) if finite and max(finite) > 0 else 1.0
    im = ax.imshow(data, aspect="auto", cmap="magma_r", vmin=0.0, vmax=vmax, interpolation="nearest")
    ax.set_xticks(range(n_r), [f"{r:g}x" for r in table.ratios])
    ax.set_yticks(range(n_l), table.layers, fontsize=7 if n_l > 20 else 9)
    ax.set_xlabel("compression ratio of this layer alone")
    if n_l * n_r <= 200:  # numbers only where they stay readable
        for i, row in enumerate(data):
            for j, v in enumerate(row):
                if not math.isnan(v):
                    ax.text(
                        j,
                        i,
                        f"{v:.3g}",
                        ha="center",
                        va="center",
                        fontsize=6,
                        color="white" if v > 0.6 * vmax else "black",
                    )
    word = "drop" if table.higher_is_better else "increase"
    fig.colorbar(im, ax=ax, label=f"{table.metric} {word} vs dense ({table.baseline:.4g})")
    ax.set_title(title or f"Layer sensitivity ({table.metric})")
    return _save(fig, path)
