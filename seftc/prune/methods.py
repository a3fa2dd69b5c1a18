"""The registry of one-shot pruners. Each pruner gathers statistics of one layer's inputs, then
turns them into a keep-mask (and, for SparseGPT, an updated weight). The math lives in the
per-method modules; this file is only the lifecycle glue."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from seftc.prune.magnitude import magnitude_mask
from seftc.prune.masks import Pattern
from seftc.prune.sparsegpt import sparsegpt_prune
from seftc.prune.wanda import wanda_mask


def _apply(weight: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Zero the pruned weights with +0.0 (`weight * keep` would leave -0.0 behind, which a
    bit-exact sparse format has to store as a value)."""
    return torch.where(keep, weight, torch.zeros_like(weight))


@dataclass
class MethodOptions:
    blocksize: int = 128
    damp: float = 0.01
    device: str = "cpu"  # where statistics accumulate (the device the block runs on)


class LayerPruner(Protocol):
    needs_calibration: bool

    @staticmethod
    def statistics(x: torch.Tensor) -> Any: ...

    def accumulate(self, stats: Any, tokens: int) -> None: ...

    def prune(self, weight: torch.Tensor, sparsity: float, pattern: Pattern) -> tuple[torch.Tensor, torch.Tensor]: ...


class MagnitudePruner:
    needs_calibration = False

    def __init__(self, in_features: int, options: MethodOptions):
        pass

    @staticmethod
    def statistics(x: torch.Tensor) -> None:
        return None

    def accumulate(self, stats: Any, tokens: int) -> None:
        pass

    def prune(self, weight: torch.Tensor, sparsity: float, pattern: Pattern) -> tuple[torch.Tensor, torch.Tensor]:
        keep = magnitude_mask(weight, sparsity, pattern)
        return _apply(weight, keep), keep


class WandaPruner:
    needs_calibration = True

    def __init__(self, in_features: int, options: MethodOptions):
        self.sq_norm = torch.zeros(in_features, dtype=torch.float64, device=options.device)

    @staticmethod
    def statistics(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, x.shape[-1]).float().pow(2).sum(dim=0).double()

    def accumulate(self, stats: torch.Tensor, tokens: int) -> None:
        self.sq_norm += stats.to(self.sq_norm.device)

    def prune(self, weight: torch.Tensor, sparsity: float, pattern: Pattern) -> tuple[torch.Tensor, torch.Tensor]:
        keep = wanda_mask(weight, self.sq_norm.to(weight.device), sparsity, pattern)
        return _apply(weight, keep), keep


class SparseGPTPruner:
    needs_calibration = True

    def __init__(self, in_features: int, options: MethodOptions):
        self.options = options
        self.xtx = torch.zeros(in_features, in_features, dtype=torch.float32, device=options.device)
        self.tokens = 0

    @staticmethod
    def statistics(x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(-1, x.shape[-1]).float()
        return x.T @ x

    def accumulate(self, stats: torch.Tensor, tokens: int) -> None:
        self.xtx += stats.to(self.xtx.device)
        self.tokens += tokens

    def prune(self, weight: torch.Tensor, sparsity: float, pattern: Pattern) -> tuple[torch.Tensor, torch.Tensor]:
        h = (2.0 / max(self.tokens, 1)) * self.xtx.to(weight.device)
        return sparsegpt_prune(weight, h, sparsity, pattern, self.options.blocksize, self.options.damp)


PRUNERS: dict[str, type] = {"magnitude": MagnitudePruner, "wanda": WandaPruner, "sparsegpt": SparseGPTPruner}
