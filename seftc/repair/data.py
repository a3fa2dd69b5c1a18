"""Training and held-out token windows for repair, deterministic per step (so a resumed run sees
exactly the batches an uninterrupted one would)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from seftc.data.calibration import tokenize_text
from seftc.data.corpus import load_text
from seftc.errors import SeftcError


@dataclass
class TokenWindows:
    name: str
    ids: torch.Tensor  # the whole tokenized text
    seqlen: int
    seed: int

    @classmethod
    def from_source(cls, tokenizer, source: str, seqlen: int, seed: int) -> "TokenWindows":
        text = load_text(source)
        ids = tokenize_text(tokenizer, text.text)
        if ids.numel() <= seqlen:
            raise SeftcError(f"text {text.name!r} has {ids.numel()} tokens, fewer than one sequence of {seqlen}; give more text or a smaller --seqlen")
        return cls(text.name, ids, seqlen, seed)

    def batch(self, step: int, size: int) -> torch.Tensor:
        """`size` windows at random offsets drawn from a generator seeded by (seed, step)."""
        gen = torch.Generator(device="cpu").manual_seed((self.seed * 1_000_003 + step) % 2**63)
        starts = torch.randint(0, self.ids.numel() - self.seqlen, (size,), generator=gen, device="cpu")  # the caller moves the batch
        return torch.stack([self.ids[s : s + self.seqlen] for s in starts.tolist()])

    def fixed(self, count: int) -> torch.Tensor:
        """The first `count` non-overlapping windows (held-out evaluation)."""
        n = min(count, self.ids.numel() // self.seqlen)
        return self.ids[: n * self.seqlen].reshape(n, self.seqlen)
