"""Training metrics: one JSON object per line in ``<output>/metrics.jsonl``, and a curve PNG at the end.

Every record has ``type`` (``step`` for an optimiser step, ``iteration`` for a DPA iteration's
sampling summary, ``reference`` / ``summary`` for one-off records), ``step`` and ``time`` (seconds
since the run started, resumes included). A checkpoint remembers how many lines had been written;
resuming truncates the file back to that count, so records of steps that a killed run made after
its last checkpoint (and that the resumed run redoes) never appear twice.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from steer.files import atomic_file, atomic_write_text, json_lines

METRICS_FILE = "metrics.jsonl"
CURVE_FILE = "training_curve.png"


class MetricsLogger:
    """Appends records on rank 0; other ranks hold a logger that writes nothing."""

    def __init__(self, output: str | Path, enabled: bool = True, *, resume_lines: int | None = None,
                 elapsed: float = 0.0):
        self.path = Path(output) / METRICS_FILE
        self.enabled = enabled
        self.lines = 0
        self._start = time.monotonic() - elapsed
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_lines is None:
            self.path.write_text("")
        else:
            kept = self.path.read_text().splitlines(keepends=True)[:resume_lines] if self.path.exists() else []
            atomic_write_text(self.path, "".join(kept))  # a kill now must not lose the kept records
            self.lines = len(kept)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self._start

    def log(self, record: dict) -> dict:
        # NaN/inf (e.g. a KTO micro-batch without undesirable examples has no margin) become null: strict JSON.
        record = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        record["time"] = round(self.elapsed, 3)
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record, allow_nan=False) + "\n")
            self.lines += 1
        return record


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    return [row for _, row in json_lines(path)]


def _finite(values):
    return [(x, y) for x, y in values if isinstance(y, (int, float)) and math.isfinite(y)]


def plot_curves(output: str | Path, title: str = "") -> Path | None:
    """Loss per step (and, for DPA, mean v.r of the sampled responses per iteration) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    output = Path(output)
    records = read_metrics(output)
    steps = [r for r in records if r.get("type") == "step"]
    # Iterations that scored their samples (a distillation run scores none).
    iterations = [r for r in records if r.get("type") == "iteration" and r.get("score/mean") is not None]
    if not steps and not iterations:
        return None
    panels = 1 + bool(iterations) + bool(any("rewards/margins" in r for r in steps))
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4), squeeze=False)
    ax = axes[0][0]
    loss = _finite((r["step"], r.get("loss")) for r in steps)
    if loss:
        ax.plot(*zip(*loss), lw=1, label="loss")
        if len(loss) >= 10:  # a running mean makes the trend readable through per-batch noise
            w = max(2, len(loss) // 20)
            ys = [y for _, y in loss]
            smooth = [sum(ys[max(0, i - w + 1): i + 1]) / len(ys[max(0, i - w + 1): i + 1]) for i in range(len(ys))]
            ax.plot([x for x, _ in loss], smooth, lw=2, label=f"mean of {w}")
        ax.legend()
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("loss")
    ax.set_title("training loss")
    col = 1
    if any("rewards/margins" in r for r in steps):
        ax = axes[0][col]
        col += 1
        margins = _finite((r["step"], r.get("rewards/margins")) for r in steps)
        if margins:
            ax.plot(*zip(*margins), lw=1)
        ax.set_xlabel("optimiser step")
        ax.set_title("implicit reward margin (chosen - rejected)")
    if iterations:
        ax = axes[0][col]
        for key, label in (("score/mean", "all samples"), ("score/best", "best of n"), ("score/worst", "worst of n")):
            pts = _finite((r["iteration"], r.get(key)) for r in iterations)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=label)
        ax.set_xlabel("DPA iteration")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("v . r (common scale)")
        ax.set_title("scalarised reward of policy samples")
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = output / CURVE_FILE
    with atomic_file(out) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return out
