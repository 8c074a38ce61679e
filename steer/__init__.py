"""steer: a multi-objective steerable model server (see README.md).

One import-time fix lives here, because every entry point (``python -m steer.serve``,
``python -m steer.train``, ``python -m pytest``) imports ``steer`` before it imports transformers.
The repository keeps its Triton kernels in a top-level ``kernels/`` directory, installed as
``steer.kernels``. transformers (5.2x) imports the PyPI package of the same name, ``kernels``, which
it depends on; and ``python -m`` puts the working directory first on ``sys.path``, so run from the
repository root, ``import kernels`` would find our directory instead and transformers fails
(``cannot import name 'CUDAProperties' from 'kernels'``). :class:`_DistributionKernels` answers
``import kernels`` from ``sys.path`` without the repository root whenever the package is installed
there; otherwise the normal import runs unchanged.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _DistributionKernels(importlib.abc.MetaPathFinder):
    """Finds the top-level module ``kernels`` everywhere on ``sys.path`` except this repository's root."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "kernels":
            return None
        elsewhere = [p for p in sys.path if os.path.abspath(p or os.curdir) != _ROOT]
        return importlib.machinery.PathFinder.find_spec(fullname, elsewhere)


if not any(isinstance(f, _DistributionKernels) for f in sys.meta_path):
    sys.meta_path.insert(0, _DistributionKernels())
