"""Checkpoints: a run killed with SIGKILL and resumed ends with the weights of an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from steer.training.checkpoint import CheckpointManager, atomic_directory_write, rng_state, set_rng_state
from steer.training.distributed import DistContext
from steer.training.dpo_cli import main
from steer.training.metrics import read_metrics

ROWS = [{"prompt": f"Question {i}?", "chosen": f"Answer {i}.", "rejected": f"No {i} way, never."} for i in range(6)]


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


def run_args(pairs_file, model_dir, output):
    # Dropout on the adapter makes the result depend on the restored RNG state, not only on weights.
    return ["--data", str(pairs_file), "--model", str(model_dir), "--output", str(output), "--batch-size", "1",
            "--grad-accum", "2", "--epochs", "6", "--save-every", "2", "--lr", "1e-2", "--lora-dropout", "0.2",
            "--lr-schedule", "cosine", "--warmup-steps", "2", "--seed", "5", "--no-progress"]


def test_sigkill_and_resume_ends_with_the_uninterrupted_weights(tmp_path, pairs_file, tiny_model_dir):
    killed = tmp_path / "killed"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-m", "steer.train", "dpo", *run_args(pairs_file, tiny_model_dir, killed)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    try:
        while not list((killed / "checkpoints").glob("step-*")):
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (killed / "adapter").exists(), "the run finished before it was killed; the test proves nothing"
    steps_before = max(int(p.name.split("-")[1]) for p in (killed / "checkpoints").glob("step-*"))
    assert 2 <= steps_before < 18

    assert main(run_args(pairs_file, tiny_model_dir, killed) + ["--resume"]) == 0
    full = tmp_path / "full"
    assert main(run_args(pairs_file, tiny_model_dir, full)) == 0

    a = load_file(str(killed / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(full / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and len(a) > 0
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6)
    # The resumed run's metrics hold every step once, and its losses are the uninterrupted run's.
    resumed = [r for r in read_metrics(killed) if r["type"] == "step"]
    straight = [r for r in read_metrics(full) if r["type"] == "step"]
    assert [r["step"] for r in resumed] == list(range(1, 19)) == [r["step"] for r in straight]
    for x, y in zip(resumed, straight):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-6) and x["lr"] == pytest.approx(y["lr"])


def test_new_run_refuses_an_output_with_checkpoints(tmp_path, pairs_file, tiny_model_dir, capsys):
    out = tmp_path / "run"
    args = ["--data", str(pairs_file), "--model", str(tiny_model_dir), "--output", str(out), "--batch-size", "3",
            "--save-every", "1", "--no-progress"]
    assert main(args) == 0
    assert main(args) == 2
    assert "output: " in capsys.readouterr().err
    # --resume of a finished run starts at its last checkpoint and just writes the outputs again.
    assert main(args + ["--resume"]) == 0


def test_save_is_atomic_and_keeps_the_newest(tmp_path):
    manager = CheckpointManager(tmp_path, DistContext(), keep=2)
    (manager.root / ".tmp-step-00000009-abc").mkdir()  # what a save killed half-way leaves
    for step in (1, 2, 3):
        manager.save(step, {"w": torch.full((2,), float(step))}, {"optimizer": {}}, {"cursor": [0, step]})
    assert [s for s, _ in manager.all()] == [2, 3]
    latest = manager.latest()
    assert latest.step == 3 and latest.state["cursor"] == [0, 3] and latest.trainable()["w"].tolist() == [3.0, 3.0]
    CheckpointManager(tmp_path, DistContext())  # the next start clears leftovers of killed saves
    assert not list(manager.root.glob(".tmp-*"))
    # A directory without state.json (never renamed into place) is not a checkpoint.
    (manager.root / "step-00000007").mkdir()
    assert manager.latest().step == 3

    def failing(tmp):
        (tmp / "half").write_text("x")
        raise RuntimeError("killed")
    with pytest.raises(RuntimeError):
        atomic_directory_write(tmp_path / "adapter", failing)
    assert not (tmp_path / "adapter").exists()


def test_rng_state_round_trips():
    import random

    import numpy as np

    state = rng_state()
    a = (torch.rand(3), random.random(), np.random.rand())
    set_rng_state(state)
    b = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]


def test_bf16_run_resumes_exactly_in_bf16(tmp_path, pairs_file, tiny_model_dir):
    """A checkpoint written under bf16 autocast resumes under it to the uninterrupted run's weights."""
    args = ["--data", str(pairs_file), "--model", str(tiny_model_dir), "--batch-size", "3", "--epochs", "2",
            "--save-every", "1", "--lr", "1e-2", "--lr-schedule", "constant", "--precision", "bf16", "--no-progress"]
    stopped, full = tmp_path / "stopped", tmp_path / "full"
    assert main(args + ["--output", str(stopped), "--max-steps", "2"]) == 0
    assert main(args + ["--output", str(stopped), "--resume"]) == 0
    assert main(args + ["--output", str(full)]) == 0
    a = load_file(str(stopped / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(full / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and len(a) > 0
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)
    steps = [r for r in read_metrics(stopped) if r["type"] == "step"]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
