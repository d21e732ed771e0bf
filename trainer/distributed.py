"""Process-group helpers for `torchrun` (DDP): NCCL on GPUs, gloo on CPUs."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Runtime:
    """Where this process runs: its rank among `world_size`, its device, and the process group it joined
    (`backend`: "nccl" or "gloo" under torchrun, even with one rank; None when started without a launcher)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """In a process group: the model is wrapped in DDP, and barriers and all-reduces go through `backend`."""
        return self.backend is not None


# What torchrun (or any env:// launcher) sets for every process it starts; a plain `python -m trainer.fit` has none.
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def launched_by_torchrun() -> bool:
    return all(name in os.environ for name in LAUNCHER_VARIABLES)


def pick_device(requested: str, local_rank: int = 0) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was requested but CUDA is not available; use --device cpu or auto")
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_runtime(requested_device: str) -> Runtime:
    """Join the process group when launched by torchrun (NCCL on GPUs, gloo on CPUs), whatever the number of
    ranks: a one-process torchrun run goes through DDP and the collectives as a multi-GPU run does. Started
    without a launcher, the process runs alone."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(requested_device, local_rank)
    if not launched_by_torchrun():
        if world_size > 1:
            missing = [name for name in LAUNCHER_VARIABLES if name not in os.environ]
            raise RuntimeError(
                f"WORLD_SIZE={world_size} but {', '.join(missing)} not set: start several processes with "
                "torchrun --nproc_per_node=N -m trainer.fit ..."
            )
        return Runtime(rank, world_size, local_rank, device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # device_id binds the rank to its GPU: NCCL starts at once, and barriers know their device.
    dist.init_process_group(
        backend, timeout=datetime.timedelta(minutes=10), device_id=device if device.type == "cuda" else None
    )
    return Runtime(rank, world_size, local_rank, device, backend)


def barrier(runtime: Runtime) -> None:
    if runtime.distributed:
        dist.barrier()


def all_reduce_sum(runtime: Runtime, tensor: torch.Tensor) -> torch.Tensor:
    if runtime.distributed:
        dist.all_reduce(tensor)
    return tensor


def all_reduce_min(runtime: Runtime, tensor: torch.Tensor) -> torch.Tensor:
    if runtime.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return tensor


def shutdown(runtime: Runtime) -> None:
    if runtime.distributed and dist.is_initialized():
        dist.destroy_process_group()
