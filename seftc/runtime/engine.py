"""The decode engine: one loop that turns prompts into tokens, for `seftc generate` (a batch of one)
and `seftc serve` (continuous batching). Whatever model it is given runs as is: the sparse runtime's
`SparseLinear` layers, or a dense model for comparison.

Design: a *padded, left-aligned batch* over one KV cache.

- Every running sequence is one row of a batch. The rows share one KV cache whose tensors are
  [rows, heads, T, head_dim] per layer; each row's tokens fill the right end of its row, the columns to their
  left are padding, masked out by the attention mask [rows, T] and skipped by the per-row position
  ids (so a row computes what it would alone, up to float rounding of the batched kernels).
- `step()` is one engine iteration: admit waiting sequences in arrival order, up to `max_batch`
  rows and `max_prefill_tokens` prompt tokens (one prompt always; a burst of prompts is spread over
  several steps, so running rows keep decoding between prefills), run their prompts together in one
  left-padded prefill whose cache is merged into the running one (padding whichever is shorter on
  the left), drop the rows whose client went away (`cancel`), run one forward
  over every row with its last token, sample one token per row (`seftc.runtime.sampling`, each
  sequence with its own generator), emit it, and drop the rows that finished. After rows leave,
  leading columns that are padding in every remaining row are cut off.
- So requests join at the next step and leave at once, and a batch costs one forward per token for
  all its rows. Copies happen only when rows join or leave, and when the cache grows.
- The forward: for LLaMA-architecture models, the lean pass of `seftc.runtime.fastpath` (a static,
  preallocated KV cache written in place and grown by doubling, fused q/k/v and gate/up
  projections, no per-step concatenation); for other models, and everywhere with
  `SEFTC_FASTPATH=0`, transformers' forward over a `DynamicCache` (grown by concatenation, as in
  `transformers.generate`). Both sit behind one small interface (`runner_for`: prefill, decode,
  merge, select), which `seftc bench` times too.
- Thread model: `submit` and `cancel` may be called from any thread; `step` runs on one thread at a
  time (`run_forever` on a worker for the server, `generate` in the caller's thread for the CLI).
  Prompts wait in a bounded queue: `submit` raises `EngineFull` above `max_waiting`.
- Errors: a forward that raises fails only the sequences in it (finish reason "error"); a sink that
  raises cancels only its own sequence.
"""
from __future__ import annotations

import inspect
import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Sequence as Seq

import torch

from seftc.errors import SeftcError
from seftc.runtime.sampling import SamplingParams, find_stop, held_back, make_generator, sample


class EngineFull(Exception):
    """More sequences are waiting than the engine's bound allows; try again later."""


class EngineClosed(Exception):
    """The engine is shutting down and takes no new sequences."""


@dataclass(frozen=True)
class TokenEvent:
    """One generated token (None for a sequence that ended without one: cancelled or failed), the text
    that became final with it (may be empty: held back as a partial character or a possible stop
    string), and why the sequence ended, if it did ("stop", "length", "cancelled", "error")."""

    token: int | None
    text: str
    finish_reason: str | None = None
    time: float = 0.0  # time.perf_counter() at emission
    error: str | None = None


def cache_kwarg(model: Any) -> str:
    """The forward keyword (and output attribute) of the KV cache: `cache` in newer transformers."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def context_length(config: Any) -> int:
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


def eos_token_ids(model: Any, tokenizer: Any | None) -> set[int]:
    """End-of-sequence ids: the tokenizer's and the model's generation config's (one id or a list)."""
    ids: set[int] = set()
    sources = [getattr(tokenizer, "eos_token_id", None),
               getattr(getattr(model, "generation_config", None), "eos_token_id", None)]
    for value in sources:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    return ids


class _Detokenizer:
    """Incremental decoding: text is final once decoding the tokens since the last final point no
    longer ends in a partial character; only a short window of tokens is decoded each time."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.start = 0  # window start: tokens before it are settled
        self.read = 0  # tokens up to here have produced final text

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token: int) -> str:
        self.ids.append(token)
        before = self._decode(self.ids[self.start:self.read])
        after = self._decode(self.ids[self.start:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.start, self.read = self.read, len(self.ids)
            return after[len(before):]
        return ""

    def flush(self) -> str:
        before = self._decode(self.ids[self.start:self.read])
        after = self._decode(self.ids[self.start:])
        self.start = self.read = len(self.ids)
        return after[len(before):]


class _Batch:
    """A runner's state of the running batch: its KV cache and padding mask (rows x columns)."""

    __slots__ = ("cache", "mask")

    def __init__(self, cache: Any, mask: torch.Tensor | None = None):
        self.cache, self.mask = cache, mask


class TransformersRunner:
    """The model's own forward over a `DynamicCache`; the mask is concatenated every step."""

    name = "transformers"

    def __init__(self, model: Any):
        self.model = model
        params = inspect.signature(model.forward).parameters
        self._cache_arg = cache_kwarg(model)
        self._has_positions = "position_ids" in params
        self._has_keep = "logits_to_keep" in params

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Any) -> torch.Tensor:
        kwargs: dict[str, Any] = {self._cache_arg: cache, "use_cache": True, "attention_mask": mask}
        if self._has_positions:
            kwargs["position_ids"] = positions
        if self._has_keep:
            kwargs["logits_to_keep"] = 1
        return self.model(input_ids=ids, **kwargs).logits[:, -1, :]

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, _Batch]:
        """Left-padded prompts (ids, mask, positions [rows, T]) -> (last logits [rows, vocab], their batch)."""
        from transformers import DynamicCache

        cache = DynamicCache()
        return self._forward(ids, mask, positions, cache), _Batch(cache, mask)

    def decode(self, batch: _Batch, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One token per row (ids, positions [rows]) -> logits [rows, vocab]."""
        batch.mask = torch.cat([batch.mask, batch.mask.new_ones((batch.mask.shape[0], 1))], dim=1)
        return self._forward(ids[:, None], batch.mask, positions[:, None], batch.cache)

    def mask(self, batch: _Batch) -> torch.Tensor:
        return batch.mask

    def merge(self, a: _Batch, b: _Batch) -> _Batch:
        """a's rows then b's, padding whichever is shorter on the left."""
        width = max(a.mask.shape[1], b.mask.shape[1])
        for old, new in zip(a.cache.layers, b.cache.layers):
            if getattr(old, "keys", None) is None or getattr(new, "keys", None) is None:
                continue
            old.keys = torch.cat([_left_pad(old.keys, width, -2), _left_pad(new.keys, width, -2)], dim=0)
            old.values = torch.cat([_left_pad(old.values, width, -2), _left_pad(new.values, width, -2)], dim=0)
        return _Batch(a.cache, torch.cat([_left_pad(a.mask, width, 1), _left_pad(b.mask, width, 1)], dim=0))

    def select(self, batch: _Batch, keep: list[int]) -> _Batch:
        """Keep these rows; cut leading columns that are padding in every one of them."""
        idx = torch.tensor(keep, device=batch.mask.device)
        mask = batch.mask[idx]
        first = int(mask.any(0).to(torch.int8).argmax())  # first column some remaining row uses
        for layer in batch.cache.layers:
            if getattr(layer, "keys", None) is None:
                continue
            layer.keys = layer.keys[idx][..., first:, :]
            layer.values = layer.values[idx][..., first:, :]
        return _Batch(batch.cache, mask[:, first:])


class FastRunner:
    """The lean forward of `seftc.runtime.fastpath` over its static cache (which holds the mask)."""

    name = "fastpath"

    def __init__(self, fast: Any):
        self.fast = fast

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, _Batch]:
        cache = self.fast.new_cache(ids.shape[0], ids.shape[1])
        return self.fast.forward(ids, positions, cache, mask), _Batch(cache)

    def decode(self, batch: _Batch, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.fast.forward(ids[:, None], positions[:, None], batch.cache)

    def mask(self, batch: _Batch) -> torch.Tensor:
        return batch.cache.used_mask()

    def merge(self, a: _Batch, b: _Batch) -> _Batch:
        return _Batch(a.cache.merge(b.cache))

    def select(self, batch: _Batch, keep: list[int]) -> _Batch:
        return _Batch(batch.cache.select(keep))


def runner_for(model: Any) -> TransformersRunner | FastRunner:
    """How the engine (and `seftc bench`'s decode timing) runs `model`: the lean forward where
    `seftc.runtime.fastpath` covers it and `SEFTC_FASTPATH` is not 0, else transformers' forward."""
    from seftc.runtime import fastpath

    fast = fastpath.for_model(model)
    return FastRunner(fast) if fast is not None else TransformersRunner(model)


_ids = itertools.count(1)


class Sequence:
    """One request's state: prompt, sampling parameters, generated tokens and text, timings."""

    def __init__(self, prompt: list[int], params: SamplingParams, sink: Callable[[TokenEvent], None] | None,
                 tokenizer: Any | None):
        self.id = next(_ids)
        self.prompt = prompt
        self.params = params
        self.sink = sink
        self.tokens: list[int] = []
        self.text = ""  # final text so far (what has been emitted)
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.submitted_at = time.perf_counter()
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self.generator = make_generator(params.seed) if not params.greedy else None
        self._detok = _Detokenizer(tokenizer) if tokenizer is not None else None
        self._pending = ""  # decoded text held back because it may begin a stop string
        self._cancelled = False
        self._done = threading.Event()

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def _text_for(self, token: int) -> tuple[str, bool]:
        """Final text this token adds, and whether a stop string ended the sequence."""
        if self._detok is None:
            return "", False
        self._pending += self._detok.push(token)
        return self._release()

    def _release(self, final: bool = False) -> tuple[str, bool]:
        stops = self.params.stop
        cut = find_stop(self._pending, stops) if stops else None
        if cut is not None:
            out, self._pending = self._pending[:cut], ""
            return out, True
        keep = 0 if final or not stops else held_back(self._pending, stops)
        out = self._pending[:len(self._pending) - keep]
        self._pending = self._pending[len(self._pending) - keep:]
        return out, False

    def _flush(self) -> str:
        if self._detok is None:
            return ""
        self._pending += self._detok.flush()
        return self._release(final=True)[0]

    def _accept(self, token: int, eos: set[int], context: int) -> bool:
        """Record a sampled token and emit it; True when the sequence is finished."""
        now = time.perf_counter()
        if self.first_token_at is None:
            self.first_token_at = now
        self.tokens.append(token)
        reason = None
        if token in eos and not self.params.ignore_eos:
            reason, text = "stop", self._flush()
        else:
            text, stopped = self._text_for(token)
            if stopped:
                reason = "stop"
            elif len(self.tokens) >= self.params.max_tokens or len(self.prompt) + len(self.tokens) >= context:
                reason = "length"
                text += self._flush()
        self.text += text
        if reason is not None:  # the state is final before a listener hears of it
            self.finish_reason, self.finished_at = reason, now
        self._emit(TokenEvent(token, text, reason, now))
        if reason is not None:
            self._done.set()
        return reason is not None

    def _finish(self, reason: str, error: str | None = None) -> None:
        """End without a token (cancelled, failed)."""
        if self.finish_reason is not None:
            return
        self.finish_reason, self.error = reason, error
        self.finished_at = time.perf_counter()
        self._emit(TokenEvent(None, "", reason, self.finished_at, error))
        self._done.set()

    def _emit(self, event: TokenEvent) -> None:
        if self.sink is None:
            return
        try:
            self.sink(event)
        except Exception:  # a listener that cannot take events (its client is gone) ends only this sequence
            self._cancelled = True


@dataclass
class EngineStats:
    steps: int = 0  # decode forwards
    decode_rows: int = 0  # sum of batch sizes over decode forwards
    prefills: int = 0
    prefill_rows: int = 0
    peak_batch: int = 0
    cancelled: int = 0
    errors: int = 0


class Engine:
    """Continuous-batching decode over one model. See the module docstring for the design."""

    def __init__(self, model: Any, tokenizer: Any | None = None, *, max_batch: int = 16, max_waiting: int = 64,
                 max_prefill_tokens: int = 256,
                 context: int | None = None, eos: set[int] | None = None):
        if max_batch < 1 or max_waiting < 0 or max_prefill_tokens < 1:
            raise ValueError("max_batch and max_prefill_tokens must be >= 1, max_waiting >= 0")
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.max_waiting = max_waiting
        self.max_prefill_tokens = max_prefill_tokens
        self.context = context or context_length(model.config)
        self.eos = set(eos) if eos is not None else eos_token_ids(model, tokenizer)
        self.device = next(model.parameters()).device
        self.runner = runner_for(model)
        self.stats = EngineStats()
        self._cond = threading.Condition()
        self._waiting: deque[Sequence] = deque()
        self._closed = False
        self._stopping = False
        # the batch: rows, and per row its last token and next position; the runner's cache and mask
        self._rows: list[Sequence] = []
        self._batch: _Batch | None = None
        self._positions: torch.Tensor | None = None
        self._next: torch.Tensor | None = None

    # --- any thread -------------------------------------------------------------------------------
    @property
    def _mask(self) -> torch.Tensor | None:
        """The batch's padding mask [rows, columns] (None while no row runs)."""
        return None if self._batch is None else self.runner.mask(self._batch)

    @property
    def running(self) -> int:
        return len(self._rows)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def closed(self) -> bool:
        return self._closed

    def submit(self, prompt: Seq[int], params: SamplingParams,
               sink: Callable[[TokenEvent], None] | None = None) -> Sequence:
        """Queue a prompt (token ids); its tokens go to `sink` (called on the engine's thread, must
        not block) as they are sampled. Raises SeftcError for a prompt the model cannot take,
        EngineFull above the waiting bound, EngineClosed while shutting down."""
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise SeftcError("the prompt is empty")
        if len(prompt) >= self.context:
            raise SeftcError(f"the prompt has {len(prompt)} tokens; the model's context is {self.context} "
                             f"(prompt and new tokens together); shorten the prompt")
        if params.stop and self.tokenizer is None:
            raise SeftcError("stop strings need a tokenizer")
        seq = Sequence(prompt, params, sink, self.tokenizer)
        with self._cond:
            if self._closed:
                raise EngineClosed("the engine is shutting down")
            if len(self._waiting) >= self.max_waiting + (self.max_batch - len(self._rows)):
                raise EngineFull(f"{len(self._waiting)} requests are waiting (bound {self.max_waiting})")
            self._waiting.append(seq)
            self._cond.notify_all()
        return seq

    def cancel(self, seq: Sequence) -> None:
        """Drop a sequence at the next step (its client went away); no more tokens are emitted."""
        seq._cancelled = True
        with self._cond:
            self._cond.notify_all()

    def shutdown(self, drain: bool = True) -> None:
        """Take no new sequences; `run_forever` returns once the running and waiting ones are done
        (drain) or at once after cancelling them (drain=False)."""
        with self._cond:
            self._closed = True
            self._stopping = True
            if not drain:
                for seq in list(self._waiting) + self._rows:
                    seq._cancelled = True
            self._cond.notify_all()

    # --- the stepping thread ----------------------------------------------------------------------
    def run_forever(self) -> None:
        """Step while there is work; sleep until there is; return after `shutdown` once idle."""
        while True:
            with self._cond:
                while not self._waiting and not self._rows:
                    if self._stopping:
                        return
                    self._cond.wait()
            try:
                self.step()
            except Exception as e:  # a bug in a step fails the batch in it, never the loop (or the server)
                self._fail_running(f"{type(e).__name__}: {e}")

    def _fail_running(self, error: str) -> None:
        for seq in self._rows:
            self._end(seq, "error", error)
        self._remove(list(range(len(self._rows))))

    def generate(self, prompt: Seq[int], params: SamplingParams) -> Sequence:
        """Run one prompt to the end in the caller's thread (not while `run_forever` runs)."""
        seq = self.submit(prompt, params)
        while not seq.done:
            self.step()
        return seq

    def warmup(self) -> None:
        """Decode two tokens of a one-token prompt, so that kernel loading (or building) and first-call
        costs are paid before the first request; the statistics are reset after."""
        self.generate([0], SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True))
        self.stats = EngineStats()

    @torch.inference_mode()
    def step(self) -> None:
        """Drop cancelled rows, admit waiting sequences (one prefill), one decode forward over all rows."""
        with self._cond:
            admitted: list[Sequence] = []
            still: deque[Sequence] = deque()
            tokens, closed = 0, False  # first come, first served: admission stops at the first that does not fit
            for seq in self._waiting:
                if seq._cancelled:
                    self._end(seq, "cancelled")
                    continue
                fits = (len(self._rows) + len(admitted) < self.max_batch
                        and (not admitted or tokens + len(seq.prompt) <= self.max_prefill_tokens))
                if fits and not closed:
                    admitted.append(seq)
                    tokens += len(seq.prompt)
                else:
                    closed = True
                    still.append(seq)
            self._waiting = still
        if admitted:
            self._prefill(admitted)
        gone = [i for i, s in enumerate(self._rows) if s._cancelled]  # up to the last moment
        for i in gone:
            self._end(self._rows[i], "cancelled")
        self._remove(gone)
        if self._rows:
            self._decode()

    def _end(self, seq: Sequence, reason: str, error: str | None = None) -> None:
        if reason == "cancelled":
            self.stats.cancelled += 1
        elif reason == "error":
            self.stats.errors += 1
        seq._finish(reason, error)

    def _prefill(self, seqs: list[Sequence]) -> None:
        longest = max(len(s.prompt) for s in seqs)
        ids = torch.zeros((len(seqs), longest), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(seqs):
            ids[i, longest - len(s.prompt):] = torch.tensor(s.prompt)
            mask[i, longest - len(s.prompt):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        try:
            logits, batch = self.runner.prefill(ids, mask, positions)
        except Exception as e:  # fails these sequences only; the running batch is untouched
            for s in seqs:
                self._end(s, "error", f"prefill failed: {type(e).__name__}: {e}")
            return
        self.stats.prefills += 1
        self.stats.prefill_rows += len(seqs)
        first = len(self._rows)
        self._merge(seqs, batch, torch.tensor([len(s.prompt) for s in seqs], device=self.device))
        self._advance(range(first, first + len(seqs)), logits)

    def _decode(self) -> None:
        rows = len(self._rows)
        try:
            logits = self.runner.decode(self._batch, self._next, self._positions)
        except Exception as e:
            self._fail_running(f"decode failed: {type(e).__name__}: {e}")
            return
        self._positions = self._positions + 1
        self.stats.steps += 1
        self.stats.decode_rows += rows
        self.stats.peak_batch = max(self.stats.peak_batch, rows)
        self._advance(range(rows), logits)

    def _advance(self, rows: range, logits: torch.Tensor) -> None:
        """Sample one token for each of `rows` (logits[j] belongs to rows[j]), emit, drop finished rows."""
        greedy = logits.argmax(-1).tolist()
        done = []
        for j, i in enumerate(rows):
            seq = self._rows[i]
            token = greedy[j] if seq.params.greedy else sample(logits[j], seq.params, seq.generator)
            self._next[i] = token
            if seq._accept(token, self.eos, self.context):
                done.append(i)
        self._remove(done)

    def _merge(self, seqs: list[Sequence], batch: _Batch, positions: torch.Tensor) -> None:
        """Append new rows (their prefilled cache and mask) to the batch, padding on the left."""
        nxt = torch.zeros(len(seqs), dtype=torch.long, device=self.device)
        if not self._rows:
            self._batch, self._positions, self._next = batch, positions, nxt
        else:
            self._batch = self.runner.merge(self._batch, batch)
            self._positions = torch.cat([self._positions, positions])
            self._next = torch.cat([self._next, nxt])
        self._rows.extend(seqs)

    def _remove(self, rows: list[int]) -> None:
        """Drop rows from the batch; then cut leading columns that are padding in every row left."""
        if not rows:
            return
        gone = set(rows)
        keep = [i for i in range(len(self._rows)) if i not in gone]
        if not keep:
            self._rows, self._batch, self._positions, self._next = [], None, None, None
            return
        idx = torch.tensor(keep, device=self.device)
        self._batch = self.runner.select(self._batch, keep)
        self._positions, self._next = self._positions[idx], self._next[idx]
        self._rows = [self._rows[i] for i in keep]


def _left_pad(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)
