"""The kernel benchmark runs end to end on tiny shapes and writes the JSON it promises."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from steer.kernels import bench


def test_help_lists_examples():
    result = subprocess.run([sys.executable, "-m", "steer.kernels.bench", "--help"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0
    assert "examples:" in result.stdout and "--repeats" in result.stdout and "--out" in result.stdout


def test_tiny_run_writes_json(tmp_path, capsys):
    out = tmp_path / "k.json"
    assert bench.main(["--n", "40", "--h", "16", "--v", "100", "--repeats", "2", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    (run,) = report["runs"]
    assert run["shape"] == {"N": 40, "H": 16, "V": 100}
    assert len(run["samples_s"]["fused_fwd_bwd"]) == 2
    med = run["median_s"]
    assert med["gemm_floor"] == med["gemm_fwd"] + med["gemm_recompute"] + med["gemm_dx"] + med["gemm_dw"]
    assert run["ratios"]["fused_over_gemm_floor_of_medians"] == med["fused_fwd_bwd"] / med["gemm_floor"]
    per_repeat = run["per_repeat_ratios"]["fused_over_gemm_floor"]
    assert len(per_repeat) == 2 and run["ratios"]["fused_over_gemm_floor"] == sum(per_repeat) / 2  # median of 2
    mem = run["memory"]
    assert mem["grads_bytes"] == 4 * (40 * 16 + 100 * 16)
    assert mem["naive_peak_extra_bytes"] > 0 and mem["fused_peak_extra_bytes"] > 0
    assert isinstance(run["targets"]["time_met"], bool)
    assert "fused / GEMM floor" in capsys.readouterr().out


def test_bad_flag_is_named(capsys):
    with pytest.raises(SystemExit) as exit:
        bench.main(["--repeats", "0"])
    assert exit.value.code == 2
    assert "--repeats must be >= 1" in capsys.readouterr().err
