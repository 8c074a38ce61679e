"""Intra-op threads from the CPUs this process may actually use.

``os.cpu_count()`` (and torch's default) counts the machine's cores; a container or a ``taskset``
may give the process fewer. Running more OpenMP threads than usable cores makes every parallel
region wait for a thread that is not scheduled, which is how a 14 s training step becomes 110 s.
The usable count is the smaller of the scheduler affinity mask and the cgroup CPU quota
(cgroup v2 ``cpu.max``, or v1 ``cpu.cfs_quota_us / cpu.cfs_period_us``, rounded up), shared
evenly between the processes of one machine (``LOCAL_WORLD_SIZE`` under torchrun). An explicit
``OMP_NUM_THREADS`` wins over all of this.

**One OpenMP team while serving.** torch's CPU kernels run their parallel regions on the OpenMP
team of the calling thread, and each thread that ever ran one keeps its team (libgomp's pool) for
as long as it lives. Once the process's teams hold more threads than there are CPUs, libgomp
stops letting idle team threads spin for the next region and puts them to sleep at once (its
"throttled" spin count), so every small GEMM of a decode step pays a futex wake-up. Measured on a
2-core machine: the same bf16 decode forward of the default model took 18 ms on the thread that
loaded the model and 35 ms on a second thread, and the served single stream ran 30.5 tokens/s
when the model was loaded on the main thread, 42.6 when it was loaded in a thread that had
ended. So a server keeps the engine's worker the only long-lived thread that computes: setup
(loading, FLR calibration) and scoring run in threads of their own that end when their work is
done (:func:`run_in_own_thread`, :func:`in_own_thread`), never on the event loop's thread or in a
reused executor thread.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def cgroup_cpu_limit(root: Path = CGROUP_ROOT) -> int | None:
    """CPUs allowed by the cgroup quota (rounded up), or None when there is no quota or no cgroup file."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]  # v2: "max 100000" or "200000 100000"
        if quota == "max":
            return None
        return max(1, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        pass
    try:  # v1
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return max(1, math.ceil(quota / period)) if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def usable_cpus(root: Path = CGROUP_ROOT) -> int:
    """CPUs this process can run on: the affinity mask, capped by the cgroup quota."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    limit = cgroup_cpu_limit(root)
    return max(1, min(cpus, limit) if limit else cpus)


def default_threads(local_world_size: int | None = None, root: Path = CGROUP_ROOT) -> int:
    """``OMP_NUM_THREADS`` when the environment sets it (a launcher's or the user's explicit choice;
    torchrun sets 1 per rank), else the usable CPUs divided among the processes on this machine
    (at least 1 each)."""
    explicit = os.environ.get("OMP_NUM_THREADS", "").strip()
    if explicit.isdigit() and int(explicit) > 0:
        return int(explicit)
    if local_world_size is None:
        local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, usable_cpus(root) // max(1, local_world_size))


def configure_threads(threads: int = 0, local_world_size: int | None = None) -> int:
    """Set torch's intra-op threads: ``threads``, or :func:`default_threads` when 0; returns the count."""
    import torch

    n = threads if threads > 0 else default_threads(local_world_size)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def passive_openmp_waits() -> None:
    """Make idle OpenMP threads sleep instead of spin (``OMP_WAIT_POLICY=PASSIVE``) unless the
    environment already says otherwise. Must run before torch is imported (the OpenMP runtime reads
    it once). Measured on a 2-core machine with two training processes of 2 threads each: 66 s per
    step with the default (spinning) policy, 42 s with PASSIVE (the fair share of the 22 s a quiet
    step takes); on a quiet machine the two are within noise of each other."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def run_in_own_thread(fn, /, *args, **kwargs):
    """``fn(*args, **kwargs)`` in a new thread that ends when it returns; its result, or its exception
    re-raised here. For torch work (loading a model) of a thread that will not compute again: the
    OpenMP team it needs dies with the thread (see the module docstring)."""
    import threading

    outcome: dict = {}

    def run():
        try:
            outcome["result"] = fn(*args, **kwargs)
        except BaseException as e:  # handed to the caller
            outcome["error"] = e

    worker = threading.Thread(target=run, name=f"steer-{getattr(fn, '__name__', 'call')}")
    worker.start()
    worker.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


async def in_own_thread(fn, /, *args):
    """``await``-able :func:`run_in_own_thread`: ``fn(*args)`` in a daemon thread of its own, started at
    once, which ends when ``fn`` returns.

    Not ``asyncio.to_thread``: the loop's executor reuses its threads, and a reused thread keeps the
    OpenMP team of the torch work it once did (see the module docstring); at shutdown that executor
    may also be busy, and a call made then must start at once. Cancelling the awaiting task does not
    stop ``fn`` (as with ``to_thread``): ``fn`` bounds its own time or checks a flag."""
    import asyncio
    import threading

    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def settle(method, value):
        if not future.done():  # the awaiting task may have been cancelled meanwhile
            method(value)

    def run():
        try:
            result = fn(*args)
        except BaseException as e:  # handed to the awaiting task
            outcome = (future.set_exception, e)
        else:
            outcome = (future.set_result, result)
        try:
            loop.call_soon_threadsafe(settle, *outcome)
        except RuntimeError:  # the loop is gone: nobody waits any more
            pass

    threading.Thread(target=run, name=f"steer-{getattr(fn, '__name__', 'call')}", daemon=True).start()
    return await future
