"""Peak memory of loading a compressed GPT-2 checkpoint: into a dense skeleton against a meta-device one.

    python bench/load_memory.py                       # GPT-2 XL shapes (48 x 1600), ratio 4
    python bench/load_memory.py --layers 4 --ratio 4  # a quick run

A dense skeleton (`GPT2Model(config)`) allocates and randomly initialises every weight that `load_compressed` is
about to replace; one built under `torch.device("meta")` allocates nothing, and the checkpoint's tensors are
assigned into it. Each load runs in a fresh process, so its peak RSS (`ru_maxrss`) is its own.

The checkpoint is made without decomposing: every `Conv1D` of the blocks becomes a low-rank `MPOLinear` at the
ratio with random cores (memory does not depend on the values). Both loads are checked to give the same hidden
states. The result goes to bench/results/load_memory_<date>.md (and .json).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from distill._atomic import atomic_write_text
from tnkernels.plan.calibrate import cpu_model

RESULTS = Path(__file__).resolve().parent / "results"


def _config(layers: int, hidden: int = 1600, vocab: int = 50257):
    from transformers import GPT2Config

    heads = 25 if hidden % 25 == 0 else 1
    return GPT2Config(n_layer=layers, n_embd=hidden, n_head=heads, n_positions=1024, vocab_size=vocab)


def make(out: Path, config, ratio: float) -> None:
    """Write the compressed checkpoint, building only the small tensors (the skeleton is on the meta device)."""
    from transformers import GPT2Model

    import tnkernels as tk

    with torch.device("meta"):
        model = GPT2Model(config)
    for name, module in list(model.named_modules()):
        if type(module).__name__ == "Conv1D":
            n_in, n_out = module.weight.shape  # Conv1D stores [in, out]
            bond = max(1, int(n_in * n_out / (ratio * (n_in + n_out))))
            layer = tk.MPOLinear(n_in, n_out, in_modes=(n_in, 1), out_modes=(1, n_out), bonds=(bond,), device="meta")
            owner, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner), attr, layer)
    model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        for module in model.modules():  # LayerNorms at identity, as a trained model's are near
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()
    tk.save_compressed(model, out)


def load(out: Path, config, skeleton: str) -> dict:
    """Load the checkpoint into a fresh skeleton; peak RSS, seconds, and a checksum of the hidden states."""
    from transformers import GPT2Model

    import tnkernels as tk

    start = time.perf_counter()
    if skeleton == "meta":
        with torch.device("meta"):
            model = GPT2Model(config)
    else:
        model = GPT2Model(config)
    built = time.perf_counter()
    tk.load_compressed(model, out)
    loaded = time.perf_counter()
    with torch.no_grad():
        hidden = model.eval()(torch.arange(16)[None]).last_hidden_state
    return {
        "skeleton": skeleton,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,  # Linux reports KiB
        "build_s": built - start,
        "load_s": loaded - built,
        "hidden_sum": float(hidden.double().sum()),
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=48, help="transformer blocks (GPT-2 XL: 48)")
    parser.add_argument("--ratio", type=float, default=4.0, help="compression of every block Conv1D")
    parser.add_argument("--hidden", type=int, default=1600, help="hidden size (GPT-2 XL: 1600; MLP 4x)")
    parser.add_argument("--vocab", type=int, default=50257, help="vocabulary size")
    parser.add_argument("--out", type=Path, default=None, help="result file stem (default: bench/results/...)")
    parser.add_argument("--worker", choices=["make", "dense", "meta"], help=argparse.SUPPRESS)
    parser.add_argument("--ckpt", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for flag in ("layers", "hidden", "vocab"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    if not args.ratio > 0:
        parser.error(f"--ratio must be positive, got {args.ratio}")
    config = _config(args.layers, args.hidden, args.vocab)
    if args.worker == "make":
        return make(args.ckpt, config, args.ratio)
    if args.worker:
        return print(json.dumps(load(args.ckpt, config, args.worker)))

    def worker(kind: str, ckpt: Path) -> str:
        cmd = [sys.executable, __file__, "--worker", kind, "--ckpt", str(ckpt), "--layers", str(args.layers)]
        cmd += ["--ratio", str(args.ratio), "--hidden", str(args.hidden), "--vocab", str(args.vocab)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:  # the worker's own error, not just "returned non-zero exit status 1"
            sys.exit(f"load_memory: the {kind} worker failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
        return done.stdout

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "ckpt"
        print(f"writing the checkpoint ({args.layers} blocks, ratio {args.ratio}) ...", flush=True)
        worker("make", ckpt)
        size = sum(f.stat().st_size for f in ckpt.iterdir()) / 2**30
        rows = []
        for kind in ("meta", "dense"):
            print(f"loading into a {kind} skeleton ...", flush=True)
            rows.append(json.loads(worker(kind, ckpt).strip().splitlines()[-1]))
    same = rows[0]["hidden_sum"] == rows[1]["hidden_sum"]
    date = datetime.date.today().isoformat()
    lines = [
        f"# load_compressed peak memory, GPT-2 shapes (hidden {args.hidden}, {args.layers} blocks, vocabulary "
        f"{args.vocab}), ratio {args.ratio} ({date})",
        "",
        f"`python bench/load_memory.py --layers {args.layers} --ratio {args.ratio} --hidden {args.hidden} --vocab "
        f"{args.vocab}`; {cpu_model()}, "
        f"{os.cpu_count()} cores, torch {torch.__version__}. Checkpoint {size:.2f} GiB; "
        f"{rows[0]['parameters']:,} parameters after the load. Same hidden states from both loads: {same}.",
        "",
        "| skeleton | peak RSS (GiB) | build skeleton (s) | load_compressed (s) |",
        "|---|---|---|---|",
        *[f"| {r['skeleton']} | {r['peak_rss_gib']:.2f} | {r['build_s']:.1f} | {r['load_s']:.1f} |" for r in rows],
    ]
    stem = args.out or RESULTS / f"load_memory_{date}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(f"{stem}.md", "\n".join(lines) + "\n")
    atomic_write_text(f"{stem}.json", json.dumps({"args": vars(args) | {"out": str(stem)}, "rows": rows}, indent=2))
    print("\n".join(lines))
    if not same:
        sys.exit("the two loads gave different hidden states")


if __name__ == "__main__":
    main()
