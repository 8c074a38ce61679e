"""Fixtures of every training test."""

import os

import pytest


@pytest.fixture(autouse=True, scope="module")
def one_thread(one_thread):
    """One intra-op thread, as torchrun gives each rank (OMP_NUM_THREADS=1): on a shared 2-core box
    OpenMP's thread hand-offs cost ~20 ms per small matmul when other processes hold the cores, which
    made the tiny-model steps 20x slower."""
    env = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # what the commands' --threads 0 then chooses (steer.threads)
    yield
    if env is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = env
