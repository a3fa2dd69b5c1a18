"""Zero-shot multiple-choice accuracy by length-normalised log-likelihood.

For every choice the model scores the continuation after its context; the score is the sum of the
continuation's token log-probabilities divided by the continuation's length in UTF-8 *bytes*
(lm-eval's ``acc_norm`` idea, measured in bytes so that it does not depend on the tokenizer;
``norm="tokens"`` divides by its number of tokens instead, ``norm="none"`` keeps the sum). The
prediction is the highest-scoring choice (the first on ties); ``acc`` is the fraction of items
predicted right and ``acc_stderr = sqrt(acc * (1 - acc) / (n - 1))``.

Tokenization: trailing spaces of the context move to the continuation, ``context`` and
``context + continuation`` are encoded without special tokens, and the continuation is the tokens
of the whole after their common prefix with the context's tokens (so a token that merges across
the boundary is scored as continuation). A BOS token is prepended when the tokenizer adds one by
default. A request longer than the model's maximum positions + 1 is cut from the left.

Requests are sorted by length and run in right-padded batches with an attention mask; every row
is independent, so scores do not depend on ``batch_size`` beyond float rounding.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

from seftc.data.tasks import check_task_names, load_task
from seftc.errors import SeftcError
from seftc.progress import NO_PROGRESS, ProgressSink

__all__ = ["NORMS", "TaskResult", "evaluate_tasks", "score_requests", "max_length"]

NORMS = ("bytes", "tokens", "none")


@dataclass(frozen=True)
class TaskResult:
    acc: float
    acc_stderr: float
    n: int


def max_length(model: Any, tokenizer: Any = None, default: int = 2048) -> int:
    """The longest input the model takes: its config's max positions, else the tokenizer's."""
    cfg = model.config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        v = getattr(cfg, key, None)
        if isinstance(v, int) and v > 0:
            return v
    v = getattr(tokenizer, "model_max_length", None)
    return v if isinstance(v, int) and 0 < v < 1_000_000 else default


def _bos(tokenizer: Any) -> list[int]:
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    ids = tokenizer("a").input_ids
    return [bos] if ids and ids[0] == bos else []


def _encode(tokenizer: Any, context: str, continuation: str, prefix: list[int]) -> tuple[list[int], int]:
    """Token ids of context+continuation and how many trailing ones are the continuation."""
    n_sp = len(context) - len(context.rstrip(" "))
    if n_sp:
        context, continuation = context[:-n_sp], context[-n_sp:] + continuation
    ctx = prefix + tokenizer(context, add_special_tokens=False).input_ids
    whole = prefix + tokenizer(context + continuation, add_special_tokens=False).input_ids
    n = 0
    for a, b in zip(ctx, whole):
        if a != b:
            break
        n += 1
    n = max(1, min(n, len(whole) - 1))  # at least one context token and one scored token
    return whole, len(whole) - n


def score_requests(
    model: Any,
    tokenizer: Any,
    requests: Sequence[tuple[str, str]],
    batch_size: int = 16,
    progress: ProgressSink = NO_PROGRESS,
    description: str = "scoring",
) -> list[tuple[float, int]]:
    """(sum of continuation-token log-probabilities, continuation tokens) for each request."""
    import torch

    if batch_size < 1:
        raise SeftcError(f"batch size must be at least 1, got {batch_size}")
    limit = max_length(model, tokenizer)
    prefix = _bos(tokenizer)
    encoded = []
    for ctx, cont in requests:
        ids, n_cont = _encode(tokenizer, ctx, cont, prefix)
        ids = ids[-(limit + 1):]
        encoded.append((ids[:-1], ids[len(ids) - min(n_cont, len(ids) - 1):]))
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    scores = [(0.0, 0)] * len(encoded)
    advance = progress.task(description, len(encoded))
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            width = max(len(encoded[i][0]) for i in idx)
            inp = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                seq = encoded[i][0]
                inp[row, :len(seq)] = torch.tensor(seq)
                mask[row, :len(seq)] = 1
            logits = model(input_ids=inp.to(device), attention_mask=mask.to(device)).logits
            for row, i in enumerate(idx):
                seq, target = encoded[i]
                part = logits[row, len(seq) - len(target):len(seq)].float().log_softmax(-1)
                tgt = torch.tensor(target, device=part.device)
                scores[i] = (part.gather(-1, tgt[:, None]).sum().item(), len(target))
            advance(len(idx))
    return scores


def _normalise(logprob: float, n_tokens: int, continuation: str, norm: str) -> float:
    if norm == "bytes":
        return logprob / max(1, len(continuation.encode("utf-8")))
    return logprob / max(1, n_tokens) if norm == "tokens" else logprob


def evaluate_tasks(
    model: Any,
    tokenizer: Any,
    tasks: list[str],
    limit: int | None = None,
    batch_size: int = 16,
    progress: ProgressSink = NO_PROGRESS,
    norm: str = "bytes",
) -> dict[str, TaskResult]:
    """Zero-shot accuracy on the ``eval`` part of each task (first ``limit`` items)."""
    names = check_task_names(list(tasks))
    if norm not in NORMS:
        raise SeftcError(f"unknown length normalisation {norm!r}; choose one of {', '.join(NORMS)}")
    if tokenizer is None:
        raise SeftcError("this model has no tokenizer; multiple-choice evaluation needs one")
    results: dict[str, TaskResult] = {}
    for name in names:
        items = load_task(name, "eval", limit)
        reqs = [r for it in items for r in it.requests()]
        scores = score_requests(model, tokenizer, reqs, batch_size, progress, description=name)
        correct, k = 0, 0
        for it in items:
            conts = [cont for _, cont in it.requests()]
            normed = [_normalise(lp, ntok, c, norm) for (lp, ntok), c in zip(scores[k:k + len(conts)], conts)]
            k += len(conts)
            correct += int(max(range(len(normed)), key=normed.__getitem__) == it.label)
        n = len(items)
        acc = correct / n
        stderr = math.sqrt(acc * (1 - acc) / (n - 1)) if n > 1 else 0.0
        results[name] = TaskResult(acc=acc, acc_stderr=stderr, n=n)
    return results
