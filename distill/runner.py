"""Orchestration of slice-wise distillation: capture, per-slice training (in-process, worker processes, or
torch.distributed ranks), atomic per-slice checkpoints with resume, and assembly of the student.

Modes:
  parallel    every slice learns from the teacher's own slice inputs; slices are independent, so they can train
              in any order, in worker processes, or on different ranks.
  sequential  slices train in model order, each from the inputs produced by the already-trained student slices
              upstream (targets are still the teacher's outputs), so a slice learns to correct upstream error.

Resume: each finished slice is written atomically to <out>/slices/<name>.pt together with a fingerprint of the run
(teacher weights, slices, ratio/budget, training settings, mode, and a digest of the calibration batches). A
restarted run loads finished slices and trains only the others; per-slice seeds depend only on the slice name, so
the result does not depend on which slices were resumed (bit for bit on the same machine and thread count).
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

import tnkernels.convert

from ._atomic import atomic_write_bytes
from .calib import CalibReader, check_calib_loader, training_flags
from .capture import FeatureStore, capture_features, default_forward, remove_empty
from .sequential import run_sequential
from .slices import SliceSpec, build_slice_container, count_params, make_slices, set_submodule, slice_modules
from .train_slice import (
    SliceResult,
    SliceTrainConfig,
    check_fingerprint,
    load_slice_checkpoint,
    save_slice_checkpoint,
    slice_seed,
    tensorize_slice,
    train_slice,
)

__all__ = ["DistillResult", "distill", "run_fingerprint", "tensorized_copy", "MODES"]

MODES = ("parallel", "sequential")


@dataclass
class DistillResult:
    student: nn.Module | None  # None on torch.distributed ranks other than 0
    specs: list[SliceSpec] = field(default_factory=list)
    slices: dict[str, SliceResult] = field(default_factory=dict)
    trained: list[str] = field(default_factory=list)  # slices trained by this call (on this rank)
    resumed: list[str] = field(default_factory=list)  # slices loaded from checkpoints
    timings: dict[str, float] = field(default_factory=dict)  # seconds per phase
    chained: list[str] = field(default_factory=list)  # sequential mode: slices whose inputs came from upstream

    def summary(self) -> dict:
        return {
            "trained": self.trained,
            "resumed": self.resumed,
            "timings": self.timings,
            "chained": self.chained,
            "slices": {k: v.to_dict() for k, v in self.slices.items()},
        }


def run_fingerprint(
    teacher: nn.Module,
    specs: Sequence[SliceSpec],
    *,
    ratio,
    rules,
    config: SliceTrainConfig,
    mode: str,
    fp16: bool,
    run_key: str = "",
) -> str:
    """A digest of everything that determines the trained slices, so a resumed run cannot mix setups."""
    h = hashlib.sha1()
    for k, v in teacher.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    cfg = {k: v for k, v in asdict(config).items() if k not in ("device", "time_budget_s")}
    meta = {
        "specs": [[s.name, list(s.modules)] for s in specs],
        "ratio": ratio,
        "rules": rules,
        "config": cfg,
        "mode": mode,
        "fp16": fp16,
        "run_key": run_key,
    }
    h.update(json.dumps(meta, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def _dist_info(distributed: bool | None) -> tuple[int, int]:
    import torch.distributed as dist

    if distributed is False or not (dist.is_available() and dist.is_initialized()):
        if distributed:
            raise ValueError(
                "distill(distributed=True): torch.distributed is not initialized; launch with torchrun "
                "and call torch.distributed.init_process_group first"
            )
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def _run_device(device, config_device):
    """The run's device from distill(device=...) and config.device, where either may be left at "cpu" (their
    default): before 2026-12-02 config.device alone decided where slices trained, so distill(device="cuda",
    config=SliceTrainConfig(max_steps=...)) captured on the GPU and silently trained every slice on the CPU."""
    a, b = torch.device(device), torch.device(config_device)
    if a == b or b.type == "cpu":
        return device
    if a.type == "cpu":
        return config_device
    if a.type == b.type and (a.index is None or b.index is None):  # "cuda" is the current GPU: the indexed name
        return device if a.index is not None else config_device
    raise ValueError(
        f"distill(device={str(device)!r}) and config.device={str(config_device)!r} differ; give one device (the "
        "teacher must be on it too)"
    )


def _prepare(teacher: nn.Module, spec: SliceSpec, ratio, rules, seed: int) -> tuple[nn.Module, list[dict], bool, int]:
    """(tensorized copy of the slice, tensorize report rows, whether any layer was tensorized, dense params)."""
    container = build_slice_container(teacher, spec)
    params_before = count_params(slice_modules(container, spec))
    # tensorize may use randomized SVD: seed per slice so the start point does not depend on slice order/resume.
    torch.manual_seed(slice_seed(seed, spec.name))
    try:
        layers = tensorize_slice(container, spec, ratio=ratio, rules=rules)
    except ValueError as exc:
        if "cannot be reached" not in str(exc):
            raise
        layers = [{"name": spec.name, "status": f"skipped: {exc}"}]
    any_tensorized = any(r.get("status") == "tensorized" for r in layers)
    return container, layers, any_tensorized, params_before


def _refuse_unreachable(ratio: float, rows: list[dict]) -> None:
    from .ratio_check import conv_limit, refuse_unreachable

    limits = [(r, conv_limit(r["shape"]) if len(r.get("shape") or ()) == 4 else None) for r in rows]
    bad = [
        (r["name"], tuple(r.get("shape") or ()), lim)
        for r, lim in limits
        if "cannot be reached" in str(r.get("status"))
    ]
    convs = [lim for _, lim in limits if lim is not None]
    best = min(convs) if convs and all(b[2] is not None for b in bad) else float("nan")
    refuse_unreachable(ratio, bad, best)


def tensorized_copy(
    teacher: nn.Module, slices, *, ratio: float | None = None, rules: dict | None = None, seed: int = 0
) -> nn.Module:
    """A copy of `teacher` with each slice tensorized exactly as distill() initializes it (same decomposition,
    same per-slice seeds), untrained: the starting point of the global fine-tune baseline."""
    student = copy.deepcopy(teacher)
    for spec in make_slices(teacher, slices):
        container = _prepare(teacher, spec, ratio, rules, seed)[0]
        for name in spec.modules:
            set_submodule(student, name, container.get_submodule(name))
    return student


def _train_prepared(
    spec: SliceSpec, entry: tuple, store: FeatureStore, ratio, rules, config, *, progress: bool, position: int = 1
) -> SliceResult:
    """Train one slice prepared by _prepare (tensorized already) on `store`; the one call site of train_slice."""
    container, layers, _, before = entry
    result = train_slice(
        container,
        spec,
        store,
        ratio=ratio,
        rules=rules,
        config=config,
        progress=progress,
        position=position,
        tensorized=True,
        params_before=before,
    )
    result.layers = layers
    return result


def _train_task(args) -> tuple[str, dict]:
    """Worker entry: train one prepared slice and checkpoint it."""
    entry, spec, store, ratio, rules, config, ckpt, fp, threads = args
    if threads:
        torch.set_num_threads(threads)
    result = _train_prepared(spec, entry, store, ratio, rules, config, progress=False)
    save_slice_checkpoint(ckpt, entry[0], spec, result, fp)
    return spec.name, result.to_dict()


def _result(d: dict) -> SliceResult:
    return SliceResult(**d)


def distill(
    teacher: nn.Module,
    calib_loader: Iterable,
    *,
    slices="per-block",
    ratio: float | None = None,
    rules: dict | None = None,
    mode: str = "parallel",
    workers: int = 1,
    out_dir: str | os.PathLike = "distill_out",
    config: SliceTrainConfig | None = None,
    fp16: bool = False,
    memory_budget_bytes: int | None = None,
    forward_fn: Callable = default_forward,
    device: str = "cpu",
    progress: bool = True,
    distributed: bool | None = None,
    run_key: str = "",
) -> DistillResult:
    """Slice-wise distillation of `teacher` into a tensorized student (the teacher is not modified; it runs in
    eval mode and every module gets its training flag back at the end).

    Args:
        calib_loader: calibration batches, the same batches in the same order on every pass: a list of batches
            or a DataLoader with shuffle=False (a shuffling DataLoader is refused, and so is a pass that differs
            from the first). Sequential mode may read it several times, so a one-shot iterator is refused there
            (with more than one slice). A digest of its batches is part of the run's fingerprint: a rerun in the
            same out_dir with other data is refused, with the same data it resumes.
        slices: a preset ("per-block", "per-conv", "per-stage"), module names ("a+b" groups), or SliceSpecs.
        ratio / rules: global compression ratio, and/or tensorize rules (e.g. from distill.budget.load_budget).
        mode: "parallel" (teacher inputs) or "sequential" (the student's own upstream outputs).
        workers: worker processes for parallel mode (spawned; each uses threads // workers torch threads).
        out_dir: slices are checkpointed to out_dir/slices/<name>.pt; finished ones are reused on restart.
        memory_budget_bytes: spill stored features to out_dir/features/ shards beyond this budget (removed once
            the slices are trained). Training batches keep `config.batch_size` across shards, but which samples
            share a batch differs from an in-memory run, so the student is close to, not bit for bit, the same.
        device: where the teacher already is; every slice trains there and the student comes back there (a
            `config` whose device is left at "cpu" follows it; a contradicting config.device is refused).
        distributed: use torch.distributed ranks (default: when initialized); each rank trains slices
            rank, rank + world, ...; rank 0 gathers the trained slices and assembles the student.
    """
    if mode not in MODES:
        raise ValueError(f"--mode: unknown mode {mode!r}; choose parallel or sequential")
    if int(workers) < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    if mode == "sequential" and workers > 1:
        raise ValueError(
            "--workers: sequential mode trains slices one after another; use --workers 1 (or --mode parallel)"
        )
    if ratio is None and rules is None:
        raise ValueError("distill: give a compression ratio (--ratio) or a budget (--budget FILE)")
    device = _run_device(device, config.device if config is not None else device)
    # One device for the whole run: the teacher pass, the training and the assembled student.
    config = replace(config, device=device) if config is not None else SliceTrainConfig(device=device)
    specs = make_slices(teacher, slices)
    rank, world = _dist_info(distributed)
    if mode == "sequential" and world > 1:
        raise ValueError("sequential mode cannot be split across torch.distributed ranks; use --mode parallel")
    check_calib_loader(calib_loader, mode=mode, n_slices=len(specs))
    with training_flags(teacher):  # the caller's model gets its own training flags back
        return _distill(
            teacher, calib_loader, specs, ratio, rules, mode, workers, Path(out_dir), config, fp16,
            memory_budget_bytes, forward_fn, device, progress, rank, world, run_key,
        )  # fmt: skip


def _distill(
    teacher, calib_loader, specs, ratio, rules, mode, workers, out, config, fp16, budget, forward_fn, device,
    progress, rank, world, run_key,
) -> DistillResult:  # fmt: skip
    ckpt_dir = out / "slices"
    base = run_fingerprint(
        teacher, specs, ratio=ratio, rules=rules, config=config, mode=mode, fp16=fp16, run_key=run_key
    )
    timings: dict[str, float] = {}
    res = DistillResult(student=None, specs=list(specs))
    reader = CalibReader(calib_loader)

    t0 = time.perf_counter()
    done: dict[str, dict] = {}
    for spec in specs:  # the settings are checked now; the calibration data once a pass has read it
        payload = load_slice_checkpoint(ckpt_dir / f"{spec.name}.pt", spec, None)
        if payload is not None:
            check_fingerprint(out, ckpt_dir / f"{spec.name}.pt", payload, base, None)
            done[spec.name] = payload
    mine = [s for i, s in enumerate(specs) if i % world == rank]
    pending = [s for s in mine if s.name not in done]
    prepared: dict[str, tuple[nn.Module, list[dict], bool, int]] = {}
    for spec in pending:
        prepared[spec.name] = _prepare(teacher, spec, ratio, rules, config.seed)
    if ratio is not None and pending and not done and world == 1 and not any(p[2] for p in prepared.values()):
        raise ValueError(f"--ratio {ratio:g} cannot be reached by any layer of the slices; choose a smaller ratio")
    if ratio is not None and rules is None:  # a layer left dense would leave the student short of the ratio
        _refuse_unreachable(ratio, [r for p in prepared.values() for r in p[1]])
    timings["tensorize_s"] = time.perf_counter() - t0

    from tqdm.auto import tqdm

    fp = ""  # the full fingerprint (settings + calibration data), known once the data was read

    def finish(spec: SliceSpec, container: nn.Module, result: SliceResult) -> None:
        save_slice_checkpoint(ckpt_dir / f"{spec.name}.pt", container, spec, result, fp)
        done[spec.name] = load_slice_checkpoint(ckpt_dir / f"{spec.name}.pt", spec, fp)
        res.trained.append(spec.name)

    feat_root = out / "features" if budget is not None else None
    to_train = [s for s in pending if prepared[s.name][2]]
    stores: dict[str, FeatureStore] = {}
    if to_train:  # sequential mode: every slice, finished ones included (they carry the student's inputs on)
        t1 = time.perf_counter()
        stores = capture_features(
            teacher,
            to_train if mode == "parallel" else specs,
            reader.passes("the teacher pass"),
            device=device,
            root=feat_root,
            memory_budget_bytes=budget,
            fp16=fp16,
            forward_fn=forward_fn,
            progress=progress,
            desc="teacher features",
        )
        timings["capture_s"] = time.perf_counter() - t1
    fp = f"{base}-{reader.digest()}"
    for spec in specs:
        if spec.name in done:
            check_fingerprint(out, ckpt_dir / f"{spec.name}.pt", done[spec.name], base, fp)
    for s in pending:  # no layer tensorized (e.g. its ratio is unreachable): kept dense, nothing to train
        if not prepared[s.name][2]:
            container, layers, _, before = prepared[s.name]
            finish(s, container, SliceResult(s.name, before, before, 0.0, 0.0, 0, 0.0, [], layers))

    t1 = time.perf_counter()
    if mode == "parallel" and to_train:
        if workers == 1:
            for spec in tqdm(to_train, desc="slices", disable=not progress, unit="slice"):
                entry = prepared[spec.name]
                r = _train_prepared(spec, entry, stores[spec.name], ratio, rules, config, progress=progress)
                finish(spec, entry[0], r)
                stores[spec.name].clear()  # spilled shards go once the slice is trained
        else:
            _train_in_workers(to_train, prepared, stores, ratio, rules, config, ckpt_dir, fp, workers, progress)
            for spec in to_train:
                done[spec.name] = load_slice_checkpoint(ckpt_dir / f"{spec.name}.pt", spec, fp)
                res.trained.append(spec.name)
                stores[spec.name].clear()
    elif mode == "sequential" and to_train:

        def train(spec: SliceSpec, store: FeatureStore) -> None:
            entry = prepared[spec.name]
            finish(spec, entry[0], _train_prepared(spec, entry, store, ratio, rules, config, progress=progress))

        res.chained = run_sequential(
            teacher, specs, {s.name for s in to_train}, stores, done, reader, train, device=device, fp16=fp16,
            feat_root=feat_root, budget=budget, forward_fn=forward_fn, progress=progress,
        )  # fmt: skip
    if to_train:
        timings["train_s"] = time.perf_counter() - t1
    remove_empty(feat_root)

    t2 = time.perf_counter()
    if world > 1:
        done = _gather(done, [s.name for s in mine], rank, ckpt_dir)
    res.resumed = [s.name for s in mine if s.name in done and s.name not in res.trained]
    if rank == 0:
        student = copy.deepcopy(teacher)
        for spec in specs:
            payload = done[spec.name]
            for name, module in payload["modules"].items():
                # checkpoints are read with map_location="cpu" (a run resumes on any machine): the student is a
                # copy of the teacher, which is on `device`, so its slices go there too (a CUDA student with CPU
                # slices failed at its first forward)
                set_submodule(student, name, module.to(device))
            res.slices[spec.name] = _result(payload["result"])
        # a transformers teacher: the student's save_pretrained would write factors that from_pretrained reloads
        # as random dense layers (tnkernels/convert/hf_save.py); a no-op for other models
        tnkernels.convert.guard_save_pretrained(student)
        res.student = student.eval()
    timings["assemble_s"] = time.perf_counter() - t2
    timings["total_s"] = time.perf_counter() - t0
    res.timings = timings
    return res


def _train_in_workers(to_train, prepared, stores, ratio, rules, config, ckpt_dir, fp, workers, progress) -> None:
    import torch.multiprocessing as mp
    from tqdm.auto import tqdm

    threads = max(1, torch.get_num_threads() // workers)
    # Biggest slices first, so the pool does not end waiting on one large slice.
    order = sorted(to_train, key=lambda s: -sum(p.numel() for p in prepared[s.name][0].parameters()))
    tasks = [
        (prepared[s.name], s, stores[s.name], ratio, rules, config, ckpt_dir / f"{s.name}.pt", fp, threads)
        for s in order
    ]
    pool = mp.get_context("spawn").Pool(processes=min(workers, len(tasks)))
    try:
        for _ in tqdm(
            pool.imap_unordered(_train_task, tasks),
            total=len(tasks),
            desc=f"slices ({workers} workers)",
            disable=not progress,
            unit="slice",
        ):
            pass
        # Let the workers exit normally: the pool's context manager terminates them before their finalizers run,
        # and the semaphore each one's tqdm lock holds was then reported leaked by Python at exit.
        pool.close()
        pool.join()
    finally:
        pool.terminate()


def _gather(done: dict[str, dict], mine: list[str], rank: int, ckpt_dir: Path) -> dict[str, dict]:
    """Rank 0 receives every rank's finished slices (as serialized checkpoints) and writes the missing files."""
    import torch.distributed as dist

    blobs = {}
    for name in mine:
        buf = io.BytesIO()
        torch.save(done[name], buf)
        blobs[name] = buf.getvalue()
    gathered: list | None = [None] * dist.get_world_size() if rank == 0 else None
    dist.gather_object(blobs, gathered, dst=0)
    if rank == 0:
        for part in gathered:
            for name, blob in part.items():
                payload = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=False)
                done[name] = payload
                path = ckpt_dir / f"{name}.pt"
                if not path.is_file():  # ranks on other nodes may not share out_dir
                    path.parent.mkdir(parents=True, exist_ok=True)
                    atomic_write_bytes(path, lambda f, blob=blob: f.write(blob))
    dist.barrier()
    return done
