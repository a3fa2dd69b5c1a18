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

An item's choices share one pass over their common token prefix (its KV cache is copied to each
choice's remaining tokens), so the context is computed once per item, not once per choice. Groups
are sorted by length and run in right-padded batches with an attention mask; every row is
independent, so scores do not depend on ``batch_size`` or on the sharing beyond float rounding.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
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
    correct: tuple[bool, ...] = field(default=(), repr=False)  # per item, in eval order: for paired comparisons of two models


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


def _groups(encoded: list[tuple[list[int], list[int]]], keys: Sequence[Any]) -> list[tuple[list[int], int]]:
    """Consecutive requests with the same key, as (members, shared input length).

    The shared length is the members' common token prefix, at most the shortest member's inputs; a
    group whose members share no token (cut from the left differently) is split into singletons,
    whose shared length is their whole input."""
    out: list[tuple[list[int], int]] = []
    i = 0
    while i < len(encoded):
        j = i + 1
        while j < len(encoded) and keys[j] == keys[i]:
            j += 1
        members = list(range(i, j))
        k = min(len(encoded[m][0]) for m in members)
        first = encoded[i][0]
        for m in members[1:]:
            seq = encoded[m][0]
            k = next((p for p in range(k) if seq[p] != first[p]), k)
        if k == 0:
            out += [([m], len(encoded[m][0])) for m in members]
        else:
            out.append((members, k))
        i = j
    return out


def score_requests(
    model: Any,
    tokenizer: Any,
    requests: Sequence[tuple[str, str]],
    batch_size: int = 16,
    progress: ProgressSink = NO_PROGRESS,
    description: str = "scoring",
    share: Sequence[Any] | None = None,
) -> list[tuple[float, int]]:
    """(sum of continuation-token log-probabilities, continuation tokens) for each request.

    Consecutive requests with the same ``share`` key (default: the same context; an item's choices)
    share one forward pass over their common token prefix: the prefix runs once per group with the KV cache kept, then each member's
    remaining tokens run against a copy of that cache (positions continue from the prefix). The
    scores equal a full pass per request up to float rounding, for about half the tokens on the
    commonsense tasks. ``batch_size`` counts groups per prefix pass.
    """
    import torch

    from seftc.runtime.engine import cache_kwarg

    if batch_size < 1:
        raise SeftcError(f"batch size must be at least 1, got {batch_size}")
    cache_kw = cache_kwarg(model)
    limit = max_length(model, tokenizer)
    prefix = _bos(tokenizer)
    encoded = []
    for ctx, cont in requests:
        ids, n_cont = _encode(tokenizer, ctx, cont, prefix)
        ids = ids[-(limit + 1):]
        encoded.append((ids[:-1], ids[len(ids) - min(n_cont, len(ids) - 1):]))
    if share is not None and len(share) != len(requests):
        raise SeftcError(f"{len(share)} sharing keys for {len(requests)} requests")
    groups = _groups(encoded, list(share) if share is not None else [ctx for ctx, _ in requests])
    order = sorted(range(len(groups)), key=lambda g: -groups[g][1])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    scores = [(0.0, 0)] * len(encoded)
    advance = progress.task(description, len(encoded))

    def padded(seqs: list[list[int]]) -> tuple[Any, Any]:
        width = max(len(s) for s in seqs)
        inp = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, seq in enumerate(seqs):
            inp[row, :len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[row, :len(seq)] = 1
        return inp.to(device), mask.to(device)

    keep = "logits_to_keep" in inspect.signature(model.forward).parameters
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            batch = [groups[g] for g in order[start:start + batch_size]]
            inp, mask = padded([encoded[members[0]][0][:k] for members, k in batch])
            # logits only where a member's continuation is predicted from inside the shared prefix
            need = sorted({p for members, k in batch for m in members
                           for p in range(len(encoded[m][0]) - len(encoded[m][1]), k)})
            kwargs = {"logits_to_keep": torch.tensor(need or [0], device=device)} if keep else {}
            out = model(input_ids=inp, attention_mask=mask, use_cache=True, **kwargs)
            head, cache = out.logits, getattr(out, cache_kw)
            at = {p: i for i, p in enumerate(need)} if keep else None
            total: dict[int, float] = {}  # member -> summed log-probability of its continuation
            for b, (members, k) in enumerate(batch):  # the continuation tokens predicted inside the shared prefix
                for m in members:
                    seq, target = encoded[m]
                    lo = len(seq) - len(target)
                    total[m] = _logprob(head[b, [at[p] for p in range(lo, k)]] if keep else head[b, lo:k], target[:max(0, k - lo)])
            prefix_kv = [(layer.keys, layer.values) for layer in cache.layers]
            rows = sorted(((b, m) for b, (members, k) in enumerate(batch) for m in members if len(encoded[m][0]) > k),
                          key=lambda r: -(len(encoded[r[1]][0]) - batch[r[0]][1]))
            for r0 in range(0, len(rows), batch_size):  # the tokens after the prefix, by length, on copies of the cache
                chunk = rows[r0:r0 + batch_size]
                pick = torch.tensor([b for b, _ in chunk], device=device)
                for layer, (keys, values) in zip(cache.layers, prefix_kv):
                    layer.keys, layer.values = keys[pick], values[pick]
                t_inp, t_mask = padded([encoded[m][0][batch[b][1]:] for b, m in chunk])
                pos = torch.tensor([batch[b][1] for b, _ in chunk], device=device)[:, None] + torch.arange(t_inp.shape[1], device=device)
                logits = model(input_ids=t_inp, attention_mask=torch.cat([mask[pick], t_mask], 1),
                               position_ids=pos, use_cache=True, **{cache_kw: cache}).logits
                for i, (b, m) in enumerate(chunk):
                    seq, target = encoded[m]
                    k, lo = batch[b][1], len(seq) - len(target)
                    total[m] += _logprob(logits[i, max(lo, k) - k:len(seq) - k], target[max(0, k - lo):])
            for m, value in total.items():
                scores[m] = (value, len(encoded[m][1]))
            advance(sum(len(members) for members, _ in batch))
    return scores


def _logprob(logits: Any, target: list[int]) -> float:
    """Sum of log-softmax(logits)[j, target[j]] (0 for no tokens)."""
    import torch

    if not target:
        return 0.0
    logp = logits.float().log_softmax(-1)
    return logp.gather(-1, torch.tensor(target, device=logp.device)[:, None]).sum().item()


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
        share = [i for i, it in enumerate(items) for _ in it.requests()]  # an item's choices share their prefix
        scores = score_requests(model, tokenizer, reqs, batch_size, progress, description=name, share=share)
        right, k = [], 0
        for it in items:
            conts = [cont for _, cont in it.requests()]
            normed = [_normalise(lp, ntok, c, norm) for (lp, ntok), c in zip(scores[k:k + len(conts)], conts)]
            k += len(conts)
            right.append(max(range(len(normed)), key=normed.__getitem__) == it.label)
        n = len(items)
        acc = sum(right) / n
        stderr = math.sqrt(acc * (1 - acc) / (n - 1)) if n > 1 else 0.0
        results[name] = TaskResult(acc=acc, acc_stderr=stderr, n=n, correct=tuple(right))
    return results
