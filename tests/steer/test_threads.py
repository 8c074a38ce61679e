"""Thread choice from the CPUs a process may use: affinity mask, cgroup quota, ranks, OMP_NUM_THREADS."""

import os

import pytest
import torch

from steer import threads


@pytest.fixture
def affinity(monkeypatch):
    """Fake the scheduler affinity mask: ``affinity(n)`` pretends the process may run on n CPUs."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)

    def set_mask(n: int):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(100, 100 + n)), raising=False)
    return set_mask


def cgroup(tmp_path, v2: str | None = None, v1: tuple[int, int] | None = None):
    if v2 is not None:
        (tmp_path / "cpu.max").write_text(v2 + "\n")
    if v1 is not None:
        (tmp_path / "cpu").mkdir()
        (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text(f"{v1[0]}\n")
        (tmp_path / "cpu" / "cpu.cfs_period_us").write_text(f"{v1[1]}\n")
    return tmp_path


def test_affinity_mask_not_cpu_count_decides(affinity, tmp_path):
    affinity(3)  # e.g. `taskset -c 4-6` on a 64-core machine
    assert threads.usable_cpus(cgroup(tmp_path)) == 3
    assert threads.default_threads(root=tmp_path) == 3


@pytest.mark.parametrize("quota, expected", [("max 100000", 8), ("200000 100000", 2), ("150000 100000", 2),
                                             ("50000 100000", 1)])
def test_cgroup_v2_quota_caps_the_mask_rounding_up(affinity, tmp_path, quota, expected):
    affinity(8)
    assert threads.usable_cpus(cgroup(tmp_path, v2=quota)) == expected


def test_cgroup_v1_quota_and_no_quota(affinity, tmp_path):
    affinity(8)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert threads.usable_cpus(cgroup(tmp_path / "a", v1=(300000, 100000))) == 3
    assert threads.usable_cpus(cgroup(tmp_path / "b", v1=(-1, 100000))) == 8  # -1: no quota
    assert threads.cgroup_cpu_limit(tmp_path / "missing") is None


def test_ranks_on_one_machine_share_the_cpus(affinity, tmp_path, monkeypatch):
    affinity(8)
    assert threads.default_threads(4, root=tmp_path) == 2
    assert threads.default_threads(3, root=tmp_path) == 2  # floor: never more threads than cores
    assert threads.default_threads(16, root=tmp_path) == 1  # at least one
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun's variable when none is given
    assert threads.default_threads(root=tmp_path) == 4


def test_explicit_omp_num_threads_wins(affinity, tmp_path, monkeypatch):
    affinity(8)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert threads.default_threads(4, root=tmp_path) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "junk")  # not a count: ignored
    assert threads.default_threads(root=tmp_path) == 8


def test_configure_threads_sets_torch(affinity, monkeypatch):
    before = torch.get_num_threads()
    try:
        affinity(1)
        monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda root=None: None)
        assert threads.configure_threads(0) == 1 and torch.get_num_threads() == 1
        assert threads.configure_threads(2) == 2 and torch.get_num_threads() == 2  # --threads 2
    finally:
        torch.set_num_threads(before)


# -- one OpenMP team while serving: torch work in threads that end ---------------------------------------------------


def os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


def settled_threads(at_most: int, timeout: float = 5.0) -> int:
    """The process's OS thread count once it is at most ``at_most`` (OpenMP's team threads leave a little
    after their thread's pool is freed), or what it still is after ``timeout`` seconds."""
    import time

    end = time.monotonic() + timeout
    while os_threads() > at_most and time.monotonic() < end:
        time.sleep(0.02)
    return os_threads()


def parallel_matmul():
    torch.set_num_threads(2)  # a team of two: one OpenMP thread besides the caller
    a = torch.randn(256, 256)
    return float((a @ a).sum())


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads through /proc")
def test_run_in_own_thread_leaves_no_openmp_team_behind():
    """The property the server relies on: parallel torch work done by run_in_own_thread leaves no
    thread behind (the thread and its OpenMP team end with it), however often it runs."""
    before_threads = torch.get_num_threads()
    try:
        threads.run_in_own_thread(parallel_matmul)  # the runtime's own one-off threads start with the first use
        baseline = settled_threads(0, timeout=0.2)
        for _ in range(3):
            assert isinstance(threads.run_in_own_thread(parallel_matmul), float)
            assert settled_threads(baseline) == baseline
    finally:
        torch.set_num_threads(before_threads)


def test_run_in_own_thread_returns_and_raises_in_the_caller():
    import threading

    caller = threading.current_thread()
    ran_on = threads.run_in_own_thread(lambda x, y=0: (threading.current_thread(), x + y), 2, y=3)
    assert ran_on[1] == 5 and ran_on[0] is not caller and not ran_on[0].is_alive()
    with pytest.raises(KeyError, match="missing"):
        threads.run_in_own_thread(lambda: {}["missing"])


def test_in_own_thread_awaits_a_thread_that_ends():
    import asyncio
    import threading

    async def main():
        ran_on, value = await threads.in_own_thread(lambda x: (threading.current_thread(), x * 2), 21)
        with pytest.raises(ValueError, match="bad"):
            await threads.in_own_thread(lambda: (_ for _ in ()).throw(ValueError("bad")))
        return ran_on, value

    ran_on, value = asyncio.run(main())
    assert value == 42 and ran_on is not threading.main_thread()
    ran_on.join(5)
    assert not ran_on.is_alive()
