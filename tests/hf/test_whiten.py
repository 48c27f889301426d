"""Data-aware (activation-whitened) low-rank initialisation of a slice's layers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from distill.hf.capture import capture_features, load_slice_features
from distill.hf.models import family_of
from distill.hf.presets import ATTENTION_PATTERNS, resolve, run_hf_slice, slice_specs
from distill.hf.train import evaluate_slice, tensorize_slice
from distill.hf.whiten import whitened_lowrank
from tests.hf.conftest import tiny_model
from tests.hf.test_presets_capture import padded_batches
from tnkernels.nn.mpo_linear import MPOLinear


def _anisotropic_inputs(n: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(1, -2, d)  # a few directions carry most of the energy, as in real activations
    basis = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]
    return (torch.randn(n, d, generator=g, dtype=torch.float64) * scales) @ basis.T


def test_whitened_beats_plain_svd_on_the_data_at_the_same_size():
    torch.manual_seed(0)
    lin = nn.Linear(48, 64).double()
    x = _anisotropic_inputs(2000, 48)
    plain = MPOLinear.from_linear(lin, in_modes=(48, 1), out_modes=(1, 64), ratio=3.0)
    white = whitened_lowrank(lin, x.T @ x, len(x), ratio=3.0)
    assert white.num_weight_params == plain.num_weight_params
    assert white.in_modes == (48, 1) and white.out_modes == (1, 64)
    with torch.no_grad():
        want = lin(x)
        err_plain = (plain(x) - want).norm() / want.norm()
        err_white = (white(x) - want).norm() / want.norm()
    assert err_white < 0.5 * err_plain, (err_white, err_plain)


def test_whitened_is_exact_on_inputs_of_lower_rank_than_the_bond_and_conv1d_transpose_is_right():
    """Inputs living in a 6-dim subspace: a bond-8 whitened factorization reproduces the layer on them exactly
    (a plain SVD would not), and a Conv1D (weight stored [in, out]) comes out the right way round."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(24, 16).double()  # nx=16 inputs, nf=24 outputs
    nn.init.normal_(conv.weight)
    x = torch.randn(500, 6, dtype=torch.float64) @ torch.randn(6, 16, dtype=torch.float64)
    white = whitened_lowrank(conv, x.T @ x, len(x), ratio=1.2, damp=1e-12)
    plain = MPOLinear.from_linear(conv, in_modes=(16, 1), out_modes=(1, 24), ratio=1.2)
    assert white.bonds == plain.bonds == (8,)
    with torch.no_grad():
        want = conv(x)
        torch.testing.assert_close(white(x), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
        assert (plain(x) - want).norm() > 1e-2 * want.norm()


def test_whitened_slice_init_is_more_accurate_than_plain(family, tmp_path):
    model = tiny_model(family)
    spec = slice_specs(model, "mlp", layers=[1])[0]
    capture_features(model, [spec], padded_batches(family, n_batches=3), tmp_path, progress=False)
    data = load_slice_features(tmp_path, spec.name)
    kw = dict(ratio=2.0, attention=False, attention_patterns=ATTENTION_PATTERNS[family_of(model)])
    plain, _ = tensorize_slice(resolve(model, spec), init="plain", **kw)
    white, report = tensorize_slice(resolve(model, spec), init="whitened", data=data, **kw)
    ffn_layers = 3 if family == "llama" else 2  # Llama's gated FFN: gate, up and down projections
    assert len(report.tensorized) == ffn_layers and all(r.ratio >= 1.9 for r in report.tensorized)
    assert evaluate_slice(white, data) < evaluate_slice(plain, data)
    # the teacher modules are untouched
    with torch.no_grad():
        y = run_hf_slice(resolve(model, spec), data[0]["x"], data[0]["kwargs"])
    torch.testing.assert_close(y, data[0]["y"], rtol=1e-5, atol=1e-5)


def test_whitened_needs_data_and_2_cores(family):
    model = tiny_model(family)
    spec = slice_specs(model, "mlp", layers=[0])[0]
    kw = dict(ratio=2.0, attention=False, attention_patterns=ATTENTION_PATTERNS[family_of(model)])
    with pytest.raises(ValueError, match="captured batches"):
        tensorize_slice(resolve(model, spec), init="whitened", **kw)
    with pytest.raises(ValueError, match="num_cores"):
        tensorize_slice(resolve(model, spec), init="whitened", data=[{}], num_cores=3, **kw)
    with pytest.raises(ValueError, match="init="):
        tensorize_slice(resolve(model, spec), init="magic", **kw)
