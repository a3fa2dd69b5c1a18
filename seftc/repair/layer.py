"""`SeftLinear`: a pruned linear layer plus a trainable sparse delta on `k` moving positions.

Forward: y = x (W + scatter(η, δ))ᵀ + b, with W frozen and zero outside the active set A.
Backward forms the layer's dense weight gradient once, transiently, gathers δ's gradient from it
at η, hands it to an optional observer (topology statistics) and frees it: no dense gradient
outlives the layer's backward.

Precision: δ is fp32. On an fp32 base a dropped slot's δ is merged straight into W (exact enough).
On a bf16/fp16 base that merge would round away every δ below half a unit in the last place of
its weight (~0.4% of it), so merges are *deferred*: kept in an fp32 sparse store (`merged_pos`,
`merged_val`, coalesced per position), W stays the pruned base, and the forward adds the base
product and the product with the fp32 drift (merged + δ) cast to the activation dtype, which keeps
small updates (bf16 keeps 8 significant bits of each drift value, not of W + drift). `merge()`
applies the drift once in fp32 and casts. The store is also used on fp32 bases when asked
(`defer=True`: the L2-SP pull decays the whole drift from the pruned base, which needs it kept
apart). Its size is the number of distinct positions ever dropped (int32 + fp32 per position).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from seftc.prune.masks import PackedMask, pack_bits, unpack_bits
from seftc.repair.distributed import full_tensor, local_part


class _SparseDeltaLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, pos, delta, layer):  # type: ignore[override]
        ctx.save_for_backward(x, delta)
        ctx.layer = layer
        if not layer.defer:
            return F.linear(x, layer.effective_weight(delta), bias)
        if x.dtype == torch.float32:  # one product with W + drift, summed in fp32 (the drift is dense fp32 already)
            return F.linear(x, layer.weight.float() + layer.drift(delta), bias)
        return F.linear(x, layer.weight.to(x.dtype), bias) + F.linear(x, layer.drift(delta).to(x.dtype))

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x, delta = ctx.saved_tensors
        layer: SeftLinear = ctx.layer
        if not layer.defer:
            grad_x = grad_out @ layer.effective_weight(delta).to(grad_out.dtype)
        elif grad_out.dtype == torch.float32:
            grad_x = grad_out @ (layer.weight.float() + layer.drift(delta))
        else:  # half compute: the drift's own product, so small drifts are not rounded into W's precision
            grad_x = grad_out @ layer.weight.to(grad_out.dtype) + grad_out @ layer.drift(delta).to(grad_out.dtype)
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        dense = (g2.T.float() @ x2.float()).reshape(-1)  # transient dense dL/dW
        if layer.observer is not None:
            dense = layer.observer(layer, dense)  # may all-reduce; returns the gradient to use
        grad_delta = torch.where(layer.slots >= 0, dense[layer.slots.clamp(min=0)], torch.zeros_like(delta))
        grad_bias = g2.sum(0) if layer.bias is not None and layer.bias.requires_grad else None
        return grad_x, None, grad_bias, None, grad_delta, None


class SeftLinear(nn.Module):
    """Holds W (frozen), the active mask A (packed bits: `active` reads a bool copy, assigning
    `active` packs a new one), slot positions η (−1 = free) and δ."""

    def __init__(self, base: nn.Linear, active: torch.Tensor, k: int, init_pos: torch.Tensor, defer: bool = False):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = nn.Parameter(base.weight.data, requires_grad=False)
        self.bias = base.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)
        device = self.weight.device
        self.register_buffer("active_bits", pack_bits(active.reshape(-1).to(device)))
        self.target = int(active.sum())
        slots = torch.full((k,), -1, dtype=torch.int32, device=device)  # positions < 2**31 per layer; half of int64's memory
        slots[: init_pos.numel()] = init_pos.to(device)
        self.register_buffer("slots", slots)
        self.delta = nn.Parameter(torch.zeros(k, dtype=torch.float32, device=device))
        self.observer: Callable[["SeftLinear", torch.Tensor], torch.Tensor] | None = None
        self.defer = defer or self.weight.dtype != torch.float32  # merges kept apart, in fp32
        self.merged_pos = torch.empty(0, dtype=torch.int32, device=self.weight.device)
        self.merged_val = torch.empty(0, dtype=torch.float32, device=self.weight.device)

    @property
    def numel(self) -> int:
        return self.in_features * self.out_features

    @property
    def active(self) -> torch.Tensor:
        """A (flat bool), unpacked: a copy, so read it once where it is used many times."""
        return unpack_bits(self.active_bits, self.numel)

    @active.setter
    def active(self, value: torch.Tensor) -> None:
        self.active_bits.copy_(pack_bits(value.reshape(-1)))

    def packed_active(self) -> PackedMask:
        return PackedMask(self.active_bits, (self.out_features, self.in_features))

    def drift(self, delta: torch.Tensor | None = None) -> torch.Tensor:
        """Dense fp32 [out, in]: the merged store plus δ at the live slots (what training moved W by
        since the pruned base, when merges are deferred; only δ otherwise)."""
        delta = self.delta if delta is None else delta
        live = self.slots >= 0
        flat = torch.zeros(self.numel, dtype=torch.float32, device=self.weight.device)
        flat.index_add_(0, self.merged_pos.long(), self.merged_val)
        flat.index_add_(0, self.slots[live], delta.detach()[live].float())
        return flat.reshape(self.out_features, self.in_features)

    def effective_weight(self, delta: torch.Tensor | None = None) -> torch.Tensor:
        """W + drift: in W's dtype on an fp32 base, in fp32 when merges are deferred."""
        if self.defer:
            return self.weight.detach().float() + self.drift(delta)
        delta = self.delta if delta is None else delta
        live = self.slots >= 0
        flat = self.weight.detach().reshape(-1).clone()
        flat.index_add_(0, self.slots[live], delta.detach()[live].to(flat.dtype))
        return flat.reshape(self.out_features, self.in_features)

    @torch.no_grad()
    def merge_slots(self, slots: torch.Tensor) -> None:
        """Fold the δ of `slots` into W (fp32 base) or into the fp32 merged store (deferred).
        Between steps W and δ may be FSDP2 shards: δ's values are gathered (every rank calls
        this alike), W is written where this rank holds it."""
        pos, val = self.slots[slots].long(), full_tensor(self.delta)[slots].float()
        if not self.defer:
            local_part(self.weight).add_(pos, val)
            return
        all_pos = torch.cat([self.merged_pos.long(), pos])
        uniq, inverse = torch.unique(all_pos, return_inverse=True)
        summed = torch.zeros(uniq.numel(), dtype=torch.float32, device=val.device)
        summed.index_add_(0, inverse, torch.cat([self.merged_val, val]))
        self.merged_pos, self.merged_val = uniq.to(torch.int32), summed

    @torch.no_grad()
    def forget(self, positions: torch.Tensor) -> None:
        """Drop the merged store's entries at `positions` (evicted: W is zero there now)."""
        if self.merged_pos.numel() and positions.numel():
            keep = ~torch.isin(self.merged_pos.long(), positions.long())
            self.merged_pos, self.merged_val = self.merged_pos[keep], self.merged_val[keep]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _SparseDeltaLinear.apply(x, self.weight, self.bias, self.slots, self.delta, self)

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """A plain nn.Linear holding W + δ (zero outside A), in place: W's own tensor becomes the
        linear's weight (only one layer's fp32 W_eff is ever transient), δ and the store are freed."""
        w = self.effective_weight()  # fp32 when deferred: the drift is applied once, then cast
        w = torch.where(self.active.reshape(w.shape), w, torch.zeros_like(w))  # +0.0 outside A
        self.weight.data.copy_(w)
        del w
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")  # no memory
        out.weight = nn.Parameter(self.weight.data, requires_grad=False)
        out.bias = self.bias
        self.delta = nn.Parameter(self.delta.data.new_empty(0), requires_grad=False)
        self.merged_pos, self.merged_val = self.merged_pos[:0], self.merged_val[:0]
        return out


class _ActiveValuesLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, values, bias, layer):  # type: ignore[override]
        ctx.save_for_backward(x, values)
        ctx.layer = layer
        return F.linear(x, layer.dense(values, x.dtype), bias)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x, values = ctx.saved_tensors
        layer: ActiveValuesLinear = ctx.layer
        grad_x = grad_out @ layer.dense(values, grad_out.dtype)
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        dense = g2.T.to(values.dtype) @ x2.to(values.dtype)  # transient dense dL/dW, gathered at A below
        grad_values = dense.reshape(-1)[layer.mask.unpack().reshape(-1)]
        return grad_x, grad_values, None, None


class ActiveValuesLinear(nn.Module):
    """`static`'s layer: the weights of the active set A only, as one trainable vector `values`
    (row-major order of A), beside A's packed bits; no dense weight is held. The forward scatters
    them into a dense weight in the activations' dtype (transient, one layer at a time), and the
    backward gathers the dense gradient at A, so the gradient and AdamW's moments are the size of
    A. `values_dtype`: the base's own (the weights themselves, no second copy), or fp32 on a
    bf16/fp16 base (the master copy mixed precision asks for: small updates are not rounded away),
    replacing the half-precision weights until `merge`."""

    def __init__(self, base: nn.Linear, mask: PackedMask, values_dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.dtype = base.weight.dtype
        self.mask = mask
        self.bias = base.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)
        flat = base.weight.detach().reshape(-1)
        self.values = nn.Parameter(flat[mask.unpack().reshape(-1)].to(values_dtype))

    def dense(self, values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """[out, in] in `dtype`: `values` at A, +0.0 elsewhere."""
        flat = torch.zeros(self.out_features * self.in_features, dtype=dtype, device=values.device)
        flat.masked_scatter_(self.mask.unpack().reshape(-1), values.detach().to(dtype))
        return flat.reshape(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ActiveValuesLinear.apply(x, self.values, self.bias, self)

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """A plain nn.Linear in the base's dtype holding the values at A (zero elsewhere); the
        values are freed, so merging layer by layer holds one layer's dense weight at a time."""
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")  # no memory
        out.weight = nn.Parameter(self.dense(self.values, self.dtype), requires_grad=False)
        out.bias = self.bias
        self.values = nn.Parameter(self.values.data.new_empty(0), requires_grad=False)
        return out
