"""torchrun / DDP plumbing: one process per device, gloo on CPU, NCCL on GPU; rank 0 writes outputs.

Under ``torchrun --nproc_per_node N`` the environment carries RANK / WORLD_SIZE / LOCAL_RANK and
:func:`init_distributed` joins the process group; without it everything is a world of one and the
helpers below are no-ops. Data parallelism is deterministic: every rank derives the same global
batch order from the seed, and :func:`rank_micro_batches` gives rank ``r`` the examples
``global_batch[r::N]`` (the DistributedSampler split), cut into gradient-accumulation
micro-batches. One rank with ``grad_accum = N * a`` therefore sees, per optimiser step, exactly the
examples N ranks with ``grad_accum = a`` see together, and DDP's gradient averaging makes the
updates equal (the 2-rank test checks this).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from steer.models import DEVICES as DEVICES  # one list for every command (re-exported)


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _device(preference: str, local_rank: int) -> torch.device:
    from steer.models import resolve_device

    dev = resolve_device(preference, "device", local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(local_rank)
    return dev


def init_distributed(device: str = "auto", threads: int = 0) -> DistContext:
    """Join torchrun's process group when WORLD_SIZE > 1; else a world of one. Idempotent.

    Sets torch's intra-op threads to ``threads``, or (0) to this rank's share of the CPUs the
    process may use (``steer.threads.default_threads``)."""
    from steer.threads import configure_threads

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    configure_threads(threads, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    dev = _device(device, local_rank)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistContext(rank, world, local_rank, dev)


def shutdown(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def run_in_process_group(run, config):
    """``run(config, ctx)`` in the process group that ``config.device`` and ``config.threads`` ask for
    (:func:`init_distributed`); the group is shut down afterwards, also when ``run`` raises."""
    ctx = init_distributed(config.device, config.threads)
    try:
        return run(config, ctx)
    finally:
        shutdown(ctx)


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def broadcast_object(ctx: DistContext, obj, src: int = 0):
    """``obj`` from rank ``src`` on every rank."""
    if not ctx.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(ctx: DistContext, obj) -> list:
    """Every rank's ``obj``, in rank order."""
    if not ctx.enabled:
        return [obj]
    out = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def all_reduce_mean(ctx: DistContext, values: dict[str, float]) -> dict[str, float]:
    """Means over ranks of scalar metrics (every rank must pass the same keys)."""
    if not ctx.enabled or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    t /= ctx.world_size
    return dict(zip(keys, t.tolist()))


def all_reduce_sum_(ctx: DistContext, tensor: torch.Tensor) -> torch.Tensor:
    if ctx.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def rank_micro_batches(global_batch: Sequence[int], rank: int, world_size: int, grad_accum: int) -> list[list[int]]:
    """This rank's micro-batches of one optimiser step: ``global_batch[rank::world_size]`` in
    ``grad_accum`` consecutive, equal slices. ``len(global_batch)`` must be ``world * accum * b``."""
    n = len(global_batch)
    if n % (world_size * grad_accum):
        raise ValueError(f"a global batch of {n} does not split into {world_size} ranks x {grad_accum} micro-batches")
    mine = list(global_batch[rank::world_size])
    size = len(mine) // grad_accum
    return [mine[i * size:(i + 1) * size] for i in range(grad_accum)]


def wrap_ddp(module: torch.nn.Module, ctx: DistContext) -> torch.nn.Module:
    """DDP around ``module`` in a multi-rank world; the module itself otherwise."""
    if not ctx.enabled:
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids)
