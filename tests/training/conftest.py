"""Fixtures of every training test."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread, as torchrun gives each rank (OMP_NUM_THREADS=1): on a shared 2-core box
    OpenMP's thread hand-offs cost ~20 ms per small matmul when other processes hold the cores, which
    made the tiny-model steps 20x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
