"""A forward on the meta device works out output shapes without running anything (how accelerate and
torch.export size a model). It failed in the autocast check (torch has no autocast for meta), and once past it, the
first call timed meta ops as if they ran and stored those constants in the cache folder."""

import copy
import json

import pytest
import torch

import tnkernels as tk
from tnkernels.plan import calibrate


@pytest.fixture
def fresh_cache(monkeypatch, tmp_path):
    """An empty cache folder; the CPU's constants stay in memory (measuring them again costs seconds a test)."""
    monkeypatch.setenv("TNK_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(calibrate, "_MEMO", {k: v for k, v in calibrate._MEMO.items() if "meta" not in k})
    tk.plan.clear_plans()
    yield tmp_path
    tk.plan.clear_plans()


@pytest.fixture(scope="module")
def built():
    """The layers, built once in the ordinary cache folder (building times structures on the CPU)."""
    torch.manual_seed(0)
    return {
        2: tk.MPOLinear.from_linear(torch.nn.Linear(256, 128), ratio=2),
        8: tk.MPOLinear.from_linear(torch.nn.Linear(256, 128), ratio=8),
        "conv": tk.TuckerConv2d.from_conv(torch.nn.Conv2d(8, 16, 3, stride=2, padding=1), ratio=2),
    }


def _meta_keys(folder):
    keys = []
    for f in folder.glob("*.json"):
        keys += [k for k in json.loads(f.read_text()) if "meta" in k]
    return keys


@pytest.mark.parametrize("ratio", [2, 8], ids=["chain_or_low_rank_2x", "8x"])
@pytest.mark.parametrize("rows", [1, 300])
@pytest.mark.parametrize("needs_grad", [False, True])
def test_mpo_linear_meta_forward_gives_shapes(built, fresh_cache, ratio, rows, needs_grad):
    layer = copy.deepcopy(built[ratio]).to("meta")
    x = torch.randn(3, rows, 256, device="meta", requires_grad=needs_grad)
    y = layer(x)
    assert y.is_meta and y.shape == (3, rows, 128)
    if needs_grad:
        y.sum().backward()
        assert x.grad.shape == x.shape and all(p.grad.shape == p.shape for p in layer.parameters())
    assert not _meta_keys(fresh_cache), "the meta device was timed and stored"


def test_tucker_conv2d_meta_forward_gives_shapes(built, fresh_cache):
    conv = copy.deepcopy(built["conv"]).to("meta")
    x = torch.randn(2, 8, 9, 9, device="meta", requires_grad=True)
    y = conv(x)
    assert y.is_meta and y.shape == (2, 16, 5, 5)
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert not _meta_keys(fresh_cache)


def test_recalibrate_refuses_meta():
    with pytest.raises(ValueError, match="meta device"):
        tk.plan.recalibrate("meta")
