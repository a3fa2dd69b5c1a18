"""`dense`: a tensor stored as itself, under its own name (any dtype, any shape)."""
from __future__ import annotations

import torch

from seftc.formats.base import Analysis, Codec, Errors, PackedTensor


class Dense(Codec):
    name = "dense"
    components = ("data",)
    sparse = False

    def key(self, name: str, comp: str) -> str:
        return name

    def nbytes(self, a: Analysis) -> int:
        return a.dense_bytes

    def encode(self, a: Analysis) -> PackedTensor:
        return self.wrap(a.tensor)

    def wrap(self, tensor: torch.Tensor) -> PackedTensor:
        t = tensor.detach().cpu().contiguous()
        return PackedTensor(self.name, tuple(int(d) for d in t.shape), t.dtype, {"data": t})

    def _decode(self, p: PackedTensor, err: Errors) -> torch.Tensor:
        err.comp(p, "data", (p.dtype,), p.shape)
        return p.components["data"].cpu()


DENSE = Dense()


def from_dense(tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    return DENSE.wrap(tensor).components


def to_dense(components: dict[str, torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return DENSE.decode(PackedTensor(DENSE.name, tuple(shape), dtype, components))
