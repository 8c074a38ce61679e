"""The policy being trained: a base causal LM with a LoRA adapter (default) or all weights trainable.

LoRA: the reference model of the preference losses is the *same* model with the adapter switched
off (peft's ``disable_adapter()``), so no second copy is held. Full fine-tuning has no such switch:
its reference log-probs are computed once before training (see ``dpo.py``).

Outputs are standard: ``adapter/`` is a PEFT adapter directory whose ``adapter_config.json`` names
the resolved base model directory, loadable with plain transformers + peft and by
``steer.models.load_model(base, adapter=...)`` (what ``python -m steer.serve --adapter`` does);
``model/`` (full fine-tuning) is a transformers model directory with the tokenizer.
"""

from __future__ import annotations

import contextlib
import types
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from steer.errors import InvalidInput

from .checkpoint import atomic_directory_write

ADAPTER_DIR = "adapter"
MODEL_DIR = "model"


@dataclass(frozen=True)
class PolicySpec:
    """What to train; the command configs carry these fields."""

    model: str = "default"
    full: bool = False
    lora_r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    lora_target: str = "all-linear"
    dtype: str = "float32"
    seed: int = 0
    gradient_checkpointing: bool = False
    init_adapter: str | None = None  # start the LoRA weights from this adapter ('default': the shipped one)


def lora_targets(spec: str):
    """``all-linear`` (peft's every linear layer except the LM head) or a comma-separated module list."""
    spec = spec.strip()
    if spec == "all-linear":
        return "all-linear"
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if not names:
        raise InvalidInput("lora_target", "is empty: use 'all-linear' or module names such as q_proj,v_proj")
    if "lm_head" in names:
        raise InvalidInput("lora_target",
                           "lm_head cannot carry an adapter: log-probs use its weight directly in the fused op")
    return names


class Policy:
    """The trainable model (``model``: a PeftModel, or the causal LM itself for full fine-tuning)."""

    def __init__(self, model: nn.Module, tokenizer, base_dir: Path, lora: bool, base_name: str | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.base_dir = base_dir
        self.lora = lora
        # What saved configs name as their base: the model id for the default model (the converted
        # directory is a cache path of this machine), else the resolved directory the user gave.
        self.base_name = base_name or str(base_dir)

    @property
    def base_model(self) -> nn.Module:
        """The causal LM inside (for LoRA its modules hold the adapter layers, switched by ``reference()``)."""
        return self.model.get_base_model() if self.lora else self.model

    def reference(self):
        """Context in which ``model`` computes the reference policy: the adapter disabled (LoRA only)."""
        if not self.lora:
            raise RuntimeError("full fine-tuning has no live reference; use precomputed reference log-probs")
        return self.model.disable_adapter()

    def rows(self, examples, copies: int = 1):
        """Context for one forward over ``copies`` stacked copies of ``examples``' rows (pairs: chosen
        rows then rejected rows). A plain policy needs nothing per row; a mixture sets each row's direction."""
        return contextlib.nullcontext()

    def named_trainable(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def trainable_state(self) -> dict[str, torch.Tensor]:
        # Tied weights (embeddings = LM head) are one parameter and appear once in named_parameters.
        return {n: p.detach() for n, p in self.named_trainable()}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        params = dict(self.named_trainable())
        missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        if missing or unexpected:
            raise ValueError("checkpoint does not match this policy: missing "
                             f"{missing[:3]}, unexpected {unexpected[:3]}")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(state[name].to(p.device, p.dtype))

    def save(self, output: str | Path) -> Path:
        """Write ``adapter/`` (LoRA) or ``model/`` (full) into ``output`` atomically; returns its path."""
        output = Path(output)
        if self.lora:
            def write(tmp: Path):
                self.model.peft_config["default"].base_model_name_or_path = self.base_name
                # Embeddings are never adapted here; "auto" would look the base up on the hub to decide.
                self.model.save_pretrained(str(tmp), save_embedding_layers=False)
            return atomic_directory_write(output / ADAPTER_DIR, write)

        def write_full(tmp: Path):
            self.model.config._name_or_path = self.base_name
            self.model.save_pretrained(str(tmp))
            self.tokenizer.save_pretrained(str(tmp))
        return atomic_directory_write(output / MODEL_DIR, write_full)


def load_base(model: str, dtype: str = "float32", device: torch.device | str = "cpu"):
    """``(causal LM, tokenizer, resolved base dir)`` from a ``--model`` value (nothing downloaded)."""
    from transformers import AutoModelForCausalLM

    from steer.models import DTYPES, load_tokenizer, resolve_model_dir

    if dtype not in DTYPES:
        raise InvalidInput("dtype", f"must be one of {', '.join(DTYPES)}, got {dtype!r}")
    base_dir = resolve_model_dir(model).resolve()
    tokenizer = load_tokenizer(str(base_dir))
    lm = AutoModelForCausalLM.from_pretrained(str(base_dir), local_files_only=True, dtype=getattr(torch, dtype))
    return lm.to(device), tokenizer, base_dir


def build_policy(spec: PolicySpec, device: torch.device | str = "cpu", base=None) -> Policy:
    """Load the base (or take ``base = (lm, tokenizer, dir)``), add a fresh LoRA adapter unless
    ``spec.full``. The adapter's initialisation is seeded by ``spec.seed``."""
    lm, tokenizer, base_dir = base if base is not None else load_base(spec.model, spec.dtype, device)
    if spec.gradient_checkpointing:
        # Non-reentrant checkpointing needs no input that requires grad, so it works under LoRA
        # (frozen embeddings) as well; transformers applies it only in train mode.
        kwargs = {"use_reentrant": False}
        if hasattr(lm, "activation_checkpointing_enable"):  # transformers >= 5 renamed it
            lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        lm.config.use_cache = False
    if spec.full:
        for p in lm.parameters():
            p.requires_grad_(True)
        lm.train()
        return Policy(lm, tokenizer, base_dir, lora=False, base_name=base_model_name(spec.model, base_dir))
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=spec.lora_r, lora_alpha=spec.lora_alpha, lora_dropout=spec.lora_dropout,
        target_modules=lora_targets(spec.lora_target), task_type="CAUSAL_LM", bias="none",
    )
    with _seeded(spec.seed), warnings.catch_warnings():
        # peft calls a transformers property that transformers 5 deprecates; nothing for a user to act on.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        try:
            peft_model = get_peft_model(lm, config)
        except ValueError as e:  # peft names the target modules it could not find
            raise InvalidInput("lora_target", str(e)) from e
    if spec.init_adapter is not None:
        load_init_adapter(peft_model, spec)
    fuse_lora_updates(peft_model)
    name = base_model_name(spec.model, base_dir)
    peft_model.peft_config["default"].base_model_name_or_path = name
    peft_model.to(device)
    peft_model.train()
    return Policy(peft_model, tokenizer, base_dir, lora=True, base_name=name)


def init_adapter_path(init_adapter: str, model: str, lora_r: int, lora_alpha: float) -> Path:
    """The directory of an ``--init-adapter`` value ('default': the shipped adapter), checked against
    the run's rank and alpha; errors name ``init_adapter``, ``lora_r`` or ``lora_alpha``."""
    from steer.adapters import read_adapter_config
    from steer.models import resolve_adapter

    try:  # 'default' only with the default model; a directory needs adapter_config.json
        path, _ = resolve_adapter(init_adapter, model)
    except InvalidInput as e:
        raise InvalidInput("init_adapter", e.reason) from None
    config = read_adapter_config(path)
    for fld, key, want in (("lora_r", "r", lora_r), ("lora_alpha", "lora_alpha", lora_alpha)):
        if float(config.get(key, -1)) != float(want):
            raise InvalidInput(fld, f"is {want} but init_adapter {path} has {key}={config.get(key)!r}; "
                                    f"pass --{fld.replace('_', '-')} {config.get(key)}")
    return path


def load_init_adapter(peft_model: nn.Module, spec: PolicySpec) -> Path:
    """Copy the LoRA weights of the PEFT adapter ``spec.init_adapter`` into ``peft_model``'s fresh adapter
    (continued training). Its rank and alpha must be the spec's and its weights must cover exactly the
    adapted modules; anything else is refused, naming the field. Returns the adapter directory."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = init_adapter_path(spec.init_adapter, spec.model, spec.lora_r, spec.lora_alpha)
    weights = path / "adapter_model.safetensors"
    if not weights.is_file():
        raise InvalidInput("init_adapter", f"{weights}: no such file (only safetensors adapters are read)")
    state = load_file(str(weights))
    result = set_peft_model_state_dict(peft_model, state)
    unexpected = [k for k in result.unexpected_keys if "lora_" in k]
    missing = [k for k in result.missing_keys if ".lora_" in k]
    if unexpected or missing:
        raise InvalidInput("lora_target", f"{spec.lora_target!r} does not adapt the modules of init_adapter {path}: "
                                          f"{len(missing)} adapted weights missing from it (e.g. {missing[:2]}), "
                                          f"{len(unexpected)} of its weights not adapted here (e.g. {unexpected[:2]})")
    return path


def _fused_lora_forward(self, x, *args, **kwargs):
    """peft's ``lora.Linear.forward`` for plain LoRA with the update fused into one GEMM:
    ``addmm(base(x), A(x), B^T, alpha=scaling)`` instead of ``base(x) + B(A(x)) * scaling``, which
    allocates and reads two more output-sized tensors per adapted layer and pass (forward and
    backward), ~8% of a CPU training step. Anything else (adapter off, merged, mixed-batch
    adapter names, DoRA or another variant, extra arguments) takes peft's own path."""
    if (args or kwargs or self.disable_adapters or self.merged
            or any(a not in self.lora_A or a in self.lora_variant or self.lora_B[a].bias is not None
                   for a in self.active_adapters)):
        return type(self).forward(self, x, *args, **kwargs)
    result = self.base_layer(x)
    dtype = result.dtype
    for a in self.active_adapters:
        lora_a, lora_b = self.lora_A[a], self.lora_B[a]
        h = lora_a(self.lora_dropout[a](x.to(lora_a.weight.dtype)))  # (..., r)
        out = result.to(lora_b.weight.dtype).reshape(-1, result.shape[-1])  # (N, out)
        result = torch.addmm(out, h.reshape(-1, h.shape[-1]), lora_b.weight.t(),
                             alpha=self.scaling[a]).view(result.shape)
    return result.to(dtype)


def fuse_lora_updates(peft_model: nn.Module) -> int:
    """Give every plain peft LoRA Linear of ``peft_model`` the fused forward (on the instances: peft
    itself and other models are untouched; saved adapters are the same files). Returns how many."""
    from peft.tuners.lora import Linear as LoraLinear

    n = 0
    for module in peft_model.modules():
        if type(module) is LoraLinear and not getattr(module, "fan_in_fan_out", False):
            module.forward = types.MethodType(_fused_lora_forward, module)
            n += 1
    return n


def base_model_name(model: str, base_dir: Path) -> str:
    """The base a saved adapter or model names: the Hub id for ``--model default`` or a Hub id (so the
    file means the same on every machine, and ``steer.serve`` accepts it as a shipped adapter), else
    the resolved directory of the ``--model`` the run was given (a local model has no id)."""
    from steer.models import DEFAULT_MODEL, DEFAULT_MODEL_NAME, canonical_model, is_hub_id

    if canonical_model(model) == DEFAULT_MODEL:
        return DEFAULT_MODEL_NAME
    return model if is_hub_id(model) else str(base_dir)


@contextlib.contextmanager
def _seeded(seed: int):
    """Seed torch for the adapter's random init without disturbing the caller's RNG stream."""
    state = torch.get_rng_state()
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(state)
