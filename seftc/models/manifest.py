"""`seftc_manifest.json`: what was done to a checkpoint, layer by layer.

Every stage that writes a model folder writes one; later stages read it (repair needs the masks'
targets, inspect checks the claimed pattern). Unknown keys are kept on round trip so newer
writers do not lose data through older readers.
"""
from __future__ import annotations

import json
import os
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from seftc.errors import SeftcError

MANIFEST_NAME = "seftc_manifest.json"
MASKS_PREFIX, MASKS_SUFFIX = "seftc_masks", ".st"  # not *.safetensors, so no weight loader picks the mask file up
MASKS_NAME = MASKS_PREFIX + MASKS_SUFFIX  # explicit keep-masks: safetensors layout, packed bits (sharded: see MaskWriter)
MANIFEST_VERSION = 1


@dataclass
class LayerRecord:
    name: str
    shape: list[int]
    target_sparsity: float
    nonzero: int
    sparsity: float
    pattern: str
    mask_sha256: str


@dataclass
class Manifest:
    stage: str
    method: str
    pattern: str
    target_sparsity: float
    sparsity: float  # measured over the target layers
    layers: list[LayerRecord]
    calibration: dict[str, Any] | None
    config: dict[str, Any]
    source_model: str
    seed: int | None = None
    versions: dict[str, str] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    layer_stats: dict[str, dict[str, Any]] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    elapsed_s: float | None = None
    version: int = MANIFEST_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str = "manifest") -> "Manifest":
        try:
            raw = json.loads(text)
            layers = [LayerRecord(**layer) for layer in raw.pop("layers")]
            known = {k: raw[k] for k in cls.__dataclass_fields__ if k in raw and k != "layers"}
            return cls(layers=layers, **known)
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise SeftcError(f"{where} is not a valid seftc manifest ({e.__class__.__name__}: {e})") from None

    def save(self, folder: Path) -> None:
        (Path(folder) / MANIFEST_NAME).write_text(self.to_json(), encoding="utf-8")

    @classmethod
    def load(cls, folder: Path) -> "Manifest | None":
        from seftc.models.files import read_side_file

        path = Path(folder) / MANIFEST_NAME
        if not os.path.lexists(path):
            return None
        try:
            text = read_side_file(path, Path(folder)).decode("utf-8")
        except UnicodeDecodeError:
            raise SeftcError(f"{path} is not a valid seftc manifest (not UTF-8)") from None
        return cls.from_json(text, str(path))


def tool_versions() -> dict[str, str]:
    import safetensors
    import torch
    import transformers

    import seftc

    return {
        "seftc": seftc.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
        "python": platform.python_version(),
    }


class _MaskShard:
    """One file of the mask file: packed bits, each mask's shape in the metadata."""

    def __init__(self, path: Path):
        from seftc.formats.io import SafetensorsWriter

        self._file = SafetensorsWriter(path)
        self.keys = self._file.keys

    @property
    def nbytes(self) -> int:
        return self._file.nbytes

    def add(self, name: str, mask: tuple[Any, list[int]]) -> None:
        bits, shape = mask
        self._file.add(name, bits)
        self._file.metadata[name] = json.dumps(list(shape))

    def close(self) -> Path:
        return self._file.close()

    def abort(self) -> None:
        self._file.abort()


class MaskWriter:
    """Stream keep-masks (bool tensors) into the mask file, one at a time, as little-endian packed
    bits with their shapes in the metadata; `close()` puts the file in place. Like the weights it
    is sharded at `max_shard_size` bytes: `seftc_masks.st` when it fits in one file, else
    `seftc_masks-0000i-of-0000n.st` + `seftc_masks.st.index.json` (formats/shards.py). A mask is
    explicit state: a kept weight may be exactly zero (e.g. dequantized GGUF weights), so it
    cannot be recovered from `W != 0`."""

    def __init__(self, folder: Path, max_shard_size: int = 5 * 10**9):
        from seftc.formats.shards import ShardedWriter

        self._file = ShardedWriter(folder, MASKS_PREFIX, max_shard_size, open_file=_MaskShard, suffix=MASKS_SUFFIX)

    def add(self, name: str, mask: Any) -> None:
        """`mask`: a bool tensor, or a PackedMask (its bits are written as they are)."""
        import numpy as np
        import torch

        from seftc.prune.masks import PackedMask

        if isinstance(mask, PackedMask):
            bits = mask.bits.detach().to("cpu").contiguous()
        else:
            bits = torch.from_numpy(np.packbits(mask.detach().to("cpu", torch.bool).numpy().reshape(-1), bitorder="little"))
        self._file.add(name, (bits, list(mask.shape)), nbytes=bits.numel())

    def close(self) -> None:
        self._file.close()

    def abort(self) -> None:
        self._file.abort()


def save_masks(folder: Path, masks: dict[str, Any], max_shard_size: int = 5 * 10**9) -> None:
    """Write the keep-masks (bool tensors) into `folder`'s mask file (see MaskWriter)."""
    writer = MaskWriter(folder, max_shard_size)
    try:
        for name, m in masks.items():
            writer.add(name, m)
    except BaseException:
        writer.abort()
        raise
    writer.close()


def mask_files(folder: Path) -> list[Path]:
    """The files of `folder`'s mask file: the shards its index names, or the single file, or none."""
    from seftc.formats.shards import index_name, read_index

    folder = Path(folder)
    index = folder / index_name(MASKS_PREFIX, MASKS_SUFFIX)
    if index.is_file():
        return [folder / n for n in sorted(set(read_index(index, MASKS_SUFFIX).values()))]
    return [folder / MASKS_NAME] if (folder / MASKS_NAME).is_file() else []


def load_masks(folder: Path, packed: bool = False) -> dict[str, Any] | None:
    """The keep-masks written by `save_masks` (bool tensors, or with `packed` PackedMasks read as
    they are stored), or None when the folder has none."""
    import math

    import numpy as np
    import torch
    from safetensors import safe_open

    from seftc.prune.masks import PackedMask

    files = mask_files(folder)
    if not files:
        return None
    out = {}
    for path in files:
        try:
            with safe_open(str(path), "np") as f:
                meta = f.metadata() or {}
                for name in f.keys():
                    if name in out:
                        raise ValueError(f"{name} twice")
                    shape = json.loads(meta[name])
                    stored = f.get_tensor(name)
                    if packed:
                        if not isinstance(shape, list) or stored.dtype != np.uint8 or stored.size != (math.prod(shape) + 7) // 8:
                            raise ValueError(name)
                        out[name] = PackedMask(torch.from_numpy(stored), tuple(shape))
                        continue
                    bits = np.unpackbits(stored, bitorder="little", count=math.prod(shape))
                    out[name] = torch.from_numpy(bits.astype(bool)).reshape(shape)
        except (OSError, KeyError, ValueError, json.JSONDecodeError) as e:
            raise SeftcError(f"{path} is not a valid seftc mask file ({e.__class__.__name__})") from None
    return out
