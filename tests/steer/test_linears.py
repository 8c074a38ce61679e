"""oneDNN-prepacked linears (steer.linears): the same fp32 function as torch's linear layers, for
plain layers, a whole model, and mixture rows in a served batch; weights untouched."""

import pytest
import torch
from torch import nn

from steer.linears import available, pack_weight, packed_linear, prepack_linears

pytestmark = pytest.mark.skipif(not available(), reason="this torch build has no oneDNN linear reorder")


def test_packed_linear_equals_torch_linear():
    g = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(96, 40, generator=g), torch.randn(96, generator=g)
    packed = pack_weight(weight)
    for shape in [(1, 40), (7, 40), (3, 5, 40), (300, 40)]:
        x = torch.randn(*shape, generator=g)
        torch.testing.assert_close(packed_linear(x, packed, bias), torch.nn.functional.linear(x, weight, bias),
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(packed_linear(x, packed, None), x @ weight.t(), atol=1e-5, rtol=1e-5)
    x = torch.randn(4, 80, generator=g)[:, ::2]  # a non-contiguous input
    torch.testing.assert_close(packed_linear(x, packed, bias), torch.nn.functional.linear(x, weight, bias),
                               atol=1e-5, rtol=1e-5)


def test_prepacked_model_gives_the_same_logits(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    linears = sum(type(m) is nn.Linear for m in model.modules())
    assert prepack_linears(model) == linears > 0
    assert prepack_linears(model) == 0  # already packed: nothing to do
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())  # the weights stay as they were
    assert not any(p.requires_grad for p in model.parameters())
    ids = torch.randint(3, 200, (3, 11), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        torch.testing.assert_close(model(ids).logits, plain(ids).logits, atol=1e-4, rtol=1e-4)


def test_prepacked_mixture_rows_equal_the_unpacked_serving_path(tiny_model_dir, random_mixture, tmp_path, monkeypatch):
    """A served mixture (CPU fast path) packed and unpacked: the same logits for mixed rows and plain rows."""
    from steer.mixture import mixing, mixture_layers
    from steer.models import load_model

    path = random_mixture(tmp_path / "mix", seed=3)
    g = torch.Generator().manual_seed(3)
    plain = load_model(str(tiny_model_dir), mixture=str(path))
    packed = load_model(str(tiny_model_dir), mixture=str(path), linears="prepacked")
    assert all(getattr(layer.base, "linear_kind", None) == "prepacked" for _, layer in mixture_layers(packed.model))
    ids = torch.randint(3, 200, (3, 9), generator=g)
    from steer.mixture import MixtureLinear

    served = []
    original = MixtureLinear._serving_forward
    monkeypatch.setattr(MixtureLinear, "_serving_forward", lambda self, x, w: served.append(1) or original(self, x, w))
    rows = torch.tensor([[1.0, 0.0, 0.0], [0.2, 0.5, 0.3], [0.0, 0.0, 0.0]])
    with torch.inference_mode():
        for loaded in (plain, packed):
            assert loaded.mixture is not None
        with mixing(plain.model, rows):
            expected = plain.model(ids).logits
        with mixing(packed.model, rows):
            got = packed.model(ids).logits
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(packed.model(ids).logits, plain.model(ids).logits, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(expected[0], expected[1], atol=1e-3)  # the rows really mix differently
    assert len(served) == 2 * len(list(mixture_layers(plain.model)))  # both mixed forwards took the serving path


def test_int8_quantisation_is_within_half_a_step_per_channel():
    from steer.linears import quantize_int8

    g = torch.Generator().manual_seed(4)
    w = torch.randn(50, 70, generator=g) * torch.linspace(0.01, 3.0, 50)[:, None]  # channels of very different scales
    w[7] = 0.0  # an all-zero channel stays exact
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and int(q.abs().max()) == 127 and scale.shape == (50,)
    torch.testing.assert_close(scale[:7], w[:7].abs().amax(1) / 127)
    err = (q.float() * scale[:, None] - w).abs()
    assert bool((err <= scale[:, None] / 2 + 1e-7).all())
    assert bool((q[7] == 0).all())


def test_int8_linear_equals_its_dequantised_reference():
    """The kernel computes x (rounded to bf16) times the dequantised weight, accumulating in fp32;
    its bf16 output is within bf16 rounding (2^-8 relative) of that product."""
    from steer.linears import int8_linear, quantize_int8

    g = torch.Generator().manual_seed(5)
    w, bias = torch.randn(96, 64, generator=g), torch.randn(96, generator=g)
    q, scale = quantize_int8(w)
    for shape in [(1, 64), (2, 3, 64), (40, 64)]:
        x = torch.randn(*shape, generator=g)
        ref = x.to(torch.bfloat16).float() @ (q.float() * scale.to(torch.bfloat16).float()[:, None]).t() + bias
        got = int8_linear(x, q, scale.to(torch.bfloat16), bias)
        assert got.shape == ref.shape and got.dtype == torch.float32
        torch.testing.assert_close(got, ref, atol=2e-2, rtol=1e-2)


def test_int8_model_stays_close_to_fp32_and_resolution_names_the_flag(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from steer.errors import InvalidInput
    from steer.linears import convert_linears, resolve_linears

    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    n = convert_linears(model, "int8")
    assert n == sum(type(m) is nn.Linear for m in model.modules()) and convert_linears(model, "prepacked") == 0
    assert {m.linear_kind for m in model.modules() if type(m) is nn.Linear} == {"int8"}
    # The reference: each linear in plain torch on the dequantised weight, input and output rounded to bf16.
    import types

    from steer.linears import quantize_int8

    def reference_forward(self, x):
        q, scale = quantize_int8(self.weight)
        w = q.float() * scale.to(torch.bfloat16).float()[:, None]
        return (x.to(torch.bfloat16).float() @ w.t()).to(torch.bfloat16).to(x.dtype)

    for m in plain.modules():
        if type(m) is nn.Linear:
            m.forward = types.MethodType(reference_forward, m)
    ids = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(6))
    with torch.inference_mode():
        got, ref = model(ids).logits, plain(ids).logits
    torch.testing.assert_close(got, ref, atol=2e-2, rtol=2e-2)

    cpu = torch.device("cpu")
    assert resolve_linears("auto", cpu, "float32") == "prepacked"
    assert resolve_linears("auto", cpu, "bfloat16") == "torch"
    assert resolve_linears("int8", cpu, "float32") == "int8"
    with pytest.raises(InvalidInput, match="linears"):
        resolve_linears("int8", cpu, "bfloat16")
    with pytest.raises(InvalidInput, match="linears"):
        resolve_linears("int4", cpu, "float32")
    with pytest.raises(ValueError, match="linears"):
        convert_linears(model, "fast")


def test_int8_mixture_rows_stay_near_fp32(tiny_model_dir, random_mixture, tmp_path):
    """MIXTURE rows on int8 base layers (the small A_cat and B_cat stay fp32): the base goes through
    the int8 kernel, and the mixed logits stay within int8 noise of the fp32 ones."""
    from steer.mixture import mixing, mixture_layers
    from steer.models import load_model

    path = random_mixture(tmp_path / "mix", seed=8)
    int8 = load_model(str(tiny_model_dir), mixture=str(path), linears="int8")
    plain = load_model(str(tiny_model_dir), mixture=str(path))
    assert all(layer.base.linear_kind == "int8" for _, layer in mixture_layers(int8.model))
    ids = torch.randint(3, 200, (2, 9), generator=torch.Generator().manual_seed(8))
    rows = torch.tensor([[0.2, 0.5, 0.3], [1.0, 0.0, 0.0]])
    with torch.inference_mode(), mixing(int8.model, rows), mixing(plain.model, rows):
        got, ref = int8.model(ids).logits, plain.model(ids).logits
    assert not torch.equal(got, ref) and (got - ref).abs().max() < 0.1 * ref.abs().max()
