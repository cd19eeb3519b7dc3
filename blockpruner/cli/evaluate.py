"""Stage 4 commands: perplexity, zero-shot tasks, speed (transformers and llama.cpp)."""

from __future__ import annotations

import argparse
import json
import logging

from .common import command, device_arg, dtype_arg, model_args, numerics_arg, progress_arg

log = logging.getLogger("blockpruner")


def perplexity_args(p: argparse.ArgumentParser) -> None:
    model_args(p)
    p.add_argument("--calib", required=True, help="calibration artifact directory (any token windows)")
    p.add_argument("--remove", default="", help="comma-separated blocks to skip, e.g. attn.3,mlp.7")
    p.add_argument("--batch-size", type=int, default=1)
    progress_arg(p)


@command("perplexity", perplexity_args, help="perplexity of a model (optionally minus blocks) on a calibration artifact")
def cmd_perplexity(a: argparse.Namespace) -> None:
    from ..blocks import PrunableModel
    from ..data.calibration import load_calibration
    from ..model_dir import load_model_dir
    from ..eval.wikitext import perplexity

    calib = load_calibration(a.calib)
    model, _, _ = load_model_dir(a.model, a.dtype, a.device, a.device_map)
    pm = PrunableModel.wrap(model)
    pm.set_removed(a.remove.split(",") if a.remove else [])
    print(json.dumps(perplexity(pm, calib.windows, batch_size=a.batch_size, progress=not a.no_progress)))


def eval_ppl_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="prepared or pruned model directory")
    p.add_argument("--data", required=True, help="local test.rows.jsonl ({'text': row} per line) / .txt / .raw, or a hub "
                                                 "data set id (wikitext)")
    p.add_argument("--hub-config", default="wikitext-2-raw-v1", help="hub data set config (default: wikitext-2-raw-v1)")
    p.add_argument("--split", default="test", help="hub split (default: test)")
    p.add_argument("--seqlen", type=int, default=2048, help="tokens per window (default: 2048)")
    p.add_argument("--max-windows", type=int, default=None, help="score only the first N windows (quick runs)")
    device_arg(p)
    dtype_arg(p)
    p.add_argument("--batch-size", type=int, default=1, help="windows per forward pass (default: 1)")
    p.add_argument("--out", required=True, help="output results .json")
    numerics_arg(p)
    progress_arg(p)


@command("eval-ppl", eval_ppl_args, help="WikiText-2 perplexity of a prepared or pruned model -> results.json",
         description="Standard WikiText-2 perplexity: join the test rows with a blank line, tokenize once, score "
                     "non-overlapping windows of --seqlen tokens (remainder dropped).")
def cmd_eval_ppl(a: argparse.Namespace) -> None:
    from ..eval.wikitext import wikitext_perplexity, write_ppl

    r = wikitext_perplexity(a.model, a.data, seqlen=a.seqlen, max_windows=a.max_windows, hub_config=a.hub_config,
                            split=a.split, device=a.device, dtype=a.dtype, batch_size=a.batch_size,
                            progress=not a.no_progress, numerics=a.numerics)
    write_ppl(a.out, r)
    log.info("WikiText perplexity %.4f over %d windows of %d tokens -> %s", r["ppl"], r["windows"], r["seqlen"], a.out)


def eval_tasks_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="prepared or pruned model directory")
    p.add_argument("--tasks", default="piqa,winogrande,hellaswag,arc_easy,arc_challenge",
                   help="comma-separated: piqa, winogrande, hellaswag, arc_easy, arc_challenge, openbookqa "
                        "(default: the paper's five)")
    p.add_argument("--local-data", default=None, help="folder with piqa/, winogrande/, arc/, openbookqa/, hellaswag/ "
                                                      "(e.g. ../shared/data/evals); omit to read the Hub")
    p.add_argument("--num-fewshot", type=int, default=0, help="few-shot examples (default: 0)")
    p.add_argument("--batch-size", type=int, default=1, help="lm-eval batch size (default: 1)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N examples per task (quick runs)")
    p.add_argument("--add-bos-token", default="auto", choices=["auto", "yes", "no"],
                   help="prepend BOS to lm-eval's requests: auto = the tokenizer's choice (lm-eval >= 0.4.3), "
                        "no = as lm-eval 0.4.0, the paper's harness (default: auto)")
    device_arg(p)
    dtype_arg(p)
    p.add_argument("--out", required=True, help="output results .json")
    numerics_arg(p)


@command("eval-tasks", eval_tasks_args,
         help="lm-eval zero-shot accuracy (PIQA, WinoGrande, HellaSwag, ARC, OBQA) -> results.json",
         description="Run lm-evaluation-harness tasks on a prepared or pruned model. With --local-data the offline copies "
                     "of the tasks (same prompts and metrics) read that folder; without it the built-in tasks download "
                     "from the Hub. Reports acc_norm (acc for WinoGrande).")
def cmd_eval_tasks(a: argparse.Namespace) -> None:
    from ..eval.zeroshot import run_tasks, write_tasks

    r = run_tasks(a.model, a.tasks, a.local_data, num_fewshot=a.num_fewshot, batch_size=a.batch_size, limit=a.limit,
                  device=a.device, dtype=a.dtype, add_bos_token=a.add_bos_token, numerics=a.numerics)
    write_tasks(a.out, r)
    for name, t in r["tasks"].items():
        log.info("%-14s %s %.4f (n=%d)", name, t["metric"], t["value"], t["n"])
    log.info("average %.4f -> %s", r["average"], a.out)


def timing_args(p: argparse.ArgumentParser, new_tokens: int, repeats: int, warmup: int) -> None:
    """The sizes of a generation-speed run (speed, speed-gguf)."""
    p.add_argument("--prompt-tokens", type=int, default=64, help="prompt length (default: 64)")
    p.add_argument("--new-tokens", type=int, default=new_tokens, help=f"tokens generated per run (default: {new_tokens})")
    p.add_argument("--repeats", type=int, default=repeats, help=f"timed runs per model (default: {repeats})")
    p.add_argument("--warmup", type=int, default=warmup, help=f"untimed runs first (default: {warmup})")


def speed_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="prepared or materialised model directory")
    p.add_argument("--baseline", default=None, help="dense model directory to compare with")
    timing_args(p, new_tokens=128, repeats=20, warmup=2)
    device_arg(p)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", required=True, help="output speed .json")


@command("speed", speed_args, help="greedy-generation speed and KV-cache size of a model vs its dense baseline",
         description="Time greedy generation with KV cache (fixed random prompt, batch 1) and count KV-cache bytes per "
                     "token and peak memory, for the model and the baseline in one run.")
def cmd_speed(a: argparse.Namespace) -> None:
    from ..eval.speed import measure, write_speed

    r = measure(a.model, a.baseline, prompt_tokens=a.prompt_tokens, new_tokens=a.new_tokens, repeats=a.repeats,
                warmup=a.warmup, device=a.device, threads=a.threads)
    write_speed(a.out, r)
    for role in ("baseline", "model"):
        if r[role]:
            m = r[role]
            log.info("%-8s %.4f s / %d tokens (median %.4f s, %.1f tok/s), prefill %.4f s, KV %d B/token, peak %d B [%s]",
                     role, m["gen_mean_s"], a.new_tokens, m["gen_median_s"], m["tokens_per_s"], m["prefill_s"],
                     m["kv_bytes_per_token"], m["peak_mem_bytes"], m["peak_mem_kind"])
    if r["baseline"]:
        log.info("speedup %.3fx, KV cache reduction %.1f%% -> %s", r["speedup"], 100 * r["kv_cache_reduction"], a.out)


def speed_gguf_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="GGUF file (from export-gguf)")
    p.add_argument("--baseline", default=None, help="the dense model's GGUF file, timed in the same run")
    timing_args(p, new_tokens=64, repeats=5, warmup=1)
    p.add_argument("--threads", type=int, default=1, help="llama.cpp threads (default: 1)")
    p.add_argument("--out", required=True, help="output .json")


@command("speed-gguf", speed_gguf_args, help="prompt and generation speed of a GGUF file in llama.cpp vs its dense baseline",
         description="Time prompt processing (one batch) and greedy generation (one token at a time through the KV cache) "
                     "in llama.cpp, medians of repeated runs, for the model and the baseline in one run, with the KV-cache "
                     "size llama.cpp reports (flash attention off and on).")
def cmd_speed_gguf(a: argparse.Namespace) -> None:
    from ..eval.gguf_speed import measure_gguf, write_speed_gguf

    r = measure_gguf(a.model, a.baseline, prompt_tokens=a.prompt_tokens, new_tokens=a.new_tokens, repeats=a.repeats,
                     warmup=a.warmup, threads=a.threads)
    write_speed_gguf(a.out, r)
    for role in ("baseline", "model"):
        if r[role]:
            m = r[role]
            log.info("%-8s prompt %.1f tok/s, generation %.1f tok/s (medians of %d), KV %d B/token (%d with flash "
                     "attention), %.1f MB", role, m["prompt_tokens_per_s"], m["gen_tokens_per_s"], a.repeats,
                     m["kv_bytes_per_token"], m["kv_bytes_per_token_flash"], m["bytes"] / 1e6)
    if r["baseline"]:
        log.info("generation %.3fx, prompt %.3fx, KV cache -%.1f%% (-%.1f%% with flash attention) -> %s",
                 r["gen_speedup"], r["prompt_speedup"], 100 * r["kv_cache_reduction"],
                 100 * r["kv_cache_reduction_flash"], a.out)
