"""Atomic training checkpoints, and resuming from the newest one with the same data order and RNG.

Layout under ``<output>/checkpoints/``::

    step-00000012/
        trainable.safetensors     the trained tensors (LoRA weights, or every weight for --full)
        optimizer.pt              optimizer and LR-scheduler state dicts
        rng-rank0.pt ...          torch / python / numpy (and CUDA) RNG states, one file per rank
        state.json                step, data cursor, metrics lines written, world size, extra state

A checkpoint is written into a temporary sibling directory and renamed into place with
``os.replace``: a directory named ``step-*`` is always complete, so a run killed at any moment
(even SIGKILL in the middle of a save) resumes from the last complete one. Leftover temporary
directories are removed on the next start. Only the newest ``keep`` checkpoints are kept.

Together with a data order that is a pure function of (seed, epoch) and a cursor into it, this
makes a killed-and-resumed CPU run end with exactly the weights of an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from steer.files import TMP_PREFIX as _TMP_PREFIX
from steer.files import atomic_directory_write as atomic_directory_write  # re-exported: adapters, exports

from .distributed import DistContext, barrier, broadcast_object

CHECKPOINTS = "checkpoints"
_NAME = re.compile(r"^step-(\d+)$")


def rng_state() -> dict:
    """Every RNG a training step may draw from (dropout, sampling, shuffles)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int
    state: dict  # state.json

    def trainable(self) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(str(self.path / "trainable.safetensors"))

    def optimizer(self) -> dict:
        return torch.load(self.path / "optimizer.pt", map_location="cpu", weights_only=True)

    def rng(self, rank: int) -> dict:
        path = self.path / f"rng-rank{rank}.pt"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: resume with the number of ranks that wrote {self.path}")
        return torch.load(path, map_location="cpu", weights_only=False)  # python's RNG state is a tuple


def _complete(root: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every complete checkpoint under ``root``, oldest first."""
    found = []
    if root.is_dir():
        for p in root.iterdir():
            m = _NAME.match(p.name)
            if m and (p / "state.json").is_file():
                found.append((int(m.group(1)), p))
    return sorted(found)


def _newest(root: Path) -> Checkpoint | None:
    found = _complete(root)
    if not found:
        return None
    step, path = found[-1]
    return Checkpoint(path, step, json.loads((path / "state.json").read_text()))


def latest_checkpoint(output: str | Path) -> Checkpoint | None:
    """The newest complete checkpoint of the run in ``output`` (None: none), read without creating
    anything: a command checks what it would resume before loading its inputs, and a run refused
    then leaves no directory behind. :meth:`CheckpointManager.latest` once the run has started."""
    return _newest(Path(output) / CHECKPOINTS)


class CheckpointManager:
    """Saves and finds checkpoints under ``<output>/checkpoints``; rank 0 owns the directory."""

    def __init__(self, output: str | Path, ctx: DistContext, keep: int = 2):
        self.root = Path(output) / CHECKPOINTS
        self.ctx = ctx
        self.keep = keep
        if ctx.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            for leftover in self.root.glob(_TMP_PREFIX + "*"):  # a save killed half-way
                shutil.rmtree(leftover, ignore_errors=True)
        barrier(ctx)

    def all(self) -> list[tuple[int, Path]]:
        return _complete(self.root)

    def latest(self) -> Checkpoint | None:
        return _newest(self.root)

    def save(self, step: int, trainable: dict[str, torch.Tensor], optimizer_state: dict, state: dict) -> Path:
        """Write checkpoint ``step`` atomically. Every rank calls this (each saves its RNG state)."""
        from safetensors.torch import save_file

        final = self.root / f"step-{step:08d}"
        tmp = None
        if self.ctx.is_main:
            tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}step-{step:08d}-", dir=self.root))
        tmp = Path(broadcast_object(self.ctx, str(tmp) if tmp else None))
        torch.save(rng_state(), tmp / f"rng-rank{self.ctx.rank}.pt")
        if self.ctx.is_main:
            tensors = {k: v.detach().to("cpu").contiguous() for k, v in trainable.items()}
            save_file(tensors, str(tmp / "trainable.safetensors"))
            torch.save(optimizer_state, tmp / "optimizer.pt")
            record = dict(state, step=step, world_size=self.ctx.world_size)
            (tmp / "state.json").write_text(json.dumps(record, indent=1, sort_keys=True))
        barrier(self.ctx)  # every rank's RNG file is in tmp
        if self.ctx.is_main:
            if final.exists():  # a checkpoint of this step from a run that was killed after it
                shutil.rmtree(final)
            os.replace(tmp, final)
            for _, old in self.all()[: -self.keep] if self.keep > 0 else []:
                shutil.rmtree(old, ignore_errors=True)
        barrier(self.ctx)
        return final

