"""The repository's top-level ``kernels/`` must not stand in for the PyPI package ``kernels`` that
transformers imports, when Python runs from the repository root (``python -m`` puts the working
directory first on ``sys.path``; see steer/__init__.py)."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run_from_root(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_root_is_first_on_sys_path_when_run_from_it():
    """The premise: from the repository root, plain ``import kernels`` without steer finds our directory."""
    out = _run_from_root("import importlib.util; print(importlib.util.find_spec('kernels').origin)")
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()) == ROOT / "kernels" / "__init__.py"


def test_import_kernels_after_steer_is_the_installed_distribution():
    try:
        dist = importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the PyPI package 'kernels' is not installed here")
    out = _run_from_root("import steer, kernels; print(kernels.__file__)")
    assert out.returncode == 0, out.stderr
    found = Path(out.stdout.strip()).resolve()
    assert ROOT / "kernels" not in found.parents
    assert Path(dist.locate_file("kernels")).resolve() in found.parents


def test_our_kernels_stay_importable_as_steer_kernels():
    out = _run_from_root("import steer, kernels, steer.kernels as ours; print(ours.__file__)")
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()) == ROOT / "kernels" / "__init__.py"


def test_transformers_model_code_imports_from_the_root():
    """What broke: transformers' activations import the PyPI ``kernels`` (CUDAProperties) at import time."""
    out = _run_from_root("import steer; import transformers.activations; from transformers import LlamaConfig")
    assert out.returncode == 0, out.stderr
