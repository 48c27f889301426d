"""Datasets for distillation: the embedded default (scikit-learn digits) and user data (ImageFolder / CIFAR-10).

The embedded default needs no download: scikit-learn ships the 1,797 8x8 digit images. They are upsampled to
`image_size` (bilinear), repeated to 3 channels so a torchvision ResNet takes them unchanged, and standardized.
The train/test split is fixed (stratified, random_state=0, 20% test) and does not depend on `seed`, so every run
and every ratio is scored on the same held-out images; `seed` only picks the calibration subset.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch.utils.data import Dataset, Subset, TensorDataset

__all__ = ["load_digits", "load_data", "calibration_subset", "num_classes_of", "DIGITS"]

DIGITS = "digits"
_TEST_FRACTION = 0.2
_SPLIT_STATE = 0  # fixed: the held-out split must not move between runs


def _check_fraction(calib_fraction: float) -> None:
    if not (0.0 < float(calib_fraction) <= 1.0):
        raise ValueError(f"calib_fraction must be in (0, 1], got {calib_fraction}; e.g. 0.1 keeps 10% of the images")


def calibration_subset(ds: Dataset, calib_fraction: float, seed: int = 0) -> Dataset:
    """A class-stratified random subset holding `calib_fraction` of `ds` (the whole dataset for 1.0)."""
    _check_fraction(calib_fraction)
    if calib_fraction >= 1.0:
        return ds
    from sklearn.model_selection import train_test_split

    labels = _labels_of(ds)
    idx = list(range(len(ds)))
    n_keep = max(int(round(calib_fraction * len(ds))), 1)
    n_classes = len(set(labels))
    stratify = labels if n_keep >= n_classes and len(ds) - n_keep >= n_classes else None
    keep, _ = train_test_split(idx, train_size=n_keep, random_state=seed, stratify=stratify)
    return Subset(ds, sorted(keep))


def _labels_of(ds: Dataset) -> list[int]:
    if isinstance(ds, TensorDataset):
        return ds.tensors[1].tolist()
    if isinstance(ds, Subset):
        parent = _labels_of(ds.dataset)
        return [parent[i] for i in ds.indices]
    for attr in ("targets", "labels"):
        if hasattr(ds, attr):
            return list(getattr(ds, attr))
    return [int(ds[i][1]) for i in range(len(ds))]


def num_classes_of(ds: Dataset) -> int:
    """Number of classes in a labelled dataset (max label + 1)."""
    return int(max(_labels_of(ds))) + 1


def load_digits(image_size: int = 32, calib_fraction: float = 1.0, seed: int = 0) -> tuple[Dataset, Dataset]:
    """scikit-learn's digits as 3x`image_size`x`image_size` float images: (train_ds, test_ds).

    train_ds holds `calib_fraction` of the 1,437 training images (stratified, chosen by `seed`); test_ds is always
    the same 360 held-out images. Items are (image[3, H, W] float32, label int64).
    """
    if int(image_size) < 8:
        raise ValueError(f"image_size must be >= 8 (the digits are 8x8), got {image_size}")
    _check_fraction(calib_fraction)
    import numpy as np
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    bunch = sk_load_digits()
    images = torch.from_numpy(np.asarray(bunch.images, dtype=np.float32)) / 16.0  # [N, 8, 8] in [0, 1]
    labels = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))
    x = torch.nn.functional.interpolate(
        images[:, None], size=(image_size, image_size), mode="bilinear", align_corners=False
    )
    # Standardize with statistics of the whole training split (fixed), then repeat to 3 channels.
    idx = np.arange(len(labels))
    train_idx, test_idx = train_test_split(
        idx, test_size=_TEST_FRACTION, random_state=_SPLIT_STATE, stratify=labels.numpy()
    )
    train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
    mean, std = x[train_idx].mean(), x[train_idx].std()
    x = ((x - mean) / std).expand(-1, 3, -1, -1).contiguous()
    train = TensorDataset(x[train_idx], labels[train_idx])
    test = TensorDataset(x[test_idx], labels[test_idx])
    return calibration_subset(train, calib_fraction, seed), test


def _is_cifar10_dir(path: Path) -> Path | None:
    """The folder torchvision's CIFAR10(root=...) expects (it holds cifar-10-batches-py), or None."""
    for root in (path, path.parent):
        if (root / "cifar-10-batches-py" / "data_batch_1").is_file():
            return root
    return None


def _find_split(path: Path, names: tuple[str, ...]) -> Path | None:
    for n in names:
        if (path / n).is_dir():
            return path / n
    return None


def load_data(
    data: str | os.PathLike | None = DIGITS,
    *,
    image_size: int = 32,
    calib_fraction: float = 1.0,
    seed: int = 0,
) -> tuple[Dataset, Dataset]:
    """(train_ds, test_ds) for `data`: "digits" (default, embedded), a local CIFAR-10 folder (the one holding
    cifar-10-batches-py, as torchvision downloads it), or an ImageFolder root with train/ and test/ (or val/)
    subfolders of one folder per class. Images are resized to `image_size` and normalized with ImageNet stats."""
    if data is None or str(data) == DIGITS:
        return load_digits(image_size=image_size, calib_fraction=calib_fraction, seed=seed)
    _check_fraction(calib_fraction)
    path = Path(data).expanduser()
    if not path.exists():
        raise ValueError(
            f"--data: {str(path)!r} does not exist; pass 'digits' for the embedded dataset, a CIFAR-10 folder "
            f"(containing cifar-10-batches-py) or an ImageFolder root with train/ and test/ subfolders"
        )
    if not path.is_dir():
        raise ValueError(f"--data: {str(path)!r} is a file; it must be a folder (CIFAR-10 or ImageFolder root)")
    from torchvision import datasets, transforms

    tf = transforms.Compose(
        [
            transforms.Resize((image_size, image_size)),
            transforms.ToTensor(),
            transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ]
    )
    cifar_root = _is_cifar10_dir(path)
    if cifar_root is not None:
        train = datasets.CIFAR10(str(cifar_root), train=True, download=False, transform=tf)
        test = datasets.CIFAR10(str(cifar_root), train=False, download=False, transform=tf)
        return calibration_subset(train, calib_fraction, seed), test
    train_dir = _find_split(path, ("train",))
    test_dir = _find_split(path, ("test", "val", "validation"))
    if train_dir is None or test_dir is None:
        raise ValueError(
            f"--data: {str(path)!r} is neither a CIFAR-10 folder (no cifar-10-batches-py/data_batch_1) nor an "
            f"ImageFolder root (needs train/ and test/ or val/ subfolders, each with one folder per class)"
        )
    train = datasets.ImageFolder(str(train_dir), transform=tf)
    test = datasets.ImageFolder(str(test_dir), transform=tf)
    if train.classes != test.classes:
        raise ValueError(
            f"--data: class folders differ between {train_dir} and {test_dir}: {train.classes} vs {test.classes}"
        )
    return calibration_subset(train, calib_fraction, seed), test
