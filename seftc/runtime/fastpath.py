"""The lean forward: a hand-written decoder pass for LLaMA-architecture models (llama, mistral without
a sliding window, qwen2 with full attention) over the model's own weights, for the decode engine
(`seftc.runtime.engine`) and `seftc bench`'s decode timing. Transformers' forward costs several
milliseconds per token outside the linear layers on a 30-layer model (module calls, kwargs, mask
building, a cache grown by concatenation); this pass keeps only the arithmetic.

- **Static KV cache** (`StaticCache`): keys and values of every layer in two tensors
  [layers, rows, kv_heads, capacity, head_dim], written in place; the capacity doubles only when a
  step would pass it. The padding mask [rows, capacity] lives beside them. Rows are left-padded as
  in the engine's design: `merge` appends rows (right-aligning both sides), `select` keeps rows and
  cuts leading columns that are padding in every row left.
- **Rotary** from cos/sin tables computed once (transformers' formula: the module's own `inv_freq`
  and attention scaling), indexed by position; q and k rotate together in one pass.
- **RMSNorm** by `torch.nn.functional.rms_norm` (float32: weight fused, bit-identical to
  transformers; other dtypes: normalized in float32, rounded, then scaled, as transformers does).
- **Fused projections**: q/k/v in one linear call and gate/up in one, built once per model
  (`fuse`): dense weights by `torch.cat`, sparse layouts (bitmask, 2:4, int8) by stacking their
  rows (`SparseLayout.concat`, `Int8Layout.concat`). The original layers then hold views into the
  fused weight, so no memory is added; groups of mixed layer types stay unfused.
- **Attention** by `scaled_dot_product_attention` over the cache's used columns; one query per row
  (decode) groups the query heads per key/value head (no repeated keys); no mask at all while no
  row is padded.
- Linear layers are called by `.forward` (no module-call hooks). Models this pass does not cover
  (`unsupported`) run transformers' forward; `SEFTC_FASTPATH=0` forces that everywhere.

The pass is built once per model (`for_model`, cached) and rebuilt when the model was moved or cast
since (its embedding tensor changed). Outputs match transformers' up to float rounding (tests:
logits within 1e-4 in float32, the same greedy tokens).
"""
from __future__ import annotations

import os
import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ENV = "SEFTC_FASTPATH"
ARCHS = ("llama", "mistral", "qwen2")
STATIC_ROPE = ("default", "linear", "llama3", "yarn")  # rope types whose tables do not depend on the sequence
MIN_CAPACITY = 64


def enabled() -> bool:
    """False when SEFTC_FASTPATH=0 (read at every engine build, so a process can measure both)."""
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "off", "no")


def unsupported(model: Any) -> str | None:
    """Why the lean pass cannot run `model`, or None when it can."""
    config = getattr(model, "config", None)
    arch = getattr(config, "model_type", None)
    if arch not in ARCHS:
        return f"model type {arch!r} (the lean pass covers {', '.join(ARCHS)})"
    inner = getattr(model, "model", None)
    if inner is None or not all(hasattr(inner, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")) \
            or not hasattr(model, "lm_head"):
        return "not a *ForCausalLM with model.embed_tokens/layers/norm/rotary_emb and lm_head"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act!r} (the lean pass runs silu)"
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None) or []
    if any(t != "full_attention" for t in types) or (arch == "mistral" and window is not None
                                                      and window < getattr(config, "max_position_embeddings", 0)):
        return "sliding-window attention"
    rope = getattr(inner.rotary_emb, "rope_type", "default")
    if rope not in STATIC_ROPE:
        return f"rope type {rope!r} (tables depend on the sequence length)"
    for module in model.modules():
        if module._forward_hooks or module._forward_pre_hooks:
            return "forward hooks are registered on the model"
    return None


# --- fused projections -------------------------------------------------------------------------
def fuse(parts: list[nn.Module]) -> nn.Module | None:
    """One layer computing the parts' outputs concatenated (rows stacked), or None when they do not
    share a type, dtype and device. The parts are re-pointed to views of the fused weight."""
    first = next(iter(parts[0].parameters(recurse=False)), None)
    if first is None:
        first = next(iter(parts[0].buffers(recurse=False)), None)
    inference = first is not None and first.is_inference()  # tensors made in inference mode stay among their kind
    with torch.inference_mode(inference), torch.no_grad():
        return _fuse(parts)


def _fuse(parts: list[nn.Module]) -> nn.Module | None:
    from seftc.runtime.int8 import Int8Layout, SparseInt8Linear
    from seftc.runtime.layouts import PAD, SparseLayout
    from seftc.runtime.linear import SparseLinear

    kind = type(parts[0])
    if any(type(p) is not kind for p in parts) or kind not in (nn.Linear, SparseLinear, SparseInt8Linear):
        return None
    first = parts[0].weight if kind is nn.Linear else parts[0].values
    if any((p.weight if kind is nn.Linear else p.values).dtype != first.dtype for p in parts) or \
            any((p.weight if kind is nn.Linear else p.values).device != first.device for p in parts):
        return None
    bias = None
    if any(p.bias is not None for p in parts):
        dtype = next(p.bias.dtype for p in parts if p.bias is not None)
        bias = torch.cat([p.bias.detach().to(dtype) if p.bias is not None else torch.zeros(p.out_features, dtype=dtype, device=first.device)
                          for p in parts])
    if kind is nn.Linear:
        weight = torch.cat([p.weight.detach() for p in parts])
        fused = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
        fused.weight = nn.Parameter(weight, requires_grad=False)
        if bias is not None:
            fused.bias = nn.Parameter(bias, requires_grad=False)
        row = 0
        for p in parts:  # the parts keep working, on views of the fused weight (no second copy)
            p.weight.data = weight[row:row + p.out_features]
            row += p.out_features
        return fused
    device = first.device
    layouts = [p.layout for p in parts]
    if kind is SparseLinear:
        layout = SparseLayout.concat([_on_cpu(l) for l in layouts])
        fused = SparseLinear(layout, bias).to(device)
        pad = PAD
    else:
        layout = Int8Layout.concat([_on_cpu(l) for l in layouts])
        fused = SparseInt8Linear(layout, bias).to(device)
        pad = layout.values.numel() - int(layout.row_offsets[-1])
    row = value = 0
    for p in parts:
        n = int(p.row_offsets[-1] - p.row_offsets[0])
        p.masks = fused.masks[row:row + p.out_features]
        p.values = fused.values[value:value + n + pad]  # its padding reads the next part's values: read only
        if kind is SparseInt8Linear:
            p.scales = fused.scales[row:row + p.out_features]
            p._dequantized = None
        p.row_offsets = p.row_offsets - p.row_offsets[0]
        row += p.out_features
        value += n
    return fused


def _on_cpu(layout):
    from dataclasses import fields, replace

    return replace(layout, **{f.name: getattr(layout, f.name).cpu() for f in fields(layout)
                              if isinstance(getattr(layout, f.name), torch.Tensor)})


# --- the static cache --------------------------------------------------------------------------
def _capacity(need: int) -> int:
    return max(MIN_CAPACITY, 1 << max(0, need - 1).bit_length())


class StaticCache:
    """Keys and values of a batch, [layers, rows, kv_heads, capacity, head_dim] each, written in place;
    `mask` [rows, capacity] says which columns hold a row's tokens; `length` columns are in use."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, length: int, padded: bool):
        self.keys, self.values, self.mask, self.length, self.padded = keys, values, mask, length, padded

    @classmethod
    def empty(cls, shape: tuple[int, int, int, int], rows: int, capacity: int, dtype: torch.dtype,
              device: torch.device) -> "StaticCache":
        layers, kv, _, hd = shape
        keys = torch.zeros(layers, rows, kv, capacity, hd, dtype=dtype, device=device)
        return cls(keys, torch.zeros_like(keys), torch.zeros(rows, capacity, dtype=torch.bool, device=device), 0, False)

    @property
    def rows(self) -> int:
        return self.keys.shape[1]

    @property
    def capacity(self) -> int:
        return self.keys.shape[3]

    def used_mask(self) -> torch.Tensor:
        return self.mask[:, :self.length]

    def _resized(self, rows: int, capacity: int) -> "StaticCache":
        layers, _, kv, _, hd = self.keys.shape
        return StaticCache.empty((layers, kv, 0, hd), rows, capacity, self.keys.dtype, self.keys.device)

    def ensure(self, need: int) -> None:
        """Room for `need` columns: the capacity doubles (a copy of the used columns) when short."""
        if need <= self.capacity:
            return
        grown = self._resized(self.rows, _capacity(need))
        n = self.length
        grown.keys[..., :n, :] = self.keys[..., :n, :]
        grown.values[..., :n, :] = self.values[..., :n, :]
        grown.mask[:, :n] = self.mask[:, :n]
        self.keys, self.values, self.mask = grown.keys, grown.values, grown.mask

    def merge(self, other: "StaticCache") -> "StaticCache":
        """This batch's rows then `other`'s, both right-aligned to the longer one (padding on the left)."""
        width = max(self.length, other.length)
        out = self._resized(self.rows + other.rows, _capacity(max(width + 1, self.capacity, other.capacity)))
        for rows, part in ((slice(0, self.rows), self), (slice(self.rows, None), other)):
            start = width - part.length
            out.keys[:, rows, :, start:width] = part.keys[..., :part.length, :]
            out.values[:, rows, :, start:width] = part.values[..., :part.length, :]
            out.mask[rows, start:width] = part.mask[:, :part.length]
        out.length = width
        out.padded = self.padded or other.padded or self.length != other.length
        return out

    def select(self, keep: list[int]) -> "StaticCache":
        """Keep these rows (in this order); cut leading columns that are padding in all of them."""
        idx = torch.tensor(keep, device=self.mask.device)
        mask = self.mask[idx, :self.length]
        first = int(mask.any(0).to(torch.int8).argmax()) if self.length else 0
        n = self.length - first
        out = self._resized(len(keep), self.capacity)
        out.keys[..., :n, :] = self.keys[:, idx, :, first:self.length]
        out.values[..., :n, :] = self.values[:, idx, :, first:self.length]
        out.mask[:, :n] = mask[:, first:]
        out.length = n
        out.padded = not bool(mask[:, first:].all())
        return out


# --- the pass ----------------------------------------------------------------------------------
class _Layer:
    __slots__ = ("norm1", "norm2", "qkv", "o", "gate_up", "down", "split_qkv", "split_gu")

    def __init__(self, block: nn.Module):
        attn, mlp = block.self_attn, block.mlp
        self.norm1, self.norm2 = block.input_layernorm.weight, block.post_attention_layernorm.weight
        self.qkv = fuse([attn.q_proj, attn.k_proj, attn.v_proj])
        self.split_qkv = None if self.qkv is not None else (attn.q_proj, attn.k_proj, attn.v_proj)
        self.gate_up = fuse([mlp.gate_proj, mlp.up_proj])
        self.split_gu = None if self.gate_up is not None else (mlp.gate_proj, mlp.up_proj)
        self.o, self.down = attn.o_proj, mlp.down_proj


class FastPath:
    """The lean forward of one model (see the module docstring). Build with `for_model`."""

    def __init__(self, model: nn.Module):
        reason = unsupported(model)
        if reason is not None:
            raise ValueError(f"the lean forward does not cover this model: {reason}")
        config, inner = model.config, model.model
        self.model_ref = weakref.ref(model)
        self.embed = inner.embed_tokens.weight
        self.stamp = self._stamp(model)
        attn = inner.layers[0].self_attn
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = attn.head_dim
        self.scale = attn.scaling
        self.eps = inner.norm.variance_epsilon
        self.hidden = config.hidden_size
        self.intermediate = inner.layers[0].mlp.gate_proj.out_features
        self.layers = [_Layer(block) for block in inner.layers[:config.num_hidden_layers]]
        self.final_norm = inner.norm.weight
        self.lm_head = model.lm_head
        self.context = int(getattr(config, "max_position_embeddings", 0) or 2048)
        rotary = inner.rotary_emb
        self._inv_freq = rotary.inv_freq.detach().float()
        self._rope_scale = float(getattr(rotary, "attention_scaling", 1.0))
        self._tables(self.context)

    @staticmethod
    def _stamp(model: nn.Module) -> tuple:
        w = model.model.embed_tokens.weight
        return (w.data_ptr(), w.dtype, w.device)

    def _tables(self, positions: int) -> None:
        """cos and sin [positions, head_dim] as transformers computes them (float32, then the dtype);
        sin carries rotate_half's sign, so that rotation is x*cos + roll(x)*sin."""
        inv = self._inv_freq.to(self.embed.device)
        freqs = torch.arange(positions, device=inv.device).float()[:, None] * inv
        emb = torch.cat((freqs, freqs), dim=-1)
        half = self.head_dim // 2
        cos, sin = emb.cos() * self._rope_scale, emb.sin() * self._rope_scale
        self.cos = cos.to(self.embed.dtype)
        sin = sin.to(self.embed.dtype)
        self.sin = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)

    def linears(self) -> list[nn.Module]:
        """Every linear layer the pass calls (fused or not, the LM head included)."""
        out = []
        for layer in self.layers:
            out += [layer.qkv] if layer.qkv is not None else list(layer.split_qkv)
            out += [layer.gate_up] if layer.gate_up is not None else list(layer.split_gu)
            out += [layer.o, layer.down]
        return out + [self.lm_head]

    def new_cache(self, rows: int, need: int) -> StaticCache:
        return StaticCache.empty((len(self.layers), self.kv_heads, 0, self.head_dim), rows, _capacity(need + 1),
                                 self.embed.dtype, self.embed.device)

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return F.rms_norm(x, (self.hidden,), weight, self.eps)
        return weight * F.rms_norm(x.float(), (self.hidden,), eps=self.eps).to(x.dtype)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, cache: StaticCache,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """Run `ids` [rows, T] at `positions` [rows, T] after the cache's columns; `mask` [rows, T]
        (None: all real tokens) marks left padding. Appends T columns; returns the last position's
        logits [rows, vocab]."""
        rows, t = ids.shape
        start = cache.length
        end = start + t
        cache.ensure(end)
        if end > self.cos.shape[0]:
            self._tables(_capacity(end))
        if mask is None:
            cache.mask[:, start:end] = True
        else:
            cache.mask[:, start:end] = mask.bool()
            cache.padded = cache.padded or not bool(mask.bool().all())
        attn_mask = self._attention_mask(cache, start, end, t)
        heads, kv, hd = self.heads, self.kv_heads, self.head_dim
        groups = heads // kv
        cos, sin = self.cos[positions].unsqueeze(2), self.sin[positions].unsqueeze(2)  # [rows, T, 1, hd]
        x = F.embedding(ids, self.embed)
        for i, layer in enumerate(self.layers):
            h = self._norm(x, layer.norm1)
            if layer.qkv is not None:
                qkv = layer.qkv.forward(h).view(rows, t, heads + 2 * kv, hd)
                qk, v = qkv[:, :, :heads + kv], qkv[:, :, heads + kv:]
            else:
                q_, k_, v_ = (m.forward(h) for m in layer.split_qkv)
                qk = torch.cat([q_, k_], dim=-1).view(rows, t, heads + kv, hd)
                v = v_.view(rows, t, kv, hd)
            qk = qk * cos + qk.roll(hd // 2, -1) * sin
            q = qk[:, :, :heads].transpose(1, 2)
            keys, values = cache.keys[i], cache.values[i]
            keys[:, :, start:end] = qk[:, :, heads:].transpose(1, 2)
            values[:, :, start:end] = v.transpose(1, 2)
            k_all, v_all = keys[:, :, :end], values[:, :, :end]
            if t == 1:  # one query per row: the query heads of a key/value head become its queries
                out = F.scaled_dot_product_attention(q.reshape(rows, kv, groups, hd), k_all, v_all,
                                                     attn_mask=attn_mask, scale=self.scale)
            else:
                out = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=attn_mask, scale=self.scale,
                                                     is_causal=attn_mask is None, enable_gqa=groups > 1)
            out = out.reshape(rows, heads, t, hd).transpose(1, 2).reshape(rows, t, heads * hd)
            x = x + layer.o.forward(out)
            h = self._norm(x, layer.norm2)
            if layer.gate_up is not None:
                gate, up = layer.gate_up.forward(h).split(self.intermediate, dim=-1)
            else:
                gate, up = (m.forward(h) for m in layer.split_gu)
            x = x + layer.down.forward(F.silu(gate) * up)
        cache.length = end
        return self.lm_head.forward(self._norm(x[:, -1:], self.final_norm))[:, -1]

    @staticmethod
    def _attention_mask(cache: StaticCache, start: int, end: int, t: int) -> torch.Tensor | None:
        """None when no row is padded and the causal rule is SDPA's own (decode, or a prefill from an
        empty cache); else bool [rows, 1, T, end]: a column is seen when it holds a token of the row
        and is not in the future (and always the query's own, so that padding rows stay finite)."""
        if not cache.padded and (t == 1 or start == 0):
            return None
        seen = cache.mask[:, None, None, :end]
        if t == 1:
            return seen
        device = cache.mask.device
        cols = torch.arange(end, device=device)
        query = torch.arange(start, end, device=device)[:, None]
        return (seen & (cols <= query)) | (cols == query)


_built: "weakref.WeakKeyDictionary[nn.Module, FastPath]" = weakref.WeakKeyDictionary()


def for_model(model: nn.Module) -> FastPath | None:
    """The model's lean forward (built once, rebuilt after the model was moved or cast), or None when
    it is disabled (SEFTC_FASTPATH=0) or does not cover the model (`why_not` says why)."""
    if not enabled():
        return None
    built = _built.get(model)
    if built is not None and built.stamp == FastPath._stamp(model):
        return built
    if unsupported(model) is not None:
        return None
    fast = FastPath(model)
    _built[model] = fast
    return fast


def built(model: nn.Module) -> FastPath | None:
    """The lean forward built for `model` so far (by `for_model`), if any."""
    return _built.get(model)


def why_not(model: nn.Module) -> str | None:
    """Why `for_model` gives no lean forward for `model` (None when it does)."""
    if not enabled():
        return f"{ENV}=0"
    return unsupported(model)
