"""The teacher cache keys the epochs, `tnk eval` says "(cached)" only on a hit, a ratio some sliced layer cannot
reach is refused, and the reported ratio counts every sliced layer."""

from __future__ import annotations

import copy

import pytest
import torch

import tnkernels
from distill.data import load_digits
from distill.ratio_check import sliced_weight_counts
from distill.runner import distill
from distill.slices import make_slices
from distill.teacher import _recipe, get_teacher, save_checkpoint, train_classifier
from distill.train_slice import SliceTrainConfig
from tests.distill.tiny import TinyResNet, calib_loader
from tnkernels.cli import main


def test_teacher_cache_key_names_the_epochs(tmp_path, monkeypatch):
    monkeypatch.setenv("TNK_CACHE_DIR", str(tmp_path))
    train, test = load_digits(image_size=8)
    small = (torch.utils.data.Subset(train, list(range(64))), test)  # one step per epoch
    kw = dict(data="digits", image_size=8, progress=False, datasets=small)
    info: dict = {}
    get_teacher("resnet18", epochs=1, info=info, **kw)
    assert info["source"] == "trained" and "-e1-" in info["path"]
    get_teacher("resnet18", epochs=2, info=info, **kw)  # another recipe: trained, not the 1-epoch file
    assert info["source"] == "trained" and "-e2-" in info["path"]
    get_teacher("resnet18", epochs=1, info=info, **kw)
    assert info["source"] == "cache"
    # a file written before the epochs were in the key: a 1-epoch teacher under the default (e8) name
    e8 = tmp_path / "teachers" / f"resnet18-digits8-{_recipe(8)}-s0.pt"
    net = torchvision_r18()
    train_classifier(net, small[0], epochs=3, progress=False)
    save_checkpoint(net, e8, model_name="resnet18", num_classes=10, extra={"recipe": _recipe(8)})
    get_teacher("resnet18", epochs=8, info=info, **kw)
    assert info["source"] == "trained"  # not reused as an 8-epoch teacher ...
    moved = tmp_path / "teachers" / f"resnet18-digits8-{_recipe(3)}-s0.pt"
    assert moved.is_file()  # ... but kept under the name of what it is
    assert torch.load(e8, weights_only=True)["epochs"] == 8


def torchvision_r18():
    from distill.teacher import build_model

    return build_model("resnet18", 10)


def test_eval_says_cached_only_on_a_hit(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TNK_CACHE_DIR", str(tmp_path))
    argv = ["eval", "--model", "resnet18", "--image-size", "8", "--teacher-epochs", "1", "--no-progress"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert "(trained now and cached)" in first and "(cached)" not in first, first
    assert main(argv) == 0
    assert "teacher resnet18 (cached)" in capsys.readouterr().out


def test_a_ratio_some_sliced_layer_cannot_reach_is_refused(tmp_path):
    torch.manual_seed(0)
    teacher = TinyResNet(8).eval()  # the 1x1 downsample convs reach 5.1x (16x8) and 10.7x (32x16)
    cfg = SliceTrainConfig(max_steps=2, eval_every=1, batch_size=16)
    with pytest.raises(ValueError, match=r"--ratio 8 cannot be reached by 1 sliced layer\(s\): layer2.0.downsample.0"):
        distill(teacher, calib_loader(n=32, batch_size=16), ratio=8.0, out_dir=tmp_path, config=cfg, progress=False)
    assert not (tmp_path / "slices").exists()  # refused before any slice was trained


def test_sliced_weight_counts_count_dense_layers_at_one():
    teacher = TinyResNet(8).eval()
    specs = make_slices(teacher, ["layer1", "layer2"])
    student = copy.deepcopy(teacher)
    tnkernels.tensorize(student, ratio=2.0, rules={"layer1.*": {}})  # layer2 stays dense
    before, after, dense = sliced_weight_counts(teacher, student, specs)
    layer2 = sum(m.weight.numel() for m in teacher.layer2.modules() if isinstance(m, torch.nn.Conv2d))
    layer1 = sum(m.weight.numel() for m in teacher.layer1.modules() if isinstance(m, torch.nn.Conv2d))
    assert before == layer1 + layer2 and dense == 3
    assert layer2 < after <= layer2 + layer1 / 2
