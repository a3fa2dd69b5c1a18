"""Architecture-generic discovery of decoder blocks and the linear layers inside them.

The decoder stack is the `nn.ModuleList` whose children are all of one class, each holding
`nn.Linear` layers, and whose length equals `config.num_hidden_layers` when the config says so
(the longest such list otherwise). Targets are the `nn.Linear` modules inside those blocks,
filtered by include/ignore patterns (fnmatch on the full module name). Embeddings and the LM head
live outside the blocks and so are never targets unless asked for by name.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any, Sequence

from seftc.errors import SeftcError

DEFAULT_IGNORE = ("*lm_head*", "*embed*")


@dataclass(frozen=True)
class Target:
    name: str  # full module name, e.g. "model.layers.3.self_attn.q_proj"
    block: int  # index of its decoder block
    module: Any  # the nn.Linear


def find_blocks(model: Any) -> tuple[str, Any]:
    """Return (name, ModuleList) of the decoder blocks."""
    import torch.nn as nn

    wanted = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    best: tuple[str, Any] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        kinds = {type(m) for m in module}
        if len(kinds) != 1 or not any(isinstance(m, nn.Linear) for m in module[0].modules()):
            continue
        if wanted is not None and len(module) == wanted:
            return name, module
        if best is None or len(module) > len(best[1]):
            best = (name, module)
    if best is None:
        raise SeftcError(f"unsupported architecture {type(model).__name__}: found no stack of decoder blocks holding nn.Linear layers")
    return best


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name.rsplit(".", 1)[-1], p) for p in patterns)


def find_targets(model: Any, include: Sequence[str] = ("*",), ignore: Sequence[str] = DEFAULT_IGNORE) -> list[Target]:
    """Linear layers inside the decoder blocks, in block then module order.

    A pattern matches the full module name or its last component (`q_proj`, `*.mlp.*`)."""
    import torch.nn as nn

    stack_name, blocks = find_blocks(model)
    targets = []
    for i, block in enumerate(blocks):
        for sub, module in block.named_modules():
            if not isinstance(module, nn.Linear):
                continue
            full = f"{stack_name}.{i}.{sub}"
            if _matches(full, include) and not _matches(full, ignore):
                targets.append(Target(full, i, module))
    if not targets:
        raise SeftcError(f"no linear layer matches the target patterns {list(include)} (ignoring {list(ignore)})")
    return targets
