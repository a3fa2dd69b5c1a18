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
MASKS_NAME = "seftc_masks.st"  # explicit keep-masks: safetensors layout, packed bits; not *.safetensors, so no weight loader picks it up
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


class MaskWriter:
    """Stream keep-masks (bool tensors) into the mask file, one at a time, as little-endian packed
    bits with their shapes in the metadata; `close()` puts the file in place. A mask is explicit
    state: a kept weight may be exactly zero (e.g. dequantized GGUF weights), so it cannot be
    recovered from `W != 0`."""

    def __init__(self, folder: Path):
        from seftc.formats.io import SafetensorsWriter

        self._file = SafetensorsWriter(Path(folder) / MASKS_NAME)
        self._shapes: dict[str, str] = {}

    def add(self, name: str, mask: Any) -> None:
        """`mask`: a bool tensor, or a PackedMask (its bits are written as they are)."""
        import numpy as np
        import torch

        from seftc.prune.masks import PackedMask

        if isinstance(mask, PackedMask):
            bits = mask.bits.detach().to("cpu").contiguous()
        else:
            bits = torch.from_numpy(np.packbits(mask.detach().to("cpu", torch.bool).numpy().reshape(-1), bitorder="little"))
        self._file.add(name, bits)
        self._shapes[name] = json.dumps(list(mask.shape))

    def close(self) -> None:
        self._file.metadata = dict(self._shapes)
        self._file.close()

    def abort(self) -> None:
        self._file.abort()


def save_masks(folder: Path, masks: dict[str, Any]) -> None:
    """Write the keep-masks (bool tensors) into `folder`'s mask file (see MaskWriter)."""
    writer = MaskWriter(folder)
    try:
        for name, m in masks.items():
            writer.add(name, m)
    except BaseException:
        writer.abort()
        raise
    writer.close()


def load_masks(folder: Path, packed: bool = False) -> dict[str, Any] | None:
    """The keep-masks written by `save_masks` (bool tensors, or with `packed` PackedMasks read as
    they are stored), or None when the folder has none."""
    import math

    import numpy as np
    import torch
    from safetensors import safe_open

    from seftc.prune.masks import PackedMask

    path = Path(folder) / MASKS_NAME
    if not path.is_file():
        return None
    out = {}
    try:
        with safe_open(str(path), "np") as f:
            meta = f.metadata() or {}
            for name in f.keys():
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
