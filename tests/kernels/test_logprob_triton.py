"""Triton linear_logprob kernels against the naive reference: values and every gradient.

Without a GPU the kernels run under the Triton interpreter (numpy, fp32 only, small shapes).
TRITON_INTERPRET=1 must be in the environment before `triton` itself is imported (triton's own
`tl.zeros`, `tl.sum`... are jit functions decorated at import), and in a shared pytest process
something may have imported triton already. So without CUDA this module re-runs itself in a
child pytest whose environment has TRITON_INTERPRET=1 from the start
(`test_triton_kernels_under_interpreter`); in this process its kernel tests are skipped.
Run `TRITON_INTERPRET=1 pytest tests/kernels/test_logprob_triton.py` to see them one by one.
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")

from steer.kernels import linear_logprob, naive_linear_logprob  # noqa: E402
from steer.kernels.logprob_torch import torch_linear_logprob  # noqa: E402

CUDA = torch.cuda.is_available()
RUN_HERE = CUDA or os.environ.get("TRITON_INTERPRET") == "1"
kernel_test = pytest.mark.skipif(not RUN_HERE, reason="runs in the TRITON_INTERPRET=1 child process")
IGNORE = -100
# Normalised max error (max|err| / max|expected|). fp32 interpreter: tl.dot is a numpy fp32
# matmul, tiles change only summation order (measured <= 2e-6). bf16 on GPU: see test_logprob.py
# (8-bit mantissa logits); the atomics add in fp32, so no extra term.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1.5e-2}


@pytest.mark.skipif(RUN_HERE, reason="kernel tests run in this process")
def test_triton_kernels_under_interpreter(run_under_triton_interpreter):
    run_under_triton_interpreter(__file__, 13)


@pytest.fixture(scope="module")
def triton_path():
    from steer.kernels import logprob_triton

    return logprob_triton


def make_inputs(n, h, v, *, bias, ignore, device="cpu", dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen)
    weight = torch.randn(v, h, generator=gen) * h**-0.5 * 3
    b = torch.randn(v, generator=gen) * 0.5 if bias else None
    targets = torch.randint(0, v, (n,), generator=gen)
    if ignore:
        targets[::4] = IGNORE
    grad_out = torch.randn(n, generator=gen)
    leaves = [t.to(device, dtype).requires_grad_() if t is not None else None for t in (hidden, weight, b)]
    return (*leaves, targets.to(device), grad_out.to(device))


def assert_close(actual, expected, tol, what):
    err = (actual.double() - expected.double()).abs().max().item()
    scale = max(expected.double().abs().max().item(), 1e-12)
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol:g} x max|expected| {scale:.3g}"


def check(fn, shape, *, bias, ignore, temperature, device="cpu", dtype=torch.float32, **kwargs):
    hidden, weight, b, targets, grad_out = make_inputs(*shape, bias=bias, ignore=ignore, device=device, dtype=dtype)
    logp, lse, ent = fn(hidden, weight, targets, b, temperature=temperature, ignore_index=IGNORE,
                        return_lse=True, return_entropy=True, **kwargs)
    params = [t for t in (hidden, weight, b) if t is not None]
    grads = torch.autograd.grad(logp, params, grad_out)
    up = [t.detach().float().requires_grad_() for t in params]
    ref_b = up[2] if b is not None else None
    ref_logp, ref_lse, ref_ent = naive_linear_logprob(up[0], up[1], targets, ref_b, temperature=temperature,
                                                      return_lse=True, return_entropy=True)
    ref_grads = torch.autograd.grad(ref_logp, up, grad_out)
    tol = TOLERANCE[dtype]
    for name, a, e in zip(("logp", "lse", "entropy"), (logp, lse, ent), (ref_logp, ref_lse, ref_ent)):
        assert a.dtype == torch.float32
        assert_close(a, e, tol, name)
    for name, g, e in zip(("d hidden", "d weight", "d bias"), grads, ref_grads):
        assert g.dtype == dtype
        assert_close(g, e, tol, name)


@kernel_test
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("ignore", [False, True], ids=["all-valid", "ignored-rows"])
def test_kernels_match_naive_irregular_shape(triton_path, bias, temperature, ignore):
    # 16/32/16 tiles: 3 row blocks, 4 vocab tiles, 2 K tiles, each with a masked tail.
    check(triton_path.triton_linear_logprob, (47, 31, 123), bias=bias, ignore=ignore, temperature=temperature,
          block_n=16, block_v=32, block_h=16)


@kernel_test
@pytest.mark.parametrize("shape", [(256, 64, 1000), (5, 16, 40)], ids=lambda s: "x".join(map(str, s)))
def test_kernels_match_naive_default_blocks(triton_path, shape):
    check(triton_path.triton_linear_logprob, shape, bias=True, ignore=True, temperature=0.7)


@kernel_test
def test_dispatcher_runs_triton_when_forced(triton_path, monkeypatch):
    monkeypatch.setenv("STEER_KERNELS", "triton")
    hidden, weight, b, targets, grad_out = make_inputs(20, 24, 70, bias=True, ignore=True)
    calls = []
    real = triton_path.triton_linear_logprob
    monkeypatch.setattr(triton_path, "triton_linear_logprob", lambda *a, **k: calls.append(1) or real(*a, **k))
    logp = linear_logprob(hidden.reshape(4, 5, 24), weight, targets.reshape(4, 5), b)
    assert calls, "STEER_KERNELS=triton did not reach the Triton path"
    ref, _, _ = torch_linear_logprob(hidden, weight, targets, b)
    assert_close(logp.reshape(-1), ref, TOLERANCE[torch.float32], "logp")
    grads = torch.autograd.grad(logp.reshape(-1), [hidden, weight, b], grad_out)
    ref_grads = torch.autograd.grad(ref, [hidden, weight, b], grad_out)
    for name, g, e in zip(("d hidden", "d weight", "d bias"), grads, ref_grads):
        assert_close(g, e, TOLERANCE[torch.float32], name)


@kernel_test
def test_frozen_weight_skips_dw(triton_path):
    hidden, weight, _, targets, grad_out = make_inputs(20, 24, 70, bias=False, ignore=True)
    logp, _, _ = triton_path.triton_linear_logprob(hidden, weight.detach(), targets, block_n=16, block_v=32, block_h=16)
    (grad,) = torch.autograd.grad(logp, [hidden], grad_out)
    ref, _, _ = naive_linear_logprob(hidden, weight.detach(), targets)
    (ref_grad,) = torch.autograd.grad(ref, [hidden], grad_out)
    assert_close(grad, ref_grad, TOLERANCE[torch.float32], "d hidden")


@kernel_test
def test_block_sizes_are_validated(triton_path):
    hidden, weight, _, targets, _ = make_inputs(4, 16, 40, bias=False, ignore=False)
    with pytest.raises(ValueError, match="block_v must be a power of two"):
        triton_path.triton_linear_logprob(hidden, weight, targets, block_v=48)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(47, 31, 123), (256, 64, 1000), (1024, 576, 4099)],
                         ids=lambda s: "x".join(map(str, s)))
def test_kernels_on_gpu(triton_path, dtype, shape):
    check(triton_path.triton_linear_logprob, shape, bias=True, ignore=True, temperature=0.7, device="cuda", dtype=dtype)
