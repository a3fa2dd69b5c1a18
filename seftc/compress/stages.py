"""Cached pipeline stages. A stage's output lives in `RUN_DIR/stages/<name>-<key>/`, where the key
hashes the stage's config together with the keys of its inputs, so a rerun redoes exactly the
stages whose inputs or options changed. Each folder is written atomically; `result.json` is the
stage's summary."""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from seftc.models.saving import atomic_folder

RESULT = "result.json"


def stage_key(name: str, config: Any, inputs: list[str]) -> str:
    blob = json.dumps({"stage": name, "config": config, "inputs": inputs}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def model_identity(spec: str) -> str:
    """A cheap identity for an input model: its path plus names, sizes and mtimes of its files."""
    if spec == "default":
        from seftc.models.loading import _CACHE_VERSION

        return f"default-v{_CACHE_VERSION}"
    p = Path(spec).expanduser().resolve()
    files = [p] if p.is_file() else sorted(x for x in p.iterdir() if x.is_file())
    parts = [str(p)] + [f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def finished_stages(run_dir: str | Path) -> list[str]:
    """Folder names of the completed (cached) stages in RUN_DIR, oldest first."""
    root = Path(run_dir) / "stages"
    if not root.is_dir():
        return []
    done = [f for f in root.iterdir() if (f / RESULT).is_file()]
    return [f.name for f in sorted(done, key=lambda f: (f / RESULT).stat().st_mtime)]


def interrupted_message(run_dir: str | Path) -> str:
    """What an interrupted `compress` kept: the finished stages a rerun reuses."""
    done = finished_stages(run_dir)
    if not done:
        return f"interrupted before any stage finished; {run_dir} holds only recipe.yaml"
    return (f"interrupted; kept {len(done)} finished stage(s) in {Path(run_dir) / 'stages'} ({', '.join(done)}); "
            f"the same command again reuses them and continues")


@dataclass
class StageOutcome:
    name: str
    key: str
    folder: Path
    result: dict[str, Any]
    cached: bool
    seconds: float


def run_stage(run_dir: Path, name: str, config: Any, inputs: list[str], work: Callable[[Path], dict[str, Any]],
              log: Callable[[str], None]) -> StageOutcome:
    """Run `work(tmp_folder) -> result` unless a completed folder for the same key exists."""
    key = stage_key(name, config, inputs)
    folder = run_dir / "stages" / f"{name}-{key}"
    if (folder / RESULT).is_file():
        log(f"{name}: cached ({folder.name})")
        return StageOutcome(name, key, folder, json.loads((folder / RESULT).read_text()), True, 0.0)
    log(f"{name}: running ({folder.name})")
    folder.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with atomic_folder(folder) as tmp:
        result = work(tmp)
        result = {**result, "stage": name, "key": key, "config": config, "inputs": inputs, "seconds": time.perf_counter() - start}
        text = json.dumps(result, indent=2, default=str) + "\n"
        text = text.replace(json.dumps(str(tmp))[1:-1], json.dumps(str(folder))[1:-1])  # paths as they will be after the rename
        (tmp / RESULT).write_text(text)
        result = json.loads(text)
    return StageOutcome(name, key, folder, result, False, time.perf_counter() - start)
