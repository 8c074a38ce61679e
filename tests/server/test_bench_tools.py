"""The serving benchmarks' own pieces on the tiny model: the numerics check and the long-prompt run."""

import json
import subprocess
import sys

import pytest


def test_precision_quality_separates_exact_from_quantised(tiny_model_dir):
    from steer.server.bench import precision_quality

    from steer.linears import available

    prompts = ["Name a fruit.", "Say hi."]
    if available():
        same = precision_quality(str(tiny_model_dir), prompts, linears="prepacked", new_tokens=8)
        assert same["greedy_prefix_agreement"] == 1.0 and same["mean_abs_logprob_drift"] < 1e-4
    int8 = precision_quality(str(tiny_model_dir), prompts, linears="int8", new_tokens=8)
    assert int8["linears"] == "int8" and int8["mean_abs_logprob_drift"] > 1e-4


@pytest.mark.timeout(300)
def test_long_prompt_bench_runs_end_to_end(tiny_model_dir, tmp_path):
    out = tmp_path / "long.json"
    run = subprocess.run(
        [sys.executable, "-m", "steer.server.bench_long_prompt", "--model", str(tiny_model_dir),
         "--prompt-tokens", "300", "--delay", "0.2", "--settle", "0.5", "--drain", "0.5", "--grace", "1",
         "--output", str(out)],
        capture_output=True, text=True, timeout=280,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["long_request"]["prompt_tokens"] >= 300
    assert result["memory"]["rss_before_mb"] > 0 and result["memory"]["after_over_before"] > 0
    assert result["short_request_behind_long"]["completion_tokens"] >= 1
    sigterm = result["sigterm_during_prefill"]
    assert sigterm["exit_code"] == 0 and sigterm["exit_s"] <= sigterm["budget_s"]
