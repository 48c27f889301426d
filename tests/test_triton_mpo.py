"""Triton MPO chain (interpreter on CPU): forward and every gradient against the float64 reference.

Shapes are tiny on purpose: the interpreter costs ~ms per program per loop step. Block sizes are 16 under the
interpreter, so K = r*i and N = j*r above 16 below exercise multi-tile loops and masked tails.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers import assert_close_rel, tolerance
from tnkernels.ops import mpo_linear, mpo_linear_reference
from tnkernels.ops.mpo import triton_impl

pytestmark = pytest.mark.skipif(not triton_impl.is_available()[0], reason=triton_impl.is_available()[1])


def make_cores(in_modes, out_modes, bonds, dtype=torch.float32):
    """Random cores scaled so that y has unit-order entries whatever the chain length."""
    ranks = [1, *bonds, 1]
    cores = []
    for k, (i, j) in enumerate(zip(in_modes, out_modes, strict=True)):
        g = torch.randn(ranks[k], i, j, ranks[k + 1], dtype=torch.float64) / (ranks[k] * i) ** 0.5
        cores.append(g.to(dtype))
    return cores


def check_against_reference(x, cores, bias, dtype, what):
    """Forward and grads (x, every core, bias) of the triton path vs autograd through the float64 reference."""
    leaves = [x.detach().clone().requires_grad_(), *[g.detach().clone().requires_grad_() for g in cores]]
    if bias is not None:
        leaves.append(bias.detach().clone().requires_grad_())
    y = mpo_linear(leaves[0], leaves[1 : 1 + len(cores)], leaves[-1] if bias is not None else None, backend="triton")
    assert y.dtype == dtype

    ref_leaves = [t.detach().to(torch.float64).requires_grad_() for t in leaves]
    y_ref = mpo_linear_reference(
        ref_leaves[0], ref_leaves[1 : 1 + len(cores)], ref_leaves[-1] if bias is not None else None
    )
    tol = tolerance(dtype, "triton")
    assert_close_rel(y, y_ref, tol, f"{what}: y")

    grad_y = torch.randn_like(y_ref)
    y.backward(grad_y.to(dtype))
    y_ref.backward(grad_y)
    names = ["x", *[f"core {k}" for k in range(len(cores))]] + (["bias"] if bias is not None else [])
    for name, leaf, ref in zip(names, leaves, ref_leaves, strict=True):
        assert leaf.grad is not None, f"{what}: no gradient for {name}"
        assert leaf.grad.dtype == dtype
        assert_close_rel(leaf.grad, ref.grad, tol, f"{what}: grad {name}")


CHAINS = [
    # (in_modes, out_modes, bonds, leading shape)
    ((3, 5), (2, 7), (4,), (3,)),  # two cores, odd modes
    (
        (3, 5, 7),
        (2, 3, 5),
        (6, 5),
        (2,),
    ),  # odd modes 3/5/7, K = 6*5 = 30 and N = 3*5 = 15/5*6 = 30 span tiles
    ((2, 3, 2, 2), (3, 2, 2, 2), (3, 5, 2), (1,)),  # four cores, a single row
    ((3, 5), (5, 3), (1,), (4,)),  # bond 1 (a Kronecker product)
    ((4, 3), (3, 4), (5,), (2, 3)),  # several leading dimensions
    ((6,), (5,), (), (3,)),  # a single core (a plain matrix)
]


@pytest.mark.parametrize("in_modes,out_modes,bonds,lead", CHAINS)
def test_forward_and_grads_fp32(in_modes, out_modes, bonds, lead):
    cores = make_cores(in_modes, out_modes, bonds)
    n_in = torch.Size(in_modes).numel()
    n_out = torch.Size(out_modes).numel()
    x = torch.randn(*lead, n_in)
    bias = torch.randn(n_out)
    check_against_reference(x, cores, bias, torch.float32, f"modes {in_modes}->{out_modes} bonds {bonds}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    cores = make_cores((3, 5), (4, 3), (6,), dtype)
    x = torch.randn(5, 15).to(dtype)
    bias = torch.randn(12).to(dtype)
    check_against_reference(x, cores, bias, dtype, str(dtype))


def test_no_bias_and_noncontiguous_input():
    cores = make_cores((3, 7), (5, 2), (4,))
    # A transposed input (stride 1 along rows) and a column slice: both are read through strides, not copied.
    x_t = torch.randn(21, 4).t()
    assert not x_t.is_contiguous()
    check_against_reference(x_t, cores, None, torch.float32, "transposed x")
    x_s = torch.randn(3, 42)[:, ::2]
    check_against_reference(x_s, cores, None, torch.float32, "strided x")


def test_nan_poisoned_outputs_are_fully_written(nan_poison):
    # Every torch.empty the launchers make (outputs, intermediates, gradient partials) starts as NaN.
    cores = make_cores((3, 5, 7), (2, 3, 5), (5, 4))
    x = torch.randn(3, 105)
    check_against_reference(x, cores, torch.randn(30), torch.float32, "nan-poisoned")


def test_mixed_precision_parameters_are_cast():
    # fp32 parameters with a bf16 input (as under autocast): computed in bf16, gradients reach the fp32 cores.
    cores = [g.requires_grad_() for g in make_cores((3, 5), (2, 3), (4,))]
    x = torch.randn(4, 15, dtype=torch.bfloat16)
    y = mpo_linear(x, cores, None, backend="triton")
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert all(g.grad is not None and g.grad.dtype == torch.float32 for g in cores)
    y_ref = mpo_linear_reference(x.double(), [g.detach().double() for g in cores])
    assert_close_rel(y, y_ref, tolerance(torch.bfloat16, "triton"), "bf16 x with fp32 cores")


def test_empty_batch():
    cores = make_cores((3, 5), (2, 3), (4,))
    x = torch.randn(0, 15, requires_grad=True)
    y = mpo_linear(x, cores, torch.randn(6), backend="triton")
    assert y.shape == (0, 6)
    y.sum().backward()
    assert x.grad.shape == x.shape


def test_gradcheck_fp64():
    cores = [g.requires_grad_() for g in make_cores((2, 3), (3, 2), (2,), torch.float64)]
    x = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(6, dtype=torch.float64, requires_grad=True)

    def f(x, g0, g1, b):
        return mpo_linear(x, [g0, g1], b, backend="triton")

    # fast_mode checks random projections of the Jacobian (one forward pair per input instead of one per element).
    assert torch.autograd.gradcheck(f, (x, *cores, bias), eps=1e-6, atol=1e-8, rtol=1e-6, fast_mode=True)


def test_mode_product_kernels_with_strides_and_bias_modulus():
    # The shared building blocks on their own: b transposed (strides swapped), a permuted view, bias indexed by
    # (p % bias_mod, n).
    a = torch.randn(4, 6, 19).permute(0, 2, 1)  # [P=4, K=19, Q=6], non-contiguous
    b = torch.randn(17, 19).t()  # [K=19, N=17], transposed
    bias = torch.randn(2 * 17)
    out = triton_impl.mode_product(a, b, bias, bias_mod=2)
    ref = torch.einsum("pkq,kn->pnq", a.double(), b.double())
    ref = ref + bias.double().reshape(2, 17)[torch.arange(4) % 2][:, :, None]
    assert_close_rel(out, ref, tolerance(torch.float32, "triton"), "mode_product")
    g = torch.randn(4, 17, 6)
    db = triton_impl.mode_product_grad_b(a, g)
    assert_close_rel(
        db,
        torch.einsum("pkq,pnq->kn", a.double(), g.double()),
        tolerance(torch.float32, "triton"),
        "mode_product_grad_b",
    )


def test_opcheck_registration():
    # Schema, fake (meta) implementation and autograd registration agree with the real kernel.
    cores = make_cores((3, 5), (2, 3), (4,))
    x = torch.randn(3, 15, requires_grad=True)
    torch.library.opcheck(
        torch.ops.tnkernels.mpo_linear_triton.default,
        (x, [g.requires_grad_() for g in cores], torch.randn(6, requires_grad=True), True),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )


def test_bad_inputs_raise_valueerror():
    cores = make_cores((3, 5), (2, 3), (4,))
    with pytest.raises(ValueError, match="dtype"):
        mpo_linear(torch.ones(2, 15, dtype=torch.int32), cores, backend="triton")
    with pytest.raises(ValueError, match="15"):
        mpo_linear(torch.randn(2, 14), cores, backend="triton")


@pytest.mark.parametrize(
    "in_modes,out_modes,bonds",
    [
        ((3, 5, 7), (2, 3, 5), (6, 5)),  # pairs: N of step 2 = 3*5 = 15, step 3 = 5 -> fuses one pair
        ((2, 3, 2, 2), (3, 2, 2, 2), (3, 5, 2)),  # four cores: two fused pairs, the last one with the bias
        ((3, 5), (2, 7), (17,)),  # bond 17 spans two BR blocks; N2 = 7
    ],
)
def test_inference_fuses_consecutive_cores(in_modes, out_modes, bonds, monkeypatch, nan_poison):
    # Without autograd the chain runs fused pairs (intermediate on chip); the result must equal the reference.
    cores = make_cores(in_modes, out_modes, bonds)
    steps = triton_impl._step_shapes(torch.Size(in_modes).numel(), [g.shape for g in cores])
    assert triton_impl._fusion_plan(steps), "the case should exercise at least one fused pair"
    calls = []
    real_pair = triton_impl.mode_product_pair
    monkeypatch.setattr(triton_impl, "mode_product_pair", lambda *a, **k: calls.append(1) or real_pair(*a, **k))
    x = torch.randn(3, torch.Size(in_modes).numel())
    bias = torch.randn(torch.Size(out_modes).numel())
    with torch.no_grad():
        y = mpo_linear(x, cores, bias, backend="triton")
    assert calls, "inference did not take the fused path"
    y_ref = mpo_linear_reference(x.double(), [g.double() for g in cores], bias.double())
    assert_close_rel(y, y_ref, tolerance(torch.float32, "triton"), f"fused {in_modes}->{out_modes}")


def test_fused_pair_with_wide_second_step():
    # N2 = j_2 = 17 > 16 spans two BN2 blocks under the interpreter (the intermediate is recomputed per block).
    cores = make_cores((3, 2), (2, 17), (4,))
    assert triton_impl._fusion_plan(triton_impl._step_shapes(6, [g.shape for g in cores])) == [0]
    x = torch.randn(2, 6, dtype=torch.bfloat16)
    with torch.no_grad():
        y = mpo_linear(x, [g.bfloat16() for g in cores], None, backend="triton")
    y_ref = mpo_linear_reference(x.double(), [g.bfloat16().double() for g in cores])
    assert_close_rel(y, y_ref, tolerance(torch.bfloat16, "triton"), "fused, bf16, two N2 blocks")


def test_gpu_bench_script_runs_on_cpu_smoke(tmp_path):
    # bench/gpu_bench.py only runs for real on a GPU session with a few minutes of device time, so its code paths
    # (correctness phase, every provider, fwd+bwd, summary, JSON/CSV) are exercised here on tiny shapes.
    from bench import gpu_bench

    rc = gpu_bench.main(["--smoke-cpu", "--out", str(tmp_path)])
    (json_path,) = tmp_path.glob("gpu_bench_*.json")
    doc = json.loads(json_path.read_text())
    assert rc == 0 and not doc["errors"], doc["errors"]
    checks = [r for r in doc["rows"] if r["phase"] == "correctness"]
    assert checks and all(r["ok"] for r in checks)
    ops = {r["op"] for r in doc["rows"] if r["phase"] == "perf"}
    assert ops == {"mpo_fwd", "mpo_fwd_bwd", "tucker_fwd", "tucker_fwd_bwd"}
    assert doc["meta"]["summary"]["n_cases"] > 0
    assert list(tmp_path.glob("gpu_bench_*.csv"))


# ----------------------------------------------------------------------------------------------------------------
# GPU-only hazards, checked without a GPU: launch grids at real sizes (meta tensors), configs, device guard.

CUDA_GRID_LIMITS = (2**31 - 1, 65535, 65535)  # gridDim.x, .y, .z


class GridRecorder:
    """Stands in for an autotuned kernel: records the launch grid under each config given (the GPU ones, the fp64
    one, the interpreter's) and runs nothing, so launchers can be driven with meta tensors of real sizes."""

    def __init__(self, configs):
        self.configs, self.grids = configs, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.grids += [tuple(grid({**kwargs, **cfg.kwargs})) for cfg in self.configs]

        return launch


def record_grids(monkeypatch, module, kernels) -> list[GridRecorder]:
    """Replace module.<name> by a GridRecorder for each (name, configs) in kernels."""
    recorders = []
    for name, configs in kernels:
        recorders.append(GridRecorder(configs))
        monkeypatch.setattr(module, name, recorders[-1])
    return recorders


def assert_grids_fit(recorders) -> None:
    grids = [g for r in recorders for g in r.grids]
    assert grids, "no launch recorded"
    for g in grids:
        assert len(g) <= 3 and all(1 <= n <= lim for n, lim in zip(g, CUDA_GRID_LIMITS, strict=False)), g


def mpo_recorders(monkeypatch):
    from tnkernels.ops.mpo import triton_kernels as tk

    return record_grids(
        monkeypatch,
        triton_impl,
        [
            ("mode_product_kernel", [*tk._GPU_MP_CONFIGS, tk.FP64_MP_CONFIG, *tk._MP_CONFIGS]),
            ("mode_product_pair_kernel", [*tk._GPU_PAIR_CONFIGS, tk.FP64_PAIR_CONFIG, *tk._PAIR_CONFIGS]),
            ("mode_product_grad_b_kernel", [*tk._GPU_GB_CONFIGS, tk.FP64_GB_CONFIG, *tk._GB_CONFIGS]),
        ],
    )


GPT2_XL_MLP = ((4, 4, 10, 10), (8, 8, 10, 10))


@pytest.mark.parametrize(
    "in_modes,out_modes,bond,rows",
    [
        (*GPT2_XL_MLP, 256, 4096),  # bench/gpu_bench.py's largest (its widest state has 6.7G elements)
        (*GPT2_XL_MLP[::-1], 64, 65536),  # GPT-2 XL mlp.c_proj at batch x seq = 65536 rows
        ((4096, 1), (1, 128256), 64, 16),  # low-rank split of a Llama-3 vocabulary head
        # the vocabulary mode on the first core: step 0 has N = 128256 * 32 columns (128K column blocks), and
        # without autograd steps 0-1 fuse with j1 = 128256 programs per row block
        ((4096, 1), (128256, 1), 32, 16),
    ],
)
def test_launch_grids_fit_cuda_limits(in_modes, out_modes, bond, rows, monkeypatch):
    # CUDA caps grid axes 1 and 2 at 65535; the interpreter has no such limit, so a grid over it only fails on a GPU
    # (a launch error). Every launcher, forward (training and fused inference) and backward, at real sizes.
    recorders = mpo_recorders(monkeypatch)
    ranks = [1, *[bond] * (len(in_modes) - 1), 1]
    modes = list(zip(in_modes, out_modes, strict=True))
    cores = [torch.empty(ranks[k], i, j, ranks[k + 1], device="meta") for k, (i, j) in enumerate(modes)]
    x2 = torch.empty(rows, torch.Size(in_modes).numel(), device="meta")
    bias = torch.empty(torch.Size(out_modes).numel(), device="meta")
    triton_impl._forward_chain(x2, cores, bias, keep=False)
    if triton_impl._fusion_plan(triton_impl._step_shapes(x2.shape[1], [g.shape for g in cores])):
        assert recorders[1].grids, "the fused pair was not launched"
    y, kept = triton_impl._forward_chain(x2, cores, bias, keep=True)
    triton_impl._backward_chain(torch.empty_like(y), x2, cores, kept, need_dx=True)
    assert_grids_fit(recorders)


def _dot_shapes(kernel: str, c: dict) -> list[tuple[int, int, int]]:
    """(X, C, Y) of every [X, C] @ [C, Y] that `kernel` runs through _dot_acc, from a config's blocks (BRO: Tucker's
    fused kernel gets it from the launcher, up to 128)."""
    bro = 128
    return {
        "mode_product_kernel": lambda: [(c["BM"], c["BK"], c["BN"])],
        "mode_product_pair_kernel": lambda: [(c["BM"], c["BK"], c["BR"]), (c["BM"], c["BR"], c["BN2"])],
        "mode_product_grad_b_kernel": lambda: [(c["BK"], c["BM"], c["BN"])],
        "tucker_fused_kernel": lambda: [
            (c["BM"], c["BC"], c["BRI"]),
            (c["BM"], c["BRI"], bro),
            (c["BM"], bro, c["BCO"]),
        ],
        "tucker_grad_proj_kernel": lambda: [(c["BM"], c["BRO"], c["BRI"])],
        "tucker_grad_core_kernel": lambda: [(c["BRO"], c["BM"], c["BRI"])],
    }[kernel]()


def autotuned_kernels():
    from tnkernels.ops.mpo import triton_kernels as mk
    from tnkernels.ops.tucker import triton_kernels as tk

    return [
        ("mode_product_kernel", mk.mode_product_kernel, mk._GPU_MP_CONFIGS, mk.FP64_MP_CONFIG),
        ("mode_product_pair_kernel", mk.mode_product_pair_kernel, mk._GPU_PAIR_CONFIGS, mk.FP64_PAIR_CONFIG),
        ("mode_product_grad_b_kernel", mk.mode_product_grad_b_kernel, mk._GPU_GB_CONFIGS, mk.FP64_GB_CONFIG),
        ("tucker_fused_kernel", tk.tucker_fused_kernel, tk._GPU_CONFIGS, tk.FP64_FUSED_CONFIG),
        ("tucker_grad_proj_kernel", tk.tucker_grad_proj_kernel, tk._GPU_GRAD_CONFIGS, tk.FP64_GRAD_PROJ_CONFIG),
        ("tucker_grad_core_kernel", tk.tucker_grad_core_kernel, tk._GPU_GRAD_CONFIGS, tk.FP64_GRAD_CORE_CONFIG),
    ]


@pytest.mark.parametrize("which", range(6))
def test_gpu_configs_are_sane_and_fp64_gets_a_small_one(which):
    # The GPU configs never run here, so check what a GPU would reject or choke on:
    # - tl.dot needs every block dim >= 16 (the fp16/bf16 tensor-core minimum);
    # - the pipelined tiles, stages * (X*C + C*Y) elements per dot, must fit H100/H200 shared memory (227 KiB per
    #   block) in bf16, and in fp32 for at least one config (the autotuner skips a config that runs out of shared
    #   memory, but fails when none is left);
    # - fp64 bypasses tl.dot with a [X, C, Y] broadcast held in registers: it must get one small config only
    #   (the GPU configs would make it 4 MiB per program), and every other dtype must keep all of them.
    name, kernel, configs, fp64_config = autotuned_kernels()[which]

    def smem(cfg, nbytes):
        return max(cfg.num_stages * (x * c + c * y) * nbytes for x, c, y in _dot_shapes(name, cfg.kwargs))

    assert all(min(min(s) for s in _dot_shapes(name, cfg.kwargs)) >= 16 for cfg in configs), name
    assert all(smem(cfg, 2) <= 227 * 1024 for cfg in configs), name
    assert any(smem(cfg, 4) <= 227 * 1024 for cfg in configs), name
    prune = kernel.early_config_prune
    assert prune is not None, f"{name}: no fp64 pruning"
    assert prune(configs, {}, DOT_FP64=True) == [fp64_config]
    assert prune(configs, {}, DOT_FP64=False) == configs
    assert all(x * c * y <= 8192 for x, c, y in _dot_shapes(name, fp64_config.kwargs)), fp64_config


def test_fp64_gpu_configs_compute_correctly(monkeypatch):
    # Run the MPO kernels under the interpreter with the small blocks a GPU uses for fp64 (BK = 8, BM = 8, BR = 8),
    # training (every unfused kernel and the gradient reduction) and fused inference.
    from tnkernels.ops.mpo import triton_kernels as mk

    for _, kernel, _, fp64_config in autotuned_kernels()[:3]:
        monkeypatch.setattr(kernel, "configs", [fp64_config])
    cores = make_cores((3, 5, 7), (2, 3, 5), (6, 5), torch.float64)
    x = torch.randn(3, 105, dtype=torch.float64)
    check_against_reference(x, cores, torch.randn(30, dtype=torch.float64), torch.float64, "fp64 GPU configs")
    with torch.no_grad():
        y = mpo_linear(x, cores, None, backend="triton")
    assert_close_rel(y, mpo_linear_reference(x, cores), tolerance(torch.float64, "triton"), "fp64 fused")
    assert mk.mode_product_pair_kernel.configs == [mk.FP64_PAIR_CONFIG]


def test_device_guard_sets_the_tensors_gpu():
    # Triton launches on torch's current device, not the tensors'; the ops make the tensors' GPU current.
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        t = torch.empty(2, device="cuda:1")  # a fake CUDA tensor: no GPU needed
    guard = triton_impl.device_guard(t)
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert not isinstance(triton_impl.device_guard(torch.empty(2)), torch.cuda.device)


def test_every_launch_runs_under_the_device_guard(monkeypatch):
    from tnkernels.ops.tucker import triton_impl as tucker_impl

    active = []

    class Guard:
        def __init__(self, t):
            pass

        def __enter__(self):
            active.append(1)

        def __exit__(self, *exc):
            active.pop()

    class Checked:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            assert active, "a triton launch outside device_guard"
            return self.kernel[grid]

    monkeypatch.setattr(triton_impl, "device_guard", Guard)
    monkeypatch.setattr(tucker_impl, "device_guard", Guard)
    for module, names in [
        (triton_impl, ["mode_product_kernel", "mode_product_pair_kernel", "mode_product_grad_b_kernel"]),
        (tucker_impl, ["tucker_fused_kernel", "tucker_grad_proj_kernel", "tucker_grad_core_kernel"]),
    ]:
        for name in names:
            monkeypatch.setattr(module, name, Checked(getattr(module, name)))
    cores = [g.requires_grad_() for g in make_cores((2, 3), (3, 2), (2,))]
    x = torch.randn(2, 6, requires_grad=True)
    mpo_linear(x, cores, None, backend="triton").sum().backward()
    with torch.no_grad():
        mpo_linear(x, cores, None, backend="triton")  # the fused pair
    from tnkernels.ops import tucker_conv2d

    img = torch.randn(1, 2, 3, 3, requires_grad=True)
    factors = [torch.randn(2, 2, requires_grad=True), torch.randn(2, 2, 3, 3, requires_grad=True)]
    tucker_conv2d(img, *factors, torch.randn(3, 2), None, padding=1, backend="triton").sum().backward()
    assert not active


def test_op_reads_a_strided_bias_through_its_values():
    # The kernels index bias[f] without a stride; the op must not hand them a strided view (b[::2]).
    cores = make_cores((3, 5), (2, 3), (4,))
    x = torch.randn(3, 15)
    bias = torch.randn(12)[::2]
    for keep in (True, False):  # unfused (bias in mode_product) and fused (bias in the pair kernel)
        y = torch.ops.tnkernels.mpo_linear_triton(x, cores, bias, keep)[0]
        want = mpo_linear_reference(x.double(), [g.double() for g in cores], bias.double())
        assert_close_rel(y, want, tolerance(torch.float32, "triton"), f"strided bias, keep={keep}")


def test_fp64_gradients_keep_fp64_precision():
    # Every gradient of an fp64 call is accumulated in fp64, the bias gradient too (it was summed in fp32: ~1e-8).
    cores = make_cores((3, 5), (2, 7), (4,), torch.float64)
    x = torch.randn(3, 15, dtype=torch.float64)
    check_against_reference(x, cores, torch.randn(14, dtype=torch.float64), torch.float64, "fp64")
