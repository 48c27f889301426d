"""Plots: valid PNGs written atomically, the data actually drawn, clear errors on malformed input."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.image import imread

from distill import plots
from distill.plots import plot_accuracy_vs_ratio, plot_sensitivity, plot_slice_losses
from distill.sensitivity import SensitivityTable

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def check_png(path):
    assert path.read_bytes()[:8] == PNG_MAGIC
    img = imread(path)
    assert img.ndim == 3 and img.shape[0] > 50 and img.shape[1] > 50
    assert float(np.std(img[..., :3])) > 0.01  # not a blank canvas
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporaries left
    assert plt.get_fignums() == []  # figures are closed (long runs must not leak them)


@pytest.fixture
def captured(monkeypatch):
    """Record the figure each plot function saves: check what was drawn, not only that a file exists."""
    figs = []
    real = plots._save

    def spy(fig, path):
        figs.append(fig)
        return real(fig, path)

    monkeypatch.setattr(plots, "_save", spy)
    return figs


def test_accuracy_vs_ratio(tmp_path, captured):
    results = {"slice-wise": {2.0: 0.97, 4.0: 0.95}, "global": [(4.0, 0.80), (2.0, 0.90)], "teacher": 0.98}
    out = plot_accuracy_vs_ratio(results, tmp_path / "acc.png")
    check_png(out)
    ax = captured[0].axes[0]
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    assert list(lines["global"].get_xdata()) == [2.0, 4.0]  # sorted by ratio
    assert list(lines["global"].get_ydata()) == [0.90, 0.80]
    assert list(lines["slice-wise"].get_ydata()) == [0.97, 0.95]
    teacher = next(ln for label, ln in lines.items() if label.startswith("teacher"))
    assert set(teacher.get_ydata()) == {0.98}


def test_slice_losses_accepts_floats_and_dicts(tmp_path, captured):
    hist = {
        "layer1": [1.0, 0.5, 0.25],
        "layer2": [{"epoch": 1, "loss": 0.9}, {"epoch": 2, "loss": 0.3}],
        "layer3": {"history": [{"step": 10, "loss": 2.0}, {"step": 20, "loss": 1.0}]},
    }
    check_png(plot_slice_losses(hist, tmp_path / "losses.png"))
    ax = captured[0].axes[0]
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    assert list(lines["layer2"].get_xdata()) == [1.0, 2.0] and list(lines["layer3"].get_xdata()) == [
        10.0,
        20.0,
    ]
    assert ax.get_yscale() == "log"


def test_sensitivity_heat_map(tmp_path, captured):
    table = SensitivityTable(
        layers=["conv1", "layer1.0.conv1", "fc"],
        ratios=[2.0, 4.0],
        baseline=0.9,
        values=[[0.89, 0.80], [0.9, None], [0.95, 0.5]],
        params_dense={"conv1": 100, "layer1.0.conv1": 200, "fc": 50},
        params_after=[[50, 25], [100, None], [25, 12]],
    )
    check_png(plot_sensitivity(table, tmp_path / "sens.png"))
    data = np.ma.getdata(captured[0].axes[0].images[0].get_array())
    # Rows are layers, columns ratios, cells the metric drop; improvements clamp to 0; missing cells are NaN.
    np.testing.assert_allclose(data[0], [0.01, 0.10], atol=1e-12)
    assert data[1, 0] == 0.0 and np.isnan(data[1, 1])
    np.testing.assert_allclose(data[2], [0.0, 0.4], atol=1e-12)


def test_overwrite_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "acc.png"
    plot_accuracy_vs_ratio({"a": {2.0: 0.5}}, path)
    before = path.read_bytes()

    def broken_savefig(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(plt.Figure, "savefig", broken_savefig)
    with pytest.raises(RuntimeError, match="disk full"):
        plot_accuracy_vs_ratio({"a": {2.0: 0.9}}, path)
    assert path.read_bytes() == before  # the old PNG survives a failed render
    assert plt.get_fignums() == []


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda p: plot_accuracy_vs_ratio({}, p), "non-empty"),
        (lambda p: plot_accuracy_vs_ratio({"teacher": 0.9}, p), "no method series"),
        (lambda p: plot_accuracy_vs_ratio({"a": {2.0: float("nan")}}, p), "non-finite"),
        (lambda p: plot_accuracy_vs_ratio({"a": 3}, p), r"\{ratio: accuracy\}"),
        (lambda p: plot_accuracy_vs_ratio({"a": {2.0: 0.5}}, p.with_suffix(".jpg")), "must end in .png"),
        (lambda p: plot_slice_losses({}, p), "non-empty"),
        (lambda p: plot_slice_losses({"s": []}, p), "non-empty list"),
        (lambda p: plot_slice_losses({"s": [{"mse": 1.0}]}, p), "no 'loss' key"),
    ],
)
def test_errors(tmp_path, call, match):
    with pytest.raises(ValueError, match=match):
        call(tmp_path / "x.png")
    assert plt.get_fignums() == []
    assert not list(tmp_path.iterdir())


def test_sensitivity_wrong_type(tmp_path):
    with pytest.raises(TypeError, match="SensitivityTable"):
        plot_sensitivity({"a": 1}, tmp_path / "x.png")
