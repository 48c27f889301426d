"""Golden checkpoints: files written by earlier tnkernels must keep loading, and today's writer must keep writing them.

The fixtures in tests/data/checkpoints/ were made once by tests/data/make_checkpoints.py (see its docstring for
what each holds and which commit made it) and are never regenerated: a failure here means that users' saved models
no longer load, or load into a different model. Fix the code, or, for a deliberate format change, follow the
policy in docs/ARCHITECTURE.md ("Compressed checkpoints: compatibility policy") and add new fixtures beside these.

Checked for every save_compressed fixture: it loads into a freshly built dense skeleton and into a meta-device one,
in float32 and float64, giving the stored float64 outputs of the saved model; the loaded model's tensor names,
shapes and dtypes; the tensor names and shapes the file holds for each layer of the spec (the conventions of
docs/ARCHITECTURE.md); and a re-save by today's code writes the same spec and tensors (the differences listed in
RESAVE_CHANGES are deliberate). Whole models pickled with torch.save load with torch.load and run.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import pickletools
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tests.data import make_checkpoints as mk
from tests.helpers import assert_close_rel, tolerance
from tnkernels import MPOLinear, TuckerConv2d, load_compressed, save_compressed

ROOT = Path(__file__).parent / "data" / "checkpoints"

# sha256 of each fixture folder (file names and bytes, sorted by name). A fixture is never changed or regenerated
# to make a test pass: new cases go into new folders, with their digest added here.
DIGESTS = {
    "buffers_bf16": "a37bc8650760e227471e14a29fd3f5d86b852aa59caaefb466c553a7f5ced53d",
    "conv": "e7c94a515aef22d5a0d685aeb7fde9f87d4b4e8126c27b39ad5310f345100534",
    "gpt2": "93af5ec316d8d71002797baf8f916882603e72307d3524ae457eabd83451f352",
    "gpt2_base": "71c39703f637b1651a9a3f565224c3ff134bfe58813e3e649f0504b8afe3a61d",
    "mlp": "ac10e26a8fd599d04c6bd5c8eefe66230909598eb31625a0a5bcac25ad8bcfcb",
    "mlp_bf16": "9f71d468628cf6d0116677f85cf1ace5a31d07ff6b9f4cc004864ef43becf77e",
    "pickled": "2ecf0e9a52289db1f726ca6d81360a676a44125c25a13fb5f4435db6ed1300cc",
    "pickled_pre_padding_mode": "73719d45077c6c7a97391ed38c88f1ce3bfc82f4a1ed8c58f25fb3445853532d",
    "pre_padding_mode": "b840205b9dfb5cad0e4096b77b35e8bf2a83d3139d1b6314cce7dd7c750a47eb",
}

# fixture -> (skeleton builder, the output's key in the model's return value, needs transformers)
SAVED = {
    "mlp": (mk.mlp, None),
    "conv": (mk.conv, None),
    "gpt2": (mk.gpt2, "logits"),
    "gpt2_base": (mk.gpt2_base, "last_hidden_state"),
    "mlp_bf16": (mk.mlp_bf16, None),
    "buffers_bf16": (mk.buffers_bf16, None),
    "pre_padding_mode": (mk.pre_padding_mode, None),
}
PICKLED = ("pickled", "pickled_pre_padding_mode")

# The class paths torch.save records for the package's objects: moving or renaming one breaks every pickled model.
FROZEN_CLASS_PATHS = {
    "tnkernels.nn.mpo_linear MPOLinear",
    "tnkernels.nn.tucker_conv TuckerConv2d",
    "tnkernels.convert.hf_save RefuseSavePretrained",
}


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.iterdir()):
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def _io(name: str) -> dict[str, torch.Tensor]:
    return load_file(str(ROOT / name / "io.safetensors"))


def _skeleton(name: str, *, meta: bool = False, dtype: torch.dtype | None = None) -> torch.nn.Module:
    if name.startswith("gpt2"):
        pytest.importorskip("transformers")
    build = SAVED[name][0]
    if meta:
        with torch.device("meta"):
            model = build()
    else:
        model = build()
    return model.to(dtype) if dtype is not None else model


def _run(name: str, model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    key = SAVED[name][1]
    model.eval()
    with torch.no_grad():
        y = model(x.to(next(model.parameters()).dtype) if x.is_floating_point() else x)
    return y[key] if key else y


def _file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    return load_file(str(path)), metadata


def _spec(path: Path) -> dict:
    return json.loads((path / "spec.json").read_text())


# ------------------------------------------------------------------------------------------------ the fixtures
def test_every_fixture_is_registered_and_unchanged():
    assert sorted(p.name for p in ROOT.iterdir() if p.is_dir()) == sorted(DIGESTS)
    assert set(SAVED) | set(PICKLED) == set(DIGESTS)
    changed = [name for name, digest in DIGESTS.items() if _digest(ROOT / name) != digest]
    assert not changed, f"golden fixtures {changed} changed: never regenerate them, add new ones (make_checkpoints.py)"


@pytest.mark.parametrize("name", sorted(SAVED))
def test_the_file_holds_the_documented_tensors(name):
    """Per spec entry: MPO cores `<layer>.cores.<k>` of shape (r_{k-1}, i_k, j_k, r_k), Tucker `u_in` [C_in, R_in],
    `core` [R_out, R_in, kh, kw], `u_out` [C_out, R_out], `bias` [out] when the entry says so; a layer shared under
    several names is stored once, the other names recorded in the file's metadata."""
    spec = _spec(ROOT / name)
    tensors, dropped = _file(ROOT / name / "model.safetensors")
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    shapes.update({k: shapes[v] for k, v in dropped.items()})  # tied / shared names: the kept tensor's shape
    for layer, entry in spec["layers"].items():
        if entry["kind"] == "mpo_linear":
            bonds = [1, *entry["bonds"], 1]
            want = {
                f"cores.{k}": (bonds[k], i, j, bonds[k + 1])
                for k, (i, j) in enumerate(zip(entry["in_modes"], entry["out_modes"], strict=True))
            }
            out = entry["out_features"]
        else:
            assert entry["kind"] == "tucker_conv2d"
            (r_out, r_in), c_in, out = entry["ranks"], entry["in_channels"], entry["out_channels"]
            want = {"u_in": (c_in, r_in), "core": (r_out, r_in, *entry["kernel_size"]), "u_out": (out, r_out)}
        if entry["bias"]:
            want["bias"] = (out,)
        stored = set()
        for prefix in [layer, *entry["aliases"]]:
            got = {k.removeprefix(prefix + "."): v for k, v in shapes.items() if k.startswith(prefix + ".")}
            assert got == want, (name, prefix)
            stored |= {str(t.dtype).removeprefix("torch.") for k, t in tensors.items() if k.startswith(prefix + ".")}
        assert stored == {entry["dtype"]}, (name, layer)


# ------------------------------------------------------------------------------------ save_compressed fixtures
@pytest.mark.parametrize("name", sorted(SAVED))
def test_loads_into_a_dense_skeleton(name):
    io = _io(name)
    model = load_compressed(_skeleton(name), ROOT / name)
    assert_close_rel(_run(name, model, io["input"]), io["expected"], tolerance(torch.float32), name)
    tensors, dropped = _file(ROOT / name / "model.safetensors")
    state = model.state_dict()
    assert set(state) == set(tensors) | set(dropped)
    for key, value in state.items():
        saved = tensors[dropped.get(key, key)]
        assert value.shape == saved.shape, key
        assert value.dtype == (torch.float32 if saved.is_floating_point() else saved.dtype), key
    kinds = {"mpo_linear": MPOLinear, "tucker_conv2d": TuckerConv2d}
    for layer, entry in _spec(ROOT / name)["layers"].items():
        assert type(model.get_submodule(layer)) is kinds[entry["kind"]], layer


@pytest.mark.parametrize("name", sorted(SAVED))
def test_loads_in_float64(name):
    """The stored outputs were computed in float64 from the saved values: a float64 skeleton matches them to
    float64 rounding, so a wrong value anywhere (a transposed core, a padding off by one) cannot hide in fp32 noise."""
    io = _io(name)
    model = load_compressed(_skeleton(name, dtype=torch.float64), ROOT / name)
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    assert_close_rel(_run(name, model, io["input"]), io["expected"], tolerance(torch.float64), name)


@pytest.mark.parametrize("name", sorted(set(SAVED) - {"pre_padding_mode"}))
def test_loads_into_a_meta_skeleton(name):
    io = _io(name)
    model = load_compressed(_skeleton(name, meta=True), ROOT / name)
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    # the skeleton's dtype, as on a dense skeleton: buffers.safetensors of a bf16 model held bf16 buffers, which a
    # float32 meta skeleton kept in bfloat16 (before 2026-12-02)
    assert {t.dtype for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()} == {torch.float32}
    got = _run(name, model, io["input"])
    assert_close_rel(got, io["expected"], tolerance(torch.float32), name)
    assert torch.equal(got, _run(name, load_compressed(_skeleton(name), ROOT / name), io["input"]))


# What a re-save by today's code changes on purpose, per fixture: (spec entries added to each layer of a kind,
# files added). Anything else that differs is a change of the format.
RESAVE_CHANGES = {
    # padding_mode (2026-12-02) is written for every conv; buffers.safetensors holds the non-persistent buffers
    "pre_padding_mode": ({"tucker_conv2d": {"padding_mode": "zeros"}}, {"buffers.safetensors"}),
}
VOLATILE = ("tnkernels_version", "sha256", "buffers_sha256")  # the writer's version and the files' checksums


@pytest.mark.parametrize("name", sorted(SAVED))
def test_a_resave_writes_the_same_checkpoint(name, tmp_path):
    dtype = torch.bfloat16 if name.endswith("bf16") else None  # a bf16 model saves as bf16
    model = load_compressed(_skeleton(name, dtype=dtype), ROOT / name)
    save_compressed(model, tmp_path / "again")
    old, new = _spec(ROOT / name), _spec(tmp_path / "again")
    added, new_files = RESAVE_CHANGES.get(name, ({}, set()))
    for entry in old["layers"].values():
        entry.update(added.get(entry["kind"], {}))
    assert {k: v for k, v in new.items() if k not in VOLATILE} == {k: v for k, v in old.items() if k not in VOLATILE}
    files = {p.name for p in (ROOT / name).iterdir()} - {"io.safetensors", "manifest.json"}
    assert {p.name for p in (tmp_path / "again").iterdir()} == files | new_files
    for file in sorted(files - {"spec.json"}):
        (was, was_meta), (now, now_meta) = _file(ROOT / name / file), _file(tmp_path / "again" / file)
        assert now_meta == was_meta, file  # the dropped names of tied and shared tensors
        assert now.keys() == was.keys(), file
        for key, value in was.items():
            assert now[key].dtype == value.dtype and torch.equal(now[key], value), (file, key)


@pytest.mark.parametrize("name", ["mlp_bf16", "buffers_bf16"])
def test_bf16_checkpoint_takes_the_skeletons_dtype(name):
    """Parameters and buffers, persistent or not, on dense and meta skeletons alike; the values are the file's."""
    io, outputs = _io(name), []
    for dtype in (torch.bfloat16, torch.float32):
        for meta in (False, True):
            model = load_compressed(_skeleton(name, meta=meta, dtype=dtype), ROOT / name)
            assert {t.dtype for t in [*model.parameters(), *model.buffers()]} == {dtype}, (dtype, meta)
            outputs.append(_run(name, model, io["input"]))
            assert_close_rel(outputs[-1], io["expected"], tolerance(dtype), f"{name} in {dtype}, meta={meta}")
        assert torch.equal(outputs[-2], outputs[-1])  # dense and meta skeletons give the same model


def test_shared_layer_and_buffers_of_the_mlp():
    """`again` is `low_rank` under a second name (spec aliases): one layer after loading, on either skeleton;
    the non-persistent buffer comes from the skeleton (dense) or from buffers.safetensors (meta)."""
    for meta in (False, True):
        model = load_compressed(_skeleton("mlp", meta=meta), ROOT / "mlp")
        assert model.again is model.low_rank and isinstance(model.low_rank, MPOLinear)
        assert [len(getattr(model, n).cores) for n in ("one", "two", "three", "four")] == [1, 2, 3, 4]
        assert isinstance(model.head, torch.nn.Linear)
        torch.testing.assert_close(model.scale, mk.mlp().scale, rtol=0, atol=0)


def test_conv_layers_keep_their_geometry():
    model = load_compressed(_skeleton("conv"), ROOT / "conv")
    modes = {i: m.padding_mode for i, m in enumerate(model) if isinstance(m, TuckerConv2d)}
    assert modes == {0: "reflect", 2: "zeros", 3: "circular", 5: "zeros", 7: "zeros"}
    assert (model[2].stride, model[2].padding, model[2].dilation) == ((2, 1), (1, 0), (1, 2))
    assert model[3].padding == "same" and model[5].padding == "valid" and model[2].bias is None
    assert type(model[6]) is torch.nn.Conv2d and model[6].groups == 3  # grouped: saved dense


@pytest.mark.parametrize("how", ["meta device", "to meta, ties lost"])
def test_gpt2_ties_survive_every_skeleton(how):
    transformers = pytest.importorskip("transformers")
    if how == "meta device":
        skeleton = _skeleton("gpt2", meta=True)
    else:  # as accelerate's init_empty_weights: every parameter replaced on its own
        skeleton = transformers.GPT2LMHeadModel(mk.gpt2_config()).to("meta")
        assert skeleton.lm_head.weight is not skeleton.transformer.wte.weight
    model = load_compressed(skeleton, ROOT / "gpt2")
    assert model.lm_head.weight is model.transformer.wte.weight
    io = _io("gpt2")
    assert_close_rel(_run("gpt2", model, io["input"]), io["expected"], tolerance(torch.float32), how)


@pytest.mark.parametrize("meta", [False, True])
def test_gpt2_base_checkpoint_loads_into_the_causal_lm(meta):
    """What `tnk compress` writes (the base model) loads into GPT2LMHeadModel, whose head is tied to the loaded wte:
    the logits are the gpt2 fixture's (both fixtures come from the same model)."""
    transformers = pytest.importorskip("transformers")
    if meta:
        with torch.device("meta"):
            skeleton = transformers.GPT2LMHeadModel(mk.gpt2_config())
    else:
        skeleton = mk.gpt2()
    model = load_compressed(skeleton, ROOT / "gpt2_base")
    assert isinstance(model.transformer.h[0].mlp.c_fc, MPOLinear)
    io = _io("gpt2")
    assert_close_rel(_run("gpt2", model, io["input"]), io["expected"], tolerance(torch.float32), "base into LM")


def test_pre_padding_mode_checkpoint():
    """Written before padding_mode and buffers.safetensors existed (commit a9c7c7e): convs read as zeros padding;
    a meta skeleton cannot get the non-persistent buffer from it, which the error names, and loads once that
    buffer is built on a real device."""
    path = ROOT / "pre_padding_mode"
    assert "padding_mode" not in json.dumps(_spec(path)) and not (path / "buffers.safetensors").exists()
    model = load_compressed(_skeleton("pre_padding_mode"), path)
    convs = [m for m in model.modules() if isinstance(m, TuckerConv2d)]
    assert len(convs) == 3 and {m.padding_mode for m in convs} == {"zeros"}
    with pytest.raises(ValueError, match=r"meta-device skeleton have no value.*scale"):
        load_compressed(_skeleton("pre_padding_mode", meta=True), path)
    skeleton = _skeleton("pre_padding_mode", meta=True)
    skeleton.scale = mk.pre_padding_mode().scale
    io = _io("pre_padding_mode")
    got = _run("pre_padding_mode", load_compressed(skeleton, path), io["input"])
    assert_close_rel(got, io["expected"], tolerance(torch.float32), "meta skeleton, buffer built for real")


def test_a_newer_format_version_is_refused_by_name(tmp_path):
    shutil.copytree(ROOT / "mlp", tmp_path / "ckpt")
    spec = _spec(tmp_path / "ckpt")
    spec["format_version"] += 1
    (tmp_path / "ckpt" / "spec.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match=r"format version 2; this tnkernels reads up to 1; upgrade tnkernels"):
        load_compressed(_skeleton("mlp"), tmp_path / "ckpt")


def test_a_layer_pruned_or_parametrized_is_refused_at_save(tmp_path):
    """torch.nn.utils.prune and parametrize replace `<p>` in the state by `<p>_orig` + `<p>_mask` or
    `parametrizations.<p>.original`, which load_compressed's freshly built layers do not have: save_compressed wrote
    such checkpoints and load_compressed refused every one of them as "another model" (before 2026-12-02). Saving
    now names the layer and the call that makes the change permanent, after which the checkpoint loads."""
    from torch.nn.utils import parametrize, prune

    model = load_compressed(_skeleton("conv"), ROOT / "conv")
    prune.l1_unstructured(model[10].cores, name="0", amount=0.5)
    parametrize.register_parametrization(model[2], "core", torch.nn.Identity())
    fix = r"remove_parametrizations\(model.get_submodule\('2'\), 'core', leave_parametrized=True\)"
    with pytest.raises(ValueError, match=r"'2' is parametrized .*" + fix):
        save_compressed(model, tmp_path / "ckpt")
    parametrize.remove_parametrizations(model[2], "core", leave_parametrized=True)
    fix = r"prune.remove\(model.get_submodule\('10.cores'\), '0'\)"
    with pytest.raises(ValueError, match=r"'10.cores' is pruned .*" + fix):
        save_compressed(model, tmp_path / "ckpt")
    prune.remove(model[10].cores, "0")
    assert not (tmp_path / "ckpt").exists()
    save_compressed(model, tmp_path / "ckpt")
    x = _io("conv")["input"]
    again = load_compressed(_skeleton("conv"), tmp_path / "ckpt")
    assert (again[10].cores[0] == 0).sum() >= again[10].cores[0].numel() // 2  # the pruned values
    assert torch.equal(_run("conv", again, x), _run("conv", model, x))


# ------------------------------------------------------------------------------------------ pickled models
def _globals(path: Path) -> set[str]:
    """The 'module name' pairs the pickle refers to (what torch.load imports)."""
    with zipfile.ZipFile(path) as z:
        data = z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))
    ops, found = list(pickletools.genops(data)), set()
    for i, (op, arg, _) in enumerate(ops):
        if op.name == "GLOBAL":
            found.add(arg)
        elif op.name == "STACK_GLOBAL":
            found.add(f"{ops[i - 2][1]} {ops[i - 1][1]}")
    return found


@pytest.mark.parametrize("name", PICKLED)
def test_a_pickled_model_loads_and_runs(name):
    path = ROOT / name / "model.pt"
    ours = {g for g in _globals(path) if g.startswith("tnkernels")}
    assert ours <= FROZEN_CLASS_PATHS
    if name == "pickled":
        assert ours == FROZEN_CLASS_PATHS  # the fixture refers to every frozen class
    for ref in ours:
        module, attr = ref.split(" ")
        assert isinstance(getattr(importlib.import_module(module), attr), type), ref
    model = torch.load(path, weights_only=False)
    kinds = [type(m) for m in model if isinstance(m, (MPOLinear, TuckerConv2d))]
    assert kinds == ([TuckerConv2d, MPOLinear] if name == "pickled" else [TuckerConv2d, TuckerConv2d, MPOLinear])
    assert model[0].padding_mode == ("reflect" if name == "pickled" else "zeros")  # old state: no padding_mode
    io = _io(name)
    x = io["input"].requires_grad_()
    y = model(x)
    assert_close_rel(y, io["expected"], tolerance(torch.float32), name)
    y.square().sum().backward()  # and it trains
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    if name == "pickled":  # the save_pretrained guard, bound to the loaded model
        assert model.save_pretrained.model is model


def test_an_old_pickled_model_migrates_to_save_compressed(tmp_path):
    model = torch.load(ROOT / "pickled_pre_padding_mode" / "model.pt", weights_only=False).eval()
    save_compressed(model, tmp_path / "ckpt")
    assert _spec(tmp_path / "ckpt")["layers"]["0"]["padding_mode"] == "zeros"
    again = load_compressed(mk.pickled_old_sequential().eval(), tmp_path / "ckpt")
    x = _io("pickled_pre_padding_mode")["input"]
    with torch.no_grad():
        assert torch.equal(again(x), model(x))
