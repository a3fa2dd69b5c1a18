"""Training on several processes under `torchrun`, by PyTorch's own engines: DDP keeps a replica
per rank and averages the trainable gradients; with `--fsdp`, FSDP2 (`fully_shard`, one unit per
decoder block, then the root) shards the frozen base, the trainable tensors and their optimizer
state over the ranks. gloo on CPU; NCCL on CUDA, each rank on `cuda:LOCAL_RANK`.

Besides the engines' own gradient reduction, SEFT reduces its topology statistics (see seft.py)
on a process group of its own, so its collectives never interleave with the engines'. Topology
state that is not a parameter (masks, slot positions, the merged store) is replicated and changes
identically on every rank; parameters sharded by FSDP2 are read and written through `local_part`.
Without torchrun every function here is a no-op, so the training loop has one code path.
"""
from __future__ import annotations

import atexit
import contextlib
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn

from seftc.device import resolve_device


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    fsdp: bool = False
    stats_group: Any = None  # SEFT's statistics reductions, apart from DDP's/FSDP's collectives
    mesh: Any = None  # FSDP2's device mesh, made at the first `shard`

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def sharded(self) -> bool:
        return self.enabled and self.fsdp

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def mean(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """A function averaging a tensor over the ranks (statistics), or None on one process."""
        if not self.enabled:
            return None
        import torch.distributed as td

        def reduce(t: torch.Tensor) -> torch.Tensor:
            t = t.contiguous().clone()
            td.all_reduce(t, group=self.stats_group)
            return t.div_(self.world)

        return reduce

    def shard(self, unit: nn.Module) -> None:
        """FSDP2's `fully_shard` of one unit over all the ranks (once: a unit already sharded,
        e.g. by the block-by-block loader, is left as it is)."""
        from torch.distributed.fsdp import FSDPModule, fully_shard

        if isinstance(unit, FSDPModule):
            return
        if self.mesh is None:
            from torch.distributed.device_mesh import init_device_mesh

            self.mesh = init_device_mesh(self.device.type, (self.world,))
        fully_shard(unit, mesh=self.mesh)

    def wrap(self, model: nn.Module, units: list[nn.Module]) -> nn.Module:
        """The module the training loop calls: `model` itself on one process; under torchrun a DDP
        replica, or with --fsdp the model after `fully_shard` of each unit (decoder block) and of
        the root. The trainable parameters must be set (requires_grad) before this call."""
        if not self.enabled:
            return model
        if self.fsdp:
            for unit in units:
                self.shard(unit)
            self.shard(model)
            return model
        from torch.nn.parallel import DistributedDataParallel

        # every rank loaded the same checkpoint: no broadcast of the weights at the start
        return DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                                       broadcast_buffers=False, init_sync=False)

    @contextlib.contextmanager
    def accumulating(self, module: nn.Module, last: bool) -> Iterator[None]:
        """A micro-batch's backward: the engines reduce gradients only on the last one of a step."""
        if not self.enabled or last:
            yield
        elif self.fsdp:
            module.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                module.set_requires_gradient_sync(True)
        else:
            with module.no_sync():
                yield

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


def is_sharded(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


@dataclass
class LocalPart:
    """The part of a tensor this rank holds, as a flat view, and the flat indices of the whole
    tensor it covers, [start, stop). For a plain tensor the whole; for an FSDP2 parameter (a
    DTensor sharded on dim 0, as torch.chunk splits it) the rows of this rank's shard."""

    flat: torch.Tensor
    start: int
    stop: int

    def take(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(which of `index` (flat indices of the whole) fall here, their local indices)."""
        here = (index >= self.start) & (index < self.stop)
        return here, (index[here] - self.start).long()

    def fill_(self, index: torch.Tensor, value: float) -> None:
        _, local = self.take(index)
        self.flat[local] = value

    def add_(self, index: torch.Tensor, values: torch.Tensor) -> None:
        here, local = self.take(index)
        self.flat.index_add_(0, local, values[here].to(self.flat.dtype))

    def rows_of(self, whole: torch.Tensor) -> torch.Tensor:
        """The slice of a replicated flat tensor (e.g. the mask) that lines up with this part."""
        return whole.reshape(-1)[self.start : self.stop]


def local_part(t: torch.Tensor) -> LocalPart:
    """See LocalPart. `t` may be a parameter, its .data or its .grad."""
    if not is_sharded(t):
        flat = t.data.reshape(-1) if isinstance(t, nn.Parameter) else t.reshape(-1)
        return LocalPart(flat, 0, flat.numel())
    from torch.distributed.tensor import Shard

    placement = t.placements[0]
    if not isinstance(placement, Shard) or placement.dim != 0 or len(t.placements) != 1:
        raise RuntimeError(f"expected a tensor sharded on dim 0, got placements {t.placements}")
    local = t.to_local()
    row = t.numel() // max(t.shape[0], 1)  # elements per row of the whole
    chunk = -(-t.shape[0] // t.device_mesh.size())  # rows per rank, the last ranks may hold fewer
    start = min(t.device_mesh.get_local_rank() * chunk, t.shape[0]) * row
    flat = local.detach().reshape(-1)
    return LocalPart(flat, start, start + flat.numel())


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: an all-gather for an FSDP2-sharded one (every rank must call it)."""
    t = t.detach()
    return t.full_tensor() if is_sharded(t) else t


def load_local(t: torch.Tensor, whole: torch.Tensor) -> None:
    """Write this rank's part of `whole` into `t` (a plain or FSDP2-sharded tensor)."""
    part = local_part(t)
    part.flat.copy_(whole.reshape(-1)[part.start : part.stop].to(part.flat.device, part.flat.dtype))


def gather_full_model(model: nn.Module, keep: bool) -> None:
    """After FSDP2 training: replace every sharded parameter by the whole tensor (all-gathered one
    at a time) where `keep`, so a plain state dict can be saved; elsewhere by an empty tensor (its
    memory freed). No forward may run on the model afterwards."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():  # every group back to its shards (the root stays gathered after a forward), so
        if isinstance(module, FSDPModule):  # FSDP2's state-dict hook finds nothing to reshard over the whole tensors
            module.reshard()
    seen: set[int] = set()
    shared: set[int] = set()  # a parameter of two modules (a tied LM head) stays one parameter
    for module in model.modules():
        for p in module.parameters(recurse=False):
            (shared if id(p) in seen else seen).add(id(p))
    done: dict[int, tuple[nn.Parameter, nn.Parameter]] = {}  # (the sharded one is kept: its id cannot be reused meanwhile)
    for module in list(model.modules()):
        for name, p in list(module.named_parameters(recurse=False)):
            if id(p) in done:
                module._parameters[name] = done[id(p)][1]
                continue
            if not is_sharded(p):
                continue
            whole = p.full_tensor().detach()
            new = whole if keep else torch.empty(0, dtype=whole.dtype, device=whole.device)
            del whole
            module._parameters[name] = nn.Parameter(new, requires_grad=False)
            if id(p) in shared:
                done[id(p)] = (p, module._parameters[name])


def unwrapped(model: nn.Module) -> nn.Module:
    """`model` itself, or after FSDP2 training and `gather_full_model`, a plain model of the same
    config holding the very same tensors (no copy), for a pass that runs forwards (lora-merge's
    re-prune) without FSDP2's hooks putting the shards back."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        return model
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):  # buffers (rotary tables) are computed from the config
        plain = AutoModelForCausalLM.from_config(model.config, dtype=next(model.parameters()).dtype)
    plain.load_state_dict(model.state_dict(), assign=True)
    plain.tie_weights()
    return plain.to(next(model.parameters()).device).eval()  # the computed buffers join the weights' device


def _destroy_group() -> None:
    import torch.distributed as td

    if td.is_initialized():
        td.destroy_process_group()


def setup(device: str | None = None, fsdp: bool = False) -> Dist:
    """The process group (under torchrun) and the device of this rank: `device` cpu or cuda
    (default: CUDA when available); on CUDA under torchrun, cuda:LOCAL_RANK with NCCL."""
    dev = torch.device(resolve_device(device))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(device=dev, fsdp=fsdp)
    import torch.distributed as td

    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if not td.is_initialized():
        td.init_process_group(backend=backend)
        # the group this process made is torn down before the interpreter's: gloo's threads,
        # left to the C++ teardown, can abort the process ("terminate called without an active
        # exception") after its work is done and saved
        atexit.register(_destroy_group)
    return Dist(td.get_rank(), td.get_world_size(), dev, fsdp, td.new_group(backend=backend))
