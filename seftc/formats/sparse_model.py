"""`load_sparse(path)`: a packed folder as a transformers model whose Linear layers keep their
compact tensors (`PackedLinear`), or plain dense weights with `dense=True`."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from seftc.errors import FormatError
from seftc.formats.base import PackedTensor


class PackedLinear(nn.Module):
    """A Linear layer whose weight is held packed. `forward` decodes it with the reference
    decoder on the components' device; the runtime's kernels replace that path."""

    def __init__(self, packed: PackedTensor, bias: nn.Parameter | None = None, name: str = ""):
        super().__init__()
        if len(packed.shape) != 2:
            raise FormatError(f"tensor {name!r}: a packed Linear weight must be 2-D, not {list(packed.shape)}")
        self.out_features, self.in_features = packed.shape
        self.format = packed.format
        self.weight_dtype = packed.dtype
        self.params = dict(packed.params)
        self.name = name
        self.foreign = packed.foreign
        self.component_names = tuple(packed.components)
        for comp, t in packed.components.items():
            self.register_buffer(f"packed_{comp}", t)
        self.bias = bias

    @property
    def packed(self) -> PackedTensor:
        comps = {c: getattr(self, f"packed_{c}") for c in self.component_names}
        return PackedTensor(self.format, (self.out_features, self.in_features), self.weight_dtype, comps, dict(self.params), self.foreign)

    def dense_weight(self) -> torch.Tensor:
        return self.packed.to_dense(self.name)

    @property
    def weight(self) -> torch.Tensor:  # for code that reads `.weight` (dtype, device, shape)
        return self.dense_weight()

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.dense_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.format}, bias={self.bias is not None}"


def load_sparse(path: str | os.PathLike, dense: bool = False, *, validate: bool = True, trust_remote_code: bool = False) -> Any:
    """Load a packed folder (from `seftc pack`, or a compressed-tensors sparse folder).

    dense=False: every packed Linear weight becomes a PackedLinear holding its component tensors
    (checksums verified; with `validate` each is decoded once to check its structure).
    dense=True: every weight is decoded into a plain model.

    config.json goes through the same checks as every model seftc loads (code it names runs only
    with `trust_remote_code`), and every stored tensor must have the name and shape the model
    built from it expects: anything else is a FormatError naming the keys."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from seftc.formats.packing import iter_packed
    from seftc.models.loading import resolve_model

    folder = Path(path).expanduser()
    resolve_model(folder, trust_remote_code=trust_remote_code)  # refuses auto_map, unknown architectures
    try:
        config = AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
        for attr in ("quantization_config", "compression_config"):
            if hasattr(config, attr):
                delattr(config, attr)
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        raise FormatError(f"{folder}: cannot build a model from config.json ({str(e).splitlines()[0][:200] if str(e) else e.__class__.__name__})") from None

    expected = {n: tuple(t.shape) for n, t in list(model.named_parameters()) + list(model.named_buffers())}
    floating = {n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_floating_point()}
    state: dict[str, torch.Tensor] = {}
    packed: dict[str, PackedTensor] = {}
    wrong: list[str] = []
    for reader, name in iter_packed(folder):
        entry = reader.entries[name]
        if name not in expected:
            raise FormatError(f"{folder}: tensor {name!r} has no place in a {config.model_type} model")
        if tuple(entry.shape) != expected[name]:
            wrong.append(f"{name!r} is {list(entry.shape)}, the config needs {list(expected[name])}")
            continue
        if (name in floating) != entry.dtype.is_floating_point:
            raise FormatError(f"{folder}: tensor {name!r} is stored as {entry.dtype}, but the model's {name!r} is "
                              f"{'a floating-point' if name in floating else 'an integer'} tensor")
        if dense or entry.format == "dense":
            state[name] = reader.read_dense(name)
        else:
            p = reader.read(name)
            if validate:
                p.to_dense(name)
            packed[name] = p
    if wrong:
        raise FormatError(f"{folder}: the shape of {len(wrong)} stored tensor(s) disagrees with config.json: {'; '.join(wrong[:3])}")

    model.load_state_dict(state, strict=False, assign=True)
    for name, p in packed.items():
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        if attr == "weight" and isinstance(module, nn.Linear):
            if module.bias is not None and module.bias.is_meta:
                raise FormatError(f"{folder}: the packed files lack {module_name + '.bias'!r}")
            bias = module.bias
            parent_name, _, child = module_name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, PackedLinear(p, bias, name))
        else:
            setattr(module, attr, nn.Parameter(p.to_dense(name), requires_grad=False))
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    missing = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if missing:
        raise FormatError(f"{folder}: the packed files lack {len(missing)} tensors of this model (e.g. {missing[0]!r})")
    model.eval()
    return model
