"""`render` under torchrun: each rank renders its share of the jobs, rank 0 shows the progress, every
rank exits with the batch's one exit code.

    torchrun --nproc-per-node N -m livetalk_cli render --manifest jobs.jsonl --checkpoint ckpt/ --device cuda

Every rank checks all inputs and plans the batch before any rank renders (a barrier), so all ranks
see the same finished outputs: the jobs left to do are dealt round-robin over the ranks, each exactly
once. A rerun, with any number of ranks, skips what is finished (an output is written to a temporary
file and renamed, so it is finished or absent). Ranks use gloo on CPUs and NCCL on GPUs (one GPU per
local rank). The results are gathered to every rank, which all exit 1 if any job failed anywhere.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def launched_ranks() -> Ranks:
    """The torchrun launch this process is part of (WORLD_SIZE, RANK, LOCAL_RANK), else one rank."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks()
    return Ranks(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))


def init(ranks: Ranks, device: torch.device) -> None:
    """Join the process group (gloo on CPU, NCCL on CUDA) once."""
    import torch.distributed as dist

    if ranks.distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def rank_device(device: torch.device, ranks: Ranks) -> torch.device:
    """On CUDA each local rank takes its own GPU."""
    if ranks.distributed and device.type == "cuda" and device.index is None:
        return torch.device("cuda", ranks.local_rank % max(torch.cuda.device_count(), 1))
    return device


def share(items: list[T], ranks: Ranks) -> list[T]:
    """This rank's items: every world-th one, starting at its rank (each item exactly once overall)."""
    return items[ranks.rank::ranks.world]


def barrier(ranks: Ranks) -> None:
    if ranks.distributed:
        import torch.distributed as dist

        dist.barrier()


def gather(obj: Any, ranks: Ranks) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank."""
    if not ranks.distributed:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * ranks.world
    dist.all_gather_object(out, obj)
    return out


def close(ranks: Ranks) -> None:
    if ranks.distributed:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def deal(planned: list[T], ranks: Ranks, skip: Any = lambda p: p.skip) -> list[T]:
    """This rank's jobs: its share of those not finished; rank 0 also reports the finished ones."""
    if not ranks.distributed:
        return planned
    todo = [p for p in planned if not skip(p)]
    return ([p for p in planned if skip(p)] if ranks.main else []) + share(todo, ranks)


def my_jobs(planned: list[T], ranks: Ranks) -> list[T]:
    """`deal`, once every rank has planned the batch (so all saw the same finished outputs)."""
    barrier(ranks)
    return deal(planned, ranks)
