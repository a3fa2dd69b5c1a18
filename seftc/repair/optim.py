"""AdamW over SEFT's delta slots with one step count per slot.

Stock AdamW keeps one step count per parameter tensor, so a slot regrown at step 500 would get
the bias correction of step 500 while its moments are fresh zeros. Here every slot carries its
own count, reset together with its moments when the slot moves.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch

from seftc.repair.distributed import full_tensor, load_local, local_part


@dataclass
class SlotState:
    m: torch.Tensor
    v: torch.Tensor
    t: torch.Tensor  # per-slot step count (float, for the power)


CHUNK = 1 << 20  # slots per elementwise pass: the step's temporaries stay ~16 MiB, not k-sized


class SlotAdamW:
    """Steps the slots this rank holds: all of them, or under FSDP2 its shard of each δ (the
    moments are sharded alike, so the optimizer state falls with the number of ranks)."""

    def __init__(self, params: list[torch.nn.Parameter], lr: float, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
        self.params = params
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        self.state = [SlotState(*(torch.zeros_like(p.detach()) for _ in range(3))) for p in params]

    @torch.no_grad()
    def step(self, lr: float | None = None) -> None:
        lr = self.lr if lr is None else lr
        b1, b2 = self.betas
        for p, s in zip(self.params, self.state):
            if p.grad is None:
                continue
            parts = [local_part(x).flat for x in (p, p.grad, s.m, s.v, s.t)]
            for i in range(0, parts[0].numel(), CHUNK):
                w, g, m, v, t = (x[i : i + CHUNK] for x in parts)
                t += 1
                m.mul_(b1).add_(g, alpha=1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                if self.weight_decay:
                    w.mul_(1 - lr * self.weight_decay)
                denom = (v / (1 - b2**t)).sqrt_().add_(self.eps)
                w.addcdiv_(m / (1 - b1**t), denom, value=-lr)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def reset_slots(self, index: int, slots: torch.Tensor) -> None:
        s = self.state[index]
        for t in (s.m, s.v, s.t):
            local_part(t).fill_(slots, 0)

    def state_items(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Whole tensors, one at a time (gathered under FSDP2: every rank iterates this alike)."""
        for i, s in enumerate(self.state):
            for key in ("m", "v", "t"):
                yield f"{i}.{key}", full_tensor(getattr(s, key))

    def load_state_tensors(self, tensors: Mapping[str, torch.Tensor], prefix: str = "") -> None:
        for i, s in enumerate(self.state):
            for key in ("m", "v", "t"):
                load_local(getattr(s, key), tensors[f"{prefix}{i}.{key}"])
