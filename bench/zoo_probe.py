"""One torchvision model through tensorize, forward, backward, save/load: the per-model probe of bench/zoo_sweep.py.

    python bench/zoo_probe.py mobilenet_v3_small            # prints one JSON row
    python bench/zoo_probe.py vit_b_16 --ratio 2 --exact-limit 0

Checks (each a field of the row): the converted model's forward runs and its output is finite with the dense
output's shape; every conv / linear-like layer of the model that stays dense is in the report with a reason (layers
tensorize never considers, e.g. Conv1d / Conv3d, count as unlisted); backward runs in train mode at batch 2 and
every tensorized parameter gets a finite gradient; save_compressed then load_compressed into a fresh skeleton gives
the same output bit for bit; the parameter count drops by what the report says; tensorize's time and the process's
peak RSS. With `exact` the model is tensorized a second time at full rank (no ratio), which must reproduce the dense
output up to rounding: this catches conversions that run but compute something else.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import sys
import tempfile
import time
import traceback
import warnings

import torch
import torchvision
from torch import nn

from tnkernels import MPOLinear, TuckerConv2d, load_compressed, save_compressed, tensorize
from tnkernels.convert.tensorize import count_params

# Smallest square input the model accepts (default 64): fixed-size position embeddings, window partitions.
INPUT_SIZE = {
    "inception_v3": 75,
    "maxvit_t": 224,
    "vit_b_16": 224,
    "vit_b_32": 224,
    "vit_l_16": 224,
    "vit_l_32": 224,
    "vit_h_14": 224,
    "raft_small": 128,
    "raft_large": 128,
    "ssdlite320_mobilenet_v3_large": 320,
    "mvit_v1_b": 224,
    "mvit_v2_s": 224,
    "s3d": 224,
}
TRAIN_SIZE = {"inception_v3": 299}  # its auxiliary head (train mode only) needs the full-size input
VIDEO_FRAMES = {"mvit_v1_b": 16, "mvit_v2_s": 16, "s3d": 16}  # else 4 frames
CONV_LIKE = (nn.Linear, nn.modules.conv._ConvNd)


def kind_of(name: str) -> str:
    from torchvision.models import detection, optical_flow, segmentation, video

    for kind, mod in (("detection", detection), ("segmentation", segmentation), ("video", video)):
        if name in torchvision.models.list_models(module=mod):
            return kind
    if name in torchvision.models.list_models(module=optical_flow):
        return "flow"
    return "classification"


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    kwargs = {"weights": None}
    if kind_of(name) == "detection":
        kwargs["weights_backbone"] = None
    if kind_of(name) == "segmentation":
        kwargs.update(weights_backbone=None, aux_loss=False)
    model = torchvision.models.get_model(name, **kwargs)
    with torch.no_grad():  # zero-initialised heads (ViT, Swin's...) would make every output comparison 0 == 0
        for p in model.parameters():
            if p.dim() > 1 and not p.any():
                p.normal_(0, 0.02)
    return model


def make_input(name: str, batch: int = 1, size: int | None = None):
    size = size or INPUT_SIZE.get(name, 64)
    g = torch.Generator().manual_seed(1)
    kind = kind_of(name)
    if kind == "video":
        return (torch.randn(batch, 3, VIDEO_FRAMES.get(name, 4), size, size, generator=g),)
    if kind == "flow":
        return torch.randn(batch, 3, size, size, generator=g), torch.randn(batch, 3, size, size, generator=g)
    if kind == "detection":
        return ([torch.rand(3, size, size, generator=g) for _ in range(batch)],)
    return (torch.randn(batch, 3, size, size, generator=g),)


def tensors(out) -> list[torch.Tensor]:
    """The floating tensors of a model output (tensor, tuple, namedtuple, dict, list of dicts), in order."""
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    if isinstance(out, dict):
        return [t for k in sorted(out) for t in tensors(out[k])]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in tensors(o)]
    return []


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _rel(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    num = sum(float(((x.double() - y.double()) ** 2).sum()) for x, y in zip(a, b))
    den = sum(float((y.double() ** 2).sum()) for y in b)
    return (num / max(den, 1e-300)) ** 0.5


def _step(row: dict, key: str, fn):
    """Run one check; a crash is recorded in the row (type and message) instead of ending the probe."""
    t0 = time.perf_counter()
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - a probe records every failure
        row["errors"][key] = f"{type(exc).__name__}: {exc}"[:600]
        row["tracebacks"][key] = traceback.format_exc()[-3000:]
        return None
    finally:
        row.setdefault("seconds", {})[key] = round(time.perf_counter() - t0, 2)


def probe(name: str, ratio: float = 2.0, exact_limit: float = 100e6, backward: bool = True, roundtrip=True) -> dict:
    row: dict = {"model": name, "kind": kind_of(name), "errors": {}, "tracebacks": {}, "warnings": []}
    model = build(name).eval()
    x = make_input(name)
    row["input"] = [list(t.shape) if isinstance(t, torch.Tensor) else [list(i.shape) for i in t] for t in x]
    with torch.no_grad():
        dense = tensors(model(*x))
    layers = {n: type(m).__name__ for n, m in model.named_modules() if isinstance(m, CONV_LIKE)}
    row["params_before"] = count_params(model)
    reference = copy.deepcopy(model) if row["params_before"] <= exact_limit else None
    rss0 = rss_mib()
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = _step(row, "tensorize", lambda: tensorize(model, ratio=ratio))
    row["warnings"] += sorted({str(w.message)[:300] for w in caught})
    row["tensorize_s"] = round(time.perf_counter() - t0, 2)
    row["rss_before_mib"] = round(rss0)
    row["peak_rss_mib"] = round(peak_rss_mib())
    if report is None:
        return row
    row["params_after"] = count_params(model)
    row["report_params"] = [report.params_before, report.params_after]
    row["params_ok"] = row["params_after"] == row["params_before"] - report.params_before + report.params_after
    row["converted"] = len(report.tensorized)
    converted = {n for n, m in model.named_modules() if isinstance(m, (MPOLinear, TuckerConv2d))}
    listed = {r.name: r.status for r in report.skipped}
    row["dense"] = {n: listed[n].removeprefix("skipped: ")[:200] for n in layers if n in listed}
    row["unlisted"] = {n: layers[n] for n in layers if n not in converted and n not in listed}
    row["reasons_ok"] = all(s.startswith("skipped: ") and len(s) > 12 for s in listed.values())

    def forward():
        with torch.no_grad():
            out = tensors(model(*x))
        row["forward_ok"] = len(out) == len(dense) and all(
            o.shape == d.shape and bool(torch.isfinite(o).all()) for o, d in zip(out, dense)
        )
        row["rel_err_vs_dense"] = _rel(out, dense) if row["forward_ok"] else None
        return out

    out = _step(row, "forward", forward)
    if not converted:  # nothing to save or differentiate (s3d: Conv3d only, its classifier too)
        roundtrip = backward = False
    if roundtrip and out is not None:
        _step(row, "roundtrip", lambda: _roundtrip(row, model, name, x, out))
    if reference is not None:
        _step(row, "exact", lambda: _exact(row, reference, x, dense))
    if backward and row["kind"] != "detection":  # last: a train-mode forward updates BatchNorm's running stats
        _step(row, "backward", lambda: _backward(row, model, name))
    row["peak_rss_mib_end"] = round(peak_rss_mib())
    return row


def _backward(row: dict, model: nn.Module, name: str) -> None:
    xb = make_input(name, batch=2, size=TRAIN_SIZE.get(name))
    model.train()
    try:
        loss = sum(t.float().square().mean() for t in tensors(model(*xb)))
        loss.backward()
    finally:
        model.eval()
    tn = [p for m in model.modules() if isinstance(m, (MPOLinear, TuckerConv2d)) for p in m.parameters()]
    row["backward_ok"] = bool(tn) and all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in tn)
    model.zero_grad(set_to_none=True)


def _roundtrip(row: dict, model: nn.Module, name: str, x, out) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = save_compressed(model, f"{tmp}/ckpt")
        restored = load_compressed(build(name), path).eval()
        with torch.no_grad():
            again = tensors(restored(*x))
    row["roundtrip_ok"] = len(again) == len(out) and all(torch.equal(a, o) for a, o in zip(again, out))


def _exact(row: dict, reference: nn.Module, x, dense) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # full rank holds more weights than dense: tensorize warns, as it should
        tensorize(reference)
    with torch.no_grad():
        out = tensors(reference(*x))
    row["exact_rel_err"] = _rel(out, dense)
    row["exact_ok"] = row["exact_rel_err"] < 1e-4


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--ratio", type=float, default=2.0)
    p.add_argument("--exact-limit", type=float, default=100e6, help="full-rank check only up to this many params")
    p.add_argument("--no-backward", action="store_true")
    p.add_argument("--no-roundtrip", action="store_true")
    p.add_argument("--threads", type=int, default=0)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    row = probe(a.model, a.ratio, a.exact_limit, backward=not a.no_backward, roundtrip=not a.no_roundtrip)
    sys.stdout.write("ZOOROW " + json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
