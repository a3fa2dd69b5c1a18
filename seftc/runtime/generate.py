"""Greedy (or sampled) generation on the sparse runtime."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class GenerateResult:
    prompt: str
    text: str  # the generated continuation only
    tokens: list[int]  # generated token ids
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return len(self.tokens) / self.seconds if self.seconds > 0 else float("nan")


@torch.inference_mode()
def generate(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int = 32, *, chat: bool = False) -> GenerateResult:
    """Greedy decoding of `prompt` with the model's KV cache; stops at EOS or `max_new_tokens`."""
    if chat and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt")
        if not isinstance(ids, torch.Tensor):
            ids = ids["input_ids"]
    else:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
    if ids.shape[1] == 0:
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        ids = torch.tensor([[bos if bos is not None else 0]])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    start = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=pad, eos_token_id=tokenizer.eos_token_id, num_beams=1)
    seconds = time.perf_counter() - start
    new = out[0, ids.shape[1]:].tolist()
    return GenerateResult(prompt, tokenizer.decode(new, skip_special_tokens=True), new, seconds)
