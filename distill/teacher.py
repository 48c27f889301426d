"""The teacher: a torchvision ResNet adapted to the dataset's classes, trained on first use and cached.

Cache: $TNK_CACHE_DIR (default ~/.cache/tnkernels)/teachers/<model>-<data key>-<recipe>-s<seed>.pt, written
atomically; the recipe names the epochs (``v1-adamw-e8-bs64`` for the default 8). The file records the model name,
the number of classes and the epochs, so a checkpoint that belongs to another model is rejected with a message
instead of a wall of state-dict key errors, and one trained for other epochs is never reused.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ._atomic import atomic_save
from .data import DIGITS, load_data, num_classes_of

__all__ = [
    "MODELS",
    "build_model",
    "cache_dir",
    "evaluate",
    "get_teacher",
    "load_weights",
    "save_checkpoint",
    "train_classifier",
]

MODELS = ("resnet18", "resnet34")
# Teacher recipe for the embedded default: reached 0.9889 on the digits test split in 36 s on 2 idle cores
# (docs/distill.md). Bump the version when the recipe changes so stale caches are not reused.
DEFAULT_EPOCHS = 8
_BATCH = 64


def _recipe(epochs: int) -> str:
    """The cache-key part naming the training recipe, epochs included (e8: the default)."""
    return f"v1-adamw-e{epochs}-bs{_BATCH}"


_RECIPE = _recipe(DEFAULT_EPOCHS)


def cache_dir() -> Path:
    """$TNK_CACHE_DIR, or ~/.cache/tnkernels."""
    return Path(os.environ.get("TNK_CACHE_DIR") or Path.home() / ".cache" / "tnkernels").expanduser()


def build_model(model: str = "resnet34", num_classes: int = 10) -> nn.Module:
    """A randomly initialized torchvision ResNet with a `num_classes`-way head."""
    if model not in MODELS:
        raise ValueError(unknown_model_message(model, hf=True))
    import torchvision

    return getattr(torchvision.models, model)(weights=None, num_classes=num_classes)


def unknown_model_message(model: str, *, hf: bool) -> str:
    """Why `--model MODEL` is not a model name we know: a path that does not exist, a folder without
    config.json, a file, or a name that is none of ours."""
    names = ", ".join(MODELS)
    others = " or a Hugging Face model folder (config.json, the weights, the tokenizer)" if hf else ""
    path = Path(model).expanduser()
    if path.is_dir():
        return f"--model {model}: the folder has no config.json; pass {names}{others}"
    if path.exists():
        return f"--model {model} is a file; pass {names}{others} (a teacher checkpoint goes to --weights FILE)"
    if os.sep in model or model.startswith((".", "~")):
        return f"--model {model}: no such file or folder; pass {names}{others}"
    return f"--model: unknown model {model!r}; choose one of {names}{others}"


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: str = "cpu") -> float:
    """Top-1 accuracy of `model` on `loader` (eval mode; the model's previous mode is restored)."""
    was_training = model.training
    model.eval()
    correct = total = 0
    for x, y in loader:
        pred = model(x.to(device)).argmax(dim=-1)
        correct += int((pred.cpu() == y).sum())
        total += len(y)
    model.train(was_training)
    if total == 0:
        raise ValueError("evaluate: the loader is empty")
    return correct / total


def train_classifier(
    model: nn.Module,
    train_ds: Dataset,
    *,
    epochs: int = DEFAULT_EPOCHS,
    lr: float = 2e-3,
    batch_size: int = 64,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
) -> nn.Module:
    """Train `model` with cross-entropy, AdamW and a cosine schedule; small random shifts as augmentation."""
    from tqdm.auto import tqdm

    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    loader = DataLoader(
        train_ds, batch_size=batch_size, shuffle=True, generator=g, drop_last=len(train_ds) > batch_size
    )
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * len(loader), pct_start=0.15)
    bar = tqdm(total=epochs * len(loader), desc="teacher", disable=not progress, unit="step")
    for _ in range(epochs):
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            # Random shifts of up to 2 pixels: cheap augmentation that helps the small dataset generalize.
            dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=g))
            x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    return model.eval()


def save_checkpoint(
    model: nn.Module, path: str | os.PathLike, *, model_name: str, num_classes: int, extra: dict | None = None
) -> None:
    """Write {model, num_classes, state_dict, ...} to `path` atomically (tmp file in the same folder + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": "tnkernels-teacher/1",
        "model": model_name,
        "num_classes": num_classes,
        "state_dict": model.state_dict(),
        **(extra or {}),
    }
    atomic_save(payload, path)


def load_weights(model: nn.Module, path: str | os.PathLike, *, model_name: str) -> nn.Module:
    """Load a teacher checkpoint (ours, or a bare state dict) into `model`, rejecting one from another model."""
    path = Path(path).expanduser()
    return _load_state(model, _read_checkpoint(path), path, model_name=model_name)


def _read_checkpoint(path: Path):
    """The payload of a teacher checkpoint file (ValueError when missing or unreadable)."""
    if not path.is_file():
        raise ValueError(
            f"--weights: {str(path)!r} does not exist; pass a checkpoint written by `tnk compress` "
            f"or a state dict saved with torch.save(model.state_dict(), path)"
        )
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means "not a checkpoint we can read"
        raise ValueError(f"--weights: {str(path)!r} is not a readable torch checkpoint ({exc})") from exc
    return payload


def _load_state(model: nn.Module, payload, path: Path, *, model_name: str) -> nn.Module:
    """Load the checkpoint `payload` (read from `path`) into `model`, rejecting one from another model."""
    if isinstance(payload, dict) and "state_dict" in payload:
        saved = payload.get("model")
        if saved is not None and saved != model_name:
            raise ValueError(
                f"--weights: {str(path)!r} holds a {saved!r} checkpoint but --model is {model_name!r}; "
                f"pass --model {saved} or a {model_name} checkpoint"
            )
        state = payload["state_dict"]
    elif isinstance(payload, dict):
        state = payload
    else:
        raise ValueError(f"--weights: {str(path)!r} holds a {type(payload).__name__}, not a state dict")
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [
        f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or wrong:
        detail = "; ".join(
            filter(
                None,
                [
                    f"missing {len(missing)} keys (e.g. {missing[:3]})" if missing else "",
                    f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})" if unexpected else "",
                    f"{len(wrong)} shape mismatches (e.g. {wrong[:3]})" if wrong else "",
                ],
            )
        )
        raise ValueError(
            f"--weights: {str(path)!r} belongs to another model than {model_name} with "
            f"{num_classes_from(model)} classes: {detail}"
        )
    model.load_state_dict(state)
    return model.eval()


def num_classes_from(model: nn.Module) -> int | str:
    fc = getattr(model, "fc", None)
    return getattr(fc, "out_features", "?")


def _data_key(data: str | os.PathLike | None, image_size: int) -> str:
    if data is None or str(data) == DIGITS:
        return f"digits{image_size}"
    h = hashlib.sha1(str(Path(data).expanduser().resolve()).encode()).hexdigest()[:10]
    return f"{Path(data).name or 'data'}-{h}-{image_size}"


def get_teacher(
    model: str = "resnet34",
    weights: str | os.PathLike | None = None,
    data: str | os.PathLike | None = DIGITS,
    device: str = "cpu",
    *,
    image_size: int = 32,
    epochs: int = DEFAULT_EPOCHS,
    seed: int = 0,
    progress: bool = True,
    datasets: tuple[Dataset, Dataset] | None = None,
    info: dict | None = None,
) -> nn.Module:
    """The teacher in eval mode: from `weights` if given, else from the cache, else trained now and cached.

    `datasets` (train, test) may be passed to skip reloading; it must be the full training set of `data`.
    `info`, a dict, is filled with ``source`` ("weights", "cache" or "trained") and ``path`` (the cache file).
    """
    info = {} if info is None else info
    if datasets is None:
        datasets = load_data(data, image_size=image_size)
    train_ds, test_ds = datasets
    n_classes = num_classes_of(train_ds)
    # The initial weights come from `seed` alone, not from whatever the caller's code drew from the global RNG
    # before (a planner calibration on first use, say), so the same command trains the same teacher. (Building
    # under fork_rng keeps a cached teacher from moving the caller's RNG; training reseeds it anyway.)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = build_model(model, n_classes)
    if weights is not None:
        info.update(source="weights", path=str(weights))
        return load_weights(net, weights, model_name=model).to(device)
    key = f"{model}-{_data_key(data, image_size)}"
    path = cache_dir() / "teachers" / f"{key}-{_recipe(epochs)}-s{seed}.pt"
    info.update(source="trained", path=str(path))
    if path.is_file():
        try:
            payload = _read_checkpoint(path)
            loaded = _load_state(net, payload, path, model_name=model)
        except ValueError:
            loaded = None  # a stale or foreign file at our cache path: retrain and overwrite it
        if loaded is not None:
            trained_for = _cached_epochs(payload, loaded, len(train_ds))
            if trained_for == epochs:
                info["source"] = "cache"
                return loaded.to(device)
            _file_under_true_epochs(path, trained_for, key, seed)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                net = build_model(model, n_classes)
    t0 = time.perf_counter()
    train_classifier(net, train_ds, epochs=epochs, seed=seed, device=device, progress=progress)
    seconds = time.perf_counter() - t0
    acc = evaluate(net, DataLoader(test_ds, batch_size=256), device=device)
    save_checkpoint(
        net,
        path,
        model_name=model,
        num_classes=n_classes,
        extra={"test_accuracy": acc, "train_seconds": seconds, "recipe": _recipe(epochs), "epochs": epochs},
    )
    if progress:
        print(f"teacher {model}: test accuracy {acc:.4f}, trained in {seconds:.0f}s, cached at {path}")
    return net.eval()


def _cached_epochs(payload, net: nn.Module, n_train: int) -> int | None:
    """The epochs a cached teacher was trained for: recorded in files written since 2026-12-02; for older ones
    (whose name said e8 whatever --teacher-epochs was) read from the BatchNorm step counter, which counts every
    training step (None when it does not divide into whole epochs). `payload`: the file's content."""
    if isinstance(payload, dict) and isinstance(payload.get("epochs"), int):
        return payload["epochs"]
    steps = next((int(m.num_batches_tracked) for m in net.modules() if isinstance(m, nn.BatchNorm2d)), None)
    per_epoch = n_train // _BATCH if n_train > _BATCH else 1  # train_classifier drops the last partial batch
    if steps is None or per_epoch == 0 or steps % per_epoch:
        return None
    return steps // per_epoch


def _file_under_true_epochs(path: Path, epochs: int | None, key: str, seed: int) -> None:
    """Move a cached teacher found under another recipe's name to the name of the epochs it was trained for
    (kept if that name is free), so the requested recipe is trained anew and the old file keeps its meaning."""
    if epochs is None:
        return
    true_path = path.with_name(f"{key}-{_recipe(epochs)}-s{seed}.pt")
    if true_path != path and not true_path.exists():
        os.replace(path, true_path)
