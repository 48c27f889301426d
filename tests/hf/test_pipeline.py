"""The HF pipeline end to end on tiny models: Conv1D path, slice training, save/load into an AutoModel
skeleton, resume, torchrun-style sharding, and the CLI flags."""

from __future__ import annotations

import argparse
import copy
import json

import pytest
import torch

import tnkernels
from distill.hf.baselines import one_shot
from distill.hf.capture import capture_features, load_slice_features
from distill.hf.flags import add_arguments
from distill.hf.models import base_model, family_of, is_hf_model_dir, load_hf_model
from distill.hf.pipeline import compress_hf, my_share
from distill.hf.presets import ATTENTION_PATTERNS, resolve, run_hf_slice, slice_specs
from distill.hf.train import tensorize_slice, train_slice
from distill.slices import set_submodule
from tests.helpers import assert_close_rel
from tests.hf.conftest import tiny_model
from tests.hf.test_presets_capture import padded_batches


def _small_run(out) -> list[str]:
    """Flags of a tiny, fast compression run into `out`."""
    flags = "--ratio 2 --steps 4 --seq-len 12 --num-samples 8 --batch-size 4 --device cpu".split()
    return [*flags, "--out", str(out)]


def _args(model_dir, out, *extra: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(["--model", str(model_dir), *_small_run(out), *extra])


def test_conv1d_slice_tensorized_exactly_reproduces_teacher():
    """GPT-2's Conv1D stores W as [in, out]; an exact (full-bond) MPO of both MLP layers must give the
    teacher's slice output, so the transpose convention is right."""
    model = tiny_model("gpt2")
    spec = slice_specs(model, "mlp", layers=[1])[0]
    teacher = resolve(model, spec)
    student = copy.deepcopy(torch.nn.ModuleList(teacher)).double()  # decompose in float64: exact up to 1e-9
    report = tnkernels.tensorize(student, rel_tol=1e-9)
    assert {type(m).__name__ for m in student.modules()} >= {"MPOLinear"}
    assert len(report.tensorized) == 2
    x = torch.randn(2, 7, 32, dtype=torch.float64)
    with torch.no_grad():
        want = run_hf_slice([m.double() for m in copy.deepcopy(teacher)], x, {})
        got = run_hf_slice(student.double(), x, {})
    assert_close_rel(got, want, 1e-8, "Conv1D -> MPO slice")


def test_training_lowers_slice_loss_and_keeps_attention_dense(family, tmp_path):
    model = tiny_model(family)
    spec = slice_specs(model, "block", layers=[0])[0]
    capture_features(model, [spec], padded_batches(family, n_batches=3), tmp_path, progress=False)
    data = load_slice_features(tmp_path, spec.name)
    student, report = tensorize_slice(
        resolve(model, spec),
        ratio=2.0,
        attention=False,
        attention_patterns=ATTENTION_PATTERNS[family_of(model)],
    )
    dense = [r.name for r in report.rows if r.status != "tensorized"]
    assert dense and all(("attn" in n or "attention" in n) for n in dense)
    assert all(r.kind == "mpo" for r in report.rows if r.status == "tensorized")
    if family == "llama":
        # A random Llama's block output is nearly all residual (slice NMSE 0.002 at init) and random tokens do
        # not generalize across batches (held-out NMSE flat over lr 3e-4 ... 3e-3): check the fit on one batch.
        data = data[:1]
    stats = train_slice(spec, student, data, steps=30, lr=3e-3, eval_every=5, patience=100)
    assert stats["final_nmse"] < 0.9 * stats["initial_nmse"], stats


def test_pipeline_save_load_automodel_skeleton_and_resume(tiny_dir, tmp_path):
    from transformers import AutoModel

    from tnkernels.cli import main as tnk

    out = tmp_path / "out"
    assert is_hf_model_dir(tiny_dir)
    # through the real `tnk compress` entry point (distill.cli dispatches a config.json folder to compress_hf)
    rc = tnk(["compress", "--model", str(tiny_dir), *_small_run(out), "--preset", "block", "--no-progress"])
    assert rc == 0
    saved = json.loads((out / "report.json").read_text())
    assert saved["num_slices"] == 3 and len(saved["slices"]) == 3
    assert saved["params_after"] < saved["params_before"]
    assert set(saved["metrics"]) & {"student_perplexity", "mean_cosine"}
    # the compressed folder restores into the plain AutoModel skeleton, with the pipeline model's outputs
    loaded = tnkernels.load_compressed(AutoModel.from_pretrained(tiny_dir), out / "compressed").eval()
    in_memory, _ = load_hf_model(tiny_dir)
    ids = torch.randint(5, 200, (2, 9))
    ref = base_model(in_memory)
    for spec_name in [s["slice"] for s in saved["slices"]]:
        ckpt = torch.load(out / "slices" / f"{spec_name}.pt", weights_only=False)
        for name, mod in zip(ckpt["modules"], ckpt["student"], strict=True):
            set_submodule(ref, name, mod)
    with torch.no_grad():
        assert_close_rel(
            loaded(input_ids=ids).last_hidden_state,
            ref.eval()(input_ids=ids).last_hidden_state,
            1e-5,
            "load_compressed vs pipeline",
        )
    if family_of(in_memory) in ("gpt2", "llama"):  # the base model's checkpoint also loads under the LM head
        from transformers import AutoModelForCausalLM

        lm = tnkernels.load_compressed(AutoModelForCausalLM.from_pretrained(tiny_dir), out / "compressed").eval()
        ffn_in = lm.transformer.h[0].mlp.c_fc if family_of(lm) == "gpt2" else lm.model.layers[0].mlp.gate_proj
        assert type(ffn_in).__name__ == "MPOLinear"
        with torch.no_grad():
            assert_close_rel(
                base_model(lm)(input_ids=ids).last_hidden_state,
                loaded(input_ids=ids).last_hidden_state,
                1e-6,
                "LM skeleton vs AutoModel skeleton",
            )
    # tnk eval on the checkpoint gives the report's metrics again (same held-out text and sequence length)
    from distill.hf.eval_cmd import eval_hf

    again = eval_hf(tiny_dir, out / "compressed", seq_len=12)
    assert again == pytest.approx(saved["metrics"], rel=1e-5)
    assert tnk(["eval", "--model", str(tiny_dir), "--compressed", str(out / "compressed"), "--seq-len", "12"]) == 0
    # resume: a rerun trains nothing again (slice checkpoints untouched)
    mtimes = {p.name: p.stat().st_mtime_ns for p in (out / "slices").iterdir()}
    compress_hf(_args(tiny_dir, out, "--preset", "block", "--no-eval"))
    assert {p.name: p.stat().st_mtime_ns for p in (out / "slices").iterdir()} == mtimes
    # another setup in the same folder is refused, not resumed with the first run's slices (it was, silently)
    with pytest.raises(ValueError, match=r"holds the slices of another run \(settings ratio, steps differ"):
        compress_hf(_args(tiny_dir, out, "--preset", "block", "--no-eval", "--ratio", "3", "--steps", "5"))
    with pytest.raises(ValueError, match=r"the model or calibration data differ"):
        compress_hf(_args(tiny_dir, out, "--preset", "block", "--no-eval", "--num-samples", "6"))
    assert {p.name: p.stat().st_mtime_ns for p in (out / "slices").iterdir()} == mtimes


def test_my_share_partitions_slices():
    items = list(range(11))
    for world in (1, 2, 3, 4, 16):
        shares = [my_share(items, r, world) for r in range(world)]
        assert [x for s in shares for x in s] == items
        assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_one_shot_only_touches_ffn_layers():
    model = tiny_model("bert")
    student = one_shot(model, 2.0)
    kinds = {n: type(m).__name__ for n, m in base_model(student).named_modules()}
    mpo = {n for n, k in kinds.items() if k == "MPOLinear"}
    assert mpo == {f"encoder.layer.{i}.{s}.dense" for i in range(3) for s in ("intermediate", "output")}
    assert type(model.encoder.layer[0].intermediate.dense).__name__ == "Linear"  # teacher untouched


def test_bad_model_dirs(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        load_hf_model(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "t5"}')
    with pytest.raises(ValueError, match="not supported"):
        load_hf_model(tmp_path)


def test_tokenizer_from_another_folder(tmp_path):
    """A model folder saved without its tokenizer: a clear error, and --tokenizer DIR supplies one."""
    from distill.hf.models import build_from_config
    from tests.hf.conftest import TINY, make_tokenizer

    model_dir, tok_dir = tmp_path / "model", tmp_path / "tok"
    tiny_model("gpt2").save_pretrained(model_dir)
    with pytest.raises(ValueError, match="--tokenizer DIR"):
        compress_hf(_args(model_dir, tmp_path / "out", "--no-eval"))
    with pytest.raises(ValueError, match="--tokenizer: .* holds none of"):
        compress_hf(_args(model_dir, tmp_path / "out", "--no-eval", "--tokenizer", str(tmp_path)))
    make_tokenizer("gpt2").save_pretrained(tok_dir)
    report = compress_hf(_args(model_dir, tmp_path / "out", "--no-eval", "--tokenizer", str(tok_dir)))
    assert report["params_after"] < report["params_before"]
    small_vocab = tmp_path / "small-vocab"
    build_from_config("gpt2", **{**TINY["gpt2"], "vocab_size": 64}).save_pretrained(small_vocab)
    with pytest.raises(ValueError, match="256 tokens, but the model embeds only 64"):
        compress_hf(_args(small_vocab, tmp_path / "out2", "--no-eval", "--tokenizer", str(tok_dir)))


def test_module_entry_point_reports_bad_flags_in_one_line(tiny_dir, tmp_path, capsys):
    from distill.hf.pipeline import main

    with pytest.raises(SystemExit) as exc:
        main(["--model", str(tiny_dir), "--ratio", "0.5", "--out", str(tmp_path / "out")])
    assert exc.value.code == 2
    assert "error: --ratio must be > 1" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    if not torch.cuda.is_available():  # a missing GPU is a one-line error too, before the model loads
        with pytest.raises(SystemExit):
            main(["--model", str(tiny_dir), "--ratio", "2", "--device", "cuda", "--out", str(tmp_path / "out")])
        assert "error: --device cuda: CUDA is not available here" in capsys.readouterr().err


def _one_block_slice(tmp_path, family="gpt2"):
    model = tiny_model(family)
    spec = slice_specs(model, "block", layers=[0])[0]
    capture_features(model, [spec], padded_batches(family, n_batches=3), tmp_path, progress=False)
    student, _ = tensorize_slice(
        resolve(model, spec), ratio=2.0, attention=False, attention_patterns=ATTENTION_PATTERNS[family_of(model)]
    )
    return spec, student, load_slice_features(tmp_path, spec.name)


def test_non_finite_loss_stops_training_at_the_next_evaluation(tmp_path):
    spec, student, data = _one_block_slice(tmp_path)
    for d in data[:-1]:  # the training batches; the held-out one stays clean
        d["y"] = torch.full_like(d["y"], float("nan"))
    with pytest.raises(FloatingPointError, match=r"not finite between steps 1 and 5; lower --lr"):
        train_slice(spec, student, data, steps=30, lr=3e-3, eval_every=5, patience=100)


def test_training_reads_the_device_only_at_evaluations(tmp_path, monkeypatch):
    """A host read per step (bool(isfinite(loss))) made the CPU wait for a GPU at every step. Counted: reads made
    by the training loop itself (AdamW's reads of its CPU step counter do not wait for a GPU)."""
    import sys

    spec, student, data = _one_block_slice(tmp_path)
    reads = []

    def counting(real):
        def read(t, *args):
            caller = sys._getframe(1).f_code.co_filename
            if caller.endswith("train.py") and "distill" in caller:
                reads.append(sys._getframe(1).f_lineno)
            return real(t, *args)

        return read

    monkeypatch.setattr(torch.Tensor, "__bool__", counting(torch.Tensor.__bool__))
    monkeypatch.setattr(torch.Tensor, "item", counting(torch.Tensor.item))
    train_slice(spec, student, data, steps=20, lr=3e-3, eval_every=10, patience=100)
    # 3 evaluations (initial, steps 10 and 20) of one held-out batch (2 reads each), 2 finiteness checks
    assert len(reads) == 3 * 2 + 2, reads
