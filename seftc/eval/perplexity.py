"""Perplexity over a text, in fixed-length windows.

The whole text is tokenized once, without special tokens. Windows are ``seqlen`` tokens long
(capped to the model's maximum positions) and start every ``stride`` tokens; only full windows
are used. The first window scores all its tokens but the first (which has nothing to be predicted
from); every later window scores only its last ``min(stride, seqlen - 1)`` tokens, so with a
sliding window (``stride < seqlen``) each token is scored once, with at least
``seqlen - stride`` tokens of context. The default ``stride = seqlen`` gives non-overlapping
windows. ``nll`` is the mean negative log-likelihood (nats) per scored token, ``ppl = exp(nll)``.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

from seftc.data.corpus import TextSource, load_text
from seftc.errors import SeftcError
from seftc.eval.multiple_choice import max_length
from seftc.progress import NO_PROGRESS, ProgressSink

__all__ = ["PerplexityResult", "perplexity", "plan_windows"]


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    nll: float  # mean per scored token, nats
    tokens: int  # tokens scored
    windows: int
    seqlen: int
    stride: int
    source: str


def _resolve(text_or_source: str | os.PathLike | TextSource) -> TextSource:
    """A TextSource is used as is; a str or path names a source (a file, a folder, a .jsonl or a
    built-in name) and a missing one is an error. Pass raw text as `TextSource("<text>", text)`."""
    if isinstance(text_or_source, TextSource):
        return text_or_source
    return load_text(text_or_source)


def plan_windows(n_tokens: int, seqlen: int, stride: int, limit: int | None = None) -> list[tuple[int, int]]:
    """(start, number of scored tokens at the window's end) for each window."""
    starts = range(0, n_tokens - seqlen + 1, stride)
    plan = [(s, seqlen - 1 if k == 0 else min(stride, seqlen - 1)) for k, s in enumerate(starts)]
    return plan if limit is None else plan[:limit]


def perplexity(
    model: Any,
    tokenizer: Any,
    text_or_source: str | os.PathLike | TextSource,
    seqlen: int = 512,
    stride: int | None = None,
    limit: int | None = None,
    batch_size: int = 4,
    progress: ProgressSink = NO_PROGRESS,
) -> PerplexityResult:
    """Perplexity of ``model`` on a text (see module docstring); ``limit`` = number of windows."""
    import torch

    if tokenizer is None:
        raise SeftcError("this model has no tokenizer; perplexity needs one")
    if seqlen < 2:
        raise SeftcError(f"seqlen must be at least 2 tokens, got {seqlen}")
    if limit is not None and limit < 1:
        raise SeftcError(f"limit must be a positive number of windows, got {limit}")
    if batch_size < 1:
        raise SeftcError(f"batch size must be at least 1, got {batch_size}")
    seqlen = min(seqlen, max_length(model, tokenizer))
    stride = seqlen if stride is None else stride
    if not 1 <= stride <= seqlen:
        raise SeftcError(f"stride must be between 1 and seqlen ({seqlen}), got {stride}")
    source = _resolve(text_or_source)
    ids = tokenizer(source.text, add_special_tokens=False, verbose=False).input_ids
    if len(ids) < seqlen:
        raise SeftcError(f"text {source.name!r} has {len(ids)} tokens, shorter than one window of {seqlen}; pass a longer text or a smaller --seqlen")
    plan = plan_windows(len(ids), seqlen, stride, limit)
    all_ids = torch.tensor(ids, dtype=torch.long)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    advance = progress.task(f"perplexity {os.path.basename(source.name) or source.name}", len(plan))
    with torch.inference_mode():
        for b in range(0, len(plan), batch_size):
            chunk = plan[b:b + batch_size]
            batch = torch.stack([all_ids[s:s + seqlen] for s, _ in chunk]).to(device)
            logits = model(input_ids=batch).logits
            for row, (_, n) in enumerate(chunk):
                pred = logits[row, seqlen - 1 - n:seqlen - 1].float()
                total += torch.nn.functional.cross_entropy(pred, batch[row, seqlen - n:], reduction="sum").item()
                count += n
            advance(len(chunk))
    nll = total / count
    return PerplexityResult(ppl=math.exp(nll), nll=nll, tokens=count, windows=len(plan), seqlen=seqlen, stride=stride, source=source.name)
