"""Slices, run_slice, hook capture and the FeatureStore."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from distill.capture import FeatureStore, capture_features
from distill.slices import SliceSpec, build_slice_container, make_slices, resnet_slices, run_slice, slice_modules
from tests.distill.tiny import TinyResNet, calib_loader


def _manual_block_io(model: TinyResNet, x: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Inputs/outputs of every block computed by hand, without hooks."""
    h = model.relu(model.bn1(model.conv1(x)))
    io = {}
    for stage in ("layer1", "layer2", "layer3"):
        for i, block in enumerate(getattr(model, stage)):
            y = block(h)
            io[f"{stage}.{i}"] = (h, y)
            h = y
    return io


def test_capture_equals_manual_forward():
    model = TinyResNet(8).eval()
    specs = resnet_slices(model, "per-block")
    loader = calib_loader(n=40, batch_size=16)  # 3 batches, the last one partial
    stores = capture_features(model, specs, loader, progress=False)
    xs = torch.cat([x for x, _ in loader])
    with torch.no_grad():
        ref = _manual_block_io(model, xs)
    assert set(stores) == set(ref)
    for name, store in stores.items():
        assert store.num_chunks == 3 and len(store) == 40
        x_cap = torch.cat([c[0] for c in store.chunks()])
        y_cap = torch.cat([c[1] for c in store.chunks()])
        torch.testing.assert_close(x_cap, ref[name][0], rtol=0, atol=0)
        torch.testing.assert_close(y_cap, ref[name][1], rtol=0, atol=0)


def test_run_slice_matches_modules_and_kwargs():
    torch.manual_seed(1)
    a, b = nn.Linear(5, 7), nn.Linear(7, 3)
    x = torch.randn(4, 5)
    torch.testing.assert_close(run_slice([a, b], x, {}), b(a(x)))

    class Block(nn.Module):  # HF-style: keyword args and a tuple output
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(5, 5)

        def forward(self, h, *, scale):
            return (self.lin(h) * scale, None)

    blocks = [Block(), Block()]
    scale = torch.rand(4, 1)
    expected = blocks[1].lin(blocks[0].lin(x) * scale) * scale
    torch.testing.assert_close(run_slice(blocks, x, {"scale": scale}), expected)


def test_capture_records_kwargs_for_hf_style_blocks():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(6, 6)

        def forward(self, h, attention_mask=None, position_embeddings=None, use_cache=False):
            cos, sin = position_embeddings
            return (self.lin(h) * attention_mask + cos - sin,)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([Block(), Block()])

        def forward(self, x):
            mask = (x[..., :1] > 0).float()
            pe = (torch.ones_like(x), torch.full_like(x, 0.5))
            for blk in self.blocks:
                x = blk(x, attention_mask=mask, position_embeddings=pe, use_cache=False)[0]
            return x

    net = Net().eval()
    spec = SliceSpec("b1", ("blocks.1",))
    batches = [torch.randn(3, 6), torch.randn(2, 6)]
    store = capture_features(net, [spec], batches, progress=False)["b1"]
    for (x, y, kw), xb in zip(store.chunks(), batches, strict=True):
        assert set(kw) == {"attention_mask", "position_embeddings", "use_cache"}
        torch.testing.assert_close(run_slice([net.blocks[1]], x, kw), y)
        with torch.no_grad():
            torch.testing.assert_close(y, net(xb))


def test_presets_on_torchvision_resnet18():
    import torchvision

    model = torchvision.models.resnet18(num_classes=10)
    assert [s.name for s in resnet_slices(model, "per-stage")] == ["layer1", "layer2", "layer3", "layer4"]
    blocks = resnet_slices(model, "per-block")
    assert [s.name for s in blocks][:3] == ["layer1.0", "layer1.1", "layer2.0"] and len(blocks) == 8
    convs = resnet_slices(model, "per-conv")
    n_convs = sum(
        isinstance(m, nn.Conv2d) for s in ("layer1", "layer2", "layer3", "layer4") for m in getattr(model, s).modules()
    )
    assert len(convs) == n_convs and "layer2.0.downsample.0" in [s.name for s in convs]


def test_slices_by_name_and_grouping():
    model = TinyResNet(8)
    specs = make_slices(model, ["layer1.0+layer1.1", "layer2"])
    assert specs[0].modules == ("layer1.0", "layer1.1") and specs[1].modules == ("layer2",)
    container = build_slice_container(model, specs[0])
    x = torch.randn(2, 8, 8, 8)
    model.eval(), container.eval()
    torch.testing.assert_close(run_slice(slice_modules(container, specs[0]), x), model.layer1(x))


@pytest.mark.parametrize(
    "slices, match",
    [
        (["layer1.7"], "unknown module name 'layer1.7'.*did you mean"),
        (["per-blocks"], "unknown module name 'per-blocks'"),
        (["layer1", "layer1.0"], "overlap"),
        (["layer1.0+layer1.0"], "slice 'layer1.0\\+layer1.0' names module 'layer1.0' twice"),
        ([], "empty"),
    ],
)
def test_bad_slice_names(slices, match):
    with pytest.raises(ValueError, match=match):
        make_slices(TinyResNet(8), slices)


def test_presets_need_a_resnet():
    with pytest.raises(ValueError, match="module names"):
        resnet_slices(nn.Sequential(nn.Linear(2, 2)), "per-block")


@pytest.mark.parametrize("fp16", [False, True])
def test_feature_store_disk_shards(tmp_path, fp16):
    torch.manual_seed(0)
    chunks = [(torch.randn(n, 4, 3), torch.randn(n, 5)) for n in (8, 8, 8, 5)]
    one_chunk = chunks[0][0].numel() * (2 if fp16 else 4) + chunks[0][1].numel() * (2 if fp16 else 4)
    store = FeatureStore(tmp_path, memory_budget_bytes=one_chunk + 1, fp16=fp16)
    for x, y in chunks:
        store.add(x, y)
    assert store.num_shards >= 2 and store.memory_bytes <= one_chunk + 1
    assert len(list(tmp_path.glob("shard_*.pt"))) == store.num_shards
    tol = 2e-3 if fp16 else 0.0
    for (x, y, _), (x0, y0) in zip(store.chunks(), chunks, strict=True):
        assert x.dtype == (torch.float16 if fp16 else torch.float32)
        torch.testing.assert_close(x.float(), x0, rtol=tol, atol=tol)
        torch.testing.assert_close(y.float(), y0, rtol=tol, atol=tol)
    # One pass of training batches covers every non-held-out sample exactly once.
    held_out = frozenset({3})
    seen = torch.cat([y for _, y, _ in store.batches(6, torch.Generator().manual_seed(0), exclude=held_out)])
    expected = torch.cat([y for _, y in chunks[:3]])
    assert seen.shape == expected.shape
    key = lambda t: sorted(map(tuple, t.float().round(decimals=2).tolist()))  # noqa: E731
    assert key(seen) == key(expected.half() if fp16 else expected)


def test_feature_store_needs_a_folder_for_a_budget():
    with pytest.raises(ValueError, match="root folder"):
        FeatureStore(None, memory_budget_bytes=10)
