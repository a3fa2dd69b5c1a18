"""Data-parallel plumbing for `torchrun`: gloo on CPU, NCCL on GPU. Without torchrun every
function here is a no-op, so the training loop has one code path."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class Dist:
    rank: int = 0
    world: int = 1

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def mean(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        if not self.enabled:
            return None
        import torch.distributed as td

        def reduce(t: torch.Tensor) -> torch.Tensor:
            t = t.contiguous()
            td.all_reduce(t)
            return t / self.world

        return reduce

    def average_grads(self, params: list[torch.Tensor]) -> None:
        if not self.enabled:
            return
        import torch.distributed as td

        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        td.all_reduce(flat)
        flat /= self.world
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def gather(self, obj):
        if not self.enabled:
            return [obj]
        import torch.distributed as td

        out = [None] * self.world
        td.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as td

            td.barrier()


def setup() -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as td

    if not td.is_initialized():
        td.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return Dist(td.get_rank(), td.get_world_size())
