"""Generator of the golden checkpoints in tests/data/checkpoints/ (read by tests/test_golden_checkpoints.py).

The fixtures freeze the on-disk formats users' files are in: save_compressed's directory (spec.json,
model.safetensors, buffers.safetensors) and whole models pickled with torch.save. They are made once and committed;
a later tnkernels must load them as they are. NEVER regenerate a committed fixture to make a test pass: a failing
golden test means today's code no longer reads what users already have. Add a new fixture (a new name) instead,
registered in tests/test_golden_checkpoints.py (DIGESTS, and SAVED or PICKLED); docs/ARCHITECTURE.md, "Compressed
checkpoints: compatibility policy", says when the format version changes.

Each fixture is a folder holding what the format writes plus two files of ours:
    io.safetensors   "input" (the fixed input) and "expected" (the saved model's output on it, computed in
                     float64 from the saved values)
    manifest.json    what made it: tnkernels version and git commit, torch, safetensors, transformers, date

Fixtures (the builders below also give the tests their skeletons):
    mlp                 MPOLinear with 1, 2, 3 and 4 cores and the low-rank split (in, 1) x (1, out), with and
                        without bias; a layer shared under two names (spec "aliases"); a layer left dense; a
                        persistent and a non-persistent buffer (buffers.safetensors)
    conv                TuckerConv2d: reflect / circular padding modes, stride, dilation, asymmetric kernel, 'same'
                        with an even kernel, 'valid', 1x1, no bias; a grouped conv (groups=3) left dense; an MPO head
    gpt2                a tiny transformers GPT2LMHeadModel (Conv1D layers, lm_head tied to wte)
    gpt2_base           the same model's GPT2Model saved on its own (what `tnk compress` writes): its io holds the
                        last hidden state; loaded into a GPT2LMHeadModel it must give the gpt2 fixture's logits
    mlp_bf16            a bfloat16 checkpoint (the model keeps the dtype of the skeleton it is loaded into)
    buffers_bf16        a bfloat16 checkpoint with a persistent and a non-persistent buffer (values exact in bf16)
    pickled             torch.save of a whole nn.Sequential with both layer kinds (called once before saving,
                        as a used model is) and the save_pretrained guard tensorize installs on transformers
                        models (attached by hand: a pickled transformers model would carry transformers' internals)
    pre_padding_mode          a checkpoint made by the code before padding_mode and buffers.safetensors
    pickled_pre_padding_mode  a whole model pickled by that code (its TuckerConv2d state has no padding_mode, _pad)

How they were made (2026-12-02, tnkernels 0.1.0, torch 2.14.1, safetensors 0.8.0, transformers 5.24.0):
    git worktree add /tmp/tnk_new 45fdbd9 && cp tnkernels/_native*.so /tmp/tnk_new/tnkernels/
    PYTHONPATH=/tmp/tnk_new python tests/data/make_checkpoints.py           # the current-format fixtures
    git worktree add /tmp/tnk_old a9c7c7e && cp tnkernels/_native*.so /tmp/tnk_old/tnkernels/
    PYTHONPATH=/tmp/tnk_old python tests/data/make_checkpoints.py pre_padding_mode pickled_pre_padding_mode
(a9c7c7e is the last commit before padding_mode, b020f08, and before buffers.safetensors, 71bdb3e; every earlier
commit writes the same spec keys and pickles the same layer state.)
manifest.json of each fixture records the commit that really made it. Builders use explicit modes, bonds and ranks
(not ratio=, whose structure depends on the machine's timings) and fixed seeds, so a rerun makes the same models;
this file must keep running on the old commit for the pre_* fixtures (no newer API at import time).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

HERE = Path(__file__).resolve().parent / "checkpoints"
CURRENT = ("mlp", "conv", "gpt2", "gpt2_base", "mlp_bf16", "pickled", "buffers_bf16")
OLD = ("pre_padding_mode", "pickled_pre_padding_mode")  # made by commit a9c7c7e, see the docstring


# ------------------------------------------------------------------------------------------------ skeletons
class GoldenMLP(nn.Module):
    """Linear layers tensorized with several core counts; `again` is `low_rank` under a second name."""

    def __init__(self) -> None:
        super().__init__()
        self.one = nn.Linear(12, 12)  # 1 core
        self.two = nn.Linear(12, 24)  # 2 cores
        self.three = nn.Linear(24, 24, bias=False)  # 3 cores
        self.four = nn.Linear(24, 16)  # 4 cores
        self.low_rank = nn.Linear(16, 16, bias=False)  # modes (16, 1) x (1, 16)
        self.again = self.low_rank
        self.head = nn.Linear(16, 5)  # left dense
        self.register_buffer("offset", torch.linspace(-0.5, 0.5, 16))
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 16), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.two(F.gelu(self.one(x))))
        h = torch.tanh(self.low_rank(self.four(self.three(h))))
        return self.head(self.again(h) * self.scale + self.offset)


def mlp() -> nn.Module:
    return GoldenMLP()


def conv() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect"),
        nn.ReLU(),
        nn.Conv2d(8, 8, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2), bias=False),
        nn.Conv2d(8, 6, 2, padding="same", padding_mode="circular"),
        nn.ReLU(),
        nn.Conv2d(6, 6, 1, padding="valid"),
        nn.Conv2d(6, 6, 3, padding=2, dilation=2, groups=3, padding_mode="replicate"),  # grouped: stays dense
        nn.Conv2d(6, 4, 3, stride=2, padding=1),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(16, 6),
    )


def gpt2_config():
    import transformers

    return transformers.GPT2Config(
        n_layer=1, n_embd=8, n_head=2, n_inner=16, vocab_size=32, n_positions=8, bos_token_id=0, eos_token_id=0
    )


def gpt2() -> nn.Module:
    import transformers

    return transformers.GPT2LMHeadModel(gpt2_config()).eval()


def gpt2_base() -> nn.Module:
    import transformers

    return transformers.GPT2Model(gpt2_config()).eval()


def mlp_bf16() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))


class BufferedLinear(nn.Module):
    """An MPO layer between a non-persistent and a persistent buffer, whose values bfloat16 holds exactly."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 8)
        self.register_buffer("scale", 0.5 + torch.arange(8) / 8, persistent=False)
        self.register_buffer("offset", torch.arange(8) / 4 - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * self.scale + self.offset


def buffers_bf16() -> nn.Module:
    return BufferedLinear()


class OldConvNet(nn.Module):
    """The pre_padding_mode model: what the code before padding_mode could tensorize (zeros padding only)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(4, 4, 3, padding="same", bias=False),
            nn.Conv2d(4, 4, 3, stride=2, dilation=1),
        )
        self.fc = nn.Linear(16, 8)  # 3 cores
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 8), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).flatten(1)) * self.scale


def pre_padding_mode() -> nn.Module:
    return OldConvNet()


def pickled_sequential() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), nn.ReLU(), nn.Flatten(), nn.Linear(64, 6)
    )


def pickled_old_sequential() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding="same"), nn.Flatten(), nn.Linear(64, 6)
    )


# ------------------------------------------------------------------------------------------------ generation
RULES = {
    "mlp": {
        "one": {"num_cores": 1},
        "two": {"in_modes": (4, 3), "out_modes": (6, 4), "max_bond": 3},
        "three": {"in_modes": (4, 3, 2), "out_modes": (2, 3, 4), "max_bond": 3},
        "four": {"in_modes": (3, 2, 2, 2), "out_modes": (2, 2, 2, 2), "max_bond": 2},
        "low_rank": {"in_modes": (16, 1), "out_modes": (1, 16), "max_bond": 4},
        "head": None,
    },
    "conv": {
        "0": {"ranks": (4, 2)},
        "2": {"ranks": (3, 4)},
        "3": {"ranks": (3, 3)},
        "5": {"ranks": (2, 2)},
        "7": {"ranks": (2, 3)},
        "10": {"in_modes": (4, 4), "out_modes": (3, 2), "max_bond": 3},
    },
    "gpt2": {
        "*.attn.c_attn": {"in_modes": (4, 2), "out_modes": (6, 4), "max_bond": 3},
        "*.attn.c_proj": {"in_modes": (8, 1), "out_modes": (1, 8), "max_bond": 3},
        "*.mlp.c_fc": {"in_modes": (2, 2, 2), "out_modes": (2, 4, 2), "max_bond": 3},
        "*.mlp.c_proj": {"in_modes": (16, 1), "out_modes": (1, 8), "max_bond": 4},
    },
    "mlp_bf16": {
        "0": {"in_modes": (4, 4), "out_modes": (8, 4), "max_bond": 3},
        "2": {"in_modes": (32, 1), "out_modes": (1, 8), "max_bond": 3},
    },
    "buffers_bf16": {"fc": {"in_modes": (4, 4), "out_modes": (4, 2), "max_bond": 3}},
    "pre_padding_mode": {
        "features.0": {"ranks": (2, 2)},
        "features.2": {"ranks": (3, 2)},
        "features.3": {"ranks": (2, 3)},
        "fc": {"in_modes": (2, 4, 2), "out_modes": (2, 2, 2), "max_bond": 2},
    },
    "pickled": {"0": {"ranks": (2, 2)}, "3": {"in_modes": (4, 4, 4), "out_modes": (3, 2, 1), "max_bond": 2}},
    "pickled_pre_padding_mode": {
        "0": {"ranks": (2, 2)},
        "2": {"ranks": (3, 2)},
        "4": {"in_modes": (8, 8), "out_modes": (3, 2), "max_bond": 3},
    },
}


def fixed_input(name: str) -> torch.Tensor:
    """The input each fixture's outputs are stored for (seeded apart from the model's weights)."""
    g = torch.Generator().manual_seed(1234)
    if name.startswith("gpt2"):
        return torch.randint(0, 32, (1, 6), generator=g)
    shape = {
        "mlp": (2, 3, 12),
        "conv": (2, 3, 9, 8),
        "mlp_bf16": (3, 16),
        "buffers_bf16": (3, 16),
        "pre_padding_mode": (2, 3, 5, 5),
        "pickled": (2, 3, 4, 4),
        "pickled_pre_padding_mode": (2, 3, 4, 4),
    }[name]
    x = torch.randn(*shape, generator=g)
    return x.bfloat16().float() if name.endswith("bf16") else x  # exactly representable in bfloat16


def float64_output(model: nn.Module, x: torch.Tensor, key: str | None = None) -> torch.Tensor:
    """The model's output on x computed in float64 from its saved values (cast exactly)."""
    ref = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        y = ref(x if not x.is_floating_point() else x.double())
    return (y[key] if key else y).detach().clone()


def _made_by() -> dict:
    import safetensors

    import tnkernels

    src = Path(tnkernels.__file__).resolve().parent

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=src, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return "unknown"

    try:
        import transformers

        hf = transformers.__version__
    except ImportError:
        hf = None
    return {
        "tnkernels": tnkernels.__version__,
        "commit": git("rev-parse", "HEAD"),
        "tnkernels_changed_since_commit": bool(git("status", "--porcelain", "--", ".")),
        "torch": torch.__version__,
        "safetensors": safetensors.__version__,
        "transformers": hf,
        "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
        "generator": "tests/data/make_checkpoints.py",
    }


def _write_extras(out: Path, name: str, tensors: dict, note: str) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "io.safetensors"))
    manifest = {"fixture": name, "note": note, "made_by": _made_by()}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def _tensorized(name: str, build) -> nn.Module:
    from tnkernels import tensorize

    torch.manual_seed(0)
    model = build().eval()
    tensorize(model, rules=RULES[name])
    return model


def make(name: str, root: Path) -> None:
    from tnkernels import save_compressed

    out = root / name
    if name == "gpt2_base":
        model = _tensorized("gpt2", gpt2)
        x = fixed_input(name)
        save_compressed(model.transformer, out)
        tensors = {"input": x, "expected": float64_output(model.transformer, x, "last_hidden_state")}
        note = "GPT2Model of the gpt2 fixture's model, saved alone (what tnk compress writes)"
        return _write_extras(out, name, tensors, note)
    if name.startswith("pickled"):
        model = _tensorized(name, pickled_sequential if name == "pickled" else pickled_old_sequential)
        x = fixed_input(name)
        with torch.no_grad():
            model(x)  # a used model: the layers' call state (memo, checked shapes) exists when it is pickled
        note = "torch.save of the whole model; torch.load(..., weights_only=False)"
        if name == "pickled":
            from tnkernels.convert.hf_save import RefuseSavePretrained

            model.__dict__["save_pretrained"] = RefuseSavePretrained(model)
            note += "; save_pretrained is the guard installed on transformers models"
        out.mkdir(parents=True)
        torch.save(model, out / "model.pt")
        return _write_extras(out, name, {"input": x, "expected": float64_output(model, x)}, note)
    build = globals()[name]
    model = _tensorized(name, build)
    if name.endswith("bf16"):
        model = model.to(torch.bfloat16)
    x = fixed_input(name)
    key = "logits" if name == "gpt2" else None
    save_compressed(model, out)
    expected = float64_output(model, x.bfloat16() if name.endswith("bf16") else x, key)
    _write_extras(out, name, {"input": x, "expected": expected}, "save_compressed")


def _is_old_code() -> bool:
    import inspect

    from tnkernels import TuckerConv2d

    return "padding_mode" not in inspect.signature(TuckerConv2d.__init__).parameters


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", help=f"fixtures to make (default: {' '.join(CURRENT)})")
    parser.add_argument("--root", type=Path, default=HERE, help="where to write them (default: %(default)s)")
    args = parser.parse_args(argv)
    names = args.names or list(CURRENT)
    unknown = [n for n in names if n not in CURRENT + OLD]
    if unknown:
        parser.error(f"unknown fixtures {unknown}; known: {CURRENT + OLD}")
    old = _is_old_code()
    for name in names:
        if (name in OLD) != old:
            need = "the code before padding_mode (commit a9c7c7e)" if name in OLD else "today's code"
            print(f"{name}: needs {need} on PYTHONPATH; skipped", file=sys.stderr)
            continue
        if (args.root / name).exists():  # committed fixtures are never regenerated: add a new one instead
            print(f"{name}: {args.root / name} exists; not replaced", file=sys.stderr)
            continue
        make(name, args.root)
        size = sum(f.stat().st_size for f in (args.root / name).iterdir())
        print(f"{name}: {size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
