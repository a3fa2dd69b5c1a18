"""`SeftLinear`: a pruned linear layer plus a trainable sparse delta on `k` moving positions.

Forward: y = x (W + scatter(η, δ))ᵀ + b, with W frozen and zero outside the active set A.
Backward forms the layer's dense weight gradient once, transiently, gathers δ's gradient from it
at η, hands it to an optional observer (topology statistics) and frees it: no dense gradient
outlives the layer's backward.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F


class _SparseDeltaLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, pos, delta, layer):  # type: ignore[override]
        w_eff = layer.effective_weight(delta)
        ctx.save_for_backward(x, delta)
        ctx.layer = layer
        return F.linear(x, w_eff, bias)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x, delta = ctx.saved_tensors
        layer: SeftLinear = ctx.layer
        w_eff = layer.effective_weight(delta)
        grad_x = grad_out @ w_eff.to(grad_out.dtype)
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        dense = (g2.T.float() @ x2.float()).reshape(-1)  # transient dense dL/dW
        if layer.observer is not None:
            dense = layer.observer(layer, dense)  # may all-reduce; returns the gradient to use
        grad_delta = torch.where(layer.slots >= 0, dense[layer.slots.clamp(min=0)], torch.zeros_like(delta))
        grad_bias = g2.sum(0) if layer.bias is not None and layer.bias.requires_grad else None
        return grad_x, None, grad_bias, None, grad_delta, None


class SeftLinear(nn.Module):
    """Holds W (frozen), the active mask A, slot positions η (−1 = free) and δ."""

    def __init__(self, base: nn.Linear, active: torch.Tensor, k: int, init_pos: torch.Tensor):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = nn.Parameter(base.weight.data, requires_grad=False)
        self.bias = base.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.register_buffer("active", active.reshape(-1).clone())
        self.target = int(self.active.sum())
        slots = torch.full((k,), -1, dtype=torch.int32)  # positions < 2**31 per layer; half of int64's memory
        slots[: init_pos.numel()] = init_pos
        self.register_buffer("slots", slots)
        self.delta = nn.Parameter(torch.zeros(k, dtype=torch.float32))
        self.observer: Callable[["SeftLinear", torch.Tensor], torch.Tensor] | None = None

    @property
    def numel(self) -> int:
        return self.in_features * self.out_features

    def effective_weight(self, delta: torch.Tensor | None = None) -> torch.Tensor:
        delta = self.delta if delta is None else delta
        live = self.slots >= 0
        flat = self.weight.detach().reshape(-1).clone()
        flat.index_add_(0, self.slots[live], delta.detach()[live].to(flat.dtype))
        return flat.reshape(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _SparseDeltaLinear.apply(x, self.weight, self.bias, self.slots, self.delta, self)

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """A plain nn.Linear holding W + δ (zero outside A)."""
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, dtype=self.weight.dtype)
        w = self.effective_weight()
        out.weight.data.copy_(torch.where(self.active.reshape(w.shape), w, torch.zeros_like(w)))  # +0.0 outside A
        if self.bias is not None:
            out.bias.data.copy_(self.bias.data)
        return out
