"""Shared fixtures: tiny random causal LMs of several architectures, with a tiny tokenizer."""
from __future__ import annotations

from pathlib import Path

import pytest

ARCHS = ("llama", "mistral", "qwen2", "gpt_neox", "opt")

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
