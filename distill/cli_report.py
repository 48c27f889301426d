"""What `tnk compress` writes and prints for a ResNet run besides the model: plots and the summary lines."""

from __future__ import annotations

from pathlib import Path


def write_plots(report: dict, res, out: Path, args) -> None:
    try:
        from . import plots
    except ImportError as exc:  # matplotlib missing: the numbers in report.json are still written
        report["plots_error"] = str(exc)
        return
    histories = {
        k: [{"step": h["step"], "loss": h["val_loss"]} for h in v.history] for k, v in res.slices.items() if v.history
    }
    files = []
    if histories:
        files.append(str(plots.plot_slice_losses(histories, out / "slice_losses.png")))
    acc = {"slice-wise": {report["ratio"]: report["student_accuracy"]}}
    if "global_accuracy" in report:
        acc["global"] = {report["ratio"]: report["global_accuracy"]}
    files.append(
        str(
            plots.plot_accuracy_vs_ratio(
                acc, out / "accuracy_vs_ratio.png", teacher_accuracy=report["teacher_accuracy"]
            )
        )
    )
    sens = args.sensitivity or (out / "sensitivity.json" if (out / "sensitivity.json").is_file() else None)
    if sens is not None:
        from .sensitivity import SensitivityTable

        files.append(str(plots.plot_sensitivity(SensitivityTable.from_json(sens), out / "sensitivity.png")))
    report["plots"] = files


def summary(r: dict, out: Path) -> str:
    lines = [
        f"teacher accuracy  {r['teacher_accuracy']:.4f}",
        f"student accuracy  {r['student_accuracy']:.4f}  (slice-wise, {r['mode']}, no global fine-tune)",
    ]
    if "global_accuracy" in r:
        lines.append(f"global baseline   {r['global_accuracy']:.4f}  (same tensorization, same wall-clock)")
    lines += [
        f"ratio             {r['ratio']:.2f}x on the sliced layers "
        f"({r['params_compressed_layers'][0]:,} -> {r['params_compressed_layers'][1]:,} weights"
        + (f"; {r['layers_left_dense']} layers left dense at 1x" if r.get("layers_left_dense") else "")
        + ")",
        f"time              teacher {r['times']['teacher_s']:.0f}s, slice-wise {r['slicewise_seconds']:.0f}s",
        f"outputs           {out / 'compressed'}, {out / 'report.json'}",
    ]
    return "\n".join(lines)
