"""The ranks of a run launched by torchrun (torch.distributed), or the one rank of a plain run.

`torchrun --nproc_per_node N -m pipeline.cli train CONFIG` (or `saeflow train` under torchrun's
environment: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) starts N processes; join_ranks()
initializes the process group from that environment, nccl on CUDA and gloo on the CPU. Without
that environment it returns SINGLE and nothing touches torch.distributed, so a plain run pays
nothing. Collectives here move tensors only (JSON is sent as bytes): no pickle between ranks.
"""

from __future__ import annotations

import datetime
import json
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes logs, checkpoints and outputs."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def _device(self) -> torch.device:
        # nccl moves CUDA tensors; gloo moves CPU tensors
        return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")

    def all_reduce_sums(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each tensor summed over the ranks (new tensors; the same on one rank), in one
        all-reduce per dtype: a log line's sums cost two collectives, not one per figure."""
        if not self.distributed:
            return list(tensors)
        summed: list[torch.Tensor | None] = [None] * len(tensors)
        for dtype in dict.fromkeys(tensor.dtype for tensor in tensors):  # in list order: the same on every rank
            picked = [i for i, tensor in enumerate(tensors) if tensor.dtype == dtype]
            flat = torch.cat([tensors[i].reshape(-1).to(self._device()) for i in picked])
            dist.all_reduce(flat)
            for i, part in zip(picked, flat.split([tensors[i].numel() for i in picked])):
                summed[i] = part.view_as(tensors[i]).to(tensors[i].device)
        return summed

    def all_reduce_sum_async(self, tensor: torch.Tensor) -> Callable[[], torch.Tensor]:
        """Start summing `tensor` over the ranks, in place; the returned function waits for the
        sum and returns `tensor` (so other work can run meanwhile: on the CPU gloo sums in its own
        threads; nccl on its own stream, the wait only orders the current stream after it)."""
        if not self.distributed:
            return lambda: tensor
        moved = tensor.to(self._device())
        work = dist.all_reduce(moved, async_op=True)

        def wait() -> torch.Tensor:
            work.wait()
            if moved is not tensor:
                tensor.copy_(moved)
            return tensor

        return wait

    def gather_json(self, value: Any) -> list[Any]:
        """[value of rank 0, value of rank 1, ...] on every rank."""
        if not self.distributed:
            return [value]
        data = torch.frombuffer(bytearray(json.dumps(value).encode()), dtype=torch.uint8)
        size = torch.tensor([data.numel()], dtype=torch.int64, device=self._device())
        sizes = [torch.zeros_like(size) for _ in range(self.world)]
        dist.all_gather(sizes, size)
        longest = int(max(s.item() for s in sizes))
        padded = torch.zeros(longest, dtype=torch.uint8, device=self._device())
        padded[: data.numel()] = data.to(padded.device)
        gathered = [torch.zeros_like(padded) for _ in range(self.world)]
        dist.all_gather(gathered, padded)
        return [json.loads(bytes(g[: int(s.item())].cpu().numpy())) for g, s in zip(gathered, sizes)]

    def broadcast_json(self, value: Any) -> Any:
        """Rank 0's `value`, on every rank."""
        return self.gather_json(value if self.main else None)[0]

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


SINGLE = Ranks()


def launched_ranks() -> Ranks:
    """The ranks torchrun's environment describes, without joining them."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE
    return Ranks(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))


def join_ranks(device_type: str) -> Ranks:
    """Initialize the process group of a torchrun launch (once) and return this process's ranks;
    on CUDA each rank takes the GPU of its local rank."""
    ranks = launched_ranks()
    if not ranks.distributed or dist.is_initialized():
        return ranks
    if device_type == "cuda":
        torch.cuda.set_device(ranks.local_rank)
    backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=60))  # rank 0 may initialize long
    return ranks


def leave_ranks() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
