"""The few collectives the loop needs; each is a no-op without an initialized process group."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class WorldInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    node_rank: int = 0
    node_address: str = ""  # the node's cluster address (Ray's node IP), where known

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def export_env(self) -> None:
        """The variables mosaicml-streaming reads to partition samples across ranks and nodes."""
        os.environ.update(
            RANK=str(self.rank),
            WORLD_SIZE=str(self.world_size),
            LOCAL_RANK=str(self.local_rank),
            LOCAL_WORLD_SIZE=str(self.local_world_size),
            NODE_RANK=str(self.node_rank),
        )


def world_info() -> WorldInfo:
    if not is_distributed():
        return WorldInfo()
    env = os.environ
    return WorldInfo(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=int(env.get("LOCAL_RANK", 0)),
        local_world_size=int(env.get("LOCAL_WORLD_SIZE", dist.get_world_size())),
        node_rank=int(env.get("NODE_RANK", 0)),
    )


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def ensure_process_group(world: WorldInfo) -> None:
    """Sharded engines need a process group; a lone worker without one gets a private one."""
    if is_distributed():
        return
    assert world.world_size == 1, "more than one worker but no process group"
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def all_reduce_sum(values: list[float]) -> list[float]:
    # note: a CPU-GPU sync point when the group is NCCL; called a few times per step, not per layer.
    if not is_distributed():
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    dist.all_reduce(tensor)
    return tensor.tolist()


def all_reduce_max(value: int, group=None) -> int:
    if not is_distributed():
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=_collective_device(group))
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=group)
    return int(tensor.item())


def all_gather_object(obj, group=None) -> list:
    """Every rank's `obj`, in rank order (pickled: for a few small values per step)."""
    if not is_distributed():
        return [obj]
    gathered = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, obj, group=group)
    return gathered


def new_cpu_group():
    """A gloo group of every rank, for collectives that must not interleave with the default
    group's (the data pipeline's, issued from its own thread). Collective: all ranks call it."""
    return dist.new_group(backend="gloo")


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast_object(obj):
    if not is_distributed():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def _collective_device(group=None) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
