"""MIXTURE: k LoRA adapters (one per objective) on every adapted linear layer, mixed per row.

A :class:`MixtureLinear` replaces a target ``nn.Linear``; it keeps the base layer and the k adapters
stacked (``a_cat`` (k*r, in), ``b_cat`` (out, k*r), PEFT's A and B side by side), and computes

    y = base(x) + s * ((x A_cat^T) * w_rep) B_cat^T            (steer.kernels.mixture_lora)

where ``w`` is the direction of the row's sequence. Rows with different directions share one
forward; no weights are merged, so every request keeps its own mix. The directions for a forward
are set on the model with :func:`mixing` (one ``(batch, k)`` tensor for all layers); outside it
the adapters are off (the base model: DPO's reference pass, RERANK's judge).

On disk a mixture is a directory with ``mixture.json`` and one standard PEFT LoRA adapter per
objective (``<dir>/<objective>/adapter_config.json`` + ``adapter_model.safetensors``): each is
loadable on its own by PEFT, and :func:`load_mixture` stacks them again. Extra adapters that are
not objectives can join the stack (:func:`load_mixture` ``extra=``). The server merges the
CONDITIONED adapter into the weights (full speed for CONDITIONED) and stacks it once more beside
the mixture, where a MIXTURE row weighs it -1: that row sees the base model plus its own mix, and
a batch with no MIXTURE row skips the stack altogether (:func:`serve_mixture`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from steer.errors import InvalidInput
from steer.files import atomic_directory_write
from steer.kernels.mixture_lora import mixture_lora

FORMAT = "steer.mixture/v1"
CONFIG_NAME = "mixture.json"


@dataclass
class MixState:
    """What every :class:`MixtureLinear` of one model reads: the current rows' weights ``(B, n)``
    (n = adapters in the stack), or None for the bare base model."""

    weights: Tensor | None = None
    names: tuple[str, ...] = ()
    rank: int = 0  # the stack's rank per adapter (serving fast path: weights repeated r times, once per forward)
    w_rep: Tensor | None = None  # (B, n*r): weights (B, n) repeated r times per adapter, set by mixing()


class MixtureLinear(nn.Module):
    """``base(x) + s * ((x A_cat^T) * w_rep) B_cat^T``; ``w`` from the shared :class:`MixState`.

    ``scale`` is folded per adapter into ``b_scale`` (adapters of different alpha/r can share a
    stack); adapters of a smaller rank are zero-padded to ``rank`` (exact: zero rows add nothing).
    """

    def __init__(self, base: nn.Linear, state: MixState, n_adapters: int, rank: int):
        super().__init__()
        self.base = base
        self.state = state
        self.rank = rank
        self.n_adapters = n_adapters
        w = base.weight
        self.lora_A = nn.Parameter(torch.zeros(n_adapters * rank, base.in_features, dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, n_adapters * rank, dtype=w.dtype, device=w.device))
        self.register_buffer("b_scale", torch.ones(n_adapters * rank, dtype=w.dtype, device=w.device), persistent=False)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> Tensor:  # what code that inspects a Linear (dtype, device) looks at
        return self.base.weight

    def forward(self, x: Tensor) -> Tensor:
        w = self.state.weights
        if w is None:
            return self.base(x)
        if self._serving is not None and not x.is_cuda and self.state.w_rep is not None and x.dim() == 3:
            return self._serving_forward(x, self.state.w_rep)
        y = self.base(x)
        b = self.lora_B * self.b_scale.to(self.lora_B.dtype)  # (out, n*r) per-adapter alpha/r folded in
        # The adapters' path runs in their own dtype: under bf16 autocast (training) x arrives in bf16
        # while the trained A/B stay fp32. Autocast is off for it (rank n*r: cheap in fp32), so the
        # adapters' share is not rounded to bf16 on its way; the casts are part of the graph, so x
        # still gets its gradient. The sum is rounded to y's dtype once, as a merged weight's output is.
        dt = self.lora_A.dtype
        with torch.autocast(x.device.type, enabled=False):
            delta = mixture_lora(x.to(dt), self.lora_A, b, w.to(dt), self.rank, 1.0)
        return (y.to(delta.dtype) + delta).to(y.dtype)  # both casts are no-ops when the dtypes agree

    _serving: Tensor | None = None  # (out + n*r, in): [W; A_cat] in one buffer, after prepare_for_serving()

    @torch.no_grad()
    def prepare_for_serving(self) -> None:
        """Inference only, on the CPU path: one GEMM computes ``x W^T`` and ``x A_cat^T`` together (W and
        A_cat become views of one buffer, no extra memory), and B carries its scale. Per layer a
        mixed forward is then one GEMM, one row scale and one ``addmm``: the per-op overhead that
        dominates small batches. The weights stay what they were (the base layer reads its view)."""
        out = self.base.out_features
        fused = torch.cat([self.base.weight.data, self.lora_A.data], dim=0).contiguous()  # (out + n*r, in)
        self.base.weight.data = fused[:out]
        self.lora_A.data = fused[out:]
        self.lora_B.data = (self.lora_B.data * self.b_scale.to(self.lora_B.dtype)).contiguous()
        self.b_scale.fill_(1.0)
        self._serving = fused

    def _serving_forward(self, x: Tensor, w_rep: Tensor) -> Tensor:
        """``x`` (B, T, in), ``w_rep`` (B, n*r): the rows' weights, repeated per adapter rank."""
        out = self.base.out_features
        B, T, _ = x.shape
        x2 = x.reshape(B * T, -1)
        if getattr(self.base, "linear_kind", None) is not None:  # steer.linears: the base's own kernel, then A_cat
            y, h = self.base(x2), torch.nn.functional.linear(x2, self.lora_A)  # (B*T, out), (B*T, n*r)
        else:
            hz = torch.nn.functional.linear(x2, self._serving)  # (B*T, out + n*r)
            y, h = hz[:, :out], hz[:, out:]
        hs = (h.view(B, T, -1) * w_rep.to(h.dtype)[:, None, :]).view(B * T, -1)  # (B*T, n*r)
        if self.base.bias is not None and getattr(self.base, "linear_kind", None) is None:
            y = y + self.base.bias
        return torch.addmm(y, hs, self.lora_B.t()).view(B, T, out)

    def adapter(self, i: int) -> tuple[Tensor, Tensor]:
        """Adapter ``i``'s ``(A (r, in), B (out, r))``, without its scale."""
        r = slice(i * self.rank, (i + 1) * self.rank)
        return self.lora_A[r], self.lora_B[:, r]


@dataclass(frozen=True)
class MixtureSpec:
    """What a mixture directory describes (``mixture.json``)."""

    objectives: tuple[str, ...]
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    base_model: str
    description: str = ""
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"format": FORMAT, "objectives": list(self.objectives), "adapters": {o: o for o in self.objectives},
                "r": self.rank, "lora_alpha": self.alpha, "target_modules": list(self.target_modules),
                "base_model_name_or_path": self.base_model, "description": self.description, **self.extra}


def target_names(model: nn.Module, targets: str) -> list[str]:
    """Full names of the linear layers to adapt: ``all-linear`` (every nn.Linear but the output
    head, as PEFT) or comma-separated module names (``q_proj,v_proj``)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    wanted = None if targets == "all-linear" else {t.strip() for t in targets.split(",") if t.strip()}
    names = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module is not head and not isinstance(module, MixtureLinear):
            if wanted is None or name.rsplit(".", 1)[-1] in wanted:
                names.append(name)
    if not names:
        raise InvalidInput("lora_target", f"{targets!r} matches no linear layer of this model")
    return names


def attach_mixture(model: nn.Module, names: Sequence[str], rank: int, alpha: float,
                   targets: Sequence[str] | str = "all-linear") -> MixState:
    """Replace the target linears of ``model`` (in place) by :class:`MixtureLinear` with ``len(names)`` zero
    adapters of rank ``rank`` and scale ``alpha / rank``; returns the shared state (``state.names`` = ``names``)."""
    if not names:
        raise ValueError("a mixture needs at least one adapter")
    state = MixState(names=tuple(names), rank=rank)
    layer_names = target_names(model, targets if isinstance(targets, str) else ",".join(targets))
    for full in layer_names:
        parent_name, _, child = full.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = MixtureLinear(getattr(parent, child), state, len(names), rank)
        layer.b_scale.fill_(alpha / rank)
        setattr(parent, child, layer)
    model._steer_mixture = state  # noqa: SLF001  found again by mixing()
    return state


def mixture_layers(model: nn.Module) -> Iterator[tuple[str, MixtureLinear]]:
    for name, module in model.named_modules():
        if isinstance(module, MixtureLinear):
            yield name, module


def mix_state(model: nn.Module) -> MixState:
    state = getattr(model, "_steer_mixture", None)
    if state is None:
        raise ValueError("this model carries no mixture adapters (attach_mixture / load_mixture)")
    return state


@contextlib.contextmanager
def mixing(model: nn.Module, weights: Tensor | None):
    """Within the block, every forward of ``model`` mixes the adapters with ``weights``: ``(B, n)``
    (one row per sequence of the batch), ``(B, T, n)`` per token, or ``(n,)`` for all rows; None
    switches the adapters off. Restores the previous weights on exit."""
    state = mix_state(model)
    if weights is not None and weights.shape[-1] != len(state.names):
        raise ValueError(f"weights have {weights.shape[-1]} columns; "
                         f"the mixture has {len(state.names)} adapters {list(state.names)}")
    before = state.weights, state.w_rep
    state.weights = weights
    # Every layer mixes by the same rows: their weights repeated r times per adapter, once per forward.
    state.w_rep = (weights.repeat_interleave(state.rank, dim=-1)
                   if weights is not None and weights.dim() == 2 and state.rank else None)
    try:
        yield
    finally:
        state.weights, state.w_rep = before


def init_adapters(model: nn.Module, seed: int = 0, only: Sequence[int] | None = None) -> None:
    """PEFT's LoRA init per adapter: A kaiming-uniform (a = sqrt(5)), B zero (a fresh adapter adds nothing)."""
    gen = torch.Generator().manual_seed(seed)
    for _, layer in mixture_layers(model):
        for i in range(layer.n_adapters) if only is None else only:
            a = torch.empty(layer.rank, layer.in_features)
            bound = 1.0 / math.sqrt(layer.in_features)  # kaiming_uniform_(a=sqrt(5)) on fan_in
            a.uniform_(-bound, bound, generator=gen)
            with torch.no_grad():
                r = slice(i * layer.rank, (i + 1) * layer.rank)
                layer.lora_A[r] = a.to(layer.lora_A.dtype)
                layer.lora_B[:, r] = 0


# -- files ----------------------------------------------------------------------------------

_PEFT_PREFIX = "base_model.model."


def _peft_config(spec: MixtureSpec, rank: int, alpha: float) -> dict:
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha, "lora_dropout": 0.0,
            "bias": "none", "target_modules": sorted(spec.target_modules), "base_model_name_or_path": spec.base_model,
            "fan_in_fan_out": False, "inference_mode": True, "use_rslora": False, "use_dora": False,
            "init_lora_weights": True, "modules_to_save": None}


def save_mixture(model: nn.Module, out_dir: str | os.PathLike, spec: MixtureSpec,
                 dtype: torch.dtype = torch.float32) -> Path:
    """Write ``mixture.json`` and one PEFT adapter per objective (the first ``len(spec.objectives)``
    adapters of the stack), atomically: a temporary sibling renamed into place. ``target_modules``
    is taken from the layers the model carries."""
    from dataclasses import replace

    from safetensors.torch import save_file

    layers = list(mixture_layers(model))
    if not layers:
        raise ValueError("this model carries no mixture adapters to save")
    # What PEFT will adapt when it loads one of them: the layers that are there, whatever spec says.
    spec = replace(spec, target_modules=tuple(sorted({name.rsplit(".", 1)[-1] for name, _ in layers})))
    def write(tmp: Path) -> None:
        for i, objective in enumerate(spec.objectives):
            tensors = {}
            for name, layer in layers:
                a, b = layer.adapter(i)
                tensors[f"{_PEFT_PREFIX}{name}.lora_A.weight"] = a.detach().to("cpu", dtype).contiguous()
                tensors[f"{_PEFT_PREFIX}{name}.lora_B.weight"] = b.detach().to("cpu", dtype).contiguous()
            sub = tmp / objective
            sub.mkdir()
            save_file(tensors, str(sub / "adapter_model.safetensors"), metadata={"format": "pt"})
            (sub / "adapter_config.json").write_text(json.dumps(_peft_config(spec, spec.rank, spec.alpha), indent=1))
        (tmp / CONFIG_NAME).write_text(json.dumps(spec.to_json(), indent=1))
        for p in tmp.rglob("*"):
            os.chmod(p, 0o755 if p.is_dir() else 0o644)

    return atomic_directory_write(out_dir, write)


def read_mixture_spec(path: str | os.PathLike, field: str = "mixture") -> MixtureSpec:
    """``mixture.json`` of a mixture directory, checked; errors name the file and key."""
    path = Path(path)
    cfg = path / CONFIG_NAME
    if not cfg.is_file():
        raise InvalidInput(field, f"{path} has no {CONFIG_NAME}: not a mixture directory "
                                  "(python -m steer.train mixture writes one)")
    try:
        data = json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        raise InvalidInput(field, f"{cfg}:{e.lineno}:{e.colno}: not valid JSON ({e.msg})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise InvalidInput(field, f"{cfg}: format must be {FORMAT!r}, "
                                  f"got {data.get('format') if isinstance(data, dict) else data!r}")
    for key, kind in (("objectives", list), ("r", int), ("lora_alpha", (int, float)), ("target_modules", list)):
        if not isinstance(data.get(key), kind) or isinstance(data.get(key), bool):
            raise InvalidInput(field, f"{cfg}: {key} is missing or not a {getattr(kind, '__name__', 'number')}")
    objectives = tuple(str(o) for o in data["objectives"])
    if not objectives or len(set(objectives)) != len(objectives):
        raise InvalidInput(field, f"{cfg}: objectives must be distinct names, got {list(objectives)}")
    for o in objectives:
        if not (path / o / "adapter_model.safetensors").is_file():
            raise InvalidInput(field,
                               f"{path / o}: the adapter of objective {o!r} is missing (adapter_model.safetensors)")
    known = {"format", "objectives", "adapters", "r", "lora_alpha", "target_modules", "base_model_name_or_path",
             "description"}
    return MixtureSpec(objectives, int(data["r"]), float(data["lora_alpha"]), tuple(data["target_modules"]),
                       str(data.get("base_model_name_or_path", "")), str(data.get("description", "")),
                       {k: v for k, v in data.items() if k not in known})


def _read_peft(path: Path) -> tuple[dict, dict[str, Tensor]]:
    from safetensors.torch import load_file

    config = json.loads((path / "adapter_config.json").read_text())
    return config, load_file(str(path / "adapter_model.safetensors"))


def load_adapter_stack(model: nn.Module, adapters: Sequence[tuple[str, Path]], field: str = "mixture") -> MixState:
    """Attach ``adapters`` (``(name, PEFT adapter directory)``, in stack order) to ``model`` as one
    mixture: ranks padded to the largest, each adapter's alpha/r kept as its own scale. Every
    adapter must adapt the same layers (those the first names)."""
    loaded = []
    for name, path in adapters:
        config, tensors = _read_peft(Path(path))
        if config.get("use_dora") or config.get("use_rslora"):
            raise InvalidInput(field, f"{path}: DoRA / rsLoRA adapters cannot be mixed")
        loaded.append((name, Path(path), config, tensors))
    rank = max(int(c["r"]) for _, _, c, _ in loaded)
    layer_names = sorted({k[len(_PEFT_PREFIX):-len(".lora_A.weight")] for k in loaded[0][3]
                          if k.endswith(".lora_A.weight")})
    modules = dict(model.named_modules())
    missing = [n for n in layer_names if not isinstance(modules.get(n), nn.Linear)]
    if missing:
        raise InvalidInput(field, f"{loaded[0][1]}: adapts {missing[0]!r}, which is not a linear layer of this model")
    state = MixState(names=tuple(n for n, *_ in loaded), rank=rank)
    for full in layer_names:
        parent_name, _, child = full.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = MixtureLinear(getattr(parent, child), state, len(loaded), rank)
        with torch.no_grad():
            for i, (name, path, config, tensors) in enumerate(loaded):
                ka, kb = f"{_PEFT_PREFIX}{full}.lora_A.weight", f"{_PEFT_PREFIX}{full}.lora_B.weight"
                if ka not in tensors or kb not in tensors:
                    raise InvalidInput(field, f"{path}: has no weights for layer {full!r} "
                                              "(every adapter of a mixture must adapt the same layers)")
                a, b = tensors[ka], tensors[kb]
                r = a.shape[0]
                if a.shape != (r, layer.in_features) or b.shape != (layer.out_features, r):
                    raise InvalidInput(field, f"{path}: {full} has A {tuple(a.shape)} / B {tuple(b.shape)}; "
                                              f"the model's layer is ({layer.out_features}, {layer.in_features})")
                layer.lora_A[i * rank:i * rank + r] = a.to(layer.lora_A.dtype)
                layer.lora_B[:, i * rank:i * rank + r] = b.to(layer.lora_B.dtype)
                layer.b_scale[i * rank:(i + 1) * rank] = float(config["lora_alpha"]) / int(config["r"])
        setattr(parent, child, layer)
    model._steer_mixture = state  # noqa: SLF001
    return state


def load_mixture(model: nn.Module, path: str | os.PathLike, extra: Sequence[tuple[str, Path]] = (),
                 field: str = "mixture") -> tuple[MixtureSpec, MixState]:
    """Attach the mixture at ``path`` (its objectives first, in its order), plus ``extra`` PEFT adapters."""
    spec = read_mixture_spec(path, field)
    state = load_adapter_stack(model, [(o, Path(path) / o) for o in spec.objectives] + list(extra), field)
    return spec, state


# -- serving --------------------------------------------------------------------------------

# the stack name of the CONDITIONED adapter when it is served unmerged beside a mixture
CONDITIONED_ADAPTER = "conditioned"
SHIPPED_MIXTURE = "default"


@dataclass(frozen=True)
class ServedMixture:
    """What the server knows of the mixture on its model: the stack's adapter names (the mixture's
    objectives first, then the merged CONDITIONED adapter if any, which a MIXTURE row weighs -1 to
    take it out again) and the row a request without its own mix gets (every adapter off: the
    weights as loaded, which a forward of such rows alone computes without the stack)."""

    path: str
    objectives: tuple[str, ...]
    names: tuple[str, ...]
    default_row: Tensor  # (len(names),) zeros
    description: str = ""

    def row(self, weights: Sequence[float]) -> list[float]:
        """The stack row of a MIXTURE request with ``weights`` over :attr:`objectives`."""
        if len(weights) != len(self.objectives):
            raise ValueError(
                f"{len(weights)} weights for the {len(self.objectives)} objectives {list(self.objectives)}")
        return [float(w) for w in weights] + [-1.0] * (len(self.names) - len(self.objectives))


def shipped_mixture_path() -> Path | None:
    """The mixture shipped for the default model (``steer/adapters/mixture``), or None when this package has none."""
    from steer import adapters

    path = adapters.SHIPPED_ROOT / "mixture"
    return path if (path / CONFIG_NAME).is_file() else None


def serve_mixture(model: nn.Module, path: str | os.PathLike, conditioned: Path | None = None,
                  field: str = "mixture") -> ServedMixture:
    """Attach the mixture at ``path`` to ``model`` for serving. ``conditioned``: the PEFT adapter
    already *merged* into ``model``'s weights (CONDITIONED); it joins the stack as the last adapter,
    weighed -1 by MIXTURE rows, so they compute the base model plus their own mix."""
    extra = [(CONDITIONED_ADAPTER, Path(conditioned))] if conditioned is not None else []
    spec, state = load_mixture(model, path, extra=extra, field=field)
    for _, layer in mixture_layers(model):
        layer.prepare_for_serving()
    return ServedMixture(str(path), spec.objectives, state.names, torch.zeros(len(state.names)), spec.description)
