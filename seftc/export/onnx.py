"""Export a causal LM to ONNX and check it against PyTorch with onnxruntime.

The exported graph maps token ids to logits. With the KV cache (the default) it takes and returns
the cache explicitly, so a runtime can decode token by token:

    inputs   input_ids                     int64   [batch, seq]
             attention_mask                int64   [batch, past + seq]   (1 = token, 0 = padding)
             past_key_values.{i}.key|value float32 [batch, kv_heads, past, head_dim]
    outputs  logits                        float32 [batch, seq, vocab]
             present.{i}.key|value         float32 [batch, kv_heads, past + seq, head_dim]

Position ids come from the attention mask (`cumsum - 1`, as `generate` computes them), so
left-padded batches work. The first call passes past tensors with `past = 0`. Without the cache
the graph has only `input_ids`, `attention_mask` and `logits`.

Pruned weights can be stored as ONNX sparse initializers (`SparseTensorProto`, values + linear
indices); onnxruntime densifies them when it loads the graph. A tensor is stored sparse only when
that is smaller than dense. The ONNX checker insists on int64 indices, which makes sparse storage
pay only below 1/3 density; int32 indices (the default, accepted by onnxruntime) pay below 1/2.

The export runs in float32 with the TorchScript exporter (`dynamo=False`): optimum-onnx pins
transformers < 4.58, and the dynamo exporter needs onnxscript. Constant folding is left to
onnxruntime: folded, a tied `lm_head` would be stored a second time, transposed.
"""
from __future__ import annotations

import copy
import inspect
import json
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from seftc.errors import SeftcError
from seftc.models.loading import LoadedModel, load_model, resolve_model
from seftc.models.saving import atomic_folder, check_output, writes_outputs
from seftc.progress import NO_PROGRESS, ProgressSink

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
INFO_FILE = "export.json"
DEFAULT_OPSET = 17
MIN_OPSET = 14  # scaled_dot_product_attention and Trilu
DEFAULT_TOLERANCE = 1e-3  # max abs logit error allowed, relative to the largest reference logit
DEFAULT_PROMPTS = (
    "The quick brown fox jumps over the lazy dog.",
    "Shall I compare thee to a summer's day? Thou art more lovely and more temperate.",
    "Sparse language models keep most of their accuracy when half of their weights are zero.",
)
_PROTO_LIMIT = 2**31 - 2**26  # protobuf's 2 GiB limit, with headroom for the graph itself


@dataclass
class ExportResult:
    path: Path  # the output folder
    model_file: Path  # path / model.onnx
    bytes: int  # model.onnx (+ model.onnx.data) on disk
    dense_bytes: int  # the same graph with every initializer stored dense
    sparse_tensors: int  # initializers stored as SparseTensorProto
    sparse_index_dtype: str | None
    kv_cache: bool
    opset: int
    num_layers: int
    kv_heads: int
    head_dim: int
    inputs: list[str]
    outputs: list[str]
    max_abs_error: float | None  # onnxruntime vs PyTorch logits, over all checks; None if not checked
    logit_scale: float | None  # largest |logit| of the reference
    relative_error: float | None  # max_abs_error / max(1, logit_scale)
    tolerance: float
    checks: list[dict[str, Any]] = field(default_factory=list)
    export_s: float = 0.0
    check_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"], d["model_file"] = str(self.path), str(self.model_file)
        return d


def _require_onnx() -> tuple[Any, Any]:
    try:
        import onnx
        import onnxruntime
    except ImportError as e:
        raise SeftcError(f"ONNX export needs onnx and onnxruntime ({e.name} is missing); pip install 'seftc[onnx]' (or 'seftc[gpu]' for onnxruntime-gpu)") from None
    return onnx, onnxruntime


class _Exportable(torch.nn.Module):
    """The causal LM with plain tensors in and out (a flat KV cache instead of a Cache object)."""

    def __init__(self, model: torch.nn.Module, num_layers: int, kv_cache: bool):
        super().__init__()
        self.model, self.num_layers, self.kv_cache = model, num_layers, kv_cache
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"  # renamed in transformers 5.x
        self._positions = "position_ids" in params

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from transformers import DynamicCache

        kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": self.kv_cache}
        if self._positions:
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            kwargs["position_ids"] = positions[:, -input_ids.shape[1]:]
        cache = None
        if self.kv_cache:
            cache = DynamicCache([(past[2 * i], past[2 * i + 1]) for i in range(self.num_layers)])
            kwargs[self._cache_kw] = cache
        logits = self.model(**kwargs).logits
        if cache is None:
            return (logits,)
        present: list[torch.Tensor] = []
        for i in range(self.num_layers):
            layer = cache.layers[i]
            present += [layer.keys, layer.values]
        return (logits, *present)


def io_names(num_layers: int, kv_cache: bool) -> tuple[list[str], list[str]]:
    inputs, outputs = ["input_ids", "attention_mask"], ["logits"]
    if kv_cache:
        inputs += [f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
        outputs += [f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    return inputs, outputs


def _geometry(model: torch.nn.Module) -> tuple[int, int, int]:
    """(layers, kv heads, head dim), read off the cache of a two-token forward."""
    from transformers import DynamicCache

    cache = DynamicCache()
    with torch.no_grad():
        kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        model(input_ids=torch.zeros(1, 2, dtype=torch.long), use_cache=True, **{kw: cache})
    layers = cache.layers
    if not layers or getattr(layers[0], "keys", None) is None or layers[0].keys.dim() != 4:
        raise SeftcError(f"cannot export {type(model).__name__}: its KV cache is not [batch, heads, seq, head_dim]; pass --no-kv-cache")
    _, heads, _, head_dim = layers[0].keys.shape
    return len(layers), int(heads), int(head_dim)


def _trace(module: _Exportable, path: Path, opset: int, kv_heads: int, head_dim: int) -> None:
    num_layers, kv_cache = module.num_layers, module.kv_cache
    inputs, outputs = io_names(num_layers, kv_cache)
    batch, seq, past = 2, 3, (2 if kv_cache else 0)  # past > 0 and a padded row, so no branch is traced away
    ids = torch.ones(batch, seq, dtype=torch.long)
    mask = torch.ones(batch, past + seq, dtype=torch.long)
    mask[1, 0] = 0
    cache = [torch.zeros(batch, kv_heads, past, head_dim) for _ in range(2 * num_layers)] if kv_cache else []
    axes: dict[str, dict[int, str]] = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "total"}, "logits": {0: "batch", 1: "seq"}}
    axes.update({n: {0: "batch", 2: "past"} for n in inputs[2:]})
    axes.update({n: {0: "batch", 2: "total"} for n in outputs[1:]})
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (ids, mask, *cache), str(path), input_names=inputs, output_names=outputs,
                          dynamic_axes=axes, opset_version=opset, do_constant_folding=False, dynamo=False)


def sparsify_initializers(graph: Any, index_dtype: str = "int32") -> int:
    """Move every float initializer that is smaller as (values, linear indices) into
    `graph.sparse_initializer`; returns how many moved."""
    from onnx import TensorProto, helper, numpy_helper

    idx_type = {"int32": np.int32, "int64": np.int64}[index_dtype]
    keep, moved = [], 0
    for init in graph.initializer:
        if init.data_type not in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE) or len(init.dims) < 1:
            keep.append(init)
            continue
        dense = numpy_helper.to_array(init)
        flat = dense.reshape(-1)
        nz = np.flatnonzero(flat)
        if flat.size >= np.iinfo(idx_type).max or nz.size * (dense.itemsize + np.dtype(idx_type).itemsize) >= dense.nbytes:
            keep.append(init)
            continue
        values = numpy_helper.from_array(flat[nz], init.name)
        indices = numpy_helper.from_array(nz.astype(idx_type), f"{init.name}.indices")
        graph.sparse_initializer.append(helper.make_sparse_tensor(values, indices, list(dense.shape)))
        moved += 1
    del graph.initializer[:]
    graph.initializer.extend(keep)
    return moved


def _save(onnx: Any, proto: Any, folder: Path, approx_bytes: int) -> None:
    if approx_bytes > _PROTO_LIMIT:  # dense initializers go to model.onnx.data; sparse ones stay inline
        try:
            onnx.save_model(proto, str(folder / MODEL_FILE), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=DATA_FILE, size_threshold=1024)
        except ValueError as e:
            raise SeftcError(f"the ONNX graph is too large to save ({str(e).splitlines()[0][:120]}); try --dense-initializers") from None
    else:
        onnx.save_model(proto, str(folder / MODEL_FILE))


class OnnxCausalLM:
    """An onnxruntime session over an exported folder, with the tensors named as above."""

    def __init__(self, folder: str | os.PathLike, threads: int | None = None):
        _, ort = _require_onnx()
        folder = Path(folder)
        info = json.loads((folder / INFO_FILE).read_text(encoding="utf-8"))
        self.kv_cache, self.num_layers = info["kv_cache"], info["num_layers"]
        self.kv_heads, self.head_dim = info["kv_heads"], info["head_dim"]
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(folder / MODEL_FILE), options, providers=["CPUExecutionProvider"])

    def empty_cache(self, batch: int) -> list[np.ndarray]:
        return [np.zeros((batch, self.kv_heads, 0, self.head_dim), np.float32) for _ in range(2 * self.num_layers)]

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None,
                 past: Sequence[np.ndarray] | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
        """(logits, present); `past` None starts a fresh cache."""
        input_ids = np.asarray(input_ids, dtype=np.int64)
        batch = input_ids.shape[0]
        if self.kv_cache and past is None:
            past = self.empty_cache(batch)
        past_len = past[0].shape[2] if self.kv_cache else 0
        if attention_mask is None:
            attention_mask = np.ones((batch, past_len + input_ids.shape[1]), np.int64)
        feed = {"input_ids": input_ids, "attention_mask": np.asarray(attention_mask, dtype=np.int64)}
        inputs, _ = io_names(self.num_layers, self.kv_cache)
        if self.kv_cache:
            feed.update(zip(inputs[2:], past))
        out = self.session.run(None, feed)
        return out[0], list(out[1:])


def _prompt_ids(tokenizer: Any, prompts: Sequence[str], vocab: int, max_len: int) -> list[list[int]]:
    if tokenizer is None:
        rng = np.random.default_rng(0)
        return [rng.integers(0, vocab, size=n).tolist() for n in (12, 9, 16)]
    ids = []
    for text in prompts:
        tokens = tokenizer(text, add_special_tokens=False)["input_ids"][:max_len]
        if len(tokens) < 2:
            raise SeftcError(f"prompt {text!r} has fewer than 2 tokens; give longer prompts")
        ids.append([int(t) for t in tokens])
    return ids


def check_parity(folder: Path, model: torch.nn.Module, prompt_ids: list[list[int]], decode_steps: int = 3,
                 pad_id: int = 0) -> tuple[float, float, list[dict[str, Any]]]:
    """Compare onnxruntime with PyTorch: per prompt a full forward and (with the cache) a prefill
    followed by `decode_steps` one-token steps; then the prompts as one left-padded batch.
    Returns (max abs error, largest |reference logit|, per-check records)."""
    runner = OnnxCausalLM(folder)
    checks: list[dict[str, Any]] = []
    worst, scale = 0.0, 0.0

    def record(kind: str, prompt: int, ref: torch.Tensor, got: np.ndarray) -> None:
        nonlocal worst, scale
        err = float(np.abs(ref.numpy() - got).max())
        worst, scale = max(worst, err), max(scale, float(ref.abs().max()))
        checks.append({"kind": kind, "prompt": prompt, "tokens": int(ref.shape[-2]), "max_abs_error": err})

    with torch.no_grad():
        for p, ids in enumerate(prompt_ids):
            x = torch.tensor([ids])
            ref = model(input_ids=x, use_cache=False).logits
            logits, _ = runner(x.numpy())
            record("full", p, ref[0], logits[0])
            steps = min(decode_steps, len(ids) - 1)
            if runner.kv_cache and steps > 0:
                cut = len(ids) - steps
                logits, past = runner(x[:, :cut].numpy())
                got = [logits[0]]
                for t in range(cut, len(ids)):
                    logits, past = runner(x[:, t:t + 1].numpy(), past=past)
                    got.append(logits[0])
                record(f"prefill+{steps} decode steps", p, ref[0], np.concatenate(got, axis=0))
        if len(prompt_ids) > 1:
            width = max(len(ids) for ids in prompt_ids)
            ids = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, row in enumerate(prompt_ids):
                ids[r, width - len(row):], mask[r, width - len(row):] = torch.tensor(row), 1
            logits, _ = runner(ids.numpy(), mask.numpy())
            for r, row in enumerate(prompt_ids):  # each row against its own unpadded forward
                ref = model(input_ids=torch.tensor([row]), use_cache=False).logits[0]
                record("left-padded batch", r, ref, logits[r, width - len(row):])
    return worst, scale, checks


def _write_info(folder: Path, result: ExportResult, **versions: str) -> None:
    info = result.to_dict()
    info["versions"] = {"torch": torch.__version__, **versions}
    (folder / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


def _as_loaded(model_or_path: Any, out: Path, force: bool, trust_remote_code: bool, allow_pickle: bool) -> LoadedModel:
    if isinstance(model_or_path, (str, os.PathLike)):
        ref = resolve_model(model_or_path, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
        check_output(out, force, (ref.path,))
        return load_model(ref, dtype="float32", trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    if isinstance(model_or_path, LoadedModel):
        check_output(out, force, (model_or_path.ref.path,))
        return model_or_path
    if isinstance(model_or_path, torch.nn.Module):
        check_output(out, force)
        return LoadedModel(model_or_path, None, None)  # type: ignore[arg-type]
    raise SeftcError(f"cannot export a {type(model_or_path).__name__}; pass a model path, 'default' or a loaded model")


@writes_outputs
def export_onnx(
    model_or_path: str | os.PathLike | LoadedModel | torch.nn.Module,
    out: str | os.PathLike,
    *,
    kv_cache: bool = True,
    sparse_initializers: bool = True,
    sparse_index_dtype: str = "int32",
    opset: int = DEFAULT_OPSET,
    check: bool = True,
    tolerance: float = DEFAULT_TOLERANCE,
    prompts: Sequence[str] = DEFAULT_PROMPTS,
    decode_steps: int = 3,
    force: bool = False,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    progress: ProgressSink = NO_PROGRESS,
) -> ExportResult:
    """Export MODEL to the folder OUT (`model.onnx`, `export.json`, config and tokenizer) and,
    with `check`, verify onnxruntime's logits against PyTorch; a failed check writes nothing."""
    onnx, ort = _require_onnx()
    max_opset = getattr(torch.onnx._constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", 20)
    if not MIN_OPSET <= opset <= max_opset:
        raise SeftcError(f"--opset {opset} is outside what this exporter writes ({MIN_OPSET}..{max_opset})")
    if sparse_index_dtype not in ("int32", "int64"):
        raise SeftcError(f"sparse index dtype must be int32 or int64, not {sparse_index_dtype!r}")
    if not tolerance > 0:
        raise SeftcError(f"--tolerance must be positive, not {tolerance}")
    if decode_steps < 0:
        raise SeftcError(f"decode steps must be >= 0, not {decode_steps}")
    if check and not prompts:
        raise SeftcError("the parity check needs at least one prompt")
    out = Path(out).expanduser()
    loaded = _as_loaded(model_or_path, out, force, trust_remote_code, allow_pickle)
    model = loaded.model
    if any(p.dtype != torch.float32 for p in model.parameters()):
        model = copy.deepcopy(model).float()
    model.eval()
    config = model.config
    num_layers, kv_heads, head_dim = _geometry(model)
    inputs, outputs = io_names(num_layers, kv_cache)
    if check:
        max_len = int(getattr(config, "max_position_embeddings", 0) or 512)
        ids = _prompt_ids(loaded.tokenizer, prompts, int(config.vocab_size), max_len)

    advance = progress.task("export to ONNX", 3 if check else 2)
    t0 = time.perf_counter()
    with atomic_folder(out) as tmp:
        raw = tmp / ".raw"
        raw.mkdir()
        try:
            _trace(_Exportable(model, num_layers, kv_cache), raw / MODEL_FILE, opset, kv_heads, head_dim)
        except SeftcError:
            raise
        except Exception as e:  # the exporter's own errors: an op or a construct it cannot trace
            raise SeftcError(f"torch.onnx cannot export {type(model).__name__} ({type(e).__name__}: {str(e).splitlines()[0][:160]}); try --no-kv-cache or another --opset") from None
        advance(1)
        dense_bytes = sum(f.stat().st_size for f in raw.iterdir())  # the exporter's files (>2 GiB: external data)
        proto = onnx.load(str(raw / MODEL_FILE))
        moved = sparsify_initializers(proto.graph, sparse_index_dtype) if sparse_initializers else 0
        _save(onnx, proto, tmp, dense_bytes)
        del proto
        for f in raw.iterdir():
            f.unlink()
        raw.rmdir()
        size = sum((tmp / f).stat().st_size for f in (MODEL_FILE, DATA_FILE) if (tmp / f).exists())
        config.to_json_file(str(tmp / "config.json"))
        if loaded.tokenizer is not None:
            loaded.tokenizer.save_pretrained(str(tmp))
        result = ExportResult(
            path=out, model_file=out / MODEL_FILE, bytes=size, dense_bytes=dense_bytes, sparse_tensors=moved,
            sparse_index_dtype=sparse_index_dtype if moved else None, kv_cache=kv_cache, opset=opset,
            num_layers=num_layers, kv_heads=kv_heads, head_dim=head_dim, inputs=inputs, outputs=outputs,
            max_abs_error=None, logit_scale=None, relative_error=None, tolerance=tolerance,
            export_s=time.perf_counter() - t0,
        )
        _write_info(tmp, result, onnx=onnx.__version__, onnxruntime=ort.__version__)  # OnnxCausalLM reads it
        advance(1)
        if check:
            t1 = time.perf_counter()
            pad = getattr(loaded.tokenizer, "pad_token_id", None) if loaded.tokenizer is not None else None
            worst, scale, checks = check_parity(tmp, model, ids, decode_steps, pad_id=pad or 0)
            result.max_abs_error, result.logit_scale, result.checks = worst, scale, checks
            result.relative_error = worst / max(1.0, scale)
            result.check_s = time.perf_counter() - t1
            if not result.relative_error <= tolerance:
                raise SeftcError(
                    f"onnxruntime logits differ from PyTorch by up to {worst:.3g} ({result.relative_error:.3g} of the logit "
                    f"scale {scale:.3g}), above the tolerance {tolerance:g}; nothing was written"
                )
            _write_info(tmp, result, onnx=onnx.__version__, onnxruntime=ort.__version__)
            advance(1)
    return result
