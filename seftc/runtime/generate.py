"""Generation on the sparse runtime: prompts to token ids, and greedy decoding of one prompt through
the decode engine (`seftc.runtime.engine`, a batch of one), the same loop `seftc serve` runs."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Sequence

from seftc.errors import SeftcError


@dataclass
class GenerateResult:
    prompt: str
    text: str  # the generated continuation only
    tokens: list[int]  # generated token ids (an end-of-sequence token included)
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return len(self.tokens) / self.seconds if self.seconds > 0 else float("nan")


def _bos(tokenizer: Any) -> int:
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    return bos if bos is not None else 0


def encode_chat(tokenizer: Any, messages: Sequence[dict[str, Any]]) -> list[int]:
    """Token ids of `messages` ([{"role", "content"}]) in the tokenizer's chat template, ending with
    the prompt for the assistant's turn."""
    if not getattr(tokenizer, "chat_template", None):
        raise SeftcError("the model's tokenizer has no chat template; send a plain prompt instead")
    try:
        ids = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)
    except Exception as e:  # a template may reject a conversation (roles out of order, ...)
        raise SeftcError(f"the chat template rejected the messages: {str(e).splitlines()[0][:200]}") from None
    if not isinstance(ids, list):  # a BatchEncoding or a tensor, by transformers version
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
    if ids and isinstance(ids[0], list):
        ids = ids[0]
    return [int(t) for t in ids] or [_bos(tokenizer)]


def encode_prompt(tokenizer: Any, prompt: str, *, chat: bool = False) -> list[int]:
    """Token ids of `prompt` (in the chat template as one user message with `chat`, where the
    tokenizer has one); an empty prompt becomes the BOS token."""
    if chat and getattr(tokenizer, "chat_template", None):
        return encode_chat(tokenizer, [{"role": "user", "content": prompt}])
    ids = tokenizer(prompt).input_ids
    return [int(t) for t in ids] or [_bos(tokenizer)]


def generate(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int = 32, *, chat: bool = False) -> GenerateResult:
    """Greedy decoding of `prompt`; stops at an end-of-sequence token or `max_new_tokens`."""
    from seftc.runtime.engine import Engine
    from seftc.runtime.sampling import SamplingParams

    ids = encode_prompt(tokenizer, prompt, chat=chat)
    engine = Engine(model, tokenizer, max_batch=1, max_waiting=0)
    start = time.perf_counter()
    seq = engine.generate(ids, SamplingParams(temperature=0.0, max_tokens=max_new_tokens))
    seconds = time.perf_counter() - start
    return GenerateResult(prompt, seq.text, seq.tokens, seconds)
