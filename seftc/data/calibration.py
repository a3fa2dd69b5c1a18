"""Calibration samples: `nsamples` windows of `seqlen` tokens drawn at seeded random offsets."""
from __future__ import annotations

import hashlib
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict

from seftc.config_types import Count, SeqLen, Seed

from seftc import memory
from seftc.data.corpus import DEFAULT_CALIB, load_text
from seftc.errors import SeftcError

class CalibConfig(BaseModel):
    """The calibration protocol (recorded verbatim in every manifest)."""

    model_config = ConfigDict(extra="forbid")

    source: str = DEFAULT_CALIB
    nsamples: Count = 128
    seqlen: SeqLen = 512
    seed: Seed = 0


def tokenize_text(tokenizer: Any, text: str) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def calibration_samples(tokenizer: Any, cfg: CalibConfig, max_positions: int | None) -> tuple[torch.Tensor, dict]:
    """Return (input_ids [nsamples, seqlen], protocol record)."""
    if tokenizer is None:
        raise SeftcError("the model has no tokenizer; calibration needs one (save the tokenizer files beside the model)")
    seqlen = min(cfg.seqlen, max_positions) if max_positions else cfg.seqlen
    source = load_text(cfg.source)
    ids = tokenize_text(tokenizer, source.text)
    if ids.numel() <= seqlen:
        raise SeftcError(f"calibration text {source.name!r} has {ids.numel()} tokens, fewer than one sample of {seqlen}; give more text or a smaller --seqlen")
    gen = torch.Generator().manual_seed(cfg.seed)
    starts = torch.randint(0, ids.numel() - seqlen, (cfg.nsamples,), generator=gen)
    samples = torch.stack([ids[s : s + seqlen] for s in starts.tolist()])
    source_tokens = int(ids.numel())
    del ids
    memory.release()  # the tokenizer's encodings of the whole text, freed: their pages back to the system
    record = {
        "source": source.name,
        "nsamples": cfg.nsamples,
        "seqlen": seqlen,
        "seed": cfg.seed,
        "source_tokens": source_tokens,
        "tokens": int(samples.numel()),
        "sample_sha256": hashlib.sha256(samples.numpy().tobytes()).hexdigest(),
    }
    return samples, record
