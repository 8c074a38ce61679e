"""oneDNN-prepacked linears (steer.prepack): the same fp32 function as torch's linear layers, for
plain layers, a whole model, and mixture rows in a served batch; weights untouched."""

import pytest
import torch
from torch import nn

from steer.prepack import available, pack_weight, packed_linear, prepack_linears

pytestmark = pytest.mark.skipif(not available(), reason="this torch build has no oneDNN linear reorder")


def test_packed_linear_equals_torch_linear():
    g = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(96, 40, generator=g), torch.randn(96, generator=g)
    packed = pack_weight(weight)
    for shape in [(1, 40), (7, 40), (3, 5, 40), (300, 40)]:
        x = torch.randn(*shape, generator=g)
        torch.testing.assert_close(packed_linear(x, packed, bias), torch.nn.functional.linear(x, weight, bias), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(packed_linear(x, packed, None), x @ weight.t(), atol=1e-5, rtol=1e-5)
    x = torch.randn(4, 80, generator=g)[:, ::2]  # a non-contiguous input
    torch.testing.assert_close(packed_linear(x, packed, bias), torch.nn.functional.linear(x, weight, bias), atol=1e-5, rtol=1e-5)


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


def test_prepacked_mixture_rows_equal_the_unpacked_serving_path(tiny_model_dir, tmp_path, monkeypatch):
    """A served mixture (CPU fast path) packed and unpacked: the same logits for mixed rows and plain rows."""
    from steer.mixture import MixtureSpec, attach_mixture, mixing, mixture_layers, save_mixture
    from steer.models import load_model
    from transformers import AutoModelForCausalLM

    objectives = ("helpfulness", "creativity", "conciseness")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    attach_mixture(model, objectives, 4, 8.0)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, layer in mixture_layers(model):
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g))
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g))
    path = save_mixture(model, tmp_path / "mix", MixtureSpec(objectives, 4, 8.0, (), "tiny"))
    plain = load_model(str(tiny_model_dir), mixture=str(path))
    packed = load_model(str(tiny_model_dir), mixture=str(path), prepack=True)
    assert all(getattr(layer.base, "_packed_weight", None) is not None for _, layer in mixture_layers(packed.model))
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
