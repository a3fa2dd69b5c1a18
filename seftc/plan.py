"""`seftc plan`: the peak memory each command will need, from the model's config alone.

The model is built on the meta device (no weights read) to count its parameters: outside the
decoder blocks (embeddings, final norm, untied LM head), per block, and in the target linear
layers. Each command's peak is then a sum of named terms: what it holds throughout (the process
itself: Python + torch + transformers; the weights it keeps; gradients, optimizer state, SEFT slots
at 36 bytes each, masks), plus the largest of its *phases*, moments that never overlap: for the
streamed prune, tokenizing the calibration text (~336 bytes per token of the whole source, measured:
the fast tokenizer's encodings, the Python list, the int64 tensor), pruning one block (its weights,
the largest layer's working set, the calibration activations), or writing the LM head last; for a
repair rank under FSDP2, training (its shard of the weights plus the blocks FSDP2 gathers, the
activations) or the main rank's save (the whole weights gathered). Terms are estimates of the peak
resident set; the `bench-scale` benchmark prints them beside measured peaks.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any

from seftc.errors import SeftcError
from seftc.sizes import format_size, parse_size

RUNTIME_BYTES = 380 * 2**20  # a seftc process with torch, transformers, a tokenizer and a built model class (measured on CPU)
SEFT_SLOT_BYTES = 36  # δ, its gradient, two Adam moments, the step count (fp32), int32 position and birth, and during a
# statistics window one growth candidate per slot (int32 position, fp32 gradient sum; candidates 1.0). Before the slim
# state (issue 16) the candidate positions were int64: 40 bytes.
SEFT_SHARDED_SLOT_BYTES = 20  # of which FSDP2 shards δ, its gradient and the three optimizer tensors (the rest is replicated)
STATIC_ACTIVE_VALUES = 4  # static, per active weight: the value, its gradient and AdamW's two moments (all sharded by FSDP2),
# in the weights' dtype (--static-precision weights, the default) or fp32
TOKENIZE_BYTES_PER_TOKEN = 336  # transient while the calibration text is tokenized whole (measured: 294 MiB for 918 822 tokens)
PRUNE_METHODS = ("magnitude", "wanda", "sparsegpt")
REPAIR_METHODS = ("seft", "static", "lora-merge", "masked-lora", "seft-noregrow", "lora-dense")


@dataclass(frozen=True)
class ModelShape:
    model_type: str
    dtype: str
    dtype_bytes: int
    params: int
    outside_params: int  # embeddings, final norm, position tables, untied LM head
    head_params: int  # the untied LM head (0 when tied to the input embeddings)
    block_params: int  # the largest decoder block
    blocks: int
    target_params: int  # the linear layers inside the blocks
    block_target_params: int  # of the largest block
    block_targets: int  # linear layers per block
    max_target_numel: int
    max_in_features: int
    hidden: int
    intermediate: int
    vocab: int
    heads: int


def shape_of(model: Any) -> ModelShape:
    """Count a (meta-device) model."""
    import torch.nn as nn

    from seftc.models.targets import find_blocks, find_targets

    cfg = model.config
    stack, blocks = find_blocks(model)
    unique = {id(p): p for p in model.parameters()}
    params = sum(p.numel() for p in unique.values())
    per_block = [sum(p.numel() for p in b.parameters()) for b in blocks]
    targets = find_targets(model)
    by_block: dict[int, list[int]] = {}
    for t in targets:
        by_block.setdefault(t.block, []).append(t.module.weight.numel())
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    tied = head is None or embed is None or head.weight is embed.weight
    linears = [m for m in blocks[0].modules() if isinstance(m, nn.Linear)]
    hidden = int(getattr(cfg, "hidden_size", 0) or max(m.in_features for m in linears))
    intermediate = int(getattr(cfg, "intermediate_size", 0) or getattr(cfg, "ffn_dim", 0) or max(m.out_features for m in linears))
    return ModelShape(
        model_type=cfg.model_type, dtype=str(dtype).replace("torch.", ""), dtype_bytes=dtype.itemsize, params=params,
        outside_params=params - sum(per_block), head_params=0 if tied else head.weight.numel(), block_params=max(per_block), blocks=len(blocks),
        target_params=sum(t.module.weight.numel() for t in targets), block_target_params=max(sum(v) for v in by_block.values()),
        block_targets=max(len(v) for v in by_block.values()), max_target_numel=max(t.module.weight.numel() for t in targets),
        max_in_features=max(t.module.in_features for t in targets), hidden=hidden, intermediate=intermediate,
        vocab=int(getattr(cfg, "vocab_size", 0)), heads=int(getattr(cfg, "num_attention_heads", 1)),
    )


def model_shape(spec: str | os.PathLike, dtype: str = "auto", trust_remote_code: bool = False) -> tuple[ModelShape, str]:
    """The shape of MODEL, and its kind ('folder', 'safetensors', 'gguf', 'default'), without reading weights."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from seftc.models.loading import _torch_dtype, resolve_model

    ref = resolve_model(spec, trust_remote_code=trust_remote_code)
    try:
        if ref.kind == "gguf":
            config = AutoConfig.from_pretrained(str(ref.path.parent), gguf_file=ref.path.name)
        else:
            config = AutoConfig.from_pretrained(str(ref.folder), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        raise SeftcError(f"cannot read the config of {ref.spec}: {str(e).splitlines()[0][:200]}") from None
    fallback = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    torch_dtype = _torch_dtype(dtype, fallback if ref.kind != "gguf" else None)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    return shape_of(model), ref.kind


def pruned_sparsity(spec: str | os.PathLike, default: float = 0.5) -> float:
    """The sparsity of a model written by `seftc prune` (its manifest), else `default`: what
    static's state (per active weight) is planned for."""
    from seftc.models.loading import resolve_model
    from seftc.models.manifest import Manifest

    ref = resolve_model(spec)
    manifest = Manifest.load(ref.folder) if ref.kind in ("folder", "safetensors") else None
    return manifest.sparsity if manifest is not None and manifest.layers else default


@dataclass
class Plan:
    command: str
    method: str | None
    terms: dict[str, int] = field(default_factory=dict)  # held throughout the run
    phases: dict[str, dict[str, int]] = field(default_factory=dict)  # moments that never overlap: the largest adds to `terms`
    notes: list[str] = field(default_factory=list)
    per_rank: bool = False

    @property
    def peak_phase(self) -> str | None:
        return max(self.phases, key=lambda k: sum(self.phases[k].values())) if self.phases else None

    def peak_terms(self) -> dict[str, int]:
        """The terms of the peak: those held throughout and the largest phase's."""
        return {**self.terms, **(self.phases[self.peak_phase] if self.phases else {})}

    @property
    def total(self) -> int:
        return sum(self.peak_terms().values())

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "terms": self.peak_terms(), "held": dict(self.terms), "peak_phase": self.peak_phase, "total": self.total}

    def line(self) -> str:
        parts = " + ".join(f"{k} {format_size(v)}" for k, v in self.peak_terms().items() if v)
        when = f", while {self.peak_phase}" if self.peak_phase else ""
        return f"{self.command}{' ' + self.method if self.method else ''}: {format_size(self.total)} ({parts}{when})"


def _layer_work(s: ModelShape, method: str, sparsity: float, nm: bool) -> int:
    """Transient bytes while one layer's mask is chosen and applied (the largest layer)."""
    n, d = s.max_target_numel, s.dtype_bytes
    dropped = 0.5 if nm else sparsity
    select = 4 + 12 * dropped + 1  # fp32 scores, top-k values + int64 indices, bool mask
    if method == "sparsegpt":
        return int(n * (3 * 4 + 1 + 2 * d) + 5 * s.max_in_features**2 * 4)  # fp32 copies of W; H, its damped copy, Cholesky, inverse
    return int(n * (select + 2 * d))  # + the pruned weight and its zeros


def _block_activations(s: ModelShape, tokens: int, chunk_tokens: int, seqlen: int) -> int:
    """Calibration activations: every sample's input and output of the current block, plus one
    chunk's transients inside the block (attention, MLP, the fp32 statistics input)."""
    d = s.dtype_bytes
    kept = 2 * tokens * s.hidden * d
    inside = chunk_tokens * (4 * s.hidden * d + 3 * s.intermediate * d + 2 * max(s.hidden, s.intermediate) * 4)
    scores = (chunk_tokens // max(seqlen, 1)) * s.heads * seqlen * seqlen * 4 * 2
    return kept + inside + scores


def plan_prune(s: ModelShape, method: str = "wanda", *, nsamples: int = 128, seqlen: int = 512, batch_size: int | None = None,
               sparsity: float = 0.5, nm: bool = False, streamed: bool = True, gguf: bool = False,
               calib_tokens: int | None = None) -> Plan:
    """`calib_tokens`: the tokens of the whole calibration text (it is tokenized at once, then
    sampled); None leaves that phase out."""
    p = Plan("prune", method)
    d = s.dtype_bytes
    p.terms["runtime"] = RUNTIME_BYTES
    block: dict[str, int] = {}
    if streamed and not gguf:
        p.terms["weights (outside blocks, but the LM head)"] = (s.outside_params - s.head_params) * d
        block["weights (one block)"] = s.block_params * d
        if s.head_params:  # read and written last, once every block is freed
            p.phases["writing the LM head"] = {"weights (LM head)": s.head_params * d}
        p.notes.append("streamed: one decoder block in memory at a time")
    else:
        p.terms["weights"] = s.params * d
        if gguf:
            p.terms["GGUF dequantization"] = s.params * 4
            p.notes.append("a GGUF file is dequantized whole by transformers, then rebuilt")
    block["layer working set"] = _layer_work(s, method, sparsity, nm)
    if method == "sparsegpt" and batch_size:
        block["statistics (block Hessians)"] = s.block_targets * s.max_in_features**2 * 4
    if method != "magnitude":
        tokens = nsamples * seqlen
        block["activations"] = _block_activations(s, tokens, (batch_size or nsamples) * seqlen, seqlen)
        if calib_tokens:
            p.phases["tokenizing the calibration text"] = {"calibration text tokenized": calib_tokens * TOKENIZE_BYTES_PER_TOKEN}
    p.phases["pruning a block"] = block
    return p


def calibration_tokens(spec: str | os.PathLike, source: str | None = None, trust_remote_code: bool = False) -> int | None:
    """The tokens of the calibration text `source` (default: prune's) under MODEL's tokenizer,
    counted by tokenizing it (no weights read); None when the model has no tokenizer."""
    from seftc.data.calibration import tokenize_text
    from seftc.data.corpus import DEFAULT_CALIB, load_text
    from seftc.models.loading import load_tokenizer, resolve_model

    ref = resolve_model(spec, trust_remote_code=trust_remote_code)
    tokenizer = load_tokenizer(ref.folder, trust_remote_code) if ref.kind != "gguf" else None
    if tokenizer is None:
        return None
    return int(tokenize_text(tokenizer, load_text(source or DEFAULT_CALIB).text).numel())


def _training_activations(s: ModelShape, batch: int, seqlen: int, checkpointing: bool) -> int:
    d = s.dtype_bytes
    tokens = batch * seqlen
    per_layer = tokens * (18 * s.hidden + 4 * s.intermediate) * d  # what autograd keeps for backward (SDPA attention)
    logits = tokens * s.vocab * 4 * 3  # fp32 logits, log-softmax and its gradient
    if checkpointing:
        return s.blocks * tokens * s.hidden * d + per_layer + logits
    return s.blocks * per_layer + logits


def _packed(positions: int) -> int:
    """Bytes of a mask held as packed bits (prune.masks.PackedMask)."""
    return (positions + 7) // 8


def plan_repair(s: ModelShape, method: str = "seft", *, batch_size: int = 4, seqlen: int = 256, density: float | None = None,
                lora_r: int = 8, grad_checkpointing: bool = False, nproc: int = 1, fsdp: bool = False, sparsity: float = 0.5,
                static_precision: str = "weights", evict_score: str | None = None, grow_candidates: str | None = None) -> Plan:
    """`sparsity`: the pruned input's (static's state is per active weight); `density`, `evict_score`,
    `grow_candidates`: SEFT's (default: repair's own defaults); evict_score window/fisher and
    grow_candidates window hold window statistics (bf16, per active weight and per weight)."""
    if method not in REPAIR_METHODS:
        raise SeftcError(f"unknown repair method {method!r}; choose one of {', '.join(REPAIR_METHODS)}")
    from seftc.repair.config import RepairConfig

    default = lambda name: RepairConfig.model_fields[name].default  # noqa: E731  what `seftc repair` does by default
    density = default("density") if density is None else density
    evict_score = default("evict_score") if evict_score is None else evict_score
    grow_candidates = default("grow_candidates") if grow_candidates is None else grow_candidates
    p = Plan("repair", method, per_rank=nproc > 1)
    d = s.dtype_bytes
    sharded = fsdp and nproc > 1
    shard = nproc if sharded else 1
    p.terms["runtime"] = RUNTIME_BYTES
    training: dict[str, int] = {}
    if sharded:  # each rank reads one block whole at a time and keeps its shard (repair/onload.py)
        p.terms["weights (this rank's shard)"] = s.params * d // nproc
        training["weights (blocks FSDP2 gathers)"] = 2 * s.block_params * d  # the block computing and the one prefetched
        p.phases["saving (the main rank gathers the whole weights)"] = {
            "weights (gathered for the save)": s.params * d - s.params * d // nproc,
            "merge (one layer, fp32)": s.max_target_numel * 4 * 2}
    else:
        p.terms["weights"] = s.params * d
    if method.startswith("seft"):
        p.terms["masks"] = 2 * _packed(s.target_params)  # packed bits: the input's and the layer's
        slots = int(density * s.target_params)
        p.terms["SEFT slots"] = slots * SEFT_SHARDED_SLOT_BYTES // shard + slots * (SEFT_SLOT_BYTES - SEFT_SHARDED_SLOT_BYTES)
        training["dense gradient (one layer)"] = s.max_target_numel * 4 * 3
        if evict_score in ("window", "fisher"):  # Σ over the accumulation window, at the active positions
            p.terms["eviction statistics"] = int(s.target_params * (1 - sparsity)) * 2
        if grow_candidates == "window":
            p.terms["growth statistics"] = s.target_params * 2
    elif method == "static":  # the dense target weights are freed for fp32 values of the active ones (the master copy on a half base)
        active = int(s.target_params * (1 - sparsity))
        v = 4 if static_precision == "fp32" else d  # bytes of one value
        if sharded:  # the shard of the other weights and of the values
            p.terms["weights (this rank's shard)"] = ((s.params - s.target_params) * d + active * v) // nproc
        else:  # the load (the dense targets' pages are released after the swap), or the other weights copied out of the map + the values
            p.terms["weights"] = max(s.params * d, 2 * (s.params - s.target_params) * d + active * v)
        p.terms["masks"] = _packed(s.target_params)
        p.terms["gradients"] = active * v // shard
        p.terms["optimizer state"] = active * (STATIC_ACTIVE_VALUES - 2) * v // shard  # AdamW's two moments, active weights only
        training["dense gradient (one layer)"] = s.max_target_numel * (v + d + 1)  # the gradient, the weight, the unpacked mask
    else:  # LoRA: r × (in + out) per target layer
        lora = lora_r * s.blocks * s.block_targets * 2 * s.hidden  # approximation: in + out ≈ 2 × hidden
        p.terms["adapters + grads + optimizer"] = lora * 4 * 4 // shard
        if method == "masked-lora":
            p.terms["masks"] = _packed(s.target_params)
            # the masked update s·B·A is rebuilt per layer in its forward and backward (not kept between them):
            # two fp32 temporaries, the unpacked mask and the copy in the weights' dtype
            training["dense update (one layer)"] = s.max_target_numel * (2 * 4 + 1 + d)
        if method in ("lora-merge", "masked-lora"):
            p.terms["merge (one layer)"] = s.max_target_numel * (4 + d)
    training["activations"] = _training_activations(s, max(1, batch_size // nproc), seqlen, grad_checkpointing)
    if sharded:
        p.phases["training"] = training
    else:
        p.terms.update(training)
    if nproc > 1:
        p.notes.append(f"per rank, {nproc} ranks ({'FSDP2 shards the weights, the trained state and its optimizer state; each rank reads one block whole at a time' if fsdp else 'each a full replica'})")
    return p


def plan_eval(s: ModelShape, *, batch_size: int = 4, seqlen: int = 512) -> Plan:
    p = Plan("eval", None)
    d = s.dtype_bytes
    tokens = batch_size * seqlen
    p.terms["runtime"] = RUNTIME_BYTES
    p.terms["weights"] = s.params * d
    p.terms["activations"] = tokens * (6 * s.hidden + 3 * s.intermediate) * d + tokens * s.vocab * 4 * 3
    return p


def plan_pack(s: ModelShape) -> Plan:
    p = Plan("pack", None)
    p.terms["runtime"] = RUNTIME_BYTES
    biggest = max(s.max_target_numel, s.vocab * s.hidden)
    p.terms["one tensor and its encodings"] = biggest * (2 * s.dtype_bytes + 10)
    return p


def plan_bench(s: ModelShape, *, batch: int = 16, prompt_tokens: int = 64, sparsity: float = 0.5) -> Plan:
    p = Plan("bench", None)
    d = s.dtype_bytes
    p.terms["runtime"] = RUNTIME_BYTES
    p.terms["dense weights"] = s.params * d
    p.terms["sparse weights"] = (s.params - s.target_params) * d + int(s.target_params * ((1 - sparsity) * d + 1 / 8))
    tokens = batch * prompt_tokens
    p.terms["activations + KV cache"] = tokens * (6 * s.hidden + 3 * s.intermediate) * d + tokens * s.vocab * 4 + 2 * s.blocks * tokens * s.hidden * d
    return p


def plan_all(s: ModelShape, *, method: str | None = None, batch_size: int | None = None, seqlen: int | None = None,
             nsamples: int = 128, nproc: int = 1, fsdp: bool = False, gguf: bool = False, sparsity: float = 0.5,
             calib_tokens: int | None = None) -> list[Plan]:
    if method is not None and method not in PRUNE_METHODS + REPAIR_METHODS:
        raise SeftcError(f"unknown method {method!r}; choose a prune method ({', '.join(PRUNE_METHODS)}) or a repair method ({', '.join(REPAIR_METHODS)})")
    prune_methods = [method] if method in PRUNE_METHODS else (["wanda", "sparsegpt"] if method is None else [])
    repair_methods = [method] if method in REPAIR_METHODS else (["seft", "static", "lora-merge"] if method is None else [])
    plans = [plan_prune(s, m, nsamples=nsamples, seqlen=seqlen or 512, batch_size=batch_size, gguf=gguf, calib_tokens=calib_tokens)
             for m in prune_methods]
    plans += [plan_repair(s, m, batch_size=batch_size or 4, seqlen=seqlen or 256, nproc=nproc, fsdp=fsdp, sparsity=sparsity)
              for m in repair_methods]
    plans += [plan_pack(s), plan_eval(s, batch_size=batch_size or 4, seqlen=seqlen or 512), plan_bench(s)]
    return plans


def check_fits(plan: Plan, max_memory: int | str) -> None:
    """Refuse (SeftcError) a run whose planned peak exceeds `max_memory`."""
    limit = parse_size(max_memory, "--max-memory")
    if plan.total > limit:
        biggest = sorted(plan.peak_terms().items(), key=lambda kv: -kv[1])[:3]
        raise SeftcError(
            f"{plan.command} would need about {format_size(plan.total)} (" + ", ".join(f"{k} {format_size(v)}" for k, v in biggest)
            + f"), more than --max-memory {format_size(limit)}; lower --nsamples/--seqlen/--batch-size, or see `seftc plan`"
        )
