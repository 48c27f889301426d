"""tensorize on the layer kinds of the torchvision zoo, one small model per family (bench/zoo_sweep.py runs the
whole zoo at full size; bench/results/zoo_sweep_*.md).

Each model is built at a small width / input where its constructor allows it, with random weights, and checked
end to end: tensorize at ratio 2 with the default rules; a finite forward of the dense output's shape; every conv /
linear layer either tensorized or in the report with a reason; backward in train mode; save_compressed /
load_compressed into a fresh skeleton, bit for bit; the parameter count against the report; and, tensorized at
full rank instead, the dense model's output (a conversion that runs but computes something else fails there).
"""

from __future__ import annotations

import copy
import warnings
from functools import partial

import pytest
import torch
from torch import nn
from torchvision import models
from torchvision.models.convnext import CNBlockConfig
from torchvision.models.video.resnet import BasicBlock, BasicStem, Conv3DSimple, VideoResNet

from tnkernels import MPOLinear, RatioUnreachableError, TuckerConv2d, load_compressed, save_compressed, tensorize
from tnkernels.convert.tensorize import count_params

WEIGHT_LAYERS = (nn.Linear, nn.modules.conv._ConvNd)


def _swin_v2():
    from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformerBlockV2

    return models.SwinTransformer(
        patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=[2, 2], num_classes=10,
        block=SwinTransformerBlockV2, downsample_layer=PatchMergingV2,
    )  # fmt: skip


# name -> (skeleton builder, input size). Each builder makes the same architecture every call (the skeleton of the
# round trip); the weights come from the seed.
ZOO = {
    "mobilenet_v3_small": (partial(models.mobilenet_v3_small, num_classes=10), 32),
    "efficientnet_b0": (partial(models.efficientnet_b0, num_classes=10), 32),
    "convnext": (
        partial(models.ConvNeXt, [CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 1)], num_classes=10),
        32,
    ),
    "regnet": (
        lambda: models.RegNet(
            models.regnet.BlockParams.from_init_params(depth=3, w_0=16, w_a=8, w_m=2, group_width=8, se_ratio=0.25),
            num_classes=10,
        ),
        32,
    ),
    "shufflenet_v2_x0_5": (partial(models.shufflenet_v2_x0_5, num_classes=10), 32),
    "squeezenet1_0": (partial(models.squeezenet1_0, num_classes=10), 48),
    "densenet": (
        partial(models.DenseNet, growth_rate=8, block_config=(2, 2), num_init_features=16, bn_size=2, num_classes=10),
        32,
    ),
    "googlenet": (partial(models.googlenet, num_classes=10, init_weights=True), 48),
    "inception_v3": (partial(models.inception_v3, num_classes=10, aux_logits=False, init_weights=True), 75),
    "mnasnet": (partial(models.MNASNet, 0.25, num_classes=10), 32),
    "vit": (
        partial(models.VisionTransformer, 32, 8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=10),
        32,
    ),
    "swin": (
        partial(models.SwinTransformer, [4, 4], 16, [1, 1], [2, 2], [2, 2], num_classes=10),
        32,
    ),
    "swin_v2": (_swin_v2, 32),
    "maxvit": (
        partial(models.MaxVit, (32, 32), 8, 2, [16, 32], [1, 1], 8, 0.0, num_classes=10),
        32,
    ),
    "lraspp": (partial(models.segmentation.lraspp_mobilenet_v3_large, weights_backbone=None, num_classes=3), 64),
    "r3d": (
        partial(VideoResNet, BasicBlock, [Conv3DSimple] * 4, [1, 1, 1, 1], BasicStem, num_classes=10),
        (4, 16),
    ),
}


def _build(name: str) -> nn.Module:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # googlenet's note on its default init
        model = ZOO[name][0]()
    with torch.no_grad():  # a zero-initialised head (ViT) would make every output comparison 0 == 0
        for p in model.parameters():
            if p.dim() > 1 and not p.any():
                p.normal_(0, 0.05)
    return model.eval()


def _input(name: str, batch: int = 1) -> torch.Tensor:
    size = ZOO[name][1]
    g = torch.Generator().manual_seed(1)
    if isinstance(size, tuple):  # video: frames, side
        return torch.randn(batch, 3, size[0], size[1], size[1], generator=g)
    return torch.randn(batch, 3, size, size, generator=g)


def _out(out) -> torch.Tensor:
    return out["out"] if isinstance(out, dict) else out  # segmentation models return {"out": ...}


def _loss(out) -> torch.Tensor:
    if isinstance(out, tuple):  # googlenet's train-mode outputs: logits and the two auxiliary heads
        return sum(_loss(o) for o in out)
    return _out(out).square().mean()


@pytest.fixture(autouse=True)
def _one_thread():
    """One thread: on the shared 2-core machine, two threads per process made these small models' ops up to 30x
    slower whenever another process ran (tests/conftest.py restores the count afterwards)."""
    torch.set_num_threads(1)


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_model_end_to_end(name, tmp_path):
    model = _build(name)
    x = _input(name)
    with torch.no_grad():
        dense = _out(model(x))
    exact = copy.deepcopy(model)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, WEIGHT_LAYERS)}
    before = count_params(model)

    report = tensorize(model, ratio=2)

    # report: every weight layer is tensorized or listed with its reason
    converted = {n for n, m in model.named_modules() if isinstance(m, (MPOLinear, TuckerConv2d))}
    reasons = {r.name: r.status for r in report.skipped}
    assert report.tensorized, name
    unlisted = [n for n in layers if n not in converted and n not in reasons]
    assert not unlisted, f"{name}: left dense without a reason: {unlisted}"
    assert all(s.startswith("skipped: ") and len(s) > 20 for s in reasons.values())
    assert count_params(model) == before - report.params_before + report.params_after

    with torch.no_grad():
        out = _out(model(x))
    assert out.shape == dense.shape and torch.isfinite(out).all()

    path = save_compressed(model, tmp_path / name)
    restored = load_compressed(_build(name), path)
    with torch.no_grad():
        assert torch.equal(_out(restored(x)), out), f"{name}: the reloaded model differs"

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # full rank holds more weights than dense: tensorize says so
        tensorize(exact)
    with torch.no_grad():
        full = _out(exact(x))
    err = float((full - dense).norm() / dense.norm())
    assert err < 1e-4, f"{name}: tensorized at full rank, the output is off by {err:.2e}"

    model.train()
    _loss(model(_input(name, batch=2))).backward()
    grads = [p.grad for m in model.modules() if isinstance(m, (MPOLinear, TuckerConv2d)) for p in m.parameters()]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_layer_too_small_for_the_ratio_is_left_dense_not_an_error():
    """A Linear(256, 1) head, or Swin V2's Linear(2, 512) in its relative-position MLP: no MPO reaches ratio 2.
    tensorize stopped at the first such layer with auto_modes' "1 cannot be split into 2 modes" (a plain
    ValueError); it is a layer that cannot reach the ratio, left dense with the reason, like a conv."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 1))
    report = tensorize(model, ratio=2)
    rows = {r.name: r for r in report.rows}
    assert rows["2"].tensorized
    for name, most in (("0", "1.99x"), ("4", "0.996x")):
        assert "cannot be reached" in rows[name].status and most in rows[name].status, rows[name].status
    with pytest.raises(RatioUnreachableError, match=r"cannot be reached: no MPO .* 512x2 weight more than 1.99x"):
        MPOLinear.from_linear(nn.Linear(2, 512), ratio=2)


def test_sizes_auto_modes_cannot_split_take_the_low_rank_split():
    """Without a ratio (full rank, rel_tol, max_bond) the modes came from auto_modes alone, which cannot split 2 or
    1 in two: tensorize(model) stopped at Swin V2's Linear(2, 512) with a plain ValueError. With neither modes nor
    num_cores given, such a layer takes the low-rank split (in, 1) x (1, out)."""
    torch.manual_seed(0)
    for kwargs in ({}, {"rel_tol": 1e-6}, {"max_bond": 64}):
        model = nn.Sequential(nn.Linear(2, 512), nn.ReLU(), nn.Linear(512, 1))
        x = torch.randn(3, 2)
        with torch.no_grad():
            expected = model(x)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # full rank holds more weights than dense
            report = tensorize(model, **kwargs)
        assert len(report.tensorized) == 2, kwargs
        assert (model[0].in_modes, model[0].out_modes) == ((2, 1), (1, 512))
        with torch.no_grad():
            torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="cannot be split into 2 modes"):  # asked for: still refused
        MPOLinear.from_linear(nn.Linear(2, 512), num_cores=2)


def test_conv_kinds_without_a_replacement_are_listed():
    """Conv1d, Conv3d and transposed convs stay dense; the report said nothing about them (a video model's
    Conv3d, most of its weights, were left out of the report without a word)."""
    model = nn.Sequential(
        nn.Conv1d(8, 16, 3), nn.Conv3d(8, 16, 3), nn.ConvTranspose2d(16, 8, 2), nn.Conv2d(16, 32, 3), nn.Linear(32, 64)
    )
    report = tensorize(model, ratio=2)
    status = {r.name: r.status for r in report.rows}
    assert [r.name for r in report.tensorized] == ["3", "4"]
    for name, kind in (("0", "Conv1d"), ("1", "Conv3d"), ("2", "ConvTranspose2d")):
        assert status[name].startswith(f"skipped: {kind} has no tensorized replacement"), status[name]
    assert isinstance(model[1], nn.Conv3d)
    with pytest.raises(ValueError, match="layer '1' cannot be tensorized: Conv3d has no tensorized replacement"):
        tensorize(nn.Sequential(nn.Linear(4, 4), nn.Conv3d(8, 16, 3)), rules={"1": {}})
    with pytest.raises(ValueError, match="were tensorized before"):  # a second call is still refused as such
        tensorize(model, ratio=2)


def test_mnasnet_round_trip_dense_and_meta_skeleton(tmp_path):
    """MNASNet checks its state's version when loaded; load_compressed handed it none ("version should be set to
    1 or 2 instead of None"): every MNASNet checkpoint was written and then refused."""
    model = _build("mnasnet")
    tensorize(model, ratio=2)
    path = save_compressed(model, tmp_path / "mnasnet")
    x = _input("mnasnet")
    with torch.no_grad():
        expected = model(x)
        with torch.device("meta"):
            meta = ZOO["mnasnet"][0]()
        for skeleton in (ZOO["mnasnet"][0](), meta):
            restored = load_compressed(skeleton, path).eval()
            assert "load_state_dict" not in vars(restored)  # the loader's hook is gone afterwards
            assert torch.equal(restored(x), expected)


def test_multihead_attention_out_proj_left_dense_with_reason():
    """nn.MultiheadAttention's out_proj (a NonDynamicallyQuantizableLinear) is read by F.multi_head_attention_forward:
    left dense with the reason; the encoder's feed-forward Linears are tensorized."""
    model = _build("vit")
    report = tensorize(model, ratio=2)
    rows = {r.name: r.status for r in report.rows}
    assert "inside nn.MultiheadAttention" in rows["encoder.layers.encoder_layer_0.self_attention.out_proj"]
    assert rows["encoder.layers.encoder_layer_0.mlp.0"] == "tensorized"


def test_zoo_sweep_script_writes_its_table(tmp_path):
    """bench/zoo_sweep.py end to end on one small model (a subprocess per model): the JSON row and the table."""
    import json

    zoo_sweep = pytest.importorskip("bench.zoo_sweep")
    zoo_sweep.main(["--models", "squeezenet1_1", "--out", str(tmp_path), "--tag", "smoke"])
    (json_file,) = tmp_path.glob("zoo_sweep_*-smoke.json")
    row = json.loads(json_file.read_text())["rows"][0]
    assert zoo_sweep.clean(row), row
    assert row["converted"] == 26 and row["unlisted"] == {} and row["exact_ok"] and row["roundtrip_ok"]
    table = json_file.with_suffix(".md").read_text()
    assert "| squeezenet1_1 | 1x3x64x64 | 26 |" in table and "1 of 1 models clean" in table
