"""Fixtures of the kernel tests."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.fixture
def run_under_triton_interpreter():
    """run(test_file, min_passed, *pytest_args): that file in a child pytest whose environment has
    TRITON_INTERPRET=1 from the start (see test_logprob_triton.py's docstring); asserts it passes
    and that at least `min_passed` tests ran."""

    def run(test_file: str, min_passed: int, *pytest_args: str) -> None:
        path = Path(test_file).resolve()
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        env.pop("STEER_KERNELS", None)
        result = subprocess.run(
            [sys.executable, "-m", "pytest", str(path), "-q", "-p", "no:cacheprovider", *pytest_args],
            cwd=path.parents[2], env=env, capture_output=True, text=True, timeout=300,
        )
        assert result.returncode == 0, f"interpreter run failed:\n{result.stdout[-6000:]}\n{result.stderr[-2000:]}"
        passed = re.search(r"(\d+) passed", result.stdout)
        assert passed and int(passed.group(1)) >= min_passed, f"the kernel tests did not run:\n{result.stdout[-2000:]}"

    return run
