"""Stage 2 commands: search steps, their shards, the baselines, and reading the sequence."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..errors import Resumable, UserError
from ..search import HEAD_BOUND_COLUMNS
from .common import command, model_args, numerics_arg, progress_arg, window_batch_arg

log = logging.getLogger("blockpruner")


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
    p.add_argument("--log-every", type=float, default=60.0, metavar="S",
                   help="log a progress line every S seconds: candidates finished, candidate-windows done, the best so "
                        "far, time left (default 60; for logs on a cluster, where the bar is unreadable)")
    p.add_argument("--fresh", action="store_true",
                   help="delete the step's journal (<out>.journal) and start the step from its beginning (default: "
                        "resume from the journal a killed or stopped run of the same step left)")
    numerics_arg(p)
    progress_arg(p)


@command("step", step_args, help="one greedy search step -> step_<k>.json",
         description="Evaluate every remaining block on top of step k-1's removals and remove the one giving the lowest "
                     "calibration perplexity. Ties: attention before MLP, then ascending layer. Finished work is "
                     "journaled in <out>.journal: a step killed, or stopped by SIGTERM / SIGINT (exit status 75), "
                     "resumes where it was when rerun, and writes what an uninterrupted run writes.")
def cmd_step(a: argparse.Namespace) -> None:
    import torch

    from ..blocks import PrunableModel
    from ..numerics import Numerics
    from ..data.calibration import load_calibration
    from ..model_dir import load_model_dir, read_manifest
    from ..devices import resolve_device
    from ..compensate.fit import check_method
    from ..compensate.search import step_scorer
    from ..engine.forward import window_batch_for
    from ..search.greedy import (COMPENSATIONS, StepSettings, check_budget, journal_key, load_previous, parse_shard,
                                 search_step)
    from ..search.journal import NO_JOURNAL, Journal, StepInterrupted, interruptible, journal_path
    from ..steps import step_inputs, write_shard, write_step

    bound = {} if a.head_bound_columns is None else {"head_bound_columns": a.head_bound_columns}
    compensated = a.compensation != "none" and a.compensation in COMPENSATIONS
    alpha = check_method(a.compensation, a.compensation_alpha) if compensated else a.compensation_alpha
    device = "cuda" if a.device_map else resolve_device(a.device)
    settings = StepSettings.make(a.candidates, a.screen_windows, a.confirm_top, a.candidates_by_bi, numerics=a.numerics,
                                 compensation=a.compensation, compensation_alpha=alpha,
                                 window_batch=window_batch_for(a.window_batch, device), **bound)
    settings.validate()
    shard = parse_shard(a.shard) if a.shard else None
    if shard and settings.mode != "exact":
        raise UserError("--shard splits exact steps only; run a screened step unsharded")
    manifest = read_manifest(a.model)
    calib = load_calibration(a.calib)
    removed, prev = load_previous(a.prev, a.k, manifest["content_hash"], calib.hash, settings)
    check_budget(manifest["num_layers"], removed, settings, a.k)
    numerics = Numerics(a.numerics)
    inputs = step_inputs(a.model, manifest, a.calib, calib.hash, a.prev)
    dtype = numerics.load_dtype(a.dtype)
    path = journal_path(a.out)
    if a.fresh:
        path.unlink(missing_ok=True)
    journal = NO_JOURNAL if compensated else Journal.open(path, journal_key(
        a.k, removed, settings, inputs, prev=prev, early_stop=not a.no_early_stop, shard=shard,
        device=torch.device(device).type, dtype=dtype or manifest["dtype"]))
    model, _, _ = load_model_dir(a.model, dtype, a.device, a.device_map, tokenizer=False)
    try:
        with interruptible(journal):
            record = search_step(numerics.apply(PrunableModel.wrap(model)), calib.windows, a.k, removed, settings,
                                 inputs, progress=not a.no_progress, prev=prev, early_stop=not a.no_early_stop,
                                 shard=shard, score_compensated=step_scorer(alpha) if compensated else None,
                                 journal=journal, log_every_s=a.log_every)
    except StepInterrupted:
        raise Resumable(f"step {a.k} was asked to stop; the {journal.written} units of work it finished in this run "
                        f"are in {path} (with what earlier runs left): rerun the same command, or the workflow, to "
                        "resume from there") from None
    finally:
        journal.close()
    (write_shard if shard else write_step)(a.out, record)
    journal.remove()


def gather_step_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shards", nargs="+", required=True, help="the N shard artifacts of one step")
    p.add_argument("--out", required=True, help="output step_<k>.json")


@command("gather-step", gather_step_args, help="combine the shard artifacts of one step -> step_<k>.json",
         description="Pick the winner over the partial artifacts written by `step --shard i/N` for i = 0..N-1. The result "
                     "equals the unsharded step except cost (summed over shards), timing and a `shards` field.")
def cmd_gather_step(a: argparse.Namespace) -> None:
    from ..search.greedy import gather_shards
    from ..steps import read_shard, write_step

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
    from ..blocks import PrunableModel
    from ..numerics import Numerics
    from ..data.calibration import load_calibration
    from ..model_dir import load_model_dir, read_manifest
    from ..search.baselines import baseline_step, check_step, settings_for
    from ..search.greedy import load_previous
    from ..steps import step_inputs, write_step

    settings = settings_for(a.method, a.candidates, a.numerics)
    manifest = read_manifest(a.model)
    calib = load_calibration(a.calib)
    removed, prev = load_previous(a.prev, a.k, manifest["content_hash"], calib.hash, settings)
    check_step(settings, manifest["num_layers"], a.k, removed, prev)
    numerics = Numerics(a.numerics)
    model, _, _ = load_model_dir(a.model, numerics.load_dtype(a.dtype), a.device, a.device_map, tokenizer=False)
    record = baseline_step(numerics.apply(PrunableModel.wrap(model)), calib.windows, a.k, removed, settings,
                           step_inputs(a.model, manifest, a.calib, calib.hash, a.prev), prev=prev, progress=not a.no_progress)
    write_step(a.out, record)


def refine_args(p: argparse.ArgumentParser) -> None:
    model_args(p)
    p.add_argument("--calib", required=True, help="calibration artifact directory the start step was searched on")
    p.add_argument("--step", default=None, help="step_<K>.json whose removal set to refine (greedy's, or any method's)")
    p.add_argument("--steps", nargs="+", default=None,
                   help="step_1.json ... step_N.json of one search: refine the smallest K whose ratio reaches --ratio")
    p.add_argument("--ratio", type=float, default=None, help="with --steps: target ratio of removed parameters")
    p.add_argument("--no-embed", action="store_true", help="with --steps: ratio of non-embedding parameters")
    p.add_argument("--method", default="swap", choices=["swap", "evolution"],
                   help="swap (default): exact rounds of same-kind swaps, the best improving one each round; evolution: "
                        "EvoPress-style (1+lambda) search seeded with the start set (docs/refine.md)")
    p.add_argument("--rounds", type=int, default=None, metavar="N",
                   help="round limit (evolution: generations); default 10 for swap, 20 for evolution")
    p.add_argument("--mixed", action="store_true",
                   help="swap: also swap an attention block for an MLP block or back, where the removed parameters stay "
                        "at least the start set's")
    p.add_argument("--holdout-windows", type=int, default=0, metavar="H",
                   help="overfitting guard: the last H calibration windows do not select; a change is kept only if it "
                        "also lowers their NLL (default 0: every window selects)")
    p.add_argument("--offspring", type=int, default=16, metavar="L", help="evolution: children per generation (16)")
    p.add_argument("--max-mutations", type=int, default=3, metavar="M", help="evolution: at most M flips per child (3)")
    p.add_argument("--selection", default="1:4", metavar="W:S[,W:S]",
                   help="evolution: selection steps before the last, W random windows keeping the best S each "
                        "(default 1:4); the last step scores the survivors on every window against the parent")
    p.add_argument("--seed", type=int, default=0, help="evolution: random seed (default 0)")
    p.add_argument("--head-bound-columns", type=int, default=None, metavar="N",
                   help=f"cut changes that cannot beat the incumbent by the LM-head bound (default {HEAD_BOUND_COLUMNS}, "
                        "0 = off; exact either way)")
    p.add_argument("--no-early-stop", action="store_true",
                   help="score every change on every window (same result; for checking)")
    window_batch_arg(p)
    p.add_argument("--out", required=True,
                   help="output .json (a step record of K with the refined set); rounds go to <out>.rounds/")
    p.add_argument("--fresh", action="store_true", help="delete <out>.rounds/ and refine from the start")
    numerics_arg(p)
    progress_arg(p)


def parse_selection(text: str) -> tuple[tuple[int, int], ...]:
    try:
        steps = tuple(tuple(int(x) for x in part.split(":")) for part in text.split(","))
    except ValueError:
        raise UserError(f"bad --selection {text!r}: expected W:S[,W:S...], e.g. 1:4,3:2") from None
    if any(len(s) != 2 for s in steps):
        raise UserError(f"bad --selection {text!r}: expected W:S[,W:S...], e.g. 1:4,3:2")
    return steps


@command("refine", refine_args, help="refine a step's removal set at the same K (swap or evolutionary search)",
         description="Start from the blocks step_<K>.json removed and look for a better set of K blocks, with the same "
                     "number of attention and MLP blocks (--mixed: across kinds, never growing the model), by "
                     "calibration perplexity: exact rounds of swaps (default), "
                     "or an EvoPress-style evolutionary search. The result never has a higher calibration perplexity "
                     "than the start. Each round is written to <out>.rounds/; a rerun continues after the last one "
                     "(and a round from its journal). The output is a step record of K that materialize reads.")
def cmd_refine(a: argparse.Namespace) -> None:
    import shutil

    import torch

    from ..blocks import PrunableModel
    from ..data.calibration import load_calibration
    from ..devices import resolve_device
    from ..engine.forward import window_batch_for
    from ..model_dir import load_model_dir, read_manifest
    from ..numerics import Numerics
    from ..search.journal import StepInterrupted
    from ..search.refine import RefineSettings, refine, rounds_dir
    from ..steps import chosen_step, read_step, step_inputs, write_step

    device = "cuda" if a.device_map else resolve_device(a.device)
    rounds = a.rounds if a.rounds is not None else (10 if a.method == "swap" else 20)
    if rounds < 0:
        raise UserError(f"--rounds must be >= 0, got {rounds}")
    bound = {} if a.head_bound_columns is None else {"head_bound_columns": a.head_bound_columns}
    settings = RefineSettings(a.method, a.mixed, a.holdout_windows, a.offspring, a.max_mutations,
                              parse_selection(a.selection), a.seed, window_batch=window_batch_for(a.window_batch, device),
                              early_stop=not a.no_early_stop, **bound)
    path = chosen_step(a.step, a.steps, a.ratio, a.no_embed)
    start = read_step(path)
    manifest = read_manifest(a.model)
    calib = load_calibration(a.calib)
    if start["inputs"]["model_hash"] != manifest["content_hash"]:
        raise UserError(f"{path}: made for another model (content hash differs); refine a step of {a.model}")
    if start["inputs"]["calibration_hash"] != calib.hash:
        raise UserError(f"{path}: searched on other calibration data; give the --calib it was searched on")
    if start["settings"].get("numerics", "fp32") != a.numerics:
        raise UserError(f"{path}: searched with --numerics {start['settings'].get('numerics', 'fp32')}; refine with the same")
    settings.validate(len(calib.windows))
    if a.mixed and start["settings"].get("candidates", "all") != "all":
        raise UserError(f"--mixed swaps across kinds, but {path} searched {start['settings']['candidates']} blocks only")
    if a.mixed and a.method != "swap":
        raise UserError("--mixed is a swap option; evolution keeps the number of blocks of each kind")
    kinds = ("attn", "mlp") if start["settings"].get("candidates", "all") == "all" else (start["settings"]["candidates"],)
    if a.fresh:
        shutil.rmtree(rounds_dir(a.out), ignore_errors=True)
    numerics = Numerics(a.numerics)
    dtype = numerics.load_dtype(a.dtype)
    inputs = step_inputs(a.model, manifest, a.calib, calib.hash, path)
    model, _, _ = load_model_dir(a.model, dtype, a.device, a.device_map, tokenizer=False)
    try:
        record = refine(numerics.apply(PrunableModel.wrap(model)), calib.windows, start, settings, inputs, a.out,
                        rounds=rounds, kinds=kinds, progress=not a.no_progress, journal_device=torch.device(device).type,
                        dtype=dtype or manifest["dtype"])
    except StepInterrupted:
        raise Resumable(f"refinement of {path} was asked to stop; its finished rounds are in {rounds_dir(a.out)} and the "
                        "round in flight in its journal: rerun the same command to resume") from None
    write_step(a.out, record)
    log.info("refined K=%d (%s): ppl %.4f -> %.4f, %d blocks changed -> %s", record["k"], a.method, start["ppl"],
             record["ppl"], len(record["search"]["changed"]) // 2, a.out)


def target_k_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", required=True, help="directory holding step_<k>.json files")
    p.add_argument("--ratio", type=float, required=True, help="target ratio of removed parameters, e.g. 0.2")
    p.add_argument("--no-embed", action="store_true", help="ratio of non-embedding parameters instead of all")


@command("target-k", target_k_args, help="smallest K reaching a pruning ratio, from step artifacts")
def cmd_target_k(a: argparse.Namespace) -> None:
    from ..steps import read_step, steps_to_ratio

    paths = sorted(Path(a.steps).glob("step_*.json"), key=lambda p: int(p.stem.split("_")[1]))
    print(steps_to_ratio([read_step(p) for p in paths], a.ratio, "ratio_no_embed" if a.no_embed else "ratio"))


def sequence_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("steps", nargs="+", help="step_1.json ... step_K.json of one search (no gaps)")
    p.add_argument("--out", required=True, help="output .csv")


@command("sequence", sequence_args, help="the removal sequence of step_<k>.json files as a CSV a person can read",
         description="One row per step: k, removed block, its type and layer, calibration perplexity, attention / MLP "
                     "blocks removed so far, pruning ratio.")
def cmd_sequence(a: argparse.Namespace) -> None:
    from ..report.summary import write_sequence

    rows = write_sequence(a.out, a.steps)
    log.info("removal sequence of %d steps (%s) -> %s", len(rows), ", ".join(r["removed_block"] for r in rows), a.out)
