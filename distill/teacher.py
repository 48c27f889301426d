"""The teacher: a torchvision ResNet adapted to the dataset's classes, trained on first use and cached.

Cache: $TNK_CACHE_DIR (default ~/.cache/tnkernels)/teachers/<model>-<data key>.pt, written atomically. The file
records the model name and number of classes, so a checkpoint that belongs to another model is rejected with a
message instead of a wall of state-dict key errors.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

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
# Teacher recipe for the embedded default: reached 0.9861 on the digits test split, using about 240 s of
# single-thread CPU (docs/distill.md). Bump _RECIPE when it changes so stale caches are not reused.
_RECIPE = "v1-adamw-e8-bs64"
DEFAULT_EPOCHS = 8


def cache_dir() -> Path:
    """$TNK_CACHE_DIR, or ~/.cache/tnkernels."""
    return Path(os.environ.get("TNK_CACHE_DIR") or Path.home() / ".cache" / "tnkernels").expanduser()


def build_model(model: str = "resnet34", num_classes: int = 10) -> nn.Module:
    """A randomly initialized torchvision ResNet with a `num_classes`-way head."""
    if model not in MODELS:
        raise ValueError(
            f"--model: unknown model {model!r}; choose one of {', '.join(MODELS)} "
            f"(or a Hugging Face folder with config.json)"
        )
    import torchvision

    return getattr(torchvision.models, model)(weights=None, num_classes=num_classes)


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
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_weights(model: nn.Module, path: str | os.PathLike, *, model_name: str) -> nn.Module:
    """Load a teacher checkpoint (ours, or a bare state dict) into `model`, rejecting one from another model."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(
            f"--weights: {str(path)!r} does not exist; pass a checkpoint written by `tnk compress` "
            f"or a state dict saved with torch.save(model.state_dict(), path)"
        )
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means "not a checkpoint we can read"
        raise ValueError(f"--weights: {str(path)!r} is not a readable torch checkpoint ({exc})") from exc
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
) -> nn.Module:
    """The teacher in eval mode: from `weights` if given, else from the cache, else trained now and cached.

    `datasets` (train, test) may be passed to skip reloading; it must be the full training set of `data`.
    """
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
        return load_weights(net, weights, model_name=model).to(device)
    path = cache_dir() / "teachers" / f"{model}-{_data_key(data, image_size)}-{_RECIPE}-s{seed}.pt"
    if path.is_file():
        try:
            return load_weights(net, path, model_name=model).to(device)
        except ValueError:
            pass  # a stale or foreign file at our cache path: retrain and overwrite it
    t0 = time.perf_counter()
    train_classifier(net, train_ds, epochs=epochs, seed=seed, device=device, progress=progress)
    seconds = time.perf_counter() - t0
    acc = evaluate(net, DataLoader(test_ds, batch_size=256), device=device)
    save_checkpoint(
        net,
        path,
        model_name=model,
        num_classes=n_classes,
        extra={"test_accuracy": acc, "train_seconds": seconds, "recipe": _RECIPE},
    )
    if progress:
        print(f"teacher {model}: test accuracy {acc:.4f}, trained in {seconds:.0f}s, cached at {path}")
    return net.eval()
