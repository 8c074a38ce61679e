"""``steer.train mixture``: one LoRA adapter per objective, trained jointly over sampled directions.

The loop is ``dpa``'s (directions, principle-guided pool, reward vectors, pairs by ``v . r``; see
:mod:`steer.training.dpa`) with a different policy: a :class:`MixturePolicy` holds k adapters on
the same layers (``steer.mixture``), and an example paired under ``v`` goes through the model whose
update is ``sum_i v_i * delta_W_i`` (every row of a batch its own ``v``). The prompt carries no
direction line. The reference of the preference losses is the base model (every adapter off).

Output: ``<output>/mixture`` (``mixture.json`` + one standard PEFT adapter per objective), served
with ``python -m steer.serve --mixture <output>/mixture``.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from steer.conditioning import strip_direction_line
from steer.errors import InvalidInput
from steer.files import json_lines
from steer.mixture import MixtureLinear, MixtureSpec, attach_mixture, init_adapters, mixing, save_mixture

from .pairs import parse_prompt
from .policy import Policy, PolicySpec, base_model_name, load_base, lora_targets

MIXTURE_DIR = "mixture"


class MixturePolicy(Policy):
    """k adapters mixed per row; ``rows()`` sets each row's direction for one forward."""

    def __init__(self, model: nn.Module, tokenizer, base_dir: Path, base_name: str, spec: MixtureSpec):
        super().__init__(model, tokenizer, base_dir, lora=True, base_name=base_name)
        self.spec = spec

    @property
    def base_model(self) -> nn.Module:
        return self.model

    def reference(self):
        """Every adapter off: the base model."""
        return mixing(self.model, None)

    def rows(self, examples, copies: int = 1):
        if any(e.direction is None for e in examples):
            raise ValueError("mixture training needs a direction on every example")
        device = next(p for p in self.model.parameters()).device
        weights = torch.tensor([e.direction for e in examples], dtype=torch.float32, device=device)  # (b, k)
        return mixing(self.model, weights.repeat(copies, 1))  # (copies * b, k): chosen rows, then rejected rows

    def save(self, output: str | Path) -> Path:
        spec = replace(self.spec, base_model=self.base_name)
        return save_mixture(self.model, Path(output) / MIXTURE_DIR, spec)  # written beside and renamed into place


def build_mixture_policy(spec: PolicySpec, objectives: tuple[str, ...], device: torch.device | str = "cpu",
                         base=None) -> MixturePolicy:
    """The base model (frozen) with one fresh LoRA adapter per objective on ``spec.lora_target``
    (PEFT's init: A random, seeded by ``spec.seed``; B zero, so training starts at the base model)."""
    lm, tokenizer, base_dir = base if base is not None else load_base(spec.model, spec.dtype, device)
    if spec.lora_dropout:
        raise InvalidInput("lora_dropout", "is not supported by mixture adapters; use 0")
    targets = lora_targets(spec.lora_target)
    for p in lm.parameters():
        p.requires_grad_(False)
    attach_mixture(lm, objectives, spec.lora_r, spec.lora_alpha, targets)
    init_adapters(lm, seed=spec.seed)
    names = sorted({n.rsplit(".", 1)[-1] for n, m in lm.named_modules() if isinstance(m, MixtureLinear)})
    for n, p in lm.named_parameters():
        p.requires_grad_(n.endswith(".lora_A") or n.endswith(".lora_B"))
    lm.to(device).train()
    name = base_model_name(spec.model, base_dir)
    mix = MixtureSpec(tuple(objectives), spec.lora_r, float(spec.lora_alpha), tuple(names), name)
    return MixturePolicy(lm, tokenizer, base_dir, name, mix)


def read_pair_files(paths, objectives: tuple[str, ...]) -> list[dict]:
    """pairs.jsonl rows of ``dpa``/``mixture`` runs, checked, for mixture training: every row needs a
    prompt, chosen, rejected and a ``direction`` naming every objective; the direction line in the
    prompt (a dpa run's) is removed. Errors name file:line and the field."""
    out = []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise InvalidInput("data", f"{path}: no such file")
        for n, row in json_lines(path):  # encoding and JSON syntax errors name file:line
            where = f"{path}:{n}"
            if not isinstance(row, dict):
                raise InvalidInput("data", f"{where}: a row must be a JSON object")
            for key in ("prompt", "chosen", "direction"):
                if key not in row:
                    raise InvalidInput("data", f"{where}: missing {key!r} (rows of a dpa run's pairs.jsonl have it)")
            direction = row["direction"]
            if not isinstance(direction, dict) or set(direction) != set(objectives):
                raise InvalidInput("data",
                                   f"{where}: direction must name exactly {list(objectives)}, got {direction!r}")
            weights = {}
            for o in objectives:
                w = direction[o]
                if isinstance(w, bool) or not isinstance(w, (int, float)) or not (0 <= w <= 1):
                    raise InvalidInput("data", f"{where}: direction.{o} must be a number in [0, 1], got {w!r}")
                weights[o] = float(w)
            if abs(sum(weights.values()) - 1) > 1e-3:
                raise InvalidInput("data", f"{where}: direction weights must sum to 1, got {sum(weights.values()):.4f}")
            for key in ("chosen", "rejected"):
                if row.get(key) is not None and not isinstance(row[key], str):
                    raise InvalidInput("data", f"{where}: {key} must be a string")
            if not row["chosen"]:
                raise InvalidInput("data", f"{where}: chosen is empty")
            try:
                prompt = strip_direction_line(parse_prompt(row["prompt"]))
            except InvalidInput as e:
                raise InvalidInput("data", f"{where}: {e.field}: {e.reason}") from None
            out.append({"prompt": prompt, "chosen": row["chosen"], "rejected": row.get("rejected"),
                        "direction": weights, "chosen_finished": bool(row.get("chosen_finished", True)),
                        "rejected_finished": bool(row.get("rejected_finished", True)), "where": where})
    if not out:
        raise InvalidInput("data", f"no pairs in {', '.join(map(str, paths))}")
    return out
