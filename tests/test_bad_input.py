"""Bad input at the public entry points: a clear error naming the function or layer and the argument (not a bare
Python / torch error from deep inside, nor a silently different result), and nothing of the user's deleted."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import tnkernels as tk
from distill.calib import check_calib_loader
from distill.train_slice import SliceTrainConfig

LIN = nn.Linear(8, 12)
CONV = nn.Conv2d(4, 6, 3, padding=1)
MPO = tk.MPOLinear.from_linear(LIN, in_modes=(2, 4), out_modes=(3, 4), max_bond=4)
TUCKER = tk.TuckerConv2d.from_conv(CONV, ranks=(3, 2))
W = LIN.weight.detach()


def _mpo(**kw):
    return tk.MPOLinear(8, 12, **{"in_modes": (2, 4), "out_modes": (3, 4), "bonds": (4,), **kw})


def _tucker(**kw):
    return tk.TuckerConv2d(4, 6, kw.pop("kernel_size", 3), **{"ranks": (3, 2), **kw})


def _cores():
    return [g.detach() for g in MPO.cores]


def _tucker_factors():
    return TUCKER.u_in.detach(), TUCKER.core.detach(), TUCKER.u_out.detach()


# (call, exception type, text the message must contain)
CASES = {
    "MPOLinear bonds float": (lambda: _mpo(bonds=(2.5,)), ValueError, "MPOLinear: bonds"),
    "MPOLinear in_modes int": (lambda: _mpo(in_modes=8), ValueError, "MPOLinear: in_modes"),
    "MPOLinear bonds None": (lambda: _mpo(bonds=None), ValueError, "MPOLinear: bonds"),
    "MPOLinear negative modes": (lambda: _mpo(in_modes=(-2, -4)), ValueError, "MPOLinear: in_modes"),
    "MPOLinear backend typo": (lambda: _mpo(backend="cuda"), ValueError, "MPOLinear: backend"),
    "MPOLinear x list": (lambda: MPO([0.0] * 8), TypeError, "MPOLinear: input must be a torch.Tensor"),
    "MPOLinear.explain rows str": (lambda: MPO.explain("8"), ValueError, "rows must be an int"),
    "MPOLinear.explain rows float": (lambda: MPO.explain(2.5), ValueError, "rows must be an int"),
    "from_linear max_bond float": (
        lambda: tk.MPOLinear.from_linear(LIN, max_bond=2.5), ValueError, "max_bond must be a positive int",
    ),
    "from_linear num_cores 0": (lambda: tk.MPOLinear.from_linear(LIN, num_cores=0), ValueError, "num_cores"),
    "from_linear num_cores True": (lambda: tk.MPOLinear.from_linear(LIN, num_cores=True), ValueError, "num_cores"),
    "from_linear in_modes int": (
        lambda: tk.MPOLinear.from_linear(LIN, in_modes=8, out_modes=12), ValueError, "in_modes",
    ),
    "from_linear backend typo": (
        lambda: tk.MPOLinear.from_linear(LIN, ratio=2, backend="cuda"), ValueError, "backend must be one of",
    ),
    "mpo_linear x list": (lambda: tk.mpo_linear([[0.0] * 8], _cores()), TypeError, "mpo_linear: x"),
    "mpo_linear bias list": (lambda: tk.mpo_linear(torch.randn(2, 8), _cores(), [0.0] * 12), ValueError, "bias"),
    "mpo_decompose weight list": (lambda: tk.mpo_decompose(W.tolist(), (2, 4), (3, 4)), TypeError, "weight"),
    "mpo_decompose modes int": (lambda: tk.mpo_decompose(W, 8, 12), ValueError, "mpo_decompose: in_modes"),
    "mpo_decompose max_bond float": (
        lambda: tk.mpo_decompose(W, (2, 4), (3, 4), max_bond=2.5), ValueError, "mpo_decompose: max_bond",
    ),
    "tucker_decompose ranks int": (
        lambda: tk.tucker_decompose(CONV.weight, 4), ValueError, "tucker_decompose: ranks",
    ),
    "TuckerConv2d ranks 3": (lambda: _tucker(ranks=(3, 2, 2)), ValueError, "TuckerConv2d: ranks"),
    "TuckerConv2d ranks int": (lambda: _tucker(ranks=4), ValueError, "TuckerConv2d: ranks"),
    "TuckerConv2d ranks float": (lambda: _tucker(ranks=(2.7, 2)), ValueError, "TuckerConv2d: ranks"),
    "TuckerConv2d kernel 0": (lambda: _tucker(kernel_size=0), ValueError, "TuckerConv2d: kernel_size"),
    "TuckerConv2d kernel -1": (lambda: _tucker(kernel_size=-1), ValueError, "TuckerConv2d: kernel_size"),
    "TuckerConv2d stride 0": (lambda: _tucker(stride=0), ValueError, "TuckerConv2d: stride"),
    "TuckerConv2d dilation 0": (lambda: _tucker(dilation=0), ValueError, "TuckerConv2d: dilation"),
    "TuckerConv2d padding -1": (lambda: _tucker(padding=-1), ValueError, "TuckerConv2d: padding"),
    "TuckerConv2d padding str": (lambda: _tucker(padding="full"), ValueError, "TuckerConv2d: padding"),
    "TuckerConv2d same strided": (lambda: _tucker(padding="same", stride=2), ValueError, "padding='same'"),
    "TuckerConv2d backend typo": (lambda: _tucker(backend="cuda"), ValueError, "TuckerConv2d: backend"),
    "TuckerConv2d x list": (lambda: TUCKER([[[0.0]]]), TypeError, "TuckerConv2d: input must be a torch.Tensor"),
    "TuckerConv2d.explain 3 dims": (lambda: TUCKER.explain((1, 4, 5)), ValueError, "input_shape"),
    "from_conv ranks int": (lambda: tk.TuckerConv2d.from_conv(CONV, ranks=4), ValueError, "ranks"),
    "from_conv backend typo": (
        lambda: tk.TuckerConv2d.from_conv(CONV, ratio=2, backend="cuda"), ValueError, "backend must be one of",
    ),
    "tucker_conv2d stride 0": (
        lambda: tk.tucker_conv2d(torch.randn(1, 4, 5, 5), *_tucker_factors(), stride=0), ValueError, "stride",
    ),
    "tucker_conv2d padding -1": (
        lambda: tk.tucker_conv2d(torch.randn(1, 4, 5, 5), *_tucker_factors(), padding=-1), ValueError, "padding",
    ),
    "tucker_conv2d dilation 0": (
        lambda: tk.tucker_conv2d(torch.randn(1, 4, 5, 5), *_tucker_factors(), dilation=0), ValueError, "dilation",
    ),
    "tucker_conv2d x list": (
        lambda: tk.tucker_conv2d([[0.0]], *_tucker_factors()), TypeError, "tucker_conv2d: x",
    ),
    "tucker_conv2d factor dtypes": (
        lambda: tk.tucker_conv2d(torch.randn(1, 4, 5, 5), _tucker_factors()[0].double(), *_tucker_factors()[1:]),
        ValueError, "share one dtype",
    ),
    "explain rows str": (lambda: tk.explain(_cores(), "8"), ValueError, "explain: rows"),
    "explain bond mismatch": (lambda: tk.explain([(1, 2, 3, 4), (5, 4, 4, 1)], 8), ValueError, "bond mismatch"),
    "explain boundary": (lambda: tk.explain([(2, 2, 3, 4), (4, 4, 4, 1)], 8), ValueError, "boundary"),
    "explain zero dim": (lambda: tk.explain([(1, 0, 3, 4), (4, 4, 4, 1)], 8), ValueError, "explain"),
    "recalibrate int dtype": (lambda: tk.plan.recalibrate(dtype=torch.int32), ValueError, "floating dtype"),
    "tensorize model dict": (lambda: tk.tensorize({"fc": LIN}, ratio=2), TypeError, "tensorize: model"),
    "tensorize rules list": (lambda: tk.tensorize(nn.Sequential(nn.Linear(8, 8)), rules=["0"]), TypeError, "rules"),
    "tensorize rule ranks int": (
        lambda: tk.tensorize(nn.Sequential(nn.Conv2d(4, 6, 3)), rules={"0": {"ranks": 4}}), ValueError, "ranks",
    ),
    "tensorize num_cores 0": (
        lambda: tk.tensorize(nn.Sequential(nn.Linear(32, 64)), ratio=2, num_cores=0), ValueError, "num_cores",
    ),
    "tensorize backend typo": (
        lambda: tk.tensorize(nn.Sequential(nn.Linear(32, 64)), ratio=2, backend="cuda"), ValueError, "backend",
    ),
    "save_compressed model dict": (lambda: tk.save_compressed({}, "unused"), TypeError, "save_compressed: model"),
    "load_compressed model class": (lambda: tk.load_compressed(nn.Linear, "unused"), TypeError, "load_compressed"),
    "SliceTrainConfig lr nan": (lambda: SliceTrainConfig(lr=math.nan), ValueError, "SliceTrainConfig.lr"),
    "SliceTrainConfig lr inf": (lambda: SliceTrainConfig(lr=math.inf), ValueError, "SliceTrainConfig.lr"),
    "SliceTrainConfig lr str": (lambda: SliceTrainConfig(lr="0.1"), ValueError, "SliceTrainConfig.lr"),
    "SliceTrainConfig steps float": (
        lambda: SliceTrainConfig(max_steps=2.5), ValueError, "SliceTrainConfig.max_steps",
    ),
    "SliceTrainConfig steps str": (
        lambda: SliceTrainConfig(max_steps="100"), ValueError, "SliceTrainConfig.max_steps",
    ),
    "SliceTrainConfig batch None": (
        lambda: SliceTrainConfig(batch_size=None), ValueError, "SliceTrainConfig.batch_size",
    ),
    "SliceTrainConfig weight_decay": (
        lambda: SliceTrainConfig(weight_decay=-1), ValueError, "SliceTrainConfig.weight_decay",
    ),
    "SliceTrainConfig min_delta": (lambda: SliceTrainConfig(min_delta=-1), ValueError, "SliceTrainConfig.min_delta"),
    "SliceTrainConfig time budget": (
        lambda: SliceTrainConfig(time_budget_s=-5), ValueError, "SliceTrainConfig.time_budget_s",
    ),
    "calib empty": (lambda: check_calib_loader([], mode="parallel", n_slices=1), ValueError, "no batches"),
    "calib None": (lambda: check_calib_loader(None, mode="parallel", n_slices=1), TypeError, "calib_loader"),
}  # fmt: skip


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_refused_clearly(name):
    call, exc_type, text = CASES[name]
    with pytest.raises(exc_type, match=None) as info:
        call()
    assert text in str(info.value), str(info.value)


@pytest.mark.parametrize(
    "kw", [{"recompute": "no"}, {"cache_dense": "false"}, {"fold": "no"}, {"recompute": 1}], ids=str
)
def test_plan_options_refuse_non_bools(kw):
    before = (tk.plan.OPTIONS.recompute, tk.plan.OPTIONS.cache_dense, tk.plan.OPTIONS.fold)
    with pytest.raises(ValueError, match=f"plan options: {next(iter(kw))} must be True, False or None"):
        with tk.plan.options(**kw):
            pass
    assert (tk.plan.OPTIONS.recompute, tk.plan.OPTIONS.cache_dense, tk.plan.OPTIONS.fold) == before


def _compressed() -> nn.Module:
    model = nn.Sequential(nn.Linear(32, 64))
    tk.tensorize(model, ratio=2)
    return model


def test_save_compressed_refuses_to_replace_a_directory_that_is_not_a_checkpoint(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / "train.py").write_text("keep me")
    with pytest.raises(ValueError, match="save_compressed: path .* not a tnkernels checkpoint"):
        tk.save_compressed(_compressed(), project)
    assert (project / "train.py").read_text() == "keep me"


def test_save_compressed_refuses_to_replace_a_file(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    with pytest.raises(ValueError, match="save_compressed: path .* is a file"):
        tk.save_compressed(_compressed(), notes)
    assert notes.read_text() == "keep me"


def test_save_compressed_still_replaces_a_checkpoint_and_fills_an_empty_dir(tmp_path):
    (tmp_path / "empty").mkdir()
    for path in (tmp_path / "empty", tmp_path / "ck", tmp_path / "ck"):  # the second "ck" replaces the first
        tk.save_compressed(_compressed(), path)
        tk.load_compressed(nn.Sequential(nn.Linear(32, 64)), path)


def test_valid_edge_inputs_still_work():
    assert MPO(torch.randn(0, 8)).shape == (0, 12)  # an empty batch
    assert MPO(torch.randn(8)).shape == (12,)  # one unbatched row
    assert TUCKER(torch.randn(0, 4, 5, 5)).shape == (0, 6, 5, 5)
    import numpy as np

    layer = tk.MPOLinear.from_linear(LIN, in_modes=(2, 4), out_modes=(3, 4), max_bond=np.int64(2))
    assert layer.bonds == (2,)
    assert tk.TuckerConv2d.from_conv(CONV, ranks=[np.int64(3), 2]).ranks == (3, 2)
    assert tk.mpo_decompose(W, [np.int64(2), 4], (3, 4), max_bond=[np.int64(3)])[0].shape[3] == 3


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: tk.mpo_to_dense([]), "mpo_to_dense: needs at least one core"),
        (lambda: tk.mpo_to_dense([torch.randn(1, 2, 3, 2), torch.randn(3, 2, 3, 1)]), "mpo_to_dense: bond mismatch"),
        (lambda: tk.mpo_to_dense([torch.randn(2, 3)]), "mpo_to_dense: core 0 must be 4-D"),
        (
            lambda: tk.tucker_to_dense(torch.randn(6, 3), torch.randn(3, 2, 3, 3), torch.randn(4, 5)),
            "tucker_to_dense: ranks disagree",
        ),
        (
            lambda: tk.tucker_to_dense(torch.randn(6, 3), torch.randn(3, 2), torch.randn(4, 2)),
            r"tucker_to_dense: expected u_in \[C_in, R_in\]",
        ),
    ],
)
def test_dense_rebuilds_name_what_does_not_fit(call, message):
    # These raised IndexError, a reshape error or an einsum error from inside the contraction.
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize("needs_grad", [False, True])
@pytest.mark.parametrize("modes", [((2, 4), (3, 4)), ((8, 1), (1, 12))], ids=["chain", "low_rank"])
def test_mpo_linear_bias_of_another_dtype_is_refused(modes, needs_grad):
    """With autograd the float64 bias promoted the output to float64; without it, or on the other paths, the
    error came from inside a backend ("self and mat2 must have the same dtype")."""
    from tnkernels.decompose import mpo_decompose
    from tnkernels.ops import mpo_linear

    cores = mpo_decompose(torch.randn(12, 8), *modes)
    x = torch.randn(5, 8, requires_grad=needs_grad)
    with pytest.raises(ValueError, match=r"mpo_linear: bias is torch.float64 but the weights are torch.float32"):
        mpo_linear(x, cores, torch.zeros(12, dtype=torch.float64))


def test_tucker_conv2d_bias_of_another_dtype_is_refused():
    from tnkernels.ops import tucker_conv2d

    x = torch.randn(2, 4, 5, 5)
    with pytest.raises(ValueError, match=r"tucker_conv2d: bias is torch.float64 but the weights are torch.float32"):
        tucker_conv2d(
            x, torch.randn(4, 2), torch.randn(3, 2, 3, 3), torch.randn(6, 3), torch.zeros(6, dtype=torch.float64)
        )
