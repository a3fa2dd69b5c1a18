"""`seftc.repair`: recover a pruned model's quality while keeping its sparsity.

One loop trains every method (see methods.py) on the same data and step budget: windows of
`seqlen` tokens drawn per step from a seeded generator, `batch_size` sequences per step split into
`grad_accum` micro-batches (and across ranks under torchrun: DDP replicas, or FSDP2 shards with
--fsdp, see distributed.py), on `--device` (CUDA when available; cuda:LOCAL_RANK per rank), AdamW with linear warm-up then a
cosine decay to 10% of the learning rate, no dropout (the model stays in eval mode, so a resumed
run repeats an uninterrupted one exactly), held-out loss every `eval_every` steps.
"""
from __future__ import annotations

import math
import os
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from seftc import memory
from seftc.data.calibration import CalibConfig
from seftc.errors import SeftcError
from seftc.eval.multiple_choice import max_length
from seftc.formats.shards import DEFAULT_MAX_SHARD_SIZE
from seftc.models.loading import LoadedModel, load_model, load_tokenizer, resolve_model
from seftc.models.manifest import LayerRecord, Manifest, load_masks, tool_versions
from seftc.models.saving import check_output, save_model, writes_outputs
from seftc.models.streaming import NotStreamable, StreamingModel
from seftc.models.targets import Target, find_blocks, find_targets
from seftc.prune.masks import PackedMask, mask_checksum, nm_holds, parse_pattern
from seftc.progress import NO_PROGRESS, ProgressSink
from seftc.repair import checkpoint, distributed, onload
from seftc.repair.config import RepairConfig, loss_warnings, make_repair_config
from seftc.repair.data import TokenWindows
from seftc.repair.importance import input_sq_norms
from seftc.repair.methods import make_method
from seftc.sizes import parse_size

@dataclass
class RepairResult:
    loaded: LoadedModel
    manifest: Manifest | None  # None on the ranks other than the main one
    history: dict[str, list]
    output: Path | None
    masks: dict[str, PackedMask] = field(default_factory=dict)


def lr_at(step: int, cfg: RepairConfig) -> float:
    """The learning rate of `step`, the same schedule for every method: linear warm-up over
    `warmup` steps, then `lr_schedule` (cosine or linear decay to `lr_min_ratio` × lr at the last
    step, or constant)."""
    base = cfg.learning_rate
    if step < cfg.warmup:
        return base * (step + 1) / cfg.warmup
    if cfg.lr_schedule == "constant":
        return base
    span = max(cfg.steps - cfg.warmup, 1)
    progress = (step - cfg.warmup) / span
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.lr_schedule == "cosine" else 1 - progress
    return base * (cfg.lr_min_ratio + (1 - cfg.lr_min_ratio) * shape)


def _pruned_state(loaded: LoadedModel, allow_dense: bool = False) -> tuple[Manifest, list[Target], Callable[[Target], PackedMask]]:
    """The prune manifest, the targets it names, and `check(target)`: the target's mask (packed
    bits), verified against the manifest's checksum and the weight, which must be real by then
    (the FSDP2 loader checks each block's targets as it reads them)."""
    manifest = Manifest.load(loaded.ref.folder) if loaded.ref.kind in ("folder", "safetensors") else None
    if manifest is None:
        raise SeftcError(f"{loaded.ref.spec} has no seftc_manifest.json; repair needs a model written by `seftc prune`")
    if not manifest.layers or (manifest.sparsity <= 0 and not allow_dense):
        raise SeftcError(f"{loaded.ref.spec} has no sparsity to keep (manifest sparsity {manifest.sparsity}); prune it first")
    names = {rec.name for rec in manifest.layers}
    targets = [t for t in find_targets(loaded.model, ["*"], []) if t.name in names]
    if len(targets) != len(names):
        raise SeftcError(f"{loaded.ref.spec}: the manifest names layers this model does not have")
    saved = load_masks(loaded.ref.folder, packed=True)  # packed bits: 1/8 of a bool tensor per layer, for the whole run
    by_name = {rec.name: rec for rec in manifest.layers}

    def check(t: Target) -> PackedMask:
        w = t.module.weight.data
        packed = saved.get(t.name) if saved is not None else PackedMask.pack(w != 0)
        if packed is None or tuple(packed.shape) != tuple(w.shape) or mask_checksum(packed) != by_name[t.name].mask_sha256:
            raise SeftcError(f"{t.name}: the mask does not match the manifest's checksum; the model was changed after pruning")
        if bool((w[~packed.unpack()] != 0).any()):
            raise SeftcError(f"{t.name}: weights are non-zero outside the mask; the model was changed after pruning")
        return packed

    return manifest, targets, check


def _open(model: str | os.PathLike | LoadedModel, ref, dist: distributed.Dist, trust_remote_code: bool) -> tuple[LoadedModel, StreamingModel | None]:
    """The model: under FSDP2 a meta skeleton whose blocks onload.build_sharded reads one at a
    time (a checkpoint that cannot be streamed, e.g. GGUF, is loaded whole); else loaded whole."""
    if isinstance(model, LoadedModel):
        return model, None
    if dist.sharded and ref.kind in ("folder", "safetensors"):
        try:
            stream = StreamingModel(ref, trust_remote_code=trust_remote_code)
            return LoadedModel(stream.model, load_tokenizer(ref.folder, trust_remote_code), ref), stream
        except NotStreamable:
            pass
    return load_model(ref, trust_remote_code=trust_remote_code), None


def _eval_loss(model, windows: torch.Tensor, batch: int, device: torch.device) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for chunk in windows.split(batch):
            chunk = chunk.to(device)
            out = model(input_ids=chunk, labels=chunk)
            n = chunk.numel() - chunk.shape[0]
            total += float(out.loss) * n
            count += n
    return total / max(count, 1)


def _finite(params: list[torch.Tensor], reduce) -> bool:
    """Whether every trainable value is finite: on each rank's part (FSDP2 shards), agreed by all."""
    bad = torch.zeros((), dtype=torch.float32, device=params[0].device if params else "cpu")
    for p in params:
        bad += (~torch.isfinite(distributed.local_part(p).flat)).sum()
    return float(reduce(bad) if reduce else bad) == 0


def _reprune(source_manifest: Manifest, loaded: LoadedModel, cfg: RepairConfig):
    """lora-merge: Wanda back to each layer's target, calibrated as the input was."""

    def reprune(model) -> dict[str, torch.Tensor]:
        from seftc.prune.api import prune

        calib = dict(source_manifest.calibration or {})
        calib_cfg = {k: calib[k] for k in ("source", "nsamples", "seqlen", "seed") if k in calib} or {"source": cfg.data}
        names = [rec.name for rec in source_manifest.layers]
        sparsity = {rec.name: rec.target_sparsity for rec in source_manifest.layers}
        result = prune(LoadedModel(distributed.unwrapped(model), loaded.tokenizer, loaded.ref), method="wanda", pattern=source_manifest.pattern,
                       sparsity=None if parse_pattern(source_manifest.pattern).is_nm else source_manifest.target_sparsity,
                       include=names, ignore=[], calib=calib_cfg, layer_sparsity=sparsity)
        return result.masks

    return reprune


def _importance_calib(source: Manifest, cfg: RepairConfig) -> CalibConfig:
    """The importance pass reads `importance_windows` windows of the text the model was pruned
    with (the prune manifest's calibration source; the training text when it names none)."""
    calib = source.calibration or {}
    return CalibConfig(source=calib.get("source", cfg.data), nsamples=cfg.importance_windows, seqlen=cfg.seqlen,
                       seed=calib.get("seed", cfg.seed))


def _damage_windows(tokenizer, cfg: RepairConfig) -> dict[str, torch.Tensor]:
    """The fixed held-out batches of the eviction-damage log: in-domain (eval_data) and, if given,
    out-of-domain (ood_data); empty when the log is off."""
    if not cfg.damage_windows:
        return {}
    sources = {"in": cfg.eval_data, **({"out": cfg.ood_data} if cfg.ood_data else {})}
    return {k: TokenWindows.from_source(tokenizer, src, cfg.seqlen, cfg.seed).fixed(cfg.damage_windows) for k, src in sources.items()}


@writes_outputs
def repair(
    model: str | os.PathLike | LoadedModel,
    config: RepairConfig | None = None,
    *,
    output: str | os.PathLike | None = None,
    force: bool = False,
    resume: bool = False,
    checkpoint_dir: str | os.PathLike | None = None,
    progress: ProgressSink = NO_PROGRESS,
    stop_after: int | None = None,
    allow_dense: bool = False,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    trust_remote_code: bool = False,
    device: str | None = None,
    fsdp: bool = False,
    **overrides: Any,
) -> RepairResult:
    """Repair a pruned model (a folder written by `seftc prune`) and save it to `output` (weights,
    and the checkpoints' state, in shards of at most `max_shard_size`), computing on `device` (cpu or cuda; default CUDA when
    available). Under torchrun each rank trains a DDP replica, or with `fsdp` an FSDP2 shard of the
    base, the trainable tensors and their optimizer state; on one process `fsdp` changes nothing.

    `allow_dense=True` accepts a 0%-sparsity manifest: the benchmark's reference row (the dense
    model trained with the same data and budget, to tell repair from domain adaptation)."""
    cfg = make_repair_config(**{**(config.model_dump() if config else {}), **overrides})
    shard_bytes = parse_size(max_shard_size, "--max-shard-size")
    start_time = time.perf_counter()
    dist = distributed.setup(device, fsdp)
    out = Path(output) if output is not None else None
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else checkpoint.default_dir(out) if out is not None else None
    if resume and ckpt is None:
        raise SeftcError("--resume needs an output (its checkpoint folder is OUT.checkpoint)")
    ref = model.ref if isinstance(model, LoadedModel) else resolve_model(model, trust_remote_code=trust_remote_code)
    if out is not None and dist.is_main and not isinstance(model, LoadedModel):
        check_output(out, force, (ref.path,))
    ckpts = None
    if ckpt is not None:
        checkpoint.check_paths(ckpt, (ref.path,), out)
        ckpts = checkpoint.Checkpoints.open(ckpt, resume=resume, writing=bool(cfg.checkpoint_every) and dist.is_main, force=force)
    loaded, stream = _open(model, ref, dist, trust_remote_code)
    if loaded.tokenizer is None:
        raise SeftcError(f"{loaded.ref.spec} has no tokenizer; repair needs one to read its training text")
    context = max_length(loaded.model, loaded.tokenizer)
    if cfg.seqlen > context:  # capped at the model's context, as prune caps calibration samples
        cfg = cfg.model_copy(update={"seqlen": context})
    if cfg.batch_size % (dist.world * cfg.grad_accum):
        raise SeftcError(f"batch size {cfg.batch_size} must be divisible by ranks × grad_accum = {dist.world * cfg.grad_accum}")
    source_manifest, targets, check = _pruned_state(loaded, allow_dense)
    bind = ckpts is not None and (resume or cfg.checkpoint_every)
    pattern = parse_pattern(source_manifest.pattern)
    train = TokenWindows.from_source(loaded.tokenizer, cfg.data, cfg.seqlen, cfg.seed)
    held_out = TokenWindows.from_source(loaded.tokenizer, cfg.eval_data, cfg.seqlen, cfg.seed).fixed(cfg.eval_windows)

    model_ = loaded.model if stream is not None else loaded.model.to(dist.device)
    model_.eval()
    if cfg.grad_checkpointing:
        model_.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    blocks = list(find_blocks(model_)[1])  # FSDP2's units (found before SEFT replaces their nn.Linear layers)
    method = make_method(cfg, pattern, dist.mean(), _reprune(source_manifest, loaded, cfg))
    names = [t.name for t in targets]
    if stream is None:
        masks = {t.name: check(t) for t in targets}
        digest = checkpoint.weights_digest(model_) if bind else None  # of the input, before the method changes it
        method.attach(model_, targets, masks)
    else:  # per rank: one block whole at a time, then its shard
        masks, digests = onload.build_sharded(stream, dist, method, targets, check)
        digest = checkpoint.weights_digest(digests) if bind else None
    del targets  # a replaced nn.Linear would keep its whole weight alive (past FSDP2's sharding)
    if bind:
        input_masks = {rec.name: rec.mask_sha256 for rec in source_manifest.layers}
        ckpts.bind(checkpoint.identity(input_masks, digest, cfg.model_dump()))
    if cfg.grad_checkpointing:
        model_.enable_input_require_grads()
    engine = dist.wrap(model_, blocks)  # what training calls: model_, a DDP replica, or FSDP2-sharded
    method.start()
    params = method.trainable()

    history: dict[str, list] = {"train_loss": [], "eval_loss": [], "regrown": [], "lr": [], "updates": [], "update_damage": []}
    start = 0
    if resume:
        start, loaded_history = ckpts.restore(method, cfg.steps)
        history.update(loaded_history)
    elif method.needs_importance:  # on the pruned model, before any training (checkpointed with the state)
        method.set_importance(input_sq_norms(model_, loaded.tokenizer, {n: model_.get_submodule(n) for n in names},
                                             _importance_calib(source_manifest, cfg)))
    damage_sets = _damage_windows(loaded.tokenizer, cfg)

    n_micro = cfg.grad_accum
    local_batch = cfg.batch_size // dist.world
    advance = progress.task(f"repair ({cfg.method})", cfg.steps)
    advance(start)
    evaluate = lambda windows: _eval_loss(model_, windows, local_batch, dist.device)  # noqa: E731  (every rank alike)
    if start == 0 and cfg.eval_every:
        history["eval_loss"].append([0, evaluate(held_out)])
    tokens_seen, t0 = 0, time.perf_counter()
    last_regrown = history["regrown"][-1][1] if history["regrown"] else None
    for step in range(start, cfg.steps):
        ids = train.batch(step, cfg.batch_size)[dist.rank :: dist.world].to(dist.device)
        method.begin_step(step, n_micro)
        loss_sum = torch.zeros((), device=dist.device)
        for micro, chunk in enumerate(ids.chunk(n_micro)):
            method.begin_micro(micro)
            with dist.accumulating(engine, last=micro == n_micro - 1):  # the engine averages gradients on the last
                loss = engine(input_ids=chunk, labels=chunk).loss / n_micro
                loss.backward()
            loss_sum += loss.detach()
        reduce = dist.mean()
        loss_value = float(reduce(loss_sum) if reduce else loss_sum)
        lr = lr_at(step, cfg)
        diverged = "the loss is " + str(loss_value) if not math.isfinite(loss_value) else None
        if diverged is None:
            method.optimizer_step(lr)
            if not _finite(params, reduce):
                diverged = "the weights are no longer finite"
        if diverged:
            if ckpts is not None and not ckpts.resumed and dist.is_main:
                ckpts.remove()  # this run's own checkpoints lead back here
            raise SeftcError(f"training diverged at step {step + 1}: {diverged}; lower --lr (now {lr:g}); nothing was saved")
        before = {k: evaluate(w) for k, w in damage_sets.items()} if damage_sets and method.has_pending() else None
        info = method.after_step(step)
        memory.release()  # the step's activations and gathered blocks, freed: their pages back to the system
        history["train_loss"].append([step + 1, loss_value])
        history["lr"].append([step + 1, lr])
        damage = None
        if info.get("regrown") is not None:
            history["regrown"].append([step + 1, info["regrown"]])
            history["updates"].append({"step": step + 1, **info})
            last_regrown = info["regrown"]
        if before is not None:
            after = {k: evaluate(w) for k, w in damage_sets.items()}
            history["update_damage"].append({"step": step + 1, **{f"{k}_{when}": v[k] for when, v in (("before", before), ("after", after)) for k in v}})
            damage = {f"damage_{k}": after[k] - before[k] for k in before}
        tokens_seen += ids.numel() * dist.world
        if cfg.eval_every and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps):
            history["eval_loss"].append([step + 1, evaluate(held_out)])
        if hasattr(progress, "status"):
            progress.status(step=step + 1, loss=loss_value, tokens_per_s=tokens_seen / (time.perf_counter() - t0), regrown=last_regrown,
                            **(damage or {}))
        advance(1)
        if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps and ckpts is not None:
            state = method.state_items()  # on every rank: FSDP2 shards are gathered, per-rank sums averaged
            if dist.is_main:
                ckpts.save(step + 1, ((k, t.to("cpu")) for k, t in state), history, method.meta(), shard_bytes)
            else:
                for _ in state:  # the gathers the main rank's save runs, one tensor at a time
                    pass
            dist.barrier()
        if stop_after is not None and step + 1 >= stop_after:
            break

    loop_s = time.perf_counter() - t0
    seconds = time.perf_counter() - start_time
    stats = method.stats()
    trainable = sum(p.numel() for p in params)
    whole = dist.is_main or method.needs_whole_model  # the ranks that need the merged weights
    if dist.sharded:
        distributed.gather_full_model(model_, keep=whole)
        memory.release()
    final_masks = method.finalize(model_, masks, whole=whole)
    del engine, params
    memory.release()
    if cfg.grad_checkpointing and whole:
        model_.gradient_checkpointing_disable()
    ranks = dist.gather([mask_checksum(final_masks[n]) for n in names])
    if not all(r == ranks[0] for r in ranks):
        raise RuntimeError("ranks took different topology decisions")
    if not dist.is_main:
        dist.barrier()
        return RepairResult(loaded, None, history, None, final_masks)
    manifest = _manifest(loaded, source_manifest, cfg, targets_names=names, masks=masks, stats=stats,
                         history=history, seconds=seconds, dist=dist, final_masks=final_masks)
    manifest.config["trainable_params"] = trainable
    manifest.config["s_per_step"] = loop_s / max(cfg.steps - start, 1)  # training loop only (no load, save, final eval)
    manifest.config["ranks"] = dist.world
    manifest.config["fsdp"] = dist.sharded
    manifest.config["ranks_agree"] = True
    manifest.config["warnings"] = loss_warnings(history["train_loss"], cfg.learning_rate)
    saved = None
    if out is not None:
        saved = save_model(model_, loaded.tokenizer, out, {"seftc_manifest.json": manifest.to_json()}, masks=final_masks,
                           max_shard_size=max_shard_size)
        if ckpts is not None and checkpoint_dir is None:
            ckpts.remove()  # only if it carries this run's marker: never the input, never a user's folder
    dist.barrier()
    return RepairResult(loaded, manifest, history, saved, final_masks)


def _manifest(loaded, source: Manifest, cfg: RepairConfig, targets_names, masks, stats, history, seconds, dist, final_masks) -> Manifest:
    modules = dict(loaded.model.named_modules())
    pattern = parse_pattern(source.pattern)
    records, layer_stats = [], {}
    before = {rec.name: rec for rec in source.layers}
    for name in targets_names:
        w = modules[name].weight.data
        nonzero = int(torch.count_nonzero(w))
        records.append(LayerRecord(
            name=name, shape=list(w.shape), target_sparsity=before[name].target_sparsity, nonzero=nonzero,
            sparsity=1 - nonzero / w.numel(),
            pattern=str(pattern) if pattern.is_nm and nm_holds(w, pattern) else "unstructured",
            mask_sha256=mask_checksum(final_masks[name]),
        ))
        moved = int((masks[name].unpack() & ~final_masks[name].to("cpu").unpack()).sum())
        layer_stats[name] = {"sparsity_before": before[name].sparsity, "sparsity_after": records[-1].sparsity,
                             "positions_left": moved, **stats.get(name, {})}
    total = sum(r.shape[0] * r.shape[1] for r in records)
    nonzero = sum(r.nonzero for r in records)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    config = {**cfg.model_dump(), "learning_rate": cfg.learning_rate, "peak_rss_mib": peak}
    prior = {k: getattr(source, k) for k in ("stage", "method", "pattern", "target_sparsity", "sparsity", "calibration", "config")}
    return Manifest(
        stage="repair", method=cfg.method, pattern=source.pattern, target_sparsity=source.target_sparsity,
        sparsity=1 - nonzero / total, layers=records, calibration=source.calibration, config=config,
        source_model=loaded.ref.spec, seed=cfg.seed, versions=tool_versions(), history=source.history + [prior],
        layer_stats=layer_stats, elapsed_s=seconds, training=history,
    )


def interrupted_message(output: str | os.PathLike) -> str:
    """What an interrupted repair kept: its latest checkpoint, if --checkpoint-every wrote one."""
    latest = checkpoint.latest_step(checkpoint.default_dir(Path(output)))
    if latest is None:
        return f"interrupted; nothing was written to {output} (pass --checkpoint-every N to keep resumable checkpoints)"
    return f"interrupted; {output} was not written, but checkpoint {latest} was kept: add --resume to continue from it"
