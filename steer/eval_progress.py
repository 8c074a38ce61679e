"""Resumable evaluation: ``python -m steer.eval`` keeps every finished unit of work -- one system
(policy or base) x one sampling seed: its responses, every judge's scores and the timings -- in
``<output>/eval-progress.jsonl`` until the report is written, so an evaluation that stops (a session
ends, the machine reboots) continues with ``--resume`` instead of starting over.

The file's first line is a header with the evaluation's fingerprint: every setting that changes
what a unit holds (model, adapter, mixture, prompts and their text, grid, strategy, sampling,
batch sizes, judges). A unit is reused only under the same fingerprint; ``--seeds`` and ``--seed``
are not part of it (units are per seed), so a stopped run may be finished with other seeds.
Every unit is one appended line, flushed and fsync'ed; a last line cut off mid-write is dropped
(that unit runs again). The file is removed once ``steerability.json`` is written.

``--base-cache DIR`` keeps the base system's units in a store of their own that outlives the
report (:func:`open_base_cache`): the base model's answers do not depend on the adapter or
mixture under test, so every evaluation against the same base settings reuses them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from steer.errors import InvalidInput
from steer.eval_report import Sample
from steer.files import atomic_write_text

log = logging.getLogger(__name__)

PROGRESS_NAME = "eval-progress.jsonl"
FORMAT = "steer.eval-progress/1"
# Settings that do not change what a unit holds: where the report goes, how it is shown, its bootstrap,
# which seeds are asked for (units are per seed), and --resume itself.
NOT_FINGERPRINTED = ("output", "progress", "log_level", "bootstrap", "bootstrap_seed", "seeds", "seed", "resume",
                     "config", "base_cache")
# Settings the base system's units do not depend on (it never carries the adapter or the mixture).
NOT_BASE = ("adapter", "mixture")


@dataclass(frozen=True)
class Unit:
    """One system's responses for one seed, their scores per judge ((n, k) arrays) and timings."""

    samples: tuple[Sample, ...]
    scores: dict[str, np.ndarray]
    timing: dict[str, float]


def fingerprint(config: dict, prompts: list[str]) -> dict:
    """The settings of ``config`` (a config_to_dict) that decide a unit's content, plus a hash of the prompt texts."""
    fp = {k: v for k, v in config.items() if k not in NOT_FINGERPRINTED}
    fp["prompts_sha256"] = hashlib.sha256(json.dumps(list(prompts)).encode("utf-8")).hexdigest()
    return json.loads(json.dumps(fp))  # the form it has after a round trip through the file


class EvalProgress:
    """The finished units of one evaluation, on disk in ``<out_dir>/eval-progress.jsonl``."""

    def __init__(self, path: Path, fp: dict, units: dict[tuple[str, int], Unit]):
        self.path, self.fingerprint, self.units = path, fp, units
        self._written = False  # the file is (re)written whole at the first put: a run that fails first leaves none
        self.lock = None  # open_base_cache: the locked file that keeps a shared entry to one evaluation

    @classmethod
    def open(cls, out_dir: str | Path, fp: dict, resume: bool) -> EvalProgress:
        """A new evaluation's progress, or with ``resume`` the finished units of an earlier run with the same
        fingerprint. An unfinished evaluation in ``out_dir`` is never overwritten without ``resume``.
        Nothing is written until the first unit finishes."""
        path = Path(out_dir) / PROGRESS_NAME
        if Path(out_dir).exists() and not Path(out_dir).is_dir():
            raise InvalidInput("output", f"{out_dir} is not a directory")
        if path.is_dir():
            raise InvalidInput("output", f"{path} is a directory")
        if path.exists() and not resume:
            raise InvalidInput("output", f"{path} holds an unfinished evaluation; pass --resume to continue it, "
                               "or choose another --output")
        units: dict[tuple[str, int], Unit] = {}
        if path.exists():
            units = _read(path, fp)
            log.info("resuming %s: %d finished unit(s) %s", path, len(units), sorted(units))
        elif resume:
            log.info("--resume: %s does not exist; starting the evaluation", path)
        return cls(path, fp, units)

    def get(self, system: str, seed: int) -> Unit | None:
        return self.units.get((system, seed))

    def put(self, system: str, seed: int, unit: Unit) -> None:
        """Record a finished unit: one line, appended, flushed and fsync'ed before this returns."""
        self.units[(system, seed)] = unit
        if not self._written:  # header and every unit known so far (a cut-off line read at resume is gone)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.path, "".join(self._line(row) for row in self._rows()))
            self._written = True
            return
        with self.path.open("a", encoding="utf-8") as f:
            f.write(self._line(_unit_row(system, seed, unit)))
            f.flush()
            os.fsync(f.fileno())

    def finish(self) -> None:
        """The report is written: the progress file has served its purpose."""
        self.path.unlink(missing_ok=True)

    def _rows(self):
        yield {"type": "header", "format": FORMAT, "fingerprint": self.fingerprint}
        for (system, seed), unit in self.units.items():
            yield _unit_row(system, seed, unit)

    @staticmethod
    def _line(row: dict) -> str:
        return json.dumps(row, ensure_ascii=False) + "\n"


def _unit_row(system: str, seed: int, unit: Unit) -> dict:
    return {"type": "unit", "system": system, "seed": seed, "samples": [asdict(s) for s in unit.samples],
            "scores": {j: np.asarray(m, dtype=np.float64).tolist() for j, m in unit.scores.items()},
            "timing": unit.timing}


def _read(path: Path, fp: dict) -> dict[tuple[str, int], Unit]:
    lines = path.read_text(encoding="utf-8").splitlines()
    rows = []
    for lineno, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if lineno == len(lines):  # cut off mid-write: that unit runs again
                log.warning("%s:%d: an unfinished last line (%s); that unit runs again", path, lineno, e.msg)
                break
            raise InvalidInput(f"{path}:{lineno}", f"not valid JSON ({e.msg}); delete the file to start over") from None
    if not rows or not isinstance(rows[0], dict) or rows[0].get("format") != FORMAT:
        raise InvalidInput(f"{path}:1", f"not a {FORMAT} header; delete the file to start over")
    old = rows[0].get("fingerprint") or {}
    changed = [k for k in sorted(set(old) | set(fp)) if old.get(k) != fp.get(k)]
    if changed:
        k = changed[0]
        raise InvalidInput("resume", f"{path} was written by another evaluation: {k} was {old.get(k)!r}, now "
                           f"{fp.get(k)!r} ({len(changed)} setting(s) differ); use another --output or the same "
                           "settings")
    units = {}
    for lineno, row in enumerate(rows[1:], 2):
        try:
            samples = tuple(Sample(**s) for s in row["samples"])
            scores = {j: np.asarray(m, dtype=np.float64).reshape(len(samples), -1) for j, m in row["scores"].items()}
            units[(str(row["system"]), int(row["seed"]))] = Unit(samples, scores, dict(row["timing"]))
        except (KeyError, TypeError, ValueError) as e:
            raise InvalidInput(f"{path}:{lineno}", f"not a unit row ({e}); delete the file to start over") from None
    return units


def base_fingerprint(fp: dict) -> dict:
    """What the base system's units depend on, from an evaluation's :func:`fingerprint`: everything but
    the adapter and the mixture; the base answers the direction-conditioned prompt under ``mixture``
    as under ``conditioned``, and ``candidates`` counts only under ``rerank``."""
    out = {k: v for k, v in fp.items() if k not in NOT_BASE}
    if out.get("strategy") != "rerank":
        out["strategy"] = "conditioned"
        out.pop("candidates", None)
    return out


def open_base_cache(cache_dir: str | Path, fp: dict) -> EvalProgress:
    """The base system's units for the base settings ``base_fingerprint(fp)``, shared by evaluations:
    ``<cache_dir>/<hash of those settings>/eval-progress.jsonl``, never removed by a report. The entry is
    locked for as long as this process holds the store (two evaluations appending to one file would lose
    units): a second evaluation with the same base settings is refused until the first ends."""
    import fcntl

    base = base_fingerprint(fp)
    digest = hashlib.sha256(json.dumps(base, sort_keys=True).encode("utf-8")).hexdigest()[:16]
    root = Path(cache_dir)
    if root.exists() and not root.is_dir():
        raise InvalidInput("base_cache", f"{cache_dir} is not a directory")
    entry = root / digest
    entry.mkdir(parents=True, exist_ok=True)
    lock = (entry / ".lock").open("a")
    try:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.close()
        raise InvalidInput("base_cache", f"{entry} is in use by another evaluation with the same base settings; "
                                         "wait for it, or pass another --base-cache") from None
    store = EvalProgress.open(entry, base, resume=True)
    store.lock = lock  # released when the store (and this file object) is garbage collected or the process ends
    log.info("base system's units: %s (%d cached)", entry, len(store.units))
    return store
