"""Speed of a GGUF file in llama.cpp: prompt and generation tokens/s, and the KV cache llama.cpp reports.

`measure_gguf(model, baseline)` times both files in one run, one loaded at a time, with the same
fixed random prompt: a timed run evaluates the prompt in one batch (prompt tokens/s), then
generates `new_tokens` greedily one at a time through the KV cache (generation tokens/s);
medians over `repeats` runs after `warmup` untimed ones. The KV-cache size is the one llama.cpp
logs when it builds the context (`llama_kv_cache: size = ...`), with flash attention off (its
default on CPU), where an attention-free layer still keeps V rows, and on, where it keeps none.
"""

from __future__ import annotations

import contextlib
import io
import re
import statistics
import time
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..export.llamacpp import llama_cpp_module

FORMAT = "blockpruner.speed_gguf/1"
KV_CELLS = 4096  # llama.cpp logs the cache in MiB with two decimals: enough cells for bytes per token to be exact
KV_LINE = re.compile(r"llama_kv_cache: size = +([\d.]+) MiB \( *(\d+) cells, +(\d+) layers")


def kv_cache_report(path: str | Path, n_ctx: int, flash_attn: bool) -> dict:
    """llama.cpp's own account of the KV cache it allocates for `n_ctx` cells (from its log)."""
    llama_cpp = llama_cpp_module()
    buf = io.StringIO()
    with contextlib.redirect_stderr(buf):
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, verbose=True, n_threads=1, flash_attn=flash_attn)
        llm.close()
    m = KV_LINE.search(buf.getvalue())
    if m is None:
        raise UserError(f"llama.cpp logged no KV-cache size for {path}")
    mib, cells, layers = float(m.group(1)), int(m.group(2)), int(m.group(3))
    return {"kv_bytes_per_token": round(mib * 2**20 / cells), "kv_layers": layers, "flash_attn": flash_attn}


def measure_one(path: str | Path, ids: list[int], new_tokens: int, repeats: int, warmup: int, threads: int) -> dict:
    from ..export.llamacpp import open_gguf

    llm = open_gguf(path, n_ctx=len(ids) + new_tokens + 8, threads=threads, logits_all=False)
    prompt_s, gen_s = [], []
    try:
        for run in range(warmup + repeats):
            llm.reset()
            t0 = time.perf_counter()
            llm.eval(ids)
            t1 = time.perf_counter()
            for _ in range(new_tokens):
                llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
            t2 = time.perf_counter()
            if run >= warmup:
                prompt_s.append(t1 - t0)
                gen_s.append(t2 - t1)
    finally:
        llm.close()
    p, g = statistics.median(prompt_s), statistics.median(gen_s)
    out = {"file": str(path), "bytes": Path(path).stat().st_size, "prompt_median_s": p, "gen_median_s": g,
           "prompt_tokens_per_s": len(ids) / p, "gen_tokens_per_s": new_tokens / g,
           "prompt_s": prompt_s, "gen_s": gen_s}
    for fa in (False, True):
        r = kv_cache_report(path, KV_CELLS, fa)
        out[f"kv_bytes_per_token{'_flash' if fa else ''}"] = r["kv_bytes_per_token"]
    return out


def measure_gguf(model: str | Path, baseline: str | Path | None = None, prompt_tokens: int = 64, new_tokens: int = 64,
                 repeats: int = 5, warmup: int = 1, threads: int = 1, seed: int = 0) -> dict:
    """Both files timed in one run: the model's and the baseline's figures and their ratios."""
    for p in [model] + ([baseline] if baseline else []):
        if not Path(p).is_file():
            raise UserError(f"{p}: no such GGUF file; write it with `blockpruner export-gguf`")
    if repeats < 1 or warmup < 0 or prompt_tokens < 1 or new_tokens < 1:
        raise UserError("--repeats, --prompt-tokens and --new-tokens must be >= 1 and --warmup >= 0")
    llama_cpp = llama_cpp_module()
    reader = llama_cpp.Llama(model_path=str(model), n_ctx=16, verbose=False, vocab_only=True)
    vocab = reader.n_vocab()
    reader.close()
    ids = np.random.default_rng(seed).integers(3, vocab, prompt_tokens).tolist()
    result = {"engine": f"llama.cpp (llama-cpp-python {llama_cpp.__version__})", "threads": threads,
              "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "repeats": repeats, "warmup": warmup,
              "baseline": measure_one(baseline, ids, new_tokens, repeats, warmup, threads) if baseline else None,
              "model": measure_one(model, ids, new_tokens, repeats, warmup, threads)}
    if baseline:
        b, m = result["baseline"], result["model"]
        result["gen_speedup"] = m["gen_tokens_per_s"] / b["gen_tokens_per_s"]
        result["prompt_speedup"] = m["prompt_tokens_per_s"] / b["prompt_tokens_per_s"]
        result["kv_cache_reduction"] = 1 - m["kv_bytes_per_token"] / b["kv_bytes_per_token"]
        result["kv_cache_reduction_flash"] = 1 - m["kv_bytes_per_token_flash"] / b["kv_bytes_per_token_flash"]
        result["size_reduction"] = 1 - m["bytes"] / b["bytes"]
    return result


def write_speed_gguf(path: str | Path, result: dict) -> dict:
    from ..artifacts import write_json

    return write_json(path, result, FORMAT)
