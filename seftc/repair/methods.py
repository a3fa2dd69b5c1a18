"""Repair methods, all driven by one training loop (`seftc.repair.trainer`).

Each method attaches its trainable state to the model (`attach`: `freeze`, then `attach_part` for
the targets of one decoder block after another, then `attach_end`; the FSDP2 loader (onload.py)
calls the parts itself, sharding each block in between), makes its optimizer once the
engine (distributed.py: DDP or FSDP2) has wrapped the model (`start`), steps it, and finally
leaves a plain model (every target an `nn.Linear`) behind (`finalize`, after the whole weights
are gathered from FSDP2 shards where they are needed):
- `seft`, `seft-noregrow`: SEFT (see seft.py); the ablation grows only into active positions.
- `static`: every active weight trainable, mask fixed (state on the active weights only).
- `masked-lora`: peft LoRA whose update B·A is multiplied by the mask, so sparsity is kept.
- `lora-merge`: peft LoRA merged into W, then re-pruned with Wanda to each layer's target.
- `lora-dense`: peft LoRA merged; sparsity is lost (reported as measured).
"""
from __future__ import annotations

import math
import types
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from seftc.models.targets import Target, find_blocks
from seftc.prune.masks import PackedMask, Pattern
from seftc.repair.config import RepairConfig
from seftc.repair.distributed import full_tensor, load_local


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _freeze_all(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


class _Attach:
    """`attach` in parts: the same random draws, in the same order, whether the targets come all
    at once or one decoder block at a time (each part's trainable tensors marked before the
    engine shards that block)."""

    def attach(self, model: nn.Module, targets: list[Target], masks: dict[str, torch.Tensor]) -> None:
        self.freeze(model)
        self.attach_part(model, targets, masks)
        self.attach_end(model)

    def freeze(self, model: nn.Module) -> None:
        """Everything frozen (on a meta skeleton too: materialized tensors keep the flag)."""
        _freeze_all(model)

    def attach_part(self, model: nn.Module, targets: list[Target], masks: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def attach_end(self, model: nn.Module) -> None:
        pass


class SeftMethod(_Attach):
    needs_whole_model = False  # the final masks are the replicated active sets

    def __init__(self, cfg: RepairConfig, pattern: Pattern, reduce: Callable | None, regrow: bool = True):
        self.cfg, self.pattern, self.reduce, self.regrow = cfg, pattern, reduce, regrow
        self.controller = None
        self._gen = torch.Generator(device="cpu").manual_seed(cfg.seed)  # the random initial slots, drawn target by target
        self._layers: dict[str, Any] = {}

    def attach_part(self, model: nn.Module, targets: list[Target], masks: dict[str, torch.Tensor]) -> None:
        from seftc.repair.layer import SeftLinear

        gen, layers = self._gen, self._layers
        for t in targets:
            active = masks[t.name].to(t.module.weight.device).unpack().reshape(-1)  # transient: the layer keeps it packed
            k = min(int(math.ceil(self.cfg.density * active.numel())), int(active.sum()))
            if self.cfg.init == "random":  # drawn on the CPU (the generator's device): the same positions on any device
                where = active.nonzero().flatten()
                init = where[torch.randperm(where.numel(), generator=gen, device="cpu")[:k].to(where.device)]
            else:
                init = torch.empty(0, dtype=torch.long, device=active.device)
            layer = SeftLinear(t.module, active, k, init, defer=self.cfg.delta_decay > 0)
            layer._seft_name = t.name
            _set_module(model, t.name, layer)
            layers[t.name] = layer

    def attach_end(self, model: nn.Module) -> None:
        from seftc.repair.seft import SeftController, SeftOptions

        layers = self._layers
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
        self.controller.importance = {n: v.to(self.controller.layers[n].slots.device) for n, v in sq_norms.items()}

    def start(self) -> None:
        self.controller.start()

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

    def finalize(self, model: nn.Module, masks: dict[str, torch.Tensor], whole: bool = True) -> dict[str, torch.Tensor]:
        """The final masks; with `whole` (the rank that saves), the layers merged into plain ones."""
        final = {}
        for name, layer in self.controller.layers.items():
            if whole:
                _set_module(model, name, layer.merge())
            final[name] = layer.packed_active()
        return final

    def stats(self) -> dict[str, Any]:
        return self.controller.stats()

    def state_items(self) -> Iterator[tuple[str, torch.Tensor]]:
        return self.controller.state_items()

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        self.controller.load_state_tensors(tensors, meta)

    def meta(self) -> dict[str, Any]:
        return {"stats": self.controller.stats(), "update_index": self.controller.update_index}


class _TorchOptimMethod(_Attach):
    """Shared plumbing for methods trained by a stock torch AdamW."""

    def __init__(self, cfg: RepairConfig, pattern: Pattern, reduce: Callable | None):
        self.cfg, self.pattern, self.reduce = cfg, pattern, reduce
        self.optimizer: torch.optim.Optimizer | None = None
        self.params: list[torch.Tensor] = []

    def start(self) -> None:
        """Stock AdamW over the trainable parameters as the model holds them now (FSDP2 shards,
        after `fully_shard`: AdamW steps DTensors, its state sharded alike)."""
        self.params = self._trainable()
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
    needs_whole_model = False

    def has_pending(self) -> bool:
        return False

    def stats(self) -> dict[str, Any]:
        return {}

    def state_items(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Whole tensors, one at a time (gathered from FSDP2 shards: every rank iterates this alike)."""
        for i, p in enumerate(self.params):
            yield f"param.{i}", full_tensor(p)
        for i, p in enumerate(self.params):
            st = self.optimizer.state.get(p)
            if st:
                yield f"opt.{i}.exp_avg", full_tensor(st["exp_avg"])
                yield f"opt.{i}.exp_avg_sq", full_tensor(st["exp_avg_sq"])
                yield f"opt.{i}.step", torch.as_tensor(float(st["step"]), dtype=torch.float32, device="cpu").reshape(1)

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        for i, p in enumerate(self.params):
            load_local(p, tensors[f"param.{i}"])
            if f"opt.{i}.exp_avg" in tensors:
                moments = []
                for key in ("exp_avg", "exp_avg_sq"):
                    m = torch.zeros_like(p.detach())  # sharded as the parameter is
                    load_local(m, tensors[f"opt.{i}.{key}"])
                    moments.append(m)
                self.optimizer.state[p] = {"exp_avg": moments[0], "exp_avg_sq": moments[1],
                                           "step": torch.tensor(float(tensors[f"opt.{i}.step"][0]), device="cpu")}

    def meta(self) -> dict[str, Any]:
        return {}


class StaticMethod(_TorchOptimMethod):
    """Each target becomes an `ActiveValuesLinear`: its trainable state (weights, gradient, AdamW's
    moments) is one fp32 value per active weight, and the mask holds by construction."""

    def attach(self, model: nn.Module, targets: list[Target], masks: dict[str, torch.Tensor]) -> None:
        super().attach(model, targets, masks)
        with torch.no_grad():  # the other weights out of the checkpoint's memory map, so the map and the dense targets' pages go
            for p in model.parameters():  # (the FSDP2 loader reads tensors into fresh memory: no map to leave)
                if p.device.type == "cpu":
                    p.data = p.data.clone()

    def attach_part(self, model: nn.Module, targets: list[Target], masks: dict[str, torch.Tensor]) -> None:
        from seftc.repair.layer import ActiveValuesLinear

        self.masks = getattr(self, "masks", {})
        self.layers = getattr(self, "layers", {})
        for t in targets:
            self.masks[t.name] = masks[t.name].to(t.module.weight.device)
            dtype = torch.float32 if self.cfg.static_precision == "fp32" else t.module.weight.dtype
            layer = ActiveValuesLinear(t.module, self.masks[t.name], dtype)
            _set_module(model, t.name, layer)
            t.module.weight = nn.Parameter(t.module.weight.data.new_empty(0), requires_grad=False)  # the dense base, freed now
            self.layers[t.name] = layer

    def _trainable(self) -> list[torch.Tensor]:
        return [layer.values for layer in self.layers.values()]

    def finalize(self, model: nn.Module, masks: dict[str, torch.Tensor], whole: bool = True) -> dict[str, torch.Tensor]:
        """With `whole` (the rank that saves), each layer back to a plain nn.Linear, one at a time."""
        if whole:
            for name, layer in self.layers.items():
                _set_module(model, name, layer.merge())
        return self.masks


class LoraMethod(_TorchOptimMethod):
    """peft LoRA; `mode` is 'masked' (update ⊙ mask), 'merge' (merge + Wanda re-prune) or 'dense'."""

    def __init__(self, cfg: RepairConfig, pattern: Pattern, reduce: Callable | None, mode: str, reprune: Callable | None = None):
        super().__init__(cfg, pattern, reduce)
        self.mode, self.reprune = mode, reprune

    def freeze(self, model: nn.Module) -> None:
        super().freeze(model)
        torch.manual_seed(self.cfg.seed)  # LoRA's A matrices are drawn from the global generator, block after block
        self.lora_layers = {}
        self.model = model
        self._stack = find_blocks(model)[0]  # found now: FSDP2 changes the class of each block it shards

    def attach_part(self, model: nn.Module, targets: list[Target], masks: dict[str, torch.Tensor]) -> None:
        """peft's LoRA injected into each target's decoder block in turn (the names relative to it)."""
        from peft import LoraConfig, inject_adapter_in_model

        stack = self._stack
        by_block: dict[int, list[Target]] = {}
        for t in targets:
            by_block.setdefault(t.block, []).append(t)
        for i, group in by_block.items():
            scope = f"{stack}.{i}"
            config = LoraConfig(r=self.cfg.lora_r, lora_alpha=self.cfg.lora_alpha, lora_dropout=0.0, bias="none",
                                target_modules=[t.name[len(scope) + 1:] for t in group])
            inject_adapter_in_model(config, model.get_submodule(scope))
            for t in group:
                layer = model.get_submodule(t.name)
                self.lora_layers[t.name] = layer
                if self.mode == "masked":
                    layer.forward = types.MethodType(_masked_lora_forward(masks[t.name].to(layer.get_base_layer().weight.device)), layer)
                for n, p in layer.named_parameters():
                    if "lora_" in n:
                        p.requires_grad_(True)

    def _trainable(self) -> list[torch.Tensor]:
        return [p for n, p in self.model.named_parameters() if "lora_" in n]

    @property
    def needs_whole_model(self) -> bool:
        """Every rank needs the merged weights to know the final masks (lora-dense, lora-merge)."""
        return self.mode != "masked"

    def finalize(self, model: nn.Module, masks: dict[str, torch.Tensor], whole: bool = True) -> dict[str, torch.Tensor]:
        if not whole:
            return {name: masks[name] for name in self.lora_layers}  # masked: the masks are kept
        final = {}
        with torch.no_grad():
            for name, layer in self.lora_layers.items():
                base = layer.get_base_layer()
                delta = layer.get_delta_weight("default")
                if self.mode == "masked":
                    delta = delta * masks[name].to(delta.device).unpack()
                base.weight.add_(delta.to(base.weight.dtype))  # in place: no second copy of the layer
                del delta
                _set_module(model, name, base)
                final[name] = masks[name] if self.mode == "masked" else PackedMask.pack(base.weight != 0)
        if self.mode == "merge" and self.reprune is not None:
            final = {name: PackedMask.pack(m) for name, m in self.reprune(model).items()}
        return final


class _MaskedLoraUpdate(torch.autograd.Function):
    """x · (M ⊙ s·B·A)ᵀ with the dense update rebuilt in the backward, not saved by autograd.

    Left to autograd, every target layer would keep its dense s·B·A (in the adapters' dtype), its
    copy in x's dtype and the unpacked mask from its forward to its backward, so the whole model's
    worth of dense updates is alive at the start of the backward (at 1.1 B, more than static's
    whole trained state). Here only x, A and B are kept; the dense update and its gradient exist
    one layer at a time. Gradients are those of the plain expression (tested)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float, mask: PackedMask) -> torch.Tensor:
        ctx.save_for_backward(x, a, b)
        ctx.scaling, ctx.mask = scaling, mask
        return F.linear(x, _masked_update(a, b, scaling, mask).to(x.dtype))

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, a, b = ctx.saved_tensors
        gx = ga = gb = None
        if ctx.needs_input_grad[0]:
            gx = g @ _masked_update(a, b, ctx.scaling, ctx.mask).to(g.dtype)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            gu = g.reshape(-1, g.shape[-1]).t() @ x.reshape(-1, x.shape[-1])  # ∂/∂(update in x's dtype), [out, in]
            gu = (gu.to(a.dtype) * ctx.mask.unpack()) * ctx.scaling
            ga = b.t() @ gu if ctx.needs_input_grad[1] else None
            gb = gu @ a.t() if ctx.needs_input_grad[2] else None
        return gx, ga, gb, None, None


def _masked_update(a: torch.Tensor, b: torch.Tensor, scaling: float, mask: PackedMask) -> torch.Tensor:
    return (b @ a) * scaling * mask.unpack()  # the bool mask lives only during this product


def _masked_lora_forward(mask: PackedMask) -> Callable:
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        a, b = self.lora_A["default"].weight, self.lora_B["default"].weight
        return self.get_base_layer()(x) + _MaskedLoraUpdate.apply(x, a, b, self.scaling["default"], mask)

    return forward


def make_method(cfg: RepairConfig, pattern: Pattern, reduce: Callable | None, reprune: Callable | None):
    if cfg.method in ("seft", "seft-noregrow"):
        return SeftMethod(cfg, pattern, reduce, regrow=cfg.method == "seft")
    if cfg.method == "static":
        return StaticMethod(cfg, pattern, reduce)
    mode = {"masked-lora": "masked", "lora-merge": "merge", "lora-dense": "dense"}[cfg.method]
    return LoraMethod(cfg, pattern, reduce, mode, reprune)
