"""MPOLinear and TuckerConv2d against the dense layers they replace: outputs, gradients, state, conversions."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.helpers import assert_close_rel, tolerance
from tnkernels import MPOLinear, TuckerConv2d, mpo_linear, mpo_to_dense, tucker_to_dense


def _linear(in_f, out_f, dtype=torch.float64, bias=True):
    lin = nn.Linear(in_f, out_f, bias=bias, dtype=dtype)
    with torch.no_grad():
        lin.weight.normal_()
    return lin


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "in_f,out_f,kwargs",
    [
        (24, 30, {"num_cores": 3}),
        (35, 12, {"in_modes": (5, 7), "out_modes": (4, 3)}),
        (16, 16, {}),
        (7, 10, {"num_cores": 1}),
    ],
)
def test_mpo_linear_full_rank_equals_dense(dtype, in_f, out_f, kwargs):
    lin = _linear(in_f, out_f, dtype)
    layer = MPOLinear.from_linear(lin, **kwargs)
    x = torch.randn(3, 2, in_f, dtype=dtype)  # several leading dims
    assert_close_rel(layer(x), lin(x), 1e-10 if dtype == torch.float64 else 1e-5, "output")
    assert_close_rel(layer.to_dense(), lin.weight, 1e-10 if dtype == torch.float64 else 1e-5, "to_dense")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_mpo_linear_low_precision_forward(dtype):
    lin = _linear(24, 30, torch.float32)
    layer = MPOLinear.from_linear(lin, num_cores=3, max_bond=4)
    x = torch.randn(5, 24)
    expected = F.linear(x.double(), mpo_to_dense([g.double() for g in layer.cores]), layer.bias.double())
    out = layer.to(dtype)(x.to(dtype))
    assert out.dtype == dtype
    assert_close_rel(out, expected, tolerance(dtype), "low-precision output")


@pytest.mark.parametrize("bias", [True, False])
def test_mpo_linear_gradients_match_dense_reference(bias):
    torch.manual_seed(1)
    lin = _linear(12, 20, bias=bias)
    layer = MPOLinear.from_linear(lin, in_modes=(2, 3, 2), out_modes=(5, 2, 2), max_bond=3)
    x = torch.randn(4, 3, 12, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(4, 3, 20, dtype=torch.float64)
    layer(x).backward(grad_out)

    cores = [g.detach().clone().requires_grad_() for g in layer.cores]
    b = layer.bias.detach().clone().requires_grad_() if bias else None
    x_ref = x.detach().clone().requires_grad_()
    F.linear(x_ref, mpo_to_dense(cores), b).backward(grad_out)
    assert_close_rel(x.grad, x_ref.grad, 1e-10, "grad x")
    for k, (g, ref) in enumerate(zip(layer.cores, cores)):
        assert_close_rel(g.grad, ref.grad, 1e-10, f"grad core {k}")
    if bias:
        assert_close_rel(layer.bias.grad, b.grad, 1e-10, "grad bias")


def test_mpo_linear_state_dict_round_trip_and_repr():
    layer = MPOLinear.from_linear(_linear(24, 30, torch.float32), num_cores=3, ratio=2)
    fresh = MPOLinear(24, 30, in_modes=layer.in_modes, out_modes=layer.out_modes, bonds=layer.bonds)
    fresh.load_state_dict(layer.state_dict())
    x = torch.randn(2, 24)
    assert torch.equal(fresh(x), layer(x))
    assert set(layer.state_dict()) == {"cores.0", "cores.1", "cores.2", "bias"}
    text = repr(layer)
    assert "in_modes=(4, 3, 2)" in text and "bonds=" in text and "ratio=" in text
    assert layer.compression_ratio >= 2


def test_mpo_linear_to_linear():
    layer = MPOLinear.from_linear(_linear(16, 8, torch.float32), max_bond=2)
    lin = layer.to_linear()
    x = torch.randn(3, 16)
    assert_close_rel(lin(x), layer(x), 1e-5, "to_linear")


def test_gpt2_conv1d_converts_correctly():
    transformers = pytest.importorskip("transformers")
    conv1d = transformers.pytorch_utils.Conv1D(30, 24)  # nf=30 outputs, nx=24 inputs; weight stored [24, 30]
    with torch.no_grad():
        conv1d.weight.normal_()
        conv1d.bias.normal_()
    layer = MPOLinear.from_linear(conv1d, num_cores=2)
    x = torch.randn(2, 5, 24)
    assert (layer.in_features, layer.out_features) == (24, 30)
    assert_close_rel(layer(x), conv1d(x), 1e-5, "Conv1D")
    assert_close_rel(layer.to_dense(), conv1d.weight.t(), 1e-5, "Conv1D weight")


def test_mpo_random_init_has_linear_like_scale():
    layer = MPOLinear(256, 256, in_modes=(16, 16), out_modes=(16, 16), bonds=(32,))
    ref = nn.Linear(256, 256)
    ratio = layer.to_dense().std() / ref.weight.std()
    assert 0.7 < ratio.item() < 1.4


def test_mpo_bad_input():
    lin = _linear(12, 8, torch.float32)
    with pytest.raises(ValueError, match="in_modes .* multiply to 9"):
        MPOLinear.from_linear(lin, in_modes=(3, 3), out_modes=(2, 4))
    with pytest.raises(ValueError, match="must be > 1"):
        MPOLinear.from_linear(lin, ratio=0.5)
    with pytest.raises(ValueError, match="cannot be reached"):
        MPOLinear.from_linear(lin, ratio=1000)
    with pytest.raises(ValueError, match="max_bond must be a positive int"):
        MPOLinear.from_linear(lin, max_bond=0)
    with torch.no_grad():
        lin.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        MPOLinear.from_linear(lin)
    layer = MPOLinear(12, 8, in_modes=(3, 4), out_modes=(2, 4), bonds=(2,))
    with pytest.raises(ValueError, match="MPOLinear: input has 10 features .* in_features=12"):
        layer(torch.randn(2, 10))
    with pytest.raises(ValueError, match="MPOLinear: input has 0 features"):
        layer(torch.tensor(1.0))
    layer(torch.randn(2, 12))  # the forward checks the cores once and then trusts them, until they change:
    layer.cores[1] = nn.Parameter(torch.randn(3, 4, 2, 1))  # bond 3 against core 0's 2
    with pytest.raises(ValueError, match="MPOLinear: bond mismatch"):
        layer(torch.randn(2, 12))
    layer.cores[0] = nn.Parameter(torch.randn(1, 3, 2, 3))
    layer.cores[1] = nn.Parameter(torch.randn(3, 5, 2, 1))  # a valid chain, but of 15 inputs
    with pytest.raises(ValueError, match="the cores map 15 -> 4 features .* in_features=12"):
        layer(torch.randn(2, 12))


def test_input_dtype_errors_name_the_layer_and_the_fix():
    layer = MPOLinear(12, 8, in_modes=(3, 4), out_modes=(2, 4), bonds=(2,))
    with pytest.raises(ValueError, match=r"MPOLinear: input is torch.float64 but the weights are torch.float32.*"):
        layer(torch.randn(2, 12, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"MPOLinear: input has dtype torch.int64; it must be floating point"):
        layer(torch.ones(2, 12, dtype=torch.long))
    with pytest.raises(ValueError, match=r"mpo_linear: input is torch.float16"):
        mpo_linear(torch.randn(2, 12).half(), list(layer.cores))
    conv = TuckerConv2d(4, 6, 3, ranks=(2, 2))
    with pytest.raises(ValueError, match=r"tucker_conv2d: input is torch.float64 but the weights are torch.float32"):
        conv(torch.randn(1, 4, 5, 5, dtype=torch.float64))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts float32 weights to the input's bf16
        assert layer(torch.randn(2, 12, dtype=torch.bfloat16)).dtype == torch.bfloat16
        with pytest.raises(ValueError, match=r"float64 but the weights are torch.float32 \(under autocast"):
            layer(torch.randn(2, 12, dtype=torch.float64))  # nn.Linear fails here too: float64 is not cast


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_empty_batches_give_zero_gradients_like_dense(backend, nan_poison):
    """No rows (an MoE expert that got no tokens, a detector with no boxes): the output is empty and every
    parameter gets a zero gradient, as nn.Linear / nn.Conv2d give; None would break DDP's reduction."""
    torch.manual_seed(0)
    for kwargs in (dict(ratio=2), dict(num_cores=3, max_bond=4)):
        layer = MPOLinear.from_linear(nn.Linear(64, 96), **kwargs, backend=backend)
        x = torch.randn(2, 0, 64, requires_grad=True)
        y = layer(x)
        assert y.shape == (2, 0, 96)
        y.sum().backward()
        assert x.grad.shape == x.shape
        assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in layer.parameters())
    conv = TuckerConv2d.from_conv(nn.Conv2d(4, 6, 3, padding=1), ranks=(3, 2), backend=backend)
    x = torch.randn(0, 4, 5, 5, requires_grad=True)
    conv(x).sum().backward()
    assert x.grad.shape == x.shape
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in conv.parameters())


# ------------------------------------------------------------------------------------------------- TuckerConv2d
CONV_CASES = [
    dict(stride=1, padding=0, dilation=1),
    dict(stride=2, padding=1, dilation=1),
    dict(stride=1, padding="same", dilation=2),
    dict(stride=(2, 1), padding=(1, 2), dilation=(1, 2)),
    dict(stride=1, padding="valid", dilation=1),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", CONV_CASES)
def test_tucker_conv_full_rank_equals_conv(dtype, case):
    conv = nn.Conv2d(5, 7, 3, dtype=dtype, **case)
    layer = TuckerConv2d.from_conv(conv)
    assert (layer.stride, layer.dilation) == (conv.stride, conv.dilation)
    assert layer.padding == conv.padding
    x = torch.randn(2, 5, 9, 8, dtype=dtype)
    assert_close_rel(layer(x), conv(x), 1e-10 if dtype == torch.float64 else 1e-5, "conv output")


def test_tucker_conv_gradients_match_dense_reference():
    conv = nn.Conv2d(6, 5, (3, 2), stride=2, padding=1, dilation=(1, 2), dtype=torch.float64)
    layer = TuckerConv2d.from_conv(conv, ranks=(3, 4))
    x = torch.randn(2, 6, 9, 9, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    u_out, core, u_in, b = (
        t.detach().clone().requires_grad_() for t in (layer.u_out, layer.core, layer.u_in, layer.bias)
    )
    x_ref = x.detach().clone().requires_grad_()
    F.conv2d(x_ref, tucker_to_dense(u_out, core, u_in), b, 2, 1, (1, 2)).backward(grad_out)
    for name, got, want in [
        ("x", x.grad, x_ref.grad),
        ("u_in", layer.u_in.grad, u_in.grad),
        ("core", layer.core.grad, core.grad),
        ("u_out", layer.u_out.grad, u_out.grad),
        ("bias", layer.bias.grad, b.grad),
    ]:
        assert_close_rel(got, want, 1e-10, f"grad {name}")


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
@pytest.mark.parametrize("padding", [(2, 1), "same", "valid"])
def test_tucker_conv_padding_modes_match_nn_conv2d(mode, padding):
    """Non-zero padding modes pad the input as nn.Conv2d does ('same' with an even kernel: the odd pixel goes
    right/bottom), forward and every gradient against autograd through nn.Conv2d in float64; to_conv and
    save_compressed keep the mode."""
    conv = nn.Conv2d(3, 4, (3, 2), padding=padding, dilation=(1, 2), padding_mode=mode, dtype=torch.float64)
    layer = TuckerConv2d.from_conv(conv)  # full ranks: exactly the conv
    assert layer.padding_mode == mode and f"padding_mode='{mode}'" in repr(layer)
    x = torch.randn(2, 3, 7, 8, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    out, want = layer(x), conv(x_ref)
    assert_close_rel(out, want, 1e-10, f"{mode} {padding}")
    grad_out = torch.randn_like(want)
    out.backward(grad_out)
    want.backward(grad_out)
    assert_close_rel(x.grad, x_ref.grad, 1e-10, "grad x")
    w_grad = torch.autograd.grad(F.conv2d(F.pad(x_ref, layer._pad, mode=mode), layer.to_dense(), layer.bias, 1, 0,
                                          (1, 2)), layer.core, grad_out)[0]  # fmt: skip
    assert_close_rel(layer.core.grad, w_grad, 1e-10, "grad core")
    assert layer.to_conv().padding_mode == mode
    assert_close_rel(layer.to_conv()(x), want, 1e-10, "to_conv")


def test_tucker_conv_takes_unbatched_input_like_nn_conv2d():
    conv = nn.Conv2d(3, 5, 3, padding=1, padding_mode="reflect")
    layer = TuckerConv2d.from_conv(conv)
    x = torch.randn(3, 6, 7)
    assert layer(x).shape == conv(x).shape == (5, 6, 7)
    assert_close_rel(layer(x), conv(x), 1e-5, "unbatched")


def test_tucker_conv_pickled_before_padding_modes_still_runs():
    layer = TuckerConv2d.from_conv(nn.Conv2d(3, 4, 3, padding=1))
    state = layer.__getstate__()
    del state["padding_mode"], state["_pad"]  # what a layer pickled by an older version holds
    old = TuckerConv2d.__new__(TuckerConv2d)
    old.__setstate__(state)
    x = torch.randn(1, 3, 5, 5)
    assert old.padding_mode == "zeros" and torch.equal(old(x), layer(x))


def test_tucker_conv_state_dict_to_conv_and_repr():
    conv = nn.Conv2d(8, 16, 3, padding=1, bias=False)
    layer = TuckerConv2d.from_conv(conv, ratio=3)
    assert layer.compression_ratio >= 3 and layer.bias is None
    fresh = TuckerConv2d(8, 16, 3, ranks=layer.ranks, padding=1, bias=False)
    fresh.load_state_dict(layer.state_dict())
    x = torch.randn(1, 8, 6, 6)
    assert torch.equal(fresh(x), layer(x))
    assert_close_rel(layer.to_conv()(x), layer(x), 1e-5, "to_conv")
    assert "ranks=" in repr(layer) and "ratio=" in repr(layer)


def test_tucker_conv_bad_input():
    with pytest.raises(ValueError, match="groups=2"):
        TuckerConv2d.from_conv(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match="only one of ranks, ratio or rel_tol"):
        TuckerConv2d.from_conv(nn.Conv2d(4, 4, 3), ranks=(2, 2), ratio=2)
    with pytest.raises(ValueError, match="padding_mode must be one of"):
        TuckerConv2d(4, 4, 3, ranks=(2, 2), padding_mode="mirror")
    with pytest.raises(ValueError, match="must be > 1"):
        TuckerConv2d.from_conv(nn.Conv2d(4, 4, 3), ratio=1)
    conv = nn.Conv2d(4, 4, 3)
    with torch.no_grad():
        conv.weight[0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        TuckerConv2d.from_conv(conv)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(reentrant):
    """torch.utils.checkpoint re-runs the layers' forward during backward (HF's gradient_checkpointing_enable)."""
    from torch.utils.checkpoint import checkpoint

    mpo = MPOLinear.from_linear(nn.Linear(24, 30, dtype=torch.float64), in_modes=(2, 3, 4), out_modes=(3, 5, 2))
    low_rank = MPOLinear.from_linear(nn.Linear(30, 24, dtype=torch.float64), ratio=2)
    tucker = TuckerConv2d.from_conv(nn.Conv2d(3, 4, 3, padding=1, dtype=torch.float64), ranks=(2, 2))
    params = [*mpo.parameters(), *low_rank.parameters(), *tucker.parameters()]

    def f(x, img):
        return low_rank(torch.tanh(mpo(x))).square().sum() + tucker(img).square().sum()

    x = torch.randn(5, 24, dtype=torch.float64, requires_grad=True)
    img = torch.randn(2, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    want = torch.autograd.grad(f(x, img), [x, img, *params])
    checkpoint(f, x, img, use_reentrant=reentrant).backward()
    for k, (t, w) in enumerate(zip([x, img, *params], want, strict=True)):
        assert_close_rel(t.grad, w, 1e-12, f"leaf {k}")


@pytest.mark.parametrize("cpp", [False, True])
def test_gradients_arrive_in_their_parameters_layout(cpp, monkeypatch):
    """The gradient layout contract: a backward returns each gradient with its parameter's strides (autograd copies
    one that does not, and DistributedDataParallel warns about it at every bucket). The low-rank dA at many rows
    (computed transposed) and Tucker's U_in gradient came back as transposed views."""
    from tnkernels.ops.mpo import torch_low_rank
    from tnkernels.plan import options

    if cpp and not torch_low_rank._HAS_CPP:
        pytest.skip("native extension not built")
    monkeypatch.setattr(torch_low_rank, "cpp_enabled", cpp)
    low_rank = MPOLinear.from_linear(nn.Linear(64, 48), ratio=2)  # rank 13: past the native thin kernels
    chain = MPOLinear.from_linear(nn.Linear(24, 30), in_modes=(2, 3, 4), out_modes=(3, 5, 2), max_bond=3)
    tucker = TuckerConv2d.from_conv(nn.Conv2d(6, 8, 3, padding=1), ranks=(4, 3))
    seen = []
    for layer in (low_rank, chain, tucker):
        for p in layer.parameters():
            p.register_hook(lambda g, p=p: seen.append((tuple(p.shape), g.stride(), p.stride())))
    for rows in (1, 64, 1024):  # the transposed dA wins from max(128, 6 * rank) rows (fixed bounds in tests)
        low_rank(torch.randn(rows, 64)).sum().backward()
        chain(torch.randn(rows, 24)).sum().backward()
    for kind in ("three-convs", "fold-in", "fold-out", "dense"):
        with options(tucker_force=kind):
            tucker(torch.randn(2, 6, 5, 5)).sum().backward()
    bad = [s for s in seen if s[1] != s[2]]
    assert seen and not bad, bad
