"""Inference-speed benchmark: does removing blocks make generation faster and the KV cache smaller?

`measure(model_dir, baseline_dir)` runs greedy generation with the KV cache (a fixed random
prompt of `prompt_tokens`, exactly `new_tokens` generated, batch 1) `warmup + repeats` times
per model, one model loaded at a time, and reports per model:

- `gen_mean_s` / `gen_median_s`: wall time of one whole `generate` call (prefill included),
  `tokens_per_s` = new_tokens / gen_mean_s, `prefill_s`: median time of one forward over the
  prompt that fills a fresh cache;
- `kv_bytes_per_token`: bytes the cache holds per token position, counted from the cache
  after a generation (sum over its layers of keys + values); a pruned model's cache has
  slots only for its remaining attention blocks, so this shrinks with every attention
  block removed;
- `peak_mem_bytes` with `peak_mem_kind` saying what it is: on CUDA
  `torch.cuda.max_memory_allocated` over the measured runs (weights included); on CPU the peak
  resident-set size sampled during the runs minus the RSS before them (the working memory
  of generation: cache, activations, allocator). tracemalloc cannot see torch's allocations,
  and ru_maxrss cannot be reset between the two models, hence the sampling.

Timing uses CUDA events on a GPU and `time.perf_counter` on the CPU. The result is written as
a `blockpruner.speed/1` artifact with the speedup (baseline mean / model mean) and the KV
cache reduction (1 - model bytes / baseline bytes).
"""

from __future__ import annotations

import gc
import os
import statistics
import threading
import time
from pathlib import Path

import torch

from ..errors import UserError
from ..model_dir import load_model_dir

FORMAT = "blockpruner.speed/1"


# -- memory and time --------------------------------------------------------------------------------
def _rss() -> int:
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:  # Linux without psutil
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class RssSampler:
    """Peak RSS above the starting RSS, sampled by a thread while the block runs."""

    def __init__(self, interval_s: float = 0.002):
        self.interval_s = interval_s
        self.peak_delta = 0

    def __enter__(self) -> "RssSampler":
        self.start = _rss()
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            self._stop.wait(self.interval_s)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())
        self.peak_delta = self.peak - self.start


def release_free_memory() -> None:
    """Hand freed heap memory back to the OS (glibc), so the next run's RSS growth is its own.

    Without it a run reuses what earlier runs (or the other model) freed, and the RSS delta
    shows almost nothing.
    """
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the delta is a lower bound
        pass


def timed(fn, device: str) -> float:
    """Seconds one call of `fn` takes (CUDA events on a GPU, perf_counter on the CPU)."""
    if device.startswith("cuda"):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1000.0
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# -- the measurement --------------------------------------------------------------------------------
def kv_bytes_per_token(cache) -> tuple[int, int]:
    """(bytes per token position summed over the cache's layers, number of layers holding keys)."""
    total, layers = 0, 0
    for layer in getattr(cache, "layers", []):
        k, v = getattr(layer, "keys", None), getattr(layer, "values", None)
        if k is None or v is None or k.numel() == 0:
            continue
        # [batch, kv_heads, positions, head_dim]: per position and sequence
        total += (k.shape[1] * k.shape[-1] * k.element_size() + v.shape[1] * v.shape[-1] * v.element_size())
        layers += 1
    return total, layers


def prompt_ids(vocab_size: int, prompt_tokens: int, seed: int) -> torch.Tensor:
    """A fixed random prompt; ids from the upper part of the vocabulary, clear of special tokens."""
    g = torch.Generator().manual_seed(seed)
    low = min(1000, vocab_size // 2)
    return torch.randint(low, vocab_size, (1, prompt_tokens), generator=g)


def measure_one(model, ids: torch.Tensor, new_tokens: int, repeats: int, warmup: int, device: str) -> dict:
    """Timings, KV bytes and peak memory of greedy generation for one loaded model."""
    from transformers import DynamicCache

    ids = ids.to(device)
    mask = torch.ones_like(ids)
    gen = dict(do_sample=False, min_new_tokens=new_tokens, max_new_tokens=new_tokens, attention_mask=mask,
               pad_token_id=model.config.get_text_config().pad_token_id or 0)

    def generate():
        return model.generate(ids, **gen)

    def prefill():
        return model(ids, attention_mask=mask, past_key_values=DynamicCache(config=model.config), use_cache=True)

    with torch.inference_mode():
        out = model.generate(ids, return_dict_in_generate=True, **gen)
        produced = out.sequences.shape[1] - ids.shape[1]
        if produced != new_tokens:
            raise UserError(f"generation produced {produced} tokens instead of {new_tokens}")
        kv_per_token, kv_layers = kv_bytes_per_token(out.past_key_values)
        del out
        for _ in range(max(0, warmup - 1)):
            generate()
        is_cuda = device.startswith("cuda")
        if is_cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        prefill_s = [timed(prefill, device) for _ in range(repeats)]
        gen_s = [timed(generate, device) for _ in range(repeats)]
        if is_cuda:
            peak, kind = torch.cuda.max_memory_allocated(device), "cuda_max_memory_allocated (weights included)"
        else:  # one more run, untimed: the sampling thread would slow the timed ones
            release_free_memory()
            with RssSampler() as sampler:
                generate()
            peak, kind = sampler.peak_delta, "cpu_rss_peak_delta (sampled every 2 ms, weights excluded)"
    mean = statistics.fmean(gen_s)
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "weights_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "kv_bytes_per_token": kv_per_token,
        "kv_cache_layers": kv_layers,
        "prefill_s": statistics.median(prefill_s),
        "gen_mean_s": mean,
        "gen_median_s": statistics.median(gen_s),
        "gen_min_s": min(gen_s),
        "tokens_per_s": new_tokens / mean,
        "peak_mem_bytes": int(peak),
        "peak_mem_kind": kind,
        "gen_s": gen_s,
    }


def measure(model_dir: str | Path, baseline_dir: str | Path | None = None, prompt_tokens: int = 64,
            new_tokens: int = 128, repeats: int = 20, warmup: int = 2, device: str = "auto", seed: int = 0,
            threads: int | None = None) -> dict:
    """Benchmark a model (and optionally its dense baseline, same prompt, same run).

    `threads` sets torch's CPU thread count for the run (restored after); on a shared machine
    fewer threads than cores avoids the OpenMP spinning that makes timings meaningless.
    """
    from ..devices import resolve_device

    for name, value, low in (("prompt_tokens", prompt_tokens, 1), ("new_tokens", new_tokens, 1),
                             ("repeats", repeats, 1), ("warmup", warmup, 0), ("threads", threads or 1, 1)):
        if value < low:
            raise UserError(f"{name} must be >= {low}, got {value}")
    for path in (model_dir, baseline_dir):
        if path is not None and not (Path(path) / "config.json").exists():
            raise UserError(f"{path}: no config.json; give a prepared or materialised model directory")
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _measure(model_dir, baseline_dir, prompt_tokens, new_tokens, repeats, warmup, resolve_device(device), seed)
    finally:
        torch.set_num_threads(previous)


def _measure(model_dir, baseline_dir, prompt_tokens: int, new_tokens: int, repeats: int, warmup: int, device: str,
             seed: int) -> dict:
    results: dict[str, dict | None] = {"baseline": None}
    vocab = None
    for role, path in (("baseline", baseline_dir), ("model", model_dir)):
        if path is None:
            continue
        model, _, _ = load_model_dir(path, device=device, tokenizer=False)
        text = model.config.get_text_config()
        if vocab is None:
            vocab = text.vocab_size
            ids = prompt_ids(vocab, prompt_tokens, seed)
        elif text.vocab_size != vocab:
            raise UserError(f"{model_dir} and {baseline_dir} have different vocabularies ({text.vocab_size} vs {vocab})")
        stats = measure_one(model, ids, new_tokens, repeats, warmup, device)
        results[role] = {"path": str(path), "dtype": str(next(model.parameters()).dtype).removeprefix("torch."), **stats}
        del model
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    m, b = results["model"], results["baseline"]
    return {
        "model": m,
        "baseline": b,
        "speedup": b["gen_mean_s"] / m["gen_mean_s"] if b else None,
        "kv_cache_reduction": 1 - m["kv_bytes_per_token"] / b["kv_bytes_per_token"] if b and b["kv_bytes_per_token"] else None,
        "settings": {"prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "repeats": repeats, "warmup": warmup,
                     "batch_size": 1, "seed": seed, "decoding": "greedy, KV cache",
                     "timer": "cuda_events" if device.startswith("cuda") else "perf_counter",
                     "torch_threads": torch.get_num_threads()},
        "device": torch.cuda.get_device_name(device) if device.startswith("cuda") else f"cpu ({os.cpu_count()} cores)",
    }


def write_speed(path: str | Path, result: dict) -> dict:
    from ..artifacts import write_json

    return write_json(path, result, FORMAT)
