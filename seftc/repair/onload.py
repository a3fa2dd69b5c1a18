"""The FSDP2-sharded model built block by block, so that no rank ever holds the whole base.

Under `torchrun ... repair --fsdp` each rank builds the model's skeleton on the meta device
(models/streaming.py), then for each decoder block in turn: reads the block's tensors from the
checkpoint (every rank reads its own local copy: no broadcast), checks its targets' masks, lets the
repair method wrap its linear layers (methods.py `attach_part`: SEFT slots, static's trainable
weights, LoRA adapters), `fully_shard`s the block (FSDP2 keeps this rank's rows and frees the
whole tensors) and goes on to the next. The embeddings, final norm and LM head (the root unit)
come last. A rank's peak while loading is so the shards of what is done plus one block whole.

The input's identity (the resume check, checkpoint.weights_digest) is taken from each tensor as
it is read, before any method touches it: the same digest as a whole-model load gives.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from seftc import memory
from seftc.models.streaming import StreamingModel
from seftc.models.targets import Target, find_blocks
from seftc.prune.masks import PackedMask
from seftc.repair.checkpoint import tensor_digest
from seftc.repair.distributed import Dist, is_sharded


def full_blocks(blocks: nn.ModuleList) -> int:
    """How many of `blocks` hold a whole (not meta, not FSDP2-sharded) parameter now (instrumentation)."""
    return sum(any(not p.is_meta and not is_sharded(p) for p in b.parameters()) for b in blocks)


def _to_device_buffers(model: nn.Module, device: torch.device) -> None:
    """The skeleton's real buffers (computed from the config, e.g. rotary tables) onto `device`."""
    for module in model.modules():
        for name, b in module._buffers.items():
            if b is not None and not b.is_meta and b.device != device:
                module._buffers[name] = b.to(device)


def build_sharded(stream: StreamingModel, dist: Dist, method, targets: list[Target],
                  check: Callable[[Target], PackedMask]) -> tuple[dict[str, PackedMask], dict[str, str]]:
    """Materialize, attach and shard `stream.model` block by block (see module docstring).
    `check(target)` returns the target's verified mask once its weight is real. Returns the masks
    and the per-tensor digests of the input. `targets` is emptied: a replaced nn.Linear in it
    would keep its whole weight alive past the sharding."""
    model = stream.model
    stack, blocks = find_blocks(model)
    state_keys = list(model.state_dict(keep_vars=True))  # tied copies included, as weights_digest sees them
    by_block: dict[int, list[Target]] = {}
    for t in targets:
        by_block.setdefault(t.block, []).append(t)
    targets.clear()
    masks: dict[str, PackedMask] = {}
    digests: dict[str, str] = {}

    def digest(under: Callable[[str], bool]) -> None:
        for key in state_keys:
            if under(key):
                digests[key] = tensor_digest(key, stream.current(key))

    _to_device_buffers(model, dist.device)
    method.freeze(model)
    for i, block in enumerate(blocks):
        prefix = f"{stack}.{i}."
        stream.materialize(stream.keys_under(f"{stack}.{i}"), dist.device)
        digest(lambda k: k.startswith(prefix))
        part = by_block.pop(i, [])
        for t in part:
            masks[t.name] = check(t)
        method.attach_part(model, part, masks)
        del part
        dist.shard(block)
        memory.release()  # the block's whole tensors, freed by the sharding
    stream.materialize([k for k in stream.keys_under("") if not k.startswith(stack + ".")], dist.device)
    model.tie_weights()  # the LM head onto the embedding just read, where the config ties them
    digest(lambda k: not k.startswith(stack + "."))  # a tied copy's digest is that of the tensor it is tied to
    method.attach_end(model)
    dist.shard(model)
    return masks, digests
