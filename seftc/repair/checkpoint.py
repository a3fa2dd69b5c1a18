"""Resumable repair checkpoints: `OUT.checkpoint/`, written and read without pickle.

    OUT.checkpoint/
      seftc_checkpoint.json   marker: format, the id of the run that owns the folder, and the
                              identity a resume must match (input, config, code)
      latest                  the name of the newest complete step folder
      step-00000012/          state.safetensors (every tensor of the method; streamed into
                              state-0000i-of-0000n.safetensors + index past --max-shard-size),
                              meta.json (step, loss history, the method's small state)

Only a folder carrying the marker is ever written into or removed, and only by the run named in
it (a resumed run adopts that id); anything else at that path is refused, never deleted. A resume
refuses, with one line naming what differs, a checkpoint made from another input (mask checksums,
weights), with other options, or by other code; a damaged checkpoint is one line, not a traceback.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from seftc.errors import SeftcError
from seftc.models.saving import atomic_folder

SUFFIX = ".checkpoint"
MARKER = "seftc_checkpoint.json"
FORMAT = "seftc-repair-checkpoint/1"
_STEP = re.compile(r"step-\d+")
STATE_PREFIX = "state"  # step-N/state.safetensors, or its shards and index
DEFAULT_SHARD_BYTES = 5 * 10**9
# options that may change between a run and its resume without changing its result
RESUMABLE_CHANGES = ("checkpoint_every",)


class Identity(BaseModel):
    """What a resumed run must share with the run that wrote the checkpoint."""

    model_config = ConfigDict(extra="forbid")

    input_masks: dict[str, str]  # layer -> mask checksum, from the input's manifest
    input_weights: str  # sha256 over the input model's tensors as loaded
    config: dict[str, Any]  # the full repair config, less RESUMABLE_CHANGES
    code: dict[str, str]  # seftc and torch versions, digest of seftc/repair's source


class Marker(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: Literal["seftc-repair-checkpoint/1"]
    run: str
    identity: Identity


class History(BaseModel):
    """What training logged: [step, value] pairs, and per topology update a record."""

    model_config = ConfigDict(extra="forbid")

    train_loss: list[tuple[int, float]]
    eval_loss: list[tuple[int, float]]
    regrown: list[tuple[int, int]]
    lr: list[tuple[int, float]]
    updates: list[dict[str, Any]] = []  # absent from checkpoints written before SEFT v2
    update_damage: list[dict[str, Any]] = []


class StepMeta(BaseModel):
    model_config = ConfigDict(extra="forbid")

    step: int = Field(ge=1)
    history: History
    method: dict[str, Any]


def default_dir(output: Path) -> Path:
    return output.with_name(output.name + SUFFIX)


def tensor_digest(name: str, t: torch.Tensor) -> str:
    """sha256 over one tensor's name, dtype, shape and bytes."""
    h = hashlib.sha256()
    t = t.detach().cpu().contiguous().reshape(-1)
    h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def weights_digest(model: torch.nn.Module | dict[str, str]) -> str:
    """The input's identity: sha256 over the sorted per-tensor digests of every tensor of the
    state dict (given as a model, or as the digests themselves, which a loader that never holds
    the whole model computes block by block: the same value either way)."""
    digests = model if isinstance(model, dict) else {name: tensor_digest(name, t) for name, t in model.state_dict().items()}
    return hashlib.sha256("".join(f"{name}:{d}\n" for name, d in sorted(digests.items())).encode()).hexdigest()


def code_version() -> dict[str, str]:
    import seftc

    source = hashlib.sha256()
    for f in sorted(Path(__file__).parent.glob("*.py")):
        source.update(f.name.encode() + b"\0" + f.read_bytes())
    return {"seftc": seftc.__version__, "torch": torch.__version__, "repair_source": source.hexdigest()[:16]}


def identity(input_masks: dict[str, str], input_weights: str, config: dict[str, Any]) -> Identity:
    """`input_weights`: the input's `weights_digest`."""
    return Identity(input_masks=input_masks, input_weights=input_weights,
                    config={k: v for k, v in config.items() if k not in RESUMABLE_CHANGES}, code=code_version())


def _damaged(folder: Path, why: str) -> SeftcError:
    return SeftcError(f"checkpoint {folder} is damaged ({why}); delete it or rerun without --resume")


def _read_json(path: Path, kind: type[BaseModel], folder: Path) -> Any:
    try:
        return kind.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        raise _damaged(folder, f"{path.name} is missing") from None
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(map(str, err["loc"]))
        raise _damaged(folder, f"{path.name}: {where + ': ' if where else ''}{err['msg']}") from None
    except OSError as e:
        raise _damaged(folder, f"{path.name}: {e.strerror or e}") from None


def read_marker(folder: Path) -> Marker | None:
    """The folder's marker; None when the folder does not carry one (not seftc's)."""
    if not (folder / MARKER).is_file():
        return None
    return _read_json(folder / MARKER, Marker, folder)


def _first_difference(saved: Identity, now: Identity) -> str | None:
    if saved.input_masks != now.input_masks:
        names = sorted(set(saved.input_masks) | set(now.input_masks))
        name = next(n for n in names if saved.input_masks.get(n) != now.input_masks.get(n))
        return f"was made from a different input (mask checksum of {name} differs)"
    if saved.input_weights != now.input_weights:
        return "was made from a different input (its weights differ)"
    if saved.config != now.config:
        keys = sorted(set(saved.config) | set(now.config))
        diff = [f"{k} {saved.config.get(k)!r} → {now.config.get(k)!r}" for k in keys if saved.config.get(k) != now.config.get(k)]
        return f"was made with other options ({', '.join(diff)})"
    if saved.code != now.code:
        diff = [f"{k} {saved.code.get(k)} → {now.code.get(k)}" for k in sorted(now.code) if saved.code.get(k) != now.code.get(k)]
        return f"was made by other code ({', '.join(diff)})"
    return None


def check_paths(ckpt: Path, inputs: tuple[Path, ...], output: Path | None) -> None:
    """Refuse, before any work, an input or output that is (or holds, or lies in) the checkpoint folder."""
    c = ckpt.expanduser().resolve()
    for p in (*inputs, *([output] if output is not None else [])):
        r = Path(p).expanduser().resolve()
        if r == c or c in r.parents or r in c.parents:
            role = "output" if output is not None and p == output else "input"
            raise SeftcError(f"the {role} {p} collides with the repair checkpoint folder {ckpt}; choose another -o")
    if output is not None and (Path(output) / MARKER).exists():
        raise SeftcError(f"the output {output} is a repair checkpoint folder; choose another -o")


class Checkpoints:
    """The checkpoint folder of one run. `open` decides, before any work, what may happen to the
    folder; `bind` gives it the run's identity (and, on resume, checks the folder's against it)."""

    def __init__(self, folder: Path, marker: Marker | None, resume: bool):
        self.folder, self.resumed = folder, resume
        self.run = marker.run if resume and marker is not None else uuid.uuid4().hex
        self._marker = marker
        self._replaces = marker.run if marker is not None and not resume else None  # an earlier run's, under --force
        self.identity: Identity | None = None

    @classmethod
    def open(cls, folder: Path, *, resume: bool, writing: bool, force: bool) -> "Checkpoints":
        if not (resume or writing):
            return cls(folder, None, False)  # the folder is never touched
        marker = read_marker(folder) if folder.exists() else None
        if folder.exists() and marker is None:
            raise SeftcError(f"{folder} exists but was not written by seftc repair; move it away or choose another -o")
        if resume and marker is None:
            raise SeftcError(f"--resume: no checkpoint at {folder}; run with --checkpoint-every N first")
        if not resume and writing and marker is not None and not force:
            raise SeftcError(f"{folder} holds a checkpoint of an earlier run; pass --resume to continue it, or --force to replace it")
        return cls(folder, marker, resume)

    def bind(self, ident: Identity) -> None:
        if self.resumed:
            why = _first_difference(self._marker.identity, ident)
            if why:
                raise SeftcError(f"checkpoint {self.folder} {why}; rerun without --resume")
        self.identity = ident

    def owned(self) -> bool:
        """The folder carries this run's marker (so this run may write into it or remove it)."""
        try:
            marker = read_marker(self.folder)
        except SeftcError:
            return False
        return marker is not None and marker.run == self.run

    def save(self, step: int, tensors: Iterable[tuple[str, torch.Tensor]], history: dict, method_meta: dict,
             max_shard_size: int = DEFAULT_SHARD_BYTES) -> None:
        """Write `step-N/` atomically (the method's tensors streamed one at a time into shards of at
        most `max_shard_size` bytes), then point `latest` at it (an atomic rename), then drop older
        steps: a kill at any instant leaves a complete checkpoint behind."""
        from seftc.formats.shards import ShardedWriter

        if not self.owned():
            if self.folder.exists():
                marker = read_marker(self.folder)
                if marker is None or marker.run != self._replaces:  # appeared since the run started: not ours
                    raise SeftcError(f"{self.folder} was created by another process during this run; nothing was removed")
                shutil.rmtree(self.folder)  # the earlier run's checkpoint that --force replaces
            with atomic_folder(self.folder) as tmp:  # the folder appears with its marker, never without
                marker = Marker(format=FORMAT, run=self.run, identity=self.identity)
                (tmp / MARKER).write_text(marker.model_dump_json(indent=1), encoding="utf-8")
        name = f"step-{step:08d}"
        with atomic_folder(self.folder / name) as tmp:
            with ShardedWriter(tmp, STATE_PREFIX, max_shard_size) as writer:
                for key, t in tensors:
                    writer.add(key, t.contiguous())
            (tmp / "meta.json").write_text(json.dumps({"step": step, "history": history, "method": method_meta}))
        _write_atomic(self.folder / "latest", name)
        for old in self.folder.glob("step-*"):
            if old.name != name and _STEP.fullmatch(old.name):
                shutil.rmtree(old, ignore_errors=True)

    def restore(self, method: Any, total_steps: int) -> tuple[int, dict[str, list]]:
        """Load the newest complete step into `method`; returns (step, history). The tensors are
        checked against the method's own (every name it has, with its shape and dtype) first, then
        read one at a time as the method asks for them."""
        from seftc.formats.shards import CheckpointReader, checkpoint_files

        step_dir = latest_step(self.folder)
        if step_dir is None:
            if (self.folder / "latest").exists():
                raise _damaged(self.folder, "latest does not name a step folder in it")
            raise SeftcError(f"--resume: {self.folder} holds no complete step yet; rerun without --resume")
        meta = _read_json(step_dir / "meta.json", StepMeta, self.folder)
        if meta.step >= total_steps:
            raise _damaged(self.folder, f"step {meta.step} is not before the last step {total_steps}")
        try:
            tensors = _StoredTensors(CheckpointReader(checkpoint_files(step_dir, prefix=STATE_PREFIX)))
            for key, t in method.state_items():
                if key not in tensors:
                    raise _damaged(self.folder, f"tensor {key} is missing")
                shape, dtype = tensors.reader.shape(key), tensors.dtype(key)
                if shape != tuple(t.shape) or dtype != t.dtype:
                    raise _damaged(self.folder, f"tensor {key} is {dtype} {list(shape)}, expected {t.dtype} {list(t.shape)}")
            method.load_state_tensors(tensors, meta.method)
        except SeftcError as e:
            if str(e).startswith(f"checkpoint {self.folder} is damaged"):
                raise
            raise _damaged(self.folder, str(e)) from None
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:
            raise _damaged(self.folder, f"the method's state does not fit: {type(e).__name__}: {str(e)[:120]}") from None
        history = meta.history.model_dump()
        return meta.step, {k: [x if isinstance(x, dict) else list(x) for x in v] for k, v in history.items()}

    def remove(self) -> None:
        """Remove the folder if (and only if) it carries this run's marker."""
        if self.owned():
            shutil.rmtree(self.folder, ignore_errors=True)


class _StoredTensors(Mapping):
    """A step's tensors by key, each read from its shard only when asked for (one at a time)."""

    def __init__(self, reader: Any):
        self.reader = reader

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self.reader:
            raise KeyError(key)
        return self.reader.get(key)

    def __contains__(self, key: object) -> bool:
        return key in self.reader

    def __iter__(self) -> Iterator[str]:
        return iter(self.reader.keys())

    def __len__(self) -> int:
        return len(self.reader.keys())

    def dtype(self, key: str) -> torch.dtype:
        return self.reader.dtype(key)


def latest_step(folder: Path) -> Path | None:
    """The newest complete step folder that `latest` names, or None (never raises)."""
    try:
        name = (folder / "latest").read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    step = folder / name
    return step if _STEP.fullmatch(name) and (step / "meta.json").is_file() else None


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
