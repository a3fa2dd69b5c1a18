"""A model whose weights stay in the checkpoint until asked for, module by module.

The skeleton is built on the meta device (no memory); `materialize(module)` reads that module's
tensors from the safetensors checkpoint (sharded or not, via `safe_open`, one tensor at a time),
in the skeleton's dtype, onto a device; `release(module)` sends them back to meta. So a pass over
the decoder holds the embeddings plus the blocks materialized at the moment, whatever the depth.

Loading is as strict as `load_model`: a checkpoint whose keys are not exactly the ones
`save_pretrained` would write for this config raises `NotStreamable` (the caller may fall back to
loading the whole model, which renames legacy keys or reports what is missing); a key whose shape
disagrees with the config is an error naming the key.
"""
from __future__ import annotations

from typing import Any, Iterator

import torch
from torch import nn

from seftc.errors import SeftcError
from seftc.formats.shards import CheckpointReader, checkpoint_files
from seftc.models.loading import ModelRef, _torch_dtype
from seftc.models.saving import saved_names


class NotStreamable(SeftcError):
    """The checkpoint's keys are not the plain layout of this config (see module docstring)."""


class StreamingModel:
    def __init__(self, ref: ModelRef, dtype: str = "auto", trust_remote_code: bool = False):
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        if ref.kind == "gguf":
            raise NotStreamable("a GGUF file is loaded whole (transformers dequantizes it at load time)")
        self.ref = ref
        config = AutoConfig.from_pretrained(str(ref.folder), trust_remote_code=trust_remote_code)
        torch_dtype = _torch_dtype(dtype, getattr(config, "dtype", None) or getattr(config, "torch_dtype", None))
        try:
            with init_empty_weights(include_buffers=False):
                model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype, trust_remote_code=trust_remote_code)
        except ValueError as e:
            raise NotStreamable(f"cannot build {config.model_type} on the meta device: {str(e).splitlines()[0][:200]}") from None
        model.tie_weights()  # skipped on the meta device by from_config; the tied copies are then left out of `names`
        self.model = model.eval()
        self.names = saved_names(self.model)  # state key -> checkpoint key
        self.reader = CheckpointReader(checkpoint_files(ref.folder, ref.path if ref.kind == "safetensors" else None))
        self._tensors = dict(self.model.state_dict(keep_vars=True))
        self._check()

    def _check(self) -> None:
        found = set(self.reader.keys())
        wanted = {ck for key, ck in self.names.items() if self._tensors[key].is_meta}  # real buffers come from the config
        optional = set(self.names.values()) - wanted
        missing, unexpected = sorted(wanted - found), sorted(found - wanted - optional)
        if missing or unexpected:
            parts = ([f"lacks {len(missing)} tensors (e.g. {missing[0]!r})"] if missing else []) + \
                    ([f"has {len(unexpected)} unexpected tensors (e.g. {unexpected[0]!r})"] if unexpected else [])
            raise NotStreamable(f"{self.ref.spec}: the checkpoint {' and '.join(parts)} for a plain {self.model.config.model_type} layout")
        for key, ck in self.names.items():
            if ck in found:
                shape, want = self.reader.shape(ck), tuple(self._tensors[key].shape)
                if shape != want:
                    raise SeftcError(f"{self.ref.spec}: tensor {ck!r} has shape {list(shape)} but the config needs {list(want)}; is it the right config.json?")

    def keys_under(self, prefix: str) -> list[str]:
        """State keys (of saved tensors) inside the module named `prefix` ('' = everything)."""
        return [k for k in self.names if not prefix or k.startswith(prefix + ".")]

    def _set(self, key: str, value: torch.Tensor) -> None:
        module_name, _, attr = key.rpartition(".")
        module = self.model.get_submodule(module_name)
        if attr in module._parameters:
            old = module._parameters[attr]
            module._parameters[attr] = nn.Parameter(value, requires_grad=old.requires_grad)
        else:
            module._buffers[attr] = value

    def materialize(self, keys: list[str], device: str | torch.device = "cpu") -> None:
        """Read `keys` (state keys) from the checkpoint onto `device`, in the skeleton's dtype."""
        for key in keys:
            ck = self.names[key]
            if ck not in self.reader:
                continue  # a buffer the config computes (already real)
            want = self._tensors[key]
            t = self.reader.get(ck)
            if t.is_floating_point() and t.dtype != want.dtype:
                t = t.to(want.dtype)
            self._set(key, t.to(device))

    def release(self, keys: list[str]) -> None:
        """Put the skeleton's meta tensors back in place of `keys` (frees their memory)."""
        for key in keys:
            module_name, _, attr = key.rpartition(".")
            module = self.model.get_submodule(module_name)
            (module._parameters if attr in module._parameters else module._buffers)[attr] = self._tensors[key]

    def current(self, key: str) -> torch.Tensor:
        """The tensor the model holds under state key `key` now."""
        module_name, _, attr = key.rpartition(".")
        return getattr(self.model.get_submodule(module_name), attr)

    def saved(self, keys: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """(checkpoint key, tensor) for each of `keys`, as `save_pretrained` would write them."""
        for key in keys:
            yield self.names[key], self.current(key).detach()


def materialized_blocks(blocks: Any) -> int:
    """How many of `blocks` hold at least one tensor off the meta device (instrumentation)."""
    return sum(any(not p.is_meta for p in b.parameters()) for b in blocks)
