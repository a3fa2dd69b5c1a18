"""The llama.cpp side of `make bench-peer`: one process per GGUF model, run by the python of the
peer venv (.venv-peer, where llama-cpp-python is built), answering one JSON request per line on
stdin with one JSON line on stdout. bench/bench_peer.py drives it; only one side runs at a time.

Requests ({"op": ...}):
  info                                   llama-cpp-python version and llama.cpp's system info
  quantize  src, dst, ftype, threads      llama_model_quantize (e.g. F16 -> Q8_0, ftype 7)
  load      path, threads, n_ctx          the model for generation (logits of the last token only)
  tokenize  text                          token ids (no BOS, no special-token parsing)
  generate  prompt, new_tokens            greedy: prefill, then one eval per token; times in seconds
  nll       windows [[ids, scored], ...]  summed NLL per window (a second context with logits_all)
  stats     -                              CPU seconds this process used (user + system)
"""
from __future__ import annotations

import ctypes
import json
import os
import sys
import time

import numpy as np

import llama_cpp
from peer_lib import window_nll

_state: dict = {}


def _info(req: dict) -> dict:
    return {"version": llama_cpp.__version__, "system_info": llama_cpp.llama_print_system_info().decode(errors="replace")}


def _quantize(req: dict) -> dict:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(req["ftype"])
    params.nthread = int(req.get("threads", 2))
    rc = llama_cpp.llama_model_quantize(req["src"].encode(), req["dst"].encode(), ctypes.byref(params))
    return {"rc": int(rc)}


def _llama(path: str, threads: int, n_ctx: int, logits_all: bool) -> llama_cpp.Llama:
    return llama_cpp.Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx, n_batch=n_ctx,
                           n_ubatch=n_ctx, logits_all=logits_all, verbose=False, seed=0)


def _load(req: dict) -> dict:
    llm = _llama(req["path"], int(req["threads"]), int(req["n_ctx"]), False)
    _state.update(llm=llm, path=req["path"], threads=int(req["threads"]))
    desc = ctypes.create_string_buffer(256)
    llama_cpp.llama_model_desc(llm.model, desc, len(desc))
    return {"weight_bytes": int(llama_cpp.llama_model_size(llm.model)), "params": int(llama_cpp.llama_model_n_params(llm.model)),
            "desc": desc.value.decode(errors="replace"), "n_vocab": int(llm.n_vocab())}


def _tokenize(req: dict) -> dict:
    return {"ids": _state["llm"].tokenize(req["text"].encode(), add_bos=False, special=False)}


def _argmax_last(llm: llama_cpp.Llama) -> int:
    logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
    return int(logits.argmax())


def _generate(req: dict) -> dict:
    llm = _state["llm"]
    prompt, new = [int(t) for t in req["prompt"]], int(req["new_tokens"])
    llm.reset()
    start = time.perf_counter()
    llm.eval(prompt)
    tokens = [_argmax_last(llm)]
    first = time.perf_counter()
    while len(tokens) < new:
        llm.eval([tokens[-1]])
        tokens.append(_argmax_last(llm))
    end = time.perf_counter()
    return {"prefill_s": first - start, "decode_s": end - first, "tokens": tokens}


def _nll(req: dict) -> dict:
    windows = req["windows"]
    seqlen = max(len(ids) for ids, _ in windows)
    llm = _llama(_state["path"], _state["threads"], seqlen, True)
    try:
        sums = []
        for ids, scored in windows:
            llm.reset()
            llm.eval([int(t) for t in ids])
            sums.append(window_nll(llm.scores[:len(ids)], ids, int(scored)))
    finally:
        llm.close()
    return {"nll": sums}


def _stats(req: dict) -> dict:
    t = os.times()
    return {"cpu_s": t.user + t.system}


OPS = {"info": _info, "quantize": _quantize, "load": _load, "tokenize": _tokenize, "generate": _generate, "nll": _nll, "stats": _stats}


def main() -> None:
    channel = sys.stdout
    sys.stdout = sys.stderr  # anything printed by the library must not corrupt the protocol
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        try:
            reply = OPS[req["op"]](req)
        except Exception as e:  # reported to the driver, which stops with it
            reply = {"error": f"{type(e).__name__}: {e}"}
        channel.write(json.dumps(reply) + "\n")
        channel.flush()


if __name__ == "__main__":
    main()
