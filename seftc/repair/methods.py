"""Repair methods, all driven by one training loop (`seftc.repair.trainer`).

Each method attaches its trainable state to the model, steps its optimizer, and finally leaves a
plain model (every target an `nn.Linear`) behind:
- `seft`, `seft-noregrow`: SEFT (see seft.py); the ablation grows only into active positions.
- `static`: every active weight trainable, mask fixed (gradients and weights masked each step).
- `masked-lora`: peft LoRA whose update B·A is multiplied by the mask, so sparsity is kept.
- `lora-merge`: peft LoRA merged into W, then re-pruned with Wanda to each layer's target.
- `lora-dense`: peft LoRA merged; sparsity is lost (reported as measured).
"""
from __future__ import annotations

import math
import types
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from seftc.models.targets import Target
from seftc.prune.masks import Pattern
from seftc.repair.config import RepairConfig


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _freeze_all(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


class SeftMethod:
    def __init__(self, cfg: RepairConfig, pattern: Pattern, reduce: Callable | None, regrow: bool = True):
        self.cfg, self.pattern, self.reduce, self.regrow = cfg, pattern, reduce, regrow
        self.controller = None

    def attach(self, model: nn.Module, targets: list[Target], masks: dict[str, torch.Tensor]) -> None:
        from seftc.repair.layer import SeftLinear
        from seftc.repair.seft import SeftController, SeftOptions

        _freeze_all(model)
        gen = torch.Generator().manual_seed(self.cfg.seed)
        layers = {}
        for t in targets:
            active = masks[t.name].reshape(-1)
            k = min(int(math.ceil(self.cfg.density * active.numel())), int(active.sum()))
            if self.cfg.init == "random":
                where = active.nonzero().flatten()
                init = where[torch.randperm(where.numel(), generator=gen)[:k]]
            else:
                init = torch.empty(0, dtype=torch.long)
            layer = SeftLinear(t.module, active, k, init, defer=self.cfg.delta_decay > 0)
            layer._seft_name = t.name
            _set_module(model, t.name, layer)
            layers[t.name] = layer
        fields = set(SeftOptions.__dataclass_fields__) - {"regrow"}
        options = SeftOptions(regrow=self.regrow, **{f: getattr(self.cfg, f) for f in fields})
        # δ's decay: AdamW's weight decay plus the L2-SP pull toward the base (delta_decay)
        self.controller = SeftController(layers, options, self.pattern, self.cfg.steps, self.cfg.learning_rate,
                                         self.cfg.weight_decay + self.cfg.delta_decay, self.reduce)

    @property
    def needs_importance(self) -> bool:
        return self.controller.options.needs_importance

    def set_importance(self, sq_norms: dict[str, torch.Tensor]) -> None:
        """‖X‖² per input column of each layer (the pruning-time importance's statistic)."""
        self.controller.importance = dict(sq_norms)

    def has_pending(self) -> bool:
        return self.controller.has_pending()

    def trainable(self) -> list[torch.Tensor]:
        return [l.delta for l in self.controller.layers.values()]

    def begin_step(self, step: int, n_micro: int) -> None:
        self.controller.step, self.controller.n_micro = step, n_micro

    def begin_micro(self, micro: int) -> None:
        self.controller.micro = micro

    def optimizer_step(self, lr: float) -> None:
        self.controller.optimizer.step(lr)
        self.controller.optimizer.zero_grad()
        self.controller.decay(lr)

    def after_step(self, step: int) -> dict[str, Any]:
        return self.controller.apply_pending() or {}

    def finalize(self, model: nn.Module, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        final = {}
        for name, layer in self.controller.layers.items():
            _set_module(model, name, layer.merge())
            final[name] = layer.active.reshape(layer.out_features, layer.in_features).clone()
        return final

    def stats(self) -> dict[str, Any]:
        return self.controller.stats()

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return self.controller.state_tensors()

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        self.controller.load_state_tensors(tensors, meta)

    def meta(self) -> dict[str, Any]:
        return {"stats": self.controller.stats(), "update_index": self.controller.update_index}


class _TorchOptimMethod:
    """Shared plumbing for methods trained by a stock torch AdamW."""

    def __init__(self, cfg: RepairConfig, pattern: Pattern, reduce: Callable | None):
        self.cfg, self.pattern, self.reduce = cfg, pattern, reduce
        self.optimizer: torch.optim.Optimizer | None = None
        self.params: list[torch.Tensor] = []

    def _make_optimizer(self) -> None:
        self.optimizer = torch.optim.AdamW(self.params, lr=self.cfg.learning_rate, weight_decay=self.cfg.weight_decay)

    def trainable(self) -> list[torch.Tensor]:
        return self.params

    def begin_step(self, step: int, n_micro: int) -> None:
        pass

    def begin_micro(self, micro: int) -> None:
        pass

    def optimizer_step(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def after_step(self, step: int) -> dict[str, Any]:
        return {}

    needs_importance = False

    def has_pending(self) -> bool:
        return False

    def stats(self) -> dict[str, Any]:
        return {}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {f"param.{i}": p.data for i, p in enumerate(self.params)}
        for i, p in enumerate(self.params):
            st = self.optimizer.state.get(p)
            if st:
                out[f"opt.{i}.exp_avg"], out[f"opt.{i}.exp_avg_sq"] = st["exp_avg"], st["exp_avg_sq"]
                out[f"opt.{i}.step"] = torch.as_tensor(st["step"], dtype=torch.float32).reshape(1)
        return {k: v.contiguous() for k, v in out.items()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        for i, p in enumerate(self.params):
            p.data.copy_(tensors[f"param.{i}"])
            if f"opt.{i}.exp_avg" in tensors:
                self.optimizer.state[p] = {
                    "exp_avg": tensors[f"opt.{i}.exp_avg"].clone(),
                    "exp_avg_sq": tensors[f"opt.{i}.exp_avg_sq"].clone(),
                    "step": torch.tensor(float(tensors[f"opt.{i}.step"][0])),
                }

    def meta(self) -> dict[str, Any]:
        return {}


class StaticMethod(_TorchOptimMethod):
    def attach(self, model: nn.Module, targets: list[Target], masks: dict[str, torch.Tensor]) -> None:
        _freeze_all(model)
        self.masks = {t.name: masks[t.name] for t in targets}
        self.modules = {t.name: t.module for t in targets}
        for t in targets:
            t.module.weight.requires_grad_(True)
            t.module.weight.register_hook(lambda g, m=masks[t.name]: g * m)
        self.params = [t.module.weight for t in targets]
        self._make_optimizer()

    def optimizer_step(self, lr: float) -> None:
        super().optimizer_step(lr)
        with torch.no_grad():
            for name, module in self.modules.items():
                module.weight.masked_fill_(~self.masks[name], 0.0)

    def finalize(self, model: nn.Module, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        for module in self.modules.values():
            module.weight.requires_grad_(False)
        return self.masks


class LoraMethod(_TorchOptimMethod):
    """peft LoRA; `mode` is 'masked' (update ⊙ mask), 'merge' (merge + Wanda re-prune) or 'dense'."""

    def __init__(self, cfg: RepairConfig, pattern: Pattern, reduce: Callable | None, mode: str, reprune: Callable | None = None):
        super().__init__(cfg, pattern, reduce)
        self.mode, self.reprune = mode, reprune

    def attach(self, model: nn.Module, targets: list[Target], masks: dict[str, torch.Tensor]) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        _freeze_all(model)
        config = LoraConfig(r=self.cfg.lora_r, lora_alpha=self.cfg.lora_alpha, lora_dropout=0.0, bias="none",
                            target_modules=[t.name for t in targets])
        torch.manual_seed(self.cfg.seed)
        inject_adapter_in_model(config, model)
        self.lora_layers = {t.name: model.get_submodule(t.name) for t in targets}
        if self.mode == "masked":
            for name, layer in self.lora_layers.items():
                layer.forward = types.MethodType(_masked_lora_forward(masks[name]), layer)
        self.params = [p for n, p in model.named_parameters() if "lora_" in n]
        for p in self.params:
            p.requires_grad_(True)
        self._make_optimizer()

    def finalize(self, model: nn.Module, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        final = {}
        with torch.no_grad():
            for name, layer in self.lora_layers.items():
                base = layer.get_base_layer()
                delta = layer.get_delta_weight("default")
                if self.mode == "masked":
                    delta = delta * masks[name]
                merged = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None, dtype=base.weight.dtype)
                merged.weight.copy_(base.weight + delta.to(base.weight.dtype))
                if base.bias is not None:
                    merged.bias.copy_(base.bias)
                _set_module(model, name, merged)
                final[name] = masks[name] if self.mode == "masked" else merged.weight != 0
        if self.mode == "merge" and self.reprune is not None:
            final = self.reprune(model)
        return final


def _masked_lora_forward(mask: torch.Tensor) -> Callable:
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        base = self.get_base_layer()
        a, b = self.lora_A["default"].weight, self.lora_B["default"].weight
        update = (b @ a) * self.scaling["default"] * mask
        return base(x) + F.linear(x, update.to(x.dtype))

    return forward


def make_method(cfg: RepairConfig, pattern: Pattern, reduce: Callable | None, reprune: Callable | None):
    if cfg.method in ("seft", "seft-noregrow"):
        return SeftMethod(cfg, pattern, reduce, regrow=cfg.method == "seft")
    if cfg.method == "static":
        return StaticMethod(cfg, pattern, reduce)
    mode = {"masked-lora": "masked", "lora-merge": "merge", "lora-dense": "dense"}[cfg.method]
    return LoraMethod(cfg, pattern, reduce, mode, reprune)
