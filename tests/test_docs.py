"""The documentation's code runs and its commands exist.

A user copies a block from README.md or docs/*.md: every ```python block runs here (in a subprocess, in a fresh
temporary folder, so files the block writes go nowhere), except the ones marked in the markdown with
`<!-- docs-test: skip (reason) -->`, which are listed, reason included, by test_skipped_blocks_are_listed. A block
that uses names it leaves to the reader ("x, cores, bias: yours", a local "./gpt2") gets them from SETUPS below,
named by `<!-- docs-test: setup NAME -->`; the substitutes are what ships here (random weights, small configs).
Every `tnk ...`, `python -m bench.X ...`, `python bench/X.py ...` and `pytest ...` the docs name, in a block or
inline, is checked against that command's own argparse parser: each `--flag` must be one it accepts, and a full
command line from a shell block must parse. A failure names the markdown file and line.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import textwrap
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.docs_snippets import (
    DOC_FILES,
    ROOT,
    Block,
    all_commands,
    blocks,
    directives_without_block,
    parser_for,
    python_blocks,
)

# The names a block leaves to the reader, built small. Each runs in the block's namespace before the block.
SETUPS = {
    # README "Backends": an MPOLinear and a TuckerConv2d as in the API section, a model and its loss
    "readme_layers": """
        import torch
        import tnkernels as tk

        layer = tk.MPOLinear.from_linear(torch.nn.Linear(768, 3072), ratio=4)
        conv_layer = tk.TuckerConv2d.from_conv(torch.nn.Conv2d(64, 128, 3, stride=2, padding=1), ratio=4)
        model = torch.nn.Sequential(layer)
        x = torch.randn(64, 768)
        loss = model(x).square().mean()
    """,
    # an MPO chain (3 cores, 64 -> 96) with its input and bias
    "mpo_operands": """
        import torch
        import tnkernels

        cores = tnkernels.mpo_decompose(torch.randn(96, 64), (4, 4, 4), (4, 6, 4), max_bond=8)
        bias = torch.randn(96)
        x = torch.randn(3, 64)
    """,
    # the planner's options around a training step and an inference call
    "planner_options": """
        import torch
        import tnkernels

        model = torch.nn.Sequential(tnkernels.MPOLinear.from_linear(torch.nn.Linear(64, 96), ratio=4))
        x = torch.randn(8, 64)
        loss = model(x).square().mean()
    """,
    # docs/triton.md: an MPO chain and a Tucker-2 conv, small, as CPU tensors for TRITON_INTERPRET=1
    "triton_operands": """
        import torch
        import tnkernels

        cores = tnkernels.mpo_decompose(torch.randn(24, 16), (4, 4), (4, 6), max_bond=4)
        bias = torch.randn(24)
        x = torch.randn(2, 16)
        u_out, core, u_in = tnkernels.tucker_decompose(torch.randn(8, 6, 3, 3), (4, 3))
        conv_bias = torch.randn(8)
        img = torch.randn(1, 6, 7, 7)
    """,
    # docs/hf.md: "./gpt2" is a GPT-2 from a small config with random weights, "./gpt2-x2/compressed" its base
    # model tensorized at 2x and saved as `tnk compress` saves it (no training: the format is what counts here)
    "hf_gpt2": """
        import transformers
        import tnkernels

        cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=64, vocab_size=128)
        transformers.GPT2LMHeadModel(cfg).save_pretrained("./gpt2")
        _base = transformers.AutoModel.from_pretrained("./gpt2")
        tnkernels.tensorize(_base, ratio=2)
        tnkernels.save_compressed(_base, "./gpt2-x2/compressed")
    """,
    # docs/distill_budget.md: a small CNN with random weights as teacher / model, a copy as student, the digits
    "distill_models": """
        import copy

        import torch
        import tnkernels
        from torch.utils.data import DataLoader

        from distill.data import load_digits
        from distill.teacher import evaluate

        torch.manual_seed(0)
        _train, _test = load_digits(image_size=8, calib_fraction=0.1)
        train_loader = DataLoader(_train, batch_size=48)
        test_loader = DataLoader(_test, batch_size=180)
        model = teacher = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 16, 3, padding=1),
            torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 10),
        ).eval()
        student = copy.deepcopy(model)
    """,
}

# Runs in the subprocess: each chain (a block and the blocks that continue it) in a fresh namespace and a fresh
# temporary folder; the block is compiled under its markdown file's name, padded so that its line numbers are the
# markdown's, so a traceback reads "README.md", line 97.
_WORKER = """
import json, os, sys, tempfile, traceback
chains = json.load(sys.stdin)
results = {}
home = os.getcwd()
for chain in chains:
    ns = {"__name__": "__main__"}
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        try:
            for step in chain:
                where = step["where"]
                if step["setup"]:
                    exec(compile(step["setup"], "<setup of " + where + ">", "exec"), ns)
                exec(compile("\\n" * (step["line"] - 1) + step["code"], step["path"], "exec"), ns)
                results[where] = None
        except BaseException:
            results[where] = traceback.format_exc()
        finally:
            os.chdir(home)
print("\\n@@RESULTS@@" + json.dumps(results))
"""


def _chains() -> list[list[Block]]:
    """The blocks to run, each chain in one namespace (a block and the ones marked `continue` after it)."""
    chains: list[list[Block]] = []
    for b in python_blocks():
        if b.skip_reason:
            continue
        if b.continues:
            assert chains and chains[-1][0].path == b.path, f"{b.where}: `continue` with no block before it"
            chains[-1].append(b)
        else:
            chains.append([b])
    return chains


def _payload(chain: list[Block]) -> list[dict]:
    out = []
    for b in chain:
        if b.setup and b.setup not in SETUPS:
            raise AssertionError(f"{b.where}: setup {b.setup!r} is not in tests/test_docs.py SETUPS")
        setup = textwrap.dedent(SETUPS[b.setup]) if b.setup else ""
        out.append({"where": b.where, "path": b.path, "line": b.line, "code": b.code, "setup": setup})
    return out


def _run_chains(chains: list[list[Block]]) -> dict[str, str | None]:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("TRITON_INTERPRET", "1")
    env["MPLBACKEND"] = "Agg"
    proc = subprocess.run(
        [sys.executable, "-c", _WORKER],
        input=json.dumps([_payload(c) for c in chains]),
        capture_output=True,
        text=True,
        env=env,
        cwd=tempfile.gettempdir(),
        timeout=600,
    )
    head, sep, tail = proc.stdout.rpartition("@@RESULTS@@")
    if not sep:
        raise AssertionError(
            f"the docs worker died (exit {proc.returncode}):\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
        )
    results = json.loads(tail)
    for c in chains:  # a block after a failed one in its chain did not run
        for b in c:
            results.setdefault(b.where, f"not run: an earlier block of its chain failed ({c[0].where})")
    return results


@pytest.fixture(scope="module")
def block_results() -> dict[str, str | None]:
    """Every runnable block's result (None: ran; else the traceback), from two worker processes side by side."""
    chains = _chains()
    # the README's API block (ResNet-34, tensorized and saved) is the longest: one worker for it, one for the rest
    heavy = [c for c in chains if c[0].where == _README_API]
    light = [c for c in chains if c[0].where != _README_API]
    with ThreadPoolExecutor(2) as pool:
        parts = list(pool.map(_run_chains, [p for p in (heavy, light) if p]))
    return {k: v for part in parts for k, v in part.items()}


_README_API = next((b.where for b in blocks("README.md") if b.lang == "python"), "")
_RUN = [b for c in _chains() for b in c]


@pytest.mark.parametrize("block", _RUN, ids=[b.where for b in _RUN])
def test_doc_block_runs(block: Block, block_results) -> None:
    error = block_results[block.where]
    assert error is None, f"{block.where}: this ```python block fails:\n{error}"


# ---- what the test covers, and what it leaves out ---------------------------------------------------------------

# Blocks marked `docs-test: skip`: changing this number is a decision (the reasons are printed as skips by -ra).
SKIPPED_BLOCKS = 1


@pytest.mark.parametrize("block", [b for b in python_blocks() if b.skip_reason], ids=lambda b: b.where)
def test_skipped_blocks_are_listed(block: Block) -> None:
    pytest.skip(f"{block.where}: not run: {block.skip_reason}")


def test_skips_are_counted_and_directives_known() -> None:
    problems = []
    for path in DOC_FILES:
        problems += [
            f"{w}: a docs-test directive with no fenced block after it" for w in directives_without_block(path)
        ]
        for b in blocks(path):
            if b.lang not in ("python", "bash", ""):
                problems.append(
                    f"{b.where}: fence language {b.lang!r}: use ```python or ```bash (others are unchecked)"
                )
            if b.directive and not (b.skip_reason or b.setup or b.continues):
                problems.append(f"{b.where}: unknown directive {b.directive!r} (skip (reason) | setup NAME | continue)")
            if b.directive and b.lang != "python":
                problems.append(f"{b.where}: a docs-test directive on a ```{b.lang} block (only python blocks run)")
    skipped = [f"{b.where} ({b.skip_reason})" for b in python_blocks() if b.skip_reason]
    if len(skipped) != SKIPPED_BLOCKS:
        problems.append(
            f"{len(skipped)} blocks are skipped, SKIPPED_BLOCKS says {SKIPPED_BLOCKS}: " + "; ".join(skipped)
        )
    assert not problems, "\n".join(problems)


# ---- commands ---------------------------------------------------------------------------------------------------

_PLACEHOLDER = re.compile(r"^(\.\.\.|…|[A-Z][A-Z_]*|\|)$")  # R, DIR, FILE, ..., a synopsis's |


def _pytest_options() -> set[str]:
    from _pytest.config import get_config

    config = get_config()
    config.pluginmanager.load_setuptools_entrypoints("pytest11")
    parser = config._parser
    return {n for group in [parser._anonymous, *parser._groups] for o in group.options for n in o.names()}


def _check_command(cmd, parsers: dict, pytest_options: set[str]) -> list[str]:
    if cmd.program == "pytest":
        bad = [a.split("=", 1)[0] for a in cmd.argv if a.startswith("-") and a.split("=", 1)[0] not in pytest_options]
        missing = [a for a in cmd.argv if a.startswith(("tests/", "bench/")) and not (ROOT / a).exists()]
        return [f"pytest has no option {f}" for f in bad] + [f"no such path {p}" for p in missing]
    if cmd.program.startswith("python ") and not cmd.program.startswith("python -m "):
        script = cmd.program.split(" ", 1)[1]
        if not (ROOT / script).is_file():
            return [f"no such script {script}"]
    elif cmd.program.startswith("python -m "):
        module = cmd.program.split()[-1]
        if not any((ROOT / (module.replace(".", "/") + ext)).is_file() for ext in (".py", "/__main__.py")):
            return [f"no such module {module}"]
    key = (cmd.program, cmd.argv[0] if cmd.program == "tnk" and cmd.argv else "")
    if key not in parsers:
        parsers[key] = parser_for(cmd.program, cmd.argv)
    if parsers[key] is None:  # setup.py, a throwaway script under bench/results/: not ours to parse
        return []
    parser, name, skip = parsers[key]
    argv = cmd.argv[skip:]
    problems = [f"`{name}` has no flag {f}" for f in cmd.flags if f not in parser._option_string_actions]
    if problems or cmd.notes or {"-h", "--help"} & set(argv):  # a synopsis: its flags are all there is to check
        return problems
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            parser.parse_args(argv)
    except SystemExit:
        message = err.getvalue().strip().splitlines()[-1]
        # a whole command line must parse; a span in the prose ("`--ratio R`", a flag without its value) at least
        # must not give a flag a value it refuses
        if (cmd.whole and not any(_PLACEHOLDER.match(a) for a in argv)) or "invalid choice" in message:
            return [f"`{name}` refuses this command line: {message}"]
    return []


def test_doc_commands_exist_and_parse() -> None:
    """Each named command's script or module exists and has every --flag the docs give it; a whole command line
    in a shell block parses (choices, values) as that command's argparse parser would."""
    parsers: dict = {}
    pytest_options = _pytest_options()
    problems = []
    checked = 0
    for cmd in all_commands():
        checked += 1
        problems += [f"{cmd.where}: {p}\n    {cmd.text}" for p in _check_command(cmd, parsers, pytest_options)]
    assert checked > 50, f"only {checked} commands found in the docs: is the extraction broken?"
    assert not problems, "\n".join(problems)


def test_inspect_num_cores_help_says_what_the_default_does() -> None:
    """`tnk inspect --help` said "--num-cores (default: 2)", but without the flag the planner picks the structure
    (for a Linear at --ratio 4, the low-rank split (in, 1) x (1, out)), while `--num-cores 2` asks for a balanced
    2-core chain: a user who read the help got another structure by passing what it called the default."""
    parser, _, _ = parser_for("tnk", ["inspect"])
    action = parser._option_string_actions["--num-cores"]
    assert action.default is None
    assert "default: 2" not in action.help and "planner" in action.help, action.help
