"""Choosing the next token, and finding stop strings in generated text: pure functions of their
inputs (logits, a `torch.Generator`, strings), shared by `seftc generate` and `seftc serve` through
`seftc.runtime.engine`.

    params = SamplingParams(temperature=0.7, top_p=0.9, max_tokens=64, stop=("\\n\\n",), seed=1)
    gen = make_generator(params.seed)
    token = sample(logits_row, params, gen)          # temperature 0: argmax, no randomness drawn
"""
from __future__ import annotations

from typing import Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field


class SamplingParams(BaseModel):
    """How one sequence is decoded. temperature 0 is greedy; top_p keeps the smallest set of tokens
    whose probability reaches top_p; `seed` makes a sampled sequence reproducible (None: random);
    `stop` strings end the text before the first occurrence of any of them; `ignore_eos` keeps
    decoding past the end-of-sequence token (benchmarks)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int = Field(16, ge=1)
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def make_generator(seed: int | None, device: str | torch.device = "cpu") -> torch.Generator:
    """A generator of its own per sequence, so that one request's draws never shift another's."""
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(int(seed) % (2**63))
    return gen


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero every probability outside the smallest highest-first set whose mass reaches `top_p`
    (the most likely token always stays), then renormalise. `probs`: [V], summing to 1."""
    if top_p >= 1.0:
        return probs
    sorted_probs, order = torch.sort(probs, descending=True)
    mass_before = torch.cumsum(sorted_probs, 0) - sorted_probs  # mass of the tokens ranked above each
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
    kept = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return kept / kept.sum()


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> int:
    """The next token from one row of logits [V]."""
    if params.greedy:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    probs = top_p_filter(probs, params.top_p)
    return int(torch.multinomial(probs.to(generator.device if generator is not None else probs.device),
                                 1, generator=generator))


def find_stop(text: str, stops: Sequence[str]) -> int | None:
    """Index of the earliest occurrence of any stop string in `text`, or None."""
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(hits) if hits else None


def held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters of `text` could be the start of a stop string, and so must not
    be sent yet (a stream may not show text that a later token turns into a stop)."""
    longest = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:n]):
                longest = n
                break
    return longest
