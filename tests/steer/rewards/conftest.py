import pytest


@pytest.fixture(scope="module")
def one_thread():
    """Tiny-model matmuls are too small to gain from intra-op threads, and on a busy machine the
    thread pool's synchronisation costs several times the work (measured: 14 s vs 89 s for the
    same training run on 2 loaded cores)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
