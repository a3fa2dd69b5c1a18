"""`seftc.prune`: one-shot pruning of a causal LM, end to end."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from seftc.data.calibration import calibration_samples
from seftc.errors import SeftcError
from seftc.models.loading import LoadedModel, load_model
from seftc.models.manifest import LayerRecord, Manifest, tool_versions
from seftc.models.saving import check_output, save_model
from seftc.models.targets import Target, find_targets
from seftc.prune import owl
from seftc.prune.config import PruneConfig, make_config
from seftc.prune.masks import Pattern, mask_checksum, nm_holds, prune_count
from seftc.prune.methods import PRUNERS, MethodOptions
from seftc.prune.sequential import run_blocks
from seftc.prune.wanda import wanda_scores
from seftc.progress import NO_PROGRESS, ProgressSink


@dataclass
class PruneResult:
    loaded: LoadedModel
    manifest: Manifest
    masks: dict[str, torch.Tensor]
    output: Path | None


class _PruneHandler:
    """Prunes each target once, from the statistics of its inputs."""

    def __init__(self, method: str, sparsity: dict[str, float], pattern: Pattern, options: MethodOptions):
        self.method, self.sparsity, self.pattern, self.options = method, sparsity, pattern, options
        self.pruners: dict[str, Any] = {}
        self.masks: dict[str, torch.Tensor] = {}
        self._cache: tuple[Any, Any] | None = None  # (input key, stats): q/k/v share one input

    def observe(self, target: Target, x: torch.Tensor) -> None:
        cls = PRUNERS[self.method]
        key = (x.data_ptr(), tuple(x.shape), x._version)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, cls.statistics(x))
        pruner = self.pruners.setdefault(target.name, cls(target.module.in_features, self.options))
        pruner.accumulate(self._cache[1], x.numel() // x.shape[-1])

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


def _layer_records(targets: list[Target], masks: dict[str, torch.Tensor], sparsity: dict[str, float], pattern: Pattern) -> list[LayerRecord]:
    records = []
    for t in targets:
        w = t.module.weight.data
        nonzero = int(torch.count_nonzero(w))
        records.append(
            LayerRecord(
                name=t.name,
                shape=list(w.shape),
                target_sparsity=sparsity[t.name],
                nonzero=nonzero,
                sparsity=1 - nonzero / w.numel(),
                pattern=str(pattern) if pattern.is_nm and nm_holds(w, pattern) else "unstructured",
                mask_sha256=mask_checksum(masks[t.name]),
            )
        )
    return records


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
    **overrides: Any,
) -> PruneResult:
    """Prune MODEL one-shot; write the pruned folder + manifest to `output` when given.

    `overrides` are PruneConfig fields (`method="sparsegpt", sparsity=0.7, ...`); `layer_sparsity`
    sets per-layer targets by module name (re-pruning to a manifest's allocation)."""
    cfg = make_config(**{**(config.model_dump() if config else {}), **overrides})
    start = time.perf_counter()
    if isinstance(model, LoadedModel):
        loaded = model
    else:
        from seftc.models.loading import resolve_model

        ref = resolve_model(model, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
        if output is not None:
            check_output(output, force, (ref.path,))
        loaded = load_model(ref, dtype=dtype, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    if output is not None and isinstance(model, LoadedModel):
        check_output(output, force, (loaded.ref.path,))

    pattern = cfg.parsed_pattern
    targets = find_targets(loaded.model, cfg.include, cfg.ignore)
    _check_widths(targets, pattern)
    pruner_cls = PRUNERS[cfg.method]
    sparsity = {t.name: (layer_sparsity or {}).get(t.name, cfg.target_sparsity) for t in targets}
    calib_record = None
    samples = None
    if pruner_cls.needs_calibration or cfg.owl:
        max_pos = getattr(loaded.config, "max_position_embeddings", None)
        samples, calib_record = calibration_samples(loaded.tokenizer, cfg.calib, max_pos)
        samples = samples.to(next(loaded.model.parameters()).device)

    owl_record = None
    if cfg.owl:
        blocks = sorted({t.block for t in targets})
        handler = _OutlierHandler(cfg.owl_m)
        run_blocks(loaded.model, samples, targets, handler, cfg.batch_size, progress, "OWL outlier scan")
        ratios = handler.ratios(blocks)
        params = [sum(t.module.weight.numel() for t in targets if t.block == b) for b in blocks]
        per_block = owl.allocate(ratios, params, cfg.target_sparsity, cfg.owl_lambda)
        sparsity = {t.name: per_block[blocks.index(t.block)] for t in targets}
        owl_record = {"m": cfg.owl_m, "lambda": cfg.owl_lambda, "outlier_ratio": ratios, "block_sparsity": per_block}

    handler = _PruneHandler(cfg.method, sparsity, pattern, MethodOptions(cfg.blocksize, cfg.damp))
    if pruner_cls.needs_calibration:
        run_blocks(loaded.model, samples, targets, handler, cfg.batch_size, progress, f"{cfg.method} {pattern} calibration")
    else:
        advance = progress.task(f"{cfg.method} {pattern}", len(targets))
        for t in targets:
            handler.finish([t])
            advance(1)

    records = _layer_records(targets, handler.masks, sparsity, pattern)
    total = sum(t.module.weight.numel() for t in targets)
    nonzero = sum(r.nonzero for r in records)
    manifest = Manifest(
        stage="prune",
        method=cfg.method,
        pattern=str(pattern),
        target_sparsity=cfg.target_sparsity,
        sparsity=1 - nonzero / total,
        layers=records,
        calibration=calib_record,
        config={**cfg.model_dump(), "owl_allocation": owl_record},
        source_model=loaded.ref.spec,
        seed=cfg.calib.seed,
        versions=tool_versions(),
        elapsed_s=time.perf_counter() - start,
    )
    out_path = None
    if output is not None:
        out_path = save_model(loaded.model, loaded.tokenizer, Path(output), {"seftc_manifest.json": manifest.to_json()},
                              masks=handler.masks)
    return PruneResult(loaded, manifest, handler.masks, out_path)


def expected_nonzero(numel: int, sparsity: float) -> int:
    """What a layer of `numel` weights keeps at `sparsity` (used by tests and inspect)."""
    return numel - prune_count(numel, sparsity)
