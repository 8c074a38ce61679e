"""DDP: two CPU ranks under torchrun train the same adapter as one rank accumulating the same global batch."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from steer.training.distributed import rank_micro_batches
from steer.training.dpo_cli import main
from steer.training.metrics import read_metrics

ROWS = [{"prompt": f"Tell me about {w}.", "chosen": f"{w} is nice.", "rejected": f"I refuse to discuss {w} at all."}
        for w in ("cats", "tea", "rain", "maps", "owls", "bread", "jazz", "snow")]


def test_rank_micro_batches_partition_each_global_batch():
    batch = list(range(12))
    two = [rank_micro_batches(batch, r, 2, 3) for r in range(2)]
    assert two[0] == [[0, 2], [4, 6], [8, 10]] and two[1] == [[1, 3], [5, 7], [9, 11]]
    one = rank_micro_batches(batch, 0, 1, 6)
    assert sorted(i for mb in one for i in mb) == sorted(i for r in two for mb in r for i in mb) == batch
    with pytest.raises(ValueError, match="does not split"):
        rank_micro_batches(list(range(10)), 0, 4, 1)


def test_two_ranks_equal_one_rank_with_gradient_accumulation(tmp_path, tiny_model_dir):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    # Adam divides each element's update by its own gradient scale, so an element whose gradient is
    # ~0 turns float noise (the two runs sum the same per-example gradients in a different order)
    # into a step of up to lr; with ~30k adapter weights one such element is expected. A larger eps
    # keeps those updates proportional to their gradients: the comparison then measures DDP, not
    # Adam's sign noise.
    common = ["--data", str(data), "--model", str(tiny_model_dir), "--batch-size", "1", "--epochs", "2",
              "--lr", "1e-2", "--adam-eps", "1e-4", "--seed", "3", "--no-progress", "--loss", "sigmoid"]
    ddp_out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "steer.train", "dpo", *common, "--grad-accum", "2", "--output", str(ddp_out)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    # One rank, global batch 1 x 4 micro-batches = 2 ranks x 1 x 2 micro-batches: the same examples per step.
    single_out = tmp_path / "single"
    assert main([*common, "--grad-accum", "4", "--output", str(single_out)]) == 0

    ddp_metrics, single_metrics = read_metrics(ddp_out), read_metrics(single_out)
    assert (ddp_metrics[0]["world_size"] == 2
            and ddp_metrics[0]["global_batch"] == 4 == single_metrics[0]["global_batch"])
    ddp_steps = [r for r in ddp_metrics if r["type"] == "step"]
    single_steps = [r for r in single_metrics if r["type"] == "step"]
    assert len(ddp_steps) == len(single_steps) == 4
    for a, b in zip(ddp_steps, single_steps):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5) and a["tokens"] == b["tokens"]
    a = load_file(str(ddp_out / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(single_out / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and len(a) > 0
    moved = 0.0
    for name in a:
        # Gradients are summed in a different order (all-reduce vs accumulation): float noise only
        # (measured at most 3e-7 after 4 steps).
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=2e-6)
        if "lora_B" in name:  # B starts at zero: its size is how far training moved the adapter
            moved = max(moved, float(a[name].abs().max()))
    assert moved > 1e-3  # far beyond the tolerance
