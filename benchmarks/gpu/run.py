#!/usr/bin/env python
"""The GPU benchmark: one prepared script, one table (benchmarks/README.md has the results).

  python benchmarks/gpu/run.py --out DIR     # one GPU: under 8 minutes on one H100
  python benchmarks/gpu/run.py --smoke       # a CPU: tiny configs, the same code (CI runs it)

It needs only this checkout and the machine's own PyTorch and transformers: the models are
random weights with the real configs of Llama-3.2-1B, Qwen2.5-1.5B, Gemma-3-1B and Llama-2-7B
(benchmarks/gpu/configs, the Hub's config.json files), in bf16. Random weights cost what
trained ones cost, block for block; what they change is said where it matters: with
near-uniform logits, early stopping and the head bound cut less than on a trained model.

Measured in one run, each against the card's own figures measured first:
- peaks: bf16 matmul TFLOP/s (square matmuls) and copy bandwidth (bytes read + written / s);
- search, K = 2 on 8 windows x 2048 tokens (halved where the time left demands): plain
  greedy (remove, full forward, restore, 8 windows per forward as the official code's
  evaluation batches), the exact search (prefix reuse + early stopping) and the bounded one
  (+ the LM-head bound), all with 8 windows per forward: wall time, block forwards, the FLOP
  model's TFLOP/s and its share of the matmul peak, the speed-up over plain greedy and
  whether the removal sequence equals plain greedy's;
- decode: dense vs pruned (25% of the blocks removed, attention first: the attention blocks
  of the deepest half of the layers) greedy tokens/s at batch 1 and 16 (prompt 128, 64 new
  tokens, eager PyTorch with a dynamic KV cache), against the bandwidth bound (bytes read per
  step: the weights of the kept blocks and the LM head, plus the KV cache, over the measured
  copy bandwidth), and the KV cache's bytes;
- the workflow: one search step run by `snakemake --resources gpu=1` (the GPU slot allocator,
  `blockpruner.gpus`, on CUDA). It needs snakemake: installed, or wheels carried in
  benchmarks/gpu/wheels (`bash benchmarks/gpu/wheels.sh PYTHON_VERSION` builds them with
  `pip download`); without it the row says so.

Each part checks the time left (`--budget-s`) and is skipped with a note rather than run over.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # the checkout's package

import torch  # noqa: E402

CONFIGS = Path(__file__).resolve().parent / "configs"
WHEELS = Path(__file__).resolve().parent / "wheels"
# (name, config file, calibration windows of 2048 tokens; halved where the time left demands)
MODELS = [("Llama-3.2-1B", "llama-3.2-1b.json", 8), ("Qwen2.5-1.5B", "qwen2.5-1.5b.json", 8),
          ("Gemma-3-1B", "gemma-3-1b.json", 8), ("Llama-2-7B", "llama-2-7b.json", 8)]
SEARCH_METHODS = ("plain", "exact", "bounded")
DECODE_S = 25.0  # decode's share of a model's time (8 runs of 64 tokens; ~30 ms a token on 7B in eager mode)
WORKFLOW_S = 45.0  # the workflow row: snakemake's start, three small jobs


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_loop(fn, device: torch.device, seconds: float, warmup: int = 2) -> float:
    """Seconds per call of `fn`, calls repeated for about `seconds` after `warmup` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    calls, t0 = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        sync(device)
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds:
            return elapsed / calls


def matmul_peak(device: torch.device, n: int, seconds: float) -> float:
    """bf16 matmul FLOP/s of an n x n x n product (the card's practical peak)."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    out = torch.empty(n, n, device=device, dtype=torch.bfloat16)
    per_call = timed_loop(lambda: torch.matmul(a, b, out=out), device, seconds)
    return 2 * n**3 / per_call


def copy_bandwidth(device: torch.device, nbytes: int, seconds: float) -> float:
    """Bytes read plus written per second by a device-to-device copy."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    per_call = timed_loop(lambda: dst.copy_(src), device, seconds)
    return 2 * nbytes / per_call


# ---------------------------------------------------------------------------- models


def real_config(file: str, smoke: bool):
    """The real config (`smoke`: the same class and features at a tiny size)."""
    from transformers import AutoConfig

    d = json.loads((CONFIGS / file).read_text())
    if smoke:
        heads = 4
        kv = max(1, min(d["num_key_value_heads"], heads))
        d |= {"num_hidden_layers": 4, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": heads,
              "num_key_value_heads": kv if heads % kv == 0 else 1, "head_dim": 16, "vocab_size": 1024}
        if "sliding_window" in d and d.get("model_type") == "gemma3_text":
            d |= {"sliding_window": 8, "sliding_window_pattern": 2}
    return AutoConfig.for_model(**d)


def random_model(config, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """Random weights built on the device (a 7B model initialised on the host takes minutes).
    Norm weights are drawn too, N(1, 0.5) (Gemma's, stored as w in 1 + w: N(0, 0.5)), so that
    blocks differ in importance as a trained model's do; otherwise every norm is 1."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    centre = 0.0 if config.model_type.startswith("gemma") else 1.0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(centre, 0.5)
    return model.eval()


def predicted_s(config, windows: int, seqlen: int, peak: float) -> float:
    """Predicted seconds of the three searches at K = 2: plain greedy runs the whole model
    (~2 x parameters FLOPs per token) once per candidate and step; exact and bounded about
    0.6x that each; at 40% of the matmul peak."""
    c = config.get_text_config()
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    attention = 2 * c.hidden_size * head_dim * (c.num_attention_heads + c.num_key_value_heads)
    layer = attention + 3 * c.hidden_size * c.intermediate_size
    per_token = 2 * (layer * c.num_hidden_layers + c.hidden_size * c.vocab_size)
    plain = 2 * 2 * c.num_hidden_layers * windows * seqlen * per_token
    return 2.2 * plain / (0.4 * peak)


def random_windows(n: int, seqlen: int, vocab: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (seqlen,), generator=g) for _ in range(n)]


def pruned_blocks(num_layers: int) -> list[str]:
    """25% of the 2L blocks, attention first: the attention blocks of the deepest half."""
    return [f"attn.{i}" for i in range(num_layers - num_layers // 2, num_layers)]


# ---------------------------------------------------------------------------- search


def search_rows(name: str, pm, windows, peak: float, window_batch: int, log) -> list[dict]:
    """Plain greedy, exact and bounded, K = 2, interleaved step by step (report.search_speed)."""
    from blockpruner.report.search_speed import run

    res = run(pm, windows, 2, SEARCH_METHODS, window_batch=window_batch, log=log)
    plain = res["methods"]["plain"]
    rows = []
    for method, r in res["methods"].items():
        tflops = r["flops"] / r["wall_s"] / 1e12
        rows.append({"model": name, "part": "search", "case": f"{method} (B={window_batch})", "wall_s": r["wall_s"],
                     "speedup": plain["wall_s"] / r["wall_s"], "block_forwards": r["block_forwards"],
                     "tflops": tflops, "peak_share": tflops * 1e12 / peak,
                     "note": (("same sequence as plain" if r.get("equals_plain") else "SEQUENCE DIFFERS FROM PLAIN")
                              + f" ({', '.join(r['sequence'])}); stopped {r['stopped_candidates']}, "
                              f"bounded {r['bounded_candidates']}")})
    return rows


# ---------------------------------------------------------------------------- decode


@torch.no_grad()
def decode_run(model, batch: int, prompt: int, new_tokens: int, device: torch.device, seed: int = 0):
    """Seconds for `new_tokens` greedy decode steps after a prefill, and the cache."""
    from transformers import DynamicCache

    vocab = model.config.get_text_config().vocab_size
    ids = torch.randint(3, vocab, (batch, prompt), generator=torch.Generator().manual_seed(seed)).to(device)
    cache = DynamicCache(config=model.config)
    out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    nxt = out.logits[:, -1:].argmax(-1)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(new_tokens):
        out = model(input_ids=nxt, past_key_values=cache, use_cache=True, logits_to_keep=1)
        nxt = out.logits[:, -1:].argmax(-1)
    sync(device)
    return time.perf_counter() - t0, cache


def decode_bytes(pm, removed: list[str], kv_per_position: int, batch: int, context: float) -> float:
    """Bytes one decode step must read: the kept blocks' weights, the final norm and LM head
    (the embedding reads `batch` rows only), and every kept layer's KV cache over `context`
    positions per sequence (sliding-window layers too: the runs' 192 positions fit Gemma 3's
    512-token window)."""
    from blockpruner.adapters import get_path

    element = next(pm.model.parameters()).element_size()
    weights = sum(pm.block_params(b) for b in pm.names if b not in set(removed))
    head = get_path(pm.model, pm.adapter.lm_head).weight.numel()
    norm = get_path(pm.model, pm.adapter.final_norm).weight.numel()
    return (weights + head + norm) * element + kv_per_position * batch * context


def decode_rows(name: str, pm, bandwidth: float, smoke: bool, device: torch.device) -> list[dict]:
    from blockpruner.eval.speed import kv_bytes_per_token

    prompt, new_tokens = (8, 4) if smoke else (128, 64)
    removed = pruned_blocks(pm.num_layers)
    rows, dense_tps = [], {}
    for label, blocks in (("dense", []), (f"pruned (-{len(removed)} attn)", removed)):
        pm.set_removed(blocks)
        for batch in (1, 16):
            decode_run(pm.model, batch, prompt, 2, device)  # warm-up
            times = [decode_run(pm.model, batch, prompt, new_tokens, device) for _ in range(3)]
            seconds = statistics.median(t for t, _ in times)
            kv_per_position, _ = kv_bytes_per_token(times[0][1])
            tps = batch * new_tokens / seconds
            bound = batch / (decode_bytes(pm, blocks, kv_per_position, batch, prompt + new_tokens / 2) / bandwidth)
            dense_tps.setdefault(batch, tps)
            rows.append({"model": name, "part": "decode", "case": f"{label}, batch {batch}", "tokens_per_s": tps,
                         "speedup": tps / dense_tps[batch], "bound_tokens_per_s": bound, "bound_share": tps / bound,
                         "kv_mib": kv_per_position * batch * (prompt + new_tokens) / 2**20})
    pm.set_removed([])
    return rows


# ---------------------------------------------------------------------------- workflow


def ensure_snakemake() -> str | None:
    """None if snakemake can run, else why not (after trying the carried wheels)."""
    import importlib.util

    if importlib.util.find_spec("snakemake"):
        return None
    if not WHEELS.is_dir():
        return f"snakemake not installed and no wheels in {WHEELS.relative_to(ROOT)} (bash benchmarks/gpu/wheels.sh)"
    p = subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(WHEELS),
                        "snakemake", "pandas", "pyyaml", "jsonschema", "tqdm"], capture_output=True, text=True)
    if p.returncode != 0:
        return "installing the carried wheels failed: " + p.stderr.strip().splitlines()[-1]
    return None


def workflow_row(device: torch.device, tmp: Path) -> dict:
    """One search step of a tiny random Llama through `snakemake --resources gpu=1`."""
    import yaml
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    row = {"model": "tiny Llama", "part": "workflow", "case": "snakemake --cores 2 --resources gpu=1"}
    why = ensure_snakemake()
    if why:
        return row | {"note": "not run: " + why}
    words = [f"w{i}" for i in range(200)]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "<unk>", *words])},
                                    unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                  eos_token="</s>")
    model_dir = tmp / "tiny-llama"
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    random_model(cfg, torch.device("cpu"), torch.float32).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    g = torch.Generator().manual_seed(0)
    calib = tmp / "calib.jsonl"
    calib.write_text("".join(json.dumps({"text": " ".join(words[int(i)] for i in torch.randint(0, 200, (40,), generator=g))})
                             + "\n" for _ in range(8)))
    gpu = device.type == "cuda"
    config = {"data_root": str(tmp), "device": "cuda" if gpu else "cpu", "gpu_slots": str(tmp / "gpu-slots"),
              "models": {"tiny": {"source": str(model_dir), "dtype": "fp32"}},
              "calibration": {"c": {"path": str(calib), "nsamples": 8, "seed": 42, "seqlen": 32, "mode": "concat"}},
              "methods": {"bp": {"algorithm": "blockpruner"}}, "search": {"max_k": 1},
              "prunings": {"k": [1], "ratio": []}, "analyses": {"enabled": False},
              "evaluate": {"dense": False, "perplexity": {"enabled": False}, "tasks": {"enabled": False},
                           "speed": {"enabled": False}}}
    (tmp / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    target = "results/search/tiny/c/bp/step_1.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SNAKEMAKE")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "snakemake", target, "-s", str(ROOT / "Snakefile"), "--directory", str(tmp),
                        "--configfile", str(tmp / "config.yaml"), "--cores", "2", "--resources", "gpu=1"],
                       capture_output=True, text=True, env=env, timeout=600)
    wall = time.perf_counter() - t0
    log = tmp / "logs/search_step/tiny/c/bp/step_1.log"
    slot = [line for line in log.read_text().splitlines() if "CUDA_VISIBLE_DEVICES" in line] if log.exists() else []
    if p.returncode != 0 or not (tmp / target).exists():
        tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
        return row | {"wall_s": wall, "note": f"FAILED (exit {p.returncode}): {' | '.join(tail)}"}
    step = json.loads((tmp / target).read_text())
    batch = step["settings"].get("window_batch", 1)
    return row | {"wall_s": wall, "note": f"exit 0; step 1 removed {step['removed_block']}; window batch {batch} "
                                          f"({'GPU' if batch > 1 else 'CPU'} default); "
                                          f"{slot[0].strip() if slot else 'no GPU slot claimed (device cpu)'}"}


# ---------------------------------------------------------------------------- the table


COLUMNS = [("model", "model", "{}"), ("part", "part", "{}"), ("case", "case", "{}"), ("wall s", "wall_s", "{:.2f}"),
           ("× plain / × dense", "speedup", "{:.2f}"), ("block fwd", "block_forwards", "{}"),
           ("TFLOP/s", "tflops", "{:.1f}"), ("% matmul peak", "peak_share", "{:.0%}"),
           ("tok/s", "tokens_per_s", "{:.1f}"), ("bound tok/s", "bound_tokens_per_s", "{:.1f}"),
           ("% of bound", "bound_share", "{:.0%}"), ("KV MiB", "kv_mib", "{:.1f}"), ("note", "note", "{}")]


def table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(c for c, _, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        lines.append("| " + " | ".join(fmt.format(r[k]) if r.get(k) is not None else "–" for _, k, fmt in COLUMNS) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--smoke", action="store_true", help="tiny configs on the CPU (the same code; CI's test)")
    p.add_argument("--out", default=None, help="write table.md and results.json here")
    p.add_argument("--budget-s", type=float, default=450.0, help="time for the whole run; parts that would start "
                                                                 "too late are skipped with a note (default 450)")
    p.add_argument("--models", default=None, help="comma-separated subset of: " + ", ".join(m for m, _, _ in MODELS))
    p.add_argument("--window-batch", type=int, default=8, help="windows per forward for every search method "
                                                               "(default 8, the official evaluation's)")
    a = p.parse_args(argv)
    start = time.perf_counter()
    device = torch.device("cpu" if a.smoke or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and not a.smoke:
        p.error("no CUDA device visible: run with --smoke on a CPU")
    dtype = torch.float32 if a.smoke else torch.bfloat16
    seqlen = 32 if a.smoke else 2048
    # bf16 GEMMs that reduce in fp32: the head bound's rounding allowance is then small
    # (scoring.rounding_allowance); every method runs with the same setting
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False

    def log(s: str) -> None:
        print(f"[{time.perf_counter() - start:6.1f} s] {s}", flush=True)

    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    log(f"{card}; torch {torch.__version__}; python {sys.version.split()[0]}")
    peak = matmul_peak(device, 256 if a.smoke else 8192, 0.2 if a.smoke else 2.0)
    bandwidth = copy_bandwidth(device, 2**24 if a.smoke else 2**30, 0.2 if a.smoke else 2.0)
    log(f"bf16 matmul peak {peak / 1e12:.1f} TFLOP/s; copy bandwidth {bandwidth / 1e9:.0f} GB/s")
    rows: list[dict] = [{"model": card, "part": "peaks", "case": "measured",
                         "note": f"bf16 matmul {peak / 1e12:.1f} TFLOP/s, copy {bandwidth / 1e9:.0f} GB/s"}]
    chosen = [m for m in MODELS if a.models is None or m[0] in a.models.split(",")]
    from blockpruner.blocks import PrunableModel

    for i, (name, file, nwin) in enumerate(chosen):
        left = a.budget_s - (time.perf_counter() - start) - WORKFLOW_S
        config = real_config(file, a.smoke)
        model = random_model(config, device, dtype)
        pm = PrunableModel.wrap(model)
        nwin = 4 if a.smoke else nwin
        # the later models' search at this model's rate, so that each keeps a fair share
        later = sum(predicted_s(real_config(f, a.smoke), nwin_, seqlen, peak) for _, f, nwin_ in chosen[i + 1:])
        while nwin > 2 and predicted_s(config, nwin, seqlen, peak) + DECODE_S > left - later:
            nwin //= 2
        if predicted_s(config, nwin, seqlen, peak) + DECODE_S > left:
            rows.append({"model": name, "part": "search", "case": "–", "note": f"skipped: {left:.0f} s left"})
            del model, pm
            continue
        windows = random_windows(nwin, seqlen, config.get_text_config().vocab_size)
        log(f"{name}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters, {len(windows)} x {seqlen} "
            f"tokens; search (predicted {predicted_s(config, nwin, seqlen, peak):.0f} s, {left:.0f} s left)")
        rows += search_rows(name, pm, windows, peak, a.window_batch, log)
        log(f"{name}: decode")
        rows += decode_rows(name, pm, bandwidth, a.smoke, device)
        del model, pm
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(table(rows[-7:]), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        log("workflow")
        rows.append(workflow_row(device, Path(tmp)))
    text = (f"{card}, {time.strftime('%Y-%m-%d')}, torch {torch.__version__}; total {time.perf_counter() - start:.0f} s\n\n"
            + table(rows))
    print(text, flush=True)
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "table.md").write_text(text + "\n")
        (out / "results.json").write_text(json.dumps({"card": card, "rows": rows}, indent=1) + "\n")
    return {"card": card, "rows": rows, "peak_flops": peak, "bandwidth": bandwidth}


if __name__ == "__main__":
    main()
