"""The common reward scale: per-objective standardisation against a calibration set.

Different signals live on different scales (an FLR log-likelihood difference is a fraction of a
nat; a length signal is a log token count; a trained reward model predicts ratings). A direction's
weights only mean what the user thinks if the objectives share one scale, so every scorer maps its
raw reward ``r`` to ``(r - mean) / std`` with statistics measured on the same set of prompts and
responses: :data:`steer.rewards.calibration_set.CALIBRATION_PAIRS` for the training-free signals,
held-out rows for a trained reward model.

Statistics are stored as JSON beside the scorer (format below). For FLR on the default model the
file ships in the package (``steer/rewards/calibration/``); for other models it is computed on
first use and cached under ``$STEER_CACHE/calibration/``. Each statistic carries a ``key`` that hashes
what the statistics depend on (model weights, follow-up set, calibration set), so a stale file is
never applied to a different configuration. Keys are per objective, so a scorer over a subset of
the objectives (or with one objective's follow-ups changed) reuses what still applies::

    {"format": "steer-reward-calibration", "version": 1, "scorer": "flr", "model_id": "...",
     "calibration_set": "builtin-v1-...", "n": 36,
     "objectives": {"helpfulness": {"mean": -0.12, "std": 0.31, "key": "3f2a..."}, ...}}
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from steer.files import atomic_write_text

FORMAT = "steer-reward-calibration"
VERSION = 1
PACKAGE_DIR = Path(__file__).parent / "calibration"
MIN_STD = 1e-6  # a constant signal on the calibration set gets std 1 instead of dividing by ~0


@dataclass(frozen=True)
class Calibration:
    """Per-objective ``mean`` and ``std`` of raw rewards on a calibration set."""

    stats: Mapping[str, tuple[float, float]]  # objective -> (mean, std)
    source: str = ""  # where the statistics came from (file path or set name), for logs

    def __post_init__(self):
        for name, (mean, std) in self.stats.items():
            if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
                raise ValueError(f"calibration for {name!r} needs a finite mean and std > 0, got ({mean}, {std})")

    def apply(self, raw: torch.Tensor, objectives: Sequence[str]) -> torch.Tensor:
        """``(n, k)`` raw -> ``(n, k)`` on the common scale, columns in ``objectives`` order."""
        missing = [o for o in objectives if o not in self.stats]
        if missing:
            raise KeyError(f"calibration {self.source or '(unnamed)'} has no statistics for {missing}")
        mean = torch.tensor([self.stats[o][0] for o in objectives], dtype=raw.dtype)  # (k,)
        std = torch.tensor([self.stats[o][1] for o in objectives], dtype=raw.dtype)  # (k,)
        return (raw - mean) / std

    @classmethod
    def fit(cls, objectives: Sequence[str], raw: torch.Tensor, source: str = "") -> Calibration:
        """Statistics of ``raw`` ``(n, k)``: column means and population standard deviations."""
        if raw.dim() != 2 or raw.shape[1] != len(objectives) or raw.shape[0] < 2:
            raise ValueError(f"need (n >= 2, {len(objectives)}) raw rewards to calibrate, got {tuple(raw.shape)}")
        raw = raw.double()
        mean = raw.mean(0)
        std = raw.std(0, unbiased=False)
        stats = {}
        for i, name in enumerate(objectives):
            s = float(std[i])
            stats[name] = (float(mean[i]), s if s > MIN_STD else 1.0)
        return cls(stats, source)

    def to_json(self, keys: Mapping[str, str] | None = None, **meta) -> dict:
        objectives = {}
        for name, (m, s) in self.stats.items():
            objectives[name] = {"mean": m, "std": s}
            if keys and name in keys:
                objectives[name]["key"] = keys[name]
        return {"format": FORMAT, "version": VERSION, **meta, "objectives": objectives}

    def merged(self, other: Calibration) -> Calibration:
        """Both sets of statistics (``other`` wins on overlap)."""
        sources = " + ".join(s for s in (self.source, other.source) if s)
        return Calibration({**self.stats, **other.stats}, sources)

    def save(self, path: str | os.PathLike, keys: Mapping[str, str] | None = None, **meta) -> Path:
        """Write atomically (temp file + rename): a reader never sees half a file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        return atomic_write_text(path, json.dumps(self.to_json(keys, **meta), indent=2, sort_keys=True) + "\n")


def read_calibration_file(path: str | os.PathLike) -> tuple[Calibration, dict[str, str]]:
    """Load a calibration JSON; returns the statistics and each objective's ``key`` (when stored)."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable calibration JSON ({e})") from e
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ValueError(f"{path}: not a {FORMAT} file "
                         f"(format={doc.get('format') if isinstance(doc, dict) else None!r})")
    if doc.get("version") != VERSION:
        raise ValueError(f"{path}: calibration version {doc.get('version')!r}, this steer reads version {VERSION}")
    try:
        stats = {name: (float(v["mean"]), float(v["std"])) for name, v in doc["objectives"].items()}
        keys = {name: str(v["key"]) for name, v in doc["objectives"].items() if "key" in v}
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"{path}: objectives must map name -> {{mean, std[, key]}} ({e})") from e
    return Calibration(stats, str(path)), keys


def cache_dir() -> Path:
    from steer.models import cache_root

    return cache_root() / "calibration"


def find_calibration(keys: Mapping[str, str], search: Sequence[Path] | None = None) -> Calibration | None:
    """Statistics for each objective in ``keys`` whose stored key matches, from the shipped files
    first, then the cache. Objectives with no match are absent (None when nothing matched)."""
    dirs = list(search) if search is not None else [PACKAGE_DIR, cache_dir()]
    found: dict[str, tuple[float, float]] = {}
    sources: list[str] = []
    for d in dirs:
        if not d.is_dir():
            continue
        for path in sorted(d.glob("*.json")):
            try:
                calibration, stored = read_calibration_file(path)
            except ValueError:
                continue  # an unrelated or corrupt file is not ours to trust
            hits = [o for o, key in keys.items() if o not in found and stored.get(o) == key]
            for o in hits:
                found[o] = calibration.stats[o]
            if hits:
                sources.append(str(path))
    return Calibration(found, " + ".join(sources)) if found else None


def model_fingerprint(model) -> str:
    """A short hash identifying a model's weights without hashing all of them.

    Samples 64 evenly spaced values from every parameter (rounded to 1e-4, so the same weights
    give the same hash on any CPU) plus the architecture's shape; a merged LoRA adapter changes
    the sampled attention/MLP values and so the fingerprint.
    """
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    for attr in ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"):
        h.update(f"{attr}={getattr(config, attr, None)};".encode())
    with torch.no_grad():
        for name, p in model.named_parameters():
            flat = p.detach().reshape(-1)
            m = min(64, flat.numel())
            idx = torch.arange(m) * (flat.numel() - 1) // max(m - 1, 1)  # integer spacing: exact for any size
            sample = torch.round(flat[idx].float() * 1e4).to(torch.int64)
            h.update(name.encode())
            h.update(str(tuple(p.shape)).encode())
            h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def config_key(**parts) -> str:
    """Hash of everything a calibration depends on (JSON-serialisable values)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]
