"""The one layer-by-layer calibration loop, shared by every calibrated pruner and by OWL.

1. One pass of the embeddings with every decoder block replaced by a recorder captures the first
   block's input and each block's keyword arguments (masks, rotary tables): no block runs.
2. Block by block, the block's linear layers see their inputs through forward pre-hooks; a
   handler observes them and acts (prunes) before the layer computes, and the block's output
   becomes the next block's input. So each block is calibrated on the outputs of the already
   pruned blocks before it, and peak memory is one block plus the calibration activations
   (with a streaming `BlockSource`, only that block is in memory at all).

With `batch_size=None` all samples go through a block at once and each layer is pruned in its
own pre-hook, so later layers of the block see the pruned earlier ones and every block runs
once (the cost of one forward pass). With a batch size, a block runs twice: once over all
batches to gather statistics, once to produce its (pruned) outputs.
"""
from __future__ import annotations

from typing import Any, Callable, Protocol, Sequence

import torch
import torch.nn as nn

from seftc.models.targets import Target, find_blocks
from seftc.progress import NO_PROGRESS, ProgressSink


class BlockHandler(Protocol):
    def observe(self, target: Target, x: torch.Tensor) -> None: ...

    def finish(self, targets: Sequence[Target]) -> None: ...


class BlockSource(Protocol):
    """Where a block's weights come from: `load(i)` before block i runs, `done(i)` once its
    output is computed (streaming: read it from the checkpoint, then write and free it)."""

    def load(self, i: int) -> None: ...

    def done(self, i: int) -> None: ...


class Resident:
    """The whole model is in memory already: nothing to load or free."""

    def load(self, i: int) -> None:
        pass

    def done(self, i: int) -> None:
        pass


class _Recorder(nn.Module):
    """Stands in for a decoder block during capture: records its call and returns its input."""

    def __init__(self, block: nn.Module, sink: Callable[[tuple, dict], None]):
        super().__init__()
        self._sink = sink
        for key, value in vars(block).items():  # plain attributes some models read (attention_type, ...)
            if not key.startswith("_") and isinstance(value, (str, int, float, bool)):
                setattr(self, key, value)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._sink(args, kwargs)
        return hidden_states


@torch.no_grad()
def capture_block_inputs(model: nn.Module, chunks: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[list[tuple[tuple, dict]]]]:
    """First block's hidden input per chunk, and (args, kwargs) per block per chunk."""
    _, blocks = find_blocks(model)
    calls: list[list[tuple[tuple, dict]]] = [[] for _ in blocks]
    hidden: list[torch.Tensor] = []
    originals = list(blocks)

    def sink_for(i: int) -> Callable[[tuple, dict], None]:
        return lambda args, kwargs: calls[i].append((args, kwargs))

    class _First(_Recorder):
        def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            hidden.append(hidden_states)
            return super().forward(hidden_states, *args, **kwargs)

    try:
        for i, block in enumerate(originals):
            blocks[i] = (_First if i == 0 else _Recorder)(block, sink_for(i))
        for ids in chunks:
            model.base_model(input_ids=ids, use_cache=False)
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block
    return hidden, calls


def _block_forward(block: nn.Module, x: torch.Tensor, call: tuple[tuple, dict]) -> torch.Tensor:
    args, kwargs = call
    out = block(x, *args, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def run_blocks(
    model: nn.Module,
    input_ids: torch.Tensor,
    targets: Sequence[Target],
    handler: BlockHandler,
    batch_size: int | None = None,
    progress: ProgressSink = NO_PROGRESS,
    description: str = "calibrating",
    source: BlockSource = Resident(),
) -> None:
    """Feed calibration samples through the decoder block by block (see module docstring);
    `source` brings each block in before it runs and takes it out after."""
    _, blocks = find_blocks(model)
    bs = input_ids.shape[0] if not batch_size else batch_size
    chunks = list(input_ids.split(bs))
    hidden, calls = capture_block_inputs(model, chunks)
    by_block: dict[int, list[Target]] = {}
    for t in targets:
        by_block.setdefault(t.block, []).append(t)
    single_pass = len(chunks) == 1
    advance = progress.task(description, len(blocks))

    for i, block in enumerate(blocks):
        block_targets = by_block.get(i, [])
        source.load(i)

        def make_hook(target: Target) -> Callable:
            def hook(module: nn.Module, inputs: tuple) -> None:
                handler.observe(target, inputs[0])
                if single_pass:
                    handler.finish([target])

            return hook

        handles = [t.module.register_forward_pre_hook(make_hook(t)) for t in block_targets]
        try:
            if single_pass:
                hidden = [_block_forward(block, hidden[0], calls[i][0])]
            else:
                for c, x in enumerate(hidden):
                    _block_forward(block, x, calls[i][c])
        finally:
            for h in handles:
                h.remove()
        if not single_pass:
            handler.finish(block_targets)
            hidden = [_block_forward(block, x, calls[i][c]) for c, x in enumerate(hidden)]
        calls[i] = []  # free this block's masks and rotary tables
        source.done(i)
        advance(1)
