"""Steering adapters shipped inside the package, one directory each (installed as package data).

``steer/adapters/default/`` is the adapter ``python -m steer.serve`` (and ``make serve``) loads
when ``--adapter`` is not given and ``--model`` is the default model: a PEFT LoRA adapter trained
with DPA on SmolLM2-135M-Instruct. A shipped adapter directory holds::

    adapter_config.json        PEFT config. ``base_model_name_or_path`` must be the model *id*
                               ("HuggingFaceTB/SmolLM2-135M-Instruct"), never a local path: the
                               server loads the base model itself and attaches the adapter with
                               PEFT, so nothing reads that field, and a path from the training
                               machine would be meaningless on another one. steer.models checks it.
    adapter_model.safetensors  the LoRA weights (bf16, a few MB)
    README.md                  how it was trained and what it was evaluated on
    metadata.json              optional: {"description": "DPA LoRA r16 for SmolLM2-135M-Instruct", ...};
                               ``description`` is what Describe reports after the name, otherwise
                               one is made from adapter_config.json

pyproject.toml's package-data lists ``adapters/*/*.json``, ``*.safetensors`` and ``*.md`` so that
wheels and editable installs both carry the files. This module reads paths and JSON only (no torch),
so the command lines can resolve ``--adapter default`` before any heavy import.
"""

from __future__ import annotations

import json
from pathlib import Path

DEFAULT = "default"  # the adapter served when --adapter is not given (default model only)
REQUIRED_FILES = ("adapter_config.json", "adapter_model.safetensors")
METADATA_FILE = "metadata.json"

# Where the shipped adapters live; a module attribute so tests can point it at a fixture.
SHIPPED_ROOT = Path(__file__).resolve().parent


def shipped_adapter_path(name: str = DEFAULT) -> Path:
    """The directory of the shipped adapter ``name``.

    Raises FileNotFoundError naming the path when it or one of its files is missing (a dev tree
    before the artifact lands, or a broken install): asking for the shipped adapter must never
    quietly fall back to the bare model.
    """
    path = SHIPPED_ROOT / name
    missing = [f for f in REQUIRED_FILES if not (path / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"the shipped adapter {name!r} is missing: {path} has no {' or '.join(missing)} "
            "(a development tree without the artifact, or an install that dropped package data). "
            "Add the adapter files there or reinstall steer; or pass --adapter DIR for another adapter, "
            "or --adapter none to serve the bare model"
        )
    return path


def read_adapter_config(path: Path) -> dict:
    """``adapter_config.json`` of the adapter directory ``path``, as a dict."""
    file = Path(path) / "adapter_config.json"
    try:
        config = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}:{e.lineno}: not valid JSON ({e.msg})") from e
    if not isinstance(config, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type(config).__name__}")
    return config


def describe_adapter(path: Path) -> str:
    """A one-line summary: ``metadata.json``'s description, else e.g. "LORA r16 for SmolLM2-135M-Instruct"."""
    path = Path(path)
    meta_file = path / METADATA_FILE
    if meta_file.is_file():
        try:
            description = json.loads(meta_file.read_text()).get("description")
        except (json.JSONDecodeError, AttributeError):
            description = None  # a malformed optional file only costs the nicer summary
        if isinstance(description, str) and description.strip():
            return description.strip()
    config = read_adapter_config(path)
    kind = str(config.get("peft_type") or "adapter")
    rank = f" r{config['r']}" if config.get("r") else ""
    base = str(config.get("base_model_name_or_path") or "").rstrip("/").rsplit("/", 1)[-1]
    return f"{kind}{rank}" + (f" for {base}" if base else "")


def display_path(path: Path) -> str:
    """``steer/adapters/<name>`` for a shipped adapter (the same on every install), else the path."""
    path = Path(path)
    try:
        return str(Path("steer") / "adapters" / path.resolve().relative_to(Path(__file__).resolve().parent))
    except ValueError:
        return str(path)
