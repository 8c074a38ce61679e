"""linear_logprob, torch path and dispatcher: values and every gradient against the naive reference."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from steer.kernels import LinearLogprobOutput, linear_logprob, naive_linear_logprob
from steer.kernels.logprob import select_backend
from steer.kernels.logprob_torch import chunk_rows_for, torch_linear_logprob

IGNORE = -100

# Normalised max error, max|actual - expected| / max|expected|, allowed per input dtype, for the
# values (logp, lse, entropy) and every gradient. The expected values are always the fp32 naive
# path on the same (upcast) inputs, so half rows measure the error of computing in that dtype.
#   float32: summation order only (chunked GEMMs vs one GEMM, in-place vs out-of-place softmax);
#            measured <= 1.5e-6.
#   bfloat16: the logits GEMM rounds to 8 mantissa bits; measured <= 8.3e-3 (entropy, a sum of
#             p log p over the vocabulary, is the worst), the naive path run in bf16 measures
#             <= 9.9e-3 on the same inputs: the chunked path is no worse than unfused bf16.
#   float16: the same with 11 mantissa bits; measured <= 1.1e-3 (naive in fp16: 1.1e-3).
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1.5e-2, torch.float16: 2e-3}

SHAPES = [
    (47, 31, 123),  # irregular everything
    (256, 64, 1000),
    (5, 16, 40),  # fewer rows than any chunk
]


def make_inputs(n, h, v, *, bias, ignore, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen)
    weight = torch.randn(v, h, generator=gen) * h**-0.5 * 3  # logits of std ~3, a peaked softmax
    b = torch.randn(v, generator=gen) * 0.5 if bias else None
    targets = torch.randint(0, v, (n,), generator=gen)
    if ignore:
        targets[::4] = IGNORE  # every 4th row ignored, including row 0
    grad_out = torch.randn(n, generator=gen)
    cast = [t.to(dtype).requires_grad_() if t is not None else None for t in (hidden, weight, b)]
    return (*cast, targets, grad_out)


def assert_close(actual, expected, tol, what):
    err = (actual.double() - expected.double()).abs().max().item()
    scale = max(expected.double().abs().max().item(), 1e-12)
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol:g} x max|expected| {scale:.3g}"


def reference(hidden, weight, b, targets, grad_out, temperature):
    """fp32 naive values and gradients on the same inputs, upcast."""
    up = [t.detach().float().requires_grad_() if t is not None else None for t in (hidden, weight, b)]
    logp, lse, ent = naive_linear_logprob(
        up[0], up[1], targets, up[2], temperature=temperature, return_lse=True, return_entropy=True
    )
    grads = torch.autograd.grad(logp, [t for t in up if t is not None], grad_out)
    return logp, lse, ent, grads


def check_against_naive(fn, shape, *, bias, ignore, temperature, dtype=torch.float32, **kwargs):
    hidden, weight, b, targets, grad_out = make_inputs(*shape, bias=bias, ignore=ignore, dtype=dtype)
    logp, lse, ent = fn(hidden, weight, targets, b, temperature=temperature, ignore_index=IGNORE,
                        return_lse=True, return_entropy=True, **kwargs)
    params = [t for t in (hidden, weight, b) if t is not None]
    grads = torch.autograd.grad(logp, params, grad_out)
    ref_logp, ref_lse, ref_ent, ref_grads = reference(hidden, weight, b, targets, grad_out, temperature)
    tol = TOLERANCE[dtype]
    assert logp.dtype == torch.float32 and logp.shape == targets.shape
    assert_close(logp, ref_logp, tol, "logp")
    assert_close(lse, ref_lse, tol, "lse")
    assert_close(ent, ref_ent, tol, "entropy")
    for name, g, ref_g in zip(("d hidden", "d weight", "d bias"), grads, ref_grads):
        assert g.dtype == dtype
        assert_close(g, ref_g, tol, name)
    ignored = targets == IGNORE
    assert (logp[ignored] == 0).all() and (lse[ignored] == 0).all() and (ent[ignored] == 0).all()
    assert (grads[0][ignored] == 0).all(), "ignored rows must get no gradient"


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("chunk_rows", [None, 16], ids=["chunk=auto", "chunk=16"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("ignore", [False, True], ids=["all-valid", "ignored-rows"])
def test_torch_path_matches_naive_fp32(shape, chunk_rows, bias, temperature, ignore):
    check_against_naive(torch_linear_logprob, shape, bias=bias, ignore=ignore, temperature=temperature,
                        chunk_rows=chunk_rows)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", SHAPES[:2], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_torch_path_half_precision(dtype, shape, bias):
    check_against_naive(torch_linear_logprob, shape, bias=bias, ignore=True, temperature=0.7, dtype=dtype,
                        chunk_rows=32)


def test_chunking_does_not_change_results():
    """Chunk boundaries (47 = 2 x 16 + 15, 47 < 64) change nothing beyond fp32 summation order."""
    hidden, weight, b, targets, grad_out = make_inputs(47, 31, 123, bias=True, ignore=True)
    outs = []
    for rows in (16, 47, 64):
        logp, _, _ = torch_linear_logprob(hidden, weight, targets, b, chunk_rows=rows)
        outs.append((logp, *torch.autograd.grad(logp, [hidden, weight, b], grad_out)))
    for other in outs[1:]:
        for a, e in zip(other, outs[0]):
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


def test_float64_gradcheck():
    """Finite differences agree with the analytic backward (float64, chunk boundary crossed)."""
    hidden, weight, b, targets, _ = make_inputs(9, 5, 13, bias=True, ignore=True, dtype=torch.float64)
    fn = lambda x, w, bb: torch_linear_logprob(x, w, targets, bb, temperature=0.8, chunk_rows=4)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (hidden, weight, b))


def test_frozen_weight_gets_no_gradient_and_hidden_grad_is_unchanged():
    hidden, weight, _, targets, grad_out = make_inputs(47, 31, 123, bias=False, ignore=True)
    frozen = weight.detach()
    logp = linear_logprob(hidden, frozen, targets)
    (grad,) = torch.autograd.grad(logp, [hidden], grad_out)
    ref_logp, _, _ = naive_linear_logprob(hidden, frozen, targets)
    (ref_grad,) = torch.autograd.grad(ref_logp, [hidden], grad_out)
    assert_close(grad, ref_grad, TOLERANCE[torch.float32], "d hidden")


def test_dispatcher_keeps_leading_dims_and_returns_named_output():
    hidden, weight, b, targets, _ = make_inputs(12, 31, 123, bias=True, ignore=True)
    x3, t3 = hidden.reshape(3, 4, 31), targets.reshape(3, 4)
    plain = linear_logprob(x3, weight, t3, b)
    assert isinstance(plain, torch.Tensor) and plain.shape == (3, 4)
    out = linear_logprob(x3, weight, t3, b, return_entropy=True)
    assert isinstance(out, LinearLogprobOutput) and out.lse is None and out.entropy.shape == (3, 4)
    torch.testing.assert_close(out.logprobs, plain)
    assert not out.entropy.requires_grad
    ref, _, ref_ent = naive_linear_logprob(hidden, weight, targets, b, return_entropy=True)
    assert_close(plain.reshape(-1), ref, TOLERANCE[torch.float32], "logp")
    assert_close(out.entropy.reshape(-1), ref_ent, TOLERANCE[torch.float32], "entropy")


def test_all_rows_ignored():
    hidden, weight, b, _, _ = make_inputs(6, 16, 40, bias=True, ignore=False)
    targets = torch.full((6,), IGNORE)
    logp = linear_logprob(hidden, weight, targets, b)
    assert (logp == 0).all()
    grads = torch.autograd.grad(logp.sum(), [hidden, weight, b])
    assert all((g == 0).all() for g in grads)


def test_empty_input():
    hidden = torch.zeros(0, 8, requires_grad=True)
    logp = linear_logprob(hidden, torch.randn(10, 8), torch.zeros(0, dtype=torch.long))
    assert logp.shape == (0,)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"targets": torch.tensor([0, 123, 1])}, ValueError, "targets holds 123"),
        ({"targets": torch.tensor([0, 1])}, ValueError, "targets must have shape"),
        ({"targets": torch.tensor([0.0, 1.0, 2.0])}, TypeError, "targets must be int64"),
        ({"weight": torch.randn(123, 30)}, ValueError, "disagree on H"),
        ({"weight": torch.randn(123, 31, dtype=torch.float64)}, TypeError, "share one floating dtype"),
        ({"bias": torch.randn(122)}, ValueError, "bias must be"),
        ({"temperature": 0.0}, ValueError, "temperature must be"),
    ],
    ids=["target-out-of-range", "target-shape", "target-dtype", "hidden-size", "dtype-mismatch", "bias-shape",
         "temperature"],
)
def test_bad_arguments_are_named(kwargs, error, match):
    args = {"hidden": torch.randn(3, 31), "weight": torch.randn(123, 31), "targets": torch.tensor([0, 5, IGNORE])}
    args.update(kwargs)
    with pytest.raises(error, match=match):
        linear_logprob(**args)


def test_backend_switch(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("STEER_KERNELS", raising=False)
    assert select_backend(cpu) == "torch"
    monkeypatch.setenv("STEER_KERNELS", "torch")
    assert select_backend(torch.device("cuda")) == "torch"
    monkeypatch.setenv("STEER_KERNELS", "cuda")
    with pytest.raises(ValueError, match="STEER_KERNELS='cuda'"):
        select_backend(cpu)
    monkeypatch.setenv("STEER_KERNELS", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        select_backend(cpu)


def test_chunk_rows_from_workspace_budget():
    # 32 MiB of fp32 (C, 49152) slab: 170 rows, rounded down to a multiple of 16.
    assert chunk_rows_for(49152, torch.float32) == 160
    # bf16 adds a bf16 slab beside the fp32 one: 6 bytes per element.
    assert chunk_rows_for(49152, torch.bfloat16) == 112
    assert chunk_rows_for(10**7, torch.float32) == 16  # never below the GEMM-efficiency floor


def test_package_imports_and_runs_without_triton():
    script = (
        "import sys; sys.modules['triton'] = None\n"  # makes `import triton` raise ImportError
        "import torch, steer.kernels as k\n"
        "from steer.kernels.logprob import triton_available\n"
        "assert not triton_available()\n"
        "x = torch.randn(4, 8); w = torch.randn(10, 8); t = torch.tensor([1, 2, 3, -100])\n"
        "print(k.linear_logprob(x, w, t).shape)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("STEER_KERNELS", "TRITON_INTERPRET")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "torch.Size([4])" in result.stdout
