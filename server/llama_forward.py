"""The engine's own forward for Llama-family models (SmolLM2 is one): the same math as transformers'
``LlamaForCausalLM`` without its per-call machinery.

transformers' forward is general: per decoder layer and step it goes through keyword-argument
deprecation wrappers, the gradient-checkpointing layer's ``__call__``, an attention-interface
lookup, mask creation and output dataclasses. For a 30-layer model decoding one token that is
hundreds of small Python calls per step, on a step whose useful work is ~200 GEMV/GEMMs. Here one
loop does what the engine needs and nothing else:

* embeddings -> per layer: RMSNorm, q/k/v projections, RoPE (cos/sin computed once per forward by
  the model's own rotary module), the cache's ``update`` (the paged KV cache writes in place and
  hands back each row's keys/values), SDPA with the engine's additive mask, o projection, residual,
  RMSNorm, ``down(silu(gate(x)) * up(x))``, residual;
* the final norm and the LM head on the last position of each row only.

Projections that read the same input run as one GEMM (:class:`FusedProjections`): q/k/v, and
gate/up. At one row a decode step is ~200 small GEMVs whose fixed cost per call is a large part
of the step: measured in bf16 on 2 cores, 30 layers' projections took 21.5 ms as 7 calls per layer
and 15.7 ms as 4 (at 32 rows 26 -> 20 ms). The modules' weights become views of the fused buffer
(no second copy), so the model, its ``state_dict`` and transformers' forward see the same values;
a weight whose storage is replaced later (``.data = ...``) is noticed and the group is rebuilt.
Mixture layers (:class:`steer.mixture.MixtureLinear`, prepared for serving) fuse with their
adapters' ``A`` stacks in the same buffer: one GEMM gives every projection's base output and its
adapters' shrink, so MIXTURE rows cost one more ``addmm`` per projection. ``prepacked`` linears
(:mod:`steer.linears`, fp32 on the CPU) fuse too, with the fused weight reordered for oneDNN once
more (the layers keep their own packed weights for transformers' forward: about +280 MB for the
default model; measured at one row, 30 layers' q/k/v and gate/up 18 -> 12 ms), mixture layers
over them as well (their A stacks in a second GEMM). ``int8`` layers run module by module, unchanged.
Grouped-query attention follows transformers' SDPA path: a one-token step folds each key/value
head's query heads into the query-length axis (no copy of K/V); a longer forward repeats K/V.

:func:`supports` says which models this covers (Llama architecture, SDPA or eager attention, no
attention/MLP bias, SiLU); others run transformers' forward. Tests compare both on the tiny model
and, as a slow test, on the default one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from steer.linears import pack_weight, packed_linear


def supports(model: nn.Module) -> bool:
    """True for a transformers ``LlamaForCausalLM`` whose layers this forward reproduces exactly."""
    from transformers import LlamaForCausalLM

    if not isinstance(model, LlamaForCausalLM):  # a PeftModel around one runs transformers' forward
        return False
    cfg, inner = model.config, model.model
    if (getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False)
            or getattr(cfg, "hidden_act", "silu") != "silu"):
        return False
    if getattr(cfg, "_attn_implementation", "sdpa") not in ("sdpa", "eager"):
        return False
    return all(hasattr(layer, "self_attn") and hasattr(layer, "mlp") for layer in inner.layers)


def _plain(module: nn.Module, kind: str | None = None) -> bool:
    """An ``nn.Linear`` without bias computing ``x W^T`` as :mod:`steer.linears` ``kind`` says (None: torch's own)."""
    return type(module) is nn.Linear and module.bias is None and getattr(module, "linear_kind", None) == kind


def _prepared_mixture(module: nn.Module, kind: str | None = None) -> bool:
    """A MixtureLinear over a ``kind`` linear (see :func:`_plain`), prepared for serving (B carries its
    scale), or already fused."""
    from steer.mixture import MixtureLinear

    return (isinstance(module, MixtureLinear) and _plain(module.base, kind)
            and (module._serving is not None or isinstance(getattr(module, "_steer_fused", None), FusedProjections)))


def _pointers(watched: list[tuple[dict, str]]) -> list[int]:
    """Where each watched ``(module._parameters, name)`` weight's data lives now."""
    return [params[name].data_ptr() for params, name in watched]


class FusedProjections:
    """Linear layers that read the same input, computed by one GEMM over one ``(sum out [+ sum n*r], in)``
    buffer of which each module's weight (and a mixture layer's ``lora_A``) is a view.

    ``__call__(h (B, T, in), w_rep (B, n*r) or None) -> [y_i (B, T, out_i)]``: ``w_rep`` are the rows'
    mixture weights repeated per adapter rank (:class:`steer.mixture.MixState`), None when no row mixes.
    Build with :meth:`build`, which returns None for modules it cannot fuse."""

    def __init__(self, modules: list[nn.Module], mixture: bool, packed: bool = False):
        self.modules = modules
        self.mixture = mixture
        self.packed = None
        bases = [m.base if mixture else m for m in modules]
        self.outs = [b.weight.shape[0] for b in bases]
        parts = [b.weight.detach() for b in bases]
        if mixture:
            self.ranks = [m.lora_A.shape[0] for m in modules]
            parts += [m.lora_A.detach() for m in modules]
        with torch.no_grad():
            self.buffer = torch.cat(parts, dim=0).contiguous()  # (sum out [+ sum n*r], in)
            start = 0
            for b in bases:  # the modules read their rows of the buffer from now on
                b.weight.data = self.buffer[start:start + b.weight.shape[0]]
                start += b.weight.shape[0]
            if mixture:
                for m in modules:
                    m.lora_A.data = self.buffer[start:start + m.lora_A.shape[0]]
                    start += m.lora_A.shape[0]
                    m._serving = None  # its own [W; A] buffer is superseded by this one (and freed)
        self.base_rows = sum(self.outs)
        self.weight = self.buffer[:self.base_rows]  # (sum out, in): the bases alone
        if packed:  # steer.linears' prepacked layers: the fused weight reordered for oneDNN as well
            self.packed = pack_weight(self.weight)
        for m in modules:
            m._steer_fused = self
        # (module._parameters, name) of every weight read from the buffer: looked up without nn.Module's
        # __getattr__, so checking them all before each forward stays cheap; a replaced Parameter shows too.
        self.watched = [(b._parameters, "weight") for b in bases] + [(m._parameters, "lora_A") for m in modules
                                                                      if mixture]
        self._pointers = _pointers(self.watched)

    def current(self) -> bool:
        """True while every module still reads its rows of this buffer (no weight was replaced since)."""
        return _pointers(self.watched) == self._pointers

    @classmethod
    def build(cls, modules: list[nn.Module]) -> FusedProjections | None:
        """The fused group of ``modules`` (the one they already form when it is still current), or None
        when they cannot share a GEMM: not all plain (or all prepacked) linears or all prepared mixture
        layers of one stack, or weights (adapters' A stacks included) of different dtypes or devices."""
        group = getattr(modules[0], "_steer_fused", None)
        if isinstance(group, cls) and group.modules == modules and group.current():
            return group
        packed = False
        if all(_plain(m) for m in modules):
            mixture = False
        elif all(_plain(m, "prepacked") for m in modules):
            mixture, packed = False, True
        elif all(_prepared_mixture(m) for m in modules) or all(_prepared_mixture(m, "prepacked") for m in modules):
            mixture, packed = True, _prepared_mixture(modules[0], "prepacked")
            if len({(m.state is modules[0].state, m.rank) for m in modules}) != 1 or modules[0].state is None:
                return None
        else:
            return None
        weights = [(m.base if mixture else m).weight for m in modules] + [m.lora_A for m in modules if mixture]
        if len({(w.dtype, w.device, w.shape[1]) for w in weights}) != 1:  # one buffer: one dtype, device, width
            return None
        return cls(modules, mixture, packed)

    def __call__(self, h: Tensor, w_rep: Tensor | None) -> list[Tensor]:
        mixing = self.mixture and w_rep is not None
        if not mixing:
            if self.packed is not None:
                return list(packed_linear(h, self.packed, None).split(self.outs, dim=-1))
            return list(F.linear(h, self.weight).split(self.outs, dim=-1))  # (B, T, out_i) each
        B, T, _ = h.shape
        if self.packed is not None:  # the bases' GEMM from the oneDNN copy, the adapters' shrink beside it
            base = packed_linear(h, self.packed, None).view(B * T, -1)  # (B*T, sum out)
            shrunk = F.linear(h, self.buffer[self.base_rows:]).view(B * T, -1)  # (B*T, sum n*r)
        else:
            hz = F.linear(h, self.buffer).view(B * T, -1)  # (B*T, sum out + sum n*r): bases and every shrink
            base, shrunk = hz[:, :self.base_rows], hz[:, self.base_rows:]
        scale = w_rep.to(shrunk.dtype)[:, None, :]  # (B, 1, n*r)
        out = []
        for m, y, a in zip(self.modules, base.split(self.outs, dim=-1), shrunk.split(self.ranks, dim=-1)):
            hs = (a.view(B, T, -1) * scale).view(B * T, -1)  # (B*T, n*r)
            out.append(torch.addmm(y, hs, m.lora_B.t()).view(B, T, -1))
        return out


class LlamaForward:
    """``__call__(input_ids (B, T), position_ids (B, T), mask (B, 1, T, L) additive, cache) -> logits (B, V)``
    of the last column of each row. Built once per model (see module docstring)."""

    def __init__(self, model: nn.Module):
        if not supports(model):
            raise ValueError(
                "LlamaForward needs a transformers LlamaForCausalLM with SDPA/eager attention and no biases")
        cfg = model.config
        self.model = model
        self.inner = model.model
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.groups = self.heads // self.kv_heads
        self.scale = self.head_dim ** -0.5
        self.layers = list(self.inner.layers[: cfg.num_hidden_layers])
        self._fused: list[tuple[FusedProjections | None, FusedProjections | None]] = []
        self._fuse()

    def _fuse(self) -> None:
        """Per layer: q/k/v and gate/up as :class:`FusedProjections` where they can be (else None)."""
        self._fused = [(FusedProjections.build([a.q_proj, a.k_proj, a.v_proj]),
                        FusedProjections.build([m.gate_proj, m.up_proj]))
                       for a, m in ((layer.self_attn, layer.mlp) for layer in self.layers)]
        self._watched = [w for pair in self._fused for g in pair if g is not None for w in g.watched]
        self._pointers = _pointers(self._watched)  # checked before each forward

    def _mixture_rows(self) -> tuple[bool, Tensor | None]:
        """(whether the fused groups may run this forward, the rows' repeated mixture weights or None)."""
        state = getattr(self.model, "_steer_mixture", None)
        if state is None or state.weights is None:
            return True, None
        return state.w_rep is not None, state.w_rep  # per-token or per-model weights: module by module

    @staticmethod
    def _norm(norm: nn.Module, x: Tensor) -> Tensor:
        """transformers' LlamaRMSNorm: fp32 statistics, weight applied in the input dtype."""
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
        return norm.weight * h.to(x.dtype)

    def __call__(self, input_ids: Tensor, position_ids: Tensor, mask: Tensor, cache) -> Tensor:
        B, T = input_ids.shape
        x = self.inner.embed_tokens(input_ids)  # (B, T, H)
        cos, sin = self.inner.rotary_emb(x, position_ids)  # (B, T, d) each
        cos, sin = cos[:, :, None], sin[:, :, None]  # (B, T, 1, d): broadcast over heads
        half = self.head_dim // 2
        fusable, w_rep = self._mixture_rows()
        if fusable and _pointers(self._watched) != self._pointers:
            self._fuse()  # a weight was replaced since (e.g. an adapter merged by assigning .data)
        nh, kv, d = self.heads, self.kv_heads, self.head_dim
        for i, layer in enumerate(self.layers):
            attn, mlp = layer.self_attn, layer.mlp
            qkv, gate_up = self._fused[i] if fusable else (None, None)
            h = self._norm(layer.input_layernorm, x)
            if qkv is not None:
                q, k, v = qkv(h, w_rep)
            else:
                q, k, v = attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)
            # q and k rotate as one tensor (RoPE, rotate_half): (B, T, nh + kv, d)
            qk = torch.cat((q.view(B, T, nh, d), k.view(B, T, kv, d)), dim=2)
            qk = qk * cos + torch.cat((-qk[..., half:], qk[..., :half]), dim=-1) * sin
            q = qk[:, :, :nh].transpose(1, 2)  # (B, nh, T, d)
            k = qk[:, :, nh:].transpose(1, 2)  # (B, kv, T, d)
            v = v.view(B, T, kv, d).transpose(1, 2)
            k, v = cache.update(k, v, i)  # (B, kv, L, d): this row's visible keys/values
            if self.groups > 1 and T == 1:  # fold each kv head's query heads into the query axis
                o = F.scaled_dot_product_attention(q.reshape(B, self.kv_heads, self.groups, self.head_dim), k, v,
                                                   attn_mask=mask, scale=self.scale)  # (B, kv, groups, d)
                o = o.reshape(B, self.heads, 1, self.head_dim)
            else:
                if self.groups > 1:
                    k = k.repeat_interleave(self.groups, dim=1)
                    v = v.repeat_interleave(self.groups, dim=1)
                o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)  # (B, nh, T, d)
            x = x + attn.o_proj(o.transpose(1, 2).reshape(B, T, self.heads * self.head_dim))
            h = self._norm(layer.post_attention_layernorm, x)
            gate, up = gate_up(h, w_rep) if gate_up is not None else (mlp.gate_proj(h), mlp.up_proj(h))
            x = x + mlp.down_proj(F.silu(gate) * up)
        last = self._norm(self.inner.norm, x[:, -1:])  # (B, 1, H)
        return self.model.lm_head(last)[:, -1]  # (B, V)
