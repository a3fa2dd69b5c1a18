"""`seftc.prune`: one-shot pruning of a causal LM, end to end."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from seftc.data.calibration import calibration_samples
from seftc.errors import SeftcError
from seftc.device import resolve_device
from seftc.formats.shards import DEFAULT_MAX_SHARD_SIZE, ShardedWriter
from seftc.models.loading import LoadedModel, load_model, load_tokenizer, resolve_model
from seftc.models.manifest import MANIFEST_NAME, LayerRecord, Manifest, MaskWriter, tool_versions
from seftc.models.saving import atomic_folder, check_output, save_model, write_config, writes_outputs
from seftc.models.streaming import NotStreamable, StreamingModel
from seftc.models.targets import Target, find_blocks, find_targets
from seftc.prune import owl
from seftc.prune.config import PruneConfig, make_config
from seftc.prune.masks import Pattern, mask_checksum, nm_holds, prune_count
from seftc.prune.methods import PRUNERS, MethodOptions
from seftc.prune.sequential import run_blocks
from seftc.prune.wanda import wanda_scores
from seftc.progress import NO_PROGRESS, ProgressSink
from seftc.sizes import parse_size


@dataclass
class PruneResult:
    loaded: LoadedModel  # streamed: a meta-device skeleton (the weights went to `output`)
    manifest: Manifest
    masks: dict[str, torch.Tensor]  # streamed: empty (the masks went to OUTPUT/seftc_masks.st)
    output: Path | None
    streamed: bool = False


class _PruneHandler:
    """Prunes each target once, from the statistics of its inputs."""

    def __init__(self, method: str, sparsity: dict[str, float], pattern: Pattern, options: MethodOptions):
        self.method, self.sparsity, self.pattern, self.options = method, sparsity, pattern, options
        self.pruners: dict[str, Any] = {}
        self.masks: dict[str, torch.Tensor] = {}
        # (input, its version, stats): q/k/v share one input. Holding the input keeps its memory
        # from being reused by a later, different tensor that would then look the same.
        self._cache: tuple[torch.Tensor, int, Any] | None = None

    def observe(self, target: Target, x: torch.Tensor) -> None:
        cls = PRUNERS[self.method]
        if self._cache is None or self._cache[0] is not x or self._cache[1] != x._version:
            self._cache = (x, x._version, cls.statistics(x))
        pruner = self.pruners.setdefault(target.name, cls(target.module.in_features, self.options))
        pruner.accumulate(self._cache[2], x.numel() // x.shape[-1])

    def finish(self, targets: Sequence[Target]) -> None:
        self._cache = None
        for t in targets:
            if t.name in self.masks:
                continue
            pruner = self.pruners.pop(t.name, None) or PRUNERS[self.method](t.module.in_features, self.options)
            weight, keep = pruner.prune(t.module.weight.data, self.sparsity[t.name], self.pattern)
            t.module.weight.data.copy_(weight)
            self.masks[t.name] = keep


class _OutlierHandler:
    """Measures each block's OWL outlier ratio without changing any weight."""

    def __init__(self, m: float):
        self.m = m
        self.sq_norm: dict[str, torch.Tensor] = {}
        self.scores: dict[int, list[torch.Tensor]] = {}

    def observe(self, target: Target, x: torch.Tensor) -> None:
        stats = x.reshape(-1, x.shape[-1]).float().pow(2).sum(dim=0)
        self.sq_norm[target.name] = self.sq_norm.get(target.name, 0) + stats

    def finish(self, targets: Sequence[Target]) -> None:
        for t in targets:
            if t.name in self.sq_norm:
                score = wanda_scores(t.module.weight.data, self.sq_norm.pop(t.name))
                self.scores.setdefault(t.block, []).append(score)

    def ratios(self, blocks: list[int]) -> list[float]:
        return [owl.outlier_ratio(self.scores.get(b, []), self.m) for b in blocks]


def _check_widths(targets: list[Target], pattern: Pattern) -> None:
    if not pattern.is_nm:
        return
    for t in targets:
        if t.module.in_features % pattern.m:
            raise SeftcError(
                f"{t.name} has input width {t.module.in_features}, not divisible by {pattern.m}, so {pattern} cannot hold; "
                f"exclude it with --ignore '{t.name.rsplit('.', 1)[-1]}' or use --pattern unstructured"
            )


def _layer_record(t: Target, mask: torch.Tensor, sparsity: float, pattern: Pattern) -> LayerRecord:
    w = t.module.weight.data
    nonzero = int(torch.count_nonzero(w))
    return LayerRecord(
        name=t.name,
        shape=list(w.shape),
        target_sparsity=sparsity,
        nonzero=nonzero,
        sparsity=1 - nonzero / w.numel(),
        pattern=str(pattern) if pattern.is_nm and nm_holds(w, pattern) else "unstructured",
        mask_sha256=mask_checksum(mask),
    )


class _Blocks:
    """The decoder blocks as a `BlockSource`: resident (nothing to do), or streamed from the
    checkpoint (read before a block runs, handed to `on_done` and freed after)."""

    def __init__(self, stream: StreamingModel | None, stack: str, device: str, on_done: Callable[[int], None] | None = None):
        self.stream, self.stack, self.device, self.on_done = stream, stack, device, on_done

    def keys(self, i: int) -> list[str]:
        return self.stream.keys_under(f"{self.stack}.{i}") if self.stream else []

    def load(self, i: int) -> None:
        if self.stream:
            self.stream.materialize(self.keys(i), self.device)

    def done(self, i: int) -> None:
        if self.on_done:
            self.on_done(i)
        if self.stream:
            self.stream.release(self.keys(i))


def _open_model(model: str | os.PathLike | LoadedModel, output: str | os.PathLike | None, force: bool, stream: bool | None,
                dtype: str, trust_remote_code: bool, allow_pickle: bool,
                fits: Callable[[bool], None] = lambda streamed: None) -> tuple[LoadedModel, StreamingModel | None]:
    """The model, streamed when asked or when an output is written (see `prune`); `fits(streamed)`
    is called before anything heavy is loaded."""
    if isinstance(model, LoadedModel):
        if stream:
            raise SeftcError("an already loaded model cannot be streamed; pass its path")
        if output is not None:
            check_output(output, force, (model.ref.path,))
        return model, None
    ref = resolve_model(model, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    if output is not None:
        check_output(output, force, (ref.path,))
    if stream and output is None:
        raise SeftcError("streaming prune writes block by block: give an output folder")
    if (output is not None if stream is None else stream) and ref.kind != "gguf":
        try:
            streaming = StreamingModel(ref, dtype, trust_remote_code)
            fits(True)
            return LoadedModel(streaming.model, load_tokenizer(ref.folder, trust_remote_code), ref), streaming
        except NotStreamable:
            if stream:
                raise
    fits(False)
    return load_model(ref, dtype=dtype, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle), None


@writes_outputs
def prune(
    model: str | os.PathLike | LoadedModel = "default",
    config: PruneConfig | None = None,
    *,
    output: str | os.PathLike | None = None,
    force: bool = False,
    progress: ProgressSink = NO_PROGRESS,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    dtype: str = "auto",
    layer_sparsity: dict[str, float] | None = None,
    stream: bool | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    max_memory: int | str | None = None,
    device: str | None = None,
    **overrides: Any,
) -> PruneResult:
    """Prune MODEL one-shot; write the pruned folder + manifest to `output` when given.

    `overrides` are PruneConfig fields (`method="sparsegpt", sparsity=0.7, ...`); `layer_sparsity`
    sets per-layer targets by module name (re-pruning to a manifest's allocation).

    With an output folder and a safetensors checkpoint (a path, not a loaded model), the model is
    streamed (`stream=None` decides so; True insists, False loads it whole): a meta-device
    skeleton, the embeddings, then one decoder block at a time read from the checkpoint, pruned,
    written to `output` (shards of at most `max_shard_size`) and freed. A GGUF file, or a
    checkpoint whose keys need renaming, is loaded whole. `max_memory` refuses, before any weight is
    read, a run whose planned peak (`seftc.plan`) exceeds it. `device`: where blocks compute (default: CUDA when available;
    for a loaded model, where it is)."""
    cfg = make_config(**{**(config.model_dump() if config else {}), **overrides})
    start = time.perf_counter()
    shard_bytes = parse_size(max_shard_size, "--max-shard-size")
    if isinstance(model, LoadedModel) and device is None:
        dev = str(next(model.model.parameters()).device)
    else:
        dev = resolve_device(device)
    if max_memory is not None:
        parse_size(max_memory, "--max-memory")

    def fits(streamed: bool) -> None:
        if max_memory is None or isinstance(model, LoadedModel):
            return
        from seftc.plan import calibration_tokens, check_fits, model_shape, plan_prune

        shape, kind = model_shape(model, dtype, trust_remote_code)
        calibrates = PRUNERS[cfg.method].needs_calibration or cfg.owl
        check_fits(plan_prune(shape, cfg.method, nsamples=cfg.calib.nsamples, seqlen=cfg.calib.seqlen, batch_size=cfg.batch_size,
                              sparsity=cfg.target_sparsity, nm=cfg.parsed_pattern.is_nm, streamed=streamed, gguf=kind == "gguf",
                              calib_tokens=calibration_tokens(model, cfg.calib.source, trust_remote_code) if calibrates else None),
                   max_memory)

    loaded, streaming = _open_model(model, output, force, stream, dtype, trust_remote_code, allow_pickle, fits)
    if streaming is None and str(next(loaded.model.parameters()).device) != dev:
        loaded.model.to(dev)

    pattern = cfg.parsed_pattern
    targets = find_targets(loaded.model, cfg.include, cfg.ignore)
    _check_widths(targets, pattern)
    stack, blocks = find_blocks(loaded.model)
    by_block: dict[int, list[Target]] = {}
    for t in targets:
        by_block.setdefault(t.block, []).append(t)
    pruner_cls = PRUNERS[cfg.method]
    sparsity = {t.name: (layer_sparsity or {}).get(t.name, cfg.target_sparsity) for t in targets}
    calib_record = None
    samples = None
    if streaming is not None:  # what runs outside the blocks (embeddings, final norm), not the LM head
        head = _module_name(loaded.model, loaded.model.get_output_embeddings())
        inside = [k for k in streaming.keys_under("") if k.startswith(stack + ".")]
        outside = [k for k in streaming.keys_under("") if k not in set(inside)]
        streaming.materialize([k for k in outside if not (head and k.startswith(head + "."))], dev)
    if pruner_cls.needs_calibration or cfg.owl:
        max_pos = getattr(loaded.config, "max_position_embeddings", None)
        samples, calib_record = calibration_samples(loaded.tokenizer, cfg.calib, max_pos)
        samples = samples.to(dev)

    owl_record = None
    if cfg.owl:
        block_ids = sorted(by_block)
        handler = _OutlierHandler(cfg.owl_m)
        run_blocks(loaded.model, samples, targets, handler, cfg.batch_size, progress, "OWL outlier scan",
                   source=_Blocks(streaming, stack, dev))
        ratios = handler.ratios(block_ids)
        params = [sum(t.module.weight.numel() for t in by_block[b]) for b in block_ids]
        per_block = owl.allocate(ratios, params, cfg.target_sparsity, cfg.owl_lambda)
        sparsity = {t.name: per_block[block_ids.index(t.block)] for t in targets}
        owl_record = {"m": cfg.owl_m, "lambda": cfg.owl_lambda, "outlier_ratio": ratios, "block_sparsity": per_block}

    handler = _PruneHandler(cfg.method, sparsity, pattern, MethodOptions(cfg.blocksize, cfg.damp, dev))
    records: list[LayerRecord] = []

    def run(on_done: Callable[[int], None]) -> None:
        source = _Blocks(streaming, stack, dev, on_done)
        if pruner_cls.needs_calibration:
            run_blocks(loaded.model, samples, targets, handler, cfg.batch_size, progress, f"{cfg.method} {pattern} calibration",
                       source=source)
            return
        advance = progress.task(f"{cfg.method} {pattern}", len(blocks))
        for i in range(len(blocks)):
            source.load(i)
            handler.finish(by_block.get(i, []))
            source.done(i)
            advance(1)

    def record(i: int) -> None:
        records.extend(_layer_record(t, handler.masks[t.name], sparsity[t.name], pattern) for t in by_block.get(i, []))

    def manifest() -> Manifest:
        total = sum(t.module.weight.numel() for t in targets)
        nonzero = sum(r.nonzero for r in records)
        return Manifest(
            stage="prune", method=cfg.method, pattern=str(pattern), target_sparsity=cfg.target_sparsity,
            sparsity=1 - nonzero / total, layers=records, calibration=calib_record,
            config={**cfg.model_dump(), "owl_allocation": owl_record}, source_model=loaded.ref.spec, seed=cfg.calib.seed,
            versions=tool_versions(), elapsed_s=time.perf_counter() - start,
        )

    if streaming is None:
        run(record)
        m = manifest()
        out_path = None
        if output is not None:
            out_path = save_model(loaded.model, loaded.tokenizer, Path(output), {MANIFEST_NAME: m.to_json()}, masks=handler.masks,
                                  max_shard_size=shard_bytes)
        return PruneResult(loaded, m, handler.masks, out_path)

    with atomic_folder(Path(output)) as tmp:  # type: ignore[arg-type]
        with ShardedWriter(tmp, "model", shard_bytes) as weights:
            mask_file = MaskWriter(tmp, shard_bytes)
            try:
                def write_block(i: int) -> None:
                    record(i)
                    for t in by_block.get(i, []):
                        mask_file.add(t.name, handler.masks.pop(t.name))
                    for key, tensor in streaming.saved(streaming.keys_under(f"{stack}.{i}")):
                        weights.add(key, tensor)

                run(write_block)
                for key in outside:  # the embeddings, final norm and LM head, one tensor at a time
                    if streaming.current(key).is_meta:
                        streaming.materialize([key], "cpu")
                    weights.add(*next(streaming.saved([key])))
                    streaming.release([key])
            except BaseException:
                mask_file.abort()
                raise
            mask_file.close()
        write_config(loaded.model, tmp)
        if loaded.tokenizer is not None:
            loaded.tokenizer.save_pretrained(tmp)
        m = manifest()
        m.save(tmp)
    return PruneResult(loaded, m, {}, Path(output), streamed=True)


def _module_name(model: torch.nn.Module, module: torch.nn.Module | None) -> str | None:
    if module is None:
        return None
    return next((name for name, m in model.named_modules() if m is module), None)


def expected_nonzero(numel: int, sparsity: float) -> int:
    """What a layer of `numel` weights keeps at `sparsity` (used by tests and inspect)."""
    return numel - prune_count(numel, sparsity)
