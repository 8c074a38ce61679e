"""mixture_lora: the torch path against a naive adapter-by-adapter reference and per-row merged
weights, then the Triton kernels against the torch path (values and every gradient).

The Triton tests (`test_triton_*`) need TRITON_INTERPRET=1 in the environment before `triton` is
first imported; without CUDA, `test_triton_kernels_under_interpreter` re-runs them in a child
pytest that has it, as tests/kernels/test_logprob_triton.py does (see its docstring).
Run `TRITON_INTERPRET=1 pytest tests/kernels/test_mixture_lora.py -k triton` to see them one by one.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F
from steer.kernels.mixture_lora import mixture_lora, mixture_lora_delta, stack_lora_adapters

HAS_TRITON = importlib.util.find_spec("triton") is not None
CUDA = torch.cuda.is_available()
RUN_TRITON_HERE = HAS_TRITON and (CUDA or os.environ.get("TRITON_INTERPRET") == "1")
triton_test = pytest.mark.skipif(not RUN_TRITON_HERE, reason="runs in the TRITON_INTERPRET=1 child process")
# The interpreter runs kernels on CPU tensors; without it they need CUDA ones.
TRITON_DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"

# Normalised max error (max|actual - expected| / max|expected|), values and every gradient.
#   float32: summation order only (stacked GEMMs vs one adapter at a time, merged weights, Triton
#            tiles; the interpreter's tl.dot is a numpy fp32 matmul); measured <= 1e-6.
#   bfloat16 (GPU only, not measured where this was written, which had no GPU): inputs, the
#            scaled middle activations and the output round to 8 mantissa bits (2^-8 = 3.9e-3
#            each, a few roundings per element).
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}

# (leading dims of x, in, out, k, r, leading dims of weights)
SHAPES = [
    ((7,), 33, 19, 3, 4, (7,)),  # irregular everything, one direction per row
    ((1,), 16, 8, 1, 4, (1,)),  # one row, one adapter
    ((2, 5), 33, 19, 3, 4, (2,)),  # (B, T, in) with one direction per sequence
    ((2, 5), 12, 10, 2, 3, (2, 5)),  # one direction per token
    ((6,), 12, 10, 2, 3, ()),  # one direction for every row
]
SHAPE_IDS = ["N7-in33-out19-k3-r4", "N1-k1", "BT-per-sequence", "BT-per-token", "shared-direction"]
SCALE = 0.75


def make_inputs(lead, d_in, d_out, k, r, w_lead, *, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, d_in, generator=gen)
    a_cat = torch.randn(k * r, d_in, generator=gen) * d_in**-0.5
    b_cat = torch.randn(d_out, k * r, generator=gen)
    weights = torch.rand(*w_lead, k, generator=gen) + 0.1
    grad_out = torch.randn(*lead, d_out, generator=gen)
    leaves = [t.to(device, dtype).requires_grad_() for t in (x, a_cat, b_cat)]
    return (*leaves, weights.to(device).requires_grad_(), grad_out.to(device, dtype))


def naive_mixture_lora(x, a_cat, b_cat, weights, rank, scale):
    """sum_i w[n, i] * s * x_n A_i^T B_i^T, one adapter at a time (weights broadcast per row)."""
    k = a_cat.shape[0] // rank
    w = weights.reshape(*weights.shape[:-1], *[1] * (x.dim() - weights.dim()), k)  # (*lead, 1.., k)
    delta = 0
    for i, (a_i, b_i) in enumerate(zip(a_cat.split(rank, 0), b_cat.split(rank, 1))):  # (r, in), (out, r)
        delta = delta + w[..., i : i + 1] * scale * ((x @ a_i.t()) @ b_i.t())  # (..., out)
    return delta


def assert_close(actual, expected, tol, what):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual.double() - expected.double()).abs().max().item()
    scale = max(expected.double().abs().max().item(), 1e-12)
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol:g} x max|expected| {scale:.3g}"


GRAD_NAMES = ("d x", "d a_cat", "d b_cat", "d weights")


def check_against(fn, ref_fn, shape, *, dtype=torch.float32, device="cpu", **kwargs):
    """fn's delta and all four gradients against ref_fn's on the same (fp32-upcast) inputs."""
    x, a_cat, b_cat, weights, grad_out = make_inputs(*shape, dtype=dtype, device=device)
    r = shape[4]
    delta = fn(x, a_cat, b_cat, weights, r, SCALE, **kwargs)
    grads = torch.autograd.grad(delta, [x, a_cat, b_cat, weights], grad_out)
    up = [t.detach().float().requires_grad_() for t in (x, a_cat, b_cat, weights)]
    ref = ref_fn(*up, r, SCALE)
    ref_grads = torch.autograd.grad(ref, up, grad_out.float())
    tol = TOLERANCE[dtype]
    assert delta.dtype == dtype
    assert_close(delta, ref, tol, "delta")
    for name, g, e, leaf in zip(GRAD_NAMES, grads, ref_grads, (x, a_cat, b_cat, weights)):
        assert g.dtype == leaf.dtype, name
        assert_close(g, e, tol, name)


# --- torch path -------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_torch_path_matches_naive_values_and_gradients(shape):
    check_against(mixture_lora_delta, naive_mixture_lora, shape)


@pytest.mark.parametrize("shape", SHAPES[:3], ids=SHAPE_IDS[:3])
def test_base_plus_delta_equals_per_row_merged_weights(shape):
    lead, d_in, d_out, k, r, w_lead = shape
    x, a_cat, b_cat, weights, _ = make_inputs(*shape)
    gen = torch.Generator().manual_seed(1)
    w_base, bias = torch.randn(d_out, d_in, generator=gen), torch.randn(d_out, generator=gen)
    with torch.no_grad():
        y = F.linear(x, w_base, bias) + mixture_lora_delta(x, a_cat, b_cat, weights, r, SCALE)  # (..., out)
        rows = x.reshape(-1, d_in)  # (N, in)
        row_weights = weights.reshape(*w_lead, *[1] * (len(lead) - len(w_lead)), k).expand(*lead, k).reshape(-1, k)
        a_list, b_list = a_cat.split(r, 0), b_cat.split(r, 1)
        for n in range(rows.shape[0]):
            merged = w_base + SCALE * sum(row_weights[n, i] * b_list[i] @ a_list[i] for i in range(k))  # (out, in)
            assert_close(y.reshape(-1, d_out)[n], F.linear(rows[n], merged, bias), TOLERANCE[torch.float32], f"row {n}")


def test_one_hot_weights_give_that_adapter_alone():
    x, a_cat, b_cat, _, _ = make_inputs(*SHAPES[0])
    r = 4
    with torch.no_grad():
        for i in range(3):
            one_hot = F.one_hot(torch.full((7,), i), 3).float()  # (N, k)
            single = SCALE * (x @ a_cat[i * r : (i + 1) * r].t()) @ b_cat[:, i * r : (i + 1) * r].t()  # (N, out)
            delta = mixture_lora_delta(x, a_cat, b_cat, one_hot, r, SCALE)
            assert_close(delta, single, TOLERANCE[torch.float32], f"corner {i}")
        assert (mixture_lora_delta(x, a_cat, b_cat, torch.zeros(7, 3), r, SCALE) == 0).all()


def assert_rows_independent(fn, device="cpu"):
    """Changing one row's direction changes that row's delta and leaves every other row bitwise equal."""
    x, a_cat, b_cat, weights, _ = make_inputs(*SHAPES[0], device=device)
    with torch.no_grad():
        before = fn(x, a_cat, b_cat, weights, 4, SCALE)
        changed = weights.detach().clone()
        changed[3] = torch.tensor([1.0, 0.0, 0.0])
        after = fn(x, a_cat, b_cat, changed, 4, SCALE)
    others = torch.arange(7, device=device) != 3
    assert torch.equal(before[others], after[others])
    assert not torch.allclose(before[3], after[3])


def test_rows_with_different_directions_do_not_affect_each_other():
    assert_rows_independent(mixture_lora_delta)


def test_per_sequence_weights_equal_the_same_weights_on_every_token():
    x, a_cat, b_cat, weights, _ = make_inputs(*SHAPES[2])  # x (2, 5, 33), weights (2, 3)
    with torch.no_grad():
        per_sequence = mixture_lora_delta(x, a_cat, b_cat, weights, 4, SCALE)
        per_token = mixture_lora_delta(x, a_cat, b_cat, weights.unsqueeze(1).expand(2, 5, 3), 4, SCALE)
    assert per_sequence.shape == (2, 5, 19)
    assert_close(per_sequence, per_token, TOLERANCE[torch.float32], "delta")


def test_float64_gradcheck():
    x, a_cat, b_cat, weights, _ = make_inputs((3, 2), 5, 4, 2, 3, (3,), dtype=torch.float64)
    weights = weights.detach().double().requires_grad_()
    assert torch.autograd.gradcheck(lambda *t: mixture_lora_delta(*t, 3, SCALE), (x, a_cat, b_cat, weights))


def test_stack_lora_adapters_uses_peft_layout_and_keeps_gradients():
    gen = torch.Generator().manual_seed(0)
    a_list = [torch.randn(4, 33, generator=gen).requires_grad_() for _ in range(3)]  # lora_A.weight (r, in)
    b_list = [torch.randn(19, 4, generator=gen).requires_grad_() for _ in range(3)]  # lora_B.weight (out, r)
    a_cat, b_cat = stack_lora_adapters(a_list, b_list)
    assert a_cat.shape == (12, 33) and b_cat.shape == (19, 12)
    assert torch.equal(a_cat[4:8], a_list[1]) and torch.equal(b_cat[:, 4:8], b_list[1])
    x, weights = torch.randn(7, 33, generator=gen), torch.rand(7, 3, generator=gen)
    delta = mixture_lora_delta(x, a_cat, b_cat, weights, 4, SCALE)
    grads = torch.autograd.grad(delta.sum(), a_list + b_list)
    ref = naive_mixture_lora(x, torch.cat(a_list), torch.cat(b_list, 1), weights, 4, SCALE)
    ref_grads = torch.autograd.grad(ref.sum(), a_list + b_list)
    for i, (g, e) in enumerate(zip(grads, ref_grads)):
        assert_close(g, e, TOLERANCE[torch.float32], f"adapter tensor {i}")


def test_dispatcher_uses_torch_on_cpu(monkeypatch):
    monkeypatch.delenv("STEER_KERNELS", raising=False)
    x, a_cat, b_cat, weights, _ = make_inputs(*SHAPES[2])
    with torch.no_grad():
        expected = mixture_lora_delta(x, a_cat, b_cat, weights, 4, SCALE)
        assert torch.equal(mixture_lora(x, a_cat, b_cat, weights, 4, SCALE), expected)
    monkeypatch.setenv("STEER_KERNELS", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if HAS_TRITON and not CUDA:
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            mixture_lora(x, a_cat, b_cat, weights, 4, SCALE)


def test_empty_rows():
    x = torch.zeros(2, 0, 8, requires_grad=True)  # two sequences of no tokens
    weights = torch.rand(2, 3, requires_grad=True)
    delta = mixture_lora_delta(x, torch.randn(6, 8), torch.randn(5, 6), weights, 2, SCALE)
    assert delta.shape == (2, 0, 5)
    dx, dw = torch.autograd.grad(delta.sum(), [x, weights])
    assert dx.shape == x.shape and (dw == 0).all()


# (d) each bad argument raises and names itself. Base: x (7, 33), a_cat (12, 33), b_cat (19, 12),
# weights (7, 3), rank 4.
@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"x": torch.randn(7, 32)}, ValueError,
         r"a_cat must be \(k\*r, in\) with in = 32 from x \(7, 32\); got a_cat \(12, 33"),
        ({"a_cat": torch.randn(12, 33, 1)}, ValueError, r"a_cat must be \(k\*r, in\).*got a_cat \(12, 33, 1\)"),
        ({"rank": 5}, ValueError, r"a_cat has 12 rows, not a positive multiple of rank=5"),
        ({"rank": 0}, ValueError, r"rank must be a positive int"),
        ({"b_cat": torch.randn(19, 8)}, ValueError,
         r"b_cat must be \(out, k\*r\) with k\*r = 12 .*got b_cat \(19, 8\)"),
        ({"weights": torch.rand(7, 2)}, ValueError, r"weights must be \(\.\.\., k\) with k = 3 .*got weights \(7, 2\)"),
        ({"weights": torch.rand(6, 3)}, ValueError,
         r"weights \(6, 3\) must be \(\*lead, 3\) with lead a prefix of x's leading dims"),
        ({"weights": torch.ones(7, 3, dtype=torch.long)}, TypeError, r"weights must be a floating tensor"),
        ({"b_cat": torch.randn(19, 12, dtype=torch.float64)}, TypeError,
         r"x, a_cat and b_cat must share one floating dtype"),
        ({"scale": float("nan")}, ValueError, r"scale must be a finite number"),
    ],
    ids=["x-in", "a_cat-dims", "rank-divides", "rank-positive", "b_cat-cols", "weights-k", "weights-lead",
         "weights-dtype", "dtype-mismatch", "scale"],
)
@pytest.mark.parametrize("fn", [mixture_lora_delta, mixture_lora], ids=["torch", "dispatcher"])
def test_bad_arguments_are_named(fn, kwargs, error, match):
    args = {"x": torch.randn(7, 33), "a_cat": torch.randn(12, 33), "b_cat": torch.randn(19, 12),
            "weights": torch.rand(7, 3), "rank": 4, "scale": SCALE}
    args.update(kwargs)
    with pytest.raises(error, match=match):
        fn(**args)


@pytest.mark.parametrize(
    "a_list, b_list, match",
    [
        ([], [], r"one tensor per adapter, k >= 1; got 0 and 0"),
        ([torch.randn(4, 8)] * 2, [torch.randn(5, 4)], r"got 2 and 1"),
        ([torch.randn(4, 8), torch.randn(4, 9)], [torch.randn(5, 4)] * 2,
         r"lora_a\[1\] has shape \(4, 9\); expected \(r, in\) = \(4, 8\)"),
        ([torch.randn(4, 8)] * 2, [torch.randn(5, 4), torch.randn(5, 3)],
         r"lora_b\[1\] has shape \(5, 3\); expected \(out, r\) = \(5, 4\)"),
    ],
    ids=["empty", "count", "a-shape", "b-shape"],
)
def test_stack_lora_adapters_names_the_bad_adapter(a_list, b_list, match):
    with pytest.raises(ValueError, match=match):
        stack_lora_adapters(a_list, b_list)


# --- Triton path --------------------------------------------------------------------------------


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.skipif(RUN_TRITON_HERE, reason="the Triton tests run in this process")
def test_triton_kernels_under_interpreter(run_under_triton_interpreter):
    run_under_triton_interpreter(__file__, 10, "-k", "test_triton_")


@pytest.fixture(scope="module")
def triton_path():
    from steer.kernels import mixture_lora_triton

    return mixture_lora_triton


@triton_test
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_triton_matches_torch_values_and_gradients(triton_path, shape):
    check_against(triton_path.triton_mixture_lora_delta, mixture_lora_delta, shape, device=TRITON_DEVICE)


@triton_test
def test_triton_crosses_tile_boundaries(triton_path):
    # 16-wide tiles: 3 row blocks, k*r = 24 in 2 KR tiles, in = 50 and out = 37 in 4 and 3 tiles,
    # each with a masked tail; rows_per_weight = 5 groups straddle row blocks.
    shape = ((8, 5), 50, 37, 3, 8, (8,))
    check_against(triton_path.triton_mixture_lora_delta, mixture_lora_delta, shape, device=TRITON_DEVICE,
                  block_n=16, block_d=16, block_kr=16)


@triton_test
def test_triton_rows_do_not_affect_each_other(triton_path):
    assert_rows_independent(triton_path.triton_mixture_lora_delta, TRITON_DEVICE)


@triton_test
def test_triton_frozen_adapters_give_only_the_requested_gradients(triton_path):
    # Serving-style: adapters and weights constant, only x (from earlier layers) needs a gradient.
    x, a_cat, b_cat, weights, grad_out = make_inputs(*SHAPES[0], device=TRITON_DEVICE)
    delta = triton_path.triton_mixture_lora_delta(x, a_cat.detach(), b_cat.detach(), weights.detach(), 4, SCALE)
    (dx,) = torch.autograd.grad(delta, [x], grad_out)
    ref = mixture_lora_delta(x, a_cat.detach(), b_cat.detach(), weights.detach(), 4, SCALE)
    (ref_dx,) = torch.autograd.grad(ref, [x], grad_out)
    assert_close(dx, ref_dx, TOLERANCE[torch.float32], "d x")
    with torch.no_grad():
        assert not triton_path.triton_mixture_lora_delta(x, a_cat, b_cat, weights, 4, SCALE).requires_grad


@triton_test
def test_triton_dispatcher_when_forced(triton_path, monkeypatch):
    monkeypatch.setenv("STEER_KERNELS", "triton")
    calls = []
    real = triton_path.triton_mixture_lora_delta
    monkeypatch.setattr(triton_path, "triton_mixture_lora_delta", lambda *a, **k: calls.append(1) or real(*a, **k))
    check_against(mixture_lora, mixture_lora_delta, SHAPES[2], device=TRITON_DEVICE)
    assert calls, "STEER_KERNELS=triton did not reach the Triton path"


@triton_test
def test_triton_block_sizes_are_validated(triton_path):
    x, a_cat, b_cat, weights, _ = make_inputs(*SHAPES[0], device=TRITON_DEVICE)
    with pytest.raises(ValueError, match="block_d must be a power of two"):
        triton_path.triton_mixture_lora_delta(x, a_cat, b_cat, weights, 4, SCALE, block_d=48)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA or not HAS_TRITON, reason="needs a CUDA device and triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [SHAPES[0], ((4, 256), 576, 1536, 3, 16, (4,))], ids=["irregular", "smollm-mlp"])
def test_triton_on_gpu(triton_path, dtype, shape):
    check_against(triton_path.triton_mixture_lora_delta, mixture_lora_delta, shape, dtype=dtype, device="cuda")
