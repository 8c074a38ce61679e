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

Projections are the model's own modules, so merged adapters, mixture layers
(:class:`steer.mixture.MixtureLinear`) and converted linears (:mod:`steer.linears`) work unchanged.
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
        cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, d): broadcast over heads
        half = self.head_dim // 2
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            h = self._norm(layer.input_layernorm, x)
            q = attn.q_proj(h).view(B, T, self.heads, self.head_dim).transpose(1, 2)  # (B, nh, T, d)
            k = attn.k_proj(h).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)  # (B, kv, T, d)
            v = attn.v_proj(h).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
            q = q * cos + torch.cat((-q[..., half:], q[..., :half]), dim=-1) * sin  # RoPE (rotate_half)
            k = k * cos + torch.cat((-k[..., half:], k[..., :half]), dim=-1) * sin
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
            mlp = layer.mlp
            x = x + mlp.down_proj(F.silu(mlp.gate_proj(h)) * mlp.up_proj(h))
        last = self._norm(self.inner.norm, x[:, -1:])  # (B, 1, H)
        return self.model.lm_head(last)[:, -1]  # (B, V)
