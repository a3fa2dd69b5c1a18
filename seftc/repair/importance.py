"""The pruning-time importance of SEFT's eviction cost: Wanda's |W|·‖X‖ needs ‖X‖² per input
column of each layer, which a prune manifest does not keep, so repair recomputes it once, at its
start, from a short pass over calibration text (the same statistic Wanda gathers)."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from seftc.data.calibration import CalibConfig, calibration_samples
from seftc.prune.methods import WandaPruner


@torch.no_grad()
def input_sq_norms(model: nn.Module, tokenizer: Any, layers: dict[str, nn.Module], calib: CalibConfig,
                   batch_size: int = 4) -> dict[str, torch.Tensor]:
    """Σ x_j² over the calibration tokens, per input column j of each layer in `layers` (fp32)."""
    max_pos = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    samples, _ = calibration_samples(tokenizer, calib, max_pos)
    sums = {name: torch.zeros(m.in_features, dtype=torch.float64, device="cpu") for name, m in layers.items()}  # summed on the CPU

    def hook_for(name: str):
        def hook(module: nn.Module, inputs: tuple) -> None:
            sums[name] += WandaPruner.statistics(inputs[0]).cpu()

        return hook

    handles = [m.register_forward_pre_hook(hook_for(name)) for name, m in layers.items()]
    device = next(model.parameters()).device
    try:
        for chunk in samples.split(batch_size):
            model(input_ids=chunk.to(device))
    finally:
        for h in handles:
            h.remove()
    return {name: v.float() for name, v in sums.items()}
