"""Atomic model folder writes: everything goes to a temporary sibling folder that is renamed into
place only when complete, so a failure leaves nothing behind and never touches the input."""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from seftc.errors import SeftcError
from seftc.formats.shards import DEFAULT_MAX_SHARD_SIZE
from seftc.sizes import parse_size


def check_output(out: str | os.PathLike, force: bool, inputs: tuple[Path, ...] = ()) -> Path:
    """Validate an output folder before any work starts."""
    out = Path(out).expanduser()
    resolved = out.resolve()
    for src in inputs:
        src = Path(src).resolve()
        src_dir = src if src.is_dir() else src.parent
        if resolved == src_dir or src_dir in resolved.parents or resolved in src_dir.parents:
            raise SeftcError(f"output {out} would overwrite the input model; choose another -o folder")
    if out.exists() and not force:
        raise SeftcError(f"output {out} already exists; pass --force to replace it or choose another -o folder")
    if out.exists() and not out.is_dir():
        raise SeftcError(f"output {out} exists and is not a folder; remove it or choose another -o folder")
    parent = resolved.parent
    if not parent.exists():
        raise SeftcError(f"the parent folder of {out} does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise SeftcError(f"cannot write into {parent}; check its permissions")
    return out


def _follow_umask(folder: Path, umask: int) -> None:
    """Writers that go through a temporary file (transformers' save_pretrained among them) leave
    0600 files; give every file the mode the user's umask asks for, like any other file they write."""
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o777 & ~umask)
        for f in files:
            path = os.path.join(root, f)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~umask)


@contextmanager
def atomic_folder(out: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces `out`, on failure it is removed."""
    out = Path(out).expanduser()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.resolve().parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; a model folder should get the usual mode
    try:
        yield tmp
        _follow_umask(tmp, umask)
        if out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.resolve().parent))
            os.replace(out, trash / "old")
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def saved_names(model) -> dict[str, str]:
    """State-dict key -> checkpoint key of every tensor `save_pretrained` would write: tied copies
    left out, transformers' per-architecture renamings reverted (e.g. GPT-NeoX `lm_head.` ->
    `embed_out.`). Works on a meta-device skeleton. Raises SeftcError for architectures whose
    checkpoint layout is not a renaming of the state dict (fused or split tensors)."""
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    state = model.state_dict(keep_vars=True)
    for key in getattr(model, "_keys_to_ignore_on_save", None) or ():
        state.pop(key, None)
    state = remove_tied_weights_from_state_dict(state, model)
    by_id = {id(t): k for k, t in state.items()}
    reverted = revert_weight_conversion(model, dict(state))
    names = {}
    for ckpt_key, t in reverted.items():
        key = by_id.get(id(t))
        if key is None:
            raise SeftcError(f"{type(model).__name__}: its checkpoint layout converts tensors (not only renames them); seftc cannot stream it")
        names[key] = ckpt_key
    return names


def write_config(model, folder: Path) -> None:
    """config.json (+ generation_config.json) as `save_pretrained` writes them."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    if dtype is not None:
        model.config.dtype = str(dtype).split(".")[1]
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(folder)
    if model.can_generate() and getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)


def save_model(model, tokenizer, out: Path, extra_files: dict[str, str] | None = None, masks: dict | None = None,
               max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> Path:
    """Write a folder that plain `AutoModelForCausalLM.from_pretrained` loads (+ the masks file),
    its weights streamed into shards of at most `max_shard_size` bytes."""
    from seftc.formats.shards import ShardedWriter

    shard_bytes = parse_size(max_shard_size, "--max-shard-size")
    names = saved_names(model)
    state = model.state_dict()
    with atomic_folder(out) as tmp:
        write_config(model, tmp)
        with ShardedWriter(tmp, "model", shard_bytes) as writer:
            for key, ckpt_key in names.items():
                writer.add(ckpt_key, state[key])
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
        if masks:
            from seftc.models.manifest import save_masks

            save_masks(tmp, masks)
    return Path(out)
