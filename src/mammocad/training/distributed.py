"""Single process or ``torchrun`` DDP with the same code.

``torchrun`` (``python -m torch.distributed.run``) starts one process per rank with RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT set; that is the launcher's protocol, read
here and nowhere else. Without them the run is one process and every collective below is a no-op,
so the engine never branches on the world size. Backend: NCCL on CUDA, Gloo on CPU.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from mammocad.devices import resolve_device
from mammocad.errors import ConfigError


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None  # None = single process
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.backend is not None


def pick_device(choice: str, local_rank: int = 0) -> torch.device:
    """``--device`` -> this rank's device (``mammocad.devices.resolve_device``, the rule prediction uses too)."""
    return resolve_device(choice, local_rank)


def init_distributed(device_choice: str = "auto", timeout_minutes: float = 60.0) -> DistContext:
    """The process's rank and device; joins the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_choice, local_rank)
    if world <= 1:
        return DistContext(device=device)
    if ":" in str(device_choice):  # every rank would take the same GPU; NCCL refuses that
        raise ConfigError("--device", f"{device_choice} names one GPU; under torchrun use cuda or auto "
                                      "(each rank takes GPU LOCAL_RANK)")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, backend=backend, device=device)


def shutdown(ctx: DistContext) -> None:
    if ctx.active and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(ctx: DistContext, values: list[float]) -> list[float]:
    """Element-wise sum over ranks (float64)."""
    if not ctx.active:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def broadcast_from_main(ctx: DistContext, values: list[float]) -> list[float]:
    """Rank 0's ``values`` on every rank (decisions such as early stopping must agree)."""
    if not ctx.active:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    dist.broadcast(t, src=0)
    return t.tolist()


def gather_objects(ctx: DistContext, obj: object) -> list[object]:
    """Every rank's ``obj`` (small, JSON-like) as a list indexed by rank."""
    if not ctx.active:
        return [obj]
    out: list[object] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(ctx: DistContext) -> None:
    if ctx.active:
        dist.barrier()
