"""Datasets and the teacher: split, calibration subsets, user data folders, checkpoints and their errors."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from distill.data import calibration_subset, load_data, load_digits, num_classes_of
from distill.teacher import build_model, evaluate, get_teacher, load_weights, save_checkpoint
from tests.distill.tiny import TinyResNet


def test_digits_split_is_fixed_and_calibration_is_a_stratified_subset():
    train, test = load_digits(image_size=12)
    x, y = train[0]
    assert x.shape == (3, 12, 12) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert len(train) + len(test) == 1797 and len(test) == 360
    _, test2 = load_digits(image_size=12, calib_fraction=0.1, seed=5)
    assert torch.equal(test.tensors[0], test2.tensors[0])  # the held-out split does not move
    small, _ = load_digits(image_size=12, calib_fraction=0.1, seed=5)
    assert abs(len(small) - 144) <= 1 and num_classes_of(small) == 10
    labels = torch.tensor([int(small[i][1]) for i in range(len(small))])
    assert torch.bincount(labels, minlength=10).min() >= 12  # stratified: every class present
    other, _ = load_digits(image_size=12, calib_fraction=0.1, seed=6)
    assert other.indices != small.indices


@pytest.mark.parametrize("fraction", [0.0, 1.5, -1])
def test_bad_calib_fraction(fraction):
    with pytest.raises(ValueError, match="calib_fraction"):
        load_digits(calib_fraction=fraction)


def test_missing_or_wrong_data_path(tmp_path):
    with pytest.raises(ValueError, match="--data: .*does not exist"):
        load_data(tmp_path / "nope")
    (tmp_path / "junk").mkdir()
    with pytest.raises(ValueError, match="neither a CIFAR-10 folder"):
        load_data(tmp_path / "junk")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        load_data(tmp_path / "file.txt")


def test_image_folder(tmp_path):
    from PIL import Image

    for split, n in (("train", 3), ("val", 2)):
        for cls in ("cat", "dog"):
            d = tmp_path / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (20, 14), color=(40 * i, 100, 200 if cls == "cat" else 0)).save(d / f"{i}.png")
    train, test = load_data(tmp_path, image_size=16)
    assert len(train) == 6 and len(test) == 4 and train[0][0].shape == (3, 16, 16)
    assert num_classes_of(train) == 2
    assert len(calibration_subset(train, 0.5, seed=0)) == 3


def test_weights_from_another_model_are_refused(tmp_path):
    r18 = build_model("resnet18", 10)
    save_checkpoint(r18, tmp_path / "r18.pt", model_name="resnet18", num_classes=10)
    with pytest.raises(ValueError, match="holds a 'resnet18' checkpoint but --model is 'resnet34'"):
        load_weights(build_model("resnet34", 10), tmp_path / "r18.pt", model_name="resnet34")
    torch.save(build_model("resnet18", 7).state_dict(), tmp_path / "bare7.pt")  # bare state dict, 7 classes
    with pytest.raises(ValueError, match="belongs to another model.*shape mismatches"):
        load_weights(build_model("resnet18", 10), tmp_path / "bare7.pt", model_name="resnet18")
    with pytest.raises(ValueError, match="does not exist"):
        load_weights(r18, tmp_path / "missing.pt", model_name="resnet18")
    (tmp_path / "text.pt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="not a readable torch checkpoint"):
        load_weights(r18, tmp_path / "text.pt", model_name="resnet18")
    loaded = load_weights(build_model("resnet18", 10), tmp_path / "r18.pt", model_name="resnet18")
    for k, v in r18.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)
    with pytest.raises(ValueError, match="unknown model 'vgg'"):
        build_model("vgg")


def test_teacher_is_trained_once_then_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("TNK_CACHE_DIR", str(tmp_path))
    train, test = load_digits(image_size=8)
    small = (torch.utils.data.Subset(train, list(range(64))), test)
    calls = []
    import distill.teacher as teacher_mod

    real = teacher_mod.train_classifier

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(teacher_mod, "train_classifier", counting)
    t1 = get_teacher("resnet18", data="digits", image_size=8, epochs=1, progress=False, datasets=small)
    files = list((tmp_path / "teachers").glob("*.pt"))
    assert len(files) == 1 and not list((tmp_path / "teachers").glob(".*tmp"))
    t2 = get_teacher("resnet18", data="digits", image_size=8, epochs=1, progress=False, datasets=small)
    assert len(calls) == 1
    for k, v in t1.state_dict().items():
        assert torch.equal(t2.state_dict()[k], v)


def test_the_same_seed_trains_the_same_teacher_whatever_the_global_rng(tmp_path, monkeypatch):
    # The initial weights must come from the seed, not from what other code drew from the global RNG before
    # (a planner calibration on first use, for example).
    train, test = load_digits(image_size=8)
    small = (torch.utils.data.Subset(train, list(range(64))), test)
    teachers = []
    for k, cache in enumerate(("a", "b")):
        monkeypatch.setenv("TNK_CACHE_DIR", str(tmp_path / cache))
        torch.manual_seed(100 + k)  # a different global RNG state before each call
        teachers.append(get_teacher("resnet18", data="digits", image_size=8, epochs=1, progress=False, datasets=small))
    a, b = (t.state_dict() for t in teachers)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_evaluate_counts_correct_predictions():
    class Fixed(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.one_hot(x[:, 0, 0, 0].long(), 3).float()

    x = torch.zeros(6, 3, 2, 2)
    x[:, 0, 0, 0] = torch.tensor([0, 1, 2, 0, 1, 2])
    y = torch.tensor([0, 1, 2, 2, 2, 2])
    assert evaluate(Fixed(), DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)) == pytest.approx(4 / 6)
    assert isinstance(TinyResNet(8), torch.nn.Module)
