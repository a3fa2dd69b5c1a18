"""Shared fixtures: tiny random causal LMs of several architectures, with a tiny tokenizer."""
from __future__ import annotations

from pathlib import Path

import pytest

ARCHS = ("llama", "mistral", "qwen2", "gpt_neox", "opt")


@pytest.fixture(autouse=True, scope="session")
def _dispatch_plans_in_a_temp_dir(tmp_path_factory):
    """Tests time tiny layers; their dispatch plans must not land in the user's cache
    (~/.cache/seftc/dispatch), where a real run would read them. Subprocesses inherit it."""
    import os

    ENV_CACHE = "SEFTC_DISPATCH_CACHE"  # seftc.runtime.dispatch.ENV_CACHE (not imported: it would load torch here)
    old = os.environ.get(ENV_CACHE)
    os.environ[ENV_CACHE] = str(tmp_path_factory.mktemp("dispatch-cache"))
    yield
    if old is None:
        os.environ.pop(ENV_CACHE, None)
    else:
        os.environ[ENV_CACHE] = old

_TEXT = (
    "Shall I compare thee to a summer's day? Thou art more lovely and more temperate. "
    "Rough winds do shake the darling buds of May, and summer's lease hath all too short a date. "
) * 8


def tiny_tokenizer():
    """A byte-level BPE tokenizer (vocab < 300) trained in milliseconds, no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([_TEXT], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


def tiny_config(arch: str = "llama"):
    import transformers as tf

    common = dict(vocab_size=320, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256)
    if arch in ("llama", "mistral", "qwen2"):
        cls = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config}[arch]
        return cls(hidden_size=64, intermediate_size=128, num_key_value_heads=2, tie_word_embeddings=False, **common)
    if arch == "gpt_neox":
        return tf.GPTNeoXConfig(hidden_size=64, intermediate_size=128, **common)
    if arch == "opt":
        return tf.OPTConfig(hidden_size=64, ffn_dim=128, word_embed_proj_dim=64, vocab_size=320, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=256)
    raise ValueError(arch)


def build_tiny_model(arch: str = "llama", seed: int = 0):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch), dtype=torch.float32)
    return model.eval()


def save_tiny_model(path: Path, arch: str = "llama", seed: int = 0) -> Path:
    build_tiny_model(arch, seed).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    """One saved tiny model folder per architecture (built once per session; treat as read-only)."""
    root = tmp_path_factory.mktemp("tiny")
    return {arch: save_tiny_model(root / arch, arch) for arch in ARCHS}


@pytest.fixture(scope="session")
def tiny_dir(tiny_dirs) -> Path:
    return tiny_dirs["llama"]


@pytest.fixture(scope="session")
def calib_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "calib.txt"
    path.write_text(_TEXT * 4)
    return path


def write_foreign_ct_folder(src: Path, state: dict, folder: Path) -> Path:
    """A folder as compressed-tensors' own tools write it (`sparse-bitmask` for every `*proj.weight`,
    its config block, no seftc metadata or marker), from model folder `src` with weights `state`;
    tokenizer files are copied along."""
    import json

    import numpy as np
    import torch
    from safetensors.torch import save_file

    folder.mkdir()
    tensors, targets = {}, []
    for name, w in state.items():
        if name.endswith("proj.weight"):
            prefix = name[: -len(".weight")]
            mask = w != 0
            counts = mask.sum(1)
            tensors.update({f"{prefix}.shape": torch.tensor(list(w.shape)), f"{prefix}.compressed": w[mask],
                            f"{prefix}.bitmask": torch.from_numpy(np.packbits(mask.numpy(), axis=-1, bitorder="little")),
                            f"{prefix}.row_offsets": counts.cumsum(0) - counts})
            targets.append(prefix)
        else:
            tensors[name] = w
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "compressed-tensors", "format": "dense",
                                     "sparsity_config": {"format": "sparse-bitmask", "targets": targets, "ignore": []}}
    (folder / "config.json").write_text(json.dumps(config))
    for side in src.iterdir():
        if side.name.startswith("tokenizer") or side.name == "special_tokens_map.json":
            (folder / side.name).write_bytes(side.read_bytes())
    return folder


def pruned_tiny_llama(folder: Path, pattern: str = "unstructured", negative_zeros: bool = False) -> dict:
    """A tiny LLaMA (vocab 128, no tokenizer) whose Linear layers but lm_head are pruned to 50 %
    (`unstructured`) or 2:4, saved to `folder`; returns its state dict."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name != "lm_head":
                w = module.weight
                if pattern == "2:4":
                    g = w.view(w.shape[0], -1, 4)
                    keep = torch.zeros_like(g, dtype=torch.bool).scatter_(2, g.abs().topk(2, -1).indices, True).view_as(w)
                else:
                    keep = w.abs() > w.abs().median()
                if negative_zeros:
                    w.mul_(keep)  # what `weight * mask` pruning does: -0.0 where negatives were cut
                else:
                    w.masked_fill_(~keep, 0.0)
    model.save_pretrained(folder)
    return {k: v.clone() for k, v in model.state_dict().items()}


# SEFT v1's behaviour (the defaults before validation chose v2's): last-batch eviction score, no caps, no δ decay,
# reactivation until the end. Tests of mechanisms that need many reactivations on tiny layers use it (v2's caps
# floor to 0 reactivations on layers of a few thousand weights).
SEFT_V1 = dict(evict_score="last", row_cap=None, reactivation_cap=None, delta_decay=0.0, reactivation_stop=1.0)
